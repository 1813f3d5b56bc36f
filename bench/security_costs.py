#!/usr/bin/env python3
"""What the guards of security and supervision cost (a development tool, not run by
`make bench`).

1. A payload's start and end as the pilot starts it (Popen of /bin/true, then its exit seen):
   plain, through `setpriv --pdeathsig`, and with the preexec_fn that replaces it where there
   is no setpriv (PR_SET_PDEATHSIG either way).
2. A pilot proving who it is: authenticate_pilot (a read by primary key and a SHA-256) against
   the heartbeat it guards, in-process.
3. Another process holds the database's write lock: how long ping, a static file and a monitor
   page take meanwhile, and when four submissions at once get their 503 (one server process).

    .venv/bin/python bench/security_costs.py
"""
import os
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

import p3s_pilot  # noqa: E402
import p3s_server  # noqa: E402

HOLD_WRITE_LOCK = """
import sqlite3, sys
db = sqlite3.connect(sys.argv[1], isolation_level=None)
db.execute('BEGIN IMMEDIATE')
print('locked', flush=True)
sys.stdin.readline()
"""


def payload_start(kind):
    t = time.perf_counter()
    if kind == 'plain':
        proc = subprocess.Popen(['/bin/true'], start_new_session=True, stdin=subprocess.DEVNULL)
    elif kind == 'setpriv':
        proc = p3s_pilot.start_payload(['/bin/true'], False, {}, None, None)
    else:
        proc = subprocess.Popen(['/bin/true'], start_new_session=True, stdin=subprocess.DEVNULL,
                                preexec_fn=p3s_pilot.die_with(os.getpid()))
    p3s_pilot.wait_exit(proc, 10)
    return time.perf_counter() - t


def payload_starts(n=300):
    kinds = ['plain', 'preexec_fn'] + ['setpriv'] * bool(p3s_pilot.pdeathsig_wrapper())
    for kind in kinds:
        times = [payload_start(kind) * 1e3 for _ in range(n)]
        print('payload start and end, %-10s median %.2f ms, p90 %.2f ms'
              % (kind, common.percentile(times, 50), common.percentile(times, 90)))


def per_call(fn, n=5000):
    t = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t) / n * 1e6


def pilot_proof():
    st = p3s_server.configure(os.path.join(common.tmpdir(), 'p3s.db'), sync='normal')
    reg = p3s_server.register_pilot(st, {'host': 'h'}, p3s_server.utcnow())
    proof = per_call(lambda: p3s_server.authenticate_pilot(st, reg['uuid'], reg['secret']))
    beat = per_call(lambda: p3s_server.heartbeat(st, reg['uuid'], None, p3s_server.utcnow()))
    print('authenticate_pilot %.1f us a call; the heartbeat it guards %.1f us' % (proof, beat))
    st.close()


def submit(url, answers):
    t = time.monotonic()
    req = urllib.request.Request(url + 'api/jobs', data=b'[{"payload": "/bin/true"}]',
                                 headers={'Content-Type': 'application/json'}, method='POST')
    try:
        urllib.request.urlopen(req, timeout=60).read()
        code = 200
    except urllib.error.HTTPError as e:
        code = e.code
    answers.append((time.monotonic() - t, code))


def locked_database():
    with common.Server(args=['--workers', '1']) as server:
        submit(server.url, [])                 # the worker's database is open before the lock
        holder = subprocess.Popen([sys.executable, '-c', HOLD_WRITE_LOCK, server.db],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        try:
            holder.stdout.readline()
            answers = []
            writers = [threading.Thread(target=submit, args=(server.url, answers))
                       for _ in range(4)]
            for w in writers:
                w.start()
            time.sleep(0.5)                    # the writers are waiting by now
            for path in ('api/ping', 'static/p3s.css', 'monitor/jobs'):
                t = time.monotonic()
                urllib.request.urlopen(server.url + path, timeout=60).read()
                print('%-15s answered in %.1f ms while the lock is held'
                      % (path, (time.monotonic() - t) * 1e3))
            for w in writers:
                w.join()
            said = ['%d after %.2f s' % (code, s) for s, code in sorted(answers)]
            print('4 submissions:', ', '.join(said))
        finally:
            holder.communicate('go\n')


if __name__ == '__main__':
    payload_starts()
    pilot_proof()
    locked_database()
    common.cleanup()
