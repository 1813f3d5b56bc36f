#!/usr/bin/env python3
"""Benchmark 4, scaling with size.

- Claim cost in-process (the server's own CLAIM_JOB in a BEGIN IMMEDIATE transaction, through
  its Store) with 10^3, 10^5 and 10^6 queued jobs, and with 10^6 finished jobs of history plus
  10^3 queued. The databases are filled directly with executemany. Measured with
  `--sync normal` so that the figure is the query, not the disk's fsync (reported apart).
- At 10^6 jobs (queued): `GET /api/jobs?state=defined&limit=100` and the dashboard `/`, with
  the server's RSS after them.
- `p3s_job.py -j` submitting 10,000 jobs (the whole command, interpreter start included).
- Instantiating a 1,000-vertex workflow.

    python bench/bench_scaling.py [--quick]
"""
import argparse
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
from common import cell  # noqa: E402

RUNS = 5
CLAIMS = 150               # claims per run
WARMUP = 50                # claims before timing (page cache, statement cache)
HTTP_RUNS = 11             # requests timed per page
HISTORY = 30 * 86400       # finished jobs are spread over the last 30 days
SUBMIT_JOBS = 10000


def claim_cost(path, runs, claims, sync='normal'):
    """µs per claim transaction, one figure per run."""
    import p3s_server as s
    store = common.store(path, sync)
    params = {'pilot': 'bench-pilot', 'host': 'bench', 'site': '', 'jobtypes': '[]',
              'now': s.utcnow(), 'left': s.MAX_TIMELIMIT, 'last_queued': 0}
    with store.read() as db:
        plan = ' | '.join(r[-1] for r in db.execute('EXPLAIN QUERY PLAN ' + s.CLAIM_JOB, params))
    per_run = []
    for _ in range(WARMUP):
        with store.write() as db:
            db.execute(s.CLAIM_JOB, params).fetchone()
    for _ in range(runs):
        t0 = time.perf_counter()
        for _ in range(claims):
            with store.write() as db:
                if db.execute(s.CLAIM_JOB, params).fetchone() is None:
                    raise RuntimeError('the queue ran dry')
        per_run.append((time.perf_counter() - t0) / claims * 1e6)
    store.close()
    return per_run, plan


def make_db(queued, finished=0):
    path = os.path.join(common.tmpdir(), 'p3s.db')
    if finished:
        common.fill_jobs(path, finished, 'finished', spread=HISTORY)
    common.fill_jobs(path, queued)
    return path


def timed_get(server, path, runs):
    out = []
    for _ in range(runs):
        t0 = time.perf_counter()
        status, _ = common.request(server.port, 'GET', path)
        out.append((time.perf_counter() - t0) * 1000)
        if status != 200:
            raise RuntimeError('GET %s: HTTP %d' % (path, status))
    return out


def submit_10k(runs, jobs):
    work = common.tmpdir()
    jobfile = os.path.join(work, 'jobs.json')
    with open(jobfile, 'w') as f:
        json.dump([{'name': 'bulk', 'jobtype': 'bulk', 'payload': '/bin/true', 'timeout': '100',
                    'priority': '0', 'env': {}}], f)
    times = []
    with common.Server() as server:
        for _ in range(runs):
            t0 = time.perf_counter()
            subprocess.run([sys.executable, os.path.join(common.ROOT, 'p3s_job.py'), '-S',
                            server.url, '-j', jobfile, '-N', str(jobs)], check=True,
                           stdout=subprocess.DEVNULL, cwd=work)
            times.append(time.perf_counter() - t0)
        total = sum(server.api('GET', '/api/summary')['jobs'].values())
    if total != runs * jobs:
        raise RuntimeError('%d jobs stored, expected %d' % (total, runs * jobs))
    return times


