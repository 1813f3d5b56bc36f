#!/usr/bin/env python3
"""Run every p3s benchmark and write their tables, with the targets, to
bench/RESULTS.md.

    python bench/run_all.py [--quick] [--only latency,throughput,...] [--out FILE]

--quick uses fewer runs and smaller sizes (for development; the figures are then only
indicative). Each benchmark starts its own server(s) on free ports of 127.0.0.1 with temporary
databases, and every process it starts is stopped at its end.
"""
import argparse
import os
import sys
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_peers  # noqa: E402
import common  # noqa: E402
from common import fmt  # noqa: E402

ORDER = ('latency', 'throughput', 'peers', 'brokerage', 'scaling', 'footprint', 'costs')
RESULTS = os.path.join(common.BENCH, 'RESULTS.md')

# (figure, target text, the peers' figures, how to judge from the figures: returns (value
# text, met?))


def _v(f, key):
    return f.get(key)


def peer_values(f, figure):
    """{peer key: its median} of one figure, for the peers measured in this run."""
    keys = {key: 'peers.%s.%s' % (key, figure) for key, _, _ in bench_peers.PEERS}
    return {key: f[name] for key, name in keys.items() if name in f}


def best_peer(f, figure, pick):
    """(peer key, value) of the best peer by `pick` (max or min), or None."""
    found = peer_values(f, figure)
    if not found:
        return None
    key = pick(found, key=found.get)
    return key, found[key]


def peer_list(f, figure, unit='', more=None):
    """'huey 15.6, huey tuned 8.19, Parsl 3.93 ms' from the figures of this run."""
    found = peer_values(f, figure)
    parts = ['%s %s' % (bench_peers.SHORT[key], fmt(v) + (more(key) if more else ''))
             for key, v in found.items()]
    return ', '.join(parts) + unit if parts else None


def judged_against_peer(met, peer_met):
    """A target with a part about the best peer: judged on the rest when peers were not
    measured in this run."""
    return met and (peer_met is None or peer_met)


def t_start(f):
    p50, p99 = _v(f, 'latency.start_p50'), _v(f, 'latency.start_p99')
    if p50 is None:
        return None
    best = best_peer(f, 'start_p50', min)
    return ('p50 %s / p99 %s ms' % (fmt(p50), fmt(p99)),
            judged_against_peer(p50 <= 2.5 and p99 <= 10, best and p50 <= best[1]))


def peers_start(f):
    text = peer_list(f, 'start_p50', ' ms', lambda key: ' / %s' % fmt(
        f['peers.%s.start_p99' % key]))
    best, p50 = best_peer(f, 'start_p50', min), _v(f, 'latency.start_p50')
    if text and p50 is not None:
        text += '; p3s p50 ÷ best (%s) = %.2f' % (bench_peers.SHORT[best[0]], p50 / best[1])
    return text


def t_idle(f):
    idle, p99 = _v(f, 'throughput.idle_start_full'), _v(f, 'latency.start_p99')
    if idle is None:
        return None
    if p99 is None:
        return '%s ms' % fmt(idle), None
    return ('%s ms (the idle pool\'s p99 is %s ms)' % (fmt(idle), fmt(p99)), idle <= p99)


def t_parent_child(f):
    v = _v(f, 'latency.parent_child_p50')
    if v is None:
        return ('n/a (no workflows yet)', None) if 'latency.start_p50' in f else None
    return 'p50 %s ms' % fmt(v), v <= 5


def peers_idle(f):
    return peer_list(f, 'idle_start', ' ms')


def t_throughput(f):
    v = _v(f, 'throughput.jobs_per_s_full')
    if v is None:
        return None
    extra = _v(f, 'throughput.jobs_per_s_normal')
    text = '%s jobs/s' % fmt(v) + (' (`--sync normal`: %s)' % fmt(extra) if extra else '')
    best = best_peer(f, 'jobs_per_s', max)
    return text, judged_against_peer(v >= 800, best and v >= 1.1 * best[1])


def peers_throughput(f):
    text = peer_list(f, 'jobs_per_s', ' jobs/s')
    ceiling = _v(f, 'peers.ceiling.jobs_per_s')
    if ceiling is not None:
        text = (text + '; ' if text else '') + 'no-queue ceiling %s/s' % fmt(ceiling)
    best, v = best_peer(f, 'jobs_per_s', max), _v(f, 'throughput.jobs_per_s_full')
    if best and v is not None:
        text += '; p3s ÷ best (%s) = %.2f' % (bench_peers.SHORT[best[0]], v / best[1])
    return text


