"""The pool manager against a real Slurm: a one-node cluster on this machine
(tools/slurm-single-node.sh), real sbatch, squeue and scancel, real pilots in batch jobs.

These tests skip, saying why, where Slurm cannot start (not installed, not root); CI installs it
and sets P3S_REQUIRE_SLURM=1, which turns that skip into a failure.
"""
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import warnings

import pytest

from conftest import ROOT, make_job, wait_for

CLUSTER = os.path.join(ROOT, 'tools', 'slurm-single-node.sh')
JOB_END_TIMEOUT = 90         # seconds for a cancelled batch job to leave the node (KillWait 30)


def slurm(*argv, check=True, env=None):
    proc = subprocess.run(list(argv), capture_output=True, text=True, timeout=60, env=env)
    if check:
        assert proc.returncode == 0, (argv, proc.stdout, proc.stderr)
    return proc.stdout


def cannot_run(reason):
    """Skip loudly (a warning in the summary, whatever the -r flags), or fail under CI."""
    if os.environ.get('P3S_REQUIRE_SLURM'):
        pytest.fail('P3S_REQUIRE_SLURM is set but Slurm cannot run: ' + reason)
    message = ('NO SLURM: the Slurm tests are skipped: ' + reason + ' (tools/slurm-single-node.sh '
               'starts a one-node cluster as root once slurm-wlm and munge are installed; '
               '.ci/run does both)')
    warnings.warn(message)
    pytest.skip(message)


@pytest.fixture(scope='module')
def cluster():
    """The one-node cluster: reused if it runs, else started here and stopped afterwards."""
    if not shutil.which('sbatch') or not shutil.which('slurmctld'):
        cannot_run('slurm-wlm is not installed')
    if os.geteuid() != 0:
        cannot_run('the cluster is started as root, and this is uid %d' % os.geteuid())
    running = subprocess.run([CLUSTER, 'status'], capture_output=True).returncode == 0
    if not running:
        proc = subprocess.run([CLUSTER, 'start'], capture_output=True, text=True, timeout=120)
        if proc.returncode != 0:
            cannot_run('tools/slurm-single-node.sh start failed: ' + proc.stderr.strip())
    yield
    if not running:
        subprocess.run([CLUSTER, 'stop'], capture_output=True, timeout=60)


class Pool:
    """One test's site on the cluster: its pool manager runs, its batch jobs, its cleanup."""

    def __init__(self, clients, server, tmp_path, name, **site):
        self.clients, self.server, self.name = clients, server, name
        self.batchlog = tmp_path / 'batch'
        if site:
            path = tmp_path / (name + '.json')
            path.write_text(json.dumps(dict({'name': name}, **site)))
            clients.run('pilot', '--define-site', str(path), check=0)

    def manage(self, *args, check=0):
        """One cycle of p3s_batch.py; what it did."""
        proc = self.clients.run('batch', '--site', self.name, '--once', '--json', '--batchlog',
                                str(self.batchlog), *args, check=check)
        return json.loads(proc.stdout) if check == 0 else proc

    def batchjobs(self):
        return self.server.api('GET', '/api/batchjobs?site=' + self.name)[1]['batchjobs']

    def batchjob(self, batchid):
        [job] = [j for j in self.batchjobs() if j['batchid'] == batchid]
        return job

    def pilots(self, state=None):
        pilots = self.server.api('GET', '/api/pilots?site=' + self.name)[1]['pilots']
        return [p for p in pilots if state is None or p['state'] in state.split(',')]

    def in_slurm(self):
        """{batch id: Slurm state} of this site's batch jobs."""
        out = slurm('squeue', '-h', '-t', 'all', '-n', 'p3s-' + self.name, '-o', '%i %T')
        return dict(line.split() for line in out.splitlines())

    def cleanup(self):
        slurm('scancel', '-n', 'p3s-' + self.name, check=False)
        wait_for(lambda: not [s for s in self.in_slurm().values()
                              if s in ('PENDING', 'RUNNING', 'COMPLETING', 'CONFIGURING')],
                 JOB_END_TIMEOUT, 0.5, what='the batch jobs of %s to end' % self.name)


@pytest.fixture
def pools(cluster, clients, server, tmp_path):
    made = []

    def make(name, **site):
        made.append(Pool(clients, server, tmp_path, name, **site))
        return made[-1]
    yield make
    for pool in made:
        pool.cleanup()


def unique(name):
    return '%s%d' % (name, time.monotonic_ns() % 10 ** 9)


LIVE = 'active,idle,dispatched,running'


