#!/usr/bin/env python3
"""Profile the server under a benchmark's load with py-spy (a development tool, not needed by
`make bench`: `.venv/bin/pip install py-spy`).

    python bench/profile_server.py brokerage [--pilots 64] [--seconds 6] [--sync full]
    python bench/profile_server.py throughput [--seconds 6]

Prints the functions with the most samples, inclusive and self, from py-spy's collapsed
stacks (all threads), and keeps the raw file for flame graphs.
"""
import argparse
import collections
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

PY_SPY = os.path.join(os.path.dirname(sys.executable), 'py-spy')


def record(pid, seconds, out, idle=False, gil=False):
    args = [PY_SPY, 'record', '--pid', str(pid), '--duration', str(int(seconds)),
            '--format', 'raw', '--output', out, '--rate', '200', '--nonblocking',
            '--subprocesses']            # the workers under their supervisor
    if idle:
        args.append('--idle')
    if gil:
        args.append('--gil')     # only the thread holding the GIL: where Python's time goes
    return subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def report(raw, top=30):
    incl, self_ = collections.Counter(), collections.Counter()
    total = 0
    with open(raw) as f:
        for line in f:
            stack, _, n = line.rstrip().rpartition(' ')
            n = int(n)
            total += n
            frames = stack.split(';')
            for fr in set(frames[1:]):
                incl[fr] += n
            self_[frames[-1]] += n
    print('samples: %d (all threads)' % total)
    for title, counter in (('inclusive', incl), ('self', self_)):
        print('\n-- top %d %s --' % (top, title))
        for fr, n in counter.most_common(top):
            print('%5.1f%%  %s' % (100.0 * n / total, fr[:150]))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('load', choices=('brokerage', 'throughput'))
    ap.add_argument('--pilots', type=int, default=64)
    ap.add_argument('--seconds', type=float, default=6)
    ap.add_argument('--sync', default='full')
    ap.add_argument('--out', default='/tmp/p3s-profile.txt')
    ap.add_argument('--gil', action='store_true',
                    help='sample only the thread holding the GIL (CPU in Python, not waits)')
    args = ap.parse_args()
    if args.load == 'brokerage':
        import bench_brokerage as b
        server = common.Server(args=['--sync', args.sync])
        common.fill_jobs(server.db, 40000)
        with server:
            spy = record(server.pid, args.seconds + 1, args.out, gil=args.gil)
            print(b.run_once(server, args.pilots, args.seconds))
            spy.wait()
    else:
        with common.Server(args=['--sync', args.sync]) as server:
            server.api('POST', '/api/jobs', [{'payload': '/bin/true'} for _ in range(20000)])
            spy = record(server.pid, args.seconds, args.out, gil=args.gil)
            common.start_pilots(server, 8, '--cycles', '0')
            spy.wait()
    report(args.out)


if __name__ == '__main__':
    main()
