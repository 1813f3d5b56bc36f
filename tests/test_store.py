"""In-process tests of the SQL, brokerage and housekeeping, on a temporary database."""
import io
import json
import os
import sqlite3
import threading
import wsgiref.util
from collections import Counter
from datetime import datetime, timedelta

import pytest

import p3s_server as srv
from conftest import (ON_POSTGRES, ROOT, InProcessFront, database_connection, fresh_database,
                      full_scans, query_plan, sql_db, sqlite_only, wait_for)


@pytest.fixture
def store(tmp_path):
    st = srv.configure(fresh_database(tmp_path), sync='normal')
    yield st
    st.close()


def later(now, seconds):
    return (datetime.fromisoformat(now) + timedelta(seconds=seconds)).isoformat(timespec='microseconds')


def pilot(store, **fields):
    return srv.register_pilot(store, dict({'host': 'h'}, **fields), srv.utcnow())['uuid']


def submit(store, n=1, **fields):
    return srv.submit_jobs(store, [dict({'payload': '/bin/true'}, **fields)] * n, srv.utcnow())


def wsgi(method, path, body=None, raw=None, token=None):
    """Call the Bottle app directly: (status, JSON body)."""
    data = raw if raw is not None else (b'' if body is None else json.dumps(body).encode())
    environ = {'REQUEST_METHOD': method, 'PATH_INFO': path.split('?')[0],
               'QUERY_STRING': path.partition('?')[2], 'CONTENT_LENGTH': str(len(data)),
               'CONTENT_TYPE': 'application/json', 'wsgi.input': io.BytesIO(data)}
    if token:
        environ['HTTP_AUTHORIZATION'] = 'Bearer ' + token
    wsgiref.util.setup_testing_defaults(environ)
    status = []
    chunks = srv.app(environ, lambda s, h, e=None: status.append((s, dict(h))))
    text = b''.join(chunks)
    code = int(status[0][0].split()[0])
    assert status[0][1]['Content-Type'].startswith('application/json'), (path, text[:200])
    return code, json.loads(text)


# -- brokerage ---------------------------------------------------------------------------------

def plan(store, sql, params):
    return query_plan(sql_db(store), sql, params)


def test_claim_walks_the_queue_index_without_sorting(store):
    db = sql_db(store)
    now = srv.utcnow()
    rows = [{'uuid': 'u%d' % i, 'payload': 'x', 'state': 'finished' if i % 10 else 'defined',
             'now': now} for i in range(20000)]
    db.executemany("INSERT INTO jobs (uuid, payload, state, created_at, defined_at) "
                   "VALUES (:uuid, :payload, :state, :now, :now)", rows)
    db.execute('ANALYZE')
    steps = plan(store, srv.CLAIM_JOB, {'pilot': 'p', 'host': 'h', 'site': '', 'jobtypes': '[]',
                                        'now': now, 'left': srv.MAX_TIMELIMIT, 'last_queued': 0})
    assert any(s.reads('jobs', 'jobs_queue', 'SCAN') for s in steps), steps
    assert not any(s.sorts for s in steps), steps
    assert not full_scans(steps), steps


# Index scans of the jobs table by index: those of the current transaction (and any not yet
# flushed), and those every session has flushed.
INDEX_SCANS = """
SELECT c.relname AS name, pg_stat_get_xact_numscans(c.oid) AS scans
  FROM pg_index AS i JOIN pg_class AS c ON c.oid = i.indexrelid
 WHERE i.indrelid = CAST('jobs' AS regclass) AND pg_stat_get_xact_numscans(c.oid) > 0
"""
FLUSHED_INDEX_SCANS = """
SELECT indexrelname AS name, idx_scan AS scans FROM pg_stat_user_indexes
 WHERE relname = 'jobs' AND idx_scan > 0
"""
WALKED = Counter({'jobs_queue': 1, 'jobs_pkey': 1})     # a claim that walked the queue index


def scans(db, sql):
    return Counter({r['name']: r['scans'] for r in db.execute(sql).fetchall()})


