"""Data files, -g and the injector (p3s_data.py --watch), end to end with the real server and
real client processes; the sampling function and workflow deadlines in process."""
import hashlib
import json
import os
import subprocess
import sys
import threading

import pytest

import p3s_data
import p3s_server as srv
from conftest import ROOT, fresh_database, make_job, script

DATA = os.path.join(ROOT, 'tests', 'data')
T0 = '2026-01-01T00:00:00.000000+00:00'


@pytest.fixture
def inbox(tmp_path):
    d = tmp_path / 'inbox'
    d.mkdir()
    return d


def template(tmp_path, jobs=None):
    path = tmp_path / 'template.json'
    path.write_text(json.dumps(jobs or [make_job('/bin/true', env={'P3S_INPUT_FILE': 'dummy'})]))
    return str(path)


def arrive(directory, names, size=100, mtime=None):
    """Complete files, with an old modification time unless given."""
    for i, name in enumerate(names):
        path = directory / name
        path.write_bytes(b'x' * size)
        t = (mtime or 1_700_000_000) + i
        os.utime(path, (t, t))
    return [str(directory / n) for n in names]


def watch(clients, inbox, *args, check=0):
    return clients.run('data', '--watch', str(inbox), '--pattern', 'np04_*.root', '--settle',
                       '0.2', '--period', '0', *args, check=check)


def infiles(server):
    return sorted(j['env']['P3S_INPUT_FILE'] for j in server.jobs())


# -- data records and -g ----------------------------------------------------------------------


def test_register_get_adjust_delete(clients, server, tmp_path):
    assert clients.run('data', '-G', '-f', 'run1.root', check=0).stdout == '[]\n'
    data_uuid = clients.run('data', '-r', '-j', '{"name": "run1.root", "datatype": "ROOT"}',
                            env={'P3S_DIRPATH': '/data/np04'}, check=0).stdout.strip()
    [record] = json.loads(clients.run('data', '-G', '-f', 'run1.root', check=0).stdout)
    assert (record['uuid'], record['dirpath'], record['state']) == (data_uuid, '/data/np04',
                                                                    'defined')
    clients.run('data', '-a', data_uuid, '-j', '{"state": "merged", "comment": "ok"}', check=0)
    assert server.api('GET', '/api/data/' + data_uuid)[1]['state'] == 'merged'
    listed = json.loads(clients.run('data', '--list', '--json', check=0).stdout)
    assert listed['datatypes'] == [] and [d['uuid'] for d in listed['data']] == [data_uuid]
    clients.run('data', '-d', '-u', data_uuid, check=0)
    assert clients.run('data', '-G', '-f', 'run1.root', check=0).stdout == '[]\n'
    assert 'no such data' in clients.run('data', '-d', '-u', data_uuid, check=1).stderr
    assert clients.run('data', '-r', '-j', '{"dirpath": "/x"}', check=1).stderr.startswith(
        'p3s_data: error: server: name is required')


def test_generate_skips_registered_files_unless_again(clients, server, tmp_path):
    tpl = template(tmp_path, [make_job('/bin/true', jobtype='evd'),
                              make_job('/bin/true', jobtype='crt', priority='3')])
    first = clients.run('data', '-g', '-J', tpl, '-f', 'np04_1.root', '-i', '/raw', '-T', 'ROOT',
                        check=0).stdout.split()
    assert len(first) == 2
    assert {j['env']['P3S_INPUT_FILE'] for j in server.jobs()} == {'/raw/np04_1.root'}
    [record] = json.loads(clients.run('data', '-G', '-f', 'np04_1.root', check=0).stdout)
    assert (record['dirpath'], record['datatype'], record['targetuuid']) == ('/raw', 'ROOT',
                                                                              first[1])
    again = clients.run('data', '-g', '-J', tpl, '-f', '/raw/np04_1.root', check=0).stdout
    assert 'registered already' in again and len(server.jobs()) == 2
    clients.run('data', '-g', '-J', tpl, '-f', '/raw/np04_1.root', '-A', check=0)
    assert len(server.jobs()) == 4
    assert len(json.loads(clients.run('data', '-G', '-f', 'np04_1.root', check=0).stdout)) == 2


# -- the injector ------------------------------------------------------------------------------


def test_injector_exactly_once_across_scans_and_restarts(clients, server, inbox, tmp_path):
    tpl = template(tmp_path)
    files = arrive(inbox, ['np04_%03d.root' % i for i in range(20)])
    arrive(inbox, ['other.root'])
    out = watch(clients, inbox, '--job', tpl, '--cycles', '2').stdout
    assert out.count('submitted') == 20
    assert infiles(server) == files
    watch(clients, inbox, '--job', tpl)                    # a restart: nothing new
    assert infiles(server) == files
    files += arrive(inbox, ['np04_1%03d.root' % i for i in range(5)])
    out = watch(clients, inbox, '--job', tpl, '--json').stdout
    statuses = [json.loads(line)['status'] for line in out.splitlines()]
    assert (statuses.count('seen'), statuses.count('submitted')) == (20, 5)
    assert infiles(server) == sorted(files)
    data = server.api('GET', '/api/data?limit=1000')[1]['data']
    assert len(data) == 25 and {d['state'] for d in data} == {'defined'}


