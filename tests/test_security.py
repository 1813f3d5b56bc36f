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
from conftest import ROOT, make_job, wsgi_call
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
