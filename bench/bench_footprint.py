#!/usr/bin/env python3
"""Benchmark 5, footprint.

- Pilot RSS while running a job: 5 real pilots each running `sleep 3`; VmRSS of each pilot
  process (not of its payload) from /proc/<pid>/status.
- Server RSS with 10^6 jobs, after a listing and the dashboard (bench_scaling measures it
  too; run_all takes it from there).
- 2,000 idle pilots long-polling one server (SQLite, the server's defaults): the server's CPU
  (utime + stime from /proc/<pid>/stat, of its supervisor and workers) over windows of 5 s, and
  the time of the submissions made meanwhile. The pilots are simulated by threads in 4 load
  processes (RLIMIT_NOFILE raised as needed), each pilot on its own kept-alive HTTP
  connection, and behave as p3s_pilot.py does when idle: POST .../work {wait: its default
  --wait}, again at once when the server held the request, after its --period when it did not. Their first
  polls start at random points of the wait, and the windows start once each pilot has polled:
  5 windows of the pilots alone, then 5 more (the figure judged) while a user submits one
  `/bin/true` job every 0.2 s as p3s_job.py does (POST /api/jobs, a new connection each); a
  held pilot takes it and reports it finished in its next request.

    python bench/bench_footprint.py [--quick] [--pilots 2000]
"""
import argparse
import multiprocessing
import os
import random
import resource
import sys
import threading
import time
import uuid as uuidlib

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
import p3s_pilot  # noqa: E402  (common puts the repository first on the path)
from common import cell  # noqa: E402

RUNS = 5
IDLE_PILOTS = 2000
PERIOD = p3s_pilot.DEFAULTS['period']
WAIT = p3s_pilot.DEFAULTS['wait']
WINDOW = 5.0               # seconds per CPU measurement (one period)
PROCESSES = 4
SUBMIT_INTERVAL = 0.2      # seconds between two submissions during the windows


def pilot_rss(n):
    with common.Server() as server:
        pilots = common.start_pilots(server, n, '--cycles', '1')
        common.wait_for(lambda: common.idle_pilots(server, n), 30, 'the pilots to wait')
        server.api('POST', '/api/jobs', [{'payload': 'sleep 3', 'name': 'rss%d' % i}
                                         for i in range(n)])
        common.wait_for(lambda: len(server.jobs(state='running')) >= n, 30, 'the jobs to run')
        time.sleep(0.3)
        return [common.rss_mb(p.pid) for p in pilots]


def idle_pilot(port, stop_at, jobs_taken):
    """A registered pilot with nothing to do, as p3s_pilot.py is then: POST .../work {wait:
    WAIT} on its kept connection, again at once when the server held it, after its period
    when it did not. A job submitted meanwhile may come to it: it "runs" it at once and
    reports it finished in its next request, as the pilot does for a short job."""
    link = common.KeepAlive(port)
    me = str(uuidlib.uuid4())
    link.secret = link.post('/api/pilots', {'uuid': me, 'host': 'bench-idle',
                                            'pid': os.getpid()}, 60)['secret']
    time.sleep(random.uniform(0, WAIT))     # the long polls end at random points
    pending = None
    while time.time() < stop_at:
        body = {'wait': WAIT}
        if pending:
            body['report'] = pending
        reply = link.post('/api/pilots/%s/work' % me, body, WAIT + 30)
        pending = None
        if reply.get('state') == 'dispatched':
            with jobs_taken.get_lock():
                jobs_taken.value += 1
            pending = {'job': reply['job']['uuid'], 'state': 'finished', 'errcode': 0,
                       'pid': 4242, 'stdout': '', 'stderr': '', 'elapsed': 0.0, 'ago': 0.0}
        elif reply.get('state') != 'idle':
            raise RuntimeError('an idle pilot got %s' % reply)
        elif not reply.get('waited'):       # as p3s_pilot.py: sleep unless the server held it
            time.sleep(PERIOD)


def idle_process(port, n, stop_at, failures, jobs_taken):
    """One load process: n pilots as threads, each with its own connection."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = n + 256
    if soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(wanted, hard), hard))
    threading.stack_size(256 * 1024)

    def guarded():
        try:
            idle_pilot(port, stop_at, jobs_taken)
        except Exception as e:
            with failures.get_lock():
                failures.value += 1
            print('simulated pilot failed: %s' % e, file=sys.stderr)
    threads = [threading.Thread(target=guarded, daemon=True) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(max(0.0, stop_at - time.time()) + WAIT + 30)


def held_polls(server):
    """Long polls the server holds now (p3s_long_polls_waiting, all its processes)."""
    status, text = common.request(server.port, 'GET', '/metrics')
    if status != 200:
        return None
    return int(sum(float(line.split()[-1]) for line in text.splitlines()
                   if line.startswith('p3s_long_polls_waiting')))


def submitter(server, stop, out):
    """A user submitting one job at a time, SUBMIT_INTERVAL apart, as p3s_job.py does (a new
    connection each); out gets each submission's round trip in ms."""
    i = 0
    next_at = time.monotonic()
    while not stop.is_set():
        t0 = time.perf_counter()
        status, reply = common.request(server.port, 'POST', '/api/jobs',
                                       [{'payload': '/bin/true', 'name': 'fp%d' % i}])
        out.append((time.perf_counter() - t0) * 1000 if status == 200 else None)
        i += 1
        next_at += SUBMIT_INTERVAL
        stop.wait(max(0.0, next_at - time.monotonic()))


