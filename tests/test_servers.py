"""Several servers over one database, as several hosts would run them: clients and pilots given
a list of servers use the one that answers, and the loss of a server loses no job and runs none
twice. On SQLite the servers share one file; with P3S_TEST_DB=postgresql, one PostgreSQL."""
import collections
import os
import signal
import subprocess
import sys

import pytest

from conftest import (ON_POSTGRES, Clients, Server, fresh_database, make_job, runs_of, script,
                      wait_for)


def housekeepers(server):
    return [line for line in server.log_path.read_text().splitlines()
            if 'does the housekeeping' in line]


def two_servers(tmp_path, *args):
    """Two single-process servers on one database, each with a log of its own."""
    db = fresh_database(tmp_path)
    servers = []
    for name in ('first', 'second'):
        (tmp_path / name).mkdir()
        servers.append(Server(tmp_path / name, db=db,
                              extra_args=['--workers', '1'] + list(args)).start())
    return servers


def test_pilots_given_two_servers_lose_nothing_when_one_is_killed(tmp_path):
    """8 pilots, 1,000 jobs, two servers: kill -9 of the server doing the housekeeping in the
    middle of the run. Every job runs once and finishes; the pilots carry on with the other
    server, which takes up the housekeeping."""
    runs = tmp_path / 'runs.log'
    servers = two_servers(tmp_path, '--pilot-timeout', '5')
    clients = Clients(tmp_path, servers[0])
    both = '%s,%s' % (servers[0].url, servers[1].url)
    try:
        wait_for(lambda: any(housekeepers(s) for s in servers), what='a housekeeper')
        [leader] = [s for s in servers if housekeepers(s)]
        [other] = [s for s in servers if s is not leader]
        job = make_job('/bin/sh -c "echo $P3S_JOB_UUID >> %s"' % runs)
        uuids = clients.submit([job] * 1000, '-S', both)
        assert len(uuids) == 1000
        # Half the pilots list the housekeeper first, half the other: both servers are in use.
        orders = [both, '%s,%s' % (other.url, leader.url)]
        pilots = [clients.pilot('--server', orders[i % 2], '--cycles', '0', '--wait', '2',
                                '--beat', '1') for i in range(8)]
        wait_for(lambda: len(runs_of(runs)) >= 200, 120, what='200 jobs run')
        leader.proc.send_signal(signal.SIGKILL)
        leader.proc.wait(10)
        wait_for(lambda: len(other.jobs(state='finished')) == 1000, 180,
                 what='all 1,000 jobs finished')
        wait_for(lambda: housekeepers(other), 30, what='the other server to do the housekeeping')
        silent = other.register(host='silent')[0]
        wait_for(lambda: other.api('GET', '/api/pilots/' + silent)[1]['state'] == 'lost', 30,
                 what='a silent pilot to be found lost by the server left')
        for p in pilots:
            p.send_signal(signal.SIGTERM)
        for p in pilots:
            out, err = p.communicate(timeout=60)
            assert p.returncode == 0, err
        assert {j['state'] for j in other.jobs()} == {'finished'}
        ran = runs_of(runs)
        assert set(ran) == set(uuids)
        assert max(ran.values()) == 1, [u for u, n in ran.items() if n > 1]
        # No pilot was taken for lost: each moved to the other server at once.
        states = collections.Counter(p['state'] for p in other.api('GET', '/api/pilots')[1]
                                     ['pilots'] if p['uuid'] != silent)
        assert sum(states.values()) == 8 and not states['lost'], states
    finally:
        clients.cleanup()
        for s in servers:
            s.stop()


def test_a_client_given_a_list_uses_the_first_server_that_answers(tmp_path):
    """The first server of the list is away: the client asks the next. When none answers, the
    client says so in one line, naming the last it tried, and exits 3."""
    [first, second] = two_servers(tmp_path)
    try:
        first.stop(signal.SIGKILL)
        clients = Clients(tmp_path, second)
        listed = '%s,%s' % (first.url, second.url)
        [job] = clients.submit([make_job('/bin/true')], '-S', listed)
        assert second.job(job)['state'] == 'defined'
        shown = clients.run('job', '-S', listed, '--show', job, check=0)
        assert job in shown.stdout
        second.stop(signal.SIGKILL)
        gone = clients.run('job', '-S', listed, '-l', check=3)
        assert gone.stderr.count('\n') == 1 and second.url in gone.stderr, gone.stderr
    finally:
        first.stop()
        second.stop()


def test_a_bad_server_in_a_list_is_a_usage_error(tmp_path):
    proc = subprocess.run([sys.executable, '-S', script('p3s_job.py'), '-S',
                           'http://127.0.0.1:1/,ftp://x', '-l'], capture_output=True, text=True,
                          timeout=30)
    assert proc.returncode == 2 and "'ftp://x' is not a server URL" in proc.stderr, proc.stderr
    assert proc.stderr.count('\n') == 1


def test_pilots_handed_a_list_pass_it_to_their_payloads(tmp_path):
    """A payload that calls p3s itself (a job that submits jobs) gets the pilot's whole list."""
    [first, second] = two_servers(tmp_path)
    clients = Clients(tmp_path, first)
    listed = '%s,%s' % (first.url, second.url)
    seen = tmp_path / 'seen'
    try:
        clients.submit([make_job('/bin/sh -c "echo $P3S_SERVER > %s"' % seen)])
        clients.run_pilot('--server', listed, '--cycles', '1', '--wait', '5')
        assert seen.read_text().strip() == listed
    finally:
        clients.cleanup()
        first.stop()
        second.stop()


def test_the_database_may_come_from_the_environment(server, tmp_path):
    """P3S_DB in place of --db (a PostgreSQL URL's password stays out of the process list)."""
    assert server.api('POST', '/api/jobs', [{'payload': '/bin/true'}])[0] == 200
    elsewhere = tmp_path / 'elsewhere'             # no ./p3s.db there
    elsewhere.mkdir()
    proc = subprocess.run([sys.executable, script('p3s_server.py'), 'check'], cwd=elsewhere,
                          capture_output=True, text=True, timeout=60,
                          env=dict(os.environ, P3S_DB=server.db))
    assert proc.returncode == 0 and 'jobs: defined 1' in proc.stdout, proc.stdout + proc.stderr


def test_a_server_starting_beside_running_ones_holds_up_no_write(tmp_path):
    """A server (or `check`) that opens a database already at its schema version runs no DDL:
    its CREATE INDEX IF NOT EXISTS would wait for every open write on the table, and hold up
    every write after it (or deadlock with one)."""
    if not ON_POSTGRES:
        pytest.skip('SQLite has one writer at a time: its schema waits its turn like a write')
    import psycopg
    server = Server(tmp_path).start()                   # the schema is made
    try:
        with psycopg.connect(server.db) as writer:
            writer.execute('LOCK TABLE jobs IN ROW EXCLUSIVE MODE')     # as any write holds
            check = subprocess.run([sys.executable, script('p3s_server.py'), 'check', '--db',
                                    server.db], capture_output=True, text=True, timeout=30)
            writer.rollback()
        assert check.returncode == 0, check.stderr
    finally:
        server.stop()
