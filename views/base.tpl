<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>{{title}} · p3s</title>
% if refresh:
<meta http-equiv="refresh" content="{{refresh}}">
% end
<link rel="stylesheet" href="/static/p3s.css">
</head>
<body>
<header><a class="brand" href="/">p3s</a> <span class="updated">updated {{now}}</span></header>
<main>
{{!base}}
</main>
</body>
</html>
