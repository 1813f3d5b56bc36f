"""The monitor in-process: every page on an empty and a busy database, filters, sorting,
paging, 404s, escaping, the checklist, the refresh period, and the query plans."""
import html
import json
import os
import re
import time
from datetime import datetime, timedelta, timezone


import p3s_server as srv
from conftest import full_scans, monitor_get as get, query_plan, sql_db
from synthetic import fill, wsgi_get

PAGES = ('/', '/api/summary', '/monitor/jobs', '/monitor/pilots',
         '/monitor/jobs?state=defined,failed&sort=-priority&perpage=25',
         '/monitor/jobs?state=error', '/monitor/jobs?jobtype=reco&user=shifter&page=3',
         '/monitor/pilots?state=lost&sort=-last_seen')
EVIL = '<script>alert("x")</script>'


def get_json(path):
    return json.loads(get(path))


def ago(seconds):
    return (datetime.now(timezone.utc) - timedelta(seconds=seconds)).isoformat(
        timespec='microseconds')


def submit(store, *jobs, now=None):
    return srv.submit_jobs(store, [dict({'payload': '/bin/true'}, **j) for j in jobs],
                           now or srv.utcnow())


def run_job(store, job_uuid, state='finished', errcode=0, stdout='', stderr='', host='node1'):
    """Register a pilot, give it the job (only it is queued) and report the job's end."""
    pilot = srv.register_pilot(store, {'host': host}, srv.utcnow())['uuid']
    reply, _ = srv.request_work(store, pilot, srv.utcnow())
    assert reply['job']['uuid'] == job_uuid
    srv.report_job(store, pilot, {'uuid': job_uuid, 'state': 'running', 'pid': 1,
                                  'errcode': None, 'stdout': '', 'stderr': ''}, srv.utcnow())
    srv.report_job(store, pilot, {'uuid': job_uuid, 'state': state, 'pid': 1, 'errcode': errcode,
                                  'stdout': stdout, 'stderr': stderr}, srv.utcnow())
    return pilot


def job_uuids(body):
    return re.findall(r'href="/monitor/jobs/([0-9a-f-]{36})', body)


# -- every page, empty and busy --


def test_every_page_renders_on_an_empty_database(store):
    for path in PAGES:
        get(path)
    s = get_json('/api/summary')
    assert s['jobs'] == {} and s['pilots'] == {}
    assert s['windows'] == ['1 min', '10 min', '1 h', '2 h', '24 h']
    assert s['timeline']['defined'] == [0] * 5
    assert s['latency'] == {'n': 0, 'p50': None, 'p95': None}
    assert len(s['throughput']) == 60 and s['caps'] == {}
    assert [c['status'] for c in s['checks'] if c['check'] == 'Live pilots'] == ['warn']
    assert 'nothing to show' in get('/monitor/jobs')


def test_every_page_renders_on_a_busy_database(store, tmp_path):
    fill(store.path, 3000, pilots=20)
    for path in PAGES:
        get(path)
    s = get_json('/api/summary')
    db = sql_db(store)
    assert sum(s['jobs'].values()) == 3000
    day = ago(86400)
    assert s['timeline']['defined'][4] == db.execute(
        'SELECT count(*) FROM jobs WHERE defined_at >= :day', {'day': day}).fetchone()[0]
    assert s['timeline']['failed'][4] == db.execute(
        "SELECT count(*) FROM jobs WHERE state = 'failed' AND stopped_at >= :day",
        {'day': day}).fetchone()[0]
    queued = db.execute("SELECT jobtype, count(*) FROM jobs WHERE state = 'defined' GROUP BY 1")
    assert {t: n['defined'] for t, n in s['jobtypes'].items()} == dict(queued.fetchall())
    assert s['latency']['n'] > 0 and 0 <= s['latency']['p50'] <= s['latency']['p95']
    assert sum(m['finished'] for m in s['throughput']) > 0
    body = get('/')
    assert body.count('<rect class="finished"') == 60
    some_job = job_uuids(get('/monitor/jobs'))[0]
    get('/monitor/jobs/' + some_job)
    some_pilot = re.findall(r'href="/monitor/pilots/([0-9a-f-]{36})', get('/monitor/pilots'))[0]
    assert job_uuids(get('/monitor/pilots/' + some_pilot))


