"""The monitor's workflow, DAG, data and datatype pages in-process: listings on an empty and a
busy database, filters, sorting, paging, the graph drawn as SVG, 404s, escaping, query plans."""
import re
from xml.sax.saxutils import escape


import p3s_server as srv
from conftest import monitor_get as get, query_plan, sql_db
from synthetic import fill
from test_workflows import NOOP, graphml, shell_job, txt

EVIL = '<script>alert("x")</script>'
LISTINGS = ('/monitor/workflows', '/monitor/dags', '/monitor/data', '/monitor/datatypes')


def diamond(name='diamond', priority=99):
    """A -> B, A -> C, B => D (two parallel edges), C -> D, D -> end (a noop), A -> end
    (skipping two layers)."""
    nodes = {v: shell_job('true', priority=priority) for v in 'ABCD'}
    nodes['end'] = NOOP
    edges = [('A', 'B', txt('seed.txt', 'SEED')), ('A', 'C', txt('seed.txt', 'SEED')),
             ('B', 'D', txt('upper.txt', 'UPPER')), ('B', 'D', txt('note.txt', 'NOTE')),
             ('C', 'D', txt('rev.txt', 'REV')), ('D', 'end', txt('result.txt', 'RESULT')),
             ('A', 'end', txt('log.txt', 'LOG'))]
    return {'name': name, 'graphml': graphml(nodes, edges), 'user': 'ann'}


def setup_dag(store, dag=None):
    now = srv.utcnow()
    srv.add_datatype(store, {'name': 'TXT', 'ext': '.txt'}, now)
    return srv.add_dag(store, dag or diamond(), now)


def new_workflow(store, dag='diamond', **fields):
    return srv.add_workflow(store, dict({'dag': dag}, **fields), srv.utcnow())


def run_next(store, state='finished', errcode=0):
    """A pilot takes the best queued job and ends it; returns the job's uuid."""
    pilot = srv.register_pilot(store, {'host': 'node1'}, srv.utcnow())['uuid']
    reply, _ = srv.request_work(store, pilot, srv.utcnow())
    job = reply['job']['uuid']
    for st, code in (('running', None), (state, errcode)):
        srv.report_job(store, pilot, {'uuid': job, 'state': st, 'pid': 1, 'errcode': code,
                                      'stdout': '', 'stderr': ''}, srv.utcnow())
    return job


def uuids(body, what='workflows'):
    return re.findall(r'href="/monitor/%s/([0-9a-f-]{36})' % what, body)


def svg(body):
    return re.search(r'<svg class="graph".*?</svg>', body, re.S).group(0)


# -- every page, empty and busy --


def test_every_page_renders_on_an_empty_database(store):
    queries = {'/monitor/workflows': 'state=running,finished&user=x', '/monitor/dags': 'user=x',
               '/monitor/data': 'state=available&name=x', '/monitor/datatypes': 'name=x'}
    for path in LISTINGS:
        assert 'nothing to show' in get(path)
        assert 'nothing to show' in get(path + '?%s&sort=-name&page=2' % queries[path])
    body = get('/')
    assert 'href="/monitor/workflows?state=running"' in body
    assert srv.summary(store, srv.utcnow())['workflows'] == {}


def test_unknown_workflows_and_dags_answer_404(store):
    for path in ('/monitor/workflows/00000000-0000-0000-0000-000000000000',
                 '/monitor/workflows/nope', '/monitor/dags/nope', '/monitor/dags/a/b'):
        body = get(path, 404)
        assert 'There is no' in body and '<html' in body


def test_every_page_renders_on_a_busy_database(store):
    fill(store.path, 3000, pilots=10)
    setup_dag(store)
    flows = [new_workflow(store, state='defined', name='night%d' % i) for i in range(30)]
    run_next(store)
    for path in LISTINGS + ('/', '/monitor/dags/diamond', '/monitor/workflows/' + flows[0]['uuid'],
                            '/monitor/data?datatype=TXT&state=available',
                            '/monitor/workflows?state=running,defined&dag=diamond&perpage=25'):
        get(path)
    assert uuids(get('/monitor/workflows?perpage=25')) == [w['uuid'] for w in flows[::-1][:25]]
    s = srv.summary(store, srv.utcnow())
    assert s['workflows'] == {'defined': 29, 'running': 1}
    dashboard = get('/')
    assert re.search(r'href="/monitor/workflows\?state=defined" data-workflows="defined">29<',
                     dashboard)
    assert '30 matching' in get('/monitor/workflows?state=defined,running')
    assert '210 matching' in get('/monitor/data')                  # 7 edges each
    assert '1 matching' in get('/monitor/dags') and '1 matching' in get('/monitor/datatypes')


