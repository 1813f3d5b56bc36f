"""Pilots and batch systems without a batch system: drain orders, a pilot's time left, batch
jobs and the pool's numbers on the server; draining and lifetimes of real pilot processes;
p3s_batch.py's commands and its parsing of Slurm's and HTCondor's output. The same against a
real Slurm is in test_slurm.py."""
import json
import os
import re
import signal
import sys
import time
from datetime import datetime, timedelta

import pytest

import p3s_server as srv
from conftest import ROOT, InProcessFront, make_job, monitor_get, query_plan, sql_db, wait_for

sys.path.insert(0, ROOT)
import p3s_batch  # noqa: E402

T0 = '2026-01-01T00:00:00.000000+00:00'


def at(seconds):
    return (datetime.fromisoformat(T0) + timedelta(seconds=seconds)).isoformat(
        timespec='microseconds')


def pilot(store, site='', extra='', host='node1', now=T0):
    return srv.register_pilot(store, {'site': site, 'extra': extra, 'host': host}, now)['uuid']


def submit(store, now=T0, **fields):
    return srv.submit_jobs(store, [dict({'payload': '/bin/true'}, **fields)], now)[0]


def finished(job_uuid):
    return srv.check_report({'job': job_uuid, 'state': 'finished', 'errcode': 0})


def site(store, name='np04', **fields):
    return srv.define_site(store, dict({'name': name}, **fields), T0)


def record(store, *batchids, site_name='np04', now=T0):
    return srv.record_batchjobs(store, {'site': site_name, 'system': 'slurm',
                                        'batchids': list(batchids)}, now)


def see(store, batchid, state, now=T0, site_name='np04', **more):
    return srv.update_batchjobs(store, {'site': site_name, 'system': 'slurm', 'jobs': [
        dict({'batchid': batchid, 'state': state}, **more)]}, now)


def batchjob(store, batchid):
    [job] = [j for j in srv.list_batchjobs(store, {}) if j['batchid'] == batchid]
    return job


def pool(store, keep=0, now=T0, name='np04'):
    return srv.pool_status(store, name, 'slurm', keep, now)


# -- drain orders, in process -------------------------------------------------------------------


def test_a_drained_pilot_finishes_its_job_and_gets_no_other(store):
    first, second = submit(store), submit(store)
    me = pilot(store)
    reply, _ = srv.request_work(store, me, T0)
    assert reply['job']['uuid'] == first
    assert srv.heartbeat(store, me, first, T0) == {'status': 'OK', 'state': 'dispatched'}
    drained = srv.drain_pilot(store, me, at(1))
    assert drained['drain'] == at(1) and drained['state'] == 'dispatched'
    assert srv.heartbeat(store, me, first, at(2)) == {'status': 'OK', 'state': 'dispatched',
                                                      'drain': True}
    reply, _ = srv.request_work(store, me, at(3), finished(first))
    assert reply == {'status': 'STOP', 'state': 'stopped', 'drain': at(1),
                     'report': {'status': 'OK', 'state': 'finished', 'changed': True}}
    assert srv.get_job(store, first)['state'] == 'finished'
    assert srv.get_job(store, second)['state'] == 'defined'
    assert srv.get_pilot(store, me)['state'] == 'stopped'
    assert srv.drain_pilot(store, pilot(store), at(4))['drain'] == at(4)


def test_a_drained_pilot_gives_back_the_job_whose_reply_it_never_got(store):
    job = submit(store)
    me = pilot(store)
    assert srv.request_work(store, me, T0)[0]['job']['uuid'] == job     # the reply is lost
    srv.drain_pilot(store, me, T0)
    assert srv.request_work(store, me, at(1))[0]['status'] == 'STOP'
    assert srv.get_job(store, job)['state'] == 'defined'
    assert srv.request_work(store, pilot(store), at(2))[0]['job']['uuid'] == job


def test_drain_orders_are_refused_for_unknown_and_departed_pilots(store):
    me = pilot(store)
    srv.stop_pilot(store, me, 'stopped', T0)
    for uuid, status in ((me, 409), ('0f0c2f2e-0000-4000-8000-000000000009', 404),
                         ('nonsense', 404)):
        with pytest.raises(srv.Refused) as e:
            srv.drain_pilot(store, uuid, T0)
        assert e.value.status == status


# -- a pilot's time left ------------------------------------------------------------------------


