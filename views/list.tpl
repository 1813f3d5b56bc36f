% rebase('base', page=page)
<section class="panel wide">
<form class="filters" method="get" action="{{form['action']}}">
% if form['states']:
<fieldset class="states"><legend>state</legend>
% for state, on in form['states']:
<label><input type="checkbox" name="state" value="{{state}}"{{' checked' if on else ''}}> {{state}}</label>
% end
</fieldset>
% end
% for name, value in form['fields']:
<label>{{name}} <input type="text" name="{{name}}" value="{{value}}" size="12"></label>
% end
<label>per page <select name="perpage">
% for n, on in form['perpage']:
<option value="{{n}}"{{' selected' if on else ''}}>{{n}}</option>
% end
</select></label>
% for name, value in form['hidden']:
<input type="hidden" name="{{name}}" value="{{value}}">
% end
<button type="submit">filter</button> <a href="{{form['clear']}}">clear</a>
</form>
<p class="count">{{pager['matches']}} matching · page {{pager['page']}}{{' of %s' % pager['last'] if pager['last'] else ''}}
% if pager['prev']:
· <a rel="prev" href="{{pager['prev']}}">← newer</a>
% end
% if pager['next']:
· <a rel="next" href="{{pager['next']}}">older →</a>
% end
</p>
% include('table', heads=heads, rows=rows)
</section>
