"""Security and supervision: bad input that once broke the server, secrets that stay secret,
pilots that prove who they are, payloads that never outlive their pilot or their job, and
storage trouble answered 503."""
import hashlib
import json
import os
import re
import signal
import sqlite3
import subprocess
import sys

import pytest

import p3s_server as srv
from conftest import (ROOT, Clients, Server, database_connection, make_job, pid_alive,
                      sqlite_only, wait_for, wsgi_call)
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
    ('POST', '/api/workflows', {'dag': 'g', 'jobinfo': {'a': {'payload': None}}},
     'payload is null'),
    ('POST', '/api/workflows', {'dag': 'g', 'fileinfo': {'a:b': {'name': 'n', 'dirpath': None}}},
     'dirpath is null'),
    ('POST', '/api/jobs', [{'payload': 'x', 'uuid': UUID + '\n'}], 'uuid'),
    ('POST', '/api/jobs/retry', {'uuids': [UUID + '\n']}, 'uuid'),
    # PostgreSQL cannot store a NUL character: refused on either database, wherever it comes
    ('POST', '/api/jobs', b'[{"payload": "a\\u0000b"}]', 'NUL character'),
    ('POST', '/api/sites', {'name': 'x', 'env': {'A': '\x00'}}, 'NUL character'),
    ('GET', '/api/dags/a%00b', None, 'NUL character'),
    ('GET', '/monitor/batchjobs?site=%00', None, 'NUL character'),
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


@sqlite_only
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

        def refusals(of):
            return server.log_path.read_text().count('%s answered 503' % of)
        wait_for(lambda: refusals('POST /api/jobs') >= 1,
                 what='a writer refused while another waits')
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
        wait_for(lambda: refusals('/adjust') >= 1, what="the client's change refused")
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


@sqlite_only
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


@sqlite_only
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


# -- pilots are who they say ----------------------------------------------------------------------

def registered(store, **fields):
    reg = srv.register_pilot(store, dict({'host': 'h'}, **fields), srv.utcnow())
    return reg['uuid'], reg['secret']


@pytest.fixture
def guarded(tmp_path):
    """An in-process server with an admin token and a pilot token, two pilots A and B, and B
    holding a job: (store, names for the routes' wildcards, A's uuid and secret)."""
    st = srv.configure(str(tmp_path / 'p3s.db'), sync='normal', token='admin-token',
                       pilot_token='pilot-token')
    names, _ = world(st)                        # its pilot (B) holds its job
    a = registered(st)
    yield st, names, a
    st.close()
    srv.configure(str(tmp_path / 'open.db')).close()        # no tokens for the tests after


def state_changing_routes():
    return [(r.method, r.rule) for r in srv.app.routes if r.method not in ('GET', 'HEAD')]


def fill(rule, names):
    return '/'.join(names.get(part[1:-1].split(':')[0], 'x') if part.startswith('<') else part
                    for part in rule.split('/'))


def test_every_state_change_needs_its_credentials(guarded):
    """Table-driven over every route that changes state: 401 without a token, with the pilot
    token (except a registration), and with pilot A's own secret (except A's own calls); the
    admin token opens all but a pilot's own calls, which only its secret opens. Nothing
    refused changes anything."""
    store, names, (a, a_secret) = guarded
    routes = state_changing_routes()
    assert {"DELETE", "POST"} <= {m for m, _ in routes} and len(routes) >= 25
    for method, rule in routes:
        path = fill(rule, names)                   # a pilot's own calls: pilot B's
        own = bool(srv.PILOT_OWN_PATH.match(path))
        for token in (None, 'pilot-token', a_secret, 'admin-token'):
            before = snapshot(store)
            status, _, reply = wsgi_call(method, path, b'{}', token)
            opened = (token == 'pilot-token' and rule == '/api/pilots'
                      or token == 'admin-token' and not own)
            assert (status == 401) != opened, (method, rule, token, status, reply)
            if status == 401:
                assert json.loads(reply)['error'] and snapshot(store) == before
        if own:
            status, _, reply = wsgi_call(method, fill(rule, dict(names, pilot_uuid=a)), b'{}',
                                         a_secret)
            assert status != 401, (rule, reply)               # A's own calls, with its secret