def test_a_job_that_would_outlast_the_pilot_is_left_for_another(store):
    long_job = submit(store, timelimit=100, priority=5)
    short_job = submit(store, timelimit=10)
    ending = pilot(store)
    assert srv.request_work(store, ending, T0, left=50)[0]['job']['uuid'] == short_job
    assert srv.request_work(store, pilot(store), T0, left=99)[0]['state'] == 'idle'
    assert srv.request_work(store, pilot(store), T0, left=100)[0]['job']['uuid'] == long_job


def test_the_walk_by_type_leaves_them_too(store):
    srv.set_cap(store, {'name': 'capped', 'cap': 0}, T0)         # forces CLAIM_JOB_BY_TYPE
    submit(store, timelimit=100, jobtype='a', priority=5)
    short_job = submit(store, timelimit=10, jobtype='b')
    assert srv.request_work(store, pilot(store), T0, left=50)[0]['job']['uuid'] == short_job


def test_waiting_pilots_with_more_time_are_woken_first():
    import gevent
    waiters = srv.Waiters(10)
    ends = {'soon': 100.0, 'forever': None, 'later': 500.0, 'also_forever': None}
    held = {name: gevent.spawn(waiters.wait, '', [], 10, waiters.seq, e)
            for name, e in ends.items()}
    gevent.sleep(0)
    assert [w.ends for w in waiters.waiting()] == [None, None, 500.0, 100.0]
    waiters.wake([('t', '', 1)])
    held['forever'].join(5)
    assert held['forever'].ready() and not held['soon'].ready()
    gevent.killall(list(held.values()))


def test_a_held_poll_counts_the_time_left_down(store):
    """A pilot that had 60 s left when it began to wait has 30 s left 30 s later: a job of 50 s
    that comes then is not for it."""
    import gevent
    me = pilot(store)
    clock = [0.0]
    door = InProcessFront(store, clock=lambda: clock[0])
    try:
        held = gevent.spawn(door.request, 'POST', '/api/pilots/%s/work' % me,
                            {'wait': 30, 'left': 60}, door.secret_of(me))
        door.wait_until(lambda: len(door.front.waiters) == 1, what='the pilot to wait')
        clock[0] = 30.0
        job = submit(store, timelimit=50)
        held.join(10)
        assert held.value == (200, {'status': 'OK', 'state': 'idle', 'waited': True})
    finally:
        door.close()
    assert srv.request_work(store, me, T0, left=50)[0]['job']['uuid'] == job


def woken_with(store, change, **job):
    """A pilot held by the front; `change` happens to it while it waits, then a job comes.
    Returns (the pilot's answer, the job)."""
    import gevent
    me = pilot(store)
    door = InProcessFront(store)
    try:
        held = gevent.spawn(door.request, 'POST', '/api/pilots/%s/work' % me, {'wait': 1},
                            door.secret_of(me))
        door.wait_until(lambda: len(door.front.waiters) == 1, what='the pilot to wait')
        change(me)
        job_uuid = submit(store, **job)
        held.join(10)
    finally:
        door.close()
    return held.value[1], job_uuid


def test_a_held_pilot_drained_while_it_waits_takes_no_job_when_woken(store):
    """A woken pilot's claim checks the pilot again (on PostgreSQL inside the claim itself)."""
    answer, job = woken_with(store, lambda me: srv.drain_pilot(store, me, T0))
    assert answer['status'] == 'STOP', answer
    assert srv.get_job(store, job)['state'] == 'defined'


def test_a_held_pilot_woken_by_a_job_of_a_type_paused_meanwhile_does_not_take_it(store):
    answer, job = woken_with(store, lambda me: srv.set_cap(store, {'name': 'reco', 'cap': 0}, T0),
                             jobtype='reco')
    assert answer['state'] == 'idle', answer
    assert srv.get_job(store, job)['state'] == 'defined'


# -- batch jobs on the server ---------------------------------------------------------------------


def test_a_batch_job_becomes_its_pilot_whichever_is_first(store):
    [job] = record(store, '101')
    assert (job['state'], job['pilot']) == ('pending', None)
    late = pilot(store, 'np04', 'slurm:101', now=at(5))
    job = batchjob(store, '101')
    assert (job['state'], job['pilot'], job['host'], job['started_at']) == (
        'running', late, 'node1', at(5))
    early = pilot(store, 'np04', 'slurm:102')                  # registered before the record
    [job] = record(store, '102', now=at(1))
    assert (job['state'], job['pilot']) == ('running', early)
    pilot(store, 'other', 'slurm:103')                         # another site's
    assert record(store, '103')[0]['state'] == 'pending'
    assert record(store, '101')[0]['pilot'] == late           # recorded again: no change
    pilot(store, 'np04', 'slurm:101', now=at(9))               # another pilot in the same job
    assert batchjob(store, '101')['pilot'] == late


