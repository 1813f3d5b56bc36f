"""GET /metrics: parsed with prometheus_client's own parser and checked against the database,
end to end with real pilots, in process for every path that ends a job, across two server
processes that share their counts, and its queries read indexes only."""
from collections import defaultdict
from datetime import datetime

import pytest
from prometheus_client.parser import text_string_to_metric_families

import p3s_server as S
from conftest import (InProcessFront, Server, database_connection, full_scans, make_job,
                      monitor_get, query_plan, sql_db)
from test_workflow_engine import CHAIN, LATER, T0, make, run_job, shell_job, txt
from test_workflow_engine import store  # noqa: F401 (the fixture: with a datatype TXT)

TERMINAL = "('finished', 'failed', 'timelimit', 'nonstarter', 'lost', 'killed', 'stale', " \
           "'dropped', 'cancelled')"


def parse(text):
    """{(sample name, ((label, value), ...)): value}, and every family's type by name."""
    samples, types = {}, {}
    for family in text_string_to_metric_families(text):
        types[family.name] = family.type
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples, types


def by_labels(samples, name):
    """The samples of one name as {(label values in label-name order): value}."""
    return {tuple(v for _, v in labels): value for (n, labels), value in samples.items()
            if n == name}


def seconds(earlier, later):
    return (datetime.fromisoformat(later) - datetime.fromisoformat(earlier)).total_seconds()


def scrape(server):
    import urllib.request
    with urllib.request.urlopen(server.url + 'metrics', timeout=30) as reply:
        assert reply.headers['Content-Type'] == 'text/plain; version=0.0.4; charset=utf-8'
        return parse(reply.read().decode())


def ended_in_db(db):
    return {(state, jobtype): n for state, jobtype, n in db.execute(
        'SELECT state, jobtype, count(*) FROM jobs WHERE state IN %s GROUP BY 1, 2' % TERMINAL)}


def test_metrics_agree_with_the_database(clients, server, tmp_path):
    """Jobs of two types end every way a pilot or a user ends them; a template, a job no
    pilot takes and a registered pilot stay live; every number /metrics gives is the
    database's (the histograms' sums to a few milliseconds, the pilot measuring run times)."""
    reco, calib = dict(jobtype='reco'), dict(jobtype='calib')
    uuids = clients.submit([make_job('echo ok', **reco), make_job('/bin/false', **reco),
                            make_job('/no/such/program', **calib),
                            make_job('sleep 30', timeout='1', **calib),
                            make_job('/bin/true', **reco), make_job('/bin/true', **reco),
                            make_job('/bin/true', state='template', **calib),
                            make_job('/bin/true', jobtype='other')])
    assert server.api('POST', '/api/jobs/%s/kill' % uuids[4])[0] == 200
    assert server.api('POST', '/api/jobs/%s/adjust' % uuids[5], {'state': 'dropped'})[0] == 200
    clients.run_pilot('--jobtypes', 'reco,calib', '--cycles', '4', '--wait', '0')
    assert server.api('POST', '/api/pilots', {'site': 'np04', 'host': 'n1'})[0] == 200
    samples, types = scrape(server)
    db = database_connection(server.db)

    live = {(state, jobtype): n for state, jobtype, n in db.execute(
        "SELECT state, jobtype, count(*) FROM jobs WHERE state IN ('template', 'defined', "
        "'dispatched', 'running') GROUP BY 1, 2")}
    gauge = by_labels(samples, 'p3s_jobs')
    assert {k[::-1]: v for k, v in gauge.items() if v} == live        # labels: jobtype, state
    assert set(gauge) == {(t, s) for t in ('calib', 'other', 'reco')
                          for s in ('template', 'defined', 'dispatched', 'running')}
    ended = ended_counts(samples)
    assert ended == ended_in_db(db)
    assert set(ended) == {('finished', 'reco'), ('failed', 'reco'), ('killed', 'reco'),
                          ('dropped', 'reco'), ('nonstarter', 'calib'), ('timelimit', 'calib')}

    claimed = db.execute('SELECT jobtype, defined_at, dispatched_at FROM jobs'
                         ' WHERE dispatched_at IS NOT NULL').fetchall()
    assert samples[('p3s_claims_total', ())] == len(claimed) == 4
    waits = defaultdict(list)
    for jobtype, defined, dispatched in claimed:
        waits[jobtype].append(seconds(defined, dispatched))
    for jobtype, values in waits.items():
        key = (('jobtype', jobtype),)
        assert samples[('p3s_job_queue_wait_seconds_count', key)] == len(values)
        assert samples[('p3s_job_queue_wait_seconds_sum', key)] == pytest.approx(sum(values),
                                                                               abs=1e-5)
        assert samples[('p3s_job_queue_wait_seconds_bucket', key + (('le', '+Inf'),))] == len(
            values)
    ran = db.execute("SELECT jobtype, started_at, stopped_at FROM jobs WHERE state IN "
                     "('finished', 'failed', 'timelimit')").fetchall()
    runs = defaultdict(list)
    for jobtype, started, stopped in ran:
        runs[jobtype].append(seconds(started, stopped))
    assert {k: len(v) for k, v in runs.items()} == {'reco': 2, 'calib': 1}
    for jobtype, values in runs.items():
        key = (('jobtype', jobtype),)
        assert samples[('p3s_job_run_seconds_count', key)] == len(values)
        assert samples[('p3s_job_run_seconds_sum', key)] == pytest.approx(sum(values), abs=0.05)

    pilots = by_labels(samples, 'p3s_pilots')
    assert {k: v for k, v in pilots.items() if v} == {('np04', 'active'): 1}
    assert pilots[('np04', 'idle')] == 0
    dialect = S.database(server.db)
    db.close()
    db = database_connection(server.db)
    assert by_labels(samples, 'p3s_server_info') == {(
        dialect.name, str(db.raw.info.server_version if dialect.name == 'postgresql'
                          else dialect.version), S.sys.version.split()[0], S.VERSION): 1}
    assert types['p3s_jobs'] == 'gauge' and types['p3s_jobs_ended'] == 'counter'
    assert types['p3s_job_queue_wait_seconds'] == 'histogram'
    db.close()


