"""Nothing lost, nothing run twice, no one in who does not belong: crashes of the server and
of pilots with real processes, housekeeping, retention, retries and tokens."""
import collections
import json
import os
import signal
import subprocess
import sys
import time

import pytest

import p3s_server as srv
from conftest import (ON_POSTGRES, ROOT, Clients, Server, database_connection, free_port,
                      fresh_database, make_job, pid_alive, postgres, sql_db, wait_for)
from test_store import later, pilot, store, submit  # noqa: F401  (the store fixture)


def finished_count(server):
    return sum(j['state'] == 'finished' for j in server.jobs(state='finished'))


def test_server_killed_mid_run_then_restarted_loses_and_repeats_nothing(tmp_path):
    """kill -9 of the server during a run of 300 jobs with 4 pilots; a restart on the same port
    and database: every accepted job finishes exactly once, and the pilots carry on."""
    runs = tmp_path / 'runs.log'
    port = free_port()
    server = Server(tmp_path, port=port).start()
    clients = Clients(tmp_path, server)
    try:
        job = make_job('/bin/sh -c "echo $P3S_JOB_UUID >> %s; sleep 0.01"' % runs)
        uuids = clients.submit([job] * 300)
        pilots = [clients.pilot('--cycles', '0', '--wait', '2', '--beat', '1') for _ in range(4)]
        wait_for(lambda: finished_count(server) >= 60, 60, what='60 jobs finished')
        late = clients.submit([job] * 20)             # accepted with a 2xx answer just before...
        server.proc.send_signal(signal.SIGKILL)         # ...the server dies
        server.proc.wait()
        server.stop()
        time.sleep(2)                                   # the pilots meet a dead server
        server = Server(tmp_path, port=port, db=server.db).start()
        clients.server = server
        wait_for(lambda: finished_count(server) == 320, 120, what='all 320 jobs finished')
        for p in pilots:
            p.send_signal(signal.SIGTERM)
        for p in pilots:
            p.communicate(timeout=60)
            assert p.returncode == 0
        jobs = server.jobs()
        assert {j['uuid'] for j in jobs} == set(uuids + late)
        assert {j['state'] for j in jobs} == {'finished'}
        ran = collections.Counter(runs.read_text().split())
        assert set(ran) == set(uuids + late)
        assert max(ran.values()) == 1, [u for u, n in ran.items() if n > 1]
        assert 'retrying' in clients.pilot_logs()
    finally:
        clients.cleanup()
        server.stop()


def lose_the_dispatch(db_url, job_uuid, pilot_uuid):
    """What a crash of the machine (or of PostgreSQL) right after a dispatch leaves, since a
    dispatch is not synced: the job queued again, its pilot idle, the storage in another
    incarnation than the one the dispatch was made in."""
    db = database_connection(db_url)
    try:
        db.execute("UPDATE jobs SET state = 'defined', pilot = NULL, host = NULL, pid = NULL, "
                   "dispatched_at = NULL, started_at = NULL WHERE uuid = :job", {'job': job_uuid})
        db.execute("UPDATE pilots SET state = 'idle', job = NULL WHERE uuid = :pilot",
                   {'pilot': pilot_uuid})
    finally:
        db.close()
    storage_crashed(db_url)