def statistics_say_nothing_is_queued(store):
    """The jobs table as a purge leaves it once vacuum has counted it, then 1,000 jobs queued."""
    db = sql_db(store)
    now = srv.utcnow()
    db.execute("INSERT INTO jobs (uuid, payload, state, created_at, defined_at) "
               "SELECT CAST(gen_random_uuid() AS text), 'x', 'defined', :now, :now "
               "FROM generate_series(1, 5000)", {'now': now})
    db.execute("UPDATE jobs SET state = 'finished'")
    db.execute('DELETE FROM jobs')
    db.execute('VACUUM jobs')
    submit(store, 1000)
    return db


@pytest.mark.skipif(not ON_POSTGRES, reason='PostgreSQL\'s planner (P3S_TEST_DB=postgresql)')
def test_claim_walks_the_queue_index_when_statistics_say_nothing_is_queued(store):
    """After a purge has emptied the table and vacuum has counted it, the planner believes no
    job is queued: the claim must still walk the queue index, not sort the queue."""
    statistics_say_nothing_is_queued(store)
    params = srv.claim_params({'uuid': 'p', 'host': 'h', 'site': '', 'jobtypes': '[]'},
                              srv.utcnow(), None, 0)
    for _ in range(8):          # past the custom plans of a prepared statement, to its generic one
        with store.write() as tx:
            before = scans(tx, INDEX_SCANS)
            assert tx.execute(srv.CLAIM_JOB, params).fetchone() is not None
            after = scans(tx, INDEX_SCANS)
            assert tx.execute('SHOW enable_sort').fetchone()[0] == 'on'     # for what follows
        assert after - before == WALKED, after - before


@pytest.mark.skipif(not ON_POSTGRES, reason='PostgreSQL\'s planner (P3S_TEST_DB=postgresql)')
def test_a_pilots_claims_walk_the_queue_index_when_statistics_say_nothing_is_queued(store):
    """The same through brokerage: a work request's claim (sent with its COMMIT) and a held
    pilot's claim after a wake-up, their scans read once their session has flushed them."""
    watcher = statistics_say_nothing_is_queued(store)
    store.one('SELECT pg_stat_force_next_flush()')          # the submission's scans first
    wait_for(lambda: scans(watcher, FLUSHED_INDEX_SCANS)['jobs_uuid_key'] >= 1000,
             what='the submission\'s index scans to be flushed')
    for i in range(8):
        me = pilot(store)
        before = scans(watcher, FLUSHED_INDEX_SCANS)
        if i % 2:
            reply, _ = srv.request_work(store, me, srv.utcnow())
            assert reply['state'] == 'dispatched', reply
        else:
            held = store.one(srv.GET_PILOT, {'uuid': me})
            assert srv.held_claim(store, held, srv.utcnow(), None) is not None
        # The claim's session (the pool's one connection) flushes as soon as it idles; were it
        # another, PostgreSQL flushes an idle session's scans within ten seconds all the same.
        store.one('SELECT pg_stat_force_next_flush()')
        wait_for(lambda: sum((scans(watcher, FLUSHED_INDEX_SCANS) - before).values()) >= 2,
                 what='the claim\'s index scans to be flushed')
        assert scans(watcher, FLUSHED_INDEX_SCANS) - before == WALKED


def test_both_claims_hand_out_jobs_in_the_same_order(store):
    """The walk by type (used when types are blocked or filtered) must keep the order of the
    plain walk: priority, then first defined, across types."""
    import random
    rng = random.Random(7)
    now = srv.utcnow()
    db = sql_db(store)
    db.executemany("INSERT INTO jobs (uuid, payload, jobtype, priority, state, created_at, defined_at) "
                   "VALUES (:uuid, 'x', :jobtype, :priority, 'defined', :now, :defined)",
                   [{'uuid': 'u%d' % i, 'jobtype': rng.choice('abcde'), 'priority': rng.randint(-2, 2),
                     'now': now, 'defined': later(now, rng.randint(0, 50))} for i in range(300)])
    params = {'pilot': 'p', 'host': 'h', 'site': '', 'jobtypes': '[]', 'now': later(now, 99),
              'blocked': '[]', 'left': srv.MAX_TIMELIMIT, 'last_queued': 0}
    orders = []
    for sql in (srv.CLAIM_JOB, srv.CLAIM_JOB_BY_TYPE):
        taken = [r['uuid'] for r in iter(lambda: db.execute(sql, params).fetchone(), None)]
        db.execute("UPDATE jobs SET state = 'defined', pilot = NULL, dispatched_at = NULL")
        orders.append(taken)
    assert len(orders[0]) == 300 and orders[0] == orders[1]
    blocked = dict(params, blocked='["a", "b"]', jobtypes='["b", "c"]')
    only_c = [r['jobtype'] for r in iter(lambda: db.execute(srv.CLAIM_JOB_BY_TYPE, blocked).fetchone(), None)]
    assert set(only_c) == {'c'} and len(only_c) == db.execute(
        "SELECT count(*) FROM jobs WHERE jobtype = 'c'").fetchone()[0]


