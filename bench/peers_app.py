"""What the peers run in the benchmarks, and the accounting of what they ran.

Every peer runs the same job, `run_job`: the payload as a subprocess, timed the way p3s's pilot
times it (started: right after the process was created; ended: right after it was reaped), and
one line appended to a records file. The harness reads that file back (`parse_records`) and
checks that every job submitted ran exactly once and succeeded (`account`) before it computes
anything from the times.

Python standard library only; huey is imported only when P3S_PEERS_HUEY_DB names the queue's
database, which is how the huey consumer finds this module's app (`peers_app.huey`).

    python bench/peers_app.py [--supervised] RECORDS JOB...   # one after the other, no queue

--supervised: each job's process is started as p3s's pilot starts a payload (its own code),
through `setpriv --pdeathsig KILL --`, which makes it die with the process that started it.
"""
import os
import subprocess
import sys
import time

HUEY_DB = 'P3S_PEERS_HUEY_DB'
HUEY_NAME = 'p3s-bench'
FIELDS = ('job', 'picked', 'started', 'ended', 'rc', 'pid')
TRUE = ['/bin/true']


def run_job(job, command, records):
    """Run `command` (a list) as the pilot runs a payload; append its record to `records`.

    picked is when the worker had the job in hand (the function was entered), the nearest a
    peer has to p3s's dispatch."""
    picked = time.time()
    proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    started = time.time()
    rc = proc.wait()
    append(records, '%s %.6f %.6f %.6f %d %d\n' % (job, picked, started, time.time(), rc,
                                                   os.getpid()))


def append(path, line):
    """One write on an O_APPEND descriptor, so that lines of concurrent workers never mix."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


def parse_records(text):
    """The records in a records file's text, as dicts. A last line without its newline (a write
    under way while the file was read) is left for the next read; a malformed line raises
    ValueError."""
    records = []
    for line in text.split('\n')[:-1]:
        parts = line.split()
        if len(parts) != len(FIELDS):
            raise ValueError('malformed job record: %r' % line)
        job, picked, started, ended, rc, pid = parts
        records.append({'job': job, 'picked': float(picked), 'started': float(started),
                        'ended': float(ended), 'rc': int(rc), 'pid': int(pid)})
    return records


def account(records, expected):
    """The record of each job in `expected`, by job: raises RuntimeError unless every one of
    them ran exactly once with exit code 0 and nothing else ran."""
    by_job = {}
    for record in records:
        by_job.setdefault(record['job'], []).append(record)
    wanted = set(expected)
    problems = [
        ('missing', sorted(wanted - set(by_job))),
        ('ran more than once', sorted(j for j, rs in by_job.items() if len(rs) > 1)),
        ('never submitted', sorted(set(by_job) - wanted)),
        ('failed', sorted(j for j, rs in by_job.items() if any(r['rc'] != 0 for r in rs))),
    ]
    found = ['%s: %d (%s)' % (what, len(jobs), ', '.join(jobs[:5])) for what, jobs in problems
             if jobs]
    if found:
        raise RuntimeError('jobs not run exactly once: ' + '; '.join(found))
    return {job: rs[0] for job, rs in by_job.items()}


def jobs_per_second(records):
    """Jobs over the time from the first job picked up to the last one ended."""
    return len(records) / (max(r['ended'] for r in records) - min(r['picked'] for r in records))


def make_huey(filename):
    """huey on SQLite as it ships (results on, but a job returning None stores nothing; SQLite's
    own synchronous setting; WAL), and the job as its task."""
    from huey import SqliteHuey
    app = SqliteHuey(HUEY_NAME, filename=filename)
    return app, app.task()(run_job)


huey = None
if os.environ.get(HUEY_DB):
    huey, huey_job = make_huey(os.environ[HUEY_DB])


def supervised(command):
    """`command` as p3s's pilot starts a payload, by the pilot's own code."""
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import p3s_pilot
    wrapper = p3s_pilot.pdeathsig_wrapper()
    if wrapper is None:
        raise SystemExit('peers_app: no setpriv --pdeathsig here')
    return p3s_pilot.dying_with_parent(wrapper, command)


if __name__ == '__main__':
    args = sys.argv[1:]
    command = TRUE
    if args[:1] == ['--supervised']:
        args, command = args[1:], supervised(TRUE)
    for name in args[1:]:
        run_job(name, command, args[0])