def test_metrics_need_no_token_unless_private(tmp_path):
    srv = Server(tmp_path, extra_args=['--token', 'secret']).start()
    try:
        assert ('p3s_claims_total', ()) in scrape(srv)[0]
    finally:
        srv.stop()
    srv = Server(tmp_path, extra_args=['--token', 'secret', '--private']).start()
    try:
        assert srv.api('GET', '/metrics')[0] == 401
    finally:
        srv.stop()


def test_two_server_processes_add_up_their_counts(tmp_path, monkeypatch, clients, server):
    """Two servers on one database with one PROMETHEUS_MULTIPROC_DIR, as worker processes of
    one server run: each /metrics shows the claims and long polls of both."""
    shared = tmp_path / 'metrics'
    shared.mkdir()
    monkeypatch.setenv('PROMETHEUS_MULTIPROC_DIR', str(shared))
    (tmp_path / 'a').mkdir()
    (tmp_path / 'b').mkdir()
    first = Server(tmp_path / 'a', db=server.db).start()
    second = Server(tmp_path / 'b', db=server.db).start()
    try:
        clients.submit([make_job('/bin/true'), make_job('/bin/true'), make_job('/bin/true')])
        clients.run_pilot('--cycles', '1', '-S', first.url)
        clients.run_pilot('--cycles', '3', '--wait', '0.5', '-S', second.url)   # 2 jobs, 1 poll
        for srv in (first, second):
            samples, _ = scrape(srv)
            assert samples[('p3s_claims_total', ())] == 3
            assert samples[('p3s_job_queue_wait_seconds_count', (('jobtype', 'test'),))] == 3
            assert samples[('p3s_long_polls_total', ())] == 1
            assert ended_counts(samples) == {('finished', 'test'): 3}
        assert len(list(shared.iterdir())) >= 2            # a file of counts per process
    finally:
        first.stop()
        second.stop()


# -- in process -----------------------------------------------------------------------------


def own_counts():
    return parse(monitor_get('/metrics'))[0]