def test_dashboard_queries_read_indexes_only(store):
    """No statement of the dashboard or listings scans the jobs table (docs/performance.md)."""
    fill(store.path, 500, pilots=5)
    db = sql_db(store)
    params = {'since': ago(60), 'state': 'failed', 'jobtype': 'reco', 'cap': 10, 'limit': 10,
              'cutoff': ago(600), 'states': '["failed"]', 'pilot': 'x', 'name': 'jobtypes',
              'workflow': 'w', 'dag': 'd', 'chars': 13}
    names = [n for n in dir(srv) if n.startswith('MON_') and isinstance(getattr(srv, n), str)
             and 'SELECT' in getattr(srv, n) and n != 'MON_JOBTYPE_CAPS']
    assert len(names) >= 10
    for name in names:
        plan = query_plan(db, getattr(srv, name), params)
        big = [st for st in plan if st.table in ('jobs', 'workflows', 'data')]
        assert all(st.index for st in big), (name, plan)
        assert not any('TEMP B-TREE FOR ORDER BY' in st.detail for st in plan), (name, plan)
    for sort in ('-id', 'state', '-defined_at', '-stopped_at'):
        sql = 'SELECT id FROM jobs WHERE state = :state' + srv.MON_JOB_ORDER[sort]
        assert not full_scans(query_plan(db, sql, params)), sort


# -- listings: filters, sorting, paging --


def test_job_filters(store):
    a = submit(store, {'name': 'a', 'jobtype': 'reco', 'user': 'ann', 'site': 'np04'})[0]
    b = submit(store, {'name': 'b', 'jobtype': 'purity', 'user': 'bob'})[0]
    c = submit(store, {'name': 'c', 'jobtype': 'purity', 'user': 'bob'})[0]
    db = sql_db(store)
    db.execute("UPDATE jobs SET workflow = 'wf-1' WHERE uuid = :b", {'b': b})
    assert set(job_uuids(get('/monitor/jobs'))) == {a, b, c}
    assert job_uuids(get('/monitor/jobs'))[0] == c                     # newest first
    assert set(job_uuids(get('/monitor/jobs?jobtype=purity'))) == {b, c}
    assert set(job_uuids(get('/monitor/jobs?user=ann'))) == {a}
    assert set(job_uuids(get('/monitor/jobs?site=np04'))) == {a}
    assert set(job_uuids(get('/monitor/jobs?workflow=wf-1'))) == {b}
    assert set(job_uuids(get('/monitor/jobs?jobtype=purity&user=ann'))) == set()
    srv.adjust_job(store, c, {'state': 'dropped'}, srv.utcnow())
    assert set(job_uuids(get('/monitor/jobs?state=dropped'))) == {c}
    assert set(job_uuids(get('/monitor/jobs?state=defined,dropped'))) == {a, b, c}
    assert set(job_uuids(get('/monitor/jobs?state=defined&state=dropped'))) == {a, b, c}


def test_a_typo_in_a_listing_is_an_error_not_an_empty_list(store):
    """An unknown state, filter or sort key answers 400 with the reason, on the monitor (HTML)
    and in the API (JSON), instead of an empty listing that reads as "no jobs"."""
    submit(store, {'name': 'a'})
    for path, reason in (('/monitor/jobs?state=finshed', "unknown state 'finshed'"),
                         ('/monitor/jobs?state=defined,bogus', "unknown state 'bogus'"),
                         ('/monitor/jobs?jobtyp=reco', "unknown query parameter 'jobtyp'"),
                         ('/monitor/pilots?state=defined', "unknown state 'defined'"),
                         ('/monitor/workflows?state=error', "unknown state 'error'"),
                         ('/monitor/dags?state=defined', "unknown query parameter 'state'"),
                         ('/monitor/pilots?sort=priority', "unknown sort key 'priority'")):
        body = html.unescape(get(path, 400))
        assert reason in body and '<html' in body, (path, body[-600:])
    for path, reason in (('/api/jobs?state=bogus', "unknown state 'bogus'"),
                         ('/api/jobs?jobtyp=reco', "unknown query parameter 'jobtyp'"),
                         ('/api/pilots?state=finished', "unknown state 'finished'"),
                         ('/api/workflows?dag=x', "unknown query parameter 'dag'"),
                         ('/api/dags?name=x', "unknown query parameter 'name'"),
                         ('/api/services?user=x', "unknown query parameter 'user'")):
        code, headers, body = wsgi_get(srv.app, path)
        assert code == 400 and reason in json.loads(body)['error'], (path, body)
    # Data states are free text (the data clients write their own), so any state is a filter.
    assert 'nothing to show' in get('/monitor/data?state=merged')
    assert get_json('/api/data?state=merged') == {'data': []}
    assert len(get_json('/api/jobs?state=defined,error&limit=5')['jobs']) == 1