def test_batch_job_states_name_the_states_they_leave(store):
    record(store, '1', '2', '3', '4', '5', '6')
    assert see(store, '1', 'running', host='node7')[0]['host'] == 'node7'
    see(store, '1', 'pending')                                 # requeued
    assert batchjob(store, '1')['state'] == 'pending'
    # never a pilot: flagged, its output kept; cancelled before it ran: just cancelled
    see(store, '1', 'running', at(1))
    [ended] = see(store, '1', 'failed', at(2), reason='NonZeroExitCode',
                  output='python3: not found')
    assert ended['state'] == 'never_registered'
    assert srv.get_batchjob(store, ended['id'])['output'] == 'python3: not found'
    assert see(store, '2', 'cancelled', reason='pending too long')[0]['state'] == 'cancelled'
    assert see(store, '3', 'ended')[0]['state'] == 'never_registered'
    # with a pilot: the batch system's word, else what became of the pilot
    for batchid, pilot_end, seen, final in (('4', 'stopped', 'ended', 'finished'),
                                            ('5', 'killed', 'ended', 'cancelled'),
                                            ('6', None, 'ended', 'failed')):
        me = pilot(store, 'np04', 'slurm:' + batchid)
        if pilot_end:
            srv.stop_pilot(store, me, pilot_end, at(3))
        assert see(store, batchid, seen, at(4))[0]['state'] == final, batchid
    assert see(store, '4', 'running') == [] and see(store, '1', 'cancelled') == []
    assert batchjob(store, '4')['state'] == 'finished'         # an ended batch job stays ended
    me = pilot(store, 'np04', 'slurm:7')
    record(store, '7')
    assert see(store, '7', 'failed', output='lost')[0]['state'] == 'failed'
    assert srv.get_batchjob(store, batchjob(store, '7')['id'])['output'] == ''


def test_the_pool_wants_a_pilot_per_busy_pilot_and_runnable_job(store):
    site(store, pilots=3, lifetime=100, max_pending=2, pending_timeout=60)
    for _ in range(2):
        submit(store, timelimit=90)
    submit(store, timelimit=91)                                 # longer than 100 s less margin
    submit(store, site='elsewhere', timelimit=10)
    numbers = pool(store)
    assert (numbers['queued'], numbers['wanted'], numbers['submit']) == (2, 2, 2)
    record(store, '1', '2')
    assert (pool(store)['pending'], pool(store)['submit']) == (2, 0)
    assert pool(store, keep=9)['wanted'] == 3 and pool(store, keep=9)['submit'] == 0  # max_pending
    # a pilot came of batch job 1 and took a job: busy; two queued would want 3 in all
    me = pilot(store, 'np04', 'slurm:1')
    srv.request_work(store, me, T0)
    numbers = pool(store)
    assert (numbers['pilots'], numbers['queued'], numbers['wanted']) == (
        {'live': 1, 'busy': 1}, 1, 2)
    assert numbers['submit'] == 0                               # batch job 2 is pending
    late = pool(store, now=at(61))
    assert late['cancel'] == ['2'] and late['submit'] == 1      # cancelled, replaced at once
    srv.drain_pilot(store, me, T0)
    assert pool(store)['pilots'] == {'live': 0, 'busy': 0}      # a drained pilot is leaving


def test_jobs_held_by_their_type_s_cap_want_no_pilot(store):
    site(store, pilots=5)
    for jobtype in ('paused', 'paused', 'capped', 'capped', 'free'):
        submit(store, jobtype=jobtype, timelimit=10)
    srv.set_cap(store, {'name': 'paused', 'cap': 0}, T0)
    srv.set_cap(store, {'name': 'capped', 'cap': 1}, T0)
    assert pool(store)['queued'] == 3                         # the free one, and both capped
    srv.request_work(store, pilot(store, 'np04'), T0)          # takes a capped one: now held
    numbers = pool(store)
    assert (numbers['queued'], numbers['pilots']['busy'], numbers['wanted']) == (1, 1, 2)


def test_ended_batch_jobs_are_purged_with_the_rest(store):
    record(store, '1', '2')
    see(store, '1', 'cancelled', at(10))
    assert srv.purge(store, at(3600), 3600)['batchjobs'] == 0
    assert srv.purge(store, at(3611), 3600)['batchjobs'] == 1
    assert [j['batchid'] for j in srv.list_batchjobs(store, {})] == ['2']


