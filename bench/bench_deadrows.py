#!/usr/bin/env python3
"""Claim cost after 10^6 jobs have been run and purged, against an empty table: SQLite and
PostgreSQL.

A job's life leaves dead rows behind on PostgreSQL: every change of its state writes a new
version of its row (and new index entries: `state` is indexed), and the purge deletes it; until
vacuum removes them, the queue index's entries of jobs long claimed still point at dead rows,
ahead of the jobs queued now. SQLite frees a deleted row's space at once.

1. Empty: a new database (the server's schema), 1,000 jobs queued; the claim is timed (on
   PostgreSQL once autovacuum has analyzed the table, as it does within a minute of a new
   table's first jobs: before that the planner has no statistics and sorts the whole queue).
2. Run and purged: a new database through which 10^6 jobs pass in batches of 10,000, each batch
   as the server would leave it, in bulk SQL through the real schema and the server's
   connections: inserted `defined`, then updated to `dispatched` (pilot, host, dispatched_at),
   `running` (started_at, pid) and `finished` (stopped_at, errcode), each step one transaction;
   then deleted by the server's own purge() (`p3s_server.py purge`: 1,000 rows a transaction).
   Nothing is vacuumed by hand: autovacuum runs with its defaults, as in production, during
   the churn and after. Then 1,000 jobs are queued and the claim is timed at once; on
   PostgreSQL it is timed again after autovacuum's next pass over the jobs table.

The claim is the server's CLAIM_JOB in its Store's write transaction, in-process, with
`--sync normal` (no flush at commit: the figure is the query, not the disk). The first claim
after the purge is shown apart (it may walk every dead entry); then 50 untimed, then 5 runs of
150, the two tables taking turns run by run (this machine's speed drifts by a third within an
hour: timed one after the other, minutes apart, their ratio would carry the drift). Ratio = µs
per claim after / empty, each against the empty table's runs taken in turn with it; the
target is at most 1.5. On PostgreSQL it is judged after autovacuum's next pass: the churn
runs jobs far faster than a server does, so right after the purge the queue index still holds
the entries of jobs claimed seconds before, which vacuum would have removed long before their
purge in production (that figure is shown too: what a claim costs while autovacuum is
behind).

    python bench/bench_deadrows.py [--quick] [--db sqlite,postgresql] [--jobs 1000000]
"""
import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
from common import cell, fmt  # noqa: E402

BACKENDS = ('sqlite', 'postgresql')
LABEL = {'sqlite': 'SQLite', 'postgresql': 'PostgreSQL'}
JOBS = 10 ** 6             # run and purged
BATCH = 10000              # jobs per batch of the churn
QUEUED = 1000              # jobs queued when the claim is timed
RUNS = 5
CLAIMS = 150
WARMUP = 50
AUTOVACUUM_WAIT = 200      # seconds to wait for autovacuum's next pass (its naptime is 60 s)

# One batch of a job's life, in bulk. :t is the batch's time (in the past, in order).
INSERT = {
    'sqlite': """
WITH RECURSIVE c (i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM c WHERE i < :n)
INSERT INTO jobs (uuid, name, jobtype, payload, state, created_at, defined_at)
SELECT substr(h, 1, 8) || '-' || substr(h, 9, 4) || '-' || substr(h, 13, 4) || '-'
       || substr(h, 17, 4) || '-' || substr(h, 21), 'bench', 'default', '/bin/true', 'defined',
       :t, :t
  FROM (SELECT lower(hex(randomblob(16))) AS h FROM c)
""",
    'postgresql': """
INSERT INTO jobs (uuid, name, jobtype, payload, state, created_at, defined_at)
SELECT CAST(gen_random_uuid() AS text), 'bench', 'default', '/bin/true', 'defined', :t, :t
  FROM generate_series(1, :n)
"""}
LIFE = (
    "UPDATE jobs SET state = 'dispatched', pilot = :pilot, host = 'bench', dispatched_at = :t"
    " WHERE state = 'defined'",
    "UPDATE jobs SET state = 'running', started_at = :t, pid = 4242 WHERE state = 'dispatched'",
    "UPDATE jobs SET state = 'finished', stopped_at = :t, errcode = 0 WHERE state = 'running'",
)
PG_TABLE_STATS = """
SELECT n_live_tup, n_dead_tup, autovacuum_count, autoanalyze_count, last_autovacuum,
       pg_relation_size('jobs') AS heap, pg_relation_size('jobs_queue') AS queue_index,
       pg_total_relation_size('jobs') AS total, now() AS now
  FROM pg_stat_user_tables WHERE relname = 'jobs'
"""