def test_state_error_means_a_non_zero_exit_code(store):
    ok, bad, killed = submit(store, {'name': 'ok'}, {'name': 'bad'}, {'name': 'killed'})
    srv.kill_job(store, killed, srv.utcnow())
    pilot_ok = run_job(store, ok)
    pilot_bad = run_job(store, bad, 'failed', 7)
    assert set(job_uuids(get('/monitor/jobs?state=error'))) == {bad}
    assert set(job_uuids(get('/monitor/jobs?state=error,killed'))) == {bad, killed}
    assert set(job_uuids(get('/monitor/jobs?pilot=' + pilot_ok))) == {ok}
    body = get('/monitor/pilots?state=active')
    assert pilot_ok in body and pilot_bad in body


def test_sorting_is_whitelisted_and_paging_walks_everything(store):
    uuids = submit(store, *[{'name': 'j%02d' % i, 'priority': i % 7} for i in range(60)])
    first = job_uuids(get('/monitor/jobs?perpage=25'))
    assert first == uuids[::-1][:25]
    by_prio = job_uuids(get('/monitor/jobs?sort=-priority&perpage=100'))
    prios = {u: i % 7 for i, u in enumerate(uuids)}
    assert [prios[u] for u in by_prio] == sorted(prios.values(), reverse=True)
    assert 'unknown sort key' in get('/monitor/jobs?sort=name;DROP TABLE jobs', 400)
    assert 'perpage must be one of 25, 50' in get('/monitor/jobs?perpage=7', 400)
    assert 'page must be a whole number' in get('/monitor/jobs?page=x', 400)
    assert job_uuids(get('/monitor/jobs?perpage=25')) == first
    seen = []
    for page in (1, 2, 3):
        body = get('/monitor/jobs?perpage=25&page=%d' % page)
        seen += job_uuids(body)
    assert seen == uuids[::-1]
    assert 'rel="next"' not in body and 'rel="prev"' in body
    assert '60 matching' in body


# -- detail pages and 404s --


def test_job_page_shows_every_field_its_pilot_workflow_and_logs(store):
    [job] = submit(store, {'name': 'reco-1', 'env': {'RUN': '42'}})
    pilot = run_job(store, job, 'failed', 2, stdout='all good so far', stderr='Segmentation fault')
    sql_db(store).execute("UPDATE jobs SET workflow = '11111111-2222-3333-4444-555555555555'")
    body = get('/monitor/jobs/' + job)
    for field in srv.JOB_COLUMNS.replace('"', '').split(', '):
        assert '<th>%s</th>' % field in body
    assert 'href="/monitor/pilots/%s"' % pilot in body
    assert 'href="/monitor/workflows/11111111-2222-3333-4444-555555555555"' in body
    assert 'Segmentation fault' in body and 'all good so far' in body
    assert '&quot;RUN&quot;: &quot;42&quot;' in body
    assert job in get('/monitor/pilots/' + pilot)


def test_a_queued_job_page_says_why_it_waits_and_attempts_link_each_other(store):
    [job] = submit(store, {'name': 'evd', 'jobtype': 'evdisp', 'site': 'np04'})
    body = html.unescape(get('/monitor/jobs/' + job))
    assert re.search(r'<h2>Why it is not running: defined [0-9.]+ s, since ', body)
    assert '<li>no pilot is live: it needs a pilot of site np04 that takes type evdisp' in body
    srv.adjust_job(store, job, {'state': 'dropped'}, srv.utcnow())
    body = get('/monitor/jobs/' + job)
    assert 'Why it is not running' not in body
    again = srv.retry_job(store, job, srv.utcnow())['uuid']
    assert 'href="/monitor/jobs/%s"' % again in get('/monitor/jobs/' + job)      # retried_by
    body = get('/monitor/jobs/' + again)
    assert 'href="/monitor/jobs/%s"' % job in body and '<th>attempt</th>\n<td>2</td>' in body
    assert 'evd (attempt 2)' in get('/monitor/jobs')


def test_listings_show_host_workflow_and_batch_id(store):
    [job] = submit(store, {'name': 'reco'})
    sql_db(store).execute("UPDATE jobs SET workflow = '11111111-2222-3333-4444-555555555555'")
    pilot = srv.register_pilot(store, {'host': 'worker7.cern.ch', 'extra': 'slurm:4242'},
                               srv.utcnow())['uuid']
    srv.request_work(store, pilot, srv.utcnow())
    body = get('/monitor/jobs')
    assert '<td class="">worker7.cern.ch</td>' in body
    assert 'href="/monitor/workflows/11111111-2222-3333-4444-555555555555"' in body
    assert '<td class="">slurm:4242</td>' in get('/monitor/pilots')


