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