def test_a_started_batch_job_counts_until_its_pilot_should_have_come(store):
    site(store, pilots=2)
    record(store, '1')
    see(store, '1', 'running', at(10))
    assert pool(store, keep=1, now=at(20))['starting'] == 1
    stuck = pool(store, keep=1, now=at(10 + srv.REGISTER_GRACE + 1))
    assert (stuck['starting'], stuck['submit']) == (0, 1)


def test_a_site_without_a_target_has_no_pool(store):
    site(store)
    with pytest.raises(srv.Refused) as e:
        pool(store)
    assert e.value.status == 409 and 'pilots' in e.value.message


def test_site_batch_settings_are_kept_and_shown(store):
    defined = site(store, pilots=4, lifetime=3600, partition='short', account='dune',
                   options=['--qos=high', '--mem=2G'], max_pending=3, pending_timeout=0)
    assert (defined['partition'], defined['account'], defined['options']) == (
        'short', 'dune', ['--qos=high', '--mem=2G'])
    settings = pool(store)['settings']
    assert (settings['max_pending'], settings['pending_timeout']) == (3, 0)
    plain = site(store, 'plain', pilots=1)
    assert (plain['options'], plain['max_pending']) == ([], None)
    assert pool(store, name='plain')['settings']['max_pending'] == srv.DEFAULT_MAX_PENDING
    srv.delete_site(store, 'np04')
    assert sql_db(store).execute('SELECT count(*) FROM site_batch').fetchone()[0] == 1


BAD_REQUESTS = [
    ('POST', '/api/batchjobs', {'site': 's', 'system': 'pbs', 'batchids': ['1']}, 400, 'system'),
    ('POST', '/api/batchjobs', {'site': 's', 'system': 'slurm', 'batchids': []}, 400, 'non-empty'),
    ('POST', '/api/batchjobs', {'site': '', 'system': 'slurm', 'batchids': ['1']}, 400, 'site'),
    ('POST', '/api/batchjobs', {'site': 's', 'system': 'slurm', 'batchids': ['1 2']}, 400, 'word'),
    ('POST', '/api/batchjobs', {'site': 's', 'system': 'slurm', 'batchids': [7]}, 400, 'word'),
    ('POST', '/api/batchjobs', {'site': 's', 'system': 'slurm', 'batchids': ['1'], 'x': 1}, 400,
     'unknown'),
    ('POST', '/api/batchjobs/update', {'site': 's', 'system': 'slurm',
                                       'jobs': [{'batchid': '1', 'state': 'never_registered'}]},
     400, 'seen'),
    ('POST', '/api/batchjobs/update', {'site': 's', 'system': 'slurm',
                                       'jobs': [{'batchid': '1', 'state': 'ended', 'output': 3}]},
     400, 'output'),
    ('POST', '/api/batchjobs/update', {'site': 's', 'system': 'slurm', 'jobs': 'all'}, 400, 'list'),
    ('GET', '/api/batchjobs/77', None, 404, 'no such batch job'),
    ('GET', '/api/batchjobs?limit=0', None, 400, 'limit'),
    ('GET', '/api/sites/nosuch/pool', None, 404, 'no such site'),
    ('GET', '/api/sites/np04/pool?keep=-1', None, 400, 'keep'),
    ('GET', '/api/sites/np04/pool?keep=many', None, 400, 'keep'),
    ('GET', '/api/sites/np04/pool?system=pbs', None, 400, 'system'),
    ('POST', '/api/pilots/0f0c2f2e-0000-4000-8000-000000000009/drain', {}, 404, 'no such pilot'),
    ('POST', '/api/sites', {'name': 's', 'options': '--qos=high'}, 400, 'options'),
    ('POST', '/api/sites', {'name': 's', 'options': ['a\nqueue 1000']}, 400, 'one non-empty line'),
    ('POST', '/api/sites', {'name': 's', 'max_pending': -1}, 400, 'max_pending'),
    ('POST', '/api/sites', {'name': 's', 'partition': 5}, 400, 'partition'),
]


@pytest.mark.parametrize('method,path,body,status,message', BAD_REQUESTS)
def test_bad_batch_requests_are_4xx_and_store_nothing(store, method, path, body, status, message):
    from test_store import wsgi
    site(store, pilots=2)
    code, reply = wsgi(method, path, body)
    assert code == status and message in reply['error'], reply
    db = sql_db(store)
    assert db.execute('SELECT count(*) FROM batchjobs').fetchone()[0] == 0
    assert db.execute('SELECT count(*) FROM sites').fetchone()[0] == 1