# -- listings: filters, sorting, paging --


def test_workflow_filters_and_sorting(store):
    setup_dag(store)
    setup_dag(store, diamond('other'))
    a = new_workflow(store, name='alpha', user='ann')['uuid']
    b = new_workflow(store, name='beta', user='bob', state='defined')['uuid']
    c = new_workflow(store, 'other', name='gamma', user='bob', state='defined')['uuid']
    assert uuids(get('/monitor/workflows')) == [c, b, a]                   # newest first
    assert uuids(get('/monitor/workflows?user=bob')) == [c, b]
    assert uuids(get('/monitor/workflows?dag=other')) == [c]
    assert uuids(get('/monitor/workflows?name=beta')) == [b]
    assert uuids(get('/monitor/workflows?state=template')) == [a]
    assert uuids(get('/monitor/workflows?state=template,defined')) == [c, b, a]
    assert uuids(get('/monitor/workflows?state=template&state=defined&user=ann')) == [a]
    assert uuids(get('/monitor/workflows?sort=name')) == [a, b, c]
    assert uuids(get('/monitor/workflows?sort=-user')) == [c, b, a]
    assert 'unknown sort key' in get('/monitor/workflows?sort=nosuch;DROP', 400)
    assert uuids(get('/monitor/workflows?perpage=25&page=2')) == []
    body = get('/monitor/workflows?dag=other')
    assert 'href="/monitor/dags/other"' in body
    assert 'value="other"' in body                            # the filter form keeps it


def test_dag_data_and_datatype_filters(store):
    setup_dag(store)
    setup_dag(store, dict(diamond('second'), user='bob'))
    srv.add_datatype(store, {'name': 'ROOT', 'ext': '.root'}, srv.utcnow())
    body = get('/monitor/dags')
    assert body.index('>second<') < body.index('>diamond<')                # newest first
    assert '>diamond<' not in get('/monitor/dags?user=bob')
    assert '>second<' not in get('/monitor/dags?name=diamond')
    assert get('/monitor/dags?sort=name').index('>diamond<') < get(
        '/monitor/dags?sort=name').index('>second<')
    assert 'href="/monitor/workflows?dag=second"' in body
    types = get('/monitor/datatypes')
    assert types.index('>ROOT<') < types.index('>TXT<')                    # newest first
    assert get('/monitor/datatypes?sort=-name').index('>TXT<') < get(
        '/monitor/datatypes?sort=-name').index('>ROOT<')
    assert '>ROOT<' not in get('/monitor/datatypes?name=TXT')
    assert 'href="/monitor/data?datatype=TXT"' in types

    wf = new_workflow(store, state='defined', fileinfo='sticky')['uuid']
    other = new_workflow(store, 'second', fileinfo='sticky')['uuid']
    data = get('/monitor/data')
    assert '14 matching' in data and 'href="/monitor/datatypes?name=TXT"' in data
    assert '7 matching' in get('/monitor/data?workflow=' + wf)
    assert '7 matching' in get('/monitor/data?state=template')
    assert '14 matching' in get('/monitor/data?state=template,defined')
    assert '2 matching' in get('/monitor/data?name=seed.txt&workflow=' + other)
    assert 'nothing to show' in get('/monitor/data?datatype=ROOT')
    run_next(store)                                      # A finished: its 3 outputs available
    assert '3 matching' in get('/monitor/data?state=available')
    first = get('/monitor/data?sort=name&workflow=' + wf)
    assert first.index('log.txt') < first.index('upper.txt')


# -- detail pages and the graph --


