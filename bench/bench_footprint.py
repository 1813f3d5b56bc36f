#!/usr/bin/env python3
"""Benchmark 5, footprint.

- Pilot RSS while running a job: 5 real pilots each running `sleep 3`; VmRSS of each pilot
  process (not of its payload) from /proc/<pid>/status.
- Server RSS with 10^6 jobs, after a listing and the dashboard (bench_scaling measures it
  too; run_all takes it from there).
- Server CPU (utime + stime from /proc/<pid>/stat) while 1,000 registered pilots sit idle.
  The pilots are simulated by threads in several processes and behave as p3s_pilot.py does
  when idle: POST .../work {wait: 20}; a request the server cannot hold is answered at once,
  and then the pilot sleeps its period (5 s); a held one returns after the wait and the
  pilot asks again at once. Each pilot starts at a random point of its period.

    python bench/bench_footprint.py [--quick] [--pilots 1000]
"""
import argparse
import multiprocessing
import os
import random
import sys
import threading
import time
import uuid as uuidlib

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
from common import cell  # noqa: E402
from bench_brokerage import post  # noqa: E402

RUNS = 5
IDLE_PILOTS = 1000
PERIOD = 5.0               # p3s_pilot.py --period default
WAIT = 20.0                # p3s_pilot.py --wait default
WINDOW = 5.0               # seconds per CPU measurement (one period)
PROCESSES = 4


def pilot_rss(n):
    with common.Server() as server:
        pilots = common.start_pilots(server, n, '--cycles', '1')
        common.wait_for(lambda: common.idle_pilots(server, n), 30, 'the pilots to wait')
        server.api('POST', '/api/jobs', [{'payload': 'sleep 3', 'name': 'rss%d' % i}
                                         for i in range(n)])
        common.wait_for(lambda: len(server.jobs(state='running')) >= n, 30, 'the jobs to run')
        time.sleep(0.3)
        return [common.rss_mb(p.pid) for p in pilots]


def idle_pilot(port, stop_at):
    me = str(uuidlib.uuid4())
    secret = post(port, '/api/pilots', {'uuid': me, 'host': 'bench-idle',
                                        'pid': os.getpid()})['secret']
    time.sleep(random.uniform(0, PERIOD))
    while time.time() < stop_at:
        reply = post(port, '/api/pilots/%s/work' % me, {'wait': WAIT}, secret)
        if reply.get('state') != 'idle':
            raise RuntimeError('an idle pilot got %s' % reply)
        if not reply.get('waited'):         # as p3s_pilot.py: sleep unless the server held it
            time.sleep(PERIOD)


def idle_process(port, n, stop_at, errors):
    threading.stack_size(256 * 1024)
    failures = []

    def guarded():
        try:
            idle_pilot(port, stop_at)
        except Exception as e:
            failures.append(e)
    threads = [threading.Thread(target=guarded, daemon=True) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(stop_at - time.time() + WAIT + 30)
    errors.put(len(failures))


def idle_cpu(pilots, windows):
    """Server CPU in % of one core over `windows` periods, after one period of settling."""
    with common.Server() as server:
        settle = PERIOD + 2
        stop_at = time.time() + settle + windows * WINDOW + 600
        ctx = multiprocessing.get_context('fork')
        errors = ctx.Queue()
        share = [pilots // PROCESSES + (1 if i < pilots % PROCESSES else 0)
                 for i in range(PROCESSES)]
        procs = [ctx.Process(target=idle_process, args=(server.port, n, stop_at, errors),
                             daemon=True) for n in share]
        for p in procs:
            p.start()
        common.wait_for(lambda: sum(server.api('GET', '/api/summary')['pilots'].values())
                        >= pilots, 120, 'the pilots to register', 0.5)
        time.sleep(settle)
        per_window = []
        for _ in range(windows):
            c0, t0 = common.server_cpu_seconds(server.pid), time.monotonic()
            time.sleep(WINDOW)
            per_window.append(100.0 * (common.server_cpu_seconds(server.pid) - c0)
                              / (time.monotonic() - t0))
        pilots_seen = server.api('GET', '/api/summary')['pilots']
        for p in procs:
            p.kill()
            p.join()
    return per_window, pilots_seen


def server_rss_1m(quick):
    size = 10 ** 5 if quick else 10 ** 6
    server = common.Server()
    common.fill_jobs(server.db, size)
    with server:
        server.api('GET', '/api/jobs?state=defined&limit=100')
        common.request(server.port, 'GET', '/')
        return common.server_rss_mb(server.pid), size


def run(quick=False, pilots=IDLE_PILOTS, server_rss=None):
    runs = 3 if quick else RUNS
    rss = pilot_rss(runs)
    cpu, seen = idle_cpu(pilots, runs)
    if server_rss is None:
        server_rss = server_rss_1m(quick)
    rows = [
        ['pilot RSS while running a job', cell(rss), 'MB', '%d pilots, `sleep 3` jobs' % runs],
        ['server RSS with {:,} jobs'.format(server_rss[1]), fmt_one(server_rss[0]), 'MB',
         'after a listing and the dashboard'],
        ['server CPU, {:,} registered idle pilots'.format(pilots), cell(cpu), '% of one core',
         '%d windows of %.0f s; pilots by state: %s' % (runs, WINDOW, seen)],
    ]
    text = common.table('Footprint', ['figure', 'median [min–max]', 'unit', 'how'], rows)
    return {'tables': [text], 'figures': {'pilot_rss': common.summary(rss)[0],
                                          'server_rss_1m': server_rss[0],
                                          'idle_cpu': common.summary(cpu)[0]}}


def fmt_one(x):
    return common.fmt(x)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--quick', action='store_true', help='fewer runs, smaller database')
    ap.add_argument('--pilots', type=int, default=IDLE_PILOTS, help='idle pilots to simulate')
    args = ap.parse_args()
    print(common.machine_line())
    print(run(args.quick, args.pilots)['tables'][0])


if __name__ == '__main__':
    main()