def test_a_data_file_has_a_page_and_its_jobs_are_links_with_text(store):
    """An injected file's record names its job by uuid only: the link shows it, not nothing."""
    reply = srv.inject(store, {'files': [{'path': '/eos/np04/raw/run5077.root'}],
                               'jobs': [{'payload': '/bin/true'}], 'datatype': 'ROOT'},
                       srv.utcnow())
    [result] = reply['files']
    [job] = result['jobs']
    body = get('/monitor/data')
    assert '<a href="/monitor/data/%s" title="%s">%s</a>' % (result['data'], result['data'],
                                                            result['data'][:8]) in body
    assert '<a href="/monitor/jobs/%s" title="%s">%s</a>' % (job, job, job[:8]) in body
    page = get('/monitor/data/' + result['data'])
    assert '<th>name</th>\n<td>run5077.root</td>' in page
    assert 'href="/monitor/jobs/%s"' % job in page
    assert 'href="/monitor/datatypes?name=ROOT"' in page
    assert 'There is no data file' in get('/monitor/data/00000000-0000-0000-0000-000000000000',
                                          404)


def test_unknown_ids_answer_404(store):
    for path in ('/monitor/jobs/00000000-0000-0000-0000-000000000000', '/monitor/jobs/nope',
                 '/monitor/pilots/00000000-0000-0000-0000-000000000000', '/monitor/pilots/x'):
        body = get(path, 404)
        assert 'There is no' in body and '<html' in body
    code, headers, body = wsgi_get(srv.app, '/api/jobs/00000000-0000-0000-0000-000000000000')
    assert code == 404 and headers['Content-Type'] == 'application/json'


# -- escaping --


def test_every_value_is_escaped(store):
    [job] = submit(store, {'name': EVIL, 'jobtype': EVIL, 'user': '"><img src=x>',
                           'site': '', 'env': {'X': EVIL, EVIL: 'y'}})
    pilot = run_job(store, job, 'failed', 1, stdout='</pre>' + EVIL, stderr=EVIL,
                    host='<b>host</b>')
    pages = ['/', '/api/summary', '/monitor/jobs', '/monitor/jobs/' + job, '/monitor/pilots',
             '/monitor/pilots/' + pilot, '/monitor/jobs?jobtype=' + EVIL,
             '/monitor/jobs?user=%22%3E%3Cscript%3E', '/monitor/jobs/%3Cscript%3E',
             '/?refresh=%3Cscript%3E', '/monitor/jobs?sort=%3Cscript%3E']
    for path in pages:
        body = get(path, 404 if '%3Cscript' in path and '/jobs/' in path
                   else 400 if 'sort=' in path else 200)
        if path == '/api/summary':
            continue
        assert '<script' not in body.lower(), path
        assert '<img' not in body and '<b>host' not in body, path
    assert '&lt;script&gt;' in get('/monitor/jobs/' + job)
    assert '&lt;/pre&gt;' in get('/monitor/jobs/' + job)
    assert '&lt;b&gt;host&lt;/b&gt;' in get('/monitor/pilots/' + pilot)


# -- refresh, time zone --


def test_refresh_period_is_kept_in_every_link(store):
    [job] = submit(store, {'name': 'x'})
    pilot = run_job(store, job)
    for path in ('/', '/monitor/jobs', '/monitor/jobs/' + job, '/monitor/jobs?state=finished',
                 '/monitor/pilots', '/monitor/pilots/' + pilot):
        body = get(path + ('&' if '?' in path else '?') + 'refresh=10')
        assert '<meta http-equiv="refresh" content="10">' in body
        chooser = re.search(r'<span class="refresh">.*?</span>', body, re.S).group(0)
        assert re.findall(r'href="[^"]*?refresh=(\d+)"', chooser) == ['0', '5', '10', '30', '60']
        links = [h for h in re.findall(r'href="([^"]*)"', body.replace(chooser, ''))
                 if h.startswith('/') and not h.startswith('/static/')]
        assert len(links) > 4 and all(re.search(r'[?&;]refresh=10(&|$)', h) for h in links), \
            (path, [h for h in links if 'refresh=10' not in h])
        assert ('action="%s"' % path.split('?')[0]) not in body or \
            '<input type="hidden" name="refresh" value="10">' in body
    assert 'http-equiv="refresh"' not in get('/?refresh=7')
    assert 'http-equiv="refresh"' not in get('/?refresh=0')