def test_the_pool_runs_jobs_loses_a_pilot_to_scancel_and_fills_up_again(pools, clients, server):
    pool = pools(unique('fill'), pilots=2, lifetime=600, max_pending=2)
    jobs = clients.submit([make_job('/bin/sleep 1', site=pool.name)] * 3)
    done = pool.manage()
    assert len(done['submitted']) == 2 and done['wanted'] == 2
    wait_for(lambda: all(server.job(u)['state'] == 'finished' for u in jobs), 60,
             what='the pilots of two batch jobs to run three jobs')
    pilots = wait_for(lambda: len(pool.pilots(LIVE)) == 2 and pool.pilots(LIVE), 60,
                      what='both pilots to register')
    assert sorted(p['extra'] for p in pilots) == sorted('slurm:' + b for b in done['submitted'])
    assert {(j['state'], j['pilot']) for j in pool.batchjobs()} == {
        ('running', p['uuid']) for p in pilots}
    assert pool.manage()['submitted'] == []                   # full: nothing more
    # a running job's pilot is cancelled: its job ends killed, never lost
    [long_job] = clients.submit([make_job('/bin/sleep 300', site=pool.name, timeout='400')])
    wait_for(lambda: server.job(long_job)['state'] == 'running', what='the long job to run')
    victim = server.api('GET', '/api/pilots/' + server.job(long_job)['pilot'])[1]
    batchid = victim['extra'].split(':')[1]
    slurm('scancel', batchid)
    wait_for(lambda: server.job(long_job)['state'] == 'killed', 60, what='the job to be killed')
    wait_for(lambda: pool.in_slurm()[batchid] == 'CANCELLED', 60, what='Slurm to cancel it')
    assert server.api('GET', '/api/pilots/' + victim['uuid'])[1]['state'] == 'killed'
    # the next cycle sees it ended and fills the pool up again (kept warm with --keep)
    done = pool.manage('--keep', '2')
    assert [(j['batchid'], j['state']) for j in done['ended']] == [(batchid, 'cancelled')]
    assert len(done['submitted']) == 1
    wait_for(lambda: len(pool.pilots(LIVE)) == 2, 60, what='the pool to be back at two pilots')
    listed = clients.run('batch', '--list', '--site', pool.name, check=0).stdout
    assert batchid in listed and 'cancelled' in listed


def test_a_pilot_reaches_its_wall_time_without_starting_a_job_that_would_not_fit(
        pools, clients, server):
    """One minute of wall time: the pilot runs a short job, never the 100 s one, and leaves
    before Slurm would kill it; the pool manager asks no pilot for a job none could run."""
    pool = pools(unique('wall'), pilots=1, lifetime=60)
    [too_long] = clients.submit([make_job('/bin/true', site=pool.name, timeout='100',
                                          priority='9')])
    assert pool.manage()['submitted'] == []                   # no pilot could run it
    [batchid] = pool.manage('--keep', '1')['submitted']
    wait_for(lambda: pool.pilots(LIVE), 60, what='the pilot to register')
    [short] = clients.submit([make_job('/bin/sleep 1', site=pool.name, timeout='5')])
    wait_for(lambda: server.job(short)['state'] == 'finished', 30, what='the short job')
    wait_for(lambda: pool.in_slurm().get(batchid) == 'COMPLETED', 90, 0.5,
             what='the pilot to leave at its end')
    [pilot] = pool.pilots()
    assert pilot['state'] == 'stopped'                        # left by itself, not killed
    job = server.job(too_long)
    assert job['state'] == 'defined' and job['dispatched_at'] is None
    assert 'end of its lifetime' in clients.pilot_logs()
    done = pool.manage()
    assert [(j['batchid'], j['state']) for j in done['ended']] == [(batchid, 'finished')]


def test_slurm_s_warning_signal_drains_the_pilot(pools, clients, server):
    pool = pools(unique('warn'), pilots=1, lifetime=600)
    first, second = clients.submit([make_job('/bin/sleep 4', site=pool.name),
                                    make_job('/bin/true', site=pool.name)])
    [batchid] = pool.manage()['submitted']
    wait_for(lambda: server.job(first)['state'] == 'running', 60, what='the first job')
    slurm('scancel', '--signal=USR1', '--batch', batchid)     # what --signal=B:USR1@N sends
    wait_for(lambda: pool.in_slurm().get(batchid) == 'COMPLETED', 60, 0.5,
             what='the drained pilot to leave')
    assert [server.job(u)['state'] for u in (first, second)] == ['finished', 'defined']
    assert pool.pilots()[0]['state'] == 'stopped'
    assert pool.manage()['ended'][0]['state'] == 'finished'


