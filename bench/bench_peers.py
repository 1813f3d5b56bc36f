#!/usr/bin/env python3
"""Benchmark of p3s's peers on this machine, with the workload of p3s's own benchmarks:
huey on SQLite (thread workers; default and tuned polling) and Parsl's HighThroughputExecutor
(LocalProvider).

    python bench/bench_peers.py [--quick] [--runs N]
                                [--only huey,huey_tuned,parsl,ceiling,ceiling_supervised]

huey and Parsl are installed, pinned, into a virtual environment of the benchmark's own,
bench/.peers-venv (created on first use with pip; never by `make run` or `make test`), and
driven there by peers_driver.py; the job every peer runs is peers_app.run_job.

What is measured, as bench_throughput.py and bench_latency.py measure p3s:
- throughput: 5,000 `/bin/true` jobs (2,000 with --quick) queued first, then 8 workers start;
  jobs/s from the first job picked up to the last one ended; every job checked to have run
  exactly once with exit code 0. Then 3 s idle and one more job: its submit -> start.
- latency: an idle pool of 4 workers (p3s: 4 pilots), a warm-up job per worker, then 200 jobs
  (50 with --quick) submitted one at a time, each 10 ms after the previous one ended;
  submit -> start p50 and p99 per run, with common.percentile.
- memory: RSS of a worker process (huey: the consumer, whose threads are all 8 workers; Parsl:
  one of its 8 worker processes) and of all the peer's processes together, after the
  throughput jobs.
- ceilings: no queue at all, 8 processes running their share of the jobs back to back: what
  this machine allows for `/bin/true` from Python; and the same with each `/bin/true` started
  as p3s's pilot starts a payload, through `setpriv --pdeathsig KILL` (so that it dies with
  its pilot, kill -9 included): what that guarantee alone allows, before any queue.
5 runs (2 with --quick), interleaved across the peers so that a busy spell hits them alike;
median [min-max] of the runs. Every run starts a fresh pool, queue and records file.

Comparable: the job (a subprocess of `/bin/true`, its start taken right after the process was
created and its end right after it was reaped, as p3s's pilot takes them), the counts, the
pools, the windows and the percentile code. Not comparable, and why the peers have it easier:
- What is kept. p3s stores every job, with its states, times, host, pid, exit code and output
  tails, in SQLite with an fsync per commit (`--sync full`), and the pilot writes each job's
  stdout and stderr to files. huey stores the queued task (one row inserted at submission and
  deleted when a worker takes it, each its own transaction, with SQLite's default synchronous
  setting: FULL in WAL here) and nothing once the job has run; Parsl keeps everything in the
  memory of its processes and loses it with them. The peers' jobs discard their output.
- Where the times come from. p3s's submit is the server's `defined_at`, taken after the HTTP
  request arrived; a peer's submit is taken in the submitting process just before the enqueue
  call (huey: a direct SQLite insert, no network; Parsl: the DataFlowKernel, then ZeroMQ), so
  it includes the whole submission. p3s's throughput window opens at the server's claim
  (`dispatched_at`), one HTTP answer before the pilot has the job; a peer's opens when its
  worker has the job in hand. Both differences are a millisecond or less.
- Clients. p3s's pilots are separate processes speaking HTTP to a server; huey's workers are
  threads of one consumer polling the database; Parsl's are processes fed over ZeroMQ through
  an interchange, with results returned to the submitting process.
"""
import argparse
import json
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_latency  # noqa: E402
import bench_throughput  # noqa: E402
import common  # noqa: E402
import peers_app  # noqa: E402
from common import cell, ms, percentile  # noqa: E402

PACKAGES = ('huey==3.5.4', 'parsl==2026.10.26')
VENV = os.path.join(common.BENCH, '.peers-venv')
DRIVER = os.path.join(common.BENCH, 'peers_driver.py')
INSTALL_TIMEOUT = 900
DRIVER_TIMEOUT = 600          # one run of one peer, the pool's start included

WORKERS = bench_throughput.PILOTS
JOBS = bench_throughput.JOBS
QUICK_JOBS = 2000
IDLE = bench_throughput.IDLE
LATENCY_WORKERS = bench_latency.PILOTS
LATENCY_JOBS = bench_latency.JOBS
QUICK_LATENCY_JOBS = 50
RUNS = 5
QUICK_RUNS = 2

# key, label, driver arguments
PEERS = (
    ('huey', 'huey on SQLite, thread workers, default polling', ['huey']),
    ('huey_tuned', 'huey on SQLite, thread workers, tuned polling (`-d 0.01 -m 0.1`)',
     ['huey', '--delay', '0.01', '--max-delay', '0.1']),
    ('parsl', 'Parsl HighThroughputExecutor, LocalProvider', ['parsl']),
)
RUN_FIGURES = ('rate', 'idle', 'p50', 'p99', 'worker_mb', 'all_mb')
# key: label, short name, peers_app.py's arguments before the records file
CEILINGS = {
    'ceiling': ('no queue: %d processes running `/bin/true` back to back' % WORKERS,
                'no-queue ceiling', []),
    'ceiling_supervised': ('no queue: the same, each `/bin/true` started as the pilot starts a '
                           'payload (`setpriv --pdeathsig KILL`)',
                           'with the pilot\'s `setpriv --pdeathsig`', ['--supervised']),
}
SHORT = {'huey': 'huey', 'huey_tuned': 'huey tuned', 'parsl': 'Parsl'}


