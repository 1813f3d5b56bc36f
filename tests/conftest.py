"""The test harness: a real server on an ephemeral port with its own database, the real client
scripts and real pilot processes, all on 127.0.0.1, all cleaned up after each test."""
import collections
import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import warnings
import wsgiref.util

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

SERVER_START_TIMEOUT = 20
# The database the whole suite runs on: SQLite files (the default), or, with
# P3S_TEST_DB=postgresql, a new database of a private PostgreSQL cluster for each test.
ON_POSTGRES = os.environ.get('P3S_TEST_DB', 'sqlite') == 'postgresql'
sqlite_only = pytest.mark.skipif(ON_POSTGRES, reason='this test reads SQLite itself (its '
                                 'files, pragmas or query plans)')


def script(name):
    return os.path.join(ROOT, name)


def free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def wait_for(predicate, timeout=20, interval=0.05, what='condition'):
    """Poll until predicate() is truthy; returns its value or fails the test."""
    give_up = time.monotonic() + timeout
    while time.monotonic() < give_up:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    pytest.fail('timed out after %.0f s waiting for %s' % (timeout, what))


def api(url, method, path, body=None, timeout=30, token=None):
    """A raw API call: (HTTP status, decoded JSON body). `token`: the bearer token (a pilot's
    own calls carry its secret)."""
    data = None if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
    headers = {'Content-Type': 'application/json'}
    if token:
        headers['Authorization'] = 'Bearer ' + token
    req = urllib.request.Request(url.rstrip('/') + path, data=data, method=method,
                                 headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read() or b'{}')
    except urllib.error.HTTPError as e:
        raw = e.read()
        assert e.headers.get('Content-Type', '').startswith('application/json'), raw[:200]
        return e.code, json.loads(raw)


class Server:
    """A p3s_server.py process on a free port with a temporary database. `env`: its
    environment, if not the tests' own."""

    def __init__(self, tmp_path, port=0, extra_args=(), db=None, preexec_fn=None, env=None):
        self.db = db or fresh_database(tmp_path)
        self.preexec_fn = preexec_fn
        self.env = env
        self.log_path = tmp_path / 'server.log'
        self.port = port
        self.extra_args = list(extra_args)
        self.proc = None
        self.url = None

    def start(self):
        self.log = open(self.log_path, 'ab')
        self.proc = subprocess.Popen(
            [sys.executable, script('p3s_server.py'), '--port', str(self.port), '--db', self.db]
            + self.extra_args, stdout=subprocess.PIPE, stderr=self.log, cwd=ROOT,
            preexec_fn=self.preexec_fn, env=self.env)
        line = self.proc.stdout.readline().decode()
        if 'listening on' not in line:
            self.stop()
            pytest.fail('server did not start: %r\n%s' % (line, self.log_path.read_text()))
        self.url = line.split('listening on ')[1].split()[0]
        self.port = int(self.url.rsplit(':', 1)[1].strip('/'))
        return self

    def stop(self, sig=signal.SIGTERM):
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc:
            self.proc.stdout.close()
        self.log.close()

    def api(self, method, path, body=None, timeout=30, token=None):
        return api(self.url, method, path, body, timeout, token)

    def register(self, **fields):
        """A pilot registered over HTTP: (its uuid, its secret)."""
        status, reply = self.api('POST', '/api/pilots', dict({'host': 'h'}, **fields))
        assert status == 200, reply
        return reply['pilot']['uuid'], reply['secret']

    def job(self, job_uuid):
        status, job = self.api('GET', '/api/jobs/' + job_uuid)
        assert status == 200, job
        return job

    def jobs(self, **query):
        query.setdefault('limit', 100000)
        qs = '&'.join('%s=%s' % kv for kv in query.items())
        return self.api('GET', '/api/jobs?' + qs)[1]['jobs']


@pytest.fixture(scope='session', autouse=True)
def run_directories():
    """The servers' run directories (their wake-up sockets and locks, one per database) go in
    a directory of the session's own, removed at its end, so that the thousands of databases
    of a run leave nothing in /tmp. Short, since sockets are made there."""
    tempfile.gettempdir()                   # this process's own files stay where they were
    path = tempfile.mkdtemp(prefix='p3s-tests-', dir='/tmp')
    os.chmod(path, 0o1777)                  # as /tmp: payloads of other users write there
    before = os.environ.get('TMPDIR')
    os.environ['TMPDIR'] = path
    yield
    if before is None:
        os.environ.pop('TMPDIR', None)
    else:
        os.environ['TMPDIR'] = before
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def server(tmp_path):
    srv = Server(tmp_path).start()
    yield srv
    srv.stop()


