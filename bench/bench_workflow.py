#!/usr/bin/env python3
"""Workflow figures (used by bench_latency and bench_scaling):

- parent finished -> child started: a two-vertex DAG (parent -> child, both `/bin/true`), one
  workflow at a time on an idle pool of 4 real pilots; child.started_at - parent.stopped_at.
- instantiating a 1,000-vertex workflow: `POST /api/workflows` {dag, state: defined} of a
  registered 1,000-vertex DAG (a binary tree: 999 edges, each a file of a registered
  datatype), timed as the whole request.

    python bench/bench_workflow.py [--quick]
"""
import argparse
import os
import sys
import time
from xml.sax.saxutils import escape

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
from common import cell, ms, percentile, ts  # noqa: E402

PILOTS = 4
WORKFLOWS = 100          # per run, one at a time
RUNS = 5
DATATYPE = {'name': 'BENCHTXT', 'ext': '.txt', 'comment': 'benchmark files'}
FLOW_TIMEOUT = 10.0


def graphml(vertices, edges):
    """GraphML text: vertices [(name, payload)], edges [(source, target, file name)]."""
    out = ['<?xml version="1.0" encoding="UTF-8"?>',
           '<graphml xmlns="http://graphml.graphdrawing.org/xmlns">',
           '<key attr.name="payload" attr.type="string" for="node" id="payload"/>',
           '<key attr.name="timelimit" attr.type="int" for="node" id="timelimit"/>',
           '<key attr.name="name" attr.type="string" for="edge" id="name"/>',
           '<key attr.name="datatype" attr.type="string" for="edge" id="datatype"/>',
           '<graph edgedefault="directed">']
    for name, payload in vertices:
        out.append('<node id="%s"><data key="payload">%s</data><data key="timelimit">100'
                   '</data></node>' % (escape(name), escape(payload)))
    for source, target, fname in edges:
        out.append('<edge source="%s" target="%s"><data key="name">%s</data>'
                   '<data key="datatype">%s</data></edge>'
                   % (escape(source), escape(target), escape(fname), DATATYPE['name']))
    out += ['</graph>', '</graphml>']
    return '\n'.join(out)


def register(server, name, vertices, edges):
    server.api('POST', '/api/datatypes', DATATYPE)
    server.api('POST', '/api/dags', {'name': name, 'graphml': graphml(vertices, edges),
                                     'user': 'bench', 'description': 'benchmark'})


def flow_done(server, uuid):
    flow = server.api('GET', '/api/workflows/' + uuid)
    return flow if flow['state'] in ('finished', 'failed') else None


def parent_child_once(workflows):
    out = []
    with common.Server() as server:
        register(server, 'pair', [('parent', '/bin/true'), ('child', '/bin/true')],
                 [('parent', 'child', 'pair.txt')])
        common.start_pilots(server, PILOTS, '--cycles', '0')
        common.wait_for(lambda: common.idle_pilots(server, PILOTS), 30, 'the pilots to wait')
        time.sleep(0.2)
        for _ in range(workflows):
            uuid = server.api('POST', '/api/workflows', {'dag': 'pair', 'state': 'defined'})['uuid']
            flow = common.wait_for(lambda: flow_done(server, uuid), FLOW_TIMEOUT,
                                   'workflow %s' % uuid, 0.002)
            if flow['state'] != 'finished':
                raise RuntimeError('workflow %s ended %s' % (uuid, flow['state']))
            jobs = {j['name']: server.api('GET', '/api/jobs/' + j['uuid']) for j in flow['jobs']}
            out.append(ms(ts(jobs['child']['started_at']) - ts(jobs['parent']['stopped_at'])))
            time.sleep(0.01)
    return out


def parent_child(runs, workflows=WORKFLOWS):
    """{'p50': [per run], 'p99': [per run]} of parent finished -> child started, in ms."""
    res = {'p50': [], 'p99': []}
    for _ in range(runs):
        gaps = parent_child_once(workflows)
        res['p50'].append(percentile(gaps, 50))
        res['p99'].append(percentile(gaps, 99))
    return res


def instantiate(vertices, runs):
    """Seconds per `POST /api/workflows` of a `vertices`-vertex DAG, one figure per run."""
    names = ['v%d' % i for i in range(vertices)]
    edges = [(names[(i - 1) // 2], names[i], 'f%d.txt' % i) for i in range(1, vertices)]
    out = []
    with common.Server() as server:
        register(server, 'big', [(n, '/bin/true') for n in names], edges)
        for _ in range(runs):
            t0 = time.perf_counter()
            flow = server.api('POST', '/api/workflows', {'dag': 'big', 'state': 'defined'})
            out.append(time.perf_counter() - t0)
            if 'uuid' not in flow:
                raise RuntimeError('no workflow made: %s' % flow)
    return out


def run(quick=False):
    runs, flows = (2, 20) if quick else (RUNS, WORKFLOWS)
    pc = parent_child(runs, flows)
    inst = instantiate(1000, runs)
    text = common.table('Workflows', ['figure', 'median [min–max]', 'unit'], [
        ['parent finished → child started, p50', cell(pc['p50']), 'ms'],
        ['parent finished → child started, p99', cell(pc['p99']), 'ms'],
        ['instantiating a 1,000-vertex workflow (`POST /api/workflows`, defined)',
         cell(inst, 2), 's']],
        note='%d runs; %d two-vertex workflows per run on %d idle real pilots.'
             % (runs, flows, PILOTS))
    return {'tables': [text], 'figures': {'parent_child_p50': common.summary(pc['p50'])[0],
                                          'workflow_1000_s': common.summary(inst)[0]}}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--quick', action='store_true', help='fewer runs')
    args = ap.parse_args()
    print(common.machine_line())
    if not common.workflows_available():
        print('n/a (no workflows yet)')
        return
    print(run(args.quick)['tables'][0])


if __name__ == '__main__':
    main()