def test_the_batch_statements_read_indexes(store):
    db = sql_db(store)
    params = {'site': 's', 'system': 'slurm', 'batchid': '1', 'uuid': 'u', 'host': 'h',
              'now': T0, 'extra': 'slurm:1', 'state': 'running', 'reason': '', 'output': '',
              'cap': 10, 'longest': 100, 'pilot': 'p', 'since': T0}
    wanted = {'POOL_BATCHJOBS': ('batchjobs', 'batchjobs_live'),
              'LINK_BATCH_PILOT': ('batchjobs', None), 'SEE_BATCHJOB': ('batchjobs', None),
              'END_BATCHJOB': ('batchjobs', None), 'ADOPT_EARLY_PILOT': ('pilots', 'pilots_extra'),
              'MON_PILOT_BATCHJOBS': ('batchjobs', 'batchjobs_pilot'),
              'MON_BATCH_NO_PILOT': ('batchjobs', 'batchjobs_ended')}
    for name, (table, index) in wanted.items():
        plan = query_plan(db, getattr(srv, name), params)
        assert any(st.reads(table, index, 'SEARCH') for st in plan), (name, plan)
        assert not [st for st in plan if st.op == 'SCAN' and st.table in
                    ('batchjobs', 'pilots', 'jobs') and not st.index], (name, plan)
    for name in ('POOL_PILOTS', 'POOL_QUEUED'):
        plan = query_plan(db, getattr(srv, name), params)
        assert not [st for st in plan if st.op == 'SCAN' and st.table in ('pilots', 'jobs')
                    and not st.index], (name, plan)


# -- the monitor --------------------------------------------------------------------------------


def test_the_monitor_shows_batch_jobs_beside_their_pilots(store):
    site(store, pilots=2)
    record(store, '11', '12', '13')
    me = pilot(store, 'np04', 'slurm:11', host='node7')
    see(store, '12', 'failed', srv.utcnow(), output='<b>python3: not found</b>')
    body = monitor_get('/monitor/batchjobs')
    assert 'slurm:11' in body and me[:8] in body and 'never_registered' in body
    assert re.search(r'<td class="state idle">idle</td>|<td class="state active">active</td>',
                     body)
    only = monitor_get('/monitor/batchjobs?state=never_registered')
    assert 'slurm:12' in only and 'slurm:11' not in only
    [broken] = [j for j in srv.list_batchjobs(store, {}) if j['batchid'] == '12']
    detail = monitor_get('/monitor/batchjobs/%d' % broken['id'])
    assert '&lt;b&gt;python3: not found&lt;/b&gt;' in detail and '<b>python3' not in detail
    assert 'slurm:11' in monitor_get('/monitor/pilots/' + me)
    assert 'without their pilot ever registering' in monitor_get('/')
    assert '/monitor/batchjobs?site=np04' in monitor_get('/monitor/sites')
    monitor_get('/monitor/batchjobs/999', 404)


# -- real pilots: draining and lifetimes ----------------------------------------------------------


def running(server, job_uuid):
    return server.job(job_uuid)['state'] == 'running'


def test_sigusr1_lets_the_job_finish_and_the_pilot_leave(clients, server, tmp_path):
    first, second = clients.submit([make_job('/bin/sleep 2'), make_job('/bin/true')])
    proc = clients.pilot('--cycles', '0', '--wait', '1', '--beat', '0.5')
    wait_for(lambda: running(server, first), what='the first job to run')
    proc.send_signal(signal.SIGUSR1)
    assert proc.wait(30) == 0
    assert [server.job(u)['state'] for u in (first, second)] == ['finished', 'defined']
    [me] = server.api('GET', '/api/pilots')[1]['pilots']
    assert me['state'] == 'stopped'


def test_sigusr1_while_idle_leaves_at_once(clients, server):
    proc = clients.pilot('--cycles', '0', '--wait', '20')
    wait_for(lambda: server.api('GET', '/api/pilots?state=idle')[1]['pilots'], what='idle')
    proc.send_signal(signal.SIGUSR1)
    assert proc.wait(10) == 0                                  # well within its 20 s wait
    assert server.api('GET', '/api/pilots')[1]['pilots'][0]['state'] == 'stopped'