class Clients:
    """Runs the client scripts and pilots as separate processes against one server."""

    def __init__(self, tmp_path, server):
        self.tmp = tmp_path
        self.server = server
        self.joblog = tmp_path / 'jobs'
        self.pilotlog = tmp_path / 'pilots'
        self.pilots = []

    def env(self, extra=None):
        env = dict(os.environ, P3S_SERVER=self.server.url if self.server.url else '',
                   P3S_JOBLOG=str(self.joblog), P3S_PILOTLOG=str(self.pilotlog))
        env.pop('P3S_TOKEN', None)
        env.update(extra or {})
        return env

    def run(self, name, *args, env=None, check=None, timeout=120):
        """Run p3s_<name>.py to its end. `-S` proves it needs no site-packages."""
        proc = subprocess.run([sys.executable, '-S', script('p3s_%s.py' % name)] + list(args),
                              capture_output=True, text=True, env=self.env(env), cwd=self.tmp,
                              timeout=timeout)
        if check is not None:
            assert proc.returncode == check, (proc.returncode, proc.stdout, proc.stderr)
        return proc

    def submit(self, jobs, *args):
        path = self.tmp / ('jobs-%d.json' % time.monotonic_ns())
        path.write_text(json.dumps(jobs))
        proc = self.run('job', '-j', str(path), *args, check=0)
        return proc.stdout.split()

    def pilot(self, *args, env=None):
        """Start a pilot in the background; it is killed at the end of the test if still up."""
        proc = subprocess.Popen([sys.executable, '-S', script('p3s_pilot.py')] + list(args),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env=self.env(env), cwd=self.tmp)
        self.pilots.append(proc)
        return proc

    def run_pilot(self, *args, env=None, timeout=120):
        proc = self.pilot(*args, env=env)
        out, err = proc.communicate(timeout=timeout)
        assert proc.returncode == 0, (proc.returncode, out, err, self.pilot_logs())
        return proc

    def pilot_logs(self):
        if not self.pilotlog.exists():
            return ''
        return '\n'.join(p.read_text() for p in self.pilotlog.iterdir())

    def cleanup(self):
        for proc in self.pilots:
            if proc.poll() is None:
                proc.kill()
            proc.communicate()


@pytest.fixture
def clients(tmp_path, server):
    c = Clients(tmp_path, server)
    yield c
    c.cleanup()


def fresh_database(tmp_path, name='p3s.db'):
    """A test's database: a file in its temporary directory, or a new PostgreSQL database."""
    return postgres().new_database() if ON_POSTGRES else str(tmp_path / name)


@pytest.fixture
def store(tmp_path):
    """An in-process server's database (p3s_server.configure), new for the test."""
    import p3s_server
    st = p3s_server.configure(fresh_database(tmp_path))
    yield st
    st.close()
    while OPENED:
        OPENED.pop().close()


def database_connection(db):
    """A connection of the test's own to a server's database (its --db), taking the statements
    as the server's own do; each write commits at once. Close it."""
    import p3s_server
    return p3s_server.database(db).connect()


def sql_db(store):
    """A connection of the test's own to a store's database, outside the server's pool: reads
    see the last commit, and each write commits at once. It takes the statements as the
    server's own do (on PostgreSQL, translated the same way)."""
    db = store.db.connect()
    OPENED.append(db)
    return db