def test_the_dashboard_reloads_by_default_and_other_pages_do_not(store):
    """A wall screen shows the dashboard: it reloads unless told not to; a listing with its
    filter form does not, unless asked. The default is not carried to other pages."""
    body = get('/')
    assert '<meta http-equiv="refresh" content="30">' in body
    assert re.search(r'<a href="/\?refresh=30" class="on">30 s</a>', body)
    assert 'href="/monitor/jobs"' in body                  # the default is not passed on
    assert 'http-equiv="refresh"' not in get('/monitor/jobs')
    body = get('/?refresh=0')
    assert 'http-equiv="refresh"' not in body and 'href="/monitor/jobs?refresh=0"' in body


def test_times_are_shown_in_the_local_zone_with_its_name(store, monkeypatch):
    monkeypatch.setenv('TZ', 'Asia/Kolkata')      # UTC+05:30, no daylight saving
    time.tzset()
    try:
        [job] = submit(store, {'name': 'x'}, now='2026-01-02T03:04:05.000000+00:00')
        body = get('/monitor/jobs/' + job)
        assert 'IST (UTC+05:30)' in body
        assert '2026-01-02 08:34:05' in body
    finally:
        monkeypatch.delenv('TZ')
        time.tzset()


# -- the checklist --


def checks(name):
    return [c for c in get_json('/api/summary')['checks'] if c['check'] == name]


def test_checklist_says_what_is_wrong(store):
    submit(store, {'name': 'old'}, now=ago(1200))
    [live] = checks('Live pilots')
    assert live['status'] == 'fail' and 'No live pilots: 1 queued' in live['detail']
    [queue] = checks('Queue')
    assert queue['status'] == 'fail' and '1 job has waited longer than 10 min' in queue['detail']
    pilot = srv.register_pilot(store, {'host': 'h'}, ago(3000))['uuid']
    assert checks('Live pilots')[0]['status'] == 'ok'
    srv.sweep(store, srv.utcnow(), 600)
    [lost] = checks('Lost pilots')
    assert lost['status'] == 'warn' and lost['detail'].startswith('1 pilot lost')
    assert srv.get_pilot(store, pilot)['state'] == 'lost'
    body = get('/')
    assert 'FAIL' in body and 'No live pilots' in body


def test_failed_jobs_and_workflows_of_the_last_hour_are_on_the_checklist(store):
    """Failures are not green: a warning when some jobs or workflows failed in the last hour,
    a failure when many jobs did and they are at least half of those that ended."""
    assert [c['status'] for c in checks('Failed jobs') + checks('Failed workflows')] == ['ok'] * 2

    def ended(n, state='finished', errcode=0):
        for _ in range(n):
            run_job(store, submit(store, {'name': state})[0], state, errcode)

    ended(3, 'failed', 1)
    ended(12)
    [jobs] = checks('Failed jobs')
    assert jobs['status'] == 'warn', jobs
    assert jobs['detail'] == '3 jobs ended badly in the last hour (3 failed), 20% of those that ended'
    assert jobs['link'] == '/monitor/jobs?state=failed,timelimit,nonstarter,lost&sort=-stopped_at'
    ended(6, 'failed', 2)
    ended(1, 'timelimit', None)
    assert checks('Failed jobs')[0]['status'] == 'warn'            # 10 of 22: under half
    ended(2, 'failed', 3)
    [jobs] = checks('Failed jobs')
    assert jobs['status'] == 'fail', jobs
    assert jobs['detail'].startswith('12 jobs ended badly in the last hour (11 failed, '
                                     '1 timelimit), 50%')
    db = sql_db(store)
    db.execute("INSERT INTO workflows (uuid, dag, state, nvertices, created_at, stopped_at) "
               "VALUES ('w1', 'd', 'failed', 1, :a, :b), ('w2', 'd', 'failed', 1, :c, :d)",
               {'a': ago(100), 'b': ago(50), 'c': ago(9000), 'd': ago(8000)})
    [flows] = checks('Failed workflows')
    assert flows['status'] == 'warn' and flows['detail'] == '1 workflow failed in the last hour'
    body = html.unescape(get('/?refresh=0'))
    assert 'Failed jobs' in body and '12 jobs ended badly' in body
    assert 'href="/monitor/workflows?state=failed&sort=-stopped_at&refresh=0"' in body


