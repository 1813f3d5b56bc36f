"""The server's front, with real processes on real sockets: clients that cannot starve it,
several worker processes on one port, exactly once across processes, and housekeeping done by
one process at a time."""
import json
import multiprocessing
import os
import pathlib
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

import pytest

import p3s_server as srv
from conftest import (ON_POSTGRES, ROOT, Clients, Server, fresh_database, make_job, runs_of,
                      sqlite_only, wait_for)


def children(pid):
    with open('/proc/%d/task/%d/children' % (pid, pid)) as f:
        return [int(p) for p in f.read().split()]


def finished_count(server):
    return len(server.jobs(state='finished'))


@pytest.fixture
def flooded(tmp_path):
    """A server of two workers whose pilots are lost after 10 s of silence and whose clients
    have 2 s to send a request's headers."""
    server = Server(tmp_path, extra_args=['--workers', '2', '--pilot-timeout', '10',
                                          '--request-timeout', '2']).start()
    yield server
    server.stop()


class Slowloris(threading.Thread):
    """Connections that send their request one byte at a time, every half second, for as long
    as the server lets them; each remembers when the server closed it."""

    def __init__(self, port, count, request):
        super().__init__(daemon=True)
        self.socks = [socket.create_connection(('127.0.0.1', port)) for _ in range(count)]
        self.request = request
        self.cut = {}                 # socket index -> seconds it lived
        self.answers = {}
        self.stopping = threading.Event()

    def run(self):
        born = time.monotonic()
        sent = 0
        while not self.stopping.wait(0.5) and len(self.cut) < len(self.socks):
            byte = self.request[sent % len(self.request):][:1]
            sent += 1
            for i, sock in enumerate(self.socks):
                if i in self.cut:
                    continue
                try:
                    sock.sendall(byte)
                    sock.setblocking(False)
                    answer = sock.recv(4096)
                    sock.setblocking(True)
                except BlockingIOError:
                    sock.setblocking(True)
                    continue
                except OSError:
                    answer = b''
                self.answers[i] = answer
                self.cut[i] = time.monotonic() - born

    def close(self):
        self.stopping.set()
        self.join(10)
        for sock in self.socks:
            sock.close()


def test_idle_and_slow_clients_starve_nothing(flooded, tmp_path):
    """300 sockets that send nothing and 25 that send their headers a byte at a time, and 5 that
    send a body a byte at a time, held against the server while a pilot runs a job: every
    submission is answered, the pilot's heartbeats go through (it is not lost), and the slow
    requests are cut off."""
    clients = Clients(tmp_path, flooded)
    try:
        [long_job] = clients.submit([make_job('sleep 14')])
        pilot = clients.pilot('--cycles', '1', '--beat', '1', '--wait', '0')
        wait_for(lambda: flooded.job(long_job)['state'] == 'running', what='the long job to run')
        idle = [socket.create_connection(('127.0.0.1', flooded.port)) for _ in range(300)]
        headers = Slowloris(flooded.port, 25, b'GET /api/jobs HTTP/1.1\r\nX-Slow: ' + b'a' * 64)
        body = Slowloris(flooded.port, 5, b'x' * 1000)
        for sock in body.socks:
            sock.sendall(b'POST /api/jobs HTTP/1.1\r\nContent-Type: application/json\r\n'
                         b'Content-Length: 1000\r\n\r\n')
        headers.start()
        body.start()
        submitted = []
        flood_ends = time.monotonic() + 12
        while time.monotonic() < flood_ends:
            status, reply = flooded.api('POST', '/api/jobs', [{'payload': '/bin/true'}],
                                        timeout=5)
            assert status == 200, reply
            submitted += reply['uuids']
            time.sleep(0.5)
        assert len(submitted) >= 10
        assert len(headers.cut) == 25 and max(headers.cut.values()) < 8, headers.cut
        assert len(body.cut) == 5 and all(b'408' in a for a in body.answers.values()), \
            body.answers
        pilot.communicate(timeout=30)
        assert pilot.returncode == 0
        assert flooded.job(long_job)['state'] == 'finished'
        [p] = flooded.api('GET', '/api/pilots')[1]['pilots']
        assert p['state'] == 'stopped'                      # never lost
        assert all(s.fileno() >= 0 for s in idle)
        for sock in idle:
            sock.close()
        headers.close()
        body.close()
    finally:
        clients.cleanup()