def run(quick=False):
    runs = 3 if quick else RUNS
    big = 10 ** 5 if quick else 10 ** 6
    sizes = [(10 ** 3, 0), (10 ** 5 if not quick else 10 ** 4, 0), (big, 0), (10 ** 3, big)]
    rows, figures, costs, plans = [], {}, {}, []
    big_db = hist_db = None
    for queued, finished in sizes:
        t0 = time.perf_counter()
        path = make_db(queued, finished)
        fill = time.perf_counter() - t0
        per_run, plan = claim_cost(path, runs, CLAIMS)
        costs[(queued, finished)] = per_run
        plans.append(plan)
        label = '{:,} queued'.format(queued) + (', {:,} finished'.format(finished)
                                                   if finished else '')
        rows.append([label, cell(per_run), '%.1f s' % fill])
        if queued == big and not finished:
            big_db = path
        if finished:
            hist_db = path
    full, _ = claim_cost(make_db(10 ** 3), runs, CLAIMS, sync='full')
    rows.append(['1,000 queued, `--sync full` (the server default: each commit synced)',
                 cell(full), ''])
    ratio = common.summary(costs[(big, 0)])[0] / common.summary(costs[(10 ** 3, 0)])[0]
    figures['claim_ratio'] = ratio
    plan_note = 'query plan: `%s`' % plans[0]
    claim_table = common.table(
        'Scaling: in-process claim cost (µs per claim transaction, `--sync normal`)',
        ['jobs in the database', 'µs per claim, median [min–max]', 'fill time'], rows,
        note='%d runs of %d claims each after %d untimed; cost ratio {:,} / 1,000 queued = '
             '**%.2f**; %s'
             .format(big) % (runs, CLAIMS, WARMUP, ratio, plan_note))

    with common.Server(db=big_db) as server:
        listing = timed_get(server, '/api/jobs?state=defined&limit=100', HTTP_RUNS)
        dash = timed_get(server, '/', HTTP_RUNS)
        rss = common.server_rss_mb(server.pid)
    with common.Server(db=hist_db) as server:
        hist_listing = timed_get(server, '/api/jobs?state=defined&limit=100', HTTP_RUNS)
        hist_dash = timed_get(server, '/', HTTP_RUNS)
    figures['dashboard_ms'] = max(common.summary(dash)[0], common.summary(hist_dash)[0])
    figures['server_rss_1m'] = rss
    submits = submit_10k(runs, SUBMIT_JOBS)
    figures['submit_10k_s'] = common.summary(submits)[0]
    wf = None
    if common.workflows_available():
        import bench_workflow
        wf = bench_workflow.instantiate(1000, runs)
        figures['workflow_1000_s'] = common.summary(wf)[0]
    http_rows = [
        ['`GET /api/jobs?state=defined&limit=100` at {:,} jobs'.format(big), cell(listing), 'ms'],
        ['dashboard `/` at {:,} jobs'.format(big), cell(dash), 'ms'],
        ['`GET /api/jobs?state=defined&limit=100`, {:,} finished over 30 days + 1,000 queued'
         .format(big), cell(hist_listing), 'ms'],
        ['dashboard `/`, {:,} finished over 30 days + 1,000 queued'.format(big), cell(hist_dash),
         'ms'],
        ['`p3s_job.py -j` submitting {:,} jobs (whole command)'.format(SUBMIT_JOBS),
         cell(submits, 2), 's'],
        ['instantiating a 1,000-vertex workflow', cell(wf, 2) if wf else 'n/a (no workflows yet)',
         's'],
    ]
    http_table = common.table(
        'Scaling: requests at size', ['figure', 'median [min–max]', 'unit'], http_rows,
        note='%d requests per page, sequential, new connection each; "{:,} jobs" are all queued '
             'and defined just now (the worst case for the dashboard\'s recent-time windows); '
             '%d submissions into one server (default `--sync full`).'.format(big)
             % (HTTP_RUNS, runs))
    return {'tables': [claim_table, http_table], 'figures': figures}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--quick', action='store_true', help='smaller sizes, fewer runs')
    args = ap.parse_args()
    print(common.machine_line())
    for t in run(args.quick)['tables']:
        print(t)


if __name__ == '__main__':
    main()
