"""The client files: each stands alone, so they share their skeleton by copy. These tests keep
the copies equal and check the endings every client shares, by running the real scripts."""
import ast
import glob
import http.server
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading

import pytest

from conftest import ROOT, Server, make_job, wait_for

CLIENTS = sorted(os.path.basename(p) for p in glob.glob(os.path.join(ROOT, 'p3s_*.py'))
                 if not p.endswith('p3s_server.py'))
SKELETON_BANNER = '# The client skeleton:'
DIFFERENT_BY_DESIGN = {'main', 'parse_args', 'check_args'}


def source(name):
    with open(os.path.join(ROOT, name)) as f:
        return f.read()


def skeleton(text):
    """The text of the skeleton section: from its banner to the next banner."""
    start = text.index(SKELETON_BANNER)
    end = text.index('\n# ------', text.index('\n# ------', start) + 1)
    return text[start:end]


def top_level_definitions(text):
    tree = ast.parse(text)
    return {node.name: ast.get_source_segment(text, node) for node in tree.body
            if isinstance(node, (ast.FunctionDef, ast.ClassDef))}


def test_every_client_carries_the_same_skeleton():
    skeletons = {name: skeleton(source(name)) for name in CLIENTS}
    first = skeletons[CLIENTS[0]]
    for name, text in skeletons.items():
        assert text == first, '%s: its skeleton differs from %s' % (name, CLIENTS[0])
    for needed in ('def call(', 'def refusal(', 'def run_command(', 'class Parser(',
                   'class P3SError(', 'def server_url('):
        assert needed in first


def test_a_function_shared_by_clients_is_the_same_function():
    """Any function two clients both define is one function copied, never two that drift."""
    seen = {}
    for name in CLIENTS:
        for fn, text in top_level_definitions(source(name)).items():
            if fn in DIFFERENT_BY_DESIGN:
                continue
            first = seen.setdefault(fn, (name, text))
            assert text == first[1], '%s differs between %s and %s' % (fn, first[0], name)