def test_reads_of_a_private_server_need_a_token(tmp_path):
    st = srv.configure(str(tmp_path / 'p3s.db'), sync='normal', token='admin-token',
                       pilot_token='pilot-token', private=True)
    try:
        names, _ = world(st)
        reads = [(r.method, r.rule) for r in srv.app.routes if r.method == 'GET']
        assert len(reads) >= 30
        for method, rule in reads:
            path = fill(rule, names)
            assert wsgi_call(method, path)[0] == 401, rule
            for token in ('pilot-token', 'admin-token'):
                assert wsgi_call(method, path, token=token)[0] != 401, (rule, token)
    finally:
        st.close()
        srv.configure(str(tmp_path / 'open.db')).close()


def test_a_pilot_cannot_report_beat_or_stop_for_another(tmp_path):
    """Over HTTP with tokens: pilot A, holding the pilot token and its own secret, forges a
    final report on pilot B's job, a heartbeat for B and B's stop: each is refused (401) and
    B's job and B stay as they were; the listing of pilots shows no secret."""
    server = Server(tmp_path, extra_args=['--token', 'admin-token', '--pilot-token',
                                          'pilot-token']).start()
    try:
        def register(host):
            status, reply = server.api('POST', '/api/pilots', {'host': host}, token='pilot-token')
            assert status == 200 and len(reply['secret']) >= 40
            return reply['pilot']['uuid'], reply['secret']
        a, a_secret = register('a')
        b, b_secret = register('b')
        server.api('POST', '/api/jobs', [{'payload': '/bin/true'}], token='admin-token')
        job = server.api('POST', '/api/pilots/%s/work' % b, {}, token=b_secret)[1]['job']['uuid']
        forged = {'job': job, 'state': 'finished', 'errcode': 0, 'stdout': 'forged'}
        for token in (a_secret, 'pilot-token', 'admin-token', None):
            for action, body in (('report', forged), ('heartbeat', {'job': job}),
                                 ('stop', {'state': 'killed'}), ('work', {'report': forged})):
                status, reply = server.api('POST', '/api/pilots/%s/%s' % (b, action), body,
                                           token=token)
                assert status == 401 and 'own secret' in reply['error'], (action, reply)
        assert server.job(job)['state'] == 'dispatched'
        assert server.api('GET', '/api/pilots/' + b)[1]['state'] == 'dispatched'
        listing = json.dumps(server.api('GET', '/api/pilots')[1])
        assert b_secret not in listing and 'secret' not in listing and 'nonce' not in listing
        status, done = server.api('POST', '/api/pilots/%s/report' % b,
                                  {'job': job, 'state': 'finished', 'errcode': 0}, token=b_secret)
        assert status == 200 and done['changed'] is True
    finally:
        server.stop()
    db = database_connection(server.db)
    stored = [r[0] for r in db.execute('SELECT secret_hash FROM pilots WHERE uuid = :uuid',
                                       {'uuid': b})]
    db.close()
    assert stored == [hashlib.sha256(b_secret.encode()).hexdigest()]   # the hash, never itself


def test_a_registration_is_repeated_only_by_its_own_pilot(store):
    """Its answer lost, a pilot registers again with the same nonce and gets a new secret (the
    old one no longer works); without that nonce nobody takes a registered uuid over."""
    nonce = 'n' * 32
    first = srv.register_pilot(store, {'host': 'h', 'nonce': nonce}, srv.utcnow())
    me = first['uuid']
    for other in ({'uuid': me}, {'uuid': me, 'nonce': 'x' * 32}):
        with pytest.raises(srv.Refused) as refused:
            srv.register_pilot(store, dict(other, host='thief'), srv.utcnow())
        assert refused.value.status == 409 and 'registered already' in refused.value.message
    again = srv.register_pilot(store, {'uuid': me, 'host': 'h', 'nonce': nonce}, srv.utcnow())
    assert again['uuid'] == me and again['secret'] != first['secret']
    assert srv.get_pilot(store, me)['host'] == 'h'
    path = '/api/pilots/%s/heartbeat' % me
    assert wsgi_call('POST', path, b'{}', first['secret'])[0] == 401
    assert wsgi_call('POST', path, b'{}', again['secret'])[0] == 200


