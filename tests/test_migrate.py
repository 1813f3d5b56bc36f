"""migrate: a laptop's SQLite history moved whole to PostgreSQL. A real server, the real clients
and real pilots make the history on an SQLite file; `p3s_server.py migrate` moves it; the real
server then serves the copy on PostgreSQL, says the same of everything, and goes on from it."""
import hashlib
import json
import os
import re
import sqlite3
import subprocess
import sys
import urllib.request

import p3s_server as srv
from conftest import (ROOT, Clients, Server, database_connection, make_job, postgres, script,
                      wait_for)
from test_workflows import NOOP, graphml, shell_job, txt

# What the API says of each kind of record: its listing, and each record's own page.
LISTINGS = {'/api/jobs': ('jobs', 'uuid', '/api/jobs/%s?logs=1'),
            '/api/pilots': ('pilots', 'uuid', '/api/pilots/%s'),
            '/api/dags': ('dags', 'name', '/api/dags/%s'),
            '/api/workflows': ('workflows', 'uuid', '/api/workflows/%s'),
            '/api/data': ('data', 'uuid', '/api/data/%s'),
            '/api/batchjobs': ('batchjobs', 'id', '/api/batchjobs/%s'),
            '/api/sites': ('sites', 'name', '/api/sites/%s/pool'),
            '/api/datatypes': ('datatypes', None, None),
            '/api/jobtypes': ('jobtypes', None, None),
            '/api/services': ('services', None, None)}
# The counters of ends, which the database itself keeps (sharded on PostgreSQL).
COUNTERS = re.compile(r'^p3s_(?:jobs|workflows)_ended_total\{.*$', re.M)


def migrate(source, target):
    return subprocess.run([sys.executable, script('p3s_server.py'), 'migrate', '--from',
                           str(source), '--to', target], capture_output=True, text=True,
                          cwd=ROOT, timeout=300)


def refused(proc, *words):
    """A refusal: a non-zero exit, nothing on stdout and one line on stderr saying why."""
    assert proc.returncode != 0 and proc.stdout == '', proc
    assert proc.stderr.startswith('p3s_server: error: '), proc.stderr
    assert proc.stderr.count('\n') == 1, proc.stderr
    for word in words:
        assert word in proc.stderr, proc.stderr
    return proc.stderr


def read_only(path):
    db = sqlite3.connect('file:%s?mode=ro' % path, uri=True)
    db.row_factory = sqlite3.Row
    return db


def fingerprint(path):
    with open(path, 'rb') as f:
        return hashlib.sha256(f.read()).hexdigest()


def rows(db, tables=None):
    """Every row of each table of schema.sql (as a dict), in a stable order."""
    return {t: sorted((dict(r) for r in db.execute('SELECT * FROM %s' % srv.quoted(t))),
                      key=lambda r: json.dumps(r, sort_keys=True))
            for t in tables or srv.schema_tables()}


def target_rows(url):
    db = database_connection(url)
    try:
        return rows(db)
    finally:
        db.close()


def unsharded(tables):
    """PostgreSQL's counters of ends as SQLite keeps them: one row per key, no shard."""
    for table in ('job_ends', 'workflow_ends'):
        for row in tables[table]:
            assert row.pop('shard') == 0            # copied rows keep the column's default
    return tables


def seen(server):
    """Everything the server says of the history: each listing, each record's page, the
    counters of ends."""
    got = {}
    for path, (key, field, page) in LISTINGS.items():
        status, got[path] = server.api('GET', path)
        assert status == 200 and got[path][key], (path, got[path])
        for record in got[path][key] if page else ():
            status, detail = server.api('GET', page % record[field])
            assert status == 200, (page, record, detail)
            got[page % record[field]] = timeless(detail)
    with urllib.request.urlopen(server.url + 'metrics', timeout=30) as r:
        got['/metrics'] = sorted(COUNTERS.findall(r.read().decode()))
    assert got['/metrics']
    return got