def churn(store, backend, jobs, batch):
    """Run jobs through their life and the purge, batch by batch; seconds it took."""
    import p3s_server as s
    t0 = time.perf_counter()
    batches = (jobs + batch - 1) // batch
    past = time.time() - batches - 3600
    for b in range(batches):
        n = min(batch, jobs - b * batch)
        t = common.iso(past + b)
        with store.write(durable=False) as db:
            db.execute(INSERT[backend], {'n': n, 't': t})
        for sql in LIFE:
            with store.write(durable=False) as db:
                db.execute(sql, {'t': t, 'pilot': 'bench-pilot'})
        purged = s.purge(store, s.utcnow(), 0)['jobs']
        if purged != n:
            raise RuntimeError('purge removed %d jobs of %d' % (purged, n))
    return time.perf_counter() - t0


def queue(store, backend, n):
    """n jobs queued now, as a submission would leave them (no ANALYZE, no VACUUM)."""
    import p3s_server as s
    now = s.utcnow()
    with store.write() as db:
        db.execute(INSERT[backend], {'n': n, 't': now})


def claim_cost(stores, runs, claims, warmup):
    """For each store: (first claim ms, [µs per claim transaction per run], [µs of the
    statement per run]). The stores take turns, run by run, so that a drift of the machine's
    speed (this one's swings by a third within an hour) weighs on each alike: their ratio is the
    figure judged."""
    import p3s_server as s
    params = {'pilot': 'bench-pilot', 'host': 'bench', 'site': '', 'jobtypes': '[]',
              'now': s.utcnow(), 'left': s.MAX_TIMELIMIT, 'last_queued': 0}

    def one(store):
        t0 = time.perf_counter()
        with store.write() as db:
            t1 = time.perf_counter()
            job = db.execute(s.CLAIM_JOB, params).fetchone()
            t2 = time.perf_counter()
        t3 = time.perf_counter()
        if job is None:
            raise RuntimeError('the queue ran dry')
        return t3 - t0, t2 - t1
    got = {store: (one(store)[0] * 1000, [], []) for store in stores}
    for store in stores:
        for _ in range(warmup - 1):
            one(store)
    for _ in range(runs):
        for store in stores:
            times = [one(store) for _ in range(claims)]
            got[store][1].append(sum(t[0] for t in times) / claims * 1e6)
            got[store][2].append(sum(t[1] for t in times) / claims * 1e6)
    return [got[store] for store in stores]


def plan(store, backend):
    """The claim's plan, abridged: SQLite's steps; PostgreSQL's nodes without their
    conditions."""
    import p3s_server as s
    params = {'pilot': 'p', 'host': 'h', 'site': '', 'jobtypes': '[]', 'now': s.utcnow(),
              'left': s.MAX_TIMELIMIT, 'last_queued': 0}
    with store.read() as db:
        if backend == 'postgresql':
            rows = db.execute('EXPLAIN (COSTS OFF) ' + s.CLAIM_JOB, params).fetchall()
            nodes = [r[0].strip().lstrip('-> ') for r in rows]
            return ' → '.join(n.split(' (')[0] for n in nodes if ':' not in n)
        rows = db.execute('EXPLAIN QUERY PLAN ' + s.CLAIM_JOB, params).fetchall()
        return ' | '.join(r[-1] for r in rows)