def test_dag_page_shows_its_graph_vertices_edges_and_workflows(store):
    setup_dag(store)
    wf = new_workflow(store)['uuid']
    body = get('/monitor/dags/diamond')
    drawing = svg(body)
    assert drawing.count('<rect') == 5
    assert len(re.findall(r'<path d="M [\d.]+ [\d.]+ C', drawing)) == 7
    assert 'g-noop' in drawing and 'g-vertex' in drawing
    for tag in ('SEED', 'UPPER', 'NOTE', 'REV', 'RESULT', 'LOG'):
        assert '>%s</text>' % tag in drawing
    assert re.search(r'<th>root</th>\s*<td>A</td>', body)
    assert 'upper.txt' in body and 'href="/monitor/workflows/%s"' % wf in body
    assert 'href="/monitor/workflows?dag=diamond"' in body


def test_workflow_page_draws_jobs_by_state_linking_to_their_pages(store):
    setup_dag(store)
    wf = new_workflow(store, state='defined')
    first = run_next(store)
    run_next(store, 'failed', 3)                         # B or C fails: D and end are cancelled
    body = get('/monitor/workflows/' + wf['uuid'])
    drawing = svg(body)
    jobs = {j['name']: j for j in srv.get_workflow(store, wf['uuid'])['jobs']}
    states = {name: j['state'] for name, j in jobs.items()}
    assert sorted(states.values()) == ['cancelled', 'cancelled', 'defined', 'failed', 'finished']
    for name, job in jobs.items():
        node = re.search(r'<a class="node" href="/monitor/jobs/%s"><title>[^<]*</title>\s*'
                         r'<rect class="g-(\w+)"[^>]*/>\s*<text[^>]*>%s</text>'
                         % (job['uuid'], name), drawing)
        assert node and node.group(1) == job['state'], (name, drawing)
    assert first == jobs['A']['uuid']
    legend = re.search(r'<ul class="legend">.*?</ul>', body, re.S).group(0)
    assert re.search(r'g-cancelled"></span> cancelled <b>2</b>', legend)
    assert re.search(r'g-available"></span> data available <b>3</b>', legend)
    assert 'href="/monitor/dags/diamond"' in body and 'failed' in body
    assert body.count('href="/monitor/jobs/%s"' % first) >= 2          # graph and table
    assert 'href="/monitor/data?workflow=%s"' % wf['uuid'] in body
    assert 'href="/monitor/workflows/%s"' % wf['uuid'] in get('/monitor/jobs/' + first)


def test_graph_reads_top_down_and_keeps_parallel_edges_apart(store):
    setup_dag(store)
    wf = new_workflow(store)
    drawing = svg(get('/monitor/workflows/' + wf['uuid']))
    tops = {m.group(2): float(m.group(1)) for m in re.finditer(
        r'<rect class="g-\w+" x="[\d.]+" y="([\d.]+)"[^>]*/>\s*<text[^>]*>(\w+)</text>', drawing)}
    assert tops['A'] < tops['B'] == tops['C'] < tops['D'] < tops['end']
    curves = re.findall(r'<title>[^<]*B → D[^<]*</title>\s*<path d="([^"]+)"', drawing)
    assert len(curves) == 2 and curves[0] != curves[1]
    paths = re.findall(r'<path d="(M [\d.]+ [\d.]+ C[^"]+)"', drawing)
    assert len(paths) == 7
    for d in paths:
        ys = [float(y) for y in re.findall(r'[\d.]+ ([\d.]+)', d)]
        assert ys == sorted(ys), d                                   # every edge goes down
    skip = re.search(r'<title>[^<]*A → end[^<]*</title>\s*<path d="([^"]+)"', drawing).group(1)
    assert ' L ' in skip                        # through the layers between, beside B, C and D


def test_a_graph_too_large_to_draw_is_said_so(store, monkeypatch):
    monkeypatch.setattr(srv, 'MON_GRAPH_MAX', 4)
    setup_dag(store)
    body = get('/monitor/workflows/' + new_workflow(store)['uuid'])
    assert '<svg class="graph"' not in body and '5 vertices are too many to draw' in body


# -- escaping, also inside the SVG --


