#!/usr/bin/env python3
"""Where the CPU goes (a development tool behind NOTES.md, not run by `make bench`).

1. Server CPU per request, by kind, for one sequential client (no concurrency): a ping (the
   bare bottle + gevent + TCP cost), an idle work request, a heartbeat, and a complete job
   cycle: a work request carrying the previous final report (a short job), and the same plus
   a start report (a job of 0.2 s or more).
2. CPU per job of a real 8-pilot run, split between the server, the pilot processes and the
   payloads (`/proc/<pid>/stat`: utime+stime, and cutime+cstime for the reaped payloads).

    python bench/costs.py [--sync full|normal] [--jobs 2000]
"""
import argparse
import os
import sys
import time
import uuid as uuidlib

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
from bench_brokerage import post  # noqa: E402

N = 1500


def per_request(sync):
    rows = []
    with common.Server(args=['--sync', sync]) as server:
        port, me = server.port, str(uuidlib.uuid4())
        secret = post(port, '/api/pilots', {'uuid': me, 'host': 'bench'})['secret']
        pending = []

        def cycle(start_report=False):
            body = {'wait': 0}
            if pending:
                body['report'] = pending.pop()
            job = post(port, '/api/pilots/%s/work' % me, body, secret)['job']['uuid']
            if start_report:
                post(port, '/api/pilots/%s/report' % me,
                     {'job': job, 'state': 'running', 'pid': 1, 'elapsed': 0.0}, secret)
            pending.append({'job': job, 'state': 'finished', 'errcode': 0, 'pid': 1,
                            'stdout': '', 'stderr': '', 'elapsed': 0.0, 'ago': 0.0})

        kinds = [
            ('GET /api/ping', lambda: common.request(port, 'GET', '/api/ping')),
            ('POST …/work {wait: 0}, empty queue',
             lambda: post(port, '/api/pilots/%s/work' % me, {'wait': 0}, secret)),
            ('POST …/heartbeat', lambda: post(port, '/api/pilots/%s/heartbeat' % me, {}, secret)),
            ('job cycle, short job: work request with the final report', cycle),
            ('job cycle with a start report (2 requests)', lambda: cycle(True)),
        ]
        for name, fn in kinds:
            if name.startswith('job cycle'):
                server.api('POST', '/api/jobs', [{'payload': '/bin/true', 'name': str(i)}
                                                 for i in range(N + 1)])
            c0, t0 = common.server_cpu_seconds(server.pid), time.perf_counter()
            for _ in range(N):
                fn()
            wall = (time.perf_counter() - t0) / N * 1e6
            rows.append([name, '%.0f' % ((common.server_cpu_seconds(server.pid) - c0) / N * 1e6),
                         '%.0f' % wall])
    return common.table('Server CPU per request, one sequential client (`--sync %s`)' % sync,
                        ['request', 'server CPU µs', 'wall µs (round trip)'], rows)


def proc_times(pid):
    """(user, system, reaped children's user+system) CPU seconds of a process."""
    with open('/proc/%d/stat' % pid) as f:
        fields = f.read().rsplit(')', 1)[1].split()
    tck = os.sysconf('SC_CLK_TCK')
    return (int(fields[11]) / tck, int(fields[12]) / tck,
            (int(fields[13]) + int(fields[14])) / tck)


def tree_times(pid):
    """proc_times of a server's supervisor and its workers, added up."""
    return [sum(x) for x in zip(*[proc_times(p) for p in common.process_tree(pid)])]


def per_job(sync, jobs):
    with common.Server(args=['--sync', sync]) as server:
        server.api('POST', '/api/jobs', [{'payload': '/bin/true', 'name': str(i)}
                                         for i in range(jobs)])
        s0 = tree_times(server.pid)
        pilots = common.start_pilots(server, 8, '--cycles', '0')
        common.wait_for(lambda: server.api('GET', '/api/summary')['jobs'].get('finished', 0)
                        >= jobs, 300, 'the jobs to finish', 0.25)
        srv = [b - a for a, b in zip(s0, tree_times(server.pid))]
        pil = [sum(x) for x in zip(*[proc_times(p.pid) for p in pilots])]
    ms = lambda x: '%.2f' % (x / jobs * 1000)  # noqa: E731
    total = srv[0] + srv[1] + sum(pil)
    return common.table('CPU per job, 8 real pilots, `/bin/true` (`--sync %s`)' % sync,
                        ['server user ms', 'server system ms', 'pilots user ms',
                         'pilots system ms', 'payloads ms', 'total ms'],
                        [[ms(srv[0]), ms(srv[1]), ms(pil[0]), ms(pil[1]), ms(pil[2]),
                          ms(total)]],
                        note='%d jobs; a 2-core machine gives at most 2,000 ms of CPU per '
                             'second, so jobs/s ≤ 2,000 / total.' % jobs)


def run(quick=False, sync='full'):
    """For run_all: the two tables, no target figures."""
    return {'tables': [per_request(sync), per_job(sync, 500 if quick else 2000)], 'figures': {}}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--sync', choices=('normal', 'full'), default='full')
    ap.add_argument('--jobs', type=int, default=2000)
    args = ap.parse_args()
    print(common.machine_line())
    print(per_request(args.sync))
    print(per_job(args.sync, args.jobs))


if __name__ == '__main__':
    main()
