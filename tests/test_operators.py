"""What a shift asks: why a job is not running, retrying jobs and workflows, cancelling a
workflow, logs and waiting from the command line. In-process for the rules, end to end for the
commands."""
import json
import re
import signal
import threading

import pytest

import p3s_server as S
from conftest import fresh_database, make_job, wait_for
from test_workflows import NOOP, graphml, shell_job, txt

T0 = '2026-01-01T00:00:00.000000+00:00'
T1 = '2026-01-01T00:01:00.000000+00:00'
CHAIN = ({'a': shell_job('x'), 'b': shell_job('y'), 'c': NOOP},
         [('a', 'b', txt('f', 'F')), ('b', 'c', txt('g', 'G'))])


@pytest.fixture
def store(tmp_path):
    st = S.configure(fresh_database(tmp_path, 'ops.db'))
    yield st
    st.close()


def submit(store, now=T0, **job):
    return S.submit_jobs(store, [dict({'payload': '/bin/true'}, **job)], now)[0]


def pilot(store, now=T0, **fields):
    return S.register_pilot(store, dict({'host': 'node1'}, **fields), now)['uuid']


def reasons(store, job_uuid, now=T1):
    waiting = S.get_job(store, job_uuid, now=now)['waiting']
    return [(r['code'], r['text']) for r in waiting['reasons']] if waiting else None


def codes(store, job_uuid, now=T1):
    return [code for code, _ in reasons(store, job_uuid, now)]


class Rollback(Exception):
    pass


def would_claim(store, pilot_uuid, now=T1):
    """The job the claim would give this pilot now, without giving it (rolled back)."""
    row = S.get_pilot(store, pilot_uuid)
    params = {'pilot': pilot_uuid, 'host': row['host'], 'site': row['site'],
              'jobtypes': json.dumps(row['jobtypes']), 'now': now, 'left': S.MAX_TIMELIMIT, 'last_queued': 0}
    try:
        with store.write() as db:
            job = S.claim(db, params)
            raise Rollback(job['uuid'] if job else None)
    except Rollback as e:
        return e.args[0]


def end(store, pilot_uuid, state='finished', errcode=0, now=T1):
    """The pilot takes its next job and ends it; returns the job's uuid."""
    reply, _ = S.request_work(store, pilot_uuid, now)
    job = reply['job']['uuid']
    S.report_job(store, pilot_uuid, S.check_report(
        {'job': job, 'state': state, 'errcode': errcode, 'elapsed': 1}), now)
    return job


# -- why a job is not running ------------------------------------------------------------------


def test_a_queued_job_says_what_holds_it(store):
    template = submit(store, state='template')
    assert codes(store, template) == ['template']
    job = submit(store, jobtype='reco', site='np04', priority=5)
    [(code, text)] = reasons(store, job)
    assert code == 'no_pilot' and 'no pilot is live' in text and 'site np04' in text
    other = pilot(store, site='lxvm', jobtypes=['reco'])
    [(code, text)] = reasons(store, job)
    assert code == 'no_pilot' and '1 of site lxvm taking reco' in text
    mine = pilot(store, site='np04', jobtypes=['purity'])
    assert codes(store, job) == ['no_pilot']
    taker = pilot(store, site='np04')
    assert codes(store, job) == ['next']
    assert would_claim(store, taker) == job and would_claim(store, other) is None
    first = submit(store, jobtype='reco', priority=9)
    assert codes(store, job) == ['behind']
    assert '1 queued job comes first' in reasons(store, job)[0][1]
    assert would_claim(store, taker) == first
    S.set_cap(store, {'name': 'reco', 'cap': 0}, T0)
    assert 'paused' in dict(reasons(store, job))['cap']
    assert would_claim(store, taker) is None
    S.set_cap(store, {'name': 'reco', 'cap': None}, T0)
    S.request_work(store, taker, T1)                       # takes `first`: now busy
    assert codes(store, job) == ['busy']
    assert would_claim(store, mine) is None
    assert S.get_job(store, first)['waiting'] is None


