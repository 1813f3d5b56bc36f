"""What operators run: the README's server commands and `pip install .` exactly as written, from
(a copy of) the repository's root, and the clients on the oldest Python they promise."""
import glob
import json
import os
import re
import shutil
import subprocess
import sys

import pytest

from conftest import ROOT, Server, make_job

WHEELS = os.path.join(ROOT, '.venv', 'wheels')     # kept by `make test` (Makefile)
OLDEST_CLIENT_PYTHON = (3, 8)


def readme_commands(prefix):
    """The README's command lines (in code blocks) that start with `prefix`; a line with
    [optional arguments] is a synopsis, not a command."""
    with open(os.path.join(ROOT, 'README.md')) as f:
        blocks = re.findall(r'^```\w*\n(.*?)^```', f.read(), re.M | re.S)
    return [line for block in blocks for line in block.splitlines()
            if line.startswith(prefix) and '[' not in line]


def root_mirror(tmp_path):
    """A folder that holds what the repository's root holds (as links), but its own files:
    commands written for the root run in it without touching the checkout's database."""
    mirror = tmp_path / 'root'
    mirror.mkdir()
    for name in os.listdir(ROOT):
        if name not in ('.git', 'build') and not re.search(r'\.db(-wal|-shm)?$|egg-info', name):
            os.symlink(os.path.join(ROOT, name), mirror / name)
    return mirror


def shell(line, cwd, env=None, timeout=300):
    """One documented command line, run by bash as a user would type it."""
    return subprocess.run(['bash', '-c', line], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_the_readmes_check_and_purge_run_as_written(tmp_path):
    check = readme_commands('.venv/bin/python p3s_server.py check ')
    purge = readme_commands('.venv/bin/python p3s_server.py purge --older 30d')
    assert len(check) == 1 and len(purge) == 1, (check, purge)
    mirror = root_mirror(tmp_path)
    server = Server(tmp_path)
    server.db = str(mirror / 'p3s.db')                    # ./p3s.db, the default database
    server.start()
    try:
        assert server.api('POST', '/api/jobs', [{'payload': '/bin/true'}])[0] == 200
        proc = shell(check[0], mirror)                    # beside the running server
        assert proc.returncode == 0, proc.stderr
        assert 'integrity: ok' in proc.stdout and 'defined 1' in proc.stdout
        proc = shell(purge[0], mirror)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.startswith('purged 0 workflows, 0 other jobs'), proc.stdout
    finally:
        server.stop()


def test_pip_install_dot_runs_as_written(tmp_path):
    """`pip install .` in a fresh virtual environment, offline: setuptools and the run-time
    packages come from the wheels `make test` keeps."""
    [line] = readme_commands('pip install .')
    if not os.path.isdir(WHEELS):
        pytest.fail('no wheels in %s: run `make test`' % WHEELS)
    src = tmp_path / 'p3s'
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(
        '.git', '.venv', '__pycache__', '.pytest_cache', 'build', '*.egg-info', '*.db*'))
    venv = tmp_path / 'venv'
    subprocess.run([sys.executable, '-m', 'venv', str(venv)], check=True, timeout=120)
    env = dict(os.environ, VIRTUAL_ENV=str(venv), PATH='%s/bin:%s' % (venv, os.environ['PATH']),
               PIP_NO_INDEX='1', PIP_FIND_LINKS=WHEELS, PIP_DISABLE_PIP_VERSION_CHECK='1')
    proc = shell(line, src, env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    for name in ('p3s-server', 'p3s-job', 'p3s-pilot', 'p3s-workflow', 'p3s-data'):
        assert os.access(venv / 'bin' / name, os.X_OK), name
    proc = shell('p3s-server check --db %s' % (tmp_path / 'none.db'), tmp_path, env)
    assert proc.returncode == 1 and 'no database at' in proc.stderr


def python_of_version(version):
    """An interpreter of that (major, minor) version found here, installed by pyenv or on PATH,
    or None."""
    name = 'python%d.%d' % version
    found = glob.glob(os.path.expanduser('~/.pyenv/versions/%d.%d.*/bin/%s' % (version + (name,))))
    for python in filter(None, found + [shutil.which(name)]):
        proc = subprocess.run([python, '-c', 'import sys; print(tuple(sys.version_info[:2]))'],
                              capture_output=True, text=True, timeout=30)
        if proc.stdout.strip() == str(version):
            return python
    return None


OLDEST_PYTHON = python_of_version(OLDEST_CLIENT_PYTHON)


@pytest.mark.skipif(not OLDEST_PYTHON, reason='no Python %d.%d installed here'
                    % OLDEST_CLIENT_PYTHON)
def test_the_clients_run_a_job_on_the_oldest_python_they_promise(clients, server, tmp_path):
    """The README promises every client runs on Python 3.8: submit, run and read a job with
    3.8 itself, each client file alone (no site-packages)."""
    python = OLDEST_PYTHON

    def run(name, *args):
        proc = subprocess.run([python, '-S', os.path.join(ROOT, 'p3s_%s.py' % name)] + list(args),
                              capture_output=True, text=True, env=clients.env(), cwd=tmp_path,
                              timeout=120)
        assert proc.returncode == 0, (name, proc.stderr)
        return proc.stdout

    (tmp_path / 'job.json').write_text(json.dumps([make_job('echo old')]))
    job = run('job', '-j', str(tmp_path / 'job.json')).strip()
    run('pilot', '--cycles', '1')
    assert json.loads(run('job', '--show', job, '--json'))['state'] == 'finished'
    assert (clients.joblog / (job + '.out')).read_text() == 'old\n'
    run('workflow', '--list')
    run('data', '--list')