def test_sixteen_threads_claim_500_jobs_exactly_once(store):
    submitted = set(submit(store, 500))
    pilots = [pilot(store) for _ in range(16)]
    claimed, errors = [], []

    def work(me):
        try:
            while True:
                reply, _ = srv.request_work(store, me, srv.utcnow())
                if reply['state'] != 'dispatched':
                    return
                job = reply['job']['uuid']
                claimed.append((job, me))
                srv.report_job(store, me, {'uuid': job, 'state': 'finished', 'errcode': 0,
                                           'pid': None, 'stdout': '', 'stderr': ''}, srv.utcnow())
        except Exception as e:                                   # pragma: no cover
            errors.append(e)

    threads = [threading.Thread(target=work, args=(p,)) for p in pilots]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    assert len(claimed) == 500 and {j for j, _ in claimed} == submitted
    rows = sql_db(store).execute('SELECT uuid, state, pilot FROM jobs').fetchall()
    assert {r['state'] for r in rows} == {'finished'}
    assert {(r['uuid'], r['pilot']) for r in rows} == set(claimed)
    done = sum(r['jobs_done'] for r in sql_db(store).execute('SELECT jobs_done FROM pilots'))
    assert done == 500


def test_submission_is_all_or_nothing_and_idempotent(store):
    good = {'payload': '/bin/true', 'uuid': '0f0c2f2e-0000-4000-8000-000000000001'}
    with pytest.raises(srv.Refused):
        srv.submit_jobs(store, [good, {'payload': ''}], srv.utcnow())
    assert sql_db(store).execute('SELECT count(*) FROM jobs').fetchone()[0] == 0
    assert srv.submit_jobs(store, [good], srv.utcnow()) == [good['uuid']]
    assert srv.submit_jobs(store, [good], srv.utcnow()) == [good['uuid']]     # a retry
    assert sql_db(store).execute('SELECT count(*) FROM jobs').fetchone()[0] == 1


# -- housekeeping ------------------------------------------------------------------------------

def test_silent_pilot_is_lost_with_its_job_and_late_reports_change_nothing(store):
    quiet, alive = pilot(store), pilot(store)
    submit(store, 2)
    job = srv.request_work(store, quiet, srv.utcnow())[0]['job']['uuid']
    srv.report_job(store, quiet, {'uuid': job, 'state': 'running', 'pid': 7, 'errcode': None,
                                  'stdout': '', 'stderr': ''}, srv.utcnow())
    srv.request_work(store, alive, srv.utcnow())
    now = srv.utcnow()
    sql_db(store).execute('UPDATE pilots SET last_seen = :t WHERE uuid = :p',
                       {'t': later(now, -200), 'p': quiet})
    assert srv.sweep(store, now, pilot_timeout=120)['lost_pilots'] == [quiet]
    assert srv.get_pilot(store, quiet)['state'] == 'lost'
    assert srv.get_pilot(store, alive)['state'] == 'dispatched'
    assert srv.get_job(store, job)['state'] == 'lost'
    late = srv.report_job(store, quiet, {'uuid': job, 'state': 'finished', 'errcode': 0, 'pid': 7,
                                         'stdout': 'late', 'stderr': ''}, srv.utcnow())
    assert late['status'] == 'STOP'
    assert srv.get_job(store, job, logs=True)['state'] == 'lost'
    assert srv.get_job(store, job, logs=True)['stdout'] == ''
    assert srv.request_work(store, quiet, srv.utcnow())[0] == {'status': 'STOP', 'state': 'lost'}
    assert srv.heartbeat(store, quiet, job, srv.utcnow())['status'] == 'STOP'
    assert srv.sweep(store, now, pilot_timeout=120)['lost_pilots'] == []