def test_throughput_over_an_hour_a_day_and_a_week(store):
    [recent, yesterday, last_week] = submit(store, {'name': 'a'}, {'name': 'b'}, {'name': 'c'})
    for job in (recent, yesterday, last_week):
        run_job(store, job)
    db = sql_db(store)
    db.execute('UPDATE jobs SET stopped_at = :t WHERE uuid = :u',
               {'t': ago(5 * 3600), 'u': yesterday})
    db.execute('UPDATE jobs SET stopped_at = :t WHERE uuid = :u',
               {'t': ago(5 * 86400), 'u': last_week})
    for span, bars, total in (('1h', 60, 1), ('24h', 24, 2), ('7d', 168, 3)):
        s = get_json('/api/summary?throughput=' + span)
        assert s['throughput_span'] == span and len(s['throughput']) == bars
        assert sum(b['finished'] for b in s['throughput']) == total, span
        assert s['throughput'][0]['start'] < ago(0.95 * {'1h': 3600, '24h': 86400,
                                                          '7d': 7 * 86400}[span])
        assert s['throughput'][-1]['start'] <= srv.utcnow()
    body = get('/?throughput=7d')
    assert 'jobs ended per hour, last 7 days' in body and '3 finished (green)' in body
    assert 'href="/?throughput=24h"' in body
    assert 'throughput is one of 1h, 24h, 7d' in html.unescape(get('/?throughput=2d', 400))
    code, headers, body = wsgi_get(srv.app, '/api/summary?throughput=1w')
    assert code == 400 and 'throughput is one of' in json.loads(body)['error']


def test_caps_are_shown_and_a_capped_type_is_paused(store):
    assert 'no caps set' in get('/')
    [running] = submit(store, {'jobtype': 'reco'})
    run_pilot = srv.register_pilot(store, {'host': 'h'}, srv.utcnow())['uuid']
    assert srv.request_work(store, run_pilot, srv.utcnow())[0]['job']['uuid'] == running
    submit(store, {'jobtype': 'reco'}, {'jobtype': 'purity'})
    for name, cap in (('reco', 1), ('purity', 5), ('femb', None)):
        srv.set_cap(store, {'name': name, 'cap': cap}, srv.utcnow())
    s = get_json('/api/summary')
    assert s['caps'] == {'reco': 1, 'purity': 5}
    [cap] = checks('Jobtype caps')
    assert cap['status'] == 'warn' and 'type reco paused by its cap' in cap['detail']
    body = get('/')
    assert 'Jobtype caps' in body and 'type reco paused' in body and 'no caps set' not in body


# -- p3s_job.py --summary, against the real server --


def test_summary_client_prints_the_dashboard(clients, server):
    from conftest import make_job
    clients.submit([make_job('/bin/true', jobtype='reco'), make_job('/bin/false', jobtype='reco')])
    clients.run_pilot('--cycles', '2')
    text = clients.run('job', '--summary', check=0).stdout
    assert 'jobs:   failed 1, finished 1' in text and 'workflows: none' in text
    assert re.search(r'^reco\s+0\s+0\s+0\s+1\s+1$', text, re.M), text
    assert re.search(r'^WARN\s+Live pilots\s+No live pilots', text, re.M), text
    s = json.loads(clients.run('job', '--summary', '--json', check=0).stdout)
    assert s['jobs'] == {'failed': 1, 'finished': 1} and s['timeline']['finished'][4] == 1
    assert sum(m['finished'] for m in s['throughput']) == 1
    assert sum(m['other'] for m in s['throughput']) == 1
    assert s['latency']['n'] == 2


def test_docs_describe_every_monitor_page():
    doc = open(os.path.join(os.path.dirname(os.path.dirname(__file__)), 'docs', 'monitor.md')).read()
    for route in srv.app.routes:
        if route.rule == '/' or route.rule.startswith('/monitor/'):
            documented = re.sub(r'<\w+_uuid>', '<uuid>', re.sub(r'<(\w+):\w+>', r'<\1>',
                                                                 route.rule))
            assert '`%s`' % documented in doc or '`%s ' % documented in doc, route.rule
    for key in (srv.MON_JOB_SORTS + srv.MON_PILOT_SORTS + srv.MON_WORKFLOW_SORTS
                + srv.MON_DAG_SORTS + srv.MON_DATA_SORTS + srv.MON_DATATYPE_SORTS
                + srv.MON_SITE_SORTS + srv.MON_SERVICE_SORTS):
        assert '`%s`' % key in doc, key