def test_a_broken_environment_is_flagged_and_a_pending_pilot_cancelled(pools, clients, server):
    broken = pools(unique('broken'), pilots=1, lifetime=600)
    clients.submit([make_job('/bin/true', site=broken.name)])
    [batchid] = broken.manage('--python', '/nonexistent/python3')['submitted']
    wait_for(lambda: broken.in_slurm().get(batchid) == 'FAILED', 60, 0.5, what='the failure')
    done = broken.manage('--python', '/nonexistent/python3')
    assert [(j['batchid'], j['state']) for j in done['ended']] == [(batchid, 'never_registered')]
    job = server.api('GET', '/api/batchjobs/%d' % broken.batchjob(batchid)['id'])[1]
    assert '/nonexistent/python3' in job['output'] and job['host']
    checks = server.api('GET', '/api/summary')[1]['checks']
    assert 'without their pilot ever registering' in checks[-1]['detail']
    # held by Slurm (options: --hold), so pending longer than the site's pending_timeout
    held = pools(unique('held'), pilots=1, lifetime=600, options=['--hold'], pending_timeout=1)
    [first] = held.manage('--keep', '1')['submitted']

    def cancelled():
        return held.manage('--keep', '1')['cancelled']
    assert wait_for(cancelled, 30, 0.5, what='the pending timeout') == [first]
    assert held.batchjob(first)['state'] == 'cancelled'
    assert 'pending for more than 1 s' in held.batchjob(first)['reason']
    assert held.in_slurm()[first] == 'CANCELLED'
    assert [j['state'] for j in held.batchjobs()].count('pending') == 1   # its replacement


def test_the_pool_manager_finds_what_the_server_and_slurm_do_not_share(pools, clients, server):
    """A batch job of the site's pilots that the server never heard of (a pool manager stopped
    between sbatch and the record) is recorded; one the server knows but Slurm no longer does
    (gone from squeue, and no accounting here for sacct) is judged by its pilot: none came."""
    pool = pools(unique('stray'), pilots=1, lifetime=600)
    stray = slurm('sbatch', '--parsable', '--hold', '--job-name=p3s-' + pool.name,
                  '--output=/dev/null', '--wrap', 'true').strip()
    server.api('POST', '/api/batchjobs', {'site': pool.name, 'system': 'slurm',
                                          'batchids': ['999999']})
    proc = pool.manage(check=None)
    done = json.loads(proc.stdout)
    assert done['recorded'] == [stray] and pool.batchjob(stray)['state'] == 'pending'
    assert [(j['batchid'], j['state']) for j in done['ended']] == [('999999', 'never_registered')]
    assert 'no Slurm accounting' in proc.stderr


def test_a_pilot_started_by_hand_in_slurm_knows_its_batch_job_and_its_end(
        pools, clients, server, tmp_path):
    pool = pools(unique('byhand'))
    pilot = ' '.join([sys.executable, '-S', os.path.join(ROOT, 'p3s_pilot.py'), '--site',
                      pool.name, '--cycles', '1', '--wait', '0', '--period', '0'])
    batchid = slurm('sbatch', '--parsable', '--time=3', '--job-name=p3s-' + pool.name,
                    '--output=%s/%%j.out' % tmp_path, '--wrap', pilot, env=clients.env()).strip()
    wait_for(lambda: pool.in_slurm().get(batchid) == 'COMPLETED', 60, 0.5, what='the pilot')
    [registered] = pool.pilots()
    assert registered['extra'] == 'slurm:' + batchid           # from SLURM_JOB_ID
    [end] = re.findall(r'leaves within (\d+) s', clients.pilot_logs())
    assert 120 <= int(end) <= 180                              # squeue's end of its 3 minutes


# -- the examples of docs/batch.md, as written ---------------------------------------------------


def doc_blocks(language='text'):
    """The fenced blocks of docs/batch.md with this language tag, in order."""
    blocks, current = [], None
    for line in open(os.path.join(ROOT, 'docs', 'batch.md')).read().splitlines(True):
        if current is None and line.startswith('```'):
            current, tag = [], line[3:].strip()
        elif current is not None and line.startswith('```'):
            if tag == language:
                blocks.append(''.join(current))
            current = None
        elif current is not None:
            current.append(line)
    return blocks


def doc_env(clients, tmp_path):
    return clients.env({'P3S_BATCHLOG': str(tmp_path / 'batch')})