def test_a_dispatch_lost_in_a_crash_goes_back_to_its_pilot_and_runs_once(tmp_path):
    """A crash loses a running job's dispatch (it is not synced): after the restart the queue
    holds the job while its pilot runs it. Another pilot, asking at once, must not get it; the
    running pilot's next heartbeat gives the job back to it; a job submitted after the restart
    goes at once. Each job runs once."""
    runs = tmp_path / 'runs.log'
    port = free_port()
    # In a session of its own, so that the crash kills its worker processes at once too.
    server = Server(tmp_path, port=port, preexec_fn=os.setsid).start()
    clients = Clients(tmp_path, server)
    try:
        record = 'echo $P3S_JOB_UUID >> %s; ' % runs
        [lost] = clients.submit([make_job('/bin/sh -c "%ssleep 6"' % record)])
        runner = clients.pilot('--cycles', '0', '--wait', '2', '--beat', '3')
        wait_for(lambda: server.job(lost)['state'] == 'running', what='the job running')
        holder = server.job(lost)['pilot']
        other = clients.pilot('--cycles', '0', '--wait', '2', '--beat', '3')
        wait_for(lambda: len(server.api('GET', '/api/pilots?state=idle')[1]['pilots']) == 1,
                 what='the other pilot idle')
        os.killpg(server.proc.pid, signal.SIGKILL)
        server.proc.wait()
        server.stop()
        lose_the_dispatch(server.db, lost, holder)
        server = Server(tmp_path, port=port, db=server.db).start()
        clients.server = server
        [fresh] = clients.submit([make_job('/bin/sh -c "%ssleep 0.1"' % record)])
        wait_for(lambda: server.job(fresh)['state'] == 'finished', 30, what='the new job run')
        wait_for(lambda: server.job(lost)['state'] == 'finished', 30, what='the lost job done')
        assert server.job(lost)['pilot'] == holder
        assert server.job(fresh)['pilot'] != holder
        for p in (runner, other):
            p.send_signal(signal.SIGTERM)
            p.communicate(timeout=30)
        assert collections.Counter(runs.read_text().split()) == {lost: 1, fresh: 1}
        said = server.log_path.read_text()
        assert 'the storage restarted' in said and 'dispatch was lost in a crash' in said
    finally:
        clients.cleanup()
        server.stop()


def storage_crashed(db_url):
    """The storage in another incarnation, as a crash of the machine (SQLite) or of the
    database server (PostgreSQL) leaves it."""
    db = database_connection(db_url)
    try:
        db.execute("UPDATE recovery SET incarnation = 'before the crash'")
    finally:
        db.close()


def work(store, pilot_uuid, now=None):
    reply, _ = srv.request_work(store, pilot_uuid, now or srv.utcnow())
    return reply['job']['uuid'] if reply['state'] == 'dispatched' else reply['state']


def test_a_recovery_holds_back_the_jobs_queued_before_it_until_every_live_pilot_is_heard(
        tmp_path):
    url = fresh_database(tmp_path)
    st = srv.configure(url)
    first, second, third = pilot(st), pilot(st), pilot(st)
    [old] = submit(st)
    st.close()
    st = srv.configure(url)                         # a restart: nothing was lost
    assert st.recovery.last_job == 0
    st.close()
    storage_crashed(url)
    subprocess.run([sys.executable, 'p3s_server.py', 'check', '--db', url], cwd=ROOT,
                   check=True, capture_output=True)      # a tool: it leaves it to the servers
    st = srv.configure(url)
    try:
        [new] = submit(st)
        assert work(st, first) == new               # submitted since: goes at once
        assert work(st, second) == 'idle'           # the third pilot may hold the old one
        [why] = srv.get_job(st, old)['waiting']['reasons']
        assert why['code'] == 'recovery' and third in why['text'], why
        assert work(st, third) == old               # every live pilot heard: it goes
        assert st.recovery.last_job == 0
    finally:
        st.close()


def test_a_pilot_whose_dispatch_was_lost_gets_its_job_back_with_its_final_report(tmp_path):
    """A short job ends before any heartbeat: its final report, at the attempt the pilot was
    given, gives it back; a report on another attempt does not."""
    url = fresh_database(tmp_path)
    st = srv.configure(url)
    me = pilot(st)
    [job] = submit(st)
    assert work(st, me) == job
    st.close()
    lose_the_dispatch(url, job, me)
    st = srv.configure(url)

    def report(attempt):
        return srv.check_report({'job': job, 'state': 'finished', 'errcode': 0,
                                 'elapsed': 0.1, 'attempt': attempt})
    try:
        with pytest.raises(srv.Refused) as e:
            srv.report_job(st, me, report(2), srv.utcnow())
        assert e.value.status == 409 and srv.get_job(st, job)['state'] == 'defined'
        reply, _ = srv.request_work(st, me, srv.utcnow(), report(1))
        assert reply['report'] == {'status': 'OK', 'state': 'finished', 'changed': True}
        done = srv.get_job(st, job)
        assert (done['state'], done['pilot']) == ('finished', me)
    finally:
        st.close()