def timeless(value):
    """What the API says, less the seconds it counts from now (a queued job's wait, a batch
    job's age): the times they count from are compared as stored."""
    if isinstance(value, dict):
        return {k: timeless(v) for k, v in value.items() if k not in ('seconds', 'age')}
    if isinstance(value, list):
        return [timeless(v) for v in value]
    return value


def ended(server, uuids):
    return all(server.job(u)['state'] in srv.TERMINAL_STATES for u in uuids)


def make_history(tmp_path, clients, server):
    """A laptop's history through the real clients: finished and failed jobs with their logs,
    a retried job, a template and queued jobs, workflows from a DAG (finished, failed, a
    template), an injected file, a site with its pool settings, capped and paused types,
    service messages, batch jobs, and pilots that ran and were drained. Returns the uuids of
    the failed job and of its retry."""
    clients.run('data', '-R', '-j', '{"name": "TXT", "ext": ".txt", "comment": "text"}',
                check=0)
    site = tmp_path / 'np04.json'
    site.write_text(json.dumps({'name': 'np04', 'period': 0.5, 'beat': 1, 'env': {'SITE': 'np04'},
                                'pilots': 2, 'lifetime': 3600, 'max_pending': 3,
                                'partition': 'debug', 'comment': 'the laptop'}))
    clients.run('pilot', '--define-site', str(site), check=0)
    clients.run('job', '-l', '-L', '1', '-T', 'reco', check=0)
    clients.run('job', '-l', '-L', '0', '-T', 'paused', check=0)
    datadir = tmp_path / 'wfdata'
    datadir.mkdir()
    for name, first in (('chain', 'echo made > $F'), ('broken', 'exit 3')):
        dag = tmp_path / (name + '.graphml')
        dag.write_text(graphml({'first': shell_job(first), 'second': shell_job('cat $F'),
                                'end': NOOP},
                               [('first', 'second', txt('f', 'F', str(datadir))),
                                ('second', 'end', txt('g', 'G', str(datadir)))]))
        clients.run('workflow', '-g', str(dag), check=0)
    flows = [clients.run('workflow', '-a', dag, '-s', 'defined', '-n', 'night', check=0)
             .stdout.strip() for dag in ('chain', 'broken')]
    clients.run('workflow', '-a', 'chain', '-D', 'for later', check=0)
    ok, bad, reco, tpl, paused = clients.submit([
        make_job('/bin/echo hello', name='ok', env={'A': '{"json": [1, 2]}'}, priority='5'),
        make_job('/bin/false', name='bad'), make_job('/bin/true', jobtype='reco', retries=2),
        make_job('/bin/true', name='tpl', state='template'),
        make_job('/bin/true', name='held', jobtype='paused')])
    template = tmp_path / 'inject.json'
    template.write_text(json.dumps([make_job('/bin/true', jobtype='evd')]))
    injected = clients.run('data', '-g', '-J', str(template), '-f', 'np04_1.root', '-i', '/raw',
                           '-T', 'TXT', check=0).stdout.split()
    server.api('POST', '/api/batchjobs', {'site': 'np04', 'system': 'slurm',
                                          'batchids': ['101', '102']})
    pilot = clients.pilot('--site', 'np04', '--cycles', '0', '--wait', '1', '--extra',
                          'slurm:101')
    wait_for(lambda: ended(server, [ok, bad, reco] + injected), timeout=60, what='the jobs')
    wait_for(lambda: all(server.api('GET', '/api/workflows/' + wf)[1]['state'] in
                         ('finished', 'failed') for wf in flows), timeout=60, what='workflows')
    [retry] = clients.run('job', '--retry', '-u', bad, check=0).stdout.split()[3:4]
    wait_for(lambda: ended(server, [retry]), what='the retry')
    clients.run('data', '--service', 'merge', '-m', 'merged 3 files', check=0)
    clients.run('data', '--service', 'backup', '-m', 'nothing to do', check=0)
    me = server.job(ok)['pilot']
    clients.run('pilot', '--drain', me, check=0)
    assert pilot.wait(30) == 0
    server.api('POST', '/api/batchjobs/update', {'site': 'np04', 'system': 'slurm', 'jobs': [
        {'batchid': '101', 'state': 'finished'},
        {'batchid': '102', 'state': 'failed', 'reason': 'node failure', 'output': 'oops'}]})
    assert server.job(paused)['state'] == 'defined' and server.job(tpl)['state'] == 'template'
    return bad, retry