def test_names_and_tags_are_escaped_everywhere(store):
    bad = escape(EVIL, {'"': '&quot;'})                  # as written in the GraphML attributes
    quote = 'q"uote'
    nodes = {bad: shell_job('true'), escape(quote, {'"': '&quot;'}): shell_job('true')}
    edge = dict(txt(EVIL, 'TAG'), comment=EVIL, dirpath=EVIL)
    dag = {'name': EVIL, 'user': '"><img src=x>', 'description': EVIL,
           'graphml': graphml(nodes, [(bad, escape(quote, {'"': '&quot;'}), edge)])}
    setup_dag(store, dag)
    wf = new_workflow(store, dag=EVIL, name=EVIL, user='"><img src=x>', description=EVIL)
    sql_db(store).execute("UPDATE data SET datatag = :evil, state = :evil", {'evil': EVIL})
    srv.add_datatype(store, {'name': EVIL, 'ext': '"x', 'comment': EVIL}, srv.utcnow())
    pages = LISTINGS + ('/', '/monitor/workflows/' + wf['uuid'], '/monitor/dags/' + EVIL,
                        '/monitor/workflows?dag=' + EVIL, '/monitor/data?name=%22%3E%3Cscript%3E',
                        '/monitor/jobs/' + wf['jobs'][0]['uuid'])
    for path in pages:
        body = get(path)
        assert '<script' not in body.lower() and '<img' not in body, path
    drawing = svg(get('/monitor/workflows/' + wf['uuid']))
    assert '&lt;script&gt;alert(&quot;x&quot;)' in drawing            # a title, whole
    assert '>&lt;script&gt;alert(&quot;x&quot;)&lt;…</text>' in drawing   # a node label, clipped
    assert '>q&quot;uote</text>' in drawing
    assert '>&lt;script&gt;alert(&quot;…</text>' in drawing             # the edge's datatag
    assert 'href="/monitor/dags/%3Cscript%3Ealert%28%22x%22%29%3C%2Fscript%3E"' in get(
        '/monitor/workflows/' + wf['uuid'])
    assert '&lt;script&gt;' in svg(get('/monitor/dags/' + EVIL))


# -- refresh and query plans --


def test_refresh_is_kept_in_every_link(store):
    setup_dag(store)
    wf = new_workflow(store, state='defined')['uuid']
    for path in LISTINGS + ('/monitor/workflows/' + wf, '/monitor/dags/diamond'):
        body = get(path + '?refresh=30')
        chooser = re.search(r'<span class="refresh">.*?</span>', body, re.S).group(0)
        links = [h for h in re.findall(r'href="([^"]*)"', body.replace(chooser, ''))
                 if h.startswith('/') and not h.startswith('/static/')]
        assert len(links) > 8 and all(re.search(r'[?&;]refresh=30(&|$)', h) for h in links), \
            (path, [h for h in links if 'refresh=30' not in h])


LISTING_QUERIES = (
    ('workflows', srv.WORKFLOW_COLUMNS, srv.MON_WORKFLOW_FILTERS, srv.MON_WORKFLOW_ORDER,
     ('state', 'user', 'dag', 'name')),
    ('data', srv.DATA_COLUMNS, srv.DATA_FILTERS, srv.MON_DATA_ORDER,
     ('state', 'workflow', 'datatype', 'name')),
    ('dags', srv.DAG_COLUMNS, srv.MON_DAG_FILTERS, srv.MON_DAG_ORDER, ('name',)),
    ('datatypes', srv.MON_DATATYPE_COLUMNS, srv.MON_NAME_FILTER, srv.MON_DATATYPE_ORDER,
     ('name',)),
)


def test_filtered_listings_read_an_index_in_order(store):
    """Each filter of the new listings is a range of an index already in newest-first order:
    no table scan and no sort, however many workflows and data the database holds."""
    params = dict.fromkeys(('state', 'user', 'dag', 'name', 'workflow', 'datatype'), 'x')
    db = sql_db(store)
    for table, columns, filters, orders, keys in LISTING_QUERIES:
        for key in keys:
            sql = 'SELECT %s FROM %s WHERE %s%s LIMIT 50' % (columns, table, filters[key],
                                                            orders['-id'])
            plan = query_plan(db, sql, params)
            searched = any(st.reads(table, op='SEARCH') and st.index for st in plan)
            assert searched and not any(st.sorts for st in plan), (table, key, plan)