def test_two_injectors_at_once_submit_each_file_once(clients, server, inbox, tmp_path):
    tpl = template(tmp_path, [make_job('/bin/true', jobtype='a'),
                              make_job('/bin/true', jobtype='b')])
    files = arrive(inbox, ['np04_%03d.root' % i for i in range(60)])
    cmd = [sys.executable, '-S', script('p3s_data.py'), '--watch', str(inbox), '--pattern',
           'np04_*.root', '--job', tpl, '--settle', '0', '--cycles', '3', '--period', '0']
    procs = [subprocess.Popen(cmd, env=clients.env(), stdout=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0]
    assert sum(o.count('submitted') for o in outs) == 60
    assert infiles(server) == sorted(files * 2)


def test_fraction_is_stable_and_skipped_files_are_recorded(clients, server, inbox, tmp_path):
    names = ['np04_raw_run%06d.root' % i for i in range(200)]
    arrive(inbox, names)
    watch(clients, inbox, '--job', template(tmp_path), '--fraction', '0.3')
    taken = {os.path.basename(f) for f in infiles(server)}
    assert taken == {n for n in names if hash_share(n) < 0.3}
    assert 40 <= len(taken) <= 80
    skipped = server.api('GET', '/api/data?state=skipped&limit=1000')[1]['data']
    assert {d['name'] for d in skipped} == set(names) - taken
    watch(clients, inbox, '--job', template(tmp_path))    # sampled-out files stay skipped
    assert len(server.jobs()) == len(taken)


def hash_share(name):
    """The documented, stable sampling rule: the first 8 bytes of the name's SHA-256 as a share
    of 2**64. Written out here so that a change of the rule (which would flip the answer for
    files already seen) fails the tests."""
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], 'big') / 2 ** 64


