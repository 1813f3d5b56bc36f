"""Synthetic load for the monitor: fill a p3s database with many jobs and pilots directly by
SQL, and time the monitor pages in-process.

    python tests/synthetic.py --jobs 1000000 --db /tmp/p3s-big.db      # fill, then time pages
    python tests/synthetic.py --jobs 100000 --workflows 2000 --db /tmp/p3s-wf.db

Also imported by the tests: fill() for a busy database, wsgi_get() to call the app in-process.
"""
import argparse
import os
import random
import statistics
import sys
import time
import uuid as uuidlib
import wsgiref.util
from datetime import datetime, timedelta, timezone

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import p3s_server  # noqa: E402

# state -> share of the jobs (the rest of the table is history: mostly finished)
MIX = (('finished', 0.86), ('failed', 0.04), ('timelimit', 0.01), ('lost', 0.01),
       ('killed', 0.005), ('dropped', 0.005), ('defined', 0.05), ('dispatched', 0.005),
       ('running', 0.01), ('template', 0.01))
JOBTYPES = ('reco', 'purity', 'evdisp', 'monitor', 'femb')
PILOT_STATES = ('running', 'idle', 'stopped', 'lost', 'active')
PAGES = ('/', '/api/summary', '/monitor/jobs', '/monitor/jobs?state=failed',
         '/monitor/jobs?state=error&sort=-stopped_at', '/monitor/jobs?jobtype=reco&page=20',
         '/monitor/jobs?state=defined&sort=defined_at', '/monitor/pilots', '/metrics')

WORKFLOW_PAGES = ('/monitor/workflows', '/monitor/workflows?state=defined&user=u3',
                  '/monitor/workflows?dag=diamond&sort=-name&page=20', '/monitor/dags',
                  '/monitor/data', '/monitor/data?state=defined&datatype=TXT', '/monitor/datatypes',
                  '/monitor/dags/diamond', '/monitor/workflows/{newest}')
# A -> B, A -> C, B => D (two files), C -> D, D -> end (a noop), A -> end: 5 jobs, 7 data.
DIAMOND = [('A', 'B', 'SEED'), ('A', 'C', 'SEED'), ('B', 'D', 'UPPER'), ('B', 'D', 'NOTE'),
           ('C', 'D', 'REV'), ('D', 'end', 'RESULT'), ('A', 'end', 'LOG')]
GRAPHML = """<?xml version="1.0" encoding="utf-8"?>
<graphml xmlns="http://graphml.graphdrawing.org/xmlns">
<key attr.name="payload" attr.type="string" for="node" id="payload"/>
<key attr.name="jobtype" attr.type="string" for="node" id="jobtype"/>
<key attr.name="name" attr.type="string" for="edge" id="name"/>
<key attr.name="datatype" attr.type="string" for="edge" id="datatype"/>
<key attr.name="datatag" attr.type="string" for="edge" id="datatag"/>
<graph edgedefault="directed">
%s
</graph>
</graphml>
"""

JOB_FIELDS = ('uuid', 'name', 'jobtype', 'priority', 'state', 'pilot', 'host', 'pid', 'errcode',
              'created_at', 'defined_at', 'dispatched_at', 'started_at', 'stopped_at')
INSERT = """
INSERT INTO jobs (uuid, name, "user", subhost, jobtype, payload, env, priority, timelimit, site,
                  infile, state, pilot, host, pid, errcode, created_at, defined_at,
                  dispatched_at, started_at, stopped_at)
VALUES (:uuid, :name, 'shifter', 'np04', :jobtype, '/bin/true', '{}', :priority, 1000, '', '',
        :state, :pilot, :host, :pid, :errcode, :created_at, :defined_at, :dispatched_at,
        :started_at, :stopped_at)
"""
PILOT_FIELDS = ('uuid', 'host', 'state', 'registered_at', 'last_seen', 'stopped_at')
INSERT_PILOT = """
INSERT INTO pilots (uuid, host, site, pid, state, jobs_done, registered_at, last_seen, stopped_at)
VALUES (:uuid, :host, 'np04', 1, :state, 0, :registered_at, :last_seen, :stopped_at)
"""


def iso(t):
    return t.isoformat(timespec='microseconds')


def job_row(rnd, now, span, pilots, states, weights):
    state = rnd.choices(states, weights)[0]
    defined = now - timedelta(seconds=rnd.random() * span)
    started = defined + timedelta(seconds=rnd.expovariate(1 / 5.0))
    stopped = started + timedelta(seconds=rnd.expovariate(1 / 30.0))
    ended = state not in ('template', 'defined', 'dispatched', 'running')
    if stopped > now:
        stopped = now
    pilot = rnd.choice(pilots) if state not in ('template', 'defined', 'dropped') else None
    ran = ended and state not in ('dropped', 'killed')
    return dict(zip(JOB_FIELDS, (
        str(uuidlib.uuid4()), 'job%d' % rnd.randrange(1000), rnd.choice(JOBTYPES),
        rnd.randrange(5), state, pilot, 'node1' if pilot else None, 1 if pilot else None,
        {'failed': 1, 'finished': 0}.get(state), iso(defined),
        None if state == 'template' else iso(defined), iso(started) if pilot else None,
        iso(started) if ran or state == 'running' else None, iso(stopped) if ended else None)))


