% rebase('base', page=page)
<section class="panel">
<p>There is no {{what}} <code>{{ident}}</code>. It may have been purged.</p>
</section>
