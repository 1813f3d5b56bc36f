"""The workflow engine in process: domain functions on a temporary database, time passed in."""
import json

import pytest

import p3s_server as S
from conftest import fresh_database, sql_db
from test_workflows import NOOP, graphml, shell_job, txt

T0 = '2026-01-01T00:00:00.000000+00:00'
LATER = '2026-01-01T01:00:00.000000+00:00'


@pytest.fixture
def store(tmp_path):
    st = S.configure(fresh_database(tmp_path, 'engine.db'))
    S.add_datatype(st, {'name': 'TXT', 'ext': '.txt'}, T0)
    yield st
    st.close()


def make(store, nodes, edges, state='defined', **extra):
    S.add_dag(store, {'name': 'g', 'graphml': graphml(nodes, edges), 'replace': True}, T0)
    return S.add_workflow(store, dict({'dag': 'g', 'state': state}, **extra), T0)


def states(store, wf):
    return {j['name']: j['state'] for j in S.get_workflow(store, wf['uuid'])['jobs']}


def uuid_of(wf, name):
    return next(j['uuid'] for j in wf['jobs'] if j['name'] == name)


CHAIN = ({'a': shell_job('x'), 'b': shell_job('y'), 'c': NOOP},
         [('a', 'b', txt('f', 'F')), ('b', 'c', txt('g', 'G'))])


def run_job(store, pilot, state='finished', errcode=0):
    """One pilot cycle through the domain functions: claim, start, end."""
    reply, _ = S.request_work(store, pilot, T0)
    job = reply['job']['uuid']
    S.report_job(store, pilot, S.check_report({'job': job, 'state': 'running', 'pid': 1}), T0)
    S.report_job(store, pilot, S.check_report({'job': job, 'state': state, 'errcode': errcode}),
                 LATER)
    return job


def test_reports_drive_the_workflow(store):
    wf = make(store, *CHAIN)
    pilot = S.register_pilot(store, {'host': 'h'}, T0)['uuid']
    reply, _ = S.request_work(store, pilot, T0)
    S.report_job(store, pilot, S.check_report({'job': reply['job']['uuid'], 'state': 'running'}),
                 T0)
    assert S.get_workflow(store, wf['uuid'])['state'] == 'running'
    S.report_job(store, pilot, S.check_report({'job': reply['job']['uuid'], 'state': 'finished'}),
                 T0)
    assert states(store, wf) == {'a': 'finished', 'b': 'defined', 'c': 'template'}
    run_job(store, pilot)
    done = S.get_workflow(store, wf['uuid'])
    assert (done['state'], done['ndone'], done['stopped_at']) == ('finished', 3, LATER)
    assert states(store, wf) == {'a': 'finished', 'b': 'finished', 'c': 'finished'}


@pytest.mark.parametrize('end', ['kill', 'drop', 'lost', 'timelimit'])
def test_every_other_terminal_state_cancels_downstream(store, end):
    wf = make(store, *CHAIN)
    a = uuid_of(wf, 'a')
    if end == 'kill':
        S.kill_job(store, a, T0)
    elif end == 'drop':
        S.adjust_job(store, a, {'state': 'dropped'}, T0)
    elif end == 'lost':
        pilot = S.register_pilot(store, {'host': 'h'}, T0)['uuid']
        S.request_work(store, pilot, T0)
        S.sweep(store, LATER, pilot_timeout=60)
    else:
        pilot = S.register_pilot(store, {'host': 'h'}, T0)['uuid']
        run_job(store, pilot, 'timelimit', -15)
    expected = {'kill': 'killed', 'drop': 'dropped', 'lost': 'lost', 'timelimit': 'timelimit'}
    assert states(store, wf) == {'a': expected[end], 'b': 'cancelled', 'c': 'cancelled'}
    failed = S.get_workflow(store, wf['uuid'])
    assert failed['state'] == 'failed' and expected[end] in failed['comment']


def test_a_noop_sibling_is_waited_for(store):
    """j -> n (noop) -> c and j -> c: when j finishes, n finishes and c is released once."""
    nodes = {'j': shell_job('x'), 'n': NOOP, 'c': shell_job('y')}
    wf = make(store, nodes, [('j', 'n', txt('1', 'A')), ('j', 'c', txt('2', 'B')),
                             ('n', 'c', txt('3', 'C'))])
    pilot = S.register_pilot(store, {'host': 'h'}, T0)['uuid']
    run_job(store, pilot)
    assert states(store, wf) == {'j': 'finished', 'n': 'finished', 'c': 'defined'}


def test_a_template_workflow_does_not_move(store):
    wf = make(store, *CHAIN, state='template')
    pilot = S.register_pilot(store, {'host': 'h'}, T0)['uuid']
    assert S.request_work(store, pilot, T0)[0]['state'] == 'idle'
    woken = []
    store.wake = woken.extend
    S.set_workflow_state(store, wf['uuid'], {'state': 'defined'}, T0)
    assert woken == [('test', '')]                   # the released source wakes a pilot
    with pytest.raises(S.Refused) as e:
        S.set_workflow_state(store, wf['uuid'], {'state': 'running'}, T0)
    assert e.value.status == 400


