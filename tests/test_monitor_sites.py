"""The monitor's site and service-message pages in-process: empty and busy,
newest first, the name filter, sorting, escaping, the dashboard's messages, query plans."""
import re


import p3s_server as srv
from conftest import monitor_get as get, query_plan, sql_db
from synthetic import fill

EVIL = '<script>alert("x")</script>'


def site(store, name, **fields):
    return srv.define_site(store, dict({'name': name}, **fields), srv.utcnow())


def note(store, name, message):
    return srv.add_service_message(store, {'name': name, 'message': message}, srv.utcnow())


def rows(body):
    return re.findall(r'<tr>\s*<td class="[^"]*">(?:<a[^>]*>)?([^<]*)', body.split('<tbody>')[1])


def messages(body):
    return re.findall(r'<td class="wrap">([^<]*)</td>', body)


def test_pages_on_an_empty_database(store):
    for path in ('/monitor/sites', '/monitor/services', '/monitor/services?name=x&sort=-name',
                 '/monitor/sites?name=x&page=3'):
        assert 'nothing to show' in get(path)
    assert 'unknown query parameter' in get('/monitor/sites?name=x&state=lost', 400)
    assert 'Service messages' not in get('/')


def test_sites_newest_first_filtered_by_name_with_links_to_pilots_and_jobs(store):
    site(store, 'np04', pilots=40, lifetime=7200, env={'DQM': '1'}, comment='the cluster')
    site(store, 'lxvm', pilots=4, cycles=10)
    body = get('/monitor/sites')
    assert rows(body) == ['lxvm', 'np04']
    assert 'href="/monitor/pilots?site=np04"' in body and 'href="/monitor/jobs?site=np04"' in body
    assert '2.0 h' in body and '{&quot;DQM&quot;: &quot;1&quot;}' in body
    assert rows(get('/monitor/sites?name=np04')) == ['np04']
    assert rows(get('/monitor/sites?sort=-pilots')) == ['np04', 'lxvm']
    assert rows(get('/monitor/sites?sort=name')) == ['lxvm', 'np04']
    site(store, 'np04', pilots=50)                      # last changed first
    assert rows(get('/monitor/sites')) == ['np04', 'lxvm']


def test_services_newest_first_filtered_by_name(store):
    for i in range(30):
        note(store, ('purge', 'inputsize')[i % 2], 'message %d' % i)
    body = get('/monitor/services?perpage=25')
    assert messages(body) == ['message %d' % i for i in range(29, 4, -1)]
    assert '30 matching' in body and 'rel="next"' in body
    named = get('/monitor/services?name=purge')
    assert messages(named) == ['message %d' % i for i in range(28, -1, -2)]
    assert 'href="/monitor/services?name=purge"' in named
    assert messages(get('/monitor/services?sort=created_at&perpage=25'))[0] == 'message 0'
    assert 'unknown sort key' in get('/monitor/services?sort=x;DROP&perpage=25', 400)


def test_dashboard_links_its_service_messages(store):
    note(store, 'purge', 'purged 12 jobs')
    body = get('/?refresh=30')
    assert 'href="/monitor/services?name=purge&amp;refresh=30"' in body
    assert 'href="/monitor/services?refresh=30"' in body and 'purged 12 jobs' in body


def test_pages_on_a_busy_database(store):
    fill(store.path, 2000, pilots=20)
    for i in range(300):
        site(store, 'site%03d' % i, pilots=i)
        note(store, 'svc%d' % (i % 5), 'note %d' % i)
    assert rows(get('/monitor/sites?perpage=25'))[0] == 'site299'
    assert '300 matching' in get('/monitor/sites')
    assert '60 matching' in get('/monitor/services?name=svc3')
    assert rows(get('/monitor/sites?name=site042')) == ['site042']
    get('/')


def test_values_are_escaped(store):
    site(store, EVIL, comment=EVIL, env={EVIL: EVIL})
    note(store, EVIL, EVIL + '\n"><img src=x>')
    for path in ('/monitor/sites', '/monitor/services', '/', '/monitor/services?name=' + EVIL):
        body = get(path)
        assert '<script' not in body.lower() and '<img' not in body, path
    assert '&lt;script&gt;alert(&quot;x&quot;)' in get('/monitor/services')


def test_name_filters_read_an_index_in_order(store):
    db = sql_db(store)
    for table, columns, orders in (('services', srv.MON_SERVICE_COLUMNS, srv.MON_SERVICE_ORDER),
                                   ('sites', srv.MON_SITE_COLUMNS, srv.MON_SITE_ORDER)):
        sql = 'SELECT %s FROM %s WHERE %s%s LIMIT 50' % (
            columns, table, srv.MON_NAME_FILTER['name'], orders['-id'])
        plan = query_plan(db, sql, {'name': 'x'})
        searched = any(st.reads(table, op='SEARCH') and st.index for st in plan)
        assert searched and not any(st.sorts for st in plan), plan