def table_state(store, backend):
    """What the jobs table holds, as text."""
    if backend == 'postgresql':
        r = store.one(PG_TABLE_STATS)
        return ('%s live / %s dead rows (pg_stat), autovacuum passes %d, heap %s MB, queue '
                'index %s MB, with all indexes %s MB'
                % ('{:,}'.format(r['n_live_tup']), '{:,}'.format(r['n_dead_tup']),
                   r['autovacuum_count'], fmt(r['heap'] / 1e6), fmt(r['queue_index'] / 1e6),
                   fmt(r['total'] / 1e6)))
    pages = store.one('PRAGMA page_count')[0]
    free = store.one('PRAGMA freelist_count')[0]
    size = store.one('PRAGMA page_size')[0]
    return 'file %s MB, of which %s MB free pages' % (fmt(pages * size / 1e6),
                                                     fmt(free * size / 1e6))


def autovacuum_passed(store, column, since, timeout):
    """Wait for autovacuum to have vacuumed (column last_autovacuum) or analyzed
    (last_autoanalyze) the jobs table after `since` (the server's clock; None: ever). Returns
    when it did (the server's clock), or None after the timeout."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        at = store.one('SELECT %s AS at FROM pg_stat_user_tables WHERE relname = \'jobs\''
                       % column)['at']
        if at is not None and (since is None or at > since):
            return at
        time.sleep(1.0)
    return None


def measure(backend, jobs, batch, runs, claims, autovacuum_wait):
    """Rows for the table and the figures of one backend."""
    pg = backend == 'postgresql'

    def database():
        db = common.new_database(backend) or os.path.join(common.tmpdir(), 'p3s.db')
        return common.store(db, 'normal')

    def refilled(store):
        """Back to QUEUED jobs queued (the claims timed before took some)."""
        left = store.one("SELECT count(*) AS n FROM jobs WHERE state = 'defined'")['n']
        queue(store, backend, QUEUED - left)
        return store

    def timed_in_turns():
        """The claim on the empty table and on the purged one, timed in turns."""
        base, got = claim_cost([refilled(empty), refilled(store)], runs, claims, WARMUP)
        return (plan(empty, backend), base), (plan(store, backend), got)

    # The empty table first, so that autovacuum analyzes it while the other one churns.
    empty = database()
    queue(empty, backend, QUEUED)
    store = database()
    took = churn(store, backend, jobs, batch)
    ended = store.one('SELECT now() AS now')['now'] if pg else None
    state = 'after the purge: ' + table_state(store, backend)
    base_note = ''
    if pg:
        analyzed = autovacuum_passed(empty, 'last_autoanalyze', None, autovacuum_wait)
        base_note = (', analyzed by autovacuum' if analyzed is not None else
                     ', **not analyzed**: autovacuum did not pass within %d s' % autovacuum_wait)
    rounds = [(state, ) + timed_in_turns()]
    if pg:
        vacuumed = autovacuum_passed(store, 'last_autovacuum', ended, autovacuum_wait)
        if vacuumed is not None:
            rounds.append((table_state(store, backend), ) + timed_in_turns())
    base = rounds[-1][1]                # the empty table of the round judged
    rows = [[LABEL[backend], 'empty table, {:,} queued'.format(QUEUED) + base_note,
             cell(base[1][1]), cell(base[1][2]), fmt(base[1][0]), '—',
             table_state(empty, backend), '`%s`' % base[0]]]
    empty.close()

    def row(what, got, base, state):
        first, tx, stmt = got[1]
        ratio = common.summary(tx)[0] / common.summary(base[1][1])[0]
        stmt_ratio = common.summary(stmt)[0] / common.summary(base[1][2])[0]
        rows.append([LABEL[backend], what, cell(tx), cell(stmt), fmt(first),
                     '**%.2f** / %.2f' % (ratio, stmt_ratio), state, '`%s`' % got[0]])
        return ratio, stmt_ratio

    what = '{:,} jobs run and purged, then {:,} queued'.format(jobs, QUEUED)
    state, base, after = rounds[0]
    ratio, stmt_ratio = row(what + (', right after the purge' if pg else ''), after, base, state)
    figures = {'ratio_after_purge': ratio, 'stmt_ratio_after_purge': stmt_ratio,
               'ratio': ratio, 'churn_s': took, 'churn_jobs_per_s': jobs / took}
    if pg:
        what += ', after autovacuum\'s next pass over jobs'
        if len(rounds) == 1:
            rows.append([LABEL[backend], what, 'n/a: autovacuum did not pass within %d s'
                         % autovacuum_wait, '', '', '', table_state(store, backend), ''])
        else:
            state, base, got = rounds[1]
            v_ratio, v_stmt = row(what + ' (it ended %.0f s after the purge)'
                                  % (vacuumed - ended).total_seconds(), got, base, state)
            figures.update(ratio_vacuumed=v_ratio, stmt_ratio_vacuumed=v_stmt, ratio=v_ratio)
    store.close()
    note = '%s: {:,} jobs run and purged in %.0f s ({:,.0f} jobs/s).'.format(
        jobs, jobs / took) % (LABEL[backend], took)
    return rows, figures, note


def run(quick=False, backends=BACKENDS, jobs=None, autovacuum_wait=AUTOVACUUM_WAIT):
    jobs = jobs or (10 ** 5 if quick else JOBS)
    runs = 3 if quick else RUNS
    rows, figures, notes = [], {'jobs': jobs}, []
    for backend in backends:
        if backend == 'postgresql':
            why = common.postgres_missing()
            if why:
                common.skipped('claim cost after jobs run and purged, on PostgreSQL', why)
                figures['postgresql.skipped'] = why
                rows.append([LABEL[backend], 'skipped: %s' % why, '', '', '', '', '', ''])
                continue
            figures['pg_settings'] = common.postgres().settings()
            notes.append(figures['pg_settings'] + '.')
        got_rows, got, note = measure(backend, jobs, BATCH, runs, CLAIMS, autovacuum_wait)
        rows += got_rows
        notes.append(note)
        figures.update({'%s.%s' % (backend, k): v for k, v in got.items()})
    text = common.table(
        'Claim cost after {:,} jobs run and purged (dead rows), against an empty table'
        .format(jobs),
        ['database', 'table', 'µs per claim transaction, median [min–max]',
         'µs of the claim statement', 'first claim ms', 'ratio to empty: transaction / '
         'statement', 'jobs table', 'claim plan (abridged)'], rows,
        note='The server\'s CLAIM_JOB in its Store\'s write transaction, in-process, '
             '`--sync normal`; %d runs of %d claims after %d untimed (the first shown apart), '
             'the purged table\'s runs in turn with the empty table\'s (each ratio is against '
             'the empty table\'s runs taken with it; its row shows those of the round judged). '
             'Jobs run in batches of {:,}: bulk insert, three bulk updates (dispatched, running, '
             'finished) and the server\'s purge(); no VACUUM or ANALYZE by hand, autovacuum as '
             'configured (on PostgreSQL the empty table is timed once autovacuum has analyzed '
             'it, as it does within a minute of a new table\'s first jobs; before that the '
             'planner has no statistics). The churn runs jobs far faster than a server does, '
             'so autovacuum gets fewer passes over them than in production: right after the '
             'purge, PostgreSQL\'s queue index still holds the entries of jobs claimed seconds '
             'before, which in production vacuum would have removed long before their purge. '
             'The figure judged on PostgreSQL is therefore the one after autovacuum\'s next '
             'pass; the one right after the purge shows what a claim costs while autovacuum '
             'is behind. '.format(BATCH) % (runs, CLAIMS, WARMUP) + ' '.join(notes))
    return {'tables': [text], 'figures': figures}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--quick', action='store_true', help='10^5 jobs, fewer runs')
    ap.add_argument('--db', default=','.join(BACKENDS), help='sqlite, postgresql or both')
    ap.add_argument('--jobs', type=int, help='jobs to run and purge (default 10^6)')
    ap.add_argument('--autovacuum-wait', type=float, default=AUTOVACUUM_WAIT,
                    help='seconds to wait for autovacuum\'s next pass (PostgreSQL)')
    args = ap.parse_args()
    print(common.machine_line())
    backends = [b for b in args.db.split(',') if b]
    print(run(args.quick, backends, args.jobs, args.autovacuum_wait)['tables'][0])


if __name__ == '__main__':
    main()