def test_jobinfo_merges_env_and_overrides(store):
    nodes = {'a': shell_job('x', env='{"KEEP":"1","OVER":"old"}', priority=3)}
    wf = make(store, nodes, [], jobinfo={'a': {'payload': 'y', 'env': {'OVER': 'new'},
                                               'priority': 7, 'timelimit': 9}})
    job = S.get_job(store, uuid_of(wf, 'a'))
    assert job['env'] == {'KEEP': '1', 'OVER': 'new'}
    assert (job['payload'], job['priority'], job['timelimit']) == ('y', 7, 9)


def test_path_join_and_fileinfo_overrides(store):
    nodes = {'a': shell_job('x'), 'b': shell_job('y')}
    wf = make(store, nodes, [('a', 'b', txt('orig.txt', 'F', '/data/in'))], fileinfo='sticky')
    assert S.get_job(store, uuid_of(wf, 'b'))['env']['F'] == '/data/in/orig.txt'
    wf = make(store, nodes, [('a', 'b', txt('orig.txt', 'F', '/data/in/'))],
              fileinfo={'a:b': {'name': 'new.txt', 'comment': 'c'}})
    assert S.get_job(store, uuid_of(wf, 'a'))['env']['F'] == '/data/in/new.txt'
    assert wf['data'][0]['comment'] == 'c'


def test_unknown_datatype_creates_nothing(store):
    before = len(S.list_jobs(store, {})), len(S.list_workflows(store, {}))
    with pytest.raises(S.Refused) as e:
        make(store, {'a': shell_job('x'), 'b': shell_job('y')},
             [('a', 'b', txt('f', 'F')), ('a', 'b', dict(txt('g', 'G'), datatype='NOPE'))])
    assert e.value.status == 400 and "'NOPE'" in e.value.message
    assert (len(S.list_jobs(store, {})), len(S.list_workflows(store, {}))) == before


def test_graphml_is_parsed_safely(store):
    bomb = ('<?xml version="1.0"?><!DOCTYPE g [<!ENTITY a "aaaa"><!ENTITY b "&a;&a;&a;">]>'
            '<graphml><graph edgedefault="directed"><node id="&b;"/></graph></graphml>')
    for text, status in [(bomb, 400), ('<graphml/>' + ' ' * S.MAX_GRAPHML, 413),
                         ('<graphml><graph edgedefault="directed"/></graphml>', 400)]:
        with pytest.raises(S.Refused) as e:
            S.parse_graphml(text)
        assert e.value.status == status
    assert json.loads(json.dumps(S.list_dags(store, {}))) == []


def test_workflow_jobs_are_managed_by_their_workflow_and_purged_with_it(store):
    wf = make(store, *CHAIN)
    pilot = S.register_pilot(store, {'host': 'h'}, T0)['uuid']
    waiting = uuid_of(wf, 'b')
    for action in (lambda: S.delete_job(store, waiting),
                   lambda: S.adjust_job(store, waiting, {'state': 'defined'}, T0)):
        with pytest.raises(S.Refused) as refused:
            action()
        assert refused.value.status == 409 and 'belongs to workflow' in refused.value.message
    run_job(store, pilot)
    run_job(store, pilot)
    assert S.get_workflow(store, wf['uuid'])['state'] == 'finished'
    [standalone] = S.submit_jobs(store, [{'payload': '/bin/true', 'state': 'template'}], T0)
    S.adjust_job(store, standalone, {'state': 'dropped'}, T0)
    removed = S.purge(store, '2026-01-03T00:00:00.000000+00:00', 86400)
    assert removed == {'workflows': 1, 'jobs': 1, 'pilots': 0, 'services': 0, 'batchjobs': 0}
    db = sql_db(store)
    assert [db.execute('SELECT count(*) FROM %s' % t).fetchone()[0]
            for t in ('jobs', 'data', 'workflows')] == [0, 0, 0]


def test_a_workflow_failed_by_its_first_job_still_started(store):
    """A short job is reported once, at its end: when it fails, the workflow fails in the same
    report, and it still records when that job started, so how long it ran is known."""
    wf = make(store, *CHAIN)
    pilot = S.register_pilot(store, {'host': 'h'}, T0)['uuid']
    reply, _ = S.request_work(store, pilot, T0)
    S.report_job(store, pilot, S.check_report({'job': reply['job']['uuid'], 'state': 'failed',
                                               'errcode': 2, 'elapsed': 3600}), LATER)
    done = S.get_workflow(store, wf['uuid'])
    assert done['state'] == 'failed'
    assert done['started_at'] == T0 and done['stopped_at'] == LATER
    assert S.seconds_between(done['started_at'], done['stopped_at']) == 3600