class Postgres:
    """A private PostgreSQL cluster for the tests: initdb and pg_ctl of Debian's `postgresql`
    package in a temporary directory, a Unix socket only, no fsync; as the `postgres` user when
    the tests run as root (PostgreSQL refuses root). Stopped when the tests end."""

    def __init__(self):
        import shutil
        import tempfile
        self.bin = self.find_binaries()
        self.dir = tempfile.mkdtemp(prefix='p3s-pg-')
        self.port = free_port()
        self.count = 0
        self.as_user = ['runuser', '-u', 'postgres', '--'] if os.getuid() == 0 else []
        if self.as_user:
            shutil.chown(self.dir, 'postgres')
        self.data = os.path.join(self.dir, 'data')
        self.run('initdb', '-D', self.data, '-A', 'trust', '-U', 'p3s', '--no-sync', '-E', 'UTF8',
                 '--locale=C')
        self.start()

    def start(self):
        self.run('pg_ctl', '-D', self.data, '-l', os.path.join(self.dir, 'log'), '-w', '-o',
                 '-c listen_addresses= -k %s -p %d -c fsync=off -c synchronous_commit=off '
                 '-c full_page_writes=off -c max_connections=500' % (self.dir, self.port),
                 'start')

    def restart(self, down=0, mode='fast'):
        """A restart, the cluster away for `down` seconds; it comes back on the same socket.
        `fast`: sessions are ended, what was committed is kept; `immediate`: a crash (what
        was committed but not flushed may be lost, and crash recovery runs)."""
        self.run('pg_ctl', '-D', self.data, '-m', mode, '-w', 'stop')
        time.sleep(down)
        self.start()

    @staticmethod
    def find_binaries():
        import glob
        found = sorted(glob.glob('/usr/lib/postgresql/*/bin/initdb'))
        if not found:
            raise RuntimeError('PostgreSQL\'s server binaries are not installed (Debian: '
                               'apt-get install postgresql)')
        return os.path.dirname(found[-1])

    def run(self, tool, *args):
        subprocess.run(self.as_user + [os.path.join(self.bin, tool)] + list(args), check=True,
                       capture_output=True, cwd=self.dir, timeout=120)

    def dsn(self, name):
        return 'postgresql://p3s@/%s?host=%s&port=%d' % (name, self.dir, self.port)

    def new_database(self, name=None):
        """A new database, named for this test run unless `name` is given (a database of that
        name made earlier is dropped first)."""
        import psycopg
        self.count += 1
        name = name or 'p3s_%d_%d' % (os.getpid(), self.count)
        with psycopg.connect(self.dsn('postgres'), autocommit=True) as admin:
            admin.execute('DROP DATABASE IF EXISTS %s WITH (FORCE)' % name)
            admin.execute('CREATE DATABASE %s' % name)
        return self.dsn(name)

    def stop(self):
        import shutil
        try:
            self.run('pg_ctl', '-D', self.data, '-m', 'immediate', 'stop')
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)


_POSTGRES = []


def postgres():
    """The tests' PostgreSQL cluster, started at the first call; a test that needs it skips
    (loudly) where it cannot start, unless P3S_REQUIRE_POSTGRES is set (CI), which fails it."""
    if not _POSTGRES:
        try:
            import psycopg  # noqa: F401
            _POSTGRES.append(Postgres())
        except Exception as e:
            _POSTGRES.append(e)
    found = _POSTGRES[0]
    if isinstance(found, Exception):
        message = 'PostgreSQL cannot start here: %s' % found
        if os.environ.get('P3S_REQUIRE_POSTGRES'):
            pytest.fail(message)
        warnings.warn(message)
        pytest.skip(message)
    return found


def pytest_sessionfinish(session, exitstatus):
    if _POSTGRES and isinstance(_POSTGRES[0], Postgres):
        _POSTGRES[0].stop()


OPENED = []     # closed by the store fixture

# A step of EXPLAIN QUERY PLAN that reads a table. SQLite's wording moves between versions
# ('SCAN TABLE jobs' became 'SCAN jobs' in 3.36; 'COVERING INDEX', 'AS alias' come and go), so
# the plan checks read these fields rather than compare whole lines.
PLAN_STEP = re.compile(r'^(SCAN|SEARCH)(?: TABLE)? (\w+)(?: AS \w+)?'
                       r'(?: USING (?:COVERING )?INDEX (\w+))?(?: \((.*)\))?')


class PlanStep:
    def __init__(self, detail):
        self.detail = detail
        m = PLAN_STEP.match(detail)
        self.op, self.table, self.index, self.where = m.groups() if m else (None,) * 4
        self.sorts = 'TEMP B-TREE' in detail

    def reads(self, table, index=None, op=None):
        return (self.table == table and (index is None or self.index == index)
                and (op is None or self.op == op))

    def __repr__(self):
        return self.detail


def query_plan(db, sql, params=None):
    """The steps of a statement's query plan (PlanStep). The plans are SQLite's: on PostgreSQL
    the test is skipped (its planner picks its own; the benchmarks measure it)."""
    if not db.serial_writes:
        pytest.skip("this test checks SQLite's query plans")
    return [PlanStep(r[3]) for r in db.execute('EXPLAIN QUERY PLAN ' + sql, params or {})]


def full_scans(steps, tables=('jobs', 'pilots', 'workflows', 'data', 'joblogs')):
    """Steps that read a whole stored table: a scan with no index."""
    return [s for s in steps if s.op == 'SCAN' and s.table in tables and not s.index]