def test_heartbeat_orders_a_kill_when_the_job_was_killed(store):
    me = pilot(store)
    submit(store)
    job = srv.request_work(store, me, srv.utcnow())[0]['job']['uuid']
    assert srv.heartbeat(store, me, job, srv.utcnow())['status'] == 'OK'
    srv.kill_job(store, job, srv.utcnow())
    assert srv.heartbeat(store, me, job, srv.utcnow()) == {'status': 'KILL', 'state': 'killed'}


# -- long polls --------------------------------------------------------------------------------

@pytest.fixture
def front(store):
    door = InProcessFront(store, max_waiters=2)
    yield door
    door.close()


def test_waiters_are_bounded_and_woken_by_matching_jobs(store, front):
    a, b, c = pilot(store, jobtypes=['x']), pilot(store), pilot(store)
    held_a, held_b = front.spawn_work(a, 10), front.spawn_work(b, 10)
    front.wait_until(lambda: len(front.front.waiters) == 2, what='two held pilots')
    # both slots are taken: a third pilot is answered at once
    assert front.work(c, 10) == {'status': 'OK', 'state': 'idle', 'waited': False}
    submit(store, jobtype='y')           # only b may run it
    held_b.join(5)
    assert held_b.value['job']['jobtype'] == 'y' and not held_a.ready()
    submit(store, jobtype='x')
    held_a.join(5)
    assert held_a.value['job']['jobtype'] == 'x'


def test_a_job_submitted_while_the_claim_runs_is_not_missed(store, front):
    """A wake-up that comes between a pilot's empty claim and its wait sends it round again
    at once, rather than leaving it to wait for the next one."""
    me = pilot(store)
    seq = front.front.waiters.seq
    [job] = submit(store)
    front.wait_until(lambda: front.front.waiters.seq > seq, what='the wake-up to arrive')
    front.front.waiters.wait('', [], 30, seq)           # returns at once: a wake-up came
    assert front.work(me, 10)['job']['uuid'] == job

# -- schema ------------------------------------------------------------------------------------

@sqlite_only
def test_a_newer_schema_is_refused(tmp_path):
    path = str(tmp_path / 'new.db')
    db = sqlite3.connect(path)
    db.execute('PRAGMA user_version = 99')
    db.close()
    with pytest.raises(SystemExit, match='newer'):
        srv.configure(path)


@sqlite_only
def test_a_version_1_database_is_migrated_with_its_records(tmp_path):
    """A database written before retries and cancelled workflows: the server brings it up to
    date at start, keeping every record, and what the new version needs then works."""
    path = str(tmp_path / 'old.db')
    db = sqlite3.connect(path)
    with open(os.path.join(ROOT, 'tests', 'data', 'schema_version_1.sql')) as f:
        db.executescript(f.read())
    db.execute("INSERT INTO jobs (uuid, payload, state, created_at, stopped_at) VALUES "
               "('00000000-0000-0000-0000-00000000000a', '/bin/false', 'failed', 't', 't')")
    db.execute("INSERT INTO workflows (uuid, dag, state, nvertices, created_at) VALUES "
               "('00000000-0000-0000-0000-00000000000b', 'g', 'running', 1, 't')")
    db.commit()
    db.close()
    st = srv.configure(path)
    try:
        assert st.one('PRAGMA user_version')[0] == srv.SCHEMA_VERSION
        old = srv.get_job(st, '00000000-0000-0000-0000-00000000000a')
        assert old['state'] == 'failed' and old['attempt'] == 1 and old['retry_of'] is None
        [again] = srv.retry_selection(st, {'uuids': [old['uuid']]}, srv.utcnow())['retried']
        assert srv.get_job(st, again['retry'])['retry_of'] == old['uuid']
        wf = srv.cancel_workflow(st, '00000000-0000-0000-0000-00000000000b', srv.utcnow())
        assert wf['state'] == 'cancelled'
        indexes = {r[0] for r in st.query("SELECT name FROM sqlite_master WHERE type = 'index'")}
        assert {'workflows_state', 'workflows_ended', 'jobs_retry_of'} <= indexes
        assert st.one('PRAGMA integrity_check')[0] == 'ok'
    finally:
        st.close()
    srv.configure(path).close()                    # once migrated, starting again is harmless