def test_a_pilot_the_server_forgot_registers_again_and_goes_on(clients, server):
    """A database restored from before a pilot registered: the pilot's next call is refused as
    unknown (404), it registers again under the same uuid and runs the next job."""
    pilot = clients.pilot('--cycles', '0', '--wait', '1', '--period', '0.2')
    wait_for(lambda: [p for p in server.api('GET', '/api/pilots')[1]['pilots']
                      if p['state'] == 'idle'], what='the pilot to wait for work')
    [me] = [p['uuid'] for p in server.api('GET', '/api/pilots')[1]['pilots']]
    db = database_connection(server.db)
    db.execute('DELETE FROM pilots')
    db.close()
    [job] = clients.submit([make_job('/bin/true')])
    wait_for(lambda: server.job(job)['state'] == 'finished', what='the job to run')
    assert server.job(job)['pilot'] == me
    pilot.terminate()
    out, err = pilot.communicate(timeout=30)
    assert pilot.returncode == 0 and 'registering again' in err, err


def test_a_version_2_database_is_migrated_with_its_pilots(tmp_path):
    """A pilot registered before pilots had secrets cannot prove itself: it is told so, and
    registers again; everything else is kept."""
    path = str(tmp_path / 'old.db')
    db = sqlite3.connect(path)
    with open(os.path.join(ROOT, 'tests', 'data', 'schema_version_2.sql')) as f:
        db.executescript(f.read())
    db.execute("INSERT INTO pilots (uuid, state, registered_at, last_seen) VALUES "
               "('%s', 'idle', 't', 't')" % UUID)
    db.execute("INSERT INTO jobs (uuid, payload, state, created_at, pilot) VALUES "
               "('00000000-0000-0000-0000-00000000000a', '/bin/true', 'dispatched', 't', '%s')"
               % UUID)
    db.commit()
    db.close()
    st = srv.configure(path)
    try:
        assert st.one('PRAGMA user_version')[0] == srv.SCHEMA_VERSION == 4
        assert srv.get_pilot(st, UUID)['state'] == 'idle'
        assert srv.get_job(st, '00000000-0000-0000-0000-00000000000a')['pilot'] == UUID
        status, _, reply = wsgi_call('POST', '/api/pilots/%s/heartbeat' % UUID, b'{}', 'guess')
        assert status == 401
        assert st.one('PRAGMA integrity_check')[0] == 'ok'
    finally:
        st.close()
    srv.configure(path).close()                    # once migrated, starting again is harmless


# -- secrets stay secret -------------------------------------------------------------------------

def command_line(pid):
    with open('/proc/%d/cmdline' % pid, 'rb') as f:
        return f.read().decode(errors='replace')


def test_no_secret_reaches_a_payload_a_log_the_monitor_or_ps(tmp_path):
    """The server and the pilot take their tokens from files; the pilot also has both tokens
    in its environment. A payload that prints its whole environment finds its job's env and the
    P3S_ variables only; no token is in its output, its tails in the API or the monitor, the
    pilot's log, the server's log, or any command line."""
    admin, pilot_token = 'admin-7f3a9c1e5b', 'pilot-2d8e4b6a0c'
    (tmp_path / 'admin.token').write_text(admin + '\n')
    (tmp_path / 'pilot.token').write_text(pilot_token + '\n')
    server = Server(tmp_path, extra_args=['--token-file', str(tmp_path / 'admin.token'),
                                          '--pilot-token-file',
                                          str(tmp_path / 'pilot.token')]).start()
    clients = Clients(tmp_path, server)
    try:
        assert server.api('POST', '/api/jobs', [{'payload': 'x'}])[0] == 401
        jobs = tmp_path / 'env.json'
        jobs.write_text(json.dumps([make_job('/usr/bin/env', env={'MINE': 'mine'})]))
        [job] = clients.run('job', '-j', str(jobs), '--token-file', str(tmp_path / 'admin.token'),
                            check=0).stdout.split()
        pilot = clients.pilot('--token-file', str(tmp_path / 'pilot.token'), env={
            'P3S_TOKEN': admin, 'P3S_PILOT_TOKEN': pilot_token, 'OTHER': 'kept-out'})
        wait_for(lambda: server.job(job)['state'] == 'finished', what='the job to run')
        seen = [command_line(server.proc.pid), command_line(pilot.pid)]
        pilot.communicate(timeout=60)
        out = (clients.joblog / (job + '.out')).read_text()
        names = {line.split('=', 1)[0] for line in out.splitlines()}
        assert names == {'MINE', 'P3S_JOB_UUID', 'P3S_PILOT_UUID', 'P3S_SERVER'}, out
        seen += [out, json.dumps(server.api('GET', '/api/jobs/%s?logs=1' % job)[1]),
                 urlopen_text(server.url + 'monitor/jobs/' + job), clients.pilot_logs(),
                 server.log_path.read_text()]
        for text in seen:
            assert admin not in text and pilot_token not in text
    finally:
        clients.cleanup()
        server.stop()


