#!/usr/bin/env python3
"""Benchmark 1, latency: an idle pool of 4 real pilots, one job submitted at a time.

submit -> start is started_at - defined_at and submit -> finished is stopped_at - defined_at,
both from the server's own timestamps. Each run starts a fresh server and pool and submits
200 jobs (`/bin/true`), one after the other, each once the previous one has finished.
Also: parent finished -> child started inside a workflow.

    python bench/bench_latency.py [--quick] [--db sqlite|postgresql]

--db postgresql: the same on a database of a private PostgreSQL cluster (common.Postgres),
without the workflow figure, and again with the jobs submitted to a second server of another
host (a run directory of its own, which is all a host is to a server): its wake-ups reach the
pilots held by the first only through PostgreSQL's NOTIFY.
"""
import argparse
import contextlib
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
from common import cell, ms, percentile, ts  # noqa: E402

PILOTS = 4
JOBS = 200
RUNS = 5
PAYLOAD = '/bin/true'
SPACING = 0.01        # seconds between one job finishing and the next submission
FIRST_LOOK = 0.03     # seconds from a submission to the first look at the job
LOOK_AGAIN = 0.005
JOB_TIMEOUT = 10.0
OTHER_HOST = (' "Submit to another host": the jobs go to a second server with a run directory of'
              ' its own (as on another host), the pilots wait on the first.')


def one_job(server):
    """Submit one job, wait for it to finish; returns the job as stored. The first look comes
    after FIRST_LOOK: a benchmark that asked every few milliseconds would load the server it
    measures just while it dispatches the job (the figures are the server's timestamps, so
    looking later changes only how long a run takes)."""
    uuid = server.api('POST', '/api/jobs', [{'payload': PAYLOAD, 'name': 'latency'}])['uuids'][0]
    give_up = time.monotonic() + JOB_TIMEOUT
    time.sleep(FIRST_LOOK)
    while time.monotonic() < give_up:
        job = server.api('GET', '/api/jobs/' + uuid)
        if job['state'] not in ('defined', 'dispatched', 'running'):
            return job
        time.sleep(LOOK_AGAIN)
    raise RuntimeError('job %s did not finish within %.0f s' % (uuid, JOB_TIMEOUT))


def run_once(jobs, db='sqlite', hosts=1, sync='full'):
    with contextlib.ExitStack() as servers:
        server = servers.enter_context(common.Server(db=common.new_database(db),
                                                     args=['--sync', sync]))
        entry = server if hosts == 1 else servers.enter_context(common.Server(
            db=server.db, rundir=common.tmpdir(prefix='p3s-bench-host-', base='/tmp')))
        common.start_pilots(server, PILOTS, '--cycles', '0')
        common.wait_for(lambda: common.idle_pilots(server, PILOTS), 30, 'the pilots to wait')
        time.sleep(0.2)
        start, finish, dispatch = [], [], []
        for _ in range(jobs):
            job = one_job(entry)
            assert job['state'] == 'finished', job
            defined = ts(job['defined_at'])
            start.append(ms(ts(job['started_at']) - defined))
            finish.append(ms(ts(job['stopped_at']) - defined))
            dispatch.append(ms(ts(job['dispatched_at']) - defined))
            time.sleep(SPACING)
    return start, finish, dispatch


def percentiles_of_runs(runs, jobs, db, hosts=1, syncs=('full',)):
    """{sync: the percentiles of each run}. The settings take turns, run by run, so that a
    drift of the machine's speed (often larger than what they differ by) weighs on each alike."""
    per_sync = {sync: {'start50': [], 'start99': [], 'fin50': [], 'fin99': [], 'disp50': [],
                       'disp99': []} for sync in syncs}
    for _ in range(runs):
        for sync in syncs:
            start, finish, dispatch = run_once(jobs, db, hosts, sync)
            for name, values in (('start', start), ('fin', finish), ('disp', dispatch)):
                per_sync[sync][name + '50'].append(percentile(values, 50))
                per_sync[sync][name + '99'].append(percentile(values, 99))
    return per_sync


def workflow_latency(runs, workflows):
    """parent finished -> child started."""
    if not common.workflows_available():
        return None
    import bench_workflow
    return bench_workflow.parent_child(runs, workflows)


def run(quick=False, db='sqlite'):
    runs, jobs = (2, 50) if quick else (RUNS, JOBS)
    title = 'Latency: idle pool of %d real pilots, one job at a time (ms)' % PILOTS
    settings = ''
    if db == 'postgresql':
        title = title.replace('Latency:', 'Latency on PostgreSQL:')
        why = common.postgres_missing()
        if why:
            return common.skipped(title, why)
        settings = ' ' + common.postgres().settings() + '.'
    # On SQLite also without the submission's sync, to show what durability costs (with
    # `--sync normal` a power loss may undo an acknowledged submission).
    per_sync = percentiles_of_runs(runs, jobs, db,
                                   syncs=('full', 'normal') if db == 'sqlite' else ('full',))
    per_run = per_sync['full']
    rows = [
        ['submit → start', cell(per_run['start50']), cell(per_run['start99'])],
        ['(of which submit → dispatch)', cell(per_run['disp50']), cell(per_run['disp99'])],
        ['submit → finished', cell(per_run['fin50']), cell(per_run['fin99'])],
    ]
    figures = {
        'start_p50': common.summary(per_run['start50'])[0],
        'start_p99': common.summary(per_run['start99'])[0],
    }
    if 'normal' in per_sync:
        normal = per_sync['normal']
        rows.append(['submit → start, `--sync normal`', cell(normal['start50']),
                     cell(normal['start99'])])
        figures['start_p50_normal'] = common.summary(normal['start50'])[0]
        figures['start_p99_normal'] = common.summary(normal['start99'])[0]
    if db == 'postgresql':
        other = percentiles_of_runs(runs, jobs, db, hosts=2)['full']
        rows += [
            ['submit to another host → start', cell(other['start50']), cell(other['start99'])],
            ['(of which → dispatch)', cell(other['disp50']), cell(other['disp99'])],
        ]
        figures['other_host_start_p50'] = common.summary(other['start50'])[0]
    wf = workflow_latency(runs, min(jobs, 100)) if db == 'sqlite' else None
    if wf is None and db == 'sqlite':
        rows.append(['parent finished → child started (workflow)', 'n/a (no workflows yet)',
                     'n/a'])
    elif wf is not None:
        rows.append(['parent finished → child started (workflow)', cell(wf['p50']),
                     cell(wf['p99'])])
        figures['parent_child_p50'] = common.summary(wf['p50'])[0]
    text = common.table(
        title,
        ['figure', 'p50 ms, median [min–max] of runs', 'p99 ms, median [min–max] of runs'],
        rows, note='%d runs of %d `/bin/true` jobs each, the settings in turns; fresh server '
             '(default `--sync full` unless said) and pilots (`--cycles 0`, the default '
             '`--wait`) per run; server timestamps.'
             % (runs, jobs) + (OTHER_HOST if db == 'postgresql' else '') + settings)
    if settings:
        figures['pg_settings'] = settings.strip(' .')
    return {'tables': [text], 'figures': figures}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--quick', action='store_true', help='fewer runs and jobs')
    ap.add_argument('--db', choices=('sqlite', 'postgresql'), default='sqlite')
    args = ap.parse_args()
    print(common.machine_line())
    print(run(args.quick, args.db)['tables'][0])


if __name__ == '__main__':
    main()