@pytest.mark.parametrize('hosts', ['one host', 'two hosts'])
def test_a_job_submitted_to_one_process_wakes_a_pilot_held_by_another(tmp_path, hosts):
    """Two servers on one database (processes, as workers or hosts would be): pilots held in a
    long poll by the first (two worker processes) start jobs submitted to the second at once,
    not when their 25 s wait ends. On one host the processes wake each other directly; servers
    on two hosts (here: two run directories, which is all a host is to a server) only by
    PostgreSQL, and one process of the host hands the wake-ups on to the others."""
    if hosts == 'two hosts' and not ON_POSTGRES:
        pytest.skip('servers on two hosts share PostgreSQL, not an SQLite file')
    elsewhere = pathlib.Path(tempfile.mkdtemp(prefix='p3s-host-', dir='/tmp'))  # a short path
    first = Server(tmp_path, extra_args=['--workers', '2']).start()
    second = Server(tmp_path, extra_args=['--workers', '1'], db=first.db,
                    env=dict(os.environ, TMPDIR=str(elsewhere)) if hosts == 'two hosts'
                    else None).start()
    clients = Clients(tmp_path, first)
    try:
        pilots = [clients.pilot('--cycles', '1', '--wait', '25') for _ in range(2)]
        wait_for(lambda: [p['state'] for p in first.api('GET', '/api/pilots')[1]['pilots']]
                 == ['idle', 'idle'], what='the pilots to wait')
        time.sleep(1)                           # well inside their long polls
        status, reply = second.api('POST', '/api/jobs', [{'payload': '/bin/true'}] * 2)
        assert status == 200
        started = time.monotonic()
        for pilot in pilots:
            pilot.communicate(timeout=60)
        assert time.monotonic() - started < 15, 'a pilot was not woken by the other process'
        assert {first.job(u)['state'] for u in reply['uuids']} == {'finished'}
        if hosts == 'two hosts':
            assert list(elsewhere.glob('p3s-*/wake.group'))    # it did run apart
    finally:
        clients.cleanup()
        first.stop()
        second.stop()
        shutil.rmtree(elsewhere, ignore_errors=True)


def heard(listener, seconds):
    """The NOTIFYs heard within `seconds`: (group, pid, message)."""
    return [tuple(n.payload.split(' ', 2)) for n in listener.notifies(timeout=seconds)]


def other_host(db):
    """This test's session, playing another host: it listens where hosts meet and where its
    own wake-ups come, as a server's forwarding process does."""
    import psycopg
    listener = psycopg.connect(db, autocommit=True)
    listener.execute('LISTEN ' + srv.PG_WAKE_CHANNEL)
    listener.execute('LISTEN ' + srv.host_channel('other'))
    return listener


def say(listener, message, channel=srv.PG_WAKE_CHANNEL):
    listener.execute('SELECT pg_notify(%s, %s)', (channel, message))


def test_wake_ups_go_through_postgresql_only_once_another_host_listens(tmp_path):
    """A host alone sends no wake-up by NOTIFY. A listener says hello; a host hearing another
    answers (a hello always, a `here` once per process), and from then on announces its jobs
    on that host's channel. The other host is played by this test's own session, speaking the
    servers' protocol."""
    if not ON_POSTGRES:
        pytest.skip('only servers on PostgreSQL wake other hosts')
    server = Server(tmp_path, extra_args=['--workers', '1']).start()
    listener = other_host(server.db)
    try:
        [(group, pid, hello)] = heard(listener, 3)          # the server's listener is up
        assert hello == 'hello'
        assert server.api('POST', '/api/jobs', [{'payload': '/bin/true'}])[0] == 200
        assert heard(listener, 1) == []                     # alone: no wake-up sent
        say(listener, 'other 1 here')                       # a process it never heard
        assert heard(listener, 1) == [('other', '1', 'here'),
                                      (group, pid, 'here')]
        say(listener, 'other 1 here')                       # heard already: no answer
        assert heard(listener, 1) == [('other', '1', 'here')]
        say(listener, 'other 1 hello')                      # a hello is always answered
        assert heard(listener, 1) == [('other', '1', 'hello'), (group, pid, 'here')]
        # Not a host's token (no channel has so long a name): ignored, so its hosts' wake-ups
        # still go, each on its own channel, in the same statement.
        say(listener, 'x' * 60 + ' 1 hello')
        assert heard(listener, 1) == [('x' * 60, '1', 'hello')]
        assert server.api('POST', '/api/jobs', [{'payload': '/bin/true'}])[0] == 200
        [note] = listener.notifies(timeout=1)               # now the other host is told,
        assert note.channel == srv.host_channel('other')    # on its own channel
        sender, _, wake = note.payload.split(' ', 2)
        assert sender == group and srv.read_wake_message(wake) == [('default', '', 1)]
    finally:
        listener.close()
        server.stop()