def idle_cpu(pilots, windows, window=WINDOW):
    """Server CPU (supervisor and workers) in % of one core over `windows` windows, once every
    pilot holds its long poll: first the pilots alone, then with submissions meanwhile; and
    those submissions' times."""
    with common.Server() as server:
        stop_at = time.time() + 600 + windows * window
        ctx = multiprocessing.get_context('fork')
        failures, jobs_taken = ctx.Value('i', 0), ctx.Value('i', 0)
        share = [pilots // PROCESSES + (1 if i < pilots % PROCESSES else 0)
                 for i in range(PROCESSES)]
        procs = [ctx.Process(target=idle_process, args=(server.port, n, stop_at, failures,
                                                        jobs_taken), daemon=True)
                 for n in share]
        try:
            for p in procs:
                p.start()
            common.wait_for(lambda: sum(server.api('GET', '/api/summary')['pilots'].values())
                            >= pilots, 300, 'the pilots to register', 0.5)
            time.sleep(WAIT + 2)         # each pilot is in its long poll cycle by now

            def cpu_windows():
                got, held = [], []
                for _ in range(windows):
                    c0, t0 = common.server_cpu_seconds(server.pid), time.monotonic()
                    time.sleep(window)
                    got.append(100.0 * (common.server_cpu_seconds(server.pid) - c0)
                               / (time.monotonic() - t0))
                    held.append(held_polls(server))
                return got, held
            quiet, held_quiet = cpu_windows()          # the pilots alone
            stop, submits = threading.Event(), []
            feeder = threading.Thread(target=submitter, args=(server, stop, submits))
            feeder.start()
            try:
                per_window, held = cpu_windows()
            finally:
                stop.set()
                feeder.join()
            pilots_seen = server.api('GET', '/api/summary')['pilots']
        finally:
            for p in procs:
                p.kill()
                p.join()
    failed = sum(1 for x in submits if x is None)
    times = [x for x in submits if x is not None]
    return {'cpu': per_window, 'quiet_cpu': quiet, 'pilots': pilots_seen,
            'held': held + held_quiet, 'submits': times,
            'failed_submits': failed, 'failed_pilots': failures.value,
            'jobs_taken': jobs_taken.value}


def server_rss_1m(quick):
    size = 10 ** 5 if quick else 10 ** 6
    server = common.Server()
    common.fill_jobs(server.db, size)
    with server:
        server.api('GET', '/api/jobs?state=defined&limit=100')
        common.request(server.port, 'GET', '/')
        return common.server_rss_mb(server.pid), size


def run(quick=False, pilots=IDLE_PILOTS, server_rss=None, parts=('rss', 'idle')):
    """parts: 'rss' (the pilot's and the server's RSS), 'idle' (the idle pilots)."""
    runs = 3 if quick else RUNS
    rows, figures = [], {}
    if 'rss' in parts:
        rss = pilot_rss(runs)
        if server_rss is None:
            server_rss = server_rss_1m(quick)
        rows += [
            ['pilot RSS while running a job', cell(rss), 'MB',
             '%d pilots, `sleep 3` jobs' % runs],
            ['server RSS with {:,} jobs'.format(server_rss[1]), fmt_one(server_rss[0]), 'MB',
             'after a listing and the dashboard']]
        figures.update(pilot_rss=common.summary(rss)[0], server_rss_1m=server_rss[0])
    if 'idle' in parts:
        idle = idle_cpu(pilots, runs)
        held = [h for h in idle['held'] if h is not None]
        times = idle['submits']
        p50, p99 = common.percentile(times, 50), common.percentile(times, 99)
        rows += [
            ['server CPU, {:,} idle pilots long-polling, submissions meanwhile'.format(pilots),
             cell(idle['cpu']),
             '% of one core', '%d windows of %.0f s, supervisor and workers; long polls held at '
             'the windows\' ends: %s; pilots by state: %s; %d simulated pilots failed'
             % (runs, WINDOW, '%d–%d' % (min(held), max(held)) if held else 'n/a',
                idle['pilots'], idle['failed_pilots'])],
            ['the same before the submissions began (the pilots alone)', cell(idle['quiet_cpu']),
             '% of one core', '%d windows of %.0f s' % (runs, WINDOW)],
            ['submission while they poll, p50 / p99 (max)', '%s / %s (%s)'
             % (fmt_one(p50), fmt_one(p99), fmt_one(max(times) if times else None)), 'ms',
             '%d submissions of one job, one every %.1f s, new connection each, during the '
             'windows; %d failed; %d jobs taken by the pilots' % (
                 len(times), SUBMIT_INTERVAL, idle['failed_submits'], idle['jobs_taken'])]]
        figures.update(idle_cpu=common.summary(idle['cpu'])[0],
                       quiet_cpu=common.summary(idle['quiet_cpu'])[0], submit_p50=p50,
                       submit_p99=p99, idle_pilots=pilots,
                       idle_failures=idle['failed_pilots'] + idle['failed_submits'])
    text = common.table('Footprint', ['figure', 'median [min–max]', 'unit', 'how'], rows,
                        note='SQLite, the server\'s defaults (`--sync full`, --workers = '
                             'the cores).')
    return {'tables': [text], 'figures': figures}


def fmt_one(x):
    return common.fmt(x)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--quick', action='store_true', help='fewer runs, smaller database')
    ap.add_argument('--pilots', type=int, default=IDLE_PILOTS, help='idle pilots to simulate')
    ap.add_argument('--parts', default='rss,idle', help='rss, idle or both')
    args = ap.parse_args()
    print(common.machine_line())
    print(run(args.quick, args.pilots, parts=args.parts.split(','))['tables'][0])


if __name__ == '__main__':
    main()