def test_a_deadline_and_a_cap_are_named(store):
    job = submit(store, jobtype='evd', deadline=30)
    taker = pilot(store)
    assert codes(store, job, now=T0) == ['next']
    [(code, text)] = reasons(store, job, now=T1)            # 60 s later
    assert code == 'deadline' and 'stale' in text
    assert would_claim(store, taker, now=T1) is None
    S.set_cap(store, {'name': 'reco', 'cap': 1}, T0)
    running = submit(store, jobtype='reco')
    held = submit(store, jobtype='reco')
    assert S.request_work(store, taker, T1)[0]['job']['uuid'] == running   # evd is too late
    assert dict(reasons(store, held))['cap'].startswith(
        'its type reco is at its cap: 1 of 1 dispatched or running')
    assert S.get_job(store, held, now=T1)['waiting']['since'] == T0
    assert S.get_job(store, held, now=T1)['waiting']['seconds'] == 60


def test_the_account_agrees_with_the_claim(store):
    """For every queued job and every live pilot: a job said to be next is the one some free
    pilot that may run it would take; a job no live pilot may run is taken by none."""
    pilots = [pilot(store, site=site, jobtypes=types)
              for site, types in (('', []), ('np04', ['reco']), ('np04', []), ('lxvm', ['evd']))]
    S.set_cap(store, {'name': 'capped', 'cap': 0}, T0)
    jobs = [submit(store, jobtype=t, site=s, priority=p)
            for t, s, p in (('reco', 'np04', 1), ('reco', '', 3), ('evd', 'lxvm', 2),
                            ('evd', 'np04', 0), ('purity', 'cern', 5), ('capped', '', 9),
                            ('reco', 'np04', 7))]
    claimed = {would_claim(store, p) for p in pilots}
    for job in jobs:
        said = codes(store, job)
        if 'next' in said:
            assert job in claimed, (job, said)
        if 'no_pilot' in said or 'cap' in said:
            assert job not in claimed, (job, said)
    assert {c for job in jobs for c in codes(store, job)} >= {'next', 'no_pilot', 'cap', 'behind'}


def test_a_workflow_job_waits_for_its_parents_or_its_workflow(store):
    S.add_datatype(store, {'name': 'TXT', 'ext': '.txt'}, T0)
    S.add_dag(store, {'name': 'g', 'graphml': graphml(*CHAIN)}, T0)
    wf = S.add_workflow(store, {'dag': 'g'}, T0)
    jobs = {j['name']: j['uuid'] for j in wf['jobs']}
    assert codes(store, jobs['b']) == ['workflow']
    S.set_workflow_state(store, wf['uuid'], {'state': 'defined'}, T0)
    [(code, text)] = reasons(store, jobs['b'])
    assert code == 'parents' and text.endswith('a (defined)')


# -- retries -----------------------------------------------------------------------------------


def test_retry_makes_a_new_attempt_linked_to_the_old(store):
    job = submit(store, name='reco', deadline=600, env={'RUN': '5'})
    taker = pilot(store)
    assert end(store, taker, 'failed', 3) == job
    new = S.retry_job(store, job, T1)
    assert new['state'] == 'defined' and new['retry_of'] == job and new['attempt'] == 2
    assert (new['name'], new['env'], new['deadline']) == ('reco', {'RUN': '5'}, 600)
    assert new['deadline_at'] > new['defined_at']          # the deadline counts from the retry
    old = S.get_job(store, job)
    assert old['state'] == 'failed' and old['errcode'] == 3 and old['retried_by'] == new['uuid']
    with pytest.raises(S.Refused, match='retried already, as %s' % new['uuid']):
        S.retry_job(store, job, T1)
    with pytest.raises(S.Refused, match='it is defined'):
        S.retry_job(store, new['uuid'], T1)
    assert end(store, taker) == new['uuid']
    third = S.retry_job(store, new['uuid'], T1)               # resubmit a finished one
    assert third['attempt'] == 3 and third['retry_of'] == new['uuid']


