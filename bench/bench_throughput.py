#!/usr/bin/env python3
"""Benchmark 2, throughput with real pilots: 5,000 `/bin/true` jobs, 8 real p3s_pilot.py.

The jobs are queued first (one submission), then the pilots start; jobs/s is counted from the
first dispatch to the last finish (server timestamps). After the last job, the pool sits idle
for 3 s and one more job is submitted: its submit -> start is the "first job after idleness".

    python bench/bench_throughput.py [--quick] [--sync normal|full] [--db sqlite|postgresql]

--db postgresql: the same on a database of a private PostgreSQL cluster (common.Postgres).
"""
import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
from common import cell, ms, ts  # noqa: E402

PILOTS = 8
JOBS = 5000
RUNS = 5
IDLE = 3.0
RUN_TIMEOUT = 300


def all_done(server, n):
    counts = server.api('GET', '/api/summary')['jobs']
    done = sum(v for k, v in counts.items() if k not in ('defined', 'dispatched', 'running'))
    return done >= n


def run_once(jobs, sync, joblog_base=None, db='sqlite'):
    with common.Server(db=common.new_database(db), args=['--sync', sync]) as server:
        server.api('POST', '/api/jobs', [{'payload': '/bin/true', 'name': 'tp%d' % i}
                                         for i in range(jobs)])
        common.start_pilots(server, PILOTS, '--cycles', '0',
                            workdir=common.tmpdir(base=joblog_base))
        common.wait_for(lambda: all_done(server, jobs), RUN_TIMEOUT, 'the jobs to finish', 0.25)
        rows = server.jobs()
        states = {}
        for j in rows:
            states[j['state']] = states.get(j['state'], 0) + 1
        if states != {'finished': jobs}:
            raise RuntimeError('jobs did not all finish once: %s' % states)
        first = min(ts(j['dispatched_at']) for j in rows)
        last = max(ts(j['stopped_at']) for j in rows)
        rate = jobs / (last - first)
        common.wait_for(lambda: common.idle_pilots(server, 1), 30, 'a pilot to wait')
        time.sleep(IDLE)
        uuid = server.api('POST', '/api/jobs',
                          [{'payload': '/bin/true', 'name': 'idle'}])['uuids'][0]
        job = common.wait_for(lambda: (lambda j: j if j['started_at'] else None)(
            server.api('GET', '/api/jobs/' + uuid)), 10, 'the idle job to start', 0.01)
        idle_start = ms(ts(job['started_at']) - ts(job['defined_at']))
    return rate, idle_start


def run(quick=False, syncs=('full', 'normal'), db='sqlite', tmpfs=True):
    """`tmpfs`: also `--sync full` with the pilots' job logs on tmpfs (SQLite only), where a
    new file costs microseconds: a job's two log files are its pilot's only new files."""
    runs, jobs = (2, 1000) if quick else (RUNS, JOBS)
    title = 'Throughput: %d real pilots, `/bin/true` jobs' % PILOTS
    settings = ''
    if db == 'postgresql':
        title = title.replace('Throughput:', 'Throughput on PostgreSQL:')
        why = common.postgres_missing()
        if why:
            return common.skipped(title, why)
        settings = ' ' + common.postgres().settings() + '.'
    memory = common.tmpfs() if tmpfs and db == 'sqlite' else None
    variants = [('`--sync %s`%s' % (sync, ' (default)' if sync == 'full' else ''), sync, None,
                 sync) for sync in syncs]
    if memory and 'full' in syncs:
        variants.append(('`--sync full`, the job logs on tmpfs (%s)' % memory, 'full', memory,
                         'full_tmpfs'))
    # The variants take turns, run by run: the machine's speed drifts more, within minutes,
    # than some of them differ by.
    rates, idles = {key: [] for *_, key in variants}, {key: [] for *_, key in variants}
    for _ in range(runs):
        for _, sync, joblog_base, key in variants:
            rate, idle = run_once(jobs, sync, joblog_base, db=db)
            rates[key].append(rate)
            idles[key].append(idle)
    rows, figures = [], {}
    for label, _, _, key in variants:
        rows.append([label, cell(rates[key]), cell(idles[key])])
        figures['jobs_per_s_' + key] = common.summary(rates[key])[0]
        figures['idle_start_' + key] = common.summary(idles[key])[0]
    text = common.table(
        title, ['server', 'jobs/s, first dispatch → last finish', 'first job after %.0f s idle, '
         'submit → start ms' % IDLE], rows,
        note='%d runs of %d jobs per setting, median [min–max], the settings in turns; fresh '
             'server per run; '
             'every job checked finished exactly once; the server\'s default --workers; the '
             'pilots\' job logs in %s unless said.' % (runs, jobs, tempfile.gettempdir())
             + settings)
    if settings:
        figures['pg_settings'] = settings.strip(' .')
    return {'tables': [text], 'figures': figures}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--quick', action='store_true', help='fewer runs and jobs')
    ap.add_argument('--sync', choices=('normal', 'full'), action='append',
                    help='server --sync setting(s) to measure (default both)')
    ap.add_argument('--db', choices=('sqlite', 'postgresql'), default='sqlite')
    args = ap.parse_args()
    print(common.machine_line())
    print(run(args.quick, args.sync or ('full', 'normal'), args.db)['tables'][0])


if __name__ == '__main__':
    main()