def test_a_recovery_lasts_a_pilot_timeout_at_most(tmp_path):
    url = fresh_database(tmp_path)
    st = srv.configure(url, pilot_timeout=60)
    first, _ = pilot(st), pilot(st)
    [old] = submit(st)
    st.close()
    storage_crashed(url)
    st = srv.configure(url, pilot_timeout=60)
    try:
        now = srv.utcnow()
        assert work(st, first, now) == 'idle'       # the other pilot is silent ...
        assert work(st, first, later(now, 59)) == 'idle'
        assert work(st, first, later(now, 61)) == old   # ... a pilot timeout: it is lost
    finally:
        st.close()


@pytest.mark.skipif(not ON_POSTGRES, reason='PostgreSQL\'s crash recovery')
def test_a_crash_of_postgresql_begins_a_recovery_and_a_clean_restart_does_not(tmp_path):
    """The storage's mark is in a table that PostgreSQL's crash recovery empties."""
    url = fresh_database(tmp_path)
    st = srv.configure(url)
    [old] = submit(st)
    st.close()
    postgres().restart()                            # fast: a clean shutdown
    st = srv.configure(url)
    assert st.recovery.last_job == 0
    st.close()
    postgres().restart(mode='immediate')            # the server processes end at once: a crash
    st = srv.configure(url)
    try:
        assert st.recovery.last_job == st.one('SELECT id FROM jobs WHERE uuid = :uuid',
                                              {'uuid': old})['id']
    finally:
        st.close()


@pytest.fixture
def quick_server(tmp_path):
    srv_ = Server(tmp_path, extra_args=['--pilot-timeout', '2']).start()
    yield srv_
    srv_.stop()


def test_killed_pilot_leaves_its_job_lost(tmp_path, quick_server):
    """kill -9 of a pilot: its payload dies with it (it runs on unsupervised otherwise), and
    the server takes the pilot and its job for lost."""
    clients = Clients(tmp_path, quick_server)
    try:
        [job_uuid] = clients.submit([make_job('sleep 60')])
        pilot = clients.pilot('--beat', '0.5')
        wait_for(lambda: quick_server.job(job_uuid)['state'] == 'running', what='running')
        payload = quick_server.job(job_uuid)['pid']
        pilot.send_signal(signal.SIGKILL)
        pilot.communicate()
        wait_for(lambda: not pid_alive(payload), 10, what='the payload to die with its pilot')
        wait_for(lambda: quick_server.job(job_uuid)['state'] == 'lost', 30, what='job lost')
        [p] = quick_server.api('GET', '/api/pilots')[1]['pilots']
        assert p['state'] == 'lost'
    finally:
        clients.cleanup()


def test_pilot_back_from_the_dead_is_told_to_stop(tmp_path, quick_server):
    """A pilot frozen past the timeout is declared lost; when it wakes it kills its payload and
    leaves, and its late reports change nothing."""
    clients = Clients(tmp_path, quick_server)
    try:
        [job_uuid] = clients.submit([make_job('sleep 60')])
        pilot = clients.pilot('--beat', '0.3')
        wait_for(lambda: quick_server.job(job_uuid)['state'] == 'running', what='running')
        payload = quick_server.job(job_uuid)['pid']
        pilot.send_signal(signal.SIGSTOP)
        wait_for(lambda: quick_server.job(job_uuid)['state'] == 'lost', 30, what='job lost')
        pilot.send_signal(signal.SIGCONT)
        pilot.communicate(timeout=30)
        assert pilot.returncode == 0
        wait_for(lambda: not pid_alive(payload), 10, what='payload killed')
        job = quick_server.job(job_uuid)
        assert job['state'] == 'lost'
        assert 'server says stop' in clients.pilot_logs() or 'STOP' in clients.pilot_logs()
    finally:
        clients.cleanup()