@sqlite_only
def test_schema_is_idempotent_and_wal(store, tmp_path):
    srv.apply_schema(sql_db(store))
    assert sql_db(store).execute('PRAGMA journal_mode').fetchone()[0] == 'wal'
    assert sql_db(store).execute('PRAGMA user_version').fetchone()[0] == srv.SCHEMA_VERSION


# -- bad input through the WSGI app ------------------------------------------------------------

BAD_REQUESTS = [
    ('POST', '/api/jobs', {'payload': '/bin/true'}, 400, 'list'),
    ('POST', '/api/jobs', [], 400, 'list'),
    ('POST', '/api/jobs', [{'name': 'x'}], 400, 'payload is required'),
    ('POST', '/api/jobs', [{'payload': 'x', 'state': 'finished'}], 400, 'state'),
    ('POST', '/api/jobs', [{'payload': 'x', 'env': {'A': 1}}], 400, 'must be a string'),
    ('POST', '/api/jobs', [{'payload': 'x', 'env': []}], 400, 'env'),
    ('POST', '/api/jobs', [{'payload': 'x', 'priority': '1'}], 400, 'integer'),
    ('POST', '/api/jobs', [{'payload': 'x', 'timelimit': 0}], 400, 'timelimit'),
    ('POST', '/api/jobs', [{'payload': 'x', 'colour': 'red'}], 400, 'unknown job field'),
    ('POST', '/api/jobs', [{'payload': 'x', 'uuid': 'not-a-uuid'}], 400, 'uuid'),
    ('POST', '/api/jobs', [{'payload': 'x' * 10000}], 400, 'longer'),
    ('POST', '/api/jobs', b'{"oops', 400, 'not valid JSON'),
    ('GET', '/api/jobs?limit=0', None, 400, 'limit'),
    ('GET', '/api/jobs?limit=many', None, 400, 'limit'),
    ('GET', '/api/jobs/0f0c2f2e-0000-4000-8000-000000000009', None, 404, 'no such job'),
    ('GET', '/api/jobs/<script>', None, 404, 'no such job'),
    ('POST', '/api/jobs/0f0c2f2e-0000-4000-8000-000000000009/adjust', {'state': 'finished'}, 400, 'adjusted'),
    ('POST', '/api/jobs/0f0c2f2e-0000-4000-8000-000000000009/adjust', {'priority': 1}, 404, 'no such job'),
    ('POST', '/api/jobs/0f0c2f2e-0000-4000-8000-000000000009/kill', None, 404, 'no such job'),
    ('DELETE', '/api/jobs/0f0c2f2e-0000-4000-8000-000000000009', None, 404, 'no such job'),
    ('POST', '/api/pilots', {'jobtypes': 'a,b'}, 400, 'jobtypes'),
    ('POST', '/api/pilots', {'pid': -1}, 400, 'pid'),
    ('POST', '/api/pilots/0f0c2f2e-0000-4000-8000-000000000009/work', {}, 404, 'no such pilot'),
    ('POST', '/api/pilots/{pilot}/work', {}, 401, "own secret"),
    ('POST', '/api/pilots/{pilot}/work', {'wait': 'long'}, 400, 'number'),
    ('POST', '/api/pilots/{pilot}/report', {'job': 'x', 'state': 'finished'}, 400, 'uuid'),
    ('POST', '/api/pilots/{pilot}/report',
     {'job': '0f0c2f2e-0000-4000-8000-000000000009', 'state': 'dispatched'}, 400, 'reports one of'),
    ('POST', '/api/pilots/{pilot}/report',
     {'job': '0f0c2f2e-0000-4000-8000-000000000009', 'state': 'failed', 'errcode': 0}, 400, 'non-zero'),
    ('POST', '/api/pilots/{pilot}/stop', {'state': 'finished'}, 400, 'stops as'),
    ('POST', '/api/pilots', {'nonce': 'short'}, 400, 'nonce'),
    ('GET', '/api/nowhere', None, 404, 'Not found'),
    ('PUT', '/api/jobs', None, 405, 'Method not allowed'),
]