def test_a_host_that_learns_of_another_wakes_the_pilots_it_holds(tmp_path):
    """A job submitted on a host that did not know this one yet was announced to nobody here:
    hearing that host, a server wakes every pilot it holds, and they ask again. The job is
    queued here without a wake-up (in this process), then the other host, played by this
    test's session, says it is there."""
    if not ON_POSTGRES:
        pytest.skip('only servers on PostgreSQL wake other hosts')
    server = Server(tmp_path, extra_args=['--workers', '1']).start()
    clients = Clients(tmp_path, server)
    try:
        pilot = clients.pilot('--cycles', '1', '--wait', '25')
        wait_for(lambda: [p['state'] for p in server.api('GET', '/api/pilots')[1]['pilots']]
                 == ['idle'], what='the pilot to wait')
        time.sleep(1)                                   # well inside its long poll
        unannounced = srv.configure(server.db)          # no wake-ups from this process
        [job] = srv.submit_jobs(unannounced, [{'payload': '/bin/true'}], srv.utcnow())
        unannounced.close()
        with other_host(server.db) as other:
            say(other, 'other 7 here')
        started = time.monotonic()
        pilot.communicate(timeout=60)
        assert time.monotonic() - started < 15, 'the held pilot was not woken'
        assert server.job(job)['state'] == 'finished'
    finally:
        clients.cleanup()
        server.stop()


def test_when_the_process_that_hears_a_host_dies_another_takes_over(tmp_path):
    """Other hosts' wake-ups reach one process of this host (here: a first server, holding no
    pilot), which hands them on. When it dies another (the second server, holding the pilot)
    starts to listen and wakes the pilots it holds: a wake-up sent meanwhile reached no one.
    The other host is played by this test's session: it queues a job without a wake-up, then
    sends the wake-up itself, right after the first server died."""
    if not ON_POSTGRES:
        pytest.skip('only servers on PostgreSQL wake other hosts')
    host = pathlib.Path(tempfile.mkdtemp(prefix='p3s-host-', dir='/tmp'))   # a short path
    env = dict(os.environ, TMPDIR=str(host))
    db = fresh_database(tmp_path)
    other = other_host(db)
    listening = Server(tmp_path, extra_args=['--workers', '1'], db=db, env=env).start()
    holding = clients = None
    try:
        [(group, _, _)] = heard(other, 5)                      # the first is up
        wait_for(lambda: lock_taken(next(host.glob('p3s-*/wake.forward'), None)),
                 what='the first server to listen for its host')
        holding = Server(tmp_path, extra_args=['--workers', '1'], db=db, env=env).start()
        say(other, 'other 1 hello')
        wait_for(lambda: len(heard(other, 0.5)) >= 1, what='the servers to answer')
        clients = Clients(tmp_path, holding)
        pilot = clients.pilot('--cycles', '1', '--wait', '25')
        wait_for(lambda: [p['state'] for p in holding.api('GET', '/api/pilots')[1]['pilots']]
                 == ['idle'], what='the pilot to wait')
        time.sleep(1)                                   # well inside its long poll
        unannounced = srv.configure(db)                 # no wake-ups from this process
        [job] = srv.submit_jobs(unannounced, [{'payload': '/bin/true'}], srv.utcnow())
        unannounced.close()
        listening.proc.kill()
        listening.proc.wait()
        say(other, 'other 1 ' + srv.wake_message([('default', '')]).decode(),
            srv.host_channel(group))
        started = time.monotonic()
        pilot.communicate(timeout=60)
        assert time.monotonic() - started < 15, 'the held pilot was not woken'
        assert holding.job(job)['state'] == 'finished'
    finally:
        if clients:
            clients.cleanup()
        other.close()
        listening.stop()
        if holding:
            holding.stop()
        shutil.rmtree(host, ignore_errors=True)


