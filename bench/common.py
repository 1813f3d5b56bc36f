"""Shared pieces of the p3s benchmarks: the machine, statistics, tables, a real server on a
free port with a temporary database, direct database filling, and process clean-up.

Everything runs on 127.0.0.1. Every process a benchmark starts is registered here and killed
at exit, even when the benchmark fails half-way.
"""
import atexit
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


def machine():
    return {
        'nproc': os.cpu_count(),
        'cpu': cpu_model(),
        'python': platform.python_version(),
        'sqlite': sqlite3.sqlite_version,
        'bottle': version('bottle'),
        'gevent': version('gevent'),
        'loadavg': ' '.join('%.2f' % x for x in os.getloadavg()),
        'date': datetime.now().strftime('%Y-%m-%d %H:%M'),
    }


def machine_line(m=None):
    m = m or machine()
    return ('machine: nproc %(nproc)s, %(cpu)s; Python %(python)s, SQLite %(sqlite)s, '
            'bottle %(bottle)s, gevent %(gevent)s; load average at start %(loadavg)s; '
            '%(date)s' % m)


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
    for path in _tmpdirs:
        shutil.rmtree(path, ignore_errors=True)
    _tmpdirs.clear()


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


class Server:
    """p3s_server.py on a free port of 127.0.0.1 with its own database file."""

    def __init__(self, db=None, args=()):
        self.dir = tmpdir()
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
                          stdout=subprocess.PIPE, stderr=self.log, cwd=self.dir)
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
# Filling a database directly (for sizes the API would take minutes to reach)
# ---------------------------------------------------------------------------------------------

FILL_JOB = """
INSERT INTO jobs (uuid, name, jobtype, payload, state, pilot, created_at, defined_at,
                  dispatched_at, started_at, stopped_at, errcode)
VALUES (?, 'bench', 'default', '/bin/true', ?, ?, ?, ?, ?, ?, ?, ?)
"""


def fill_jobs(path, n, state='defined', spread=0.0, chunk=100000):
    """Add n jobs in `state` (defined or finished) with executemany, schema applied first.

    spread: seconds over which the jobs' times are spread back from now (0: all now). A
    finished job takes 1 s from definition to its end.
    """
    import p3s_server
    db = p3s_server.connect(path, 'normal')
    p3s_server.apply_schema(db)
    db.execute('PRAGMA synchronous = OFF')
    now = datetime.now(timezone.utc).timestamp()
    done = state != 'defined'

    def row(i):
        t = now - spread * i / n if spread else now
        a = iso(t - 1 if done else t)
        b = iso(t) if done else None
        return (str(uuidlib.uuid4()), state, 'bench-pilot' if done else None, a, a, b and a,
                b and a, b, 0 if done else None)
    i = 0
    while i < n:
        k = min(chunk, n - i)
        db.execute('BEGIN IMMEDIATE')
        db.executemany(FILL_JOB, (row(j) for j in range(i, i + k)))
        db.execute('COMMIT')
        i += k
    db.execute('PRAGMA wal_checkpoint(TRUNCATE)')
    db.close()


def iso(t):
    """Seconds since the epoch as the server stores times."""
    return datetime.fromtimestamp(t, timezone.utc).isoformat(timespec='microseconds')
