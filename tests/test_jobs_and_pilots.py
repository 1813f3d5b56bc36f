"""End to end: the real server, the real p3s_job.py and real p3s_pilot.py processes."""
import json
import os
import signal
import stat
import threading
import time
from datetime import datetime, timezone

import pytest

from conftest import ROOT, Server, free_port, make_job, pid_alive, wait_for


def write_script(path, text):
    path.write_text('#!/bin/bash\n' + text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return str(path)


def test_seed_example(clients, server, tmp_path):
    """The walk-through of seeds/000: myjob.json (COPY mode) + my_executable.sh writes the date."""
    myfile = tmp_path / 'myfile.txt'
    jobs = json.loads(open(os.path.join(ROOT, 'examples', 'myjob.json')).read())
    jobs[0]['payload'] = os.path.join(ROOT, 'examples', 'my_executable.sh')
    jobs[0]['env']['MYFILE'] = str(myfile)
    [job_uuid] = clients.submit(jobs)
    clients.run_pilot()
    assert myfile.read_text().strip()[-4:].isdigit()          # `date` ends with the year
    job = server.job(job_uuid)
    assert (job['state'], job['errcode'], job['timelimit'], job['priority']) == ('finished', 0, 100, 1)
    assert job['dispatched_at'] <= job['started_at'] <= job['stopped_at']
    assert (clients.joblog / (job_uuid + '.out')).exists()
    assert (clients.joblog / (job_uuid + '.err')).exists()
    [pilot] = server.api('GET', '/api/pilots')[1]['pilots']
    assert (pilot['state'], pilot['jobs_done'], pilot['job']) == ('stopped', 1, job_uuid)


def test_payload_environment_and_copy_sandbox(clients, server, tmp_path):
    payload = write_script(tmp_path / 'env.sh', 'echo "job=$P3S_JOB_UUID pilot=$P3S_PILOT_UUID '
                           'sandbox=$P3S_SANDBOX self=$0 args=$1,$2"\n')
    [job_uuid] = clients.submit([make_job(payload + ' one two', env={'P3S_MODE': 'COPY'})])
    clients.run_pilot()
    out = (clients.joblog / (job_uuid + '.out')).read_text()
    fields = dict(kv.split('=', 1) for kv in out.split())
    assert fields['job'] == job_uuid
    assert fields['pilot'] == server.job(job_uuid)['pilot']
    assert fields['self'].startswith(fields['sandbox'])       # the copy ran, with its arguments
    assert fields['args'] == 'one,two'
    assert not os.path.exists(fields['sandbox'])              # and the sandbox is gone


def test_shell_mode_is_per_job(clients, server, tmp_path):
    target = tmp_path / 'redirected.txt'
    shell_job = make_job('echo $GREETING > %s' % target, priority='2',
                         env={'P3S_EXECMODE': 'SHELL', 'GREETING': 'hello'})
    plain_job = make_job('echo $GREETING > not-a-redirect', priority='1', env={'GREETING': 'x'})
    shell_uuid, plain_uuid = clients.submit([shell_job, plain_job])
    clients.run_pilot('--cycles', '2')
    assert target.read_text() == 'hello\n'
    # The next job of the same pilot is not run through the shell (the original's sticky flag).
    assert (clients.joblog / (plain_uuid + '.out')).read_text() == '$GREETING > not-a-redirect\n'
    assert server.job(plain_uuid)['state'] == 'finished'


def test_priority_then_first_defined_first(clients, server):
    """job_template2 of the original: 8 jobs with priorities "1".."8", dispatched 8 -> 1; within a
    priority, the first defined goes first; negative and large priorities work."""
    jobs = [make_job('/bin/true', jobtype='jobtype%d' % p, priority=str(p)) for p in range(1, 9)]
    jobs += [make_job('/bin/true', name='late-%d' % i, priority='5') for i in range(3)]
    jobs += [make_job('/bin/true', name='low', priority='-7'),
             make_job('/bin/true', name='top', priority=str(10 ** 9))]
    clients.submit(jobs)
    clients.run_pilot('--cycles', str(len(jobs)))
    done = sorted(server.jobs(), key=lambda j: j['dispatched_at'])
    assert all(j['state'] == 'finished' for j in done)
    order = [(j['priority'], j['name'], j['jobtype']) for j in done]
    expected = sorted(order, key=lambda o: -o[0])       # stable: keeps submission order in a priority
    assert [o[0] for o in order] == [o[0] for o in expected]
    assert [o[1] for o in order if o[0] == 5] == ['test', 'late-0', 'late-1', 'late-2']
    assert order[0][1] == 'top' and order[-1][1] == 'low'


def test_exit_codes_of_payloads(clients, server, tmp_path):
    ok, bad, missing, notexec = clients.submit([
        make_job('/bin/true', priority='4'),
        make_job('/bin/sh -c "echo oops >&2; exit 3"', priority='3'),
        make_job('/no/such/program', priority='2'),
        make_job(str(tmp_path / 'jobs-not-executable.json'), priority='1'),
    ])
    (tmp_path / 'jobs-not-executable.json').write_text('{}')
    clients.run_pilot('--cycles', '4')
    states = {u: (server.job(u)['state'], server.job(u)['errcode']) for u in (ok, bad, missing, notexec)}
    assert states[ok] == ('finished', 0)
    assert states[bad] == ('failed', 3)
    assert states[missing] == ('nonstarter', None)
    assert states[notexec] == ('nonstarter', None)
    assert (clients.joblog / (bad + '.err')).read_text() == 'oops\n'
    assert 'nonstarter' in (clients.joblog / (missing + '.err')).read_text()
    logs = server.api('GET', '/api/jobs/%s?logs=1' % bad)[1]
    assert logs['stderr'] == 'oops\n'


def test_timelimit_kills_the_whole_process_group(clients, server, tmp_path):
    pids = tmp_path / 'pids'
    payload = write_script(tmp_path / 'spawner.sh',
                           'sleep 300 &\necho $! >> %s\necho $$ >> %s\nwait\n' % (pids, pids))
    [job_uuid] = clients.submit([make_job(payload, timeout='2')])
    clients.run_pilot('--beat', '0.5')
    job = server.job(job_uuid)
    assert job['state'] == 'timelimit'
    assert job['errcode'] == -signal.SIGTERM
    child, parent = [int(p) for p in pids.read_text().split()]
    wait_for(lambda: not pid_alive(child) and not pid_alive(parent), 10, what='payload group dead')


def test_kill_a_running_job(clients, server, tmp_path):
    started = tmp_path / 'started'
    [job_uuid] = clients.submit([make_job('/bin/sh -c "touch %s; sleep 60"' % started)])
    pilot = clients.pilot('--beat', '0.3', '--cycles', '2', '--wait', '1')
    wait_for(started.exists, what='payload start')
    wait_for(lambda: server.job(job_uuid)['state'] == 'running', what='running')
    proc = clients.run('job', '--kill', job_uuid, check=0)
    assert job_uuid in proc.stdout
    assert server.job(job_uuid)['state'] == 'killed'
    pilot.communicate(timeout=30)
    assert pilot.returncode == 0
    job = server.job(job_uuid)
    assert job['state'] == 'killed' and job['pid'] and not pid_alive(job['pid'])
    [p] = server.api('GET', '/api/pilots')[1]['pilots']
    assert p['state'] == 'stopped'                      # the pilot went on with its next cycle


def test_sigterm_stops_payload_reports_and_deregisters(clients, server, tmp_path):
    started = tmp_path / 'started'
    [job_uuid] = clients.submit([make_job('/bin/sh -c "touch %s; sleep 60"' % started)])
    pilot = clients.pilot('--beat', '5')
    wait_for(started.exists, what='payload start')
    wait_for(lambda: server.job(job_uuid)['state'] == 'running', what='running')
    pilot.send_signal(signal.SIGTERM)
    pilot.communicate(timeout=30)
    assert pilot.returncode == 0
    job = server.job(job_uuid)
    assert job['state'] == 'killed' and not pid_alive(job['pid'])
    [p] = server.api('GET', '/api/pilots')[1]['pilots']
    assert p['state'] == 'killed'


def test_sigterm_while_idle_leaves_at_once(clients, server):
    pilot = clients.pilot('--cycles', '0', '--wait', '30')
    wait_for(lambda: server.api('GET', '/api/pilots?state=idle')[1]['pilots'], what='idle pilot')
    pilot.send_signal(signal.SIGINT)
    pilot.communicate(timeout=10)
    assert pilot.returncode == 0
    assert server.api('GET', '/api/pilots')[1]['pilots'][0]['state'] == 'killed'


def test_pilot_started_while_server_is_down(tmp_path):
    """The pilot retries its registration with back-off, then runs the job."""
    port = free_port()
    srv = Server(tmp_path, port=port)
    from conftest import Clients
    clients = Clients(tmp_path, srv)
    srv.url = 'http://127.0.0.1:%d/' % port
    try:
        pilot = clients.pilot('--wait', '10')
        wait_for(lambda: 'retrying' in clients.pilot_logs(), what='a failed registration')
        assert pilot.poll() is None
        srv.start()
        [job_uuid] = clients.submit([make_job('/bin/echo hello')])
        out, err = pilot.communicate(timeout=60)
        assert pilot.returncode == 0, err
        assert srv.job(job_uuid)['state'] == 'finished'
        assert 'retrying' in clients.pilot_logs()
    finally:
        clients.cleanup()
        srv.stop()


def test_pilot_matches_jobtypes_and_site(clients, server):
    a, b, here, there = clients.submit([
        make_job('/bin/true', jobtype='a'), make_job('/bin/true', jobtype='b'),
        make_job('/bin/true', jobtype='a', site='here'), make_job('/bin/true', jobtype='a', site='there')])
    clients.run_pilot('--jobtypes', 'a,c', '--site', 'here', '--cycles', '3', '--wait', '0',
                      '--period', '0')
    states = {u: server.job(u)['state'] for u in (a, b, here, there)}
    assert states == {a: 'finished', b: 'defined', here: 'finished', there: 'defined'}


def test_input_files_replicas_and_dry_run(clients, server, tmp_path):
    template = tmp_path / 't.json'
    template.write_text(json.dumps([make_job('/bin/true', env={'X': '1', 'P3S_INPUT_FILE': 'dummy'})]))
    proc = clients.run('job', '-j', str(template), '-f', 'c.raw,a.raw,b.raw', '-N', '2', check=0)
    uuids = proc.stdout.split()
    assert len(uuids) == 6
    infiles = [server.job(u)['infile'] for u in uuids]
    assert infiles == ['c.raw', 'c.raw', 'a.raw', 'a.raw', 'b.raw', 'b.raw']
    assert server.job(uuids[0])['env'] == {'X': '1', 'P3S_INPUT_FILE': 'c.raw'}
    dry = clients.run('job', '-j', str(template), '-f', 'z.raw', '-t', '--server',
                      'http://127.0.0.1:1/', check=0)
    assert json.loads(dry.stdout)[0]['env']['P3S_INPUT_FILE'] == 'z.raw'
    assert len(server.jobs()) == 6


def test_list_show_adjust_delete(clients, server):
    tpl, queued = clients.submit([make_job('/bin/true', state='template', name='tpl'),
                                  make_job('/bin/true', name='queued', priority='5')])
    listing = json.loads(clients.run('job', '--list', '--json', '--state', 'template', check=0).stdout)
    assert [j['uuid'] for j in listing['jobs']] == [tpl]
    text = clients.run('job', '--list', check=0).stdout
    assert 'tpl' in text and 'queued' in text
    shown = json.loads(clients.run('job', '--show', queued, '--json', check=0).stdout)
    assert shown['priority'] == 5
    clients.run('job', '-a', '-u', queued, '-P', '0', check=0)          # priority 0 can be set
    assert server.job(queued)['priority'] == 0
    clients.run('job', '-a', '-u', tpl, '-s', 'defined', check=0)
    assert server.job(tpl)['state'] == 'defined' and server.job(tpl)['defined_at']
    clients.run('job', '-a', '-u', tpl, '-s', 'dropped', check=0)
    refused = clients.run('job', '-a', '-u', tpl, '-s', 'defined', check=1)
    assert 'dropped' in refused.stderr and refused.stderr.count('\n') == 1
    clients.run('job', '-d', '-u', '%s,%s' % (tpl, queued), check=0)
    assert server.jobs() == []
    missing = clients.run('job', '-d', '-u', tpl, check=1)
    assert 'no such job' in missing.stderr


def test_client_errors_are_one_line_with_documented_exit_codes(clients, server, tmp_path):
    bad_json = tmp_path / 'bad.json'
    bad_json.write_text('[{"name": ')
    no_payload = tmp_path / 'nopayload.json'
    no_payload.write_text(json.dumps([{'name': 'x'}]))
    bad_number = tmp_path / 'badnumber.json'
    bad_number.write_text(json.dumps([make_job('/bin/true', timeout='ten')]))
    cases = [
        (('-j', str(tmp_path / 'missing.json')), 4, 'cannot read'),
        (('-j', str(bad_json)), 4, 'not valid JSON'),
        (('-j', str(bad_number)), 4, 'timelimit must be a whole number'),
        (('-j', str(no_payload)), 1, 'payload is required'),
        (('--show', 'nonsense'), 1, 'no such job'),
        (('--list', '--server', 'http://127.0.0.1:%d' % free_port()), 3, 'cannot reach'),
    ]
    for args, code, message in cases:
        proc = clients.run('job', *args)
        assert proc.returncode == code, (args, proc.stderr)
        assert proc.stderr.startswith('p3s_job: error: ') and message in proc.stderr, proc.stderr
        assert proc.stderr.count('\n') == 1
    assert clients.run('job').returncode == 2
    assert server.jobs() == []


def test_sixteen_pilots_race_for_500_jobs_over_http(server):
    """16 threads speak the pilot protocol at once: every job is dispatched exactly once."""
    status, reply = server.api('POST', '/api/jobs', [{'payload': '/bin/true'}] * 500)
    assert status == 200 and len(set(reply['uuids'])) == 500
    got, errors = {}, []

    def pilot():
        try:
            me, secret = server.register(host='racer')
            report, mine = None, []
            while True:
                body = {'wait': 0}
                if report:
                    body['report'] = report
                status, work = server.api('POST', '/api/pilots/%s/work' % me, body, token=secret)
                assert status == 200, work
                if work['state'] != 'dispatched':
                    break
                job = work['job']['uuid']
                mine.append(job)
                report = {'job': job, 'state': 'finished', 'errcode': 0}
            got[me] = mine
        except Exception as e:                                   # pragma: no cover
            errors.append(e)

    threads = [threading.Thread(target=pilot) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors
    claimed = [j for mine in got.values() for j in mine]
    assert len(claimed) == 500 and len(set(claimed)) == 500
    jobs = server.jobs()
    assert {j['state'] for j in jobs} == {'finished'}
    holder = {j: p for p, mine in got.items() for j in mine}
    assert all(j['pilot'] == holder[j['uuid']] for j in jobs)
    assert sum(len(m) > 0 for m in got.values()) > 1


def test_lost_reply_is_delivered_again_then_released(server):
    me, secret = server.register()
    _, submitted = server.api('POST', '/api/jobs', [{'payload': '/bin/true'}, {'payload': '/bin/false'}])
    _, first = server.api('POST', '/api/pilots/%s/work' % me, {}, token=secret)
    # The reply above "never arrived": the same pilot asks again and gets the same job.
    _, again = server.api('POST', '/api/pilots/%s/work' % me, {}, token=secret)
    assert again['job']['uuid'] == first['job']['uuid']
    assert server.job(first['job']['uuid'])['state'] == 'dispatched'
    # A pilot that stops never ran it: the job goes back to the queue, in its place.
    _, stopped = server.api('POST', '/api/pilots/%s/stop' % me, {'state': 'stopped'}, token=secret)
    assert stopped['released'] == 1
    job = server.job(first['job']['uuid'])
    assert (job['state'], job['pilot']) == ('defined', None)
    other, other_secret = server.register(host='h2')
    _, work = server.api('POST', '/api/pilots/%s/work' % other, {}, token=other_secret)
    assert work['job']['uuid'] == first['job']['uuid']


def test_reports_only_from_the_holder_and_never_backwards(server):
    a, a_secret = server.register(host='a')
    b, b_secret = server.register(host='b')
    server.api('POST', '/api/jobs', [{'payload': '/bin/true'}])
    _, work = server.api('POST', '/api/pilots/%s/work' % a, {}, token=a_secret)
    job = work['job']['uuid']
    status, refused = server.api('POST', '/api/pilots/%s/report' % b,
                                 {'job': job, 'state': 'finished', 'errcode': 0}, token=b_secret)
    assert status == 409 and 'not held' in refused['error']
    assert server.job(job)['state'] == 'dispatched'
    assert server.api('POST', '/api/pilots/%s/report' % a, {'job': job, 'state': 'running', 'pid': 42},
                      token=a_secret)[0] == 200
    status, done = server.api('POST', '/api/pilots/%s/report' % a,
                              {'job': job, 'state': 'failed', 'errcode': 2}, token=a_secret)
    assert (status, done['changed'], done['state']) == (200, True, 'failed')
    for late in ({'state': 'finished', 'errcode': 0}, {'state': 'running', 'pid': 1}):
        status, reply = server.api('POST', '/api/pilots/%s/report' % a, dict(late, job=job),
                                   token=a_secret)
        assert status == 200 and reply['changed'] is False
    job_now = server.job(job)
    assert (job_now['state'], job_now['errcode'], job_now['pid']) == ('failed', 2, 42)
    # a piggy-backed report that is refused does not cost the pilot its next job
    server.api('POST', '/api/jobs', [{'payload': '/bin/true'}])
    status, work = server.api('POST', '/api/pilots/%s/work' % b,
                              {'report': {'job': job, 'state': 'finished', 'errcode': 0}},
                              token=b_secret)
    assert status == 200 and work['report']['status'] == 'REFUSED' and work['state'] == 'dispatched'


def test_long_poll_hands_a_new_job_to_a_waiting_pilot(server):
    me, secret = server.register()
    result = {}
    waiter = threading.Thread(target=lambda: result.update(
        server.api('POST', '/api/pilots/%s/work' % me, {'wait': 20}, token=secret)[1]))
    waiter.start()
    wait_for(lambda: server.api('GET', '/api/pilots/' + me)[1]['state'] == 'idle', what='idle')
    _, submitted = server.api('POST', '/api/jobs', [{'payload': '/bin/true'}])
    waiter.join(15)
    assert not waiter.is_alive(), 'the waiting pilot was not woken'
    assert result['job']['uuid'] == submitted['uuids'][0]


def test_odd_output_and_unwritable_logs_still_end_the_job(clients, server, tmp_path):
    noisy = write_script(tmp_path / 'noisy.sh', "printf 'a\\0b\\377c'\nprintf '<&>\\0' >&2\n")
    [job_uuid] = clients.submit([make_job(noisy)])
    clients.run_pilot()
    job = server.api('GET', '/api/jobs/%s?logs=1' % job_uuid)[1]
    assert job['state'] == 'finished'
    assert job['stdout'] == 'a\ufffdb\ufffdc' and job['stderr'] == '<&>\ufffd'
    blocked = tmp_path / 'not-a-dir'
    blocked.write_text('')
    [job_uuid] = clients.submit([make_job('/bin/true')])
    clients.run_pilot(env={'P3S_JOBLOG': str(blocked / 'jobs')})
    job = server.api('GET', '/api/jobs/%s?logs=1' % job_uuid)[1]
    assert job['state'] == 'nonstarter' and 'cannot write the job logs' in job['stderr']


class PilotTime:
    """The time an in-process pilot lives by: the real clock plus what the test adds; its
    sleeps are recorded, not slept."""

    def __init__(self):
        self.offset = 0.0
        self.sleeps = []

    def clock(self):
        return time.monotonic() + self.offset

    def sleep(self, seconds):
        self.sleeps.append(seconds)


def test_pilot_steps_on_an_injected_clock(server, tmp_path):
    """The pilot's loop, stepped by the test: an answer the server did not hold is followed by a
    sleep of the period, a held one is not; a final report delivered late carries its age."""
    import p3s_pilot
    args = p3s_pilot.parse_args(['-S', server.url, '--cycles', '3', '--period', '30',
                                 '--wait', '0', '-L', str(tmp_path / 'j'), '-l', str(tmp_path)])
    t = PilotTime()
    pilot = p3s_pilot.Pilot(args, clock=t.clock, sleep=t.sleep)
    pilot.take_site_defaults()
    pilot.register()
    assert pilot.step() is True and t.sleeps == [30]              # plain polling: one period
    pilot.args.wait = 0.2
    assert pilot.step() is True and t.sleeps == [30]              # the server held it: no sleep
    [job_uuid] = server.api('POST', '/api/jobs', [{'payload': '/bin/true'}])[1]['uuids']
    assert pilot.step() is False                                  # the third and last cycle
    assert server.job(job_uuid)['state'] == 'dispatched'          # its report is still pending
    t.offset = 100.0                                              # delivered 100 s after the end
    before = datetime.now(timezone.utc)
    pilot.finish()
    job = server.job(job_uuid)
    assert job['state'] == 'finished'
    stopped = datetime.fromisoformat(job['stopped_at'].replace('Z', '+00:00'))
    assert 95 <= (before - stopped).total_seconds() <= 105, (before, stopped)
    assert server.api('GET', '/api/pilots/' + pilot.uuid)[1]['state'] == 'stopped'


class SteppedTime(PilotTime):
    """Pilot time in which a sleep advances the clock (nothing is slept); after `sleeps`
    sleeps it raises StopPilot, to end a loop that would retry for ever."""

    def __init__(self, sleeps=None):
        super().__init__()
        self.most = sleeps

    def sleep(self, seconds):
        super().sleep(seconds)
        self.offset += seconds
        if self.most is not None and len(self.sleeps) >= self.most:
            raise StopPilot()


class StopPilot(Exception):
    pass


def unreachable_pilot(tmp_path, t):
    """An in-process pilot whose server is a port nobody listens on."""
    import p3s_pilot
    args = p3s_pilot.parse_args(['-S', '127.0.0.1:%d' % free_port(), '-L', str(tmp_path / 'j'),
                                 '-l', str(tmp_path)])
    pilot = p3s_pilot.Pilot(args, clock=t.clock, sleep=t.sleep)
    pilot.take_site_defaults()
    return pilot


def test_retries_back_off_to_at_most_30_s(tmp_path, monkeypatch):
    """While the server is away the pilot retries with a growing, jittered back-off that never
    exceeds the 30 s the README promises, even at the top of the jitter."""
    import p3s_pilot
    monkeypatch.setattr(p3s_pilot.random, 'uniform', lambda low, high: high)
    t = SteppedTime(sleeps=10)
    with pytest.raises(StopPilot):
        unreachable_pilot(tmp_path, t).register()
    assert t.sleeps[:4] == pytest.approx([0.6, 1.2, 2.4, 4.8])
    assert max(t.sleeps) == 30 and t.sleeps[-3:] == [30, 30, 30]


def test_a_signalled_pilot_gives_up_on_an_absent_server_within_20_s(tmp_path):
    """SIGTERM while the server is down: the pilot tries to deliver its last report and to
    deregister for SHUTDOWN_PATIENCE (20 s) in all, well inside a batch system's kill wait (30 s
    for Slurm), then leaves."""
    import p3s_pilot
    assert p3s_pilot.SHUTDOWN_PATIENCE <= 20
    for pending in (True, False):                   # a report to deliver, or only goodbye
        t = SteppedTime()
        pilot = unreachable_pilot(tmp_path, t)
        pilot.registered = True
        now = t.clock()
        if pending:
            pilot.pending = {'job': '00000000-0000-0000-0000-000000000001', 'state': 'finished',
                             'errcode': 0, 'pid': 1, 'stdout': '', 'stderr': '',
                             'started': now, 'ended': now}
        pilot.signalled = signal.SIGTERM
        pilot.finish()
        spent = t.clock() - now
        assert len(t.sleeps) >= 4 and spent <= p3s_pilot.SHUTDOWN_PATIENCE + 1, (spent, t.sleeps)


def test_the_pilot_says_on_its_terminal_why_it_waits(clients, tmp_path):
    """A wrong --server: the pilot says so on stderr at each retry (not only in its log);
    never registered, it leaves at once on SIGTERM."""
    wrong = '127.0.0.1:%d' % free_port()
    pilot = clients.pilot('--server', wrong, '--cycles', '1')
    lines = []
    reader = threading.Thread(target=lambda: lines.extend(pilot.stderr), daemon=True)
    reader.start()
    wait_for(lambda: len(lines) >= 2, what='two retries said on the terminal')
    pilot.send_signal(signal.SIGTERM)
    assert pilot.wait(30) == 0
    reader.join(10)
    out = pilot.stdout.read()
    assert out.startswith('p3s_pilot: pilot ') and 'left after 0 jobs' in out
    for line in lines:
        assert line.startswith('p3s_pilot: warning: cannot reach the server at http://%s'
                               % wrong), line
        assert 'retrying in' in line