# ---------------------------------------------------------------------------------------------
# The peers' virtual environment
# ---------------------------------------------------------------------------------------------


def peers_python():
    """The Python of bench/.peers-venv, (re)built with PACKAGES when they changed."""
    python = os.path.join(VENV, 'bin', 'python')
    marker = os.path.join(VENV, '.installed')
    wanted = '\n'.join(PACKAGES) + '\n'
    try:
        with open(marker) as f:
            if f.read() == wanted:
                return python
    except OSError:
        pass
    print('installing %s into %s' % (', '.join(PACKAGES), VENV), flush=True)
    install([sys.executable, '-m', 'venv', '--clear', VENV])
    install([python, '-m', 'pip', 'install', '--quiet', '--disable-pip-version-check']
            + list(PACKAGES))
    with open(marker, 'w') as f:
        f.write(wanted)
    return python


def install(command):
    done = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          timeout=INSTALL_TIMEOUT)
    if done.returncode != 0:
        tail = done.stdout.decode(errors='replace').strip().splitlines()[-5:]
        raise RuntimeError('%s failed: %s' % (' '.join(command[:4]), ' / '.join(tail)))


# ---------------------------------------------------------------------------------------------
# One run
# ---------------------------------------------------------------------------------------------


def drive(python, args, jobs, workdir):
    """Run peers_driver.py once; returns its JSON result and the records its jobs wrote."""
    records = os.path.join(workdir, 'records')
    out_path, err_path = (os.path.join(workdir, name) for name in ('driver.out', 'driver.err'))
    with open(out_path, 'wb') as out, open(err_path, 'wb') as err:
        proc = common.spawn([python, DRIVER] + args + ['--records', records, '--workdir',
                                                       workdir, '--jobs', str(jobs)],
                            stdin=subprocess.DEVNULL, stdout=out, stderr=err, cwd=workdir)
        try:
            proc.wait(DRIVER_TIMEOUT)
        except subprocess.TimeoutExpired:
            raise RuntimeError('peers_driver.py %s did not end within %d s'
                               % (' '.join(args), DRIVER_TIMEOUT))
        finally:
            common.stop(proc)      # SIGTERM first: the driver then stops what it started
    if proc.returncode != 0:
        with open(err_path, errors='replace') as f:
            tail = f.read().strip().splitlines()[-3:]
        raise RuntimeError('peers_driver.py %s failed: %s' % (' '.join(args), ' / '.join(tail)))
    with open(out_path) as f:
        result = json.loads(f.read().strip().splitlines()[-1])
    with open(records) as f:
        return result, peers_app.parse_records(f.read())


def throughput_once(python, args, jobs):
    """jobs/s, the idle job's submit -> start in ms, the memory in MB, and what was run."""
    result, records = drive(python, args + ['throughput', '--workers', str(WORKERS),
                                            '--idle', str(IDLE)], jobs, common.tmpdir())
    names = ['t%d' % i for i in range(jobs)]
    done = peers_app.account(records, names + ['idle'])
    return {'rate': peers_app.jobs_per_second([done[n] for n in names]),
            'idle': ms(done['idle']['started'] - result['submitted']['idle']),
            'worker_mb': result['rss']['worker_mb'], 'all_mb': result['rss']['all_mb'],
            'version': result['version'], 'settings': result['settings']}


def latency_once(python, args, jobs):
    """submit -> start of each job, in ms."""
    result, records = drive(python, args + ['latency', '--workers', str(LATENCY_WORKERS),
                                            '--spacing', str(bench_latency.SPACING)],
                            jobs, common.tmpdir())
    submitted = result['submitted']
    done = peers_app.account(records, list(submitted) + result['warm_up'])
    return [ms(done[job]['started'] - at) for job, at in submitted.items()]


def ceiling_once(jobs, options):
    """jobs/s of WORKERS processes each running its share of the jobs, with no queue."""
    workdir = common.tmpdir()
    records = os.path.join(workdir, 'records')
    names = ['t%d' % i for i in range(jobs)]
    procs = [common.spawn([sys.executable, peers_app.__file__] + options + [records]
                          + names[k::WORKERS], stdin=subprocess.DEVNULL)
             for k in range(WORKERS)]
    for proc in procs:
        try:
            proc.wait(bench_throughput.RUN_TIMEOUT)
        finally:
            common.stop(proc)
    with open(records) as f:
        done = peers_app.account(peers_app.parse_records(f.read()), names)
    return peers_app.jobs_per_second(list(done.values()))