def test_drain_from_the_command_line(clients, server):
    first, second = clients.submit([make_job('/bin/sleep 2'), make_job('/bin/true')])
    busy = clients.pilot('--cycles', '0', '--wait', '1', '--beat', '0.5')
    wait_for(lambda: running(server, first), what='the first job to run')
    me = server.job(first)['pilot']
    out = clients.run('pilot', '--drain', me, check=0).stdout
    assert 'drains' in out and me in out
    assert busy.wait(30) == 0
    assert [server.job(u)['state'] for u in (first, second)] == ['finished', 'defined']
    assert server.api('GET', '/api/pilots/' + me)[1]['state'] == 'stopped'
    assert 'drain ordered' in clients.pilot_logs()
    idle = clients.pilot('--cycles', '0', '--wait', '1', '--jobtypes', 'none-such')
    wait_for(lambda: server.api('GET', '/api/pilots?state=idle')[1]['pilots'], what='idle')
    idler = server.api('GET', '/api/pilots?state=idle')[1]['pilots'][0]['uuid']
    clients.run('pilot', '--drain', idler, check=0)
    assert idle.wait(30) == 0                                   # at the end of its wait
    assert server.api('GET', '/api/pilots/' + idler)[1]['state'] == 'stopped'
    err = clients.run('pilot', '--drain', idler, check=1).stderr
    assert err.startswith('p3s_pilot: error: server: pilot') and 'stopped already' in err
    assert server.job(second)['state'] == 'defined'


def test_a_pilot_with_a_lifetime_takes_only_jobs_that_fit_and_leaves_in_time(clients, server):
    """--lifetime 16 leaves 6 s for jobs (a margin of 10 s for the kill and the report)."""
    long_job, short_job = clients.submit([make_job('/bin/true', timeout='100', priority='9'),
                                          make_job('/bin/sleep 0.5', timeout='4')])
    started = time.monotonic()
    clients.run_pilot('--cycles', '0', '--wait', '20', '--lifetime', '16', timeout=60)
    assert time.monotonic() - started < 16
    assert server.job(short_job)['state'] == 'finished'
    assert server.job(long_job)['state'] == 'defined'
    assert server.api('GET', '/api/pilots')[1]['pilots'][0]['state'] == 'stopped'
    assert 'end of its lifetime' in clients.pilot_logs()


def test_a_pilot_names_its_batch_job_and_knows_its_end(clients, server, tmp_path):
    end = int(time.time()) + 40
    clients.run_pilot('--cycles', '1', '--wait', '0', '--period', '0',
                      env={'SLURM_JOB_ID': '4242', 'SLURM_JOB_END_TIME': str(end)})
    ad = tmp_path / '.job.ad'
    ad.write_text('ClusterId = 77\nProcId = 3\nOwner = "dqm"\n')
    clients.run_pilot('--cycles', '1', '--wait', '0', '--period', '0',
                      env={'_CONDOR_JOB_AD': str(ad)})
    clients.run_pilot('--cycles', '1', '--wait', '0', '--period', '0', '--extra', 'by hand',
                      '--lifetime', '100', env={'SLURM_JOB_ID': '4243'})
    extras = sorted(p['extra'] for p in server.api('GET', '/api/pilots')[1]['pilots'])
    assert extras == ['by hand', 'htcondor:77.3', 'slurm:4242']
    ends = sorted(int(s) for s in re.findall(r'leaves within (\d+) s', clients.pilot_logs()))
    assert len(ends) == 2 and 30 <= ends[0] <= 40 and ends[1] == 100


# -- p3s_batch.py without a batch system ----------------------------------------------------------


def define(clients, tmp_path, **fields):
    path = tmp_path / ('%s.json' % fields['name'])
    path.write_text(json.dumps(fields))
    clients.run('pilot', '--define-site', str(path), check=0)


