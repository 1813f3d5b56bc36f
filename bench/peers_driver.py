#!/usr/bin/env python3
"""One run of one peer (huey or Parsl), started by bench_peers.py with the Python of the peers'
own virtual environment. The jobs append their records to RECORDS (peers_app.py); this prints
one JSON line: when each job was submitted, the memory of the workers, the peer's version.

    peers_driver.py huey|parsl throughput|latency --records FILE --workdir DIR
                    [--jobs N] [--workers N] [--idle S] [--spacing S]
                    [--delay S] [--max-delay S]                 (huey's polling)

throughput: the jobs are queued first, then the workers start; once all have run, the pool
sits idle for --idle seconds and one more job ('idle') is submitted. latency: the workers start,
one warm-up job per worker runs, then the jobs go one at a time, each after the previous one
ended. Every process started below this one is stopped at its end, by pid (see `sweep`).
"""
import argparse
import atexit
import ctypes
import json
import os
import signal
import statistics
import subprocess
import sys
import time

BENCH = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, BENCH)
import common  # noqa: E402
import peers_app  # noqa: E402

BIN = os.path.dirname(sys.executable)   # the peers' venv: huey_consumer, Parsl's scripts
WARM_UP = ['/bin/sleep', '0.1']
JOB_TIMEOUT = 10.0
START_TIMEOUT = 120.0         # Parsl's workers take seconds to start on a loaded machine
RUN_TIMEOUT = 300.0
POLL = 0.002                  # as bench_latency.py polls for a finished job
PR_SET_CHILD_SUBREAPER = 36


# ---------------------------------------------------------------------------------------------
# Processes below this one
# ---------------------------------------------------------------------------------------------


def adopt_orphans():
    """Make orphaned descendants children of this process rather than of init: Parsl's
    LocalProvider leaves its worker pool behind a shell that exits, and it must still be found
    (for its memory) and stopped (at the end)."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), 'prctl(PR_SET_CHILD_SUBREAPER)')


def parents():
    """pid -> parent pid of every process, from /proc."""
    found = {}
    for name in os.listdir('/proc'):
        if name.isdigit():
            try:
                with open('/proc/%s/stat' % name) as f:
                    fields = f.read().rsplit(')', 1)[1].split()
            except OSError:
                continue
            if fields[0] != 'Z':
                found[int(name)] = int(fields[1])
    return found


def descendants(pid):
    """The live processes below pid."""
    ppid = parents()
    below, frontier = [], [pid]
    while frontier:
        frontier = [p for p, parent in ppid.items() if parent in frontier]
        below += frontier
    return below


def reap():
    while True:
        try:
            if os.waitpid(-1, os.WNOHANG)[0] == 0:
                return
        except ChildProcessError:
            return


def signal_all(pids, sig):
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


@atexit.register
def sweep(grace=5.0):
    """Stop, by pid, every process started below this one that is still there."""
    me = os.getpid()
    signal_all(descendants(me), signal.SIGTERM)
    give_up = time.monotonic() + grace
    while descendants(me) and time.monotonic() < give_up:
        reap()
        time.sleep(0.05)
    signal_all(descendants(me), signal.SIGKILL)
    time.sleep(0.05)
    reap()


def memory(worker_pids):
    """RSS in MB: the median worker process, and all processes below this one together."""
    workers = [common.rss_mb(pid) for pid in worker_pids]
    everything = [common.rss_mb(pid) for pid in descendants(os.getpid())]
    return {'worker_mb': statistics.median(workers), 'all_mb': sum(everything),
            'processes': len(everything), 'worker_processes': len(workers),
            'submitter_mb': common.rss_mb(os.getpid())}


# ---------------------------------------------------------------------------------------------
# The records the jobs write
# ---------------------------------------------------------------------------------------------


class Records:
    """The records file, read as it grows."""

    def __init__(self, path):
        self.path = path
        self.offset = 0
        self.records = []
        self.seen = set()

    def update(self):
        try:
            with open(self.path, 'rb') as f:
                f.seek(self.offset)
                text = f.read().decode()
        except FileNotFoundError:
            return
        complete = text[:text.rfind('\n') + 1]
        self.offset += len(complete.encode())
        new = peers_app.parse_records(complete)
        self.records += new
        self.seen.update(r['job'] for r in new)

    def wait(self, jobs, timeout, what, interval=POLL):
        give_up = time.monotonic() + timeout
        while True:
            self.update()
            if self.seen.issuperset(jobs):
                return
            if time.monotonic() > give_up:
                raise RuntimeError('timed out after %.0f s waiting for %s (%d of %d recorded)'
                                   % (timeout, what, len(self.seen & set(jobs)), len(jobs)))
            time.sleep(interval)


# ---------------------------------------------------------------------------------------------
# The peers
# ---------------------------------------------------------------------------------------------


class HueyPool:
    """huey's own consumer (`huey_consumer -k thread`) on a SQLite queue."""

    def __init__(self, args):
        self.args = args
        self.db = os.path.join(args.workdir, 'huey.db')
        self.app, self.task = peers_app.make_huey(self.db)
        self.proc = None

    def version(self):
        return 'huey ' + common.version('huey')

    def settings(self):
        level = self.app.storage.conn.execute('PRAGMA synchronous').fetchone()[0]
        return {'SQLite synchronous': ('OFF', 'NORMAL', 'FULL', 'EXTRA')[level]}

    def submit(self, job, command):
        self.task(job, command, self.args.records)

    def start(self):
        command = [os.path.join(BIN, 'huey_consumer'), 'peers_app.huey', '-k', 'thread',
                   '-w', str(self.args.workers)]
        if self.args.delay is not None:
            command += ['-d', str(self.args.delay)]
        if self.args.max_delay is not None:
            command += ['-m', str(self.args.max_delay)]
        env = dict(os.environ, PYTHONPATH=BENCH, **{peers_app.HUEY_DB: self.db})
        self.log = open(os.path.join(self.args.workdir, 'huey-consumer.log'), 'ab')
        self.proc = common.spawn(command, env=env, cwd=self.args.workdir,
                                 stdin=subprocess.DEVNULL, stdout=self.log,
                                 stderr=self.log)

    def stop(self):
        if self.proc:
            common.stop(self.proc)
            self.log.close()
        self.app.storage.close()


