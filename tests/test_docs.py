"""The documents keep their word: every command they show works as written.

Every fenced block of README.md and docs/*.md says what it is: `sh` (commands that run as
written from the repository's root), `slurm` (commands that need a Slurm cluster:
tests/test_slurm.py runs them), `postgresql` (commands that need a PostgreSQL server: run
here against the tests' own), `text` (a synopsis with placeholders such as UUID), or
the data it shows (`json`, `xml`, `yaml`, `ini`, `cfg`). The `sh` blocks of each document run,
in order, in one bash shell (so a variable set by one block serves the next), in a copy of the
repository, against a real server of their own: P3S_SERVER points the clients at it, as it
would point them at the server `make run` starts (so a `make run` line is that server, and is
not run again), and the pilots' logs go to a temporary directory. `python3` is the Python of
the tests without its site-packages, as on a bare node. The `postgresql` blocks run the same
way, on a database `p3s` owned by the role `p3s` of the tests' PostgreSQL cluster (its socket
in PGHOST and PGPORT, as on the database's own host), their server on that database, and
`.venv/bin/python` the tests' Python with its packages. Every option a synopsis shows must be
one its command knows.
"""
import glob
import os
import re
import shutil
import signal
import subprocess
import sys

import pytest

from conftest import ROOT, Server, postgres

DOCS = ['README.md'] + sorted(os.path.relpath(p, ROOT)
                              for p in glob.glob(os.path.join(ROOT, 'docs', '*.md')))
FENCE = re.compile(r'^```([^\n`]*)\n(.*?)^```[ \t]*$', re.M | re.S)
KINDS = ('sh', 'slurm', 'postgresql', 'text', 'json', 'xml', 'yaml', 'ini', 'cfg')
RUNNABLE = ('sh', 'postgresql')         # the kinds this file runs
RUN_TIMEOUT = 300               # seconds for all the commands of one document
STARTS_THE_SERVER = re.compile(r'^\s*make run\b')
# Where the copy of the repository leaves out what the documents do not run.
NOT_COPIED = shutil.ignore_patterns('.git', '.venv', '__pycache__', '.pytest_cache', '*.db',
                                    '*.db-wal', '*.db-shm', 'tests', 'bench')


def read(doc):
    with open(os.path.join(ROOT, doc)) as f:
        return f.read()


def blocks(doc):
    """(kind, text, line number) of each fenced block of a document."""
    text = read(doc)
    return [(m.group(1).strip(), m.group(2), text.count('\n', 0, m.start()) + 1)
            for m in FENCE.finditer(text)]


def commands(text):
    """The lines of a block joined where they end with a backslash, comments dropped."""
    joined = re.sub(r'\\\n\s*', ' ', text)
    return [line.split(' #')[0].strip() for line in joined.splitlines()
            if line.strip() and not line.lstrip().startswith('#')]


def test_every_block_says_what_it_is():
    """A block without a kind would be neither run nor checked; an indented code block,
    neither either."""
    for doc in DOCS:
        for kind, text, line in blocks(doc):
            assert kind in KINDS, '%s:%d: a block of kind %r; give one of %s' % (
                doc, line, kind, ', '.join(KINDS))
        outside = FENCE.sub('', read(doc))
        indented = re.findall(r'^(?: {4}|\t)(?:python3?|\.venv|make|p3s_)\S* .*$', outside, re.M)
        assert not indented, '%s: an indented command, outside a fenced block: %s' % (
            doc, indented[0])


def test_some_documents_run_their_examples():
    assert sum(kind == 'sh' for doc in DOCS for kind, _, _ in blocks(doc)) >= 10