def urlopen_text(url):
    import urllib.request
    with urllib.request.urlopen(url, timeout=30) as r:
        return r.read().decode()


def test_a_payload_gets_what_pass_env_names_but_never_a_token(clients, server):
    [job] = clients.submit([make_job('/usr/bin/env')])
    clients.run_pilot('--pass-env', 'PATH,HOME,NOT_SET', env={'HOME': '/home/x',
                                                              'P3S_TOKEN': 'hidden-1'})
    out = (clients.joblog / (job + '.out')).read_text()
    got = dict(line.split('=', 1) for line in out.splitlines())
    assert got['HOME'] == '/home/x' and got['PATH'] == os.environ['PATH']
    assert set(got) == {'HOME', 'PATH', 'P3S_JOB_UUID', 'P3S_PILOT_UUID', 'P3S_SERVER'}
    for secret in ('P3S_TOKEN', 'P3S_PILOT_TOKEN_FILE'):
        proc = clients.run('pilot', '--pass-env', 'PATH,' + secret)
        assert proc.returncode == 2 and 'never given to a payload' in proc.stderr
        assert proc.stderr.count('\n') == 1


# -- a payload never outlives its pilot or its job ----------------------------------------------

def write_script(path, text):
    path.write_text('#!/bin/bash\n' + text)
    path.chmod(0o755)
    return str(path)


# A payload that leaves children behind: one in its process group, one that left the group
# with setsid, and one that left it twice removed (a setsid'd shell's background child).
LEAVES_CHILDREN = '''sleep 300 &
echo $! >> {pids}
setsid sleep 300 &
echo $! >> {pids}
setsid bash -c 'sleep 300 & echo $! >> {pids}; wait' &
while [ $(wc -l < {pids}) -lt 3 ]; do sleep 0.05; done
{end}
'''


def read_pids(path):
    return [int(p) for p in path.read_text().split()]


@pytest.mark.parametrize('end,state', [('exit 0', 'finished'), ('sleep 300', 'timelimit')])
def test_what_a_payload_leaves_behind_ends_with_its_job(clients, server, tmp_path, end, state):
    """Children in the payload's group, and children that called setsid, are ended when the
    job ends: at the payload's normal end, and at its time limit."""
    pids = tmp_path / 'pids'
    payload = write_script(tmp_path / 'leaves.sh', LEAVES_CHILDREN.format(pids=pids, end=end))
    [job] = clients.submit([make_job(payload, timeout='3')])
    pilot = clients.pilot('--beat', '0.5', '--cycles', '0', '--wait', '1')
    wait_for(lambda: server.job(job)['state'] == state, 30, what='the job to end')
    assert len(read_pids(pids)) == 3
    for pid in read_pids(pids):           # ended, and reaped by the pilot that adopted it
        wait_for(lambda: not os.path.exists('/proc/%d' % pid), 10,
                 what='leftover %d to be ended' % pid)
    assert pilot.poll() is None
    assert re.search(r'left \d+ processes behind: ended', clients.pilot_logs())


def running_job(clients, server, tmp_path, env=None):
    """A pilot running a job that may be retried: (job uuid, pilot process, payload's pid)."""
    started = tmp_path / 'started'
    [job] = clients.submit([make_job('/bin/sh -c "echo $$ >> %s; exec sleep 300"' % started,
                                     retries=1)])
    pilot = clients.pilot('--beat', '0.5', env=env)
    wait_for(lambda: server.job(job)['state'] == 'running', what='the job to run')
    [payload] = read_pids(started)
    return job, pilot, payload


