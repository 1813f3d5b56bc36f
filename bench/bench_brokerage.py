#!/usr/bin/env python3
"""Benchmark 3, brokerage capacity: simulated pilots speaking exactly the pilot's protocol.

Each simulated pilot registers (POST /api/pilots), then loops: POST /api/pilots/<uuid>/work
{wait, report: the previous job's final report, with its durations `elapsed` and `ago`}, as
p3s_pilot.py does. The real pilot sends a start report (POST .../report {state: running, pid,
elapsed}) only when the payload still runs after 0.2 s; a payload-less cycle never does, so
the main table has one request per job, and a second table (`--start-report`) adds the start
report to every cycle, as for jobs of 0.2 s or more. Each pilot keeps its connection open
between requests, as p3s_pilot.py does. A Python client saturates at about 3k requests/s per
process (docs/performance.md), so the pilots are spread over several processes, each
with threads. The queue is filled beforehand, so no request ever waits.

A job cycle is complete when the request that carries its final report returns: the next
work request, or, for the last cycle of each pilot, a report of its own after the measuring
window. Cycles/s = complete cycles / (last request's end - start).

    python bench/bench_brokerage.py [--quick] [--pilots 16,64,256] [--sync normal|full]
                                    [--db sqlite|postgresql]

--db postgresql: the same on a database of a private PostgreSQL cluster (common.Postgres); the
queue is filled there by one INSERT ... SELECT and ANALYZEd.
"""
import argparse
import multiprocessing
import os
import sys
import threading
import time
import uuid as uuidlib

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
from common import cell, percentile  # noqa: E402

PILOT_COUNTS = (16, 64, 256)
RUNS = 5
DURATION = 4.0            # seconds of measurement per run
QUEUED = 60000            # jobs queued before the server starts
MAX_PROCESSES = 4
WAIT = 20


def post(port, path, body, secret=None):
    """One POST on a new connection; `secret`: a pilot's own calls carry the secret its
    registration gave."""
    link = common.KeepAlive(port)
    link.secret = secret
    try:
        return link.post(path, body)
    finally:
        link.close()


class SimPilot:
    def __init__(self, port, start_report=False):
        self.port = port
        self.start_report = start_report
        self.uuid = str(uuidlib.uuid4())
        self.link = common.KeepAlive(port)       # one connection, kept, as the pilot's
        self.pending = None
        self.cycles = 0
        self.latencies = []
        self.errors = 0

    def timed(self, path, body):
        t0 = time.perf_counter()
        try:
            return self.link.post(path, body)
        except Exception:
            self.errors += 1
            return {}
        finally:
            self.latencies.append(time.perf_counter() - t0)

    def register(self):
        self.link.secret = self.link.post('/api/pilots', {'uuid': self.uuid, 'host': 'bench',
                                                          'pid': os.getpid()})['secret']

    def cycle(self):
        body = {'wait': WAIT}
        if self.pending:
            body['report'] = self.pending
        reply = self.timed('/api/pilots/%s/work' % self.uuid, body)
        if self.pending and reply.get('report', {}).get('status') == 'OK':
            self.cycles += 1
        self.pending = None
        if reply.get('state') != 'dispatched':
            return
        job = reply['job']['uuid']
        if self.start_report:
            self.timed('/api/pilots/%s/report' % self.uuid,
                       {'job': job, 'state': 'running', 'pid': 4242, 'elapsed': 0.0})
        self.pending = {'job': job, 'state': 'finished', 'errcode': 0, 'pid': 4242,
                        'stdout': '', 'stderr': '', 'elapsed': 0.0, 'ago': 0.0}

    def loop(self, start_at, end_at):
        """Cycles started before end_at; then the last final report goes alone, as the
        pilot's finish() sends it, so that every counted cycle is complete."""
        time.sleep(max(0.0, start_at - time.time()))
        while time.time() < end_at:
            self.cycle()
        if self.pending:
            reply = self.timed('/api/pilots/%s/report' % self.uuid, self.pending)
            if reply.get('status') == 'OK':
                self.cycles += 1
        self.finished_at = time.time()


def worker(port, n, start_report, ready, go, results):
    """One load process: n simulated pilots as threads."""
    threading.stack_size(256 * 1024)
    pilots = [SimPilot(port, start_report) for _ in range(n)]
    for p in pilots:
        p.register()
    ready.put(n)
    start_at, end_at = go.get()
    threads = [threading.Thread(target=p.loop, args=(start_at, end_at)) for p in pilots]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    results.put((sum(p.cycles for p in pilots), sum(p.errors for p in pilots),
                 [x for p in pilots for x in p.latencies], max(p.finished_at for p in pilots)))


