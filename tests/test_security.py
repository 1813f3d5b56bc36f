"""Security and supervision: bad input that once broke the server, secrets that stay secret,
pilots that prove who they are, payloads that never outlive their pilot or their job, and
storage trouble answered 503."""
import hashlib
import json
import os
import sqlite3
import subprocess
import sys

import pytest

import p3s_server as srv
from conftest import ROOT, Clients, Server, make_job, wait_for, wsgi_call
from test_fuzz import snapshot, world

UUID = '0f0c2f2e-0000-4000-8000-000000000009'


def run_server_command(*args):
    return subprocess.run([sys.executable, os.path.join(ROOT, 'p3s_server.py')] + list(args),
                          capture_output=True, text=True, timeout=60)


# -- input that reached a 500 --------------------------------------------------------------------

LISTINGS = ['/monitor/%s' % name for name in ('jobs', 'pilots', 'workflows', 'dags', 'data',
                                              'datatypes', 'sites', 'services')]
BAD_INPUT = [
    ('POST', '/api/jobs', b'[{"payload": "\\ud800"}]', 'surrogate'),
    ('POST', '/api/jobs', b'[{"payload": "x", "name": "a\\udfffb"}]', 'surrogate'),
    ('POST', '/api/jobs', b'[{"payload": "x", "env": {"A": "\\udc00"}}]', 'surrogate'),
    ('POST', '/api/jobs', '[{"payload": "\ud800"}]'.encode('utf-8', 'surrogatepass'), 'surrogate'),
    ('POST', '/api/jobs', b'[' * 100000 + b']' * 100000, 'nested too deeply'),
    ('POST', '/api/sites', b'{"name": ' * 100000, 'not valid JSON'),
    ('POST', '/api/data/inject', {'files': [{'path': '/d/f'}], 'dag': 5}, 'dag must be a string'),
    ('POST', '/api/data/inject', {'files': [{'path': '/d/f'}], 'dag': ['x']}, 'dag must be'),
    ('POST', '/api/data/inject', {'files': [{'path': '/d/f'}],
                                  'jobs': [{'payload': 'x', 'env': '12'}]}, 'env must be'),
    ('POST', '/api/data/inject', {'files': [{'path': '/d/f'}],
                                  'jobs': [{'payload': 'x', 'env': ['ab']}]}, 'env must be'),
    ('POST', '/api/workflows', {'dag': 'g', 'jobinfo': {'a': {'env': None}}}, 'env is null'),
    ('POST', '/api/workflows', {'dag': 'g', 'jobinfo': {'a': {'payload': None}}}, 'payload is null'),
    ('POST', '/api/workflows', {'dag': 'g', 'fileinfo': {'a:b': {'name': 'n', 'dirpath': None}}},
     'dirpath is null'),
    ('POST', '/api/jobs', [{'payload': 'x', 'uuid': UUID + '\n'}], 'uuid'),
    ('POST', '/api/jobs/retry', {'uuids': [UUID + '\n']}, 'uuid'),
] + [('GET', path + '?page=99999999999999999999', None, 'page must be') for path in LISTINGS]


@pytest.mark.parametrize('method,path,body,message', BAD_INPUT)
def test_input_that_once_broke_the_server_is_a_4xx_and_stores_nothing(store, method, path, body,
                                                                      message):
    world(store)
    before = snapshot(store)
    raw = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    status, headers, reply = wsgi_call(method, path, raw)
    assert 400 <= status < 500 and message in reply, (status, reply[:300])
    if path.startswith('/api'):
        assert '\n' not in json.loads(reply)['error']
    assert snapshot(store) == before


def test_a_uuid_with_a_trailing_newline_names_nothing(store):
    names, _ = world(store)
    job = names['job_uuid']
    status, _, reply = wsgi_call('GET', '/api/jobs/%s%%0A' % job)
    assert status == 404 and json.loads(reply)['error'] == 'no such job: %s\\n' % job
    status, _, _ = wsgi_call('GET', '/api/jobs/%s' % job)
    assert status == 200


def test_an_error_page_is_never_sniffed_as_html(store):
    """A 404 echoes the path it was asked for: the browser is told not to guess its type."""
    for path in ('/api/<script>alert(1)</script>', '/nowhere/<b>', '/static/none.html',
                 '/api/jobs/<i>'):
        status, headers, reply = wsgi_call('GET', path)
        assert status == 404 and headers['Content-Type'] == 'application/json', reply
        assert headers['X-Content-Type-Options'] == 'nosniff'
    status, headers, _ = wsgi_call('GET', '/monitor/jobs')
    assert status == 200 and headers['X-Content-Type-Options'] == 'nosniff'