def test_a_laptop_history_moves_whole_and_goes_on(tmp_path):
    laptop = tmp_path / 'laptop.db'
    old = Server(tmp_path, db=str(laptop)).start()
    clients = Clients(tmp_path, old)
    try:
        bad, retry = make_history(tmp_path, clients, old)
        wait_for(lambda: 'does the housekeeping' in old.log_path.read_text(),
                 what='the housekeeping lock taken')
        target = postgres().new_database()
        refused(migrate(laptop, target), 'a p3s server is serving', 'stop it first')
        assert target_rows_or_none(target) is None
        before = seen(old)
    finally:
        clients.cleanup()
        old.stop()
    history, source = fingerprint(laptop), rows(read_only(laptop))

    proc = migrate(laptop, target)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    said = dict(re.match(r'^(\w+) +(\d+) rows$', line).groups() for line in lines[:-2])
    assert list(said) == srv.schema_tables()
    assert {t: int(n) for t, n in said.items()} == {t: len(r) for t, r in source.items()}
    assert all(source[t] for t in said), [t for t in said if not source[t]]   # all made
    assert lines[-2].startswith('integrity: ') and 'ok' in lines[-2]
    assert re.match(r'^migrated \d+ rows of 18 tables from .* in [\d.]+ s$', lines[-1])
    assert fingerprint(laptop) == history              # the source is only read
    assert unsharded(target_rows(target)) == source    # every row, as it was

    new = Server(tmp_path, db=target).start()
    clients = Clients(tmp_path, new)
    try:
        assert seen(new) == before
        assert new.job(retry)['retry_of'] == bad and new.job(retry)['attempt'] == 2
        [fresh] = clients.submit([make_job('/bin/echo again', jobtype='fresh')])
        clients.run_pilot('--jobtypes', 'fresh', '--cycles', '1', '--wait', '5')
        assert new.job(fresh)['state'] == 'finished'
        db = database_connection(target)
        try:
            last = max(r['id'] for r in source['jobs'])
            assert db.execute('SELECT id FROM jobs WHERE uuid = :uuid',
                              {'uuid': fresh}).fetchone()['id'] == last + 1
        finally:
            db.close()
    finally:
        clients.cleanup()
        new.stop()
    served = target_rows(target)
    refused(migrate(laptop, target), 'holds p3s records already', 'jobs')
    assert target_rows(target) == served               # the target is left as it was


def small_source(path):
    """A p3s database made by the server itself, with a job and a datatype."""
    st = srv.configure(str(path))
    try:
        now = srv.utcnow()
        srv.submit_jobs(st, [{'payload': '/bin/true', 'jobtype': 'reco'}], now)
        srv.add_datatype(st, {'name': 'TXT', 'ext': '.txt'}, now)
    finally:
        st.close()
    return path


def test_bad_sources_are_refused_in_one_line(tmp_path):
    target = postgres().new_database()
    foreign = tmp_path / 'other.db'
    db = sqlite3.connect(str(foreign))
    db.execute('CREATE TABLE notes (text TEXT)')
    db.commit()
    db.close()
    text = tmp_path / 'notes.txt'
    text.write_text('not a database\n' * 100)
    newer = tmp_path / 'newer.db'
    small_source(newer)
    db = sqlite3.connect(str(newer))
    db.execute('PRAGMA user_version = 99')
    db.close()
    before = {p: fingerprint(p) for p in (foreign, text, newer)}
    for source, words in ((tmp_path / 'missing.db', ('no database at',)),
                          (foreign, ('is not a p3s database',)),
                          (text, ('is not an SQLite database',)),
                          (tmp_path, ('is not an SQLite database',)),
                          (newer, ('schema version 99, newer',))):
        refused(migrate(source, target), str(source), *words)
    assert {p: fingerprint(p) for p in before} == before
    assert not os.path.exists(tmp_path / 'missing.db')
    assert target_rows_or_none(target) is None          # nothing made there