def run_once(server, pilots, duration, start_report=False, db_pid=None):
    """db_pid: a PostgreSQL postmaster, whose processes' CPU is counted apart."""
    nproc = min(MAX_PROCESSES, max(1, pilots // 8))
    share = [pilots // nproc + (1 if i < pilots % nproc else 0) for i in range(nproc)]
    ctx = multiprocessing.get_context('fork')
    ready, results = ctx.Queue(), ctx.Queue()
    gos = [ctx.Queue() for _ in share]
    procs = [ctx.Process(target=worker, args=(server.port, n, start_report, ready, go, results),
                         daemon=True) for n, go in zip(share, gos)]
    for p in procs:
        p.start()
    for _ in procs:
        ready.get(timeout=120)
    start_at = time.time() + 0.5
    for go in gos:
        go.put((start_at, start_at + duration))
    time.sleep(0.5)
    cpu0 = common.server_cpu_seconds(server.pid)
    db0 = common.server_cpu_seconds(db_pid) if db_pid else None
    got = [results.get(timeout=duration + 120) for _ in procs]
    cpu = common.server_cpu_seconds(server.pid) - cpu0
    db_cpu = common.server_cpu_seconds(db_pid) - db0 if db_pid else None
    for p in procs:
        p.join(30)
        if p.is_alive():
            p.kill()
    duration = max(g[3] for g in got) - start_at
    cycles = sum(g[0] for g in got)
    errors = sum(g[1] for g in got)
    lat = [x for g in got for x in g[2]]
    return {'rate': cycles / duration, 'p50': percentile(lat, 50) * 1000,
            'p99': percentile(lat, 99) * 1000, 'errors': errors, 'req': len(lat) / duration,
            'cpu_per_cycle': cpu / cycles * 1000 if cycles else None,
            'db_cpu_per_cycle': db_cpu / cycles * 1000 if cycles and db_pid else None}


def measure(pilots, runs, duration, sync, queued, start_report=False, db='sqlite'):
    server = common.Server(db=common.new_database(db), args=['--sync', sync])
    common.fill_jobs(server.db, queued)
    db_pid = common.postgres().pid() if db == 'postgresql' else None
    with server:
        return [run_once(server, pilots, duration, start_report, db_pid) for _ in range(runs)]


def run(quick=False, counts=PILOT_COUNTS, sync='full', variants=(False, True), db='sqlite'):
    """Tables for each variant: without start reports (the targets), and with them."""
    runs, duration, queued = (2, 2.0, 20000) if quick else (RUNS, DURATION, QUEUED)
    on, settings = '', ''
    if db == 'postgresql':
        on = ' on PostgreSQL'
        why = common.postgres_missing()
        if why:
            return common.skipped('Brokerage capacity%s' % on, why)
        settings = ' ' + common.postgres().settings() + '.'
    tables, figures = [], {}
    for start_report in variants:
        rows = []
        for n in counts:
            res = measure(n, runs, duration, sync, queued, start_report, db)
            col = lambda k: [r[k] for r in res]  # noqa: E731
            rows.append([n, cell(col('rate')), cell(col('req')), cell(col('p50')),
                         cell(col('p99')), cell(col('cpu_per_cycle'))]
                        + ([cell(col('db_cpu_per_cycle'))] if on else [])
                        + [sum(col('errors'))])
            if not start_report:
                figures['cycles_%d' % n] = common.summary(col('rate'))[0]
                figures['p99_%d' % n] = common.summary(col('p99'))[0]
        what = ('work request + start report per cycle (jobs of 0.2 s or more)' if start_report
                else 'one work request per cycle (short jobs)')
        tables.append(common.table(
            'Brokerage capacity%s: simulated pilots, no payload, %s (`--sync %s`)'
            % (on, what, sync),
            ['pilots', 'job cycles/s', 'requests/s', 'request p50 ms', 'request p99 ms',
             'server CPU ms per cycle'] + (['PostgreSQL CPU ms per cycle'] if on else [])
            + ['failed requests'], rows,
            note='%d runs of %.0f s per pilot count, median [min–max]; each work request '
                 'carries the previous final report; %d jobs queued beforehand; up to %d load '
                 'processes with threads, on the same 2 cores as the server; the server\'s '
                 'default --workers.' % (runs, duration, queued, MAX_PROCESSES) + settings))
    if settings:
        figures['pg_settings'] = settings.strip(' .')
    return {'tables': tables, 'figures': figures}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--quick', action='store_true', help='fewer and shorter runs')
    ap.add_argument('--pilots', default=','.join(map(str, PILOT_COUNTS)),
                    help='comma-separated pilot counts')
    ap.add_argument('--sync', choices=('normal', 'full'), default='full')
    ap.add_argument('--start-report', choices=('no', 'yes', 'both'), default='both',
                    help='send a start report in every cycle (default: both variants)')
    ap.add_argument('--db', choices=('sqlite', 'postgresql'), default='sqlite')
    args = ap.parse_args()
    print(common.machine_line())
    counts = [int(x) for x in args.pilots.split(',')]
    variants = {'no': (False,), 'yes': (True,), 'both': (False, True)}[args.start_report]
    for table in run(args.quick, counts, args.sync, variants, args.db)['tables']:
        print(table)


if __name__ == '__main__':
    main()