@pytest.mark.parametrize('older', ['nan', 'inf', '1e400', '-1', '-inf', 'soon'])
def test_purge_refuses_an_age_that_is_no_duration(tmp_path, older):
    proc = run_server_command('purge', '--older=' + older, '--db', str(tmp_path / 'p3s.db'))
    assert proc.returncode == 2 and proc.stderr.splitlines()[-1].startswith(
        'p3s_server.py purge: error: argument --older: not a duration'), proc.stderr
    assert 'Traceback' not in proc.stderr and not (tmp_path / 'p3s.db').exists()


@pytest.mark.parametrize('flags', [['--pilot-timeout', 'nan'], ['--pilot-timeout', 'inf'],
                                   ['--pilot-timeout', '0'], ['--keep-days', 'nan']])
def test_the_server_refuses_timeouts_that_are_no_numbers(tmp_path, flags):
    proc = run_server_command('--port', '0', '--db', str(tmp_path / 'p3s.db'), *flags)
    assert proc.returncode == 2 and 'must be a positive number' in proc.stderr, proc.stderr


def test_a_foreign_database_is_never_written(tmp_path):
    """check, purge and the server itself refuse a file that is not p3s's, and leave it as it
    was, byte for byte."""
    foreign = tmp_path / 'other.db'
    db = sqlite3.connect(str(foreign))
    db.execute('CREATE TABLE accounts (name TEXT)')
    db.execute("INSERT INTO accounts VALUES ('alice')")
    db.commit()
    db.close()
    garbage = tmp_path / 'garbage.db'
    garbage.write_bytes(b'not a database at all\n' * 100)
    digest = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in (foreign, garbage)}
    for path, why in ((foreign, 'is not a p3s database'), (garbage, 'is not an SQLite database')):
        for args in (['check'], ['purge', '--older', '1d'], ['--port', '0']):
            proc = run_server_command(*args, '--db', str(path))
            assert proc.returncode == 1 and why in proc.stderr, (args, proc.stderr)
            assert proc.stderr.count('\n') == 1 and 'p3s_server: error: ' in proc.stderr
        assert hashlib.sha256(path.read_bytes()).hexdigest() == digest[path]
        assert sorted(os.listdir(tmp_path)) == ['garbage.db', 'other.db']
    missing = run_server_command('purge', '--older', '1d', '--db', str(tmp_path / 'none.db'))
    assert missing.returncode == 1 and 'no database' in missing.stderr
    assert not (tmp_path / 'none.db').exists()


# -- storage trouble: 503 with Retry-After, never a 500, nothing half-written --------------------

# Another process that holds the database's write lock until it reads a line.
HOLD_WRITE_LOCK = """
import sqlite3, sys
db = sqlite3.connect(sys.argv[1], isolation_level=None)
db.execute('BEGIN IMMEDIATE')
print('locked', flush=True)
sys.stdin.readline()
db.execute('ROLLBACK')
"""


def storage_refusal(status, headers, reply, reason):
    assert status == 503 and headers.get('Retry-After') == str(srv.STORAGE_RETRY_AFTER), reply
    error = json.loads(reply)['error']
    assert reason in error and 'nothing was changed' in error and '\n' not in error, error


def submit_over_http(server, jobs, results, timeout=60):
    import urllib.error
    import urllib.request
    req = urllib.request.Request(server.url + 'api/jobs', data=json.dumps(jobs).encode(),
                                 headers={'Content-Type': 'application/json'}, method='POST')
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            results.append((r.status, dict(r.headers), r.read().decode()))
    except urllib.error.HTTPError as e:
        results.append((e.code, dict(e.headers), e.read().decode()))


