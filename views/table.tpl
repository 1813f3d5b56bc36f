<table class="list">
<thead><tr>
% for h in heads:
% if h['href']:
<th class="{{h['cls']}}"><a href="{{h['href']}}">{{h['label']}}</a> {{h['mark']}}</th>
% else:
<th class="{{h['cls']}}">{{h['label']}}</th>
% end
% end
</tr></thead>
<tbody>
% for row in rows:
<tr>
% for c in row:
% if c['href']:
<td class="{{c['cls']}}"><a href="{{c['href']}}" title="{{c['title']}}">{{c['text']}}</a></td>
% elif c['title']:
<td class="{{c['cls']}}" title="{{c['title']}}">{{c['text']}}</td>
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