def test_retry_a_selection_once(store):
    taker = pilot(store)
    failed = [submit(store, jobtype='reco', payload='/bin/false') for _ in range(3)]
    other = submit(store, jobtype='evd', payload='/bin/false')
    for _ in range(4):
        end(store, taker, 'failed', 1)
    with pytest.raises(S.Refused, match='or a state'):
        S.retry_selection(store, {'jobtype': 'reco'}, T1)
    with pytest.raises(S.Refused, match="unknown state 'running'"):
        S.retry_selection(store, {'state': 'running'}, T1)
    done = S.retry_selection(store, {'state': 'failed', 'jobtype': 'reco'}, T1)['retried']
    assert [r['uuid'] for r in done] == failed
    assert S.retry_selection(store, {'state': 'failed', 'jobtype': 'reco'}, T1)['retried'] == []
    late = '2026-01-01T02:00:00.000000+00:00'
    assert S.retry_selection(store, {'state': 'error', 'since': 60}, late)['retried'] == []
    [again] = S.retry_selection(store, {'state': 'error', 'since': 3 * 3600}, late)['retried']
    assert again['uuid'] == other


def test_a_workflow_job_is_retried_with_its_workflow(store):
    S.add_datatype(store, {'name': 'TXT', 'ext': '.txt'}, T0)
    S.add_dag(store, {'name': 'g', 'graphml': graphml(*CHAIN)}, T0)
    wf = S.add_workflow(store, {'dag': 'g', 'state': 'defined'}, T0)
    taker = pilot(store)
    a = end(store, taker, 'failed', 2)
    with pytest.raises(S.Refused, match='retry the workflow'):
        S.retry_job(store, a, T1)
    flow = S.retry_workflow(store, wf['uuid'], T1)
    assert flow['state'] == 'running' and flow['comment'] == ''
    attempts = {(j['name'], j['attempt']): j for j in flow['jobs']}
    assert attempts['a', 1]['state'] == 'failed' and attempts['a', 2]['state'] == 'defined'
    assert attempts['b', 1]['state'] == 'cancelled' and attempts['b', 2]['state'] == 'template'
    assert attempts['c', 2]['state'] == 'template'
    assert flow['rootuuid'] == attempts['a', 2]['uuid']
    assert end(store, taker) == attempts['a', 2]['uuid']
    assert end(store, taker) == attempts['b', 2]['uuid']
    flow = S.get_workflow(store, wf['uuid'])
    assert flow['state'] == 'finished' and flow['ndone'] == 3
    assert {d['state'] for d in flow['data']} == {'available'}
    with pytest.raises(S.Refused, match='it is finished'):
        S.retry_workflow(store, wf['uuid'], T1)