def lock_taken(path):
    """Whether a process holds the flock on this file (taken and let go at once if not)."""
    import fcntl
    if path is None:
        return False
    with open(path, 'a') as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(f, fcntl.LOCK_UN)
        return False


def test_a_worker_killed_mid_run_is_replaced_and_nothing_is_lost_or_run_twice(tmp_path):
    runs = tmp_path / 'runs.log'
    server = Server(tmp_path, extra_args=['--workers', '2']).start()
    clients = Clients(tmp_path, server)
    try:
        job = make_job('/bin/sh -c "echo $P3S_JOB_UUID >> %s; sleep 0.01"' % runs)
        uuids = clients.submit([job] * 300)
        pilots = [clients.pilot('--cycles', '0', '--wait', '2', '--beat', '1')
                  for _ in range(4)]
        wait_for(lambda: finished_count(server) >= 60, 60, what='60 jobs finished')
        workers = children(server.proc.pid)
        assert len(workers) == 2
        os.kill(workers[0], signal.SIGKILL)
        wait_for(lambda: len(children(server.proc.pid)) == 2
                 and workers[0] not in children(server.proc.pid), what='a new worker')
        wait_for(lambda: finished_count(server) == 300, 120, what='all 300 jobs finished')
        for p in pilots:
            p.send_signal(signal.SIGTERM)
        for p in pilots:
            p.communicate(timeout=60)
            assert p.returncode == 0
        assert {j['state'] for j in server.jobs()} == {'finished'}
        ran = runs_of(runs)
        assert set(ran) == set(uuids)
        assert max(ran.values()) == 1, [u for u, n in ran.items() if n > 1]
    finally:
        clients.cleanup()
        server.stop()


def test_housekeeping_moves_to_another_worker_when_its_process_dies(tmp_path):
    server = Server(tmp_path, extra_args=['--workers', '2', '--pilot-timeout', '2']).start()
    try:
        def leaders():
            return [int(line.split('process ')[1].split()[0])
                    for line in server.log_path.read_text().splitlines()
                    if 'does the housekeeping' in line]
        wait_for(leaders, what='a worker to take up the housekeeping')
        time.sleep(1.5)                                    # three passes of the sweep
        [leader] = leaders()                               # one, and only one
        os.kill(leader, signal.SIGKILL)
        status, reply = server.api('POST', '/api/pilots', {'host': 'silent'})
        assert status == 200
        wait_for(lambda: server.api('GET', '/api/pilots/' + reply['pilot']['uuid'])[1]['state']
                 == 'lost', 30, what='the silent pilot to be lost')
        assert len(leaders()) == 2 and leaders()[1] != leader
    finally:
        server.stop()


# -- exactly once, raced by processes ------------------------------------------------------------


def claim_all(path, pilots, done, finish):
    """In a process of its own with a store of its own: each pilot asks for work until there
    is none, finishing (or keeping) each job it gets; the uuids it got go to `done`. Each
    process has a run directory of its own, so that nothing but the database's transactions
    keeps them apart (the server processes of one host also write in turns, see below)."""
    tempfile.tempdir = tempfile.mkdtemp(prefix='race-', dir=os.environ['TMPDIR'])
    st = srv.configure(path, sync='normal')
    got = []
    for me in pilots:
        report = None
        while True:
            reply, _ = srv.request_work(st, me, srv.utcnow(), report)
            if reply['state'] != 'dispatched':
                break
            got.append(reply['job']['uuid'])
            if not finish:
                break
            report = {'uuid': reply['job']['uuid'], 'state': 'finished', 'errcode': 0,
                      'pid': 1, 'stdout': '', 'stderr': ''}
        if report:
            srv.report_job(st, me, report, srv.utcnow())
    st.close()
    done.put(got)


