"""The peers benchmark's bookkeeping (bench/peers_app.py): the records its jobs write are read
back as they were written, and a job that is missing, ran twice, failed or was never submitted
stops the benchmark instead of being counted. Neither huey nor Parsl is needed here."""
import os
import re
import subprocess
import sys

import pytest

from conftest import ROOT

sys.path.insert(0, os.path.join(ROOT, 'bench'))
import peers_app  # noqa: E402


def record(job, picked=1.0, started=1.1, ended=1.2, rc=0, pid=7):
    return {'job': job, 'picked': picked, 'started': started, 'ended': ended, 'rc': rc,
            'pid': pid}


def test_a_job_leaves_one_record_of_its_run(tmp_path):
    path = str(tmp_path / 'records')
    peers_app.run_job('ok', ['/bin/true'], path)
    peers_app.run_job('bad', ['/bin/false'], path)
    with open(path) as f:
        got = peers_app.parse_records(f.read())
    assert [(r['job'], r['rc'], r['pid']) for r in got] == [('ok', 0, os.getpid()),
                                                            ('bad', 1, os.getpid())]
    for r in got:
        assert r['picked'] <= r['started'] <= r['ended']


# The exit code is the child's parent-death signal, read with prctl(PR_GET_PDEATHSIG).
PDEATHSIG = ('import ctypes, sys; sig = ctypes.c_int(); '
             'ctypes.CDLL(None).prctl(2, ctypes.byref(sig), 0, 0, 0); sys.exit(sig.value)')


def test_the_supervised_ceiling_starts_each_job_to_die_with_its_starter(tmp_path):
    path = str(tmp_path / 'records')
    peers_app.run_job('plain', [sys.executable, '-c', PDEATHSIG], path)
    peers_app.run_job('supervised', peers_app.supervised([sys.executable, '-c', PDEATHSIG]),
                      path)
    with open(path) as f:
        got = {r['job']: r['rc'] for r in peers_app.parse_records(f.read())}
    assert got == {'plain': 0, 'supervised': 9}          # SIGKILL, as the pilot sets it


def test_the_ceiling_runs_its_jobs_one_after_the_other(tmp_path):
    path = str(tmp_path / 'records')
    subprocess.run([sys.executable, peers_app.__file__, '--supervised', path, 'a', 'b'],
                   check=True, timeout=60)
    with open(path) as f:
        done = peers_app.account(peers_app.parse_records(f.read()), ['a', 'b'])
    assert done['a']['ended'] <= done['b']['picked']


def test_a_line_still_being_written_is_left_for_the_next_read():
    text = 'a 1.0 1.1 1.2 0 7\nb 2.0 2'
    assert [r['job'] for r in peers_app.parse_records(text)] == ['a']


def test_a_malformed_record_is_refused():
    with pytest.raises(ValueError, match='malformed job record'):
        peers_app.parse_records('a 1.0 1.1 0 7\n')


def test_every_job_once_is_accounted_for():
    done = peers_app.account([record('b'), record('a')], ['a', 'b'])
    assert sorted(done) == ['a', 'b']


@pytest.mark.parametrize('records, problem', [
    ([record('a')], 'missing: 1 (b)'),
    ([record('a'), record('b'), record('b')], 'ran more than once: 1 (b)'),
    ([record('a'), record('b'), record('c')], 'never submitted: 1 (c)'),
    ([record('a'), record('b', rc=1)], 'failed: 1 (b)'),
])
def test_a_job_not_run_exactly_once_stops_the_count(records, problem):
    with pytest.raises(RuntimeError, match='not run exactly once: .*' + re.escape(problem)):
        peers_app.account(records, ['a', 'b'])


def test_jobs_per_second_spans_the_first_pick_up_to_the_last_end():
    records = [record('a', picked=10.0, ended=11.5), record('b', picked=11.0, ended=14.0),
               record('c', picked=12.0, ended=12.5)]
    assert peers_app.jobs_per_second(records) == pytest.approx(3 / (14.0 - 10.0))
