#!/usr/bin/env python3
"""Claims per second of the server's own claim, SQL only, SQLite and PostgreSQL side by side.

Each connection is a process of its own (not threads sharing one process's lock): it opens the
server's Store (p3s_server.Store, the same pool, BEGIN and COMMIT as the server's) on the
database and claims in a loop, each claim the server's CLAIM_JOB statement in its own write
transaction, with the server's default durability (`--sync full`: on SQLite the write-ahead
log synced after the commit, on PostgreSQL synchronous_commit on). At 1, 4, 16 and 64
connections, each run on a fresh copy of a database of 100,000 queued jobs: claims/s over the
window, and the time of each claim transaction (p50, p99). Every claimed job is checked to have
gone to one connection only.

    python bench/bench_claims.py [--quick] [--db sqlite,postgresql] [--connections 1,4,16,64]
                                 [--sync full|normal]
"""
import argparse
import multiprocessing
import os
import shutil
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
from common import cell, fmt, percentile  # noqa: E402

CONNECTIONS = (1, 4, 16, 64)
BACKENDS = ('sqlite', 'postgresql')
RUNS = 3
DURATION = 3.0             # seconds of claiming per run
QUEUED = 100000            # jobs queued in each run's database
WARMUP = 10                # claims per process before the window (connections, caches)
LABEL = {'sqlite': 'SQLite', 'postgresql': 'PostgreSQL'}


def claimer(db, sync, index, ready, go, results):
    """One connection: claims from start_at to end_at; puts (claims, latencies, uuids,
    errors, ran dry)."""
    import p3s_server as s
    store = common.store(db, sync)
    params = {'pilot': 'bench-%d' % index, 'host': 'bench', 'site': '', 'jobtypes': '[]',
              'now': s.utcnow(), 'left': s.MAX_TIMELIMIT, 'last_queued': 0}

    def claim():
        with store.write() as db:
            return db.execute(s.CLAIM_JOB, params).fetchone()
    for _ in range(WARMUP):
        claim()
    ready.put(index)
    start_at, end_at = go.get()
    time.sleep(max(0.0, start_at - time.time()))
    latencies, uuids, errors, dry = [], [], 0, False
    while time.time() < end_at:
        t0 = time.perf_counter()
        try:
            job = claim()
        except Exception:
            errors += 1          # e.g. SQLite's "database is locked" after its busy timeout
            continue
        latencies.append(time.perf_counter() - t0)
        if job is None:
            dry = True
            break
        uuids.append(job['uuid'])
    store.close()
    results.put((len(uuids), latencies, uuids, errors, dry))


def run_once(db, connections, duration, sync):
    common.run_directories()            # made here, before the fork: the claimers share it
    ctx = multiprocessing.get_context('fork')
    ready, results = ctx.Queue(), ctx.Queue()
    gos = [ctx.Queue() for _ in range(connections)]
    procs = [ctx.Process(target=claimer, args=(db, sync, i, ready, gos[i], results),
                         daemon=True) for i in range(connections)]
    try:
        for p in procs:
            p.start()
        for _ in procs:
            ready.get(timeout=120)
        start_at = time.time() + 0.3
        for go in gos:
            go.put((start_at, start_at + duration))
        got = [results.get(timeout=duration + 120) for _ in procs]
    finally:
        for p in procs:
            p.join(10)
            if p.is_alive():
                p.kill()
                p.join()
    claims = sum(g[0] for g in got)
    uuids = [u for g in got for u in g[2]]
    if len(set(uuids)) != len(uuids):
        raise RuntimeError('%d jobs were claimed twice' % (len(uuids) - len(set(uuids))))
    lat = [x for g in got for x in g[1]]
    return {'rate': claims / duration, 'p50': percentile(lat, 50) * 1000,
            'p99': percentile(lat, 99) * 1000, 'errors': sum(g[3] for g in got),
            'dry': any(g[4] for g in got)}


