% rebase('base', page=page)
% notice = get('notice')
% if notice:
<section class="panel wide notice">
<h2>{{notice['title']}}</h2>
<ul>
% for line in notice['lines']:
<li>{{line}}</li>
% end
</ul>
</section>
% end
<section class="panel">
<table class="fields">
% for name, text, href in fields:
<tr><th>{{name}}</th>
% if href:
<td><a href="{{href}}">{{text}}</a></td>
% elif '\n' in text:
<td><pre>{{text}}</pre></td>
% else:
<td>{{text}}</td>
% end
</tr>
% end
% for name, text in extra:
<tr><th>{{name}}</th><td>{{text}}</td></tr>
% end
</table>
</section>
% for name, text in logs:
<section class="panel wide log">
<h2>{{name}} <small>(last 64 KiB)</small></h2>
% if text:
<pre id="{{name}}">{{text}}</pre>
% else:
<p class="empty" id="{{name}}">empty (or not reported yet)</p>
% end
</section>
% end
% if graph:
<section class="panel wide">
<h2>Graph</h2>
% include('graph', graph=graph)
</section>
% end
% for table in tables:
<section class="panel wide">
<h2>{{table['title']}}
% if table['more']:
<small><a href="{{table['more']}}">all of them, with filters</a></small>
% end
</h2>
% include('table', heads=table['heads'], rows=table['rows'])
</section>
% end
