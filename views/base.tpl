<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{{page.title}} · p3s</title>
% if page.refresh != '0':
<meta http-equiv="refresh" content="{{page.refresh}}">
% end
<link rel="stylesheet" href="/static/p3s.css">
</head>
<body>
<header>
<a class="brand" href="{{page.nav[0][1]}}">p3s</a>
<nav>
% for label, href in page.nav:
<a href="{{href}}">{{label}}</a>
% end
</nav>
<span class="refresh">refresh:
% for label, href, on in page.refresh_links:
<a href="{{href}}" class="{{'on' if on else ''}}">{{label}}</a>
% end
</span>
<span class="updated">updated <time id="updated">{{page.now}}</time> · times in {{page.zone}}</span>
</header>
<h1>{{page.title}}</h1>
<main>
{{!base}}
</main>
</body>
</html>