def test_a_database_locked_by_another_process(tmp_path):
    """Writers answer 503 with Retry-After (never 500) while another process holds the write
    lock, each within a client's own timeout: they do not queue behind one another, each
    waiting out the busy timeout. Ping, static files and pages that only read are answered
    while a submission still waits for the lock. A client asks again after the 503 and gets
    through once the lock is free. Nothing is half-written."""
    import threading
    import urllib.request
    import p3s_job
    server = Server(tmp_path, extra_args=['--workers', '1']).start()
    clients = Clients(tmp_path, server)
    [job] = server.api('POST', '/api/jobs', [{'payload': '/bin/true'}])[1]['uuids']
    holder = subprocess.Popen([sys.executable, '-c', HOLD_WRITE_LOCK, server.db],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == 'locked\n'
        results = []
        writers = [threading.Thread(target=submit_over_http,
                                    args=(server, [{'payload': '/bin/true'}], results,
                                          p3s_job.HTTP_TIMEOUT))
                   for _ in range(4)]
        for w in writers:
            w.start()
        refusals = lambda: server.log_path.read_text().count('POST /api/jobs answered 503')
        wait_for(lambda: refusals() >= 1, what='a writer refused while another waits')
        assert any(w.is_alive() for w in writers)
        # A submission still waits for the lock, and these are answered all the same.
        assert server.api('GET', '/api/ping')[0] == 200
        with urllib.request.urlopen(server.url + 'static/p3s.css', timeout=30) as r:
            assert r.status == 200
        with urllib.request.urlopen(server.url + 'monitor/jobs', timeout=30) as r:
            assert r.status == 200
        assert [j['uuid'] for j in server.jobs()] == [job]
        assert any(w.is_alive() for w in writers)
        for w in writers:
            w.join(60)
        assert len(results) == 4
        for status, headers, reply in results:
            storage_refusal(status, headers, reply, 'locked by another process')
        client = subprocess.Popen([sys.executable, '-S', os.path.join(ROOT, 'p3s_job.py'), '-a',
                                   '-u', job, '-P', '7'], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True, env=clients.env())
        refused = lambda: server.log_path.read_text().count('/adjust answered 503')
        wait_for(lambda: refused() >= 1, what="the client's change refused")
        assert client.poll() is None                   # it waits to ask again
        holder.communicate('go\n', timeout=30)
        out, err = client.communicate(timeout=60)
        assert client.returncode == 0, err
        assert [(j['uuid'], j['priority']) for j in server.jobs()] == [(job, 7)]
        check = run_server_command('check', '--db', server.db)
        assert 'integrity: ok' in check.stdout
    finally:
        if holder.poll() is None:
            holder.kill()
        holder.communicate()
        server.stop()


@pytest.mark.parametrize('pragma,reason', [('query_only = 1', 'read-only'),
                                           ('max_page_count = %d', 'the disk is full')])
def test_a_read_only_or_full_database_answers_503(store, pragma, reason):
    world(store)
    before = snapshot(store)
    pages = store.one('PRAGMA page_count')[0]
    jobs = json.dumps([{'payload': 'x' * 4000}] * 2000).encode()
    for db in store.opened:
        db.execute('PRAGMA ' + (pragma % pages if '%' in pragma else pragma))
    status, headers, reply = wsgi_call('POST', '/api/jobs', jobs)
    storage_refusal(status, headers, reply, reason)
    assert wsgi_call('GET', '/api/jobs')[0] == 200                 # reads go on
    for db in store.opened:
        db.execute('PRAGMA query_only = 0')
        db.execute('PRAGMA max_page_count = 1073741823')
    assert snapshot(store) == before
    assert wsgi_call('POST', '/api/jobs', jobs)[0] == 200


def limit_file_size(size):
    """For a child process: writing a file beyond `size` bytes fails (EFBIG), as a failing disk
    would: SQLite reports a disk I/O error."""
    def limit():
        import resource
        import signal
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (size, size))
    return limit


def test_a_disk_that_fails_writes_answers_503(tmp_path):
    """A write that fails in the middle of a transaction, and one that fails at its commit:
    each is a 503, and what was acknowledged before is all there is."""
    server = Server(tmp_path, extra_args=['--workers', '1'],
                    preexec_fn=limit_file_size(2 * 1024 * 1024)).start()
    try:
        results = []
        submit_over_http(server, [{'payload': 'x' * 4000}] * 2000, results)
        storage_refusal(*results[0], 'a disk I/O error')
        assert server.jobs() == []
        stored = []
        for _ in range(40):                     # batches small enough to fail at their commit
            status, reply = server.api('POST', '/api/jobs', [{'payload': 'y' * 1000}] * 300)
            if status != 200:
                assert status == 503 and 'a disk I/O error' in reply['error'], reply
                break
            stored += reply['uuids']
        assert status == 503 and stored
        assert sorted(j['uuid'] for j in server.jobs()) == sorted(stored)
    finally:
        server.stop()
    assert 'integrity: ok' in run_server_command('check', '--db', server.db).stdout


def test_storage_errors_are_told_from_bugs(tmp_path):
    """Real errors of SQLite: those of the storage are a 503's reasons, any other is a bug."""
    garbage = tmp_path / 'garbage.db'
    garbage.write_bytes(b'x' * 4096)
    with pytest.raises(sqlite3.DatabaseError) as not_a_database:
        sqlite3.connect(str(garbage)).execute('SELECT * FROM sqlite_master')
    assert srv.storage_trouble(not_a_database.value) == 'its file is not a database'
    db = sqlite3.connect(':memory:')
    with pytest.raises(sqlite3.OperationalError) as no_table:
        db.execute('SELECT * FROM nothing')
    assert srv.storage_trouble(no_table.value) is None
    # The same errors told by their messages, as a Python before 3.11 reports them.
    assert srv.storage_trouble(sqlite3.OperationalError('database is locked')) == \
        'it is locked by another process'
    assert srv.storage_trouble(sqlite3.OperationalError('disk I/O error')) == 'a disk I/O error'
    assert srv.storage_trouble(sqlite3.OperationalError('no such table: nothing')) is None
