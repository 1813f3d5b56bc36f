% rebase('base', title='Dashboard', refresh=refresh, now=now)
<section class="panel">
<h2>Jobs</h2>
<table>
% for state in job_states:
<tr><th>{{state}}</th><td>{{counts['jobs'].get(state, 0)}}</td></tr>
% end
</table>
</section>
<section class="panel">
<h2>Pilots</h2>
<table>
% for state in pilot_states:
<tr><th>{{state}}</th><td>{{counts['pilots'].get(state, 0)}}</td></tr>
% end
</table>
</section>
% if get('jobtypes'):
<section class="panel">
<h2>Job types</h2>
<table>
<tr><th>type</th><th>cap</th><th>active</th><th>queued</th></tr>
% for t in jobtypes:
<tr><td>{{t['name']}}</td><td>{{'none' if t['cap'] is None else t['cap']}}</td><td>{{t['active']}}</td><td>{{t['queued']}}</td></tr>
% end
</table>
</section>
% end
% if get('services'):
<section class="panel">
<h2>Service messages</h2>
<table>
% for m in services:
<tr><td>{{m['created_at'][:19]}}</td><th>{{m['name']}}</th><td>{{m['message']}}</td></tr>
% end
</table>
</section>
% end