def race(path, processes, pilots_each, finish):
    st = srv.configure(path, sync='normal')
    pilots = [[srv.register_pilot(st, {'host': 'h%d' % i}, srv.utcnow())['uuid']
               for _ in range(pilots_each)] for i in range(processes)]
    st.close()
    ctx = multiprocessing.get_context('fork')
    done = ctx.Queue()
    procs = [ctx.Process(target=claim_all, args=(path, mine, done, finish)) for mine in pilots]
    for p in procs:
        p.start()
    got = [done.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    return [u for mine in got for u in mine]


def test_processes_racing_for_one_queue_never_share_a_job(tmp_path):
    path = fresh_database(tmp_path, 'race.db')
    st = srv.configure(path, sync='normal')
    uuids = srv.submit_jobs(st, [{'payload': '/bin/true'}] * 600, srv.utcnow())
    st.close()
    got = race(path, processes=4, pilots_each=3, finish=True)
    assert sorted(got) == sorted(uuids)                     # each once, none lost


def test_processes_racing_for_the_last_slots_of_a_cap_take_no_more(tmp_path):
    """Two claims can both see the last free slot of a type's cap unless the count and the take
    are one transaction: 6 processes with 4 pilots each race for a type capped at 3, five
    times over."""
    for round_ in range(5):
        path = fresh_database(tmp_path, 'cap%d.db' % round_)
        st = srv.configure(path, sync='normal')
        srv.set_cap(st, {'name': 'capped', 'cap': 3}, srv.utcnow())
        srv.submit_jobs(st, [{'payload': '/bin/true', 'jobtype': 'capped'}] * 50, srv.utcnow())
        st.close()
        got = race(path, processes=6, pilots_each=4, finish=False)
        assert len(got) == 3 and len(set(got)) == 3, got


def servers_run_directory(db):
    """The run directory of the servers that the tests start (their TMPDIR, not this
    process's)."""
    saved, tempfile.tempdir = tempfile.tempdir, os.environ['TMPDIR']
    try:
        return srv.run_directory(db)
    finally:
        tempfile.tempdir = saved


@sqlite_only
def test_server_processes_write_in_turns_at_a_lock_the_kernel_hands_on(tmp_path):
    """The server processes on one SQLite file take a shared file lock before SQLite's write
    lock, so that the next writer goes the moment the last one lets go, where SQLite's busy
    handler would have it sleep. While another process holds that lock, of two submissions
    one waits for it and the other is refused with a 503, as behind a stalled writer; the
    one that waited is answered, and stored, once the lock is let go."""
    from test_security import storage_refusal, submit_over_http
    server = Server(tmp_path, extra_args=['--workers', '1']).start()
    lock = srv.FileLock(os.path.join(servers_run_directory(server.db), 'writer.lock'))
    results = []
    submissions = [threading.Thread(target=submit_over_http,
                                    args=(server, [{'payload': '/bin/true', 'name': name}],
                                          results))
                   for name in ('one', 'two')]
    try:
        lock.acquire()
        for t in submissions:
            t.start()
        wait_for(lambda: results, what='a submission refused')
        [(status, headers, reply)] = results
        storage_refusal(status, headers, reply, 'locked by another process')
        assert any(t.is_alive() for t in submissions) and server.jobs() == []
    finally:
        lock.release()
        lock.close()
        for t in submissions:
            t.join(60)
    try:
        status, _, reply = results[1]
        assert status == 200, reply
        assert len(server.jobs()) == 1
    finally:
        server.stop()


# -- running it ----------------------------------------------------------------------------------


def test_a_port_in_use_is_one_line(tmp_path, server):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, 'p3s_server.py'), '--port',
                           str(server.port), '--db', str(tmp_path / 'other.db')],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert re.fullmatch(r'p3s_server: error: cannot listen on 127\.0\.0\.1:\d+: Address already '
                        r'in use\n', proc.stderr), proc.stderr