@pytest.mark.parametrize('method,path,body,status,message', BAD_REQUESTS)
def test_bad_input_is_a_4xx_json_error_and_stores_nothing(store, method, path, body, status, message):
    me = srv.register_pilot(store, {'host': 'h'}, srv.utcnow())
    path = path.replace('{pilot}', me['uuid'])
    secret = None if status == 401 else me['secret']
    code, reply = wsgi(method, path, raw=body, token=secret) if isinstance(body, bytes) \
        else wsgi(method, path, body, token=secret)
    assert code == status and message in reply['error'], reply
    assert '\n' not in reply['error']
    assert sql_db(store).execute('SELECT count(*) FROM jobs').fetchone()[0] == 0


def test_oversized_body_is_413(store):
    code, reply = wsgi('POST', '/api/jobs', raw=b' ' * (srv.MAX_BODY + 1))
    assert code == 413 and 'larger' in reply['error']


# -- the docs tell the truth -------------------------------------------------------------------

def test_readme_documents_make_commands_and_every_api_route():
    """Every API route is documented in README.md or docs/*.md (path parameters by any name)."""
    import glob
    import re
    readme = open(os.path.join(ROOT, 'README.md')).read()
    assert readme.lstrip().startswith('# p3s') and 'make run' in readme and 'make test' in readme
    docs = readme + ''.join(open(f).read() for f in glob.glob(os.path.join(ROOT, 'docs', '*.md')))
    docs = re.sub(r'<[^<>\n]*>', '<>', docs)       # path parameters, within a line
    for route in srv.app.routes:
        if route.rule.startswith('/api/') and route.rule != '/api/ping':
            rule = re.sub(r'<[^>]*>', '<>', route.rule)
            assert '%s %s' % (route.method, rule) in docs, (route.method, route.rule)


@sqlite_only
def test_idle_polls_write_only_now_and_then(store):
    me = pilot(store)
    now = srv.utcnow()
    assert srv.request_work(store, me, now)[0] == {'status': 'OK', 'state': 'idle'}
    seen = srv.get_pilot(store, me)['last_seen']
    db = sql_db(store)
    version = db.execute('PRAGMA data_version').fetchone()[0]
    srv.request_work(store, me, later(now, store.idle_touch / 2))
    # data_version moves when another connection commits: nothing written, nothing synced
    assert db.execute('PRAGMA data_version').fetchone()[0] == version
    assert srv.get_pilot(store, me)['last_seen'] == seen
    srv.request_work(store, me, later(now, store.idle_touch + 1))
    assert srv.get_pilot(store, me)['last_seen'] == later(now, store.idle_touch + 1)
    assert srv.wait_for_work(store, me, 5) == {'status': 'OK', 'state': 'idle', 'waited': False}


# -- stepped by an injected clock ----------------------------------------------------------------


class Clock:
    """A monotonic clock the test moves by hand."""

    def __init__(self, start=0.0):
        self.t = start

    def __call__(self):
        return self.t


def test_housekeeper_loses_no_pilot_within_the_grace_after_its_start(store):
    """While the server was down its pilots could not reach it: during the first pilot timeout
    after a start, silence does not make a pilot lost; afterwards it does."""
    t0 = '2026-01-01T00:00:00.000000+00:00'
    me = srv.register_pilot(store, {'host': 'h'}, t0)['uuid']
    clock, wall = Clock(1000.0), ['2026-01-01T00:05:00.000000+00:00']   # silent for 300 s
    keeper = srv.Housekeeper(store, pilot_timeout=60, clock=clock, now=lambda: wall[0])
    clock.t += 59
    assert keeper.step()['lost_pilots'] == []
    assert srv.get_pilot(store, me)['state'] == 'active'
    clock.t += 1
    assert keeper.step()['lost_pilots'] == [me]
    assert srv.get_pilot(store, me)['state'] == 'lost'