def target_rows_or_none(url):
    """None while the target holds no p3s table."""
    db = database_connection(url)
    try:
        if db.execute("SELECT to_regclass('jobs') IS NULL AS absent").fetchone()['absent']:
            return None
    finally:
        db.close()
    return target_rows(url)


def test_bad_targets_are_refused_in_one_line(tmp_path):
    source = small_source(tmp_path / 'p3s.db')
    unknown = postgres().dsn('no_such_database')
    refused(migrate(source, 'sqlite:///tmp/x.db'), 'takes a PostgreSQL URL')
    refused(migrate(source, unknown), 'cannot open the database', 'no_such_database')
    for url in ('postgresql://p3s:secret@[::1/x', 'postgresql://p3s:secret@127.0.0.1:1/x'):
        assert 'secret' not in refused(migrate(source, url), 'cannot open the database')


def test_a_target_with_any_p3s_record_is_refused_and_left_as_it_was(tmp_path):
    """Even a record that would not collide with any copied one (a datatype of its own)."""
    source = small_source(tmp_path / 'p3s.db')
    target = postgres().new_database()
    st = srv.configure(target)
    srv.add_datatype(st, {'name': 'ROOT', 'ext': '.root'}, srv.utcnow())
    st.close()
    before = target_rows(target)
    refused(migrate(source, target), 'holds p3s records already (datatypes)')
    assert target_rows(target) == before


def test_all_or_nothing(tmp_path):
    """A row PostgreSQL refuses (a job's log whose job is gone, written with the foreign keys
    off) fails the whole migration: the target is left without even the schema."""
    source = small_source(tmp_path / 'p3s.db')
    db = sqlite3.connect(str(source))
    db.execute("INSERT INTO joblogs (job, stdout) VALUES ('no-such-job', 'orphan')")
    db.commit()
    db.close()
    target = postgres().new_database()
    refused(migrate(source, target), 'nothing was migrated', 'foreign key')
    assert target_rows_or_none(target) is None


def test_an_older_source_is_brought_up_to_date_in_a_copy(tmp_path):
    """A version 2 database (before pilots had secrets) moves as the server would have brought
    it up to date; the file itself stays at version 2, unchanged."""
    path = tmp_path / 'old.db'
    db = sqlite3.connect(str(path))
    with open(os.path.join(ROOT, 'tests', 'data', 'schema_version_2.sql')) as f:
        db.executescript(f.read())
    db.execute("INSERT INTO jobs (uuid, payload, state, created_at, stopped_at, attempt) VALUES "
               "('00000000-0000-0000-0000-00000000000a', '/bin/false', 'failed', 't', 't', 2)")
    db.execute("INSERT INTO pilots (uuid, state, registered_at, last_seen) VALUES "
               "('00000000-0000-0000-0000-00000000000b', 'stopped', 't', 't')")
    db.commit()
    db.close()
    before = fingerprint(path)
    target = postgres().new_database()
    proc = migrate(path, target)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith('%s has schema version 2: copied as brought up to version %d'
                                  % (path, srv.SCHEMA_VERSION))
    assert fingerprint(path) == before
    assert read_only(path).execute('PRAGMA user_version').fetchone()[0] == 2
    moved = target_rows(target)
    [job], [pilot] = moved['jobs'], moved['pilots']
    assert (job['uuid'], job['state'], job['attempt'], job['stopped_at']) == (
        '00000000-0000-0000-0000-00000000000a', 'failed', 2, 't')
    assert (pilot['uuid'], pilot['secret_hash']) == ('00000000-0000-0000-0000-00000000000b', None)