def peers_rss(f):
    parts = []
    if 'peers.huey.worker_rss' in f:
        parts.append('huey consumer %s MB (its %d threads are the workers)'
                     % (fmt(f['peers.huey.worker_rss']), bench_peers.WORKERS))
    if 'peers.parsl.worker_rss' in f:
        parts.append('Parsl worker %s MB (%s MB all %d workers and their managers)'
                     % (fmt(f['peers.parsl.worker_rss']), fmt(f['peers.parsl.all_rss']),
                        bench_peers.WORKERS))
    return '; '.join(parts) or None


def t_brokerage(f):
    c16, c64, c256 = (_v(f, 'brokerage.cycles_%d' % n) for n in (16, 64, 256))
    if None in (c16, c64, c256):
        return None
    p99 = max(_v(f, 'brokerage.p99_%d' % n) for n in (16, 64, 256))
    ratio = c256 / c16
    return ('%s cycles/s at 64; 256/16 = %.0f %%; worst p99 %s ms'
            % (fmt(c64), 100 * ratio, fmt(p99)), c64 >= 1500 and ratio >= 0.8 and p99 <= 100)


def t_claim(f):
    v = _v(f, 'scaling.claim_ratio')
    return None if v is None else ('%.2f' % v, v <= 1.5)


def t_submit(f):
    v = _v(f, 'scaling.submit_10k_s')
    return None if v is None else ('%s s' % fmt(v), v <= 1)


def t_workflow(f):
    v = _v(f, 'scaling.workflow_1000_s')
    if v is None:
        return ('n/a (no workflows yet)', None) if 'scaling.claim_ratio' in f else None
    return '%s s' % fmt(v), v <= 1


def t_dashboard(f):
    v = _v(f, 'scaling.dashboard_ms')
    return None if v is None else ('%s ms' % fmt(v), v <= 300)


def t_rss(f):
    v = _v(f, 'footprint.pilot_rss')
    return None if v is None else ('%s MB' % fmt(v), v <= 25)


def t_idle_cpu(f):
    v = _v(f, 'footprint.idle_cpu')
    return None if v is None else ('%s %% of one core' % fmt(v), v <= 10)


def no_peer(f):
    return '—'


def published(text):
    return lambda f: text


TARGETS = [
    ('submit → start, idle pool', 'p50 ≤ 2.5 ms and ≤ the best peer\'s; p99 ≤ 10 ms',
     peers_start, t_start),
    ('first job after 3 s idle', 'as fast as the rest (≤ the idle pool\'s p99)',
     peers_idle, t_idle),
    ('parent finished → child started', 'p50 ≤ 5 ms', no_peer, t_parent_child),
    ('real pilots, `/bin/true` jobs, 8 pilots', '≥ 800 jobs/s and ≥ 1.1 × the best peer\'s',
     peers_throughput, t_throughput),
    ('brokerage capacity (simulated pilots)', '≥ 1,500 job cycles/s at 64 pilots; at 256 '
     'pilots ≥ 80 % of the 16-pilot figure; p99 ≤ 100 ms',
     published('Parsl HTEX 1,181 tasks/s (published, not measured here)'), t_brokerage),
    ('claim cost 10⁶ vs 10³ queued', 'ratio ≤ 1.5', no_peer, t_claim),
    ('10,000-job submission', '≤ 1 s', no_peer, t_submit),
    ('1,000-vertex workflow', '≤ 1 s', no_peer, t_workflow),
    ('dashboard at 10⁶ jobs', '≤ 300 ms', no_peer, t_dashboard),
    ('pilot RSS', '≤ 25 MB', peers_rss, t_rss),
    ('1,000 idle pilots', 'server ≤ 10 % of one core', no_peer, t_idle_cpu),
]


def target_table(figures):
    rows = []
    for name, target, peers, judge in TARGETS:
        got = judge(figures)
        peers_text = peers(figures) or 'not measured in this run'
        if got is None:
            rows.append([name, target, peers_text, 'not measured', '—'])
            continue
        text, met = got
        verdict = '—' if met is None else ('**met**' if met else '**not met**')
        rows.append([name, target, peers_text, text, verdict])
    return common.table('Targets', ['figure', 'target', 'peers measured here',
                                               'measured (median)', 'verdict'], rows)