def help_text(script, subcommand=None):
    """The -h of a p3s script (the server's needs its packages: the tests' own Python)."""
    argv = [sys.executable, os.path.join(ROOT, script)] + ([subcommand] if subcommand else [])
    proc = subprocess.run(argv + ['-h'], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def shown_options():
    """(document, line, script, subcommand, option) for every option of every p3s command
    shown in a synopsis or an example."""
    for doc in DOCS:
        for kind, text, line in blocks(doc):
            if kind not in RUNNABLE + ('text',):
                continue
            for command in commands(text):
                for m in re.finditer(r'\b(p3s_\w+\.py)((?:\s+(?:check|purge|migrate)\b)?)(.*)',
                                     command):
                    rest = re.split(r'\s(?:\|\|?|&&?|;)(?:\s|$)', m.group(3))[0]   # a pipe ends it
                    for option in re.findall(r'(?:^|[\s\[|(])(--?[A-Za-z][\w-]*)', rest):
                        yield doc, line, m.group(1), m.group(2).strip() or None, option


def test_every_option_shown_is_one_the_command_knows():
    helps = {}
    seen = 0
    for doc, line, script, sub, option in shown_options():
        if (script, sub) not in helps:
            helps[script, sub] = help_text(script, sub)
        assert re.search(r'(?<![\w-])%s(?![\w-])' % re.escape(option), helps[script, sub]), \
            '%s:%d: %s%s has no option %s' % (doc, line, script, ' ' + sub if sub else '', option)
        seen += 1
    assert seen > 50


def script_of(doc, kind='sh'):
    """The blocks of that kind of a document as one bash script that says which block runs."""
    parts = []
    for found, text, line in blocks(doc):
        if found != kind:
            continue
        kept = [s for s in text.splitlines() if not STARTS_THE_SERVER.match(s)]
        parts.append('echo "### %s:%d" >&2\n%s' % (doc, line, '\n'.join(kept)))
    return '\n'.join(parts)


@pytest.fixture
def repository(tmp_path):
    """A copy of the repository to run the examples in, and a `python3` that is the tests'
    Python without site-packages."""
    copy = tmp_path / 'repo'
    shutil.copytree(ROOT, copy, ignore=NOT_COPIED)
    bin_dir = tmp_path / 'bin'
    bin_dir.mkdir()
    for name in ('python3', 'python'):
        shim = bin_dir / name
        shim.write_text('#!/bin/sh\nexec %s -S "$@"\n' % sys.executable)
        shim.chmod(0o755)
    return copy, bin_dir


def kill_group(proc):
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def documents_with(kind):
    return [d for d in DOCS if any(k == kind for k, _, _ in blocks(d))]


@pytest.mark.parametrize('doc', documents_with('sh'))
def test_the_examples_run_as_written(doc, repository, tmp_path):
    server = Server(tmp_path).start()
    run_examples(doc, 'sh', repository, tmp_path, server)


@pytest.mark.parametrize('doc', documents_with('postgresql'))
def test_the_postgresql_examples_run_as_written(doc, repository, tmp_path):
    pg = postgres()
    copy, _ = repository
    venv_python = copy / '.venv' / 'bin' / 'python'
    venv_python.parent.mkdir(parents=True)
    venv_python.write_text('#!/bin/sh\nexec %s "$@"\n' % sys.executable)
    venv_python.chmod(0o755)
    server = Server(tmp_path, db=pg.new_database('p3s')).start()
    run_examples(doc, 'postgresql', repository, tmp_path, server,
                 PGHOST=pg.dir, PGPORT=str(pg.port))


def run_examples(doc, kind, repository, tmp_path, server, **more_env):
    """The blocks of that kind of a document, in one bash shell, against the server."""
    copy, bin_dir = repository
    env = dict(os.environ, PATH='%s:%s' % (bin_dir, os.environ['PATH']), P3S_SERVER=server.url,
               P3S_JOBLOG=str(tmp_path / 'jobs'), P3S_PILOTLOG=str(tmp_path / 'pilots'),
               **more_env)
    for name in ('P3S_TOKEN', 'P3S_PILOT_TOKEN', 'P3S_SITE', 'P3S_DIRPATH', 'P3S_DB', 'PGUSER',
                 'PGDATABASE', 'PGPASSWORD'):
        env.pop(name, None)
    proc = subprocess.Popen(['bash', '-e', '-o', 'pipefail', '-c', script_of(doc, kind)],
                            cwd=copy, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=RUN_TIMEOUT)
    except subprocess.TimeoutExpired:
        kill_group(proc)
        out, err = proc.communicate()
    finally:
        kill_group(proc)                # anything an example left running in the background
        server.stop()
    ran = re.findall(r'^### (\S+)$', err, re.M)
    assert proc.returncode == 0, '%s failed (exit %s) in the block at %s:\n%s\n%s' % (
        doc, proc.returncode, ran[-1] if ran else '?', out[-3000:], err[-3000:])
