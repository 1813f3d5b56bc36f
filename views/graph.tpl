% if graph['too_big']:
<p class="empty">{{graph['too_big']}} vertices are too many to draw; the tables below list them.</p>
% else:
<svg class="graph" width="{{graph['w']}}" height="{{graph['h']}}" viewBox="{{graph['x0']}} 0 {{graph['w']}} {{graph['h']}}" role="img" aria-label="the graph: jobs and the data between them">
<defs><marker id="arrow" viewBox="0 0 10 10" refX="10" refY="5" markerWidth="7" markerHeight="7" orient="auto"><path d="M 0 0 L 10 5 L 0 10 z"/></marker></defs>
% for e in graph['edges']:
<g class="edge g-{{e['cls']}}"><title>{{e['title']}}</title>
<path d="{{e['d']}}" marker-end="url(#arrow)"/>
<text x="{{e['lx']}}" y="{{e['ly']}}" text-anchor="middle">{{e['label']}}</text></g>
% end
% for n in graph['nodes']:
% if n['href']:
<a class="node" href="{{n['href']}}"><title>{{n['title']}}</title>
% else:
<g class="node"><title>{{n['title']}}</title>
% end
<rect class="g-{{n['cls']}}" x="{{n['x']}}" y="{{n['y']}}" width="{{n['w']}}" height="{{n['h']}}" rx="5"/>
<text x="{{n['tx']}}" y="{{n['ty']}}" text-anchor="middle">{{n['label']}}</text>
% if n['href']:
</a>
% else:
</g>
% end
% end
</svg>
% end
<ul class="legend">
% for kind, cls, label, n in graph['legend']:
<li><span class="{{kind}} g-{{cls}}"></span> {{label}} <b>{{n}}</b></li>
% end
</ul>