def test_two_operators_retrying_one_job_at_once_make_one_attempt(store):
    """Nothing runs twice: racing retries of one job leave exactly one new attempt, and the
    others are refused with a 409 (never a crash), however the race falls; ten rounds."""
    for _ in range(10):
        job = submit(store, payload='/bin/false')
        end(store, pilot(store), 'failed', 1)
        outcomes, start = [], threading.Barrier(8)

        def retry():
            start.wait()
            try:
                outcomes.append(S.retry_job(store, job, T1)['uuid'])
            except S.Refused as e:
                outcomes.append(e.status)

        threads = [threading.Thread(target=retry) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert outcomes.count(409) == 7 and len(outcomes) == 8, outcomes
        assert [j['retry_of'] for j in S.list_jobs(store, {})].count(job) == 1


# -- cancelling a workflow ---------------------------------------------------------------------


def test_cancel_stops_what_still_runs_of_a_failed_workflow(store):
    """A failed workflow's independent branch goes on; cancelling stops it, and the workflow
    stays failed (it did fail). Once nothing is left to stop, cancelling is refused."""
    S.add_datatype(store, {'name': 'TXT', 'ext': '.txt'}, T0)
    nodes = {'a': shell_job('x', priority=3), 'b': shell_job('y', priority=2),
             'c': shell_job('z', priority=1)}
    S.add_dag(store, {'name': 'fork', 'graphml': graphml(
        nodes, [('a', 'b', txt('f', 'F')), ('a', 'c', txt('g', 'G'))])}, T0)
    wf = S.add_workflow(store, {'dag': 'fork', 'state': 'defined'}, T0)
    first, second = pilot(store), pilot(store)
    end(store, first)                                          # a finishes: b and c queued
    S.request_work(store, second, T1)                          # b is dispatched ...
    c = end(store, first, 'failed', 1)                         # ... and c fails
    flow = S.get_workflow(store, wf['uuid'])
    assert flow['state'] == 'failed' and c in flow['comment']
    flow = S.cancel_workflow(store, wf['uuid'], T1)
    assert flow['state'] == 'failed' and {j['name']: j['state'] for j in flow['jobs']} == {
        'a': 'finished', 'b': 'killed', 'c': 'failed'}
    with pytest.raises(S.Refused, match='none of its jobs is left to stop'):
        S.cancel_workflow(store, wf['uuid'], T1)


def test_cancel_stops_a_workflow_and_keeps_its_history(store):
    S.add_datatype(store, {'name': 'TXT', 'ext': '.txt'}, T0)
    S.add_dag(store, {'name': 'g', 'graphml': graphml(*CHAIN)}, T0)
    wf = S.add_workflow(store, {'dag': 'g', 'state': 'defined'}, T0)
    taker = pilot(store)
    reply, _ = S.request_work(store, taker, T0)
    a = reply['job']['uuid']
    S.report_job(store, taker, S.check_report({'job': a, 'state': 'running', 'pid': 7}), T0)
    flow = S.cancel_workflow(store, wf['uuid'], T1)
    assert flow['state'] == 'cancelled' and flow['stopped_at'] == T1
    assert flow['comment'] == 'cancelled on request: 2 queued jobs cancelled, 1 running job killed'
    assert {j['name']: j['state'] for j in flow['jobs']} == {'a': 'killed', 'b': 'cancelled',
                                                             'c': 'cancelled'}
    assert S.heartbeat(store, taker, a, T1)['status'] == 'KILL'     # the pilot stops it
    late = S.report_job(store, taker, S.check_report({'job': a, 'state': 'finished'}), T1)
    assert late['changed'] is False and S.get_job(store, a)['state'] == 'killed'
    with pytest.raises(S.Refused, match='it is cancelled'):
        S.cancel_workflow(store, wf['uuid'], T1)
    flow = S.retry_workflow(store, wf['uuid'], T1)
    assert flow['state'] == 'running' and len(flow['jobs']) == 6
    assert S.list_workflows(store, {'state': 'cancelled'}) == []


# -- the commands ------------------------------------------------------------------------------


def one_line(proc, prog, code):
    assert proc.returncode == code, (proc.returncode, proc.stdout, proc.stderr)
    assert proc.stderr.startswith(prog + ': error: ') and proc.stderr.count('\n') == 1, \
        proc.stderr
    return proc.stderr


def test_a_typo_in_a_state_is_an_error(clients):
    stderr = one_line(clients.run('job', '--list', '-s', 'finshed'), 'p3s_job', 1)
    assert "unknown state 'finshed'" in stderr and 'HTTP 400' in stderr
    stderr = one_line(clients.run('workflow', '--list', '-s', 'done'), 'p3s_workflow', 1)
    assert "unknown state 'done'" in stderr


def test_show_logs_wait_and_retry_a_job(clients, server, tmp_path):
    [ok, bad] = clients.submit([make_job('/bin/echo hello'),
                                make_job('/bin/sh -c "echo oops >&2; exit 3"', site='np04')])
    shown = clients.run('job', '--show', bad, check=0).stdout
    assert 'None' not in shown and re.search(r'^pilot:\s*$', shown, re.M)
    assert '  - no pilot is live: it needs a pilot of site np04 that takes type test' in shown
    clients.run_pilot('--cycles', '1', '--wait', '0')
    out = clients.run('job', '--wait', ok, check=0).stdout
    assert re.fullmatch(r'\d\d:\d\d:\d\d %s finished \(exit 0, ran \d+\.\d s\)\n' % ok, out), out
    logs = clients.run('job', '--logs', ok, check=0).stdout
    assert logs.splitlines()[:2] == ['==> stdout of job %s (finished; its last 64 KiB) <==' % ok,
                                     'hello']
    clients.run_pilot('--cycles', '1', '--wait', '0', '--site', 'np04')
    stderr = one_line(clients.run('job', '--wait', '%s,%s' % (ok, bad)), 'p3s_job', 5)
    assert '1 of 2 jobs did not finish: %s failed' % bad in stderr
    assert 'oops' in clients.run('job', '--logs', bad, check=0).stdout
    listed = clients.run('job', '--list', check=0).stdout
    assert re.search(r'^%s\s+failed\s+test\s+0\s+test\s+\S+\s+3\s+\d' % bad, listed, re.M), listed
    retried = clients.run('job', '--retry', '-s', 'failed', check=0).stdout.split()
    assert retried[:3] == [bad, 'retried', 'as']
    stderr = one_line(clients.run('job', '--retry', '-u', bad), 'p3s_job', 1)
    assert 'retried already' in stderr
    assert server.job(retried[3])['retry_of'] == bad


def test_follow_cancel_and_retry_a_workflow(clients, server, tmp_path):
    gate, failed_once = tmp_path / 'gate', tmp_path / 'failed-once'
    nodes = {'first': shell_job('while [ ! -e %s ]; do sleep 0.1; done; [ -e %s ] && exit 0; '
                                'touch %s; exit 4' % (gate, failed_once, failed_once)),
             'second': shell_job('true'), 'end': NOOP}
    edges = [('first', 'second', txt('f', 'F')), ('second', 'end', txt('g', 'G'))]
    clients.run('data', '-R', '-j', '{"name": "TXT", "ext": ".txt"}', check=0)
    path = tmp_path / 'gated.graphml'
    path.write_text(graphml(nodes, edges))
    clients.run('workflow', '-g', str(path), check=0)
    wf = clients.run('workflow', '-a', 'gated', '-s', 'defined', check=0).stdout.strip()
    pilot = clients.pilot('--cycles', '0', '--wait', '1', '--beat', '0.5')
    wait_for(lambda: server.api('GET', '/api/workflows/' + wf)[1]['state'] == 'running',
             what='the workflow to run')
    gate.write_text('')
    stderr = one_line(clients.run('workflow', '--wait', wf), 'p3s_workflow', 5)
    assert 'did not finish: %s failed (job first' % wf in stderr
    out = clients.run('workflow', '--retry', '-u', wf, check=0).stdout
    assert out.strip() == '%s retried' % wf
    followed = clients.run('workflow', '--wait', wf, check=0).stdout
    assert re.search(r'workflow %s finished$' % wf, followed, re.M), followed
    assert re.search(r'^\S+\s+second finished \(job ', followed, re.M), followed
    shown = clients.run('workflow', '--show', wf, check=0).stdout
    assert re.search(r'^ran:\s+\d', shown, re.M)
    assert re.search(r'first\s+failed\s+test\s+4\s+1\s', shown)
    assert re.search(r'first\s+finished\s+test\s+0\s+2\s', shown)
    gate.unlink()
    again = clients.run('workflow', '-a', 'gated', '-s', 'defined', check=0).stdout.strip()
    wait_for(lambda: server.api('GET', '/api/workflows/' + again)[1]['state'] == 'running',
             what='the second workflow to run')
    out = clients.run('workflow', '--cancel', '-u', again, check=0).stdout
    assert out.strip() == '%s cancelled' % again
    wait_for(lambda: server.jobs(workflow=again, state='killed'), what='the job killed')
    stderr = one_line(clients.run('workflow', '--wait', again), 'p3s_workflow', 5)
    assert 'cancelled on request' in stderr
    pilot.send_signal(signal.SIGTERM)
    assert pilot.wait(30) == 0
