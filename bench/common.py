"""Shared pieces of the p3s benchmarks: the machine, statistics, tables, a real server on a
free port with a temporary database (SQLite, or a database of a private PostgreSQL cluster),
direct database filling, and process clean-up.

Everything runs on 127.0.0.1. Every process a benchmark starts is registered here and killed
at exit, even when the benchmark fails half-way; the PostgreSQL cluster is stopped then too.
"""
import atexit
import glob
import http.client
import importlib.metadata
import json
import os
import platform
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import uuid as uuidlib
from datetime import datetime, timezone

BENCH = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(BENCH)
sys.path.insert(0, ROOT)

SERVER_START_TIMEOUT = 30
_children = []          # every Popen started by a benchmark
_tmpdirs = []
_rundirs = []


# ---------------------------------------------------------------------------------------------
# Machine and statistics
# ---------------------------------------------------------------------------------------------


def cpu_model():
    try:
        with open('/proc/cpuinfo') as f:
            for line in f:
                if line.startswith('model name'):
                    return line.split(':', 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or 'unknown'


def version(dist):
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return 'not installed'


TMPFS = '/dev/shm'


def tmpfs():
    """A tmpfs directory to put files on, or None."""
    try:
        with open('/proc/mounts') as f:
            mounts = {fields[1]: fields[2] for fields in (line.split() for line in f)}
    except OSError:
        return None
    return TMPFS if mounts.get(TMPFS) == 'tmpfs' and os.access(TMPFS, os.W_OK) else None


def file_creation_us(base, files=200):
    """The median time, in µs, to create an empty file in a new directory under `base`: what
    a pilot pays for each of a job's two logs. On some file systems it is the inode's
    allocation, and costs hundreds of µs."""
    directory = tempfile.mkdtemp(prefix='p3s-bench-files-', dir=base)
    times = []
    try:
        for i in range(files):
            path = os.path.join(directory, str(i))
            began = time.perf_counter()
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
            times.append(time.perf_counter() - began)
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    return statistics.median(times) * 1e6


def fdatasync_us(base, syncs=100):
    """The median time, in µs, of an fdatasync after a 4 kB write in `base`: what a durable
    commit waits for."""
    fd, path = tempfile.mkstemp(prefix='p3s-bench-sync-', dir=base)
    times = []
    try:
        for i in range(syncs):
            os.pwrite(fd, b'x' * 4096, (i % 16) * 4096)
            began = time.perf_counter()
            os.fdatasync(fd)
            times.append(time.perf_counter() - began)
    finally:
        os.close(fd)
        os.unlink(path)
    return statistics.median(times) * 1e6


def storage_line():
    """What the temporary directory's file system costs, and a tmpfs's."""
    base, memory = tempfile.gettempdir(), tmpfs()
    return 'in %s a new file %.0f µs and an fdatasync %.0f µs%s' % (
        base, file_creation_us(base), fdatasync_us(base),
        '; on tmpfs a new file %.0f µs' % file_creation_us(memory) if memory else '')


def machine():
    return {
        'nproc': os.cpu_count(),
        'cpu': cpu_model(),
        'python': platform.python_version(),
        'sqlite': sqlite3.sqlite_version,
        'bottle': version('bottle'),
        'gevent': version('gevent'),
        'psycopg': version('psycopg'),
        'loadavg': ' '.join('%.2f' % x for x in os.getloadavg()),
        'date': datetime.now().strftime('%Y-%m-%d %H:%M'),
        'storage': storage_line(),
    }


def machine_line(m=None):
    m = m or machine()
    return ('machine: nproc %(nproc)s, %(cpu)s; Python %(python)s, SQLite %(sqlite)s, '
            'bottle %(bottle)s, gevent %(gevent)s, psycopg %(psycopg)s; %(storage)s; load average '
            'at start %(loadavg)s; %(date)s' % m)


def percentile(values, q):
    """The q-th percentile (0-100) by nearest rank on the sorted values."""
    if not values:
        return float('nan')
    s = sorted(values)
    k = max(0, min(len(s) - 1, int(round(q / 100.0 * len(s) + 0.5)) - 1))
    return s[k]


def summary(values):
    """(median, min, max) of the per-run figures."""
    values = [v for v in values if v is not None]
    if not values:
        return None
    return statistics.median(values), min(values), max(values)


def fmt(x, digits=None):
    if x is None:
        return 'n/a'
    if isinstance(x, str):
        return x
    if digits is None:
        digits = 0 if abs(x) >= 100 else 1 if abs(x) >= 10 else 2
    return '{:,.{}f}'.format(x, digits)


def cell(values, digits=None):
    """'median [min–max]' of per-run figures."""
    s = summary(values)
    if s is None:
        return 'n/a'
    return '%s [%s–%s]' % (fmt(s[0], digits), fmt(s[1], digits), fmt(s[2], digits))


def table(title, columns, rows, note=''):
    """A markdown table with a title line; returned as text and printed by the caller."""
    lines = ['### ' + title, '']
    if note:
        lines += [note, '']
    lines.append('| ' + ' | '.join(columns) + ' |')
    lines.append('|' + '---|' * len(columns))
    for row in rows:
        lines.append('| ' + ' | '.join(str(c) for c in row) + ' |')
    return '\n'.join(lines) + '\n'


def ts(iso):
    """A stored timestamp as seconds since the epoch."""
    return datetime.fromisoformat(iso).timestamp()


def ms(seconds):
    return seconds * 1000.0


# ---------------------------------------------------------------------------------------------
# Processes
# ---------------------------------------------------------------------------------------------


def tmpdir(prefix='p3s-bench-', base=None):
    path = tempfile.mkdtemp(prefix=prefix, dir=base)
    _tmpdirs.append(path)
    return path


def spawn(args, **kw):
    """Popen that is remembered and killed at exit."""
    proc = subprocess.Popen(args, **kw)
    _children.append(proc)
    return proc


def stop(proc, sig=signal.SIGTERM, timeout=15):
    """Signal a process (unless sig is None), wait for it, SIGKILL it after the timeout."""
    if proc.poll() is None:
        try:
            if sig is not None:
                proc.send_signal(sig)
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    for stream in (proc.stdin, proc.stdout, proc.stderr):
        if stream:
            stream.close()
    if proc in _children:
        _children.remove(proc)


def stop_all(procs, timeout=15):
    """SIGTERM them all, then wait for each (SIGKILL after the timeout)."""
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    for proc in procs:
        stop(proc, sig=None, timeout=timeout)


def _terminated(signum, frame):
    sys.exit(128 + signum)           # so that cleanup() runs on SIGTERM too


signal.signal(signal.SIGTERM, _terminated)


@atexit.register
def cleanup():
    for proc in list(_children):
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        if proc in _children:
            _children.remove(proc)
    stop_postgres()                 # after its clients, before its directory goes
    for path in _tmpdirs:
        shutil.rmtree(path, ignore_errors=True)
    _tmpdirs.clear()
    _rundirs.clear()


def rss_mb(pid):
    """Resident set size from /proc/<pid>/status, in MB."""
    with open('/proc/%d/status' % pid) as f:
        for line in f:
            if line.startswith('VmRSS:'):
                return int(line.split()[1]) / 1024.0
    return None


def cpu_seconds(pid):
    """utime + stime of a process from /proc/<pid>/stat, in seconds."""
    with open('/proc/%d/stat' % pid) as f:
        fields = f.read().rsplit(')', 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf('SC_CLK_TCK')


def process_tree(pid):
    """A process and its descendants (a server of several workers is its supervisor and
    them)."""
    try:
        with open('/proc/%d/task/%d/children' % (pid, pid)) as f:
            children = [int(p) for p in f.read().split()]
    except OSError:
        return [pid]
    return [pid] + [p for child in children for p in process_tree(child)]


def server_cpu_seconds(pid):
    """CPU of a server: its process and its live workers."""
    total = 0.0
    for p in process_tree(pid):
        try:
            total += cpu_seconds(p)
        except OSError:
            pass                    # it ended between the listing and the reading
    return total


def server_rss_mb(pid):
    return sum(rss_mb(p) or 0 for p in process_tree(pid))


# ---------------------------------------------------------------------------------------------
# HTTP
# ---------------------------------------------------------------------------------------------


def request(port, method, path, body=None, timeout=60):
    """One request on a new connection with `Connection: close`, like the clients' urllib.
    Returns (status, decoded JSON or raw text)."""
    conn = http.client.HTTPConnection('127.0.0.1', port, timeout=timeout)
    try:
        data = None if body is None else json.dumps(body).encode()
        conn.request(method, path, body=data, headers={
            'Content-Type': 'application/json', 'Connection': 'close'})
        reply = conn.getresponse()
        raw = reply.read()
        if reply.getheader('Content-Type', '').startswith('application/json'):
            return reply.status, json.loads(raw or b'{}')
        return reply.status, raw.decode('utf-8', 'replace')
    finally:
        conn.close()


def api(port, method, path, body=None, timeout=60):
    status, reply = request(port, method, path, body, timeout)
    if status != 200:
        raise RuntimeError('%s %s: HTTP %d %s' % (method, path, status, reply))
    return reply


class KeepAlive:
    """One pilot's HTTP connection to the server, kept open between requests as p3s_pilot.py
    keeps it (a request on a connection the server has closed meanwhile goes again on a new
    one)."""

    def __init__(self, port):
        self.port = port
        self.conn = None
        self.secret = None

    def post(self, path, body, timeout=60):
        headers = {'Content-Type': 'application/json', 'Accept': 'application/json'}
        if self.secret:
            headers['Authorization'] = 'Bearer ' + self.secret
        data = json.dumps(body).encode()
        for attempt in (1, 2):
            if self.conn is None:
                self.conn = http.client.HTTPConnection('127.0.0.1', self.port, timeout=timeout)
            try:
                self.conn.timeout = timeout
                if self.conn.sock is not None:
                    self.conn.sock.settimeout(timeout)
                self.conn.request('POST', path, data, headers)
                reply = self.conn.getresponse()
                raw = reply.read()
            except (OSError, http.client.HTTPException):
                self.conn.close()
                self.conn = None
                if attempt == 2:
                    raise
                continue
            if reply.will_close:
                self.conn.close()
                self.conn = None
            if reply.status != 200:
                raise RuntimeError('POST %s: HTTP %d %s' % (path, reply.status, raw[:200]))
            return json.loads(raw)

    def close(self):
        if self.conn is not None:
            self.conn.close()
            self.conn = None


def wait_for(predicate, timeout, what, interval=0.05):
    give_up = time.monotonic() + timeout
    while time.monotonic() < give_up:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise RuntimeError('timed out after %.0f s waiting for %s' % (timeout, what))


# ---------------------------------------------------------------------------------------------
# The server
# ---------------------------------------------------------------------------------------------


def run_directories():
    """Where the benchmark's servers keep their run directories (one per database: wake-up
    sockets, locks), removed with the benchmark's other temporary directories. Short, since
    sockets are made there."""
    if not _rundirs:
        _rundirs.append(tmpdir(prefix='p3s-bench-run-', base='/tmp'))
    return _rundirs[0]


def store(db, sync):
    """An in-process Store, whose run directory goes where the benchmark's servers make theirs
    (removed with the benchmark's other temporary directories), not in /tmp."""
    import p3s_server
    saved = os.environ.get('TMPDIR')
    os.environ['TMPDIR'] = run_directories()
    try:
        return p3s_server.Store(db, sync)
    finally:
        if saved is None:
            os.environ.pop('TMPDIR', None)
        else:
            os.environ['TMPDIR'] = saved


class Server:
    """p3s_server.py on a free port of 127.0.0.1 with its own database file."""

    def __init__(self, db=None, args=(), rundir=None):
        self.dir = tmpdir()
        self.rundir = rundir         # TMPDIR, where its run directory goes: another host's
        self.db = db or os.path.join(self.dir, 'p3s.db')
        # P3S_BENCH_SERVER_ARGS: extra server options for experiments (e.g. '--threads 8').
        self.args = list(args) + os.environ.get('P3S_BENCH_SERVER_ARGS', '').split()
        self.proc = None
        self.port = None
        self.pilots = []             # stopped, while the server is still up, by stop()

    def start(self):
        self.log = open(os.path.join(self.dir, 'server.log'), 'ab')
        self.proc = spawn([sys.executable, os.path.join(ROOT, 'p3s_server.py'), '--port', '0',
                           '--db', self.db] + self.args,
                          stdout=subprocess.PIPE, stderr=self.log, cwd=self.dir,
                          env=dict(os.environ, TMPDIR=self.rundir or run_directories()))
        line = self.proc.stdout.readline().decode()
        if 'listening on' not in line:
            self.stop()
            raise RuntimeError('server did not start: %r' % line)
        url = line.split('listening on ')[1].split()[0]
        self.port = int(url.rstrip('/').rsplit(':', 1)[1])
        self.url = 'http://127.0.0.1:%d/' % self.port
        return self

    @property
    def pid(self):
        return self.proc.pid

    def stop(self):
        stop_all(self.pilots)
        self.pilots.clear()
        if self.proc:
            stop(self.proc)
        self.log.close()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    def api(self, method, path, body=None, timeout=60):
        return api(self.port, method, path, body, timeout)

    def jobs(self, **query):
        query.setdefault('limit', 100000)
        qs = '&'.join('%s=%s' % kv for kv in query.items())
        return self.api('GET', '/api/jobs?' + qs)['jobs']

    def has_route(self, path):
        return request(self.port, 'GET', path)[0] != 404


def pilot_command(server_url, *args):
    """The real pilot, as a user starts it (P3S_BENCH_PILOT: another pilot file, for A/B
    comparisons)."""
    path = os.environ.get('P3S_BENCH_PILOT') or os.path.join(ROOT, 'p3s_pilot.py')
    return [sys.executable, path, '--server', server_url] + list(args)


def start_pilots(server, n, *args, workdir=None):
    workdir = workdir or tmpdir()
    env = dict(os.environ, P3S_JOBLOG=os.path.join(workdir, 'jobs'),
               P3S_PILOTLOG=os.path.join(workdir, 'pilots'))
    env.pop('P3S_TOKEN', None)
    pilots = [spawn(pilot_command(server.url, *args), env=env, cwd=workdir,
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for _ in range(n)]
    server.pilots.extend(pilots)
    return pilots


def idle_pilots(server, n):
    """How many pilots wait in a long poll (state idle)."""
    return len(server.api('GET', '/api/pilots?state=idle&limit=100000')['pilots']) >= n


def workflows_available():
    """Whether the server has /api/dags and the workflow client exists."""
    try:
        with open(os.path.join(ROOT, 'p3s_server.py')) as f:
            routes = "'/api/dags'" in f.read()
    except OSError:
        return False
    return routes and os.path.exists(os.path.join(ROOT, 'p3s_workflow.py'))


# ---------------------------------------------------------------------------------------------
# PostgreSQL: a private cluster, started and stopped by the benchmark
# ---------------------------------------------------------------------------------------------

PG_PORT = 5432                   # the socket's name only: the cluster listens on no TCP port
PG_MAX_CONNECTIONS = 300         # 64 claiming processes, servers' pools, the benchmark's own
PG_SHOWN = ('fsync', 'synchronous_commit', 'full_page_writes', 'wal_sync_method',
            'shared_buffers', 'max_wal_size', 'max_connections', 'autovacuum',
            'autovacuum_naptime', 'autovacuum_vacuum_scale_factor',
            'autovacuum_vacuum_cost_delay')
_postgres = []                   # the cluster, or why it cannot start


class Unavailable(Exception):
    """PostgreSQL cannot be measured here (no server binaries, no psycopg, no start)."""


class Postgres:
    """A private PostgreSQL cluster: initdb and pg_ctl of Debian's `postgresql` package in a
    temporary directory, a Unix socket only, as the `postgres` user when the benchmark runs
    as root (PostgreSQL refuses root). Unlike the tests' cluster, durability is left as
    PostgreSQL ships it (fsync on, synchronous_commit on, full_page_writes on), so that the
    figures are honest; `settings()` says what was in force."""

    def __init__(self):
        try:
            import psycopg  # noqa: F401
        except ImportError:
            raise Unavailable('psycopg is not installed (pip install "psycopg[binary]")')
        found = sorted(glob.glob('/usr/lib/postgresql/*/bin/initdb'))
        if not found:
            raise Unavailable('PostgreSQL\'s server binaries are not installed (Debian: '
                              'apt-get install postgresql)')
        self.bin = os.path.dirname(found[-1])
        self.dir = tmpdir('p3s-bench-pg-')
        self.data = os.path.join(self.dir, 'data')
        self.log = os.path.join(self.dir, 'log')
        self.count = 0
        self.as_user = ['runuser', '-u', 'postgres', '--'] if os.getuid() == 0 else []
        if self.as_user:
            shutil.chown(self.dir, 'postgres')
        # --no-sync: initdb does not flush the files it writes (a bench cluster is thrown
        # away); the server itself runs with PostgreSQL's durable defaults.
        self.run('initdb', '-D', self.data, '-A', 'trust', '-U', 'p3s', '--no-sync', '-E',
                 'UTF8', '--locale=C')
        self.run('pg_ctl', '-D', self.data, '-l', self.log, '-w', '-o',
                 '-c listen_addresses= -k %s -p %d -c max_connections=%d'
                 % (self.dir, PG_PORT, PG_MAX_CONNECTIONS), 'start')
        self.started = True

    def run(self, tool, *args):
        try:
            subprocess.run(self.as_user + [os.path.join(self.bin, tool)] + list(args),
                           check=True, capture_output=True, cwd=self.dir, timeout=120)
        except (OSError, subprocess.SubprocessError) as e:
            why = getattr(e, 'stderr', None) or b''
            raise Unavailable('%s failed: %s %s' % (tool, e, why.decode(errors='replace')
                                                    .strip()[-300:]))

    def dsn(self, name):
        return 'postgresql://p3s@/%s?host=%s&port=%d' % (name, self.dir, PG_PORT)

    def admin(self):
        import psycopg
        return psycopg.connect(self.dsn('postgres'), autocommit=True)

    def new_database(self, template=None):
        """A new, empty database (or a copy of `template`, a database's name); its URL."""
        self.count += 1
        name = 'bench_%d' % self.count
        sql = 'CREATE DATABASE %s' % name + (' TEMPLATE %s' % template if template else '')
        with self.admin() as admin:
            for attempt in range(40):
                try:
                    admin.execute(sql)
                    break
                except Exception as e:
                    # autovacuum may be in the template just now: ask again
                    if not template or 'being accessed' not in str(e) or attempt == 39:
                        raise
                    time.sleep(0.25)
        return self.dsn(name)

    def drop_database(self, dsn):
        name = dsn.split('@/', 1)[1].split('?', 1)[0]
        with self.admin() as admin:
            admin.execute('DROP DATABASE IF EXISTS %s WITH (FORCE)' % name)

    def pid(self):
        """The postmaster's process id (its backends are its children)."""
        with open(os.path.join(self.data, 'postmaster.pid')) as f:
            return int(f.readline())

    def settings(self):
        """The settings in force, as one line for a table's note."""
        with self.admin() as admin:
            version = admin.execute('SHOW server_version').fetchone()[0].split()[0]
            got = dict(admin.execute('SELECT name, current_setting(name) FROM pg_settings '
                                     'WHERE name = ANY(%s)', [list(PG_SHOWN)]).fetchall())
        return ('PostgreSQL %s, a private cluster started by the benchmark (Unix socket, data on '
                '%s): %s' % (version, fs_type(self.dir),
                             ', '.join('%s %s' % (k, got.get(k, '?')) for k in PG_SHOWN)))

    def stop(self):
        if self.started:
            self.started = False
            try:
                self.run('pg_ctl', '-D', self.data, '-m', 'fast', '-w', 'stop')
            except Unavailable as e:
                print('could not stop the benchmark\'s PostgreSQL: %s' % e, file=sys.stderr)


def postgres():
    """The benchmark's PostgreSQL cluster, started at the first call; raises Unavailable."""
    if not _postgres:
        try:
            _postgres.append(Postgres())
        except Unavailable as e:
            _postgres.append(e)
    if isinstance(_postgres[0], Unavailable):
        raise _postgres[0]
    return _postgres[0]


def stop_postgres():
    while _postgres:
        found = _postgres.pop()
        if isinstance(found, Postgres):
            found.stop()


def postgres_missing():
    """Why PostgreSQL cannot be measured here (starting the cluster if need be), or None."""
    try:
        postgres()
    except Unavailable as e:
        return str(e)
    return None


def skipped(title, why):
    """What a PostgreSQL benchmark returns when it cannot run: said loudly, figures left out."""
    print('*** SKIPPED: %s: %s' % (title, why), file=sys.stderr, flush=True)
    return {'tables': ['### %s\n\n**skipped: %s**\n' % (title, why)],
            'figures': {'skipped': why}}


def new_database(backend):
    """A --db for a server of this backend: None (the Server's own SQLite file) or a new
    database of the PostgreSQL cluster."""
    if backend == 'postgresql':
        return postgres().new_database()
    if backend != 'sqlite':
        raise ValueError('unknown database backend %r' % backend)
    return None


def fs_type(path):
    """The file system type of the mount that holds path (e.g. ext4, tmpfs)."""
    best, kind = '', '?'
    try:
        with open('/proc/mounts') as f:
            for line in f:
                fields = line.split()
                mount = fields[1]
                if (path == mount or path.startswith(mount.rstrip('/') + '/')) and \
                        len(mount) > len(best):
                    best, kind = mount, fields[2]
    except OSError:
        pass
    return kind


# ---------------------------------------------------------------------------------------------
# Filling a database directly (for sizes the API would take minutes to reach)
# ---------------------------------------------------------------------------------------------

FILL_JOB = """
INSERT INTO jobs (uuid, name, jobtype, payload, state, pilot, created_at, defined_at,
                  dispatched_at, started_at, stopped_at, errcode)
VALUES (?, 'bench', 'default', '/bin/true', ?, ?, ?, ?, ?, ?, ?, ?)
"""
# The same rows made by PostgreSQL itself (psycopg's parameters; times as iso() writes them).
PG_TIME = ("to_char(to_timestamp(%s) AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US')"
           " || '+00:00'")
PG_FILL_JOB = """
INSERT INTO jobs (uuid, name, jobtype, payload, state, pilot, created_at, defined_at,
                  dispatched_at, started_at, stopped_at, errcode)
SELECT CAST(gen_random_uuid() AS text), 'bench', 'default', '/bin/true', %(state)s, %(pilot)s,
       a, a, CASE WHEN %(done)s THEN a END, CASE WHEN %(done)s THEN a END,
       CASE WHEN %(done)s THEN b END, CASE WHEN %(done)s THEN 0 END
  FROM (SELECT i, """ + PG_TIME % "t - CASE WHEN %(done)s THEN 1 ELSE 0 END" + """ AS a,
               """ + PG_TIME % 't' + """ AS b
          FROM (SELECT i, %(now)s - %(spread)s * i / %(n)s AS t
                  FROM generate_series(%(first)s, %(last)s) AS i) AS times) AS rows
 ORDER BY i
"""


def fill_jobs(db, n, state='defined', spread=0.0, chunk=100000):
    """Add n jobs in `state` (defined or finished) directly, schema applied first: an SQLite
    file with executemany, a PostgreSQL database (a URL) by one INSERT ... SELECT per chunk,
    then ANALYZE (as autovacuum would within a minute).

    spread: seconds over which the jobs' times are spread back from now (0: all now). A
    finished job takes 1 s from definition to its end.
    """
    import p3s_server
    database = p3s_server.database(db)
    conn = database.connect()
    database.apply_schema(conn)
    now = datetime.now(timezone.utc).timestamp()
    done = state != 'defined'
    if p3s_server.is_postgres(db):
        try:
            for first in range(0, n, chunk):
                conn.raw.execute(PG_FILL_JOB, {
                    'state': state, 'pilot': 'bench-pilot' if done else None, 'done': done,
                    'now': now, 'spread': float(spread), 'n': n, 'first': first,
                    'last': min(n, first + chunk) - 1})
            conn.raw.execute('ANALYZE jobs')
        finally:
            conn.close()
        return
    conn.execute('PRAGMA synchronous = OFF')

    def row(i):
        t = now - spread * i / n if spread else now
        a = iso(t - 1 if done else t)
        b = iso(t) if done else None
        return (str(uuidlib.uuid4()), state, 'bench-pilot' if done else None, a, a, b and a,
                b and a, b, 0 if done else None)
    i = 0
    while i < n:
        k = min(chunk, n - i)
        conn.execute('BEGIN IMMEDIATE')
        conn.executemany(FILL_JOB, (row(j) for j in range(i, i + k)))
        conn.execute('COMMIT')
        i += k
    conn.execute('PRAGMA wal_checkpoint(TRUNCATE)')
    conn.close()


def iso(t):
    """Seconds since the epoch as the server stores times."""
    return datetime.fromtimestamp(t, timezone.utc).isoformat(timespec='microseconds')