@pytest.mark.parametrize('setpriv', [True, False])
def test_a_payload_dies_with_its_pilot(clients, server, tmp_path, setpriv):
    """kill -9 of a pilot: its payload is killed with it (PR_SET_PDEATHSIG), so that a retry
    of its job never runs beside it; through setpriv, and on a node without it."""
    empty = tmp_path / 'no-setpriv'
    empty.mkdir()
    job, pilot, payload = running_job(clients, server, tmp_path,
                                      env=None if setpriv else {'PATH': str(empty)})
    pilot.kill()
    pilot.communicate()
    wait_for(lambda: not pid_alive(payload), 10, what='the payload to die with its pilot')
    assert ('through /' if setpriv else 'through a preexec_fn') in clients.pilot_logs()


def test_a_server_token_file_must_hold_a_token(tmp_path):
    empty = tmp_path / 'empty'
    empty.write_text('')
    for path in (empty, tmp_path / 'none'):
        proc = run_server_command('--port', '0', '--db', str(tmp_path / 'p3s.db'),
                                  '--token-file', str(path))
        assert proc.returncode == 2 and 'token file' in proc.stderr, proc.stderr
    assert not (tmp_path / 'p3s.db').exists()


def test_a_pilot_cut_off_kills_a_job_that_may_run_again(tmp_path):
    """The server stops answering (frozen, or cut off by the network): after a pilot timeout
    without an answer the pilot kills a payload whose job may be retried, since the server
    takes the pilot for lost and may run the job again elsewhere."""
    server = Server(tmp_path, extra_args=['--pilot-timeout', '3', '--workers', '1']).start()
    clients = Clients(tmp_path, server)
    try:
        job, pilot, payload = running_job(clients, server, tmp_path)
        server.proc.send_signal(signal.SIGSTOP)
        try:
            wait_for(lambda: not pid_alive(payload), 30, what='the pilot to kill its payload')
        finally:
            server.proc.send_signal(signal.SIGCONT)
        assert 'takes this pilot for lost' in clients.pilot_logs()
        wait_for(lambda: server.job(job)['state'] in ('lost', 'defined'), 30,
                 what='the job lost, or queued again')
        pilot.terminate()
        pilot.communicate(timeout=60)
    finally:
        clients.cleanup()
        server.stop()


def test_a_report_on_an_earlier_attempt_is_refused(store):
    """A job that could not start is queued again as its next attempt, and handed to the same
    pilot in the same answer; the first report, sent again (its answer was lost), changes
    nothing about the new attempt."""
    me, _ = registered(store)
    [job] = srv.submit_jobs(store, [{'payload': 'x', 'retries': 1}], srv.utcnow())
    first = srv.request_work(store, me, srv.utcnow())[0]['job']
    assert first['attempt'] == 1
    report = srv.check_report({'job': job, 'state': 'nonstarter', 'attempt': 1})
    reply, _ = srv.request_work(store, me, srv.utcnow(), report)
    assert reply['report']['state'] == 'defined' and reply['job']['attempt'] == 2
    again, _ = srv.request_work(store, me, srv.utcnow(), report)
    assert again['report']['status'] == 'REFUSED' and 'attempt 1' in again['report']['error']
    assert again['job']['uuid'] == job and again['job']['attempt'] == 2
    with pytest.raises(srv.Refused) as refused:
        srv.report_job(store, me, srv.check_report({'job': job, 'state': 'running',
                                                    'attempt': 1}), srv.utcnow())
    assert refused.value.status == 409
    now = srv.get_job(store, job)
    assert (now['state'], now['attempt'], now['retries']) == ('dispatched', 2, 0)
    done = srv.report_job(store, me, srv.check_report({'job': job, 'state': 'finished',
                                                       'errcode': 0, 'attempt': 2}), srv.utcnow())
    assert done['changed'] is True and srv.get_job(store, job)['state'] == 'finished'


class Clock:
    def __init__(self, t=0.0):
        self.t = t

    def __call__(self):
        return self.t


def later(now, seconds):
    from datetime import datetime, timedelta
    return (datetime.fromisoformat(now) + timedelta(seconds=seconds)).isoformat(
        timespec='microseconds')