def test_dry_run_prints_the_submission_for_slurm_and_htcondor(clients, server, tmp_path):
    define(clients, tmp_path, name='np04', pilots=3, lifetime=7200, partition='short',
           account='dune', options=['--qos=high'])
    clients.submit([make_job('/bin/true', site='np04')] * 2)
    out = clients.run('batch', '--site', 'np04', '--dry-run', '--keep', '1', check=0).stdout
    assert out.startswith('# the pool wants 2 pilots and would submit 2 now\n')
    assert ('sbatch --parsable --job-name=p3s-np04 --output=' in out
            and ' --time=120 --signal=B:USR1@120 --partition=short --account=dune --qos=high'
            in out)
    assert re.search(r"exec python3 \S*p3s_pilot.py --server \S+ --site np04 --cycles 0 "
                     r"--lifetime 7200\n", out)
    define(clients, tmp_path, name='np04', pilots=3, lifetime=7200, account='dune',
           options=['--qos=high'], pilotcycles='10')
    out = clients.run('batch', '--site', 'np04', '--system', 'htcondor', '--dry-run',
                      '--python', '/opt/py/bin/python3', check=0).stdout
    assert "'--site' 'np04' '--lifetime' '7200'" in out            # the site's 10 cycles
    assert "arguments = \"'/opt/py/bin/python3' 'p3s_pilot.py' '--server'" in out
    assert "'--extra' 'htcondor:$(ClusterId).$(ProcId)'\"" in out
    for line in ('batch_name = p3s-np04', '+MaxRuntime = 7200', 'accounting_group = dune',
                 '--qos=high', 'queue 2', 'transfer_input_files = %s/p3s_pilot.py' % ROOT):
        assert '\n' + line + '\n' in out, line


def test_pool_manager_errors_are_one_line(clients, server, tmp_path):
    def error(*args, code, env=None):
        proc = clients.run('batch', *args, env=env, check=code)
        assert proc.stderr.startswith('p3s_batch: error: ') and proc.stderr.count('\n') == 1
        return proc.stderr
    assert '--site' in error(code=2)
    assert 'letters, digits' in error('--site', 'a b', code=2)
    assert 'no such site' in error('--site', 'nosuch', '--once', code=1)
    define(clients, tmp_path, name='notarget')
    assert 'no target number of pilots' in error('--site', 'notarget', '--once', code=1)
    define(clients, tmp_path, name='np04', pilots=1)
    assert 'is not a file' in error('--site', 'np04', '--pilot', str(tmp_path / 'nope'), code=4)
    empty = tmp_path / 'bin'
    empty.mkdir()
    assert 'squeue failed' in error('--site', 'np04', '--once', '--batchlog', str(tmp_path / 'b'),
                                    code=1, env={'PATH': str(empty)})
    listed = json.loads(clients.run('batch', '--list', '--json', check=0).stdout)
    assert listed == {'batchjobs': []}


def test_only_one_pool_manager_per_site_and_system(clients, server, tmp_path):
    define(clients, tmp_path, name='np04', pilots=1)
    batchlog = tmp_path / 'batch'
    batchlog.mkdir()
    held = open(batchlog / 'p3s_batch-np04-slurm.lock', 'w')
    import fcntl
    fcntl.flock(held, fcntl.LOCK_EX)
    try:
        err = clients.run('batch', '--site', 'np04', '--once', '--batchlog', str(batchlog),
                          check=1).stderr
        assert 'another p3s_batch.py manages site np04 on slurm' in err
    finally:
        held.close()


# -- parsing what the batch systems print ---------------------------------------------------------

# Captured from the one-node cluster of tools/slurm-single-node.sh (Slurm 22.05).
SQUEUE = """\
6|CANCELLED||JobHeldUser
7|FAILED|vm|NonZeroExitCode
8|COMPLETING|vm|None
9|PENDING||Priority
10|RUNNING|vm|None
11|TIMEOUT|vm|TimeLimit
"""


def test_slurm_output_is_parsed():
    assert p3s_batch.parse_slurm_states(SQUEUE) == {
        '6': ('cancelled', '', 'JobHeldUser'), '7': ('failed', 'vm', 'NonZeroExitCode'),
        '8': ('running', 'vm', 'COMPLETING'), '9': ('pending', '', 'Priority'),
        '10': ('running', 'vm', 'RUNNING'), '11': ('failed', 'vm', 'TimeLimit')}
    sacct = '1234|CANCELLED by 0|node7|0:15\n1235|COMPLETED|node8|0:0\n1236|OUT_OF_MEMORY|n|0:125\n'
    assert p3s_batch.parse_sacct_states(sacct) == {
        '1234': ('cancelled', 'node7', 'CANCELLED (exit 0:15)'),
        '1235': ('finished', 'node8', 'COMPLETED (exit 0:0)'),
        '1236': ('failed', 'n', 'OUT_OF_MEMORY (exit 0:125)')}