def test_retries_requeue_a_nonstarter_but_never_a_failure(clients, server):
    missing, failing = clients.submit([make_job('/no/such/program', retries=1, priority='1'),
                                       make_job('/bin/false', retries=3)])
    clients.run_pilot('--cycles', '3', '--wait', '0', '--period', '0')
    first = server.job(missing)
    assert (first['state'], first['retries']) == ('nonstarter', 0)      # ran twice, then no more
    last = server.job(failing)
    assert (last['state'], last['errcode'], last['retries']) == ('failed', 1, 3)


def test_lost_job_with_retries_goes_back_to_the_queue(store):
    """Lost with its pilot, then queued again as its next attempt once its pilot, if it still
    lives cut off from the server, has surely killed its payload (LOST_RETRY_DELAY)."""
    me = pilot(store)
    [job] = submit(store, retries=1)
    srv.request_work(store, me, srv.utcnow())
    now = later(srv.utcnow(), 500)
    assert srv.sweep(store, now, 120)['lost_pilots'] == [me]
    assert srv.get_job(store, job)['state'] == 'lost'
    assert srv.sweep(store, later(now, srv.LOST_RETRY_DELAY - 1), 120)['woken'] == 0
    assert srv.get_job(store, job)['state'] == 'lost'
    now = later(now, srv.LOST_RETRY_DELAY + 1)
    assert srv.sweep(store, now, 120)['woken'] == 1
    again = srv.get_job(store, job)
    assert (again['state'], again['retries'], again['pilot'], again['attempt']) == \
        ('defined', 0, None, 2)
    other = pilot(store)
    assert srv.request_work(store, other, later(now, 1))[0]['job']['uuid'] == job
    srv.sweep(store, later(now, 1000), 120)
    assert srv.get_job(store, job)['state'] == 'lost'


def test_a_job_far_past_its_timelimit_is_ended_and_its_pilot_told_to_kill(store):
    me = pilot(store)
    [job] = submit(store, timelimit=10)
    srv.request_work(store, me, srv.utcnow())
    started = srv.utcnow()
    srv.report_job(store, me, {'uuid': job, 'state': 'running', 'pid': 5, 'errcode': None,
                               'stdout': '', 'stderr': ''}, started)
    assert srv.sweep(store, later(started, 10 + srv.TIMELIMIT_GRACE - 1), 1e9)['overdue'] == 0
    assert srv.sweep(store, later(started, 10 + srv.TIMELIMIT_GRACE + 1), 1e9)['overdue'] == 1
    assert srv.get_job(store, job)['state'] == 'timelimit'
    assert srv.heartbeat(store, me, job, srv.utcnow())['status'] == 'KILL'


def test_purge_removes_old_terminal_records_in_batches(store, monkeypatch):
    monkeypatch.setattr(srv, 'PURGE_BATCH', 7)
    me = pilot(store)
    submit(store, 30)
    for _ in range(25):
        job = srv.request_work(store, me, srv.utcnow())[0]['job']['uuid']
        srv.report_job(store, me, {'uuid': job, 'state': 'finished', 'errcode': 0, 'pid': 1,
                                   'stdout': 'x', 'stderr': ''}, srv.utcnow())
    srv.request_work(store, me, srv.utcnow())              # one stays dispatched
    srv.add_service_message(store, {'name': 'cron', 'message': 'old note'}, srv.utcnow())
    srv.stop_pilot(store, pilot(store), 'stopped', srv.utcnow())
    now = srv.utcnow()
    assert srv.purge(store, now, 3600) == {'jobs': 0, 'pilots': 0, 'workflows': 0, 'services': 0,
                                           'batchjobs': 0}
    assert srv.purge(store, later(now, 7200), 3600) == {'jobs': 25, 'pilots': 1, 'workflows': 0,
                                                        'services': 1, 'batchjobs': 0}
    left = sql_db(store).execute('SELECT state, count(*) FROM jobs GROUP BY state').fetchall()
    assert dict(map(tuple, left)) == {'defined': 4, 'dispatched': 1}
    assert sql_db(store).execute('SELECT count(*) FROM joblogs').fetchone()[0] == 0


def run_server_command(*args):
    return subprocess.run([sys.executable, os.path.join(ROOT, 'p3s_server.py')] + list(args),
                          capture_output=True, text=True, timeout=60)