@pytest.mark.parametrize('fraction', [0.05, 0.3, 0.5, 0.9])
def test_sampling_is_close_to_the_fraction(fraction):
    names = ['np04_raw_run%06d_%04d.root' % (i // 7, i) for i in range(20000)]
    rate = sum(p3s_data.sampled(n, fraction) for n in names) / len(names)
    assert all(p3s_data.sampled(n, fraction) == (hash_share(n) < fraction) for n in names[:500])
    assert abs(rate - fraction) < 0.02
    assert p3s_data.sampled(names[0], 0) is False and p3s_data.sampled(names[0], 1) is True


def test_growing_and_small_files_are_not_taken_early(clients, server, inbox, tmp_path):
    tpl = template(tmp_path)
    [done] = arrive(inbox, ['np04_done.root'])
    [small] = arrive(inbox, ['np04_small.root'], size=10)
    growing = inbox / 'np04_growing.root'
    stop = threading.Event()

    def write():
        with open(growing, 'ab') as f:
            while not stop.is_set():
                f.write(b'y' * 1000)
                f.flush()
                stop.wait(0.02)

    writer = threading.Thread(target=write)
    writer.start()
    try:
        watch(clients, inbox, '--job', tpl, '--min-size', '50', '--settle', '0.5')
    finally:
        stop.set()
        writer.join()
    assert infiles(server) == [done]
    watch(clients, inbox, '--job', tpl, '--min-size', '50')
    assert infiles(server) == sorted([done, str(growing)])


def test_max_files_takes_the_oldest_first(clients, server, inbox, tmp_path):
    tpl = template(tmp_path)
    files = arrive(inbox, ['np04_%d.root' % i for i in (5, 4, 3, 2, 1)])   # mtime: 5 oldest
    watch(clients, inbox, '--job', tpl, '--max-files', '2')
    assert infiles(server) == sorted(files[:2])
    watch(clients, inbox, '--job', tpl, '--max-files', '2', '--cycles', '2')
    assert infiles(server) == sorted(files)


def test_injector_makes_a_workflow_per_file(clients, server, inbox, tmp_path):
    datadir = tmp_path / 'p3sdata'
    datadir.mkdir()
    dag = tmp_path / '1filter.graphml'
    dag.write_text(open(os.path.join(DATA, '1filter.graphml')).read().replace('@DATADIR@',
                                                                              str(datadir)))
    clients.run('data', '-R', '-j', os.path.join(DATA, 'txtDataType.json'), check=0)
    clients.run('workflow', '-g', str(dag), check=0)
    [path] = arrive(inbox, ['np04_1.root'])
    (inbox / 'np04_1.root').write_text('TEST\nTEST\nfoo\n')
    out = watch(clients, inbox, '--dag', '1filter', '--json', '--deadline', '600').stdout
    result = json.loads(out)
    status, wf = server.api('GET', '/api/workflows/' + result['workflow'])
    assert status == 200 and wf['state'] in ('defined', 'running')
    [flt] = [j for j in server.jobs(workflow=result['workflow']) if j['jobtype'] == 'filter']
    assert flt['env']['INPTXT'] == path and flt['deadline'] == 600 and flt['deadline_at']
    clients.run_pilot('--wait', '5')
    out_file = flt['env']['OUTTXT']
    assert open(out_file).read().strip() == '2'
    assert len(server.jobs(workflow=result['workflow'])) == 3
    assert server.api('GET', '/api/jobs?workflow=' + result['workflow'])[1]['jobs']
    watch(clients, inbox, '--dag', '1filter')             # the file is taken once
    assert len(server.api('GET', '/api/workflows')[1]['workflows']) == 1
    wf_uuid = clients.run('workflow', '-a', '1filter', '-s', 'defined', '--deadline', '300',
                          check=0).stdout.strip()
    assert {j['deadline'] for j in server.jobs(workflow=wf_uuid)} == {300}


def test_injector_refusals_and_unreachable_server(clients, inbox, tmp_path):
    arrive(inbox, ['np04_1.root'])
    assert 'no such DAG' in watch(clients, inbox, '--dag', 'nosuch', check=1).stderr
    assert watch(clients, inbox, '--job', str(tmp_path / 'missing.json'), check=4).stderr
    assert watch(clients, inbox, check=2).stderr.startswith('p3s_data: error: --watch needs')
    proc = clients.run('data', '--watch', str(inbox), '--job', template(tmp_path), '--settle',
                       '0', '-S', 'http://127.0.0.1:1/', check=3)
    assert proc.stderr.startswith('p3s_data: error: cannot reach the server')


def test_the_injector_refuses_a_directory_that_is_not_one(clients, server, tmp_path):
    """A wrong --watch is said at once (exit 4), even when asked to scan for ever; a directory
    that goes away while watching is said at each scan."""
    template(tmp_path)
    for where, reason in ((tmp_path / 'no-such-dir', 'no such directory: '),
                          (tmp_path / 'template.json', 'is not a directory: --watch takes')):
        proc = clients.run('data', '--watch', str(where), '--job', template(tmp_path),
                           '--cycles', '0', timeout=30)
        assert proc.returncode == 4 and proc.stdout == '', proc
        assert proc.stderr.startswith('p3s_data: error: ') and reason in proc.stderr
        assert proc.stderr.count('\n') == 1
    gone = tmp_path / 'gone'
    gone.mkdir()
    injector = subprocess.Popen(
        [sys.executable, '-S', os.path.join(ROOT, 'p3s_data.py'), '--watch', str(gone),
         '--job', template(tmp_path), '--cycles', '0', '--period', '0.1', '--settle', '0',
         '-S', server.url], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert injector.stderr.readline().startswith('p3s_data: watching %s for * every 0.1 s'
                                                     % gone)
        gone.rmdir()
        line = injector.stderr.readline()
        assert line == 'p3s_data: warning: %s is not a directory now; looking again at the ' \
            'next scan\n' % gone, line
    finally:
        injector.kill()
        injector.communicate()


def test_service_messages_from_the_client(clients, server):
    clients.run('data', '--service', 'merge', '-m', 'merged 12 files', check=0)
    clients.run('data', '--service', 'merge', '-m', 'merged 3 files', check=0)
    notes = json.loads(clients.run('data', '--service', 'merge', '--json', check=0).stdout)
    assert [n['message'] for n in notes['services']] == ['merged 3 files', 'merged 12 files']


# -- in process: workflow deadlines -------------------------------------------------------------


def test_workflow_jobs_inherit_the_deadline_and_stale_fails_the_workflow(tmp_path):
    st = srv.configure(fresh_database(tmp_path, 'unit.db'))
    try:
        text = open(os.path.join(DATA, '1filter.graphml')).read().replace('@DATADIR@', '/d')
        srv.add_datatype(st, {'name': 'TXT', 'ext': '.txt'}, T0)
        srv.add_dag(st, {'name': '1filter', 'graphml': text}, T0)
        wf = srv.add_workflow(st, {'dag': '1filter', 'deadline': 60}, T0)
        later = '2026-01-01T00:01:40.000000+00:00'
        srv.set_workflow_state(st, wf['uuid'], {'state': 'defined'}, later)
        jobs = srv.list_jobs(st, {'workflow': wf['uuid']})
        assert {j['deadline_at'] for j in jobs} == {'2026-01-01T00:02:40.000000+00:00'}
        [flt] = [j for j in jobs if j['jobtype'] == 'filter']
        assert flt['state'] == 'defined'
        assert srv.sweep(st, '2026-01-01T00:02:41.000000+00:00', 1e9)['stale_jobs'] == 1
        assert srv.get_job(st, flt['uuid'])['state'] == 'stale'
        assert srv.get_workflow(st, wf['uuid'])['state'] == 'failed'
    finally:
        st.close()