@sqlite_only
@pytest.mark.parametrize('command', ['serve', 'check'])
def test_a_database_locked_past_the_busy_timeout_at_start_is_one_line(tmp_path, command):
    """Another process holds SQLite's write lock while a server starts, or a tool (which
    applies the schema as a server process does): after the busy timeout (10 s) it exits with
    one line that says so, not a traceback."""
    from test_security import HOLD_WRITE_LOCK
    db = fresh_database(tmp_path)
    Server(tmp_path, db=db).start().stop()              # the schema is in place
    holder = subprocess.Popen([sys.executable, '-c', HOLD_WRITE_LOCK, db],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == 'locked\n'
        args = ['--port', '0', '--db', db] if command == 'serve' else ['check', '--db', db]
        proc = subprocess.run([sys.executable, os.path.join(ROOT, 'p3s_server.py')] + args,
                              capture_output=True, text=True, timeout=60)
    finally:
        holder.communicate('go\n', timeout=10)
    assert proc.returncode == 1
    assert re.fullmatch(r'p3s_server: error: cannot prepare the database \S+: it is locked by '
                        r'another process \(database is locked\); start again once it can\n',
                        proc.stderr), proc.stderr


def test_a_run_directory_too_long_for_a_socket_is_one_line(tmp_path):
    deep = tmp_path / ('d' * 100)
    deep.mkdir()
    proc = subprocess.run([sys.executable, os.path.join(ROOT, 'p3s_server.py'), '--port', '0',
                           '--db', fresh_database(tmp_path)], capture_output=True, text=True,
                          timeout=60, env=dict(os.environ, TMPDIR=str(deep)))
    assert proc.returncode == 1
    assert re.fullmatch(r'p3s_server: error: the run directory \S+ is too long .*TMPDIR.*\n',
                        proc.stderr), proc.stderr


def test_sigterm_answers_held_polls_and_sighup_reopens_the_log(tmp_path):
    log = tmp_path / 'server.log'
    server = Server(tmp_path, extra_args=['--workers', '2', '--log', str(log)]).start()
    try:
        wait_for(lambda: 'does the housekeeping' in log.read_text(), what='a first log line')
        log.rename(tmp_path / 'server.log.1')               # what logrotate does
        server.proc.send_signal(signal.SIGHUP)
        wait_for(log.exists, what='the log to be opened again')
        me, secret = server.register()
        held = {}
        poll = threading.Thread(target=lambda: held.update(reply=server.api(
            'POST', '/api/pilots/%s/work' % me, {'wait': 25}, token=secret)))
        poll.start()
        wait_for(lambda: server.api('GET', '/api/pilots/' + me)[1]['state'] == 'idle',
                 what='the pilot to be held')
        server.proc.send_signal(signal.SIGTERM)
        poll.join(15)
        assert held['reply'] == (200, {'status': 'OK', 'state': 'idle', 'waited': True})
        assert server.proc.wait(15) == 0
    finally:
        server.stop()


# -- durable where it matters --------------------------------------------------------------------

STRACE = shutil.which('strace')


def syscalls_between(trace, request, reply, calls=('sync(',)):
    """The calls (sync calls by default) a worker made after it read `request` and before it
    sent `reply`."""
    lines = trace.splitlines()
    start = next(i for i, line in enumerate(lines) if request in line and 'recv' in line)
    end = next(i for i, line in enumerate(lines[start:], start)
               if 'send' in line and reply in line)
    return [line for line in lines[start:end] if any(c in line for c in calls)]


@sqlite_only
@pytest.mark.skipif(not STRACE, reason='strace is not installed: the durability of commits '
                    'cannot be traced (CI installs it)')
@pytest.mark.parametrize('sync', ['full', 'normal'])
def test_a_submission_is_on_disk_before_its_answer_and_a_dispatch_is_not(tmp_path, sync):
    """Under --sync full the commit of a submission is synced before the client hears of it
    (its write-ahead log, after the commit's last write to it, and after the writer's turn is
    over, so that the next writer need not wait for the disk); a dispatch (recovered after a
    crash) and a heartbeat are not; --sync normal syncs none."""
    server = Server(tmp_path, extra_args=['--workers', '1', '--sync', sync]).start()
    trace = tmp_path / 'strace.log'
    tracer = subprocess.Popen([STRACE, '-f', '-y', '-s', '2000', '-e', 'trace=fsync,fdatasync,'
                               'pwrite64,flock,recvfrom,sendto', '-o', str(trace), '-p',
                               str(server.proc.pid)],
                              stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: server.api('GET', '/api/ping')[0] == 200 and trace.exists()
                 and 'GET /api/ping' in trace.read_text(), what='strace to follow the server')
        _, jobs = server.api('POST', '/api/jobs', [{'payload': '/bin/true', 'name': 'durable'}])
        me, secret = server.register()
        _, work = server.api('POST', '/api/pilots/%s/work' % me, {'wait': 0}, token=secret)
        assert work['job']['uuid'] == jobs['uuids'][0]
        server.api('POST', '/api/pilots/%s/heartbeat' % me, {'job': work['job']['uuid']},
                   token=secret)
    finally:
        tracer.terminate()
        tracer.wait(10)
        server.stop()
    text = trace.read_text()
    submit = syscalls_between(text, 'POST /api/jobs', jobs['uuids'][0])
    claim = syscalls_between(text, '/work HTTP', work['job']['uuid'])
    beat = syscalls_between(text, '/heartbeat HTTP', 'status')
    assert beat == []
    assert claim == []
    if sync == 'full':
        calls = syscalls_between(text, 'POST /api/jobs', jobs['uuids'][0],
                                 ('sync(', 'pwrite64(', 'LOCK_UN'))
        last = [line for line in calls if '-wal>' in line or 'writer.lock>' in line][-3:]
        assert ('pwrite64(' in last[0] and 'LOCK_UN' in last[1] and 'sync(' in last[2]
                and '-wal>' in last[2]), text[-3000:]
    else:
        assert submit == []


def sync_done(line):
    return 'fdatasync' in line and ('resumed>' in line or ') = 0' in line)


@sqlite_only
@pytest.mark.skipif(not STRACE, reason='strace is not installed: the durability of commits '
                    'cannot be traced (CI installs it)')
def test_no_dispatch_is_answered_before_its_submission_is_on_disk(tmp_path):
    """A pilot asking another server process for work in the moment between a submission's
    commit and its sync (here stretched: strace holds every sync 0.3 s) may be handed that job,
    but hears of it only once a sync made the submission durable: a power loss meanwhile
    would undo the job and leave it running."""
    first = Server(tmp_path, extra_args=['--workers', '1']).start()
    second = Server(tmp_path, extra_args=['--workers', '1'], db=first.db).start()
    trace = tmp_path / 'strace.log'
    me, secret = second.register()
    tracer = subprocess.Popen([STRACE, '-f', '-y', '-s', '2000', '-e',
                               'trace=fdatasync,recvfrom,sendto', '-e',
                               'inject=fdatasync:delay_enter=300000', '-o', str(trace),
                               '-p', str(first.proc.pid), '-p', str(second.proc.pid)],
                              stderr=subprocess.DEVNULL)
    dispatched = []

    def ask_for_work():
        while not dispatched:
            status, reply = second.api('POST', '/api/pilots/%s/work' % me, {'wait': 0},
                                       token=secret)
            assert status == 200, reply
            if reply.get('job'):
                dispatched.append(reply['job']['uuid'])
    try:
        wait_for(lambda: first.api('GET', '/api/ping')[0] == second.api('GET', '/api/ping')[0]
                 == 200 and trace.exists() and trace.read_text().count('GET /api/ping') >= 2,
                 what='strace to follow the servers')
        pilot = threading.Thread(target=ask_for_work)
        pilot.start()
        status, jobs = first.api('POST', '/api/jobs', [{'payload': '/bin/true'}])
        pilot.join(30)
        assert status == 200 and dispatched == jobs['uuids']
    finally:
        tracer.terminate()
        tracer.wait(10)
        first.stop()
        second.stop()
    lines = trace.read_text().splitlines()
    submitted = next(i for i, line in enumerate(lines)
                     if 'recv' in line and 'POST /api/jobs' in line)
    synced = next(i for i, line in enumerate(lines[submitted:], submitted) if sync_done(line))
    answered = next(i for i, line in enumerate(lines)
                    if 'sendto' in line and dispatched[0] in line and 'dispatched' in line)
    server = lines[answered].split()[0]
    # The asking thread sends one request at a time: the last one the server read before it
    # answered is the one it answered (read whole, or in a 'resumed' line after another call).
    asked = max(i for i, line in enumerate(lines[:answered])
                if line.split()[0] == server and 'recvfrom' in line and '/work HTTP' in line)
    assert asked < synced < answered, '\n'.join(lines[submitted:answered + 1])
    assert server == str(second.proc.pid)


@sqlite_only
@pytest.mark.skipif(not STRACE, reason='strace is not installed: a failing disk cannot be '
                    'feigned (CI installs it)')
def test_a_commit_the_disk_cannot_sync_is_synced_when_the_client_asks_again(tmp_path):
    """A sync that fails (strace fails the server's first fdatasync with EIO) leaves the change
    made but not safe from a power loss: the server logs it and answers 503 with a Retry-After
    and a message that says so. The same submission, sent again, is known by its uuid and
    syncs: the job is stored once."""
    import urllib.error
    import urllib.request
    server = Server(tmp_path, extra_args=['--workers', '1']).start()
    wait_for(lambda: server.api('GET', '/api/ping')[0] == 200, what='the server to serve')
    trace = tmp_path / 'strace.log'
    tracer = subprocess.Popen([STRACE, '-f', '-e', 'trace=fdatasync,recvfrom', '-e',
                               'inject=fdatasync:error=EIO:when=1', '-o', str(trace),
                               '-p', str(server.proc.pid)], stderr=subprocess.DEVNULL)
    jobs = [{'uuid': '0b7e3c52-5a8e-4c1e-9d62-3f4f1e0a1b2c', 'payload': '/bin/true'}]
    try:
        wait_for(lambda: server.api('GET', '/api/ping')[0] == 200 and trace.exists()
                 and 'GET /api/ping' in trace.read_text(), what='strace to follow the server')
        request = urllib.request.Request(server.url + 'api/jobs', json.dumps(jobs).encode(),
                                         {'Content-Type': 'application/json'})
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=30)
        error = json.loads(refused.value.read())['error']
        assert refused.value.code == 503 and refused.value.headers['Retry-After'], error
        assert 'made but a power loss could undo it' in error and '\n' not in error
        assert server.job(jobs[0]['uuid'])['state'] == 'defined'
        assert server.api('POST', '/api/jobs', jobs) == (200, {'uuids': [jobs[0]['uuid']]})
        assert [j['uuid'] for j in server.jobs()] == [jobs[0]['uuid']]
    finally:
        tracer.terminate()
        tracer.wait(10)
        server.stop()
    syncs = [line for line in trace.read_text().splitlines() if 'fdatasync' in line]
    assert 'EIO (Input/output error) (INJECTED)' in syncs[0] and syncs[-1].endswith('= 0')
    assert 'POST /api/jobs: the disk could not sync the database' in server.log_path.read_text()