def test_long_polls_held_and_refused_are_counted(store):
    pilot = S.register_pilot(store, {'host': 'h'}, S.utcnow())['uuid']
    before = own_counts()
    clock = [0.0]
    door = InProcessFront(store, clock=lambda: clock[0])
    try:
        held = door.spawn_work(pilot, 30)
        door.wait_until(lambda: len(door.front.waiters) == 1, what='the pilot to be held')
        clock[0] = 30.0                                     # held once, then its time is up
        door.front.waiters.wake([(None, None, 1)])
        held.join(5)
        assert held.value['waited'] is True
        door.front.waiters.limit = 0
        assert door.work(pilot, 5)['waited'] is False
    finally:
        door.close()
    after = own_counts()
    for name, more in (('p3s_long_polls_total', 1), ('p3s_long_polls_refused_total', 1),
                       ('p3s_long_polls_waiting', 0)):
        assert after[(name, ())] - before[(name, ())] == more, name


def test_every_way_a_job_ends_is_counted_once(store):
    """The database counts the ends itself, also those no pilot reports: the sweep's (lost,
    stale), the workflow engine's (noops finish, a failure cancels what follows) and drops;
    purging the jobs afterwards lowers no count."""
    make(store, *CHAIN)                                     # a -> b -> c (a noop)
    pilot = S.register_pilot(store, {'host': 'h'}, T0)['uuid']
    run_job(store, pilot)
    run_job(store, pilot)                                   # b finished: c, the noop, too
    make(store, {'a': shell_job('x'), 'b': shell_job('y')}, [('a', 'b', txt('f', 'F'))])
    run_job(store, pilot, 'failed', 3)                      # b is cancelled, the workflow failed
    S.submit_jobs(store, [{'payload': 'p', 'jobtype': 'late', 'deadline': 1}], T0)
    S.submit_jobs(store, [{'payload': 'p', 'jobtype': 'drop'}] * 2, T0)
    assert S.drop_jobs(store, {'jobtype': 'drop'}, LATER)['dropped'] == 2
    lost = S.register_pilot(store, {'host': 'gone', 'jobtypes': ['held']}, T0)['uuid']
    [held] = S.submit_jobs(store, [{'payload': 'p', 'jobtype': 'held'}], T0)
    assert S.request_work(store, lost, T0)[0]['job']['uuid'] == held
    S.sweep(store, LATER, pilot_timeout=60)                 # lost pilot and job; the late is stale
    db = sql_db(store)
    expected = ended_in_db(db)
    assert expected == {('finished', 'test'): 2, ('finished', 'noop'): 1, ('failed', 'test'): 1,
                        ('cancelled', 'test'): 1, ('stale', 'late'): 1, ('dropped', 'drop'): 2,
                        ('lost', 'held'): 1}
    assert ended_counts(own_counts()) == expected
    workflows = {k[0]: v for k, v in by_labels(own_counts(), 'p3s_workflows_ended_total').items()}
    assert workflows == {'finished': 1, 'failed': 1}
    assert S.purge(store, '2027-01-01T00:00:00.000000+00:00', 0)['workflows'] == 2
    assert db.execute('SELECT count(*) FROM jobs').fetchone()[0] == 0
    assert ended_counts(own_counts()) == expected


def ended_counts(samples):
    """p3s_jobs_ended_total as {(state, jobtype): n}."""
    return {(state, jobtype): n for (jobtype, state), n
            in by_labels(samples, 'p3s_jobs_ended_total').items()}


def test_metrics_queries_read_indexes_only(store):
    """No statement /metrics runs scans a whole table of jobs, pilots or workflows: each reads
    an index that holds the live ones only, or a table of counts."""
    from synthetic import fill
    fill(store.path, 500, pilots=10)
    db = sql_db(store)
    names = [n for n in dir(S) if n.startswith('METRICS_') and 'SELECT' in str(getattr(S, n))]
    assert len(names) >= 6
    for name in names + ['MON_TYPES_LIVE']:
        plan = query_plan(db, getattr(S, name))
        assert not full_scans(plan), (name, plan)
        big = [step for step in plan if step.table in ('jobs', 'pilots', 'workflows')]
        assert all(step.index for step in big), (name, plan)


def test_docs_name_every_metric(store):
    """docs/operations.md has a row for every metric /metrics gives, and none it does not."""
    import os
    import re
    from conftest import ROOT
    doc = open(os.path.join(ROOT, 'docs', 'operations.md')).read()
    given = {f.name for f in text_string_to_metric_families(monitor_get('/metrics'))}
    named = {re.sub(r'_total$', '', n) for n in re.findall(r'^\| `(p3s_\w+)', doc, re.M)}
    assert named == given
