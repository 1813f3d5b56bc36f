<table class="list">
<thead><tr>
% for h in heads:
% if h['href']:
<th><a href="{{h['href']}}">{{h['label']}}</a> {{h['mark']}}</th>
% else:
<th>{{h['label']}}</th>
% end
% end
</tr></thead>
<tbody>
% for row in rows:
<tr>
% for c in row:
% if c['href']:
<td class="{{c['cls']}}"><a href="{{c['href']}}">{{c['text']}}</a></td>
% else:
<td class="{{c['cls']}}">{{c['text']}}</td>
% end
% end
</tr>
% end
% if not rows:
<tr><td colspan="{{len(heads)}}" class="empty">nothing to show</td></tr>
% end
</tbody>
</table>
