"""Several p3s servers on one PostgreSQL database, deployed as docs/postgresql.md says: HAProxy
(examples/haproxy.cfg) in front of two servers, one of them killed mid-run; the database
restarted under two running servers. Each job runs once, pilots carry on, no one sees a 500.

Each server stands for a host of its own: its own temporary directory (where the servers of one
host meet), so they share nothing but the database, and its own process group (so kill -9
takes its workers too). HAProxy is Debian's `haproxy`: the test that needs it skips, saying
why, where it is not installed, unless P3S_REQUIRE_HAPROXY is set (CI), which fails it; the
same goes for PostgreSQL (P3S_REQUIRE_POSTGRES).
"""
import collections
import os
import re
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request
import warnings

import pytest

import p3s_server as srv
from conftest import ROOT, Clients, Server, free_port, make_job, postgres, wait_for

EXAMPLE = os.path.join(ROOT, 'examples', 'haproxy.cfg')
DOC = os.path.join(ROOT, 'docs', 'postgresql.md')


def read(path):
    with open(path) as f:
        return f.read()


def test_the_documented_haproxy_configuration_is_the_example():
    shown = re.findall(r'^```cfg\n(.*?)^```', read(DOC), re.M | re.S)
    assert read(EXAMPLE) in shown


# -- the pieces: servers on hosts of their own, HAProxy, what they tell ----------------------------


@pytest.fixture
def hosts(tmp_path):
    """hosts(name, dsn, *args): a p3s server (two workers) on the database, as if on a host of
    its own."""
    started = []

    def start(name, dsn, *args):
        home = tmp_path / name
        home.mkdir()
        tmpdir = tempfile.mkdtemp(prefix='p3s-host-')      # short: sockets are made there
        server = Server(home, db=dsn, extra_args=['--workers', '2'] + list(args),
                        preexec_fn=os.setsid, env=dict(os.environ, TMPDIR=tmpdir))
        started.append((server, tmpdir))
        return server.start()

    yield start
    for server, tmpdir in started:
        server.stop()
        kill_host(server)                                   # what did not stop
        shutil.rmtree(tmpdir, ignore_errors=True)