def side_by_side(f):
    """p3s and the peers measured in this run, with p3s's ratios to each peer; '' without
    peers."""
    peers = [(key, label) for key, label, _ in bench_peers.PEERS
             if 'peers.%s.jobs_per_s' % key in f]
    if not peers:
        return ''
    rate, p50 = _v(f, 'throughput.jobs_per_s_full'), _v(f, 'latency.start_p50')

    def ratio(mine, theirs):
        return 'n/a' if None in (mine, theirs) else '%.2f' % (mine / theirs)

    def pair(a, b):
        return 'n/a' if a is None else '%s / %s' % (fmt(a), fmt(b))
    rows = [['p3s, %d real pilots, `--sync full` (default)' % bench_peers.WORKERS, fmt(rate),
             '—', pair(p50, _v(f, 'latency.start_p99')), '—',
             fmt(_v(f, 'throughput.idle_start_full')), fmt(_v(f, 'footprint.pilot_rss'))],
            ['p3s, `--sync normal`', fmt(_v(f, 'throughput.jobs_per_s_normal')), '—', '—', '—',
             fmt(_v(f, 'throughput.idle_start_normal')), '—']]
    for key, label in peers:
        g = {name: _v(f, 'peers.%s.%s' % (key, name)) for name in (
            'jobs_per_s', 'start_p50', 'start_p99', 'idle_start', 'worker_rss')}
        rows.append([label, fmt(g['jobs_per_s']), ratio(rate, g['jobs_per_s']),
                     pair(g['start_p50'], g['start_p99']), ratio(p50, g['start_p50']),
                     fmt(g['idle_start']), fmt(g['worker_rss'])])
    if 'peers.ceiling.jobs_per_s' in f:
        rows.append([bench_peers.CEILING_LABEL, fmt(f['peers.ceiling.jobs_per_s']),
                     ratio(rate, f['peers.ceiling.jobs_per_s']), '—', '—', '—', '—'])
    return common.table(
        'p3s and its peers, side by side', [
            'system', 'jobs/s, %d workers' % bench_peers.WORKERS, 'p3s jobs/s ÷ this',
            'submit → start p50 / p99 ms, idle pool', 'p3s p50 ÷ this p50',
            'first job after %.0f s idle, ms' % bench_peers.IDLE, 'RSS of a worker process, MB'],
        rows, note='Medians of this run\'s figures (tables below); a ratio above 1 is p3s ahead '
                   'on jobs/s, below 1 ahead on latency.')


def run_bench(name, quick, figures):
    module = __import__(name if name == 'costs' else 'bench_' + name)
    t0 = time.monotonic()
    kwargs = {}
    if name == 'footprint' and 'scaling.server_rss_1m' in figures:
        size = 10 ** 5 if quick else 10 ** 6
        kwargs['server_rss'] = (figures['scaling.server_rss_1m'], size)
    try:
        result = module.run(quick, **kwargs)
    except Exception:
        trace = traceback.format_exc()
        print(trace, file=sys.stderr)
        return '### %s\n\nFAILED:\n\n```\n%s```\n' % (name, trace), time.monotonic() - t0
    for key, value in result['figures'].items():
        figures['%s.%s' % (name, key)] = value
    text = '\n'.join(result['tables'])
    print(text, flush=True)
    return text, time.monotonic() - t0


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--quick', action='store_true', help='fewer runs, smaller sizes')
    ap.add_argument('--only', default=','.join(ORDER), help='benchmarks to run, comma-separated')
    ap.add_argument('--out', default=RESULTS, help='where to write the results (markdown)')
    args = ap.parse_args()
    names = [n for n in args.only.split(',') if n]
    unknown = set(names) - set(ORDER)
    if unknown:
        ap.error('unknown benchmark(s): %s' % ', '.join(sorted(unknown)))
    m = common.machine()
    print(common.machine_line(m), flush=True)
    figures, sections, took = {}, [], []
    for name in names:
        text, seconds = run_bench(name, args.quick, figures)
        sections.append(text)
        took.append('%s %.0f s' % (name, seconds))
        common.cleanup()
    head = ['# p3s benchmark results', '',
            'Written by `make bench` (`bench/run_all.py%s`). How each figure is measured: '
            '`bench/README.md`; what stands in the way of the targets not met: '
            '`bench/NOTES.md`.' % (' --quick' if args.quick else ''), '',
            common.machine_line(m) + '.', '',
            'Run time: %s.' % ', '.join(took), '']
    if args.quick:
        head += ['**--quick run**: fewer runs and smaller sizes; the figures are indicative '
                 'only.', '']
    text = '\n'.join(head) + '\n' + target_table(figures) + '\n' + side_by_side(figures) + \
        '\n' + '\n'.join(sections)
    with open(args.out, 'w') as f:
        f.write(text)
    print(target_table(figures))
    print(side_by_side(figures))
    print('written to %s' % args.out)
    return 0


if __name__ == '__main__':
    sys.exit(main())