class ParslPool:
    """Parsl's HighThroughputExecutor, one block of --workers workers on LocalProvider."""

    def __init__(self, args, started):
        import parsl
        from parsl.config import Config
        from parsl.executors import HighThroughputExecutor
        from parsl.providers import LocalProvider
        self.args = args
        # The worker pool and the interchange are found on PATH, the job's module on PYTHONPATH.
        os.environ['PATH'] = BIN + os.pathsep + os.environ.get('PATH', '')
        os.environ['PYTHONPATH'] = BENCH
        self.htex = HighThroughputExecutor(
            label='htex', address='127.0.0.1', max_workers_per_node=args.workers,
            # the pool starts min(max_workers_per_node, cores / cores_per_worker) workers
            cores_per_worker=(os.cpu_count() or 1) / args.workers,
            provider=LocalProvider(init_blocks=1 if started else 0, min_blocks=0,
                                   max_blocks=1))
        self.dfk = parsl.load(Config(executors=[self.htex], strategy='none',
                                     run_dir=os.path.join(args.workdir, 'runinfo'),
                                     usage_tracking=0))
        self.app = parsl.python_app(peers_app.run_job, executors=['htex'])
        self.futures = []
        self.started = started

    def version(self):
        return 'Parsl ' + common.version('parsl')

    def settings(self):
        return {'ZeroMQ': 'encrypted' if self.htex.encrypted else 'not encrypted'}

    def submit(self, job, command):
        self.futures.append(self.app(job, command, self.args.records))

    def start(self):
        if not self.started:
            self.htex.scale_out_facade(1)
            self.started = True

    def stop(self):
        import parsl
        failed = [f.exception() for f in self.futures if f.done() and f.exception()]
        self.dfk.cleanup()
        parsl.clear()
        if failed:
            raise RuntimeError('%d Parsl tasks failed, the first: %r' % (len(failed), failed[0]))


def make_pool(args, queued_first):
    if args.system == 'huey':
        return HueyPool(args)
    return ParslPool(args, started=not queued_first)


# ---------------------------------------------------------------------------------------------
# The runs
# ---------------------------------------------------------------------------------------------


def throughput(args):
    pool = make_pool(args, queued_first=True)
    records = Records(args.records)
    jobs = ['t%d' % i for i in range(args.jobs)]
    submitted = {}
    try:
        for job in jobs:
            pool.submit(job, peers_app.TRUE)
        pool.start()
        records.wait(jobs, RUN_TIMEOUT, 'the jobs', interval=0.05)
        rss = memory({r['pid'] for r in records.records})
        time.sleep(args.idle)
        submitted['idle'] = time.time()
        pool.submit('idle', peers_app.TRUE)
        records.wait(['idle'], JOB_TIMEOUT, 'the job after idleness')
        return {'submitted': submitted, 'rss': rss, 'version': pool.version(),
                'settings': pool.settings()}
    finally:
        pool.stop()


def latency(args):
    pool = make_pool(args, queued_first=False)
    records = Records(args.records)
    submitted = {}
    try:
        pool.start()
        warm = ['w%d' % i for i in range(args.workers)]
        for job in warm:
            pool.submit(job, WARM_UP)
        records.wait(warm, START_TIMEOUT, 'the workers to start')
        time.sleep(0.2)
        for i in range(args.jobs):
            job = 'l%d' % i
            submitted[job] = time.time()
            pool.submit(job, peers_app.TRUE)
            records.wait([job], JOB_TIMEOUT, 'job %s' % job)
            time.sleep(args.spacing)
        return {'submitted': submitted, 'warm_up': warm, 'version': pool.version(),
                'settings': pool.settings()}
    finally:
        pool.stop()


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('system', choices=('huey', 'parsl'))
    ap.add_argument('mode', choices=('throughput', 'latency'))
    ap.add_argument('--records', required=True, help='the file the jobs append to')
    ap.add_argument('--workdir', required=True, help='for queues, logs and run directories')
    ap.add_argument('--jobs', type=int, default=2000)
    ap.add_argument('--workers', type=int, default=8)
    ap.add_argument('--idle', type=float, default=3.0)
    ap.add_argument('--spacing', type=float, default=0.01)
    ap.add_argument('--delay', type=float, help="huey's first polling interval (-d)")
    ap.add_argument('--max-delay', type=float, help="huey's longest polling interval (-m)")
    args = ap.parse_args()
    adopt_orphans()
    result = (throughput if args.mode == 'throughput' else latency)(args)
    print(json.dumps(result), flush=True)
    return 0


if __name__ == '__main__':
    sys.exit(main())