def kill_host(server):
    """kill -9 of a server and its workers, as when its host fails."""
    try:
        os.killpg(server.proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    server.proc.wait()


def held_polls(server):
    """Requests for work a server holds now (its /metrics, all its workers added up); None
    while it answers 503."""
    try:
        with urllib.request.urlopen(server.url + 'metrics', timeout=10) as r:
            text = r.read().decode()
    except urllib.error.HTTPError as e:
        assert e.code == 503, e
        return None
    return sum(float(v) for v in re.findall(r'^p3s_long_polls_waiting(?:\{.*\})? (\S+)$', text,
                                            re.M))


def get(server, path):
    """The answer to a GET, asked again while the server answers 503 (its database restarts)."""
    def once():
        status, reply = server.api('GET', path)
        assert status in (200, 503), reply
        return reply if status == 200 else None
    return wait_for(once, 30, what='an answer to GET %s' % path)


def finished(server, jobtype=None):
    """How many jobs (of the type) finished."""
    return len(get(server, '/api/jobs?state=finished&limit=100000'
                   + ('&jobtype=' + jobtype if jobtype else ''))['jobs'])


def log_text(server):
    return server.log_path.read_text()


def housekeepers(dsn):
    """The database sessions that hold the housekeeping lock."""
    db = srv.database(dsn).connect()
    try:
        return db.execute("SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted"
                          " AND objid = :key AND database = (SELECT oid FROM pg_database"
                          " WHERE datname = current_database())",
                          {'key': srv.PG_HOUSEKEEPER_LOCK}).fetchall()
    finally:
        db.close()


def check_ran_once(server, uuids, marks):
    """Every job finished, at its first attempt, and its payload ran once (its marker file has
    one line per run)."""
    jobs = {j['uuid']: j for j in get(server, '/api/jobs?limit=100000')['jobs']}
    assert set(jobs) == set(uuids)
    assert collections.Counter(j['state'] for j in jobs.values()) == {'finished': len(uuids)}
    assert {j['attempt'] for j in jobs.values()} == {1}
    runs = {p.name: len(p.read_text().split()) for p in marks.iterdir()}
    assert set(runs) == set(uuids)
    assert max(runs.values()) == 1, [u for u, n in runs.items() if n > 1]
    return jobs


def marked_job(marks, seconds, **fields):
    """A job whose payload appends a line to its marker file, then sleeps."""
    return make_job('/bin/sh -c "echo $$ >> %s/$P3S_JOB_UUID; sleep %s"' % (marks, seconds),
                    **fields)


def require_haproxy():
    found = shutil.which('haproxy')
    if not found:
        message = ('NO HAPROXY: the load balancer test is skipped: haproxy is not installed '
                   '(Debian: apt-get install haproxy)')
        if os.environ.get('P3S_REQUIRE_HAPROXY'):
            pytest.fail(message)
        warnings.warn(message)
        pytest.skip(message)
    return found


def balancer_config(port, server_ports):
    """examples/haproxy.cfg on this test's addresses, logging to its standard output."""
    ports = iter(server_ports)
    text = read(EXAMPLE)
    text, binds = re.subn(r'^(\s+bind) :8080$', r'\1 127.0.0.1:%d' % port, text, flags=re.M)
    text, servers = re.subn(r'^(\s+server p3s\d) \S+ check$',
                            lambda m: '%s 127.0.0.1:%d check' % (m.group(1), next(ports)), text,
                            flags=re.M)
    text, logs = re.subn(r'^(\s+log) /dev/log local0$', r'\1 stdout format raw local0', text,
                         flags=re.M)
    assert (binds, servers, logs) == (1, len(server_ports), 1)
    return text


class Balancer:
    """HAProxy on a free port of 127.0.0.1, with the example's configuration."""

    # One line of its HTTP log: the server that took the request, the status, the request.
    LOG_LINE = re.compile(r'\] \S+ \S+/(\S+) \S+ (-?\d+) .*"(\w+) (\S+) [^"]*"$')

    def __init__(self, tmp_path, haproxy, servers):
        self.config = tmp_path / 'haproxy.cfg'
        self.config.write_text(balancer_config(free_port(), [s.port for s in servers]))
        self.port = int(re.search(r'bind 127\.0\.0\.1:(\d+)', self.config.read_text()).group(1))
        self.url = 'http://127.0.0.1:%d/' % self.port
        self.log_path = tmp_path / 'haproxy.log'
        self.haproxy = haproxy
        self.proc = None

    def start(self):
        check = subprocess.run([self.haproxy, '-c', '-f', str(self.config)], capture_output=True,
                               text=True, timeout=30)
        assert check.returncode == 0, check.stdout + check.stderr
        with open(self.log_path, 'wb') as log:
            self.proc = subprocess.Popen([self.haproxy, '-db', '-f', str(self.config)],
                                         stdout=log, stderr=subprocess.STDOUT)
        wait_for(lambda: answers(self.url + 'api/ping') == 200, 10, what='HAProxy to answer')
        return self

    def requests(self):
        """(server, status, method, path) of each request it logged (a request cut by a
        server that died is not logged when HAProxy closes its client's connection instead of
        answering 502)."""
        return [m.groups() for m in map(self.LOG_LINE.search,
                                        self.log_path.read_text().splitlines()) if m]

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


def answers(url):
    """The HTTP status of a GET, with the Retry-After of a 503; None if nothing answered."""
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status
    except urllib.error.HTTPError as e:
        e.read()
        return (e.code, e.headers.get('Retry-After')) if e.code == 503 else e.code
    except OSError:
        return None


# -- HAProxy in front of two servers, one killed ------------------------------------------------


def test_two_servers_behind_haproxy_one_killed_mid_run(tmp_path, hosts):
    """Four pilots run 300 short jobs through HAProxy while four others wait in long polls for
    jobs of another type; one server is killed (-9, with its workers) mid-run, while it holds
    some of those polls. Every job runs once; HAProxy cuts the held polls (it closes their
    connections, or answers 502) and their pilots ask again; the waiting pilots, cut or not,
    then run the jobs meant for them."""
    haproxy = require_haproxy()
    dsn = postgres().new_database()
    victim, survivor = hosts('a', dsn), hosts('b', dsn)
    balancer = Balancer(tmp_path, haproxy, [victim, survivor]).start()
    clients = Clients(tmp_path, balancer)
    marks = tmp_path / 'marks'
    marks.mkdir()
    try:
        waiting = []
        for n in range(1, 5):           # each held before the next asks: leastconn spreads them
            waiting.append(clients.pilot('--cycles', '0', '--jobtypes', 'late', '--beat', '1'))
            wait_for(lambda: held_polls(victim) + held_polls(survivor) == n, 30,
                     what='%d pilots held in a long poll' % n)
        uuids = clients.submit([marked_job(marks, 0.05, jobtype='short')] * 300)
        busy = [clients.pilot('--cycles', '0', '--jobtypes', 'short', '--wait', '5', '--beat', '1')
                for _ in range(4)]
        wait_for(lambda: finished(survivor) >= 60 and held_polls(victim) >= 1, 60,
                 what='60 jobs finished while the server to kill holds a long poll')
        kill_host(victim)
        victim.stop()
        uuids += clients.submit([marked_job(marks, 0.05, jobtype='short')] * 20)
        wait_for(lambda: finished(survivor) == 320, 120, what='all 320 jobs finished')
        wait_for(lambda: held_polls(survivor) == 8, 60, what='every pilot held by the survivor')
        late = clients.submit([marked_job(marks, 2, jobtype='late')] * 4)
        wait_for(lambda: finished(survivor, jobtype='late') == 4, 60, what='the late jobs')
        for p in waiting + busy:
            p.send_signal(signal.SIGTERM)
        for p in waiting + busy:
            p.communicate(timeout=60)
            assert p.returncode == 0
        jobs = check_ran_once(survivor, uuids + late, marks)
        watchers = {p['uuid'] for p in get(survivor, '/api/pilots')['pilots']
                    if p['jobtypes'] == ['late']}
        assert {jobs[u]['pilot'] for u in late} == watchers        # one each, cut poll or not
        statuses = collections.Counter(status for _, status, _, _ in balancer.requests())
        assert not [s for s in statuses if s.startswith('5') and s != '502'], statuses
        cut = {p.stem for p in clients.pilotlog.iterdir() if 'retrying' in p.read_text()}
        assert cut & watchers                        # a held poll was cut, and its pilot went on
        wait_for(lambda: len(housekeepers(dsn)) == 1, 30, what='one process doing housekeeping')
        assert 'Traceback' not in log_text(survivor)
    finally:
        clients.cleanup()
        balancer.stop()


# -- the database restarts ----------------------------------------------------------------------


class Prober(threading.Thread):
    """Asks each server for a job listing, again and again, and keeps what they answered."""

    def __init__(self, servers):
        super().__init__(daemon=True)
        self.servers = servers
        self.seen = []                      # (time, server url, status)
        self.stopping = threading.Event()

    def run(self):
        while not self.stopping.wait(0.01):
            for server in self.servers:
                self.seen.append((time.monotonic(), server.url,
                                  answers(server.url + 'api/jobs?limit=1')))

    def since(self, when):
        return [(url, status) for t, url, status in self.seen if t >= when]

    def stop(self):
        self.stopping.set()
        if self.ident is not None:
            self.join(10)


def test_the_database_restarts_under_running_servers(tmp_path, hosts):
    """PostgreSQL restarts while two servers serve six pilots running 300 jobs: meanwhile the
    servers answer 503 with Retry-After (never a 500); then they answer again without being
    restarted, a submission made during the restart is in, wake-ups cross servers again, one
    process does the housekeeping, and every job ran once."""
    pg = postgres()
    dsn = pg.new_database()
    a, b = hosts('a', dsn), hosts('b', dsn)
    clients = {a: Clients(tmp_path, a), b: Clients(tmp_path, b)}
    marks = tmp_path / 'marks'
    marks.mkdir()
    prober = Prober([a, b])
    try:
        uuids = clients[a].submit([marked_job(marks, 0.05)] * 300)
        pilots = [clients[s].pilot('--cycles', '0', '--beat', '1', '--jobtypes', 'test,' + kind)
                  for s, kind in ((a, 'on-a'), (b, 'on-b')) for _ in range(3)]
        wait_for(lambda: finished(a) >= 60 and len(housekeepers(dsn)) == 1, 60,
                 what='60 jobs finished, and a process doing housekeeping')
        prober.start()
        submitted = []
        during = threading.Thread(target=lambda: submitted.extend(
            clients[b].submit([marked_job(marks, 0.05)] * 20)))
        during.start()
        restarted = time.monotonic()
        pg.restart()
        during.join(60)
        assert len(submitted) == 20                      # the client rode out the restart
        wait_for(lambda: all(answers(s.url + 'api/jobs?limit=1') == 200 for s in (a, b)), 30,
                 what='both servers to answer again')
        prober.stop()
        statuses = collections.Counter(status for _, status in prober.since(restarted))
        assert set(statuses) <= {200, (503, '2')}, statuses
        assert statuses[503, '2'] >= 1, statuses
        wait_for(lambda: finished(a) == 320, 120, what='all 320 jobs finished')
        wait_for(lambda: held_polls(a) == 3 and held_polls(b) == 3, 60,
                 what='every pilot held in a long poll')
        asked = time.monotonic()
        [crossing] = clients[b].submit([marked_job(marks, 0, jobtype='on-a')])
        wait_for(lambda: get(a, '/api/jobs/' + crossing)['state'] == 'finished', 10,
                 what="a job submitted to b run by a pilot held by a")
        assert time.monotonic() - asked < 5                 # woken, not at its poll's end
        for p in pilots:
            p.send_signal(signal.SIGTERM)
        for p in pilots:
            p.communicate(timeout=60)
            assert p.returncode == 0
        check_ran_once(a, uuids + submitted + [crossing], marks)
        for server in (a, b):
            assert server.proc.poll() is None
            assert 'starting another' not in log_text(server)      # no worker died
            assert 'Traceback' not in log_text(server)
        wait_for(lambda: 'lost the housekeeping lock' in log_text(a) + log_text(b), 30,
                 what='the housekeeper to notice its session ended')
        wait_for(lambda: len(housekeepers(dsn)) == 1, 30, what='one process doing housekeeping')
    finally:
        prober.stop()
        for c in clients.values():
            c.cleanup()


def test_an_outage_longer_than_the_pilot_timeout_loses_no_pilot(tmp_path, hosts):
    """The database away for longer than the pilot timeout: no pilot could be heard meanwhile,
    so none is taken for lost when it is back (the housekeeper gives them a pilot timeout again,
    as after a restart of the server), and the jobs that ran through the outage finish."""
    pg = postgres()
    dsn = pg.new_database()
    server = hosts('a', dsn, '--pilot-timeout', '6')
    clients = Clients(tmp_path, server)
    marks = tmp_path / 'marks'
    marks.mkdir()
    try:
        uuids = clients.submit([marked_job(marks, 12)] * 2)
        pilots = [clients.pilot('--cycles', '0') for _ in range(3)]     # two run, one waits
        wait_for(lambda: len(server.jobs(state='running')) == 2 and held_polls(server) == 1
                 and len(housekeepers(dsn)) == 1, 30, what='two jobs running, a pilot waiting')
        pg.restart(down=10)
        wait_for(lambda: finished(server) == 2, 60, what='the two jobs finished')
        states = {p['state'] for p in get(server, '/api/pilots')['pilots']}
        assert states <= set(srv.LIVE_PILOT_STATES), states
        for p in pilots:
            p.send_signal(signal.SIGTERM)
        for p in pilots:
            p.communicate(timeout=60)
            assert p.returncode == 0
        check_ran_once(server, uuids, marks)
        assert 'server says stop' not in clients.pilot_logs()
    finally:
        clients.cleanup()


# -- claims by type, at once ------------------------------------------------------------------


def test_pilots_of_one_type_claiming_at_once_are_never_told_the_queue_is_empty_too_soon():
    """On PostgreSQL claims run at once, in every process of every server: sixteen pilots that
    take only one type, each asking until it is told there is nothing for it, take 300 jobs
    exactly once, and none is told so while more jobs are queued than the other pilots are
    taking at that instant (a claim skips the jobs other claims hold, down the type's queue:
    not only its head)."""
    st = srv.configure(postgres().new_database(), sync='normal')
    try:
        jobs = [{'payload': '/bin/true', 'jobtype': 'x'}] * 300
        submitted = srv.submit_jobs(st, jobs, srv.utcnow())
        pilots = [srv.register_pilot(st, {'host': 'h', 'jobtypes': ['x']}, srv.utcnow())['uuid']
                  for _ in range(16)]
        claimed, queued_when_told, errors = [], [], []

        def work(me):
            try:
                while True:
                    reply, _ = srv.request_work(st, me, srv.utcnow())
                    if reply['state'] != 'dispatched':
                        queued_when_told.append(st.one("SELECT count(*) AS n FROM jobs"
                                                       " WHERE state = 'defined'")['n'])
                        return
                    job = reply['job']['uuid']
                    claimed.append(job)
                    srv.report_job(st, me, {'uuid': job, 'state': 'finished', 'errcode': 0,
                                            'pid': None, 'stdout': '', 'stderr': ''}, srv.utcnow())
            except Exception as e:                                   # pragma: no cover
                errors.append(e)

        threads = [threading.Thread(target=work, args=(p,)) for p in pilots]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert not errors
        assert sorted(claimed) == sorted(submitted)
        assert len(queued_when_told) == 16 and max(queued_when_told) < 16, queued_when_told
    finally:
        st.close()