def test_the_housekeeper_loses_silent_pilots_after_its_grace_and_retries_late(store):
    """Stepped on injected clocks: no pilot is lost during the first pilot timeout after the
    start, however silent; then a silent pilot is lost with its job; a pilot that talks is
    never lost; the lost job, which may be retried, is queued again as its next attempt only
    LOST_RETRY_DELAY later."""
    t0 = '2026-01-01T00:00:00.000000+00:00'
    silent = srv.register_pilot(store, {'host': 'h'}, t0)['uuid']
    talker = srv.register_pilot(store, {'host': 'h'}, t0)['uuid']
    [job] = srv.submit_jobs(store, [{'payload': 'x', 'retries': 2}], t0)
    srv.request_work(store, silent, t0)
    clock, wall = Clock(1000.0), [later(t0, 600)]
    keeper = srv.Housekeeper(store, pilot_timeout=60, clock=clock, now=lambda: wall[0])

    def step(seconds):
        clock.t += seconds
        wall[0] = later(wall[0], seconds)
        srv.heartbeat(store, talker, None, wall[0])
        return keeper.step()

    assert step(59)['lost_pilots'] == []                      # the grace after a start
    assert srv.get_job(store, job)['state'] == 'dispatched'
    assert step(1)['lost_pilots'] == [silent]
    assert srv.get_pilot(store, talker)['state'] == 'active'
    assert srv.get_job(store, job)['state'] == 'lost'
    assert step(srv.LOST_RETRY_DELAY - 1)['woken'] == 0
    assert srv.get_job(store, job)['state'] == 'lost'
    assert step(2)['woken'] == 1
    again = srv.get_job(store, job)
    assert (again['state'], again['attempt'], again['retries'], again['pilot']) == \
        ('defined', 2, 1, None)


def test_a_symlink_planted_at_a_job_log_is_not_followed(clients, server, tmp_path):
    """Job uuids are public before dispatch and the default log folder is under /tmp: a link
    planted at <joblog>/<uuid>.out must not make the pilot write through it."""
    victim = tmp_path / 'victim.txt'
    victim.write_text('precious\n')
    [job] = clients.submit([make_job('/bin/echo hello')])
    clients.joblog.mkdir()
    os.symlink(str(victim), str(clients.joblog / (job + '.out')))
    os.symlink(str(tmp_path / 'created-by-the-pilot'), str(clients.joblog / (job + '.err')))
    clients.run_pilot()
    assert server.job(job)['state'] == 'finished'
    assert victim.read_text() == 'precious\n'
    assert not (tmp_path / 'created-by-the-pilot').exists()
    out = clients.joblog / (job + '.out')
    assert not out.is_symlink() and out.read_text() == 'hello\n'


@pytest.mark.parametrize('flag', ['--period', '--beat', '--wait', '--keep-logs'])
def test_the_pilot_refuses_times_that_are_no_numbers(clients, flag):
    proc = clients.run('pilot', flag, 'nan')
    assert proc.returncode == 2 and 'must be numbers' in proc.stderr


@pytest.mark.parametrize('name', ['job', 'workflow', 'data', 'pilot'])
def test_a_token_file_that_cannot_be_read_is_a_command_line_error(clients, tmp_path, name):
    empty = tmp_path / 'empty.token'
    empty.write_text('\n')
    for path, why in ((tmp_path / 'none.token', 'cannot read the token file'),
                      (empty, 'must hold one line')):
        proc = clients.run(name, '--token-file', str(path), '--list' if name != 'pilot'
                           else '--cycles=1')
        assert proc.returncode == 2 and why in proc.stderr and proc.stderr.count('\n') == 1, \
            proc.stderr


def test_what_the_front_refuses_is_said_in_json_too(server):
    """A request line too long for gevent never reaches the app: its refusal still has p3s's
    error shape."""
    import http.client
    conn = http.client.HTTPConnection('127.0.0.1', server.port, timeout=30)
    try:
        conn.request('GET', '/api/jobs?user=' + 'x' * 10000)
        reply = conn.getresponse()
        body = reply.read()
    finally:
        conn.close()
    assert reply.status == 414 and reply.getheader('Content-Type') == 'application/json'
    assert 'request line longer than' in json.loads(body)['error']
    assert reply.getheader('X-Content-Type-Options') == 'nosniff'
    conn = http.client.HTTPConnection('127.0.0.1', server.port, timeout=30)
    try:                                     # a body too large, refused before it is read
        conn.putrequest('POST', '/api/jobs')
        conn.putheader('Content-Length', str(srv.MAX_BODY + 1))
        conn.endheaders()
        reply = conn.getresponse()
        body = reply.read()
    finally:
        conn.close()
    assert reply.status == 413 and 'larger than' in json.loads(body)['error']
    assert reply.getheader('X-Content-Type-Options') == 'nosniff'