def test_check_and_purge_commands(tmp_path, clients, server):
    clients.submit([make_job('/bin/true')] * 3)
    clients.run_pilot('--cycles', '3')
    check = run_server_command('check', '--db', server.db)
    assert check.returncode == 0, check.stderr
    assert 'integrity: ok' in check.stdout and 'finished 3' in check.stdout
    purged = run_server_command('purge', '--older', '0s', '--db', server.db)
    assert purged.returncode == 0, purged.stderr
    assert 'purged 0 workflows, 3 other jobs, 1 pilots and 0 service messages' in purged.stdout
    assert server.jobs() == []
    bad = run_server_command('purge', '--older', 'soon', '--db', server.db)
    assert bad.returncode == 2 and 'not a duration' in bad.stderr
    missing = run_server_command('check', '--db', str(tmp_path / 'nothing.db'))
    assert missing.returncode == 1 and 'no database' in missing.stderr


# -- security ----------------------------------------------------------------------------------

def call_with(server, token, method, path, body=None):
    import urllib.request
    import urllib.error
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(server.url.rstrip('/') + path, data=data, method=method,
                                 headers={'Content-Type': 'application/json',
                                          'Authorization': 'Bearer ' + token})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status
    except urllib.error.HTTPError as e:
        assert json.loads(e.read())['error']
        return e.code


def test_tokens_guard_every_state_change(tmp_path):
    server = Server(tmp_path, extra_args=['--token', 'admin-secret',
                                          '--pilot-token', 'pilot-secret']).start()
    clients = Clients(tmp_path, server)
    try:
        job = [{'payload': '/bin/true'}]
        assert server.api('POST', '/api/jobs', job)[0] == 401
        assert call_with(server, 'wrong', 'POST', '/api/jobs', job) == 401
        assert call_with(server, 'pilot-secret', 'POST', '/api/jobs', job) == 401   # no submitting
        assert call_with(server, 'admin-secret', 'POST', '/api/jobs', job) == 200
        assert server.api('GET', '/api/jobs')[0] == 200                            # reads are open
        assert server.api('POST', '/api/pilots', {})[0] == 401
        path = tmp_path / 'job.json'
        path.write_text(json.dumps([make_job('/bin/true')]))
        denied = clients.run('job', '-j', str(path))
        assert denied.returncode == 1 and 'token' in denied.stderr
        [uuid] = clients.run('job', '-j', str(path), env={'P3S_TOKEN': 'admin-secret'}, check=0).stdout.split()
        assert clients.run('job', '--kill', uuid, env={'P3S_PILOT_TOKEN': 'admin-secret'}).returncode == 1
        clients.run_pilot('--cycles', '2', '--wait', '0', '--period', '0',
                          env={'P3S_PILOT_TOKEN': 'pilot-secret'})
        assert {j['state'] for j in server.jobs()} == {'finished'}
        assert clients.run('pilot', env={'P3S_PILOT_TOKEN': 'wrong'}).returncode == 1
        site = tmp_path / 'site.json'
        site.write_text(json.dumps({'name': 'node7', 'pilotbeat': '3'}))
        both = {'P3S_TOKEN': 'admin-secret', 'P3S_PILOT_TOKEN': 'pilot-secret'}
        clients.run('pilot', '--define-site', str(site), env=both, check=0)
        assert clients.run('pilot', '--define-site', str(site),
                           env={'P3S_PILOT_TOKEN': 'pilot-secret'}).returncode == 1
    finally:
        clients.cleanup()
        server.stop()


def test_private_server_hides_reads_too(tmp_path):
    server = Server(tmp_path, extra_args=['--token', 't0k3n', '--private']).start()
    try:
        assert server.api('GET', '/api/jobs')[0] == 401
        assert call_with(server, 't0k3n', 'GET', '/api/jobs') == 200
    finally:
        server.stop()


def test_listening_beyond_loopback_needs_a_token():
    proc = run_server_command('--host', '0.0.0.0', '--port', '0', '--db', ':memory:')
    assert proc.returncode == 2 and 'needs a token' in proc.stderr