def test_housekeeper_purges_when_due_by_its_clock(store):
    t0 = '2026-01-01T00:00:00.000000+00:00'
    [job] = srv.submit_jobs(store, [{'payload': '/bin/true'}], t0)
    srv.kill_job(store, job, t0)
    clock, wall = Clock(), ['2026-01-03T00:00:00.000000+00:00']
    keeper = srv.Housekeeper(store, pilot_timeout=60, keep_days=1, clock=clock,
                             now=lambda: wall[0])
    assert keeper.step()['purged']['jobs'] == 1
    [job] = srv.submit_jobs(store, [{'payload': '/bin/true'}], t0)
    srv.kill_job(store, job, t0)
    clock.t += srv.PURGE_PERIOD - 1
    assert 'purged' not in keeper.step()                    # not due yet
    clock.t += 1
    assert keeper.step()['purged']['jobs'] == 1


def test_a_held_poll_ends_when_its_clock_says_so(store):
    """The long poll's deadline is kept by the front's clock: once it says the wait is over,
    the held poll answers idle at once, without waiting in real time."""
    me = pilot(store)
    clock = Clock()
    door = InProcessFront(store, clock=clock)
    try:
        held = door.spawn_work(me, 30)
        door.wait_until(lambda: len(door.front.waiters) == 1, what='the pilot to be held')
        clock.t += 30
        door.front.waiters.wake([(None, None, 1)])       # a wake-up finds nothing to claim
        held.join(5)
        assert held.value == {'status': 'OK', 'state': 'idle', 'waited': True}
        assert len(door.front.waiters) == 0                # the waiter left
    finally:
        door.close()


@pytest.mark.skipif(not ON_POSTGRES, reason='PostgreSQL\'s table settings (P3S_TEST_DB=postgresql)')
def test_the_jobs_table_is_vacuumed_often_unless_told_otherwise(tmp_path):
    db = fresh_database(tmp_path)
    srv.configure(db).close()
    conn = database_connection(db)
    try:
        def options():
            return conn.execute("SELECT reloptions FROM pg_class "
                                "WHERE oid = 'jobs'::regclass").fetchone()[0]
        assert 'autovacuum_vacuum_scale_factor=0.01' in options()
        conn.execute('ALTER TABLE jobs SET (autovacuum_vacuum_scale_factor = 0.05)')
        srv.configure(db).close()                  # the schema applied again, at a start
        assert 'autovacuum_vacuum_scale_factor=0.05' in options()
    finally:
        conn.close()


@sqlite_only
def test_a_durable_commit_syncs_the_log_that_holds_it(tmp_path):
    """Group commit: one sync of SQLite's write-ahead log covers every commit counted before it
    began, in any process (the counts are shared through the run directory), and it syncs the
    file at the log's path, opened anew when SQLite removed the log (its last connection
    closed) and made another."""
    path = str(tmp_path / 'wal.db')
    wal = srv.WalSync(path + '-wal', str(tmp_path))
    other = srv.WalSync(path + '-wal', str(tmp_path))      # as another server process has it

    def commit():
        db = srv.connect(path)
        db.execute('CREATE TABLE IF NOT EXISTS t (x)')
        db.execute('INSERT INTO t VALUES (1)')
        return db, wal.committed()

    def synced_file_is_the_log(syncer):
        return os.path.samestat(os.fstat(syncer.fd), os.stat(path + '-wal'))
    db, first = commit()
    second = other.committed()
    assert other.last_commit() == wal.last_commit() == second == first + 1
    wal.sync(first)
    assert other.counts.synced == second and synced_file_is_the_log(wal)
    other.sync(second)
    assert other.fd < 0                   # covered by the first process's sync: none of its own
    db.close()                            # the last connection: the log is checkpointed, removed
    assert not os.path.exists(path + '-wal')
    wal.sync(wal.committed())             # nothing left to sync: no error
    db, third = commit()
    other.sync(third)
    assert wal.counts.synced == third and synced_file_is_the_log(other)
    db.close()
    wal.close()
    other.close()


def test_a_run_directory_goes_where_tmpdir_names_now(tmp_path, monkeypatch):
    """tempfile keeps the temporary directory it found first; a store's run directory follows
    TMPDIR as it is when the store is made (so a test session's go with its other files)."""
    monkeypatch.setenv('TMPDIR', str(tmp_path))
    path = srv.run_directory(str(tmp_path / 'p3s.db'))
    assert os.path.dirname(path) == str(tmp_path) and os.path.isdir(path)