def test_the_walk_through_runs_as_written(pools, clients, server, tmp_path):
    """docs/batch.md's `slurm` block, line by line from the repository's root, against the test
    server (P3S_SERVER); its job runs in a batch pilot; the printed submissions are the ones the
    page shows."""
    pool = pools('slurmsite')                                  # its batch jobs go at the end
    [walk] = doc_blocks('slurm')
    outputs = []
    for line in walk.strip().split('\n'):
        proc = subprocess.run(['bash', '-e', '-c', line], cwd=ROOT, env=doc_env(clients, tmp_path),
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, (line, proc.stdout, proc.stderr)
        outputs.append(proc.stdout)
    [job] = server.jobs(site='slurmsite')
    wait_for(lambda: server.job(job['uuid'])['state'] == 'finished', 60, what='the job to run')
    out = (clients.joblog / (job['uuid'] + '.out')).read_text()
    assert out == 'hello from a pilot in a batch job\n'
    [batchjob] = pool.batchjobs()
    assert batchjob['pilot'] == server.job(job['uuid'])['pilot']
    assert 'slurm   %s' % batchjob['batchid'] in outputs[5]
    # the samples on the page are what --dry-run prints, the paths of this test aside
    common = [(ROOT + '/', '/path/to/'), (server.url, 'http://127.0.0.1:8080/'),
              (str(tmp_path / 'batch'), '/tmp/USER/p3s/batch')]
    slurm_run, condor = outputs[3], outputs[6]
    for real, shown in common + [('http://127.0.0.1:8080/', 'http://HOST:PORT/')]:
        slurm_run = slurm_run.replace(real, shown)
    script = doc_blocks()[0]
    assert script in slurm_run, slurm_run
    for real, shown in common:
        condor = condor.replace(real, shown)
    sample = [b for b in doc_blocks() if b.startswith('# p3s pilots of site')][0]
    assert re.sub(r'queue \d+', 'queue N', condor.split('\n', 1)[1]) == \
        re.sub(r'queue \d+', 'queue N', sample)


def test_cron_and_the_service_run_as_written(pools, clients, server, tmp_path):
    """The crontab line with the two files in ~/p3s, and the unit's ExecStart in its
    WorkingDirectory (a copy here): each runs a cycle of the pool manager."""
    clients.run('pilot', '--define-site', os.path.join(ROOT, 'examples', 'slurmsite.json'),
                check=0)
    pools('slurmsite')
    home = tmp_path / 'home'
    (home / 'p3s').mkdir(parents=True)
    for name in ('p3s_batch.py', 'p3s_pilot.py'):
        shutil.copy(os.path.join(ROOT, name), home / 'p3s')
    [crontab] = [b for b in doc_blocks() if b.startswith('*/5 ')]
    command = crontab.strip().split(None, 5)[5]
    env = dict(doc_env(clients, tmp_path), HOME=str(home))
    subprocess.run(['/bin/sh', '-c', command], env=env, check=True, timeout=120)
    log = (home / 'p3s' / 'batch.log').read_text()
    assert ' site slurmsite (slurm): 0 live pilots' in log.split('\n')[0], log
    [unit] = [b for b in doc_blocks() if b.startswith('[Unit]')]
    fields = dict(re.findall(r'^(\w+)=(.*)$', unit, re.M))
    assert fields['WorkingDirectory'] == '/opt/p3s' and fields['Restart'] == 'on-failure'
    name, value = fields['Environment'].split('=', 1)
    env = dict(doc_env(clients, tmp_path), **{name: value})
    env[name] = server.url                                     # this test's server, not :8080
    service = subprocess.Popen(fields['ExecStart'].split(), cwd=home / 'p3s', env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert ' site slurmsite (slurm): ' in service.stdout.readline()
    finally:
        service.send_signal(signal.SIGTERM)
        service.communicate(timeout=30)


def test_the_slurm_conf_on_the_page_is_the_one_the_tests_use(cluster):
    shown = [b for b in doc_blocks() if b.startswith('# written by p3s')][0]
    used = open('/etc/slurm/slurm.conf').read()
    host = socket.gethostname().split('.')[0]
    for want, got in zip(shown.replace('HOST', host).splitlines(), used.splitlines()):
        if want.startswith('NodeName='):                       # this machine's CPUs and memory
            want, got = want.split(' CPUs=')[0], got.split(' CPUs=')[0]
        assert want == got
    assert len(shown.splitlines()) == len(used.splitlines())
