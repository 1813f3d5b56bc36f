% rebase('base', page=page)
<section class="panel">
<p class="refused">{{message}}</p>
</section>
