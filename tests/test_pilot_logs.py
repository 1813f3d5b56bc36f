"""Pilot-side retention: a job's .out and .err are cut at --max-log-size with a marker line,
also while the payload runs, and job logs older than --keep-logs days leave the job log folder
at the pilot's start and every few hours. Real pilots against the real server."""
import os
import time
import uuid

from conftest import make_job, wait_for
from test_jobs_and_pilots import PilotTime, write_script

DAY = 86400


def test_a_runaway_payload_is_cut_at_the_size_limit(clients, server, tmp_path):
    """The payload writes 4 MB on each stream, then goes on running: the pilot cuts both files
    back while it runs, and what the payload writes after the cut is dropped too."""
    done = tmp_path / 'done'
    payload = write_script(tmp_path / 'flood.sh', 'head -c 4000000 /dev/zero | tr "\\0" x\n'
                           'head -c 4000000 /dev/zero | tr "\\0" y >&2\n'
                           'while [ ! -e %s ]; do sleep 0.05; done\necho after the cut\n' % done)
    [job] = clients.submit([make_job(payload)])
    pilot = clients.pilot('--cycles', '1', '--max-log-size', '64k')
    out, err = clients.joblog / (job + '.out'), clients.joblog / (job + '.err')
    wait_for(lambda: out.exists() and err.exists() and out.stat().st_size == 65536
             and err.stat().st_size == 65536, what='both logs cut while the payload runs')
    assert server.job(job)['state'] in ('dispatched', 'running')
    done.touch()
    assert pilot.wait(60) == 0
    marker = b'\n[p3s_pilot: output cut at 65536 bytes (--max-log-size); the rest was dropped]\n'
    for path, char in ((out, b'x'), (err, b'y')):
        data = path.read_bytes()
        assert len(data) == 65536 and data.endswith(marker)
        assert data[:-len(marker)] == char * (65536 - len(marker))
    job = server.api('GET', '/api/jobs/%s?logs=1' % job)[1]
    assert job['state'] == 'finished' and job['stdout'].endswith(marker.decode())


def test_output_within_the_limit_is_kept_whole(clients, server):
    [job] = clients.submit([make_job('echo small')])
    clients.run_pilot('--max-log-size', '1k')
    assert (clients.joblog / (job + '.out')).read_text() == 'small\n'
    assert sorted(p.name for p in clients.joblog.iterdir()) == [job + '.err', job + '.out']


def spare_logs(joblog):
    return sorted(p.name for p in joblog.glob('.*.next.*'))


def test_a_pilot_makes_its_next_jobs_logs_while_it_waits(clients, server, tmp_path):
    """The logs of the next job are made before the pilot asks for work, become the job's
    logs when it comes (replacing, not following, what was planted at their paths), and leave
    with the pilot."""
    import p3s_pilot
    joblog = tmp_path / 'jobs'
    args = p3s_pilot.parse_args(['-S', server.url, '--cycles', '0', '--wait', '0',
                                 '--period', '0', '-L', str(joblog), '-l', str(tmp_path)])
    pilot = p3s_pilot.Pilot(args)
    pilot.take_site_defaults()
    pilot.register()
    assert pilot.step() and pilot.pending is None                 # nothing to run yet
    made = ['.%s.next.err' % pilot.uuid, '.%s.next.out' % pilot.uuid]
    assert spare_logs(joblog) == made
    [job] = clients.submit([make_job('/bin/sh -c "echo hello; echo oops >&2"')])
    target = tmp_path / 'target'
    target.write_text('keep me')
    os.symlink(target, joblog / (job + '.out'))
    assert pilot.step() and pilot.pending['state'] == 'finished'
    assert spare_logs(joblog) == []                               # they became the job's
    assert (joblog / (job + '.out')).read_text() == 'hello\n'
    assert not (joblog / (job + '.out')).is_symlink() and target.read_text() == 'keep me'
    assert (joblog / (job + '.err')).read_text() == 'oops\n'
    assert pilot.step() and spare_logs(joblog) == made            # made again for the next
    pilot.finish()
    assert spare_logs(joblog) == []


def old_logs(joblog, age):
    """A job's .out and .err last written `age` seconds ago."""
    joblog.mkdir(exist_ok=True)
    name = str(uuid.uuid4())
    paths = [joblog / (name + ext) for ext in ('.out', '.err')]
    for path in paths:
        path.write_text('old output\n')
        os.utime(path, (time.time() - age, time.time() - age))
    return paths


def test_old_job_logs_leave_at_the_pilots_start(clients, server):
    old = old_logs(clients.joblog, 8 * DAY)
    recent = old_logs(clients.joblog, 6 * DAY)
    other = clients.joblog / 'notes.txt'                      # not a job log: never removed
    other.write_text('mine')
    os.utime(other, (time.time() - 30 * DAY,) * 2)
    spare = clients.joblog / ('.%s.next.out' % uuid.uuid4())    # left by a pilot killed -9
    spare.write_text('')
    os.utime(spare, (time.time() - 8 * DAY,) * 2)
    clients.run_pilot('--wait', '0', '--period', '0')
    assert not any(p.exists() for p in old + [spare])
    assert all(p.exists() for p in recent) and other.exists()
    clients.run_pilot('--wait', '0', '--period', '0', '--keep-logs', '5')
    assert not any(p.exists() for p in recent)


def test_keep_logs_zero_keeps_every_log(clients, server):
    old = old_logs(clients.joblog, 400 * DAY)
    clients.run_pilot('--wait', '0', '--period', '0', '--keep-logs', '0')
    assert all(p.exists() for p in old)


def test_old_logs_leave_again_every_few_hours(server, tmp_path):
    """A pilot that runs for days removes old logs at its start and then every TIDY_PERIOD of
    its clock, not at every step."""
    import p3s_pilot
    joblog = tmp_path / 'jobs'
    args = p3s_pilot.parse_args(['-S', server.url, '--cycles', '0', '--wait', '0',
                                 '-L', str(joblog), '-l', str(tmp_path)])
    t = PilotTime()
    pilot = p3s_pilot.Pilot(args, clock=t.clock, sleep=t.sleep)
    pilot.take_site_defaults()
    pilot.register()
    first = old_logs(joblog, 8 * DAY)
    assert pilot.step()
    assert not any(p.exists() for p in first)
    later = old_logs(joblog, 8 * DAY)
    t.offset += p3s_pilot.TIDY_PERIOD - 60
    assert pilot.step()
    assert all(p.exists() for p in later)                     # not due yet
    t.offset += 60
    assert pilot.step()
    assert not any(p.exists() for p in later)
    pilot.finish()


def test_bad_retention_flags_are_one_line_errors(clients):
    for flags in (['--max-log-size', '12x'], ['--max-log-size', '100'], ['--keep-logs', '-1']):
        proc = clients.run('pilot', *flags, check=2)
        assert proc.stderr.startswith('p3s_pilot: error: ') and proc.stderr.count('\n') == 1