class Template:
    """A filled database, copied afresh for each run."""

    def __init__(self, backend, queued):
        self.backend = backend
        if backend == 'postgresql':
            self.pg = common.postgres()
            self.dsn = self.pg.new_database()
            common.fill_jobs(self.dsn, queued)
            self.name = self.dsn.split('@/', 1)[1].split('?', 1)[0]
        else:
            self.path = os.path.join(common.tmpdir(), 'template.db')
            common.fill_jobs(self.path, queued)

    def copy(self):
        if self.backend == 'postgresql':
            return self.pg.new_database(template=self.name)
        path = os.path.join(common.tmpdir(), 'p3s.db')
        shutil.copyfile(self.path, path)
        return path

    def drop(self, db):
        if self.backend == 'postgresql':
            self.pg.drop_database(db)
        else:
            shutil.rmtree(os.path.dirname(db), ignore_errors=True)


def measure(backend, counts, runs, duration, queued, sync):
    """{connections: [per-run results]} for one backend."""
    template = Template(backend, queued)
    out = {}
    for n in counts:
        out[n] = []
        for _ in range(runs):
            db = template.copy()
            try:
                out[n].append(run_once(db, n, duration, sync))
            finally:
                template.drop(db)
    return out


def run(quick=False, backends=BACKENDS, counts=CONNECTIONS, sync='full'):
    runs, duration, queued = (1, 1.5, 30000) if quick else (RUNS, DURATION, QUEUED)
    figures, measured, notes = {}, {}, []
    for backend in backends:
        if backend == 'postgresql':
            why = common.postgres_missing()
            if why:
                common.skipped('claims/s on PostgreSQL', why)
                figures['postgresql.skipped'] = why
                continue
            notes.append(common.postgres().settings() + '.')
            figures['pg_settings'] = common.postgres().settings()
        measured[backend] = measure(backend, counts, runs, duration, queued, sync)
    rows = []
    for n in counts:
        row = [n]
        for backend in backends:
            res = measured.get(backend, {}).get(n)
            if res is None:
                row += ['skipped: %s' % figures.get(backend + '.skipped', '?'), '—', '—']
                continue
            col = lambda k: [r[k] for r in res]  # noqa: E731
            errors, dry = sum(col('errors')), any(col('dry'))
            row += [cell(col('rate')), '%s / %s' % (fmt(common.summary(col('p50'))[0]),
                                                    fmt(common.summary(col('p99'))[0])),
                    '%d%s' % (errors, ', **queue ran dry**' if dry else '')]
            figures['%s.rate_%d' % (backend, n)] = common.summary(col('rate'))[0]
            figures['%s.p50_%d' % (backend, n)] = common.summary(col('p50'))[0]
            figures['%s.p99_%d' % (backend, n)] = common.summary(col('p99'))[0]
        rows.append(row)
    columns = ['connections']
    for backend in backends:
        columns += ['%s claims/s' % LABEL[backend], '%s p50 / p99 ms per claim' % LABEL[backend],
                    '%s failed claims' % LABEL[backend]]
    text = common.table(
        'Claims/s, SQL only: the server\'s claim statement, SQLite and PostgreSQL (`--sync %s`)'
        % sync, columns, rows,
        note='One process per connection, each the server\'s Store and CLAIM_JOB in its own '
             'write transaction; %d run(s) of %.1f s per count, each on a fresh copy of a '
             'database of {:,} queued jobs; claims/s median [min–max]; p50 / p99: medians over '
             'the runs; no job claimed twice. %s'.format(queued)
             % (runs, duration, ' '.join(notes)))
    return {'tables': [text], 'figures': figures}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--quick', action='store_true', help='one short run, a smaller queue')
    ap.add_argument('--db', default=','.join(BACKENDS), help='sqlite, postgresql or both')
    ap.add_argument('--connections', default=','.join(map(str, CONNECTIONS)))
    ap.add_argument('--sync', choices=('normal', 'full'), default='full')
    args = ap.parse_args()
    print(common.machine_line())
    backends = [b for b in args.db.split(',') if b]
    counts = [int(x) for x in args.connections.split(',')]
    print(run(args.quick, backends, counts, args.sync)['tables'][0])


if __name__ == '__main__':
    main()
