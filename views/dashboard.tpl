% rebase('base', page=page)
<section class="panel checklist">
<h2>Checklist</h2>
<table>
% for c in d['checks']:
<tr class="{{c['status']}}"><td class="status">{{c['status'].upper()}}</td><th>{{c['check']}}</th>
% if c['href']:
<td><a href="{{c['href']}}">{{c['detail']}}</a></td>
% else:
<td>{{c['detail']}}</td>
% end
</tr>
% end
</table>
</section>
<section class="panel">
<h2>Jobs</h2>
<table class="counts">
% for state, n, href in d['jobs']:
<tr class="state {{state}}"><th>{{state}}</th><td><a href="{{href}}" data-state="{{state}}">{{n}}</a></td></tr>
% end
<tr><th>exit ≠ 0</th><td><a href="{{d['errors_href']}}">see list</a></td></tr>
</table>
</section>
<section class="panel">
<h2>Pilots</h2>
<table class="counts">
% for state, n, href in d['pilots']:
<tr class="state {{state}}"><th>{{state}}</th><td><a href="{{href}}">{{n}}</a></td></tr>
% end
</table>
</section>
<section class="panel">
<h2>Workflows</h2>
<table class="counts">
% for state, n, href in d['workflows']:
<tr class="state {{state}}"><th>{{state}}</th><td><a href="{{href}}" data-workflows="{{state}}">{{n}}</a></td></tr>
% end
</table>
</section>
<section class="panel">
<h2>Timeline of job states</h2>
<table class="counts timeline">
<tr><th></th>
% for w in d['windows']:
<th class="num">{{w}}</th>
% end
</tr>
% for row, counts, href in d['timeline']:
<tr class="state {{row}}"><th><a href="{{href}}">{{row}}</a></th>
% for n in counts:
<td class="{{'' if n else 'zero'}}">{{n}}</td>
% end
</tr>
% end
</table>
</section>
<section class="panel">
<h2>Throughput <small>jobs ended {{d['chart']['caption']}} ·
% for name, href, on in d['spans']:
<a href="{{href}}" class="{{'on' if on else ''}}">{{name}}</a>
% end
</small></h2>
<svg class="chart" width="{{d['chart']['w']}}" height="{{d['chart']['h'] + 18}}" viewBox="0 0 {{d['chart']['w']}} {{d['chart']['h'] + 18}}" role="img" aria-label="jobs ended per minute">
<line x1="0" y1="{{d['chart']['h']}}" x2="{{d['chart']['w']}}" y2="{{d['chart']['h']}}" class="axis"/>
% for b in d['chart']['bars']:
<g><title>{{b['title']}}</title>
<rect class="finished" x="{{b['x']}}" y="{{b['yf']}}" width="{{b['w']}}" height="{{b['hf']}}"/>
<rect class="other" x="{{b['x']}}" y="{{b['yo']}}" width="{{b['w']}}" height="{{b['ho']}}"/></g>
% end
<text x="0" y="{{d['chart']['h'] + 14}}">{{d['chart']['first']}}</text>
<text x="{{d['chart']['w']}}" y="{{d['chart']['h'] + 14}}" text-anchor="end">{{d['chart']['last']}}</text>
<text x="4" y="12">max {{d['chart']['top']}}/{{d['chart']['unit']}}</text>
</svg>
<p>{{d['chart']['total']}} finished (green), {{d['chart']['others']}} other endings (red).</p>
<h2>Queue latency <small>defined → started, last hour</small></h2>
<table class="counts">
<tr><th>p50</th><td>{{d['latency']['p50'] or '–'}}</td></tr>
<tr><th>p95</th><td>{{d['latency']['p95'] or '–'}}</td></tr>
<tr><th>jobs started</th><td>{{d['latency']['n']}}</td></tr>
</table>
</section>
<section class="panel">
<h2>Job types</h2>
<table class="counts types">
<tr><th>type</th><th class="num">defined</th><th class="num">dispatched</th><th class="num">running</th><th class="num">finished 24 h</th><th class="num">failed 24 h</th><th class="num">cap</th></tr>
% for t, n, cap, href in d['types']:
<tr><th><a href="{{href}}">{{t}}</a></th><td>{{n['defined']}}</td><td>{{n['dispatched']}}</td><td>{{n['running']}}</td><td>{{n['finished_24h']}}</td><td>{{n["failed_24h"]}}</td><td>{{cap}}</td></tr>
% end
% if not d['types']:
<tr><td colspan="7" class="empty">no jobs in the last 24 h</td></tr>
% end
</table>
<h2>Jobtype caps</h2>
<table class="counts">
% for t, cap in d['caps'].items():
<tr><th>{{t}}</th><td>{{cap}}</td></tr>
% end
% if not d['caps']:
<tr><td class="empty">no caps set</td></tr>
% end
</table>
<p class="host">server {{d['host']}}, up {{d['uptime']}}</p>
</section>
% if d.get('services'):
<section class="panel">
<h2>Service messages <small>latest notes of payloads and cron scripts · <a href="{{d['services_href']}}">all of them</a></small></h2>
<table class="services">
% for m in d['services']:
<tr><td>{{m['when']}}</td><th><a href="{{m['href']}}">{{m['name']}}</a></th><td>{{m['message']}}</td></tr>
% end
</table>
</section>
% end