def fill(path, jobs, pilots=200, span=86400, seed=1, now=None):
    """Add `jobs` jobs defined over the last `span` seconds and `pilots` pilots. Returns now."""
    now = now or datetime.now(timezone.utc)
    dialect = p3s_server.database(path)
    db = dialect.connect()
    dialect.apply_schema(db)
    rnd = random.Random(seed)
    pilot_rows = []
    for i in range(pilots):
        state = PILOT_STATES[i % len(PILOT_STATES)]
        reg = now - timedelta(seconds=rnd.random() * span)
        gone = state in ('stopped', 'lost')
        pilot_rows.append(dict(zip(PILOT_FIELDS, (
            str(uuidlib.uuid4()), 'node%d' % i, state, iso(reg),
            iso(now if not gone else reg + timedelta(seconds=600)),
            iso(reg + timedelta(seconds=600)) if gone else None))))
    db.execute('BEGIN')
    db.executemany(INSERT_PILOT, pilot_rows)
    db.execute('COMMIT')
    uuids = [p['uuid'] for p in pilot_rows]
    states, weights = zip(*MIX)
    for start in range(0, jobs, 50000):
        rows = [job_row(rnd, now, span, uuids, states, weights)
                for _ in range(min(50000, jobs - start))]
        db.execute('BEGIN')
        db.executemany(INSERT, rows)
        db.execute('COMMIT')
    db.execute('ANALYZE')
    db.close()
    return now


def fill_workflows(path, n):
    """Add n workflows of a five-job DAG, a third of them templates, the rest defined."""
    st = p3s_server.configure(path)
    now = p3s_server.utcnow()
    p3s_server.add_datatype(st, {'name': 'TXT', 'ext': '.txt'}, now)
    nodes = ['<node id="%s"><data key="payload">/bin/true</data></node>' % v for v in 'ABCD']
    nodes.append('<node id="end"><data key="jobtype">noop</data></node>')
    edges = ['<edge source="%s" target="%s"><data key="name">%s.txt</data><data key="datatype">'
             'TXT</data><data key="datatag">%s</data></edge>' % (s, t, tag.lower(), tag)
             for s, t, tag in DIAMOND]
    p3s_server.add_dag(st, {'name': 'diamond', 'replace': True,
                            'graphml': GRAPHML % '\n'.join(nodes + edges)}, now)
    for i in range(n):
        p3s_server.add_workflow(st, {'dag': 'diamond', 'name': 'night%d' % i,
                                     'user': 'u%d' % (i % 7),
                                     'state': 'defined' if i % 3 else 'template'}, now)
    st.close()


def wsgi_get(app, path):
    """GET path from the WSGI app in-process: (status code, headers, body text)."""
    env = {}
    wsgiref.util.setup_testing_defaults(env)
    env['PATH_INFO'], _, env['QUERY_STRING'] = path.partition('?')
    got = {}

    def start_response(status, headers, exc_info=None):
        got['status'], got['headers'] = int(status.split()[0]), dict(headers)

    body = b''.join(app(env, start_response))
    return got['status'], got['headers'], body.decode()


def time_pages(path, repeat=3):
    """Median and worst seconds per page, in-process (no HTTP), on the database at path."""
    st = p3s_server.configure(path)
    newest = st.one('SELECT uuid FROM workflows ORDER BY id DESC LIMIT 1')
    pages = PAGES + (tuple(p.format(newest=newest[0]) for p in WORKFLOW_PAGES) if newest else ())
    out = {}
    for page in pages:
        times = []
        for _ in range(repeat):
            t0 = time.perf_counter()
            status, _, _ = wsgi_get(p3s_server.app, page)
            times.append(time.perf_counter() - t0)
            assert status == 200, (page, status)
        out[page] = (statistics.median(times), max(times))
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--db', required=True)
    ap.add_argument('--jobs', type=int, default=100000)
    ap.add_argument('--pilots', type=int, default=200)
    ap.add_argument('--workflows', type=int, default=0, help='workflows of a five-job DAG')
    ap.add_argument('--no-fill', action='store_true', help='only time the pages')
    args = ap.parse_args(argv)
    if not args.no_fill:
        t0 = time.perf_counter()
        fill(args.db, args.jobs, args.pilots)
        fill_workflows(args.db, args.workflows)
        print('filled %d jobs and %d workflows in %.1f s' % (args.jobs, args.workflows,
                                                            time.perf_counter() - t0))
    for page, (median, worst) in time_pages(args.db).items():
        print('%-45s median %7.1f ms   max %7.1f ms' % (page, median * 1000, worst * 1000))
    return 0


if __name__ == '__main__':
    sys.exit(main())