# ---------------------------------------------------------------------------------------------
# All runs, tables and figures
# ---------------------------------------------------------------------------------------------


def measure(quick, runs, only):
    """Per peer, the figures of every run, the runs interleaved across the peers."""
    jobs = QUICK_JOBS if quick else JOBS
    latency_jobs = QUICK_LATENCY_JOBS if quick else LATENCY_JOBS
    python = peers_python() if set(only) - set(CEILINGS) else None
    per = {key: {name: [] for name in RUN_FIGURES} for key in only}
    for _ in range(runs):
        for key, label, args in PEERS:
            if key not in only:
                continue
            got = throughput_once(python, args, jobs)
            starts = latency_once(python, args, latency_jobs)
            got.update(p50=percentile(starts, 50), p99=percentile(starts, 99))
            for name in RUN_FIGURES:
                per[key][name].append(got[name])
            per[key].update(version=got['version'], settings=got['settings'])
            common.cleanup()
        for key, (_, _, options) in CEILINGS.items():
            if key in only:
                per[key]['rate'].append(ceiling_once(jobs, options))
                common.cleanup()
    return per, jobs, latency_jobs


def settings_note(per):
    """'huey 3.5.4 (synchronous FULL), Parsl 2026.10.26 (encrypted True)'."""
    seen = {}
    for values in per.values():
        if 'version' in values:
            seen[values['version']] = ', '.join('%s %s' % kv for kv in values['settings'].items())
    return ', '.join('%s (%s)' % kv for kv in sorted(seen.items())) or 'no peer measured'


def tables(per, runs, jobs, latency_jobs):
    rows = [[label, cell(per[key]['rate']), cell(per[key]['idle']),
             cell(per[key]['worker_mb']), cell(per[key]['all_mb'])]
            for key, label, _ in PEERS if key in per]
    rows += [[label, cell(per[key]['rate']), '—', '—', '—']
             for key, (label, _, _) in CEILINGS.items() if key in per]
    throughput = common.table(
        'Peers: throughput, %d workers, `/bin/true` jobs' % WORKERS,
        ['system', 'jobs/s, first picked up → last ended',
         'first job after %.0f s idle, submit → start ms' % IDLE, 'RSS of a worker process, MB',
         'RSS of all its processes, MB'], rows,
        note='%d runs of %d jobs per system, median [min–max], runs interleaved across the '
             'systems; fresh pool and queue per run; every job checked run exactly once with '
             'exit code 0. %s, installed by the benchmark in `bench/.peers-venv`. huey\'s '
             'consumer is one process whose %d threads are the workers.'
             % (runs, jobs, settings_note(per), WORKERS))
    rows = [[label, cell(per[key]['p50']), cell(per[key]['p99'])]
            for key, label, _ in PEERS if key in per]
    latency = common.table(
        'Peers: latency, idle pool of %d workers, one job at a time (ms)' % LATENCY_WORKERS,
        ['system', 'submit → start p50 ms, median [min–max] of runs',
         'submit → start p99 ms, median [min–max] of runs'], rows,
        note='%d runs of %d `/bin/true` jobs each after one warm-up job per worker; fresh pool '
             'per run; submit taken just before the enqueue call, start right after the '
             'process was created.' % (runs, latency_jobs))
    return [throughput, latency] if rows else [throughput]


def figures(per):
    """'<peer>.<figure>': the medians of the runs."""
    found = {}
    names = {'rate': 'jobs_per_s', 'idle': 'idle_start', 'p50': 'start_p50', 'p99': 'start_p99',
             'worker_mb': 'worker_rss', 'all_mb': 'all_rss'}
    for key, values in per.items():
        for name, figure in names.items():
            median = common.summary(values[name])
            if median is not None:
                found['%s.%s' % (key, figure)] = median[0]
    return found


def run(quick=False, runs=None, only=None):
    only = only or [key for key, _, _ in PEERS] + list(CEILINGS)
    runs = runs or (QUICK_RUNS if quick else RUNS)
    per, jobs, latency_jobs = measure(quick, runs, only)
    return {'tables': tables(per, runs, jobs, latency_jobs), 'figures': figures(per)}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--quick', action='store_true', help='fewer runs and jobs')
    ap.add_argument('--runs', type=int, help='runs per peer (default 5, --quick 2)')
    known = [key for key, _, _ in PEERS] + list(CEILINGS)
    ap.add_argument('--only', default=','.join(known),
                    help='peers to measure, comma-separated (default all: %(default)s)')
    args = ap.parse_args()
    only = [key for key in args.only.split(',') if key]
    if not only or set(only) - set(known):
        ap.error('--only takes some of: %s' % ', '.join(known))
    print(common.machine_line())
    result = run(args.quick, args.runs, only)
    print('\n'.join(result['tables']))
    print(json.dumps(result['figures'], indent=1, sort_keys=True))


if __name__ == '__main__':
    main()