def monitor_get(path, status=200):
    """A page of the in-process app (monitor and API), checked for its status."""
    import p3s_server
    from synthetic import wsgi_get
    code, headers, body = wsgi_get(p3s_server.app, path)
    assert code == status, (path, code, body[:2000])
    return body


def runs_of(path):
    """How many times each job ran, from the file its payloads append their uuid to."""
    return collections.Counter(path.read_text().split()) if path.exists() else collections.Counter()


def make_job(payload, **fields):
    job = {'name': 'test', 'jobtype': 'test', 'payload': payload, 'timeout': '100',
           'priority': '0', 'state': 'defined', 'env': {}}
    job.update(fields)
    return job


def pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie is dead for our purposes
    try:
        with open('/proc/%d/stat' % pid) as f:
            return f.read().split(')')[-1].split()[0] != 'Z'
    except OSError:
        return False
    return True


class InProcessFront:
    """The server's front (p3s_server.Front) driven in this process on a store's database:
    requests run in greenlets the test spawns, wake-ups travel by the real datagram sockets."""

    def __init__(self, store, **front_options):
        import gevent
        import p3s_server
        self.wakeups = p3s_server.Wakeups(p3s_server.run_directory(store.path))
        store.wakeups = self.wakeups
        self.front = p3s_server.Front(p3s_server.app, **front_options)
        self.listening = gevent.spawn(self.front.listen, self.wakeups)
        self.store = store

    def request(self, method, path, body=None, token=None):
        """One request through the front: (status code, JSON reply)."""
        data = b'' if body is None else json.dumps(body).encode()
        environ = {'REQUEST_METHOD': method, 'PATH_INFO': path.split('?')[0],
                   'QUERY_STRING': path.partition('?')[2], 'CONTENT_LENGTH': str(len(data)),
                   'CONTENT_TYPE': 'application/json', 'wsgi.input': io.BytesIO(data),
                   'SERVER_NAME': '127.0.0.1', 'SERVER_PORT': '0', 'wsgi.url_scheme': 'http'}
        if token:
            environ['HTTP_AUTHORIZATION'] = 'Bearer ' + token
        started = []
        out = b''.join(self.front(environ, lambda status, headers: started.append(status)))
        return int(started[0].split()[0]), json.loads(out)

    def work(self, pilot_uuid, wait):
        return self.request('POST', '/api/pilots/%s/work' % pilot_uuid, {'wait': wait},
                            self.secret_of(pilot_uuid))[1]

    def secret_of(self, pilot_uuid):
        """These tests drive the front as any pilot they registered: each is given a secret the
        test knows (the one its registration answered is not kept)."""
        import p3s_server
        secret = 'test-secret-of-' + pilot_uuid
        with self.store.write() as db:
            db.execute('UPDATE pilots SET secret_hash = :hash WHERE uuid = :uuid',
                       {'hash': p3s_server.digest(secret), 'uuid': pilot_uuid})
        return secret

    def spawn_work(self, pilot_uuid, wait):
        import gevent
        return gevent.spawn(self.work, pilot_uuid, wait)

    def wait_until(self, predicate, timeout=10, what='condition'):
        """Let the greenlets run until predicate() holds."""
        import gevent
        give_up = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > give_up:
                pytest.fail('timed out waiting for %s' % what)
            gevent.sleep(0.01)

    def close(self):
        self.listening.kill()
        self.store.wakeups = None
        self.wakeups.close()


def wsgi_call(method, path, body=b'', token=None):
    """One request to the in-process app: (status code, headers, body text). `path` may carry
    a query string; it is percent-encoded as on the wire."""
    import p3s_server
    raw_path, _, query = path.partition('?')
    environ = {'REQUEST_METHOD': method,
               'PATH_INFO': urllib.parse.unquote_to_bytes(raw_path).decode('latin-1'),
               'QUERY_STRING': query, 'CONTENT_LENGTH': str(len(body or b'')),
               'CONTENT_TYPE': 'application/json', 'wsgi.input': io.BytesIO(body or b'')}
    if token:
        environ['HTTP_AUTHORIZATION'] = 'Bearer ' + token
    wsgiref.util.setup_testing_defaults(environ)
    got = {}

    def start_response(status, headers, exc_info=None):
        got['status'], got['headers'] = int(status.split()[0]), dict(headers)

    out = b''.join(p3s_server.app(environ, start_response))
    return got['status'], got['headers'], out.decode('utf-8', 'replace')