@sqlite_only
def test_a_report_is_timed_at_its_arrival_not_when_a_thread_takes_it(tmp_path):
    """A report says how long ago its job started and ended; the server counts back from the
    report's arrival, so a report that waited for the database (here: another process holds
    SQLite's write lock for 1.5 s) still gives the job its true times."""
    from datetime import datetime
    from test_security import HOLD_WRITE_LOCK
    server = Server(tmp_path, extra_args=['--workers', '1']).start()
    try:
        pilot, secret = server.register()
        [job] = server.api('POST', '/api/jobs', [{'payload': '/bin/true'}])[1]['uuids']
        status, reply = server.api('POST', '/api/pilots/%s/work' % pilot, {}, token=secret)
        assert status == 200 and reply['job']['uuid'] == job
        holder = subprocess.Popen([sys.executable, '-c', HOLD_WRITE_LOCK, server.db],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert holder.stdout.readline() == 'locked\n'
        def let_go():
            holder.stdin.write('go\n')
            holder.stdin.flush()
        threading.Timer(1.5, let_go).start()     # one timer: a flush before the write is lost
        sent = time.time()
        status, note = server.api('POST', '/api/pilots/%s/report' % pilot,
                                  {'job': job, 'state': 'finished', 'errcode': 0,
                                   'elapsed': 0.5, 'ago': 0}, token=secret)
        answered = time.time()
        holder.wait(10)
        assert status == 200 and answered - sent > 1.4, note
        stored = server.job(job)
        stopped = datetime.fromisoformat(stored['stopped_at']).timestamp()
        started = datetime.fromisoformat(stored['started_at']).timestamp()
        assert sent - 0.1 < stopped < sent + 0.75, (sent, stopped, answered)
        assert abs(stopped - started - 0.5) < 0.01
    finally:
        server.stop()