@pytest.mark.parametrize('name', CLIENTS)
def test_client_runs_when_copied_alone_on_python_3_8(tmp_path, name):
    """Copied alone onto a bare node, without site-packages, it answers -h; its syntax is
    Python 3.8's and it imports the standard library only."""
    text = source(name)
    tree = ast.parse(text, feature_version=(3, 8))
    imported = {a.name.split('.')[0] for n in ast.walk(tree) if isinstance(n, ast.Import)
                for a in n.names}
    imported |= {n.module.split('.')[0] for n in ast.walk(tree)
                 if isinstance(n, ast.ImportFrom) and n.module}
    assert imported <= set(sys.stdlib_module_names), imported - set(sys.stdlib_module_names)
    alone = tmp_path / 'node'
    alone.mkdir()
    shutil.copy(os.path.join(ROOT, name), alone)
    proc = subprocess.run([sys.executable, '-S', '-I', name, '-h'], cwd=alone,
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0 and 'Exit codes' in proc.stdout, proc.stderr


def run(name, *args, env=None, timeout=60, **kwargs):
    env = dict({k: v for k, v in os.environ.items() if k != 'P3S_TOKEN'}, **(env or {}))
    return subprocess.run([sys.executable, '-S', os.path.join(ROOT, name)] + list(args),
                          capture_output=True, text=True, env=env, timeout=timeout, **kwargs)


def one_line_error(proc, name, code):
    prog = name[:-3]
    assert proc.returncode == code, (proc.returncode, proc.stderr)
    assert proc.stderr.startswith(prog + ': error: '), proc.stderr
    assert proc.stderr.count('\n') == 1, proc.stderr
    return proc.stderr


# One command of each client that talks to the server and changes nothing.
READ_ONLY = {'p3s_job.py': ['--list'], 'p3s_workflow.py': ['--list'],
             'p3s_data.py': ['--list'], 'p3s_pilot.py': ['--cycles', '1', '--wait', '0'],
             'p3s_batch.py': ['--list']}


@pytest.mark.parametrize('name', CLIENTS)
def test_command_line_mistakes_are_one_line(name):
    stderr = one_line_error(run(name, '--no-such-option'), name, 2)
    assert '-h' in stderr
    stderr = one_line_error(run(name, *READ_ONLY[name], '-S', 'ftp://x'), name, 2)
    assert 'not a server URL' in stderr


@pytest.mark.parametrize('name', CLIENTS)
def test_host_and_port_alone_name_a_server(name, server, tmp_path):
    host_port = server.url.split('://')[1].rstrip('/')
    proc = run(name, *READ_ONLY[name], '-S', host_port, cwd=tmp_path,
               env={'P3S_JOBLOG': str(tmp_path / 'j'), 'P3S_PILOTLOG': str(tmp_path / 'p')})
    assert proc.returncode == 0, proc.stderr


class ForeignHandler(http.server.BaseHTTPRequestHandler):
    """A web server that is not p3s: HTML errors for everything."""

    def do_GET(self):
        self.send_error(404)

    def do_POST(self):
        self.send_error(501)

    def log_message(self, *args):
        pass


@pytest.fixture
def foreign_server():
    httpd = http.server.ThreadingHTTPServer(('127.0.0.1', 0), ForeignHandler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield 'http://127.0.0.1:%d/' % httpd.server_address[1]
    httpd.shutdown()
    httpd.server_close()


@pytest.mark.parametrize('name', CLIENTS)
def test_a_server_that_is_not_p3s_is_named_as_such(name, foreign_server, tmp_path):
    """Every client, the pilot too, gives up at once on a server that is not p3s: asking again
    would not make it one."""
    proc = run(name, *READ_ONLY[name], '-S', foreign_server,
               env={'P3S_JOBLOG': str(tmp_path / 'j'), 'P3S_PILOTLOG': str(tmp_path / 'p')})
    stderr = one_line_error(proc, name, 3)
    status = 'HTTP 501' if name == 'p3s_pilot.py' else 'HTTP 404'     # the pilot first POSTs
    assert 'is it a p3s server?' in stderr and status in stderr


def test_a_refused_token_names_where_the_token_comes_from(tmp_path):
    srv = Server(tmp_path, extra_args=['--token', 'secret', '--private']).start()
    try:
        for name in ('p3s_job.py', 'p3s_workflow.py', 'p3s_data.py', 'p3s_batch.py'):
            stderr = one_line_error(run(name, *READ_ONLY[name], '-S', srv.url), name, 1)
            assert 'HTTP 401' in stderr and 'P3S_TOKEN' in stderr
            proc = run(name, *READ_ONLY[name], '-S', srv.url, env={'P3S_TOKEN': 'secret'})
            assert proc.returncode == 0, proc.stderr
    finally:
        srv.stop()


def test_bad_inline_json_is_a_command_line_error_in_every_client(server, tmp_path):
    """The same bad input gives the same exit code whichever client takes it."""
    cases = [('p3s_workflow.py', ['-a', 'somedag', '-j', '{"a": ']),
             ('p3s_data.py', ['-R', '-j', '{"name": '])]
    for name, args in cases:
        stderr = one_line_error(run(name, *args, '-S', server.url), name, 2)
        assert 'JSON' in stderr
    broken = tmp_path / 'broken.json'
    broken.write_text('{"name": ')
    for name, args in (('p3s_workflow.py', ['-a', 'somedag', '-j', str(broken)]),
                       ('p3s_data.py', ['-R', '-j', str(broken)])):
        assert 'not valid JSON' in one_line_error(run(name, *args, '-S', server.url), name, 4)
    # Inline JSON that mentions ".json" is still JSON, not a file name.
    proc = run('p3s_data.py', '-R', '-j', '{"name": "CFG", "ext": ".json"}', '-S', server.url)
    assert proc.returncode == 0, proc.stderr
    assert server.api('GET', '/api/datatypes')[1]['datatypes'][0]['ext'] == '.json'


def test_output_into_a_closed_pipe_ends_quietly(tmp_path):
    """`p3s_job.py ... | head -1`: no traceback when the reader goes away."""
    jobs = tmp_path / 'jobs.json'
    jobs.write_text(json.dumps([make_job('/bin/true')]))
    proc = subprocess.Popen(
        [sys.executable, '-S', os.path.join(ROOT, 'p3s_job.py'), '-j', str(jobs), '-t',
         '-N', '5000'], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout.readline().strip() == b'['
    proc.stdout.close()
    stderr = proc.stderr.read().decode()
    assert proc.wait(30) == 141 and stderr == '', stderr
    proc.stderr.close()


def test_ctrl_c_ends_a_client_with_one_line(server, tmp_path):
    inbox = tmp_path / 'inbox'
    inbox.mkdir()
    (inbox / 'first.dat').write_text('x')
    template = tmp_path / 'job.json'
    template.write_text(json.dumps([make_job('/bin/true')]))
    proc = subprocess.Popen(
        [sys.executable, '-S', os.path.join(ROOT, 'p3s_data.py'), '--watch', str(inbox),
         '--job', str(template), '--cycles', '0', '--period', '60', '-S', server.url],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        # as from a terminal, also where the tests run in a background job (which a shell
        # starts with Ctrl-C ignored, and a client rightly keeps it so)
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        wait_for(lambda: server.jobs(), what='the injector to submit the first file')
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
        proc.communicate()
    # What it watches, said when it started, then one line for the interruption.
    assert proc.returncode == 130 and re.fullmatch(r'p3s_data: watching .*\n'
                                                   r'p3s_data: interrupted\n', err), err


class ProxyHandler(http.server.BaseHTTPRequestHandler):
    """An HTTP proxy that answers every request itself, as a p3s server would, and remembers
    what it was asked."""
    asked = []

    def do_GET(self):
        ProxyHandler.asked.append(self.path)
        body = json.dumps({'jobs': []}).encode()
        self.send_response(200)
        self.send_header('Content-Type', 'application/json')
        self.send_header('Content-Length', str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def test_a_proxy_in_the_environment_is_used():
    """On a node whose http_proxy leads out, the clients reach the server through it (the
    kept-alive connection is for servers reached directly)."""
    proxy = http.server.ThreadingHTTPServer(('127.0.0.1', 0), ProxyHandler)
    threading.Thread(target=proxy.serve_forever, daemon=True).start()
    try:
        proc = run('p3s_job.py', '--list', '-S', 'http://p3s.invalid:8080/',
                   env={'http_proxy': 'http://127.0.0.1:%d' % proxy.server_address[1],
                        'no_proxy': ''})
        assert proc.returncode == 0, proc.stderr
        assert ProxyHandler.asked and ProxyHandler.asked[0].startswith(
            'http://p3s.invalid:8080/api/jobs')
    finally:
        proxy.shutdown()
        proxy.server_close()
