"""p3s as a package: the wheel built from an sdist of the checkout installs into a fresh virtual
environment, outside the checkout and without the network, and its console scripts run a job."""
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tomllib
import urllib.request

import pytest

from conftest import ROOT, make_job

WHEELS = os.path.join(ROOT, '.venv', 'wheels')     # run-time packages, kept by `make test`
NOT_SHIPPED = shutil.ignore_patterns('.git', '.venv', '__pycache__', '.pytest_cache', 'build',
                                     '*.egg-info', '*.db', '*.db-*', 'tests', 'bench', 'docs')


def pyproject():
    with open(os.path.join(ROOT, 'pyproject.toml'), 'rb') as f:
        return tomllib.load(f)


def test_every_top_level_program_is_a_console_script():
    project = pyproject()
    modules = sorted(p[:-3] for p in os.listdir(ROOT) if re.match(r'^p3s_\w+\.py$', p))
    assert sorted(project['tool']['setuptools']['py-modules']) == modules
    assert project['project']['scripts'] == {m.replace('_', '-'): m + ':main' for m in modules}


def test_the_package_needs_run_time_packages_only():
    """The same packages as requirements.txt, none of the test suite's."""
    def names(lines):
        return {re.split(r'[<>=!~;\[ ]', line.strip(), 1)[0].lower() for line in lines
                if line.strip() and not line.lstrip().startswith(('#', '-'))}
    with open(os.path.join(ROOT, 'requirements.txt')) as f:
        run_time = names(f)
    assert names(pyproject()['project']['dependencies']) == run_time
    with open(os.path.join(ROOT, 'requirements-test.txt')) as f:
        assert not names(f) & run_time, 'requirements-test.txt repeats run-time packages'


def run(*cmd, cwd, env=None, timeout=300):
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, (cmd, proc.stdout[-3000:], proc.stderr[-3000:])
    return proc


def build_wheel(tmp):
    """sdist from a copy of the checkout, then the wheel from the unpacked sdist: what
    `python -m build` does, so a file the sdist forgets is missing from the wheel too."""
    src, dist = tmp / 'src', tmp / 'dist'
    shutil.copytree(ROOT, src, ignore=NOT_SHIPPED)
    backend = 'import setuptools.build_meta as b, sys; print(b.build_%s(sys.argv[1]))'
    name = run(sys.executable, '-c', backend % 'sdist', str(dist), cwd=src).stdout.split()[-1]
    with tarfile.open(dist / name) as sdist:
        sdist.extractall(tmp / 'unpacked')
    unpacked = tmp / 'unpacked' / name[:-len('.tar.gz')]
    name = run(sys.executable, '-c', backend % 'wheel', str(dist), cwd=unpacked).stdout.split()[-1]
    return dist / name


@pytest.fixture(scope='module')
def installed(tmp_path_factory):
    """A fresh virtual environment, outside the checkout, with the wheel installed in it."""
    if not os.path.isdir(WHEELS):
        pytest.fail('no wheels of the run-time packages in %s: run `make test`' % WHEELS)
    tmp = tmp_path_factory.mktemp('package')
    wheel = build_wheel(tmp)
    venv = tmp / 'venv'
    run(sys.executable, '-m', 'venv', str(venv), cwd=tmp)
    run(str(venv / 'bin' / 'pip'), 'install', '--quiet', '--disable-pip-version-check',
        '--no-index', '--find-links', WHEELS, str(wheel), cwd=tmp)
    return venv


def test_the_wheel_carries_the_server_files(installed):
    """The installed server is the venv's own, with its schema, templates and static files."""
    code = ('import p3s_server as s, os; print(s.__file__); print(s.SCHEMA_FILE); '
            'print(os.listdir(os.path.join(s.SERVER_FILES, "views")))')
    where, schema, views = run(str(installed / 'bin' / 'python'), '-I', '-c', code,
                               cwd=installed).stdout.splitlines()
    assert where.startswith(str(installed)) and schema.startswith(str(installed))
    assert os.path.isfile(schema) and 'base.tpl' in views


def page(url):
    with urllib.request.urlopen(url, timeout=30) as reply:
        assert reply.status == 200
        return reply.read().decode()


def test_console_scripts_run_a_job_and_serve_the_dashboard(installed, tmp_path):
    bin_ = installed / 'bin'
    env = dict(os.environ, P3S_JOBLOG=str(tmp_path / 'jobs'), P3S_PILOTLOG=str(tmp_path / 'pilots'))
    env.pop('P3S_TOKEN', None)
    server = subprocess.Popen([str(bin_ / 'p3s-server'), '--port', '0', '--db',
                               str(tmp_path / 'p3s.db')], cwd=tmp_path, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        line = server.stdout.readline().decode()
        assert 'listening on' in line, line
        env['P3S_SERVER'] = url = line.split('listening on ')[1].split()[0]
        (tmp_path / 'job.json').write_text(json.dumps([make_job('echo installed')]))
        job = run(str(bin_ / 'p3s-job'), '-j', 'job.json', cwd=tmp_path, env=env).stdout.strip()
        run(str(bin_ / 'p3s-pilot'), '--cycles', '1', cwd=tmp_path, env=env)
        shown = json.loads(run(str(bin_ / 'p3s-job'), '--show', job, '--json', cwd=tmp_path,
                               env=env).stdout)
        assert shown['state'] == 'finished', shown
        assert (tmp_path / 'jobs' / (job + '.out')).read_text() == 'installed\n'
        for name in ('p3s-workflow', 'p3s-data'):
            assert 'Exit codes' in run(str(bin_ / name), '-h', cwd=tmp_path, env=env).stdout
        assert 'Live pilots' in page(url)                        # the dashboard's checklist
        assert 'echo installed' in page(url + 'monitor/jobs/' + job)
        assert 'body' in page(url + 'static/p3s.css')
    finally:
        server.terminate()
        server.wait(30)
        server.stdout.close()