def test_htcondor_output_is_parsed():
    """condor_submit's and condor_q's output as printed by real pools (the HTCondor manual,
    Parsl's HTCondor provider): HTCondor cannot run here, so nothing else of it is tested."""
    assert p3s_batch.parse_condor_submit(
        'Submitting job(s).\n1 job(s) submitted to cluster 6923.\n') == ['6923.0']
    assert p3s_batch.parse_condor_submit(
        'Submitting job(s)...\n3 job(s) submitted to cluster 1234.\n') == [
        '1234.0', '1234.1', '1234.2']
    with pytest.raises(p3s_batch.P3SError):
        p3s_batch.parse_condor_submit('ERROR: Failed to connect to local queue manager\n')
    assert p3s_batch.parse_condor_q(
        '34524642.0 2 slot1@node7.example.org\n34524643.0 1 undefined\n'
        '34524644.0 5 undefined\n34524645.0 4 slot1_2@node8\n') == {
        '34524642.0': ('running', 'node7.example.org', ''),
        '34524643.0': ('pending', '', ''), '34524644.0': ('pending', '', 'held'),
        '34524645.0': ('finished', 'node8', '')}
    # the manual's examples of the new syntax of arguments
    assert p3s_batch.condor_quote(['one', 'two with spaces', '3']) == \
        '"\'one\' \'two with spaces\' \'3\'"'
    assert p3s_batch.condor_quote(['"two"', "spacey 'quoted' argument"]) == \
        '"\'""two""\' \'spacey \'\'quoted\'\' argument\'"'


# HTCondor cannot run here. These stand-ins for its commands print what real pools print (the
# samples above) and log how they were called, so that the pool manager's HTCondor cycle runs
# end to end; that a real pool accepts the submit description is not shown by this.
STAND_IN = """#!/bin/sh
echo "$(basename "$0") $*" >> %(dir)s/calls
case "$(basename "$0")" in
    condor_submit) cat %(dir)s/submit.out ;;
    condor_q) cat %(dir)s/queue ;;
    condor_rm) echo "Job $1 marked for removal" ;;
esac
"""


def test_the_htcondor_cycle_with_stand_ins_for_its_commands(clients, server, tmp_path):
    fake = tmp_path / 'condor'
    fake.mkdir()
    for name in ('condor_submit', 'condor_q', 'condor_rm'):
        (fake / name).write_text(STAND_IN % {'dir': fake})
        (fake / name).chmod(0o755)
    env = {'PATH': '%s:%s' % (fake, os.environ['PATH'])}
    batchlog = tmp_path / 'batch'
    define(clients, tmp_path, name='np04', pilots=1, lifetime=3600, pending_timeout=0)
    clients.submit([make_job('/bin/true', site='np04')])

    def cycle(queue='', submitted=None):
        (fake / 'queue').write_text(queue)
        if submitted:
            (fake / 'submit.out').write_text(
                'Submitting job(s).\n1 job(s) submitted to cluster %s.\n' % submitted)
        out = clients.run('batch', '--site', 'np04', '--system', 'htcondor', '--once',
                          '--json', '--batchlog', str(batchlog), env=env, check=0).stdout
        return json.loads(out)

    def state(batchid):
        [job] = [j for j in server.api('GET', '/api/batchjobs')[1]['batchjobs']
                 if j['batchid'] == batchid]
        return job

    assert cycle(submitted='4242')['submitted'] == ['4242.0']
    calls = (fake / 'calls').read_text().splitlines()
    assert calls == ['condor_q -constraint JobBatchName == "p3s-np04" -af:j JobStatus RemoteHost',
                     'condor_submit %s/p3s-np04.sub' % batchlog]
    assert 'queue 1\n' in (batchlog / 'p3s-np04.sub').read_text()
    assert state('4242.0')['state'] == 'pending'
    cycle('4242.0 2 slot1@node7.example.org\n')
    assert (state('4242.0')['state'], state('4242.0')['host']) == ('running', 'node7.example.org')
    (batchlog / 'p3s-pilot-4242.0.err').write_text('/usr/bin/env: python3: not found\n')
    done = cycle('', submitted='4243')                         # gone: no pilot ever came
    assert [(j['batchid'], j['state']) for j in done['ended']] == [('4242.0', 'never_registered')]
    assert 'python3: not found' in server.api('GET', '/api/batchjobs/%d'
                                              % state('4242.0')['id'])[1]['output']
    assert done['submitted'] == ['4243.0']                     # the job still wants a pilot
    define(clients, tmp_path, name='np04', pilots=1, lifetime=3600, pending_timeout=1)
    wait_for(lambda: cycle('4243.0 5 undefined\n', '4244')['cancelled'] == ['4243.0'], 30, 0.5,
             what='the held pilot to be removed')
    assert 'condor_rm 4243.0' in (fake / 'calls').read_text()
    assert state('4243.0')['state'] == 'cancelled'
