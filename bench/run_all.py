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
import common  # noqa: E402
from common import fmt  # noqa: E402

ORDER = ('latency', 'throughput', 'brokerage', 'scaling', 'footprint', 'costs')
RESULTS = os.path.join(common.BENCH, 'RESULTS.md')

# (figure, target text, peers, how to judge from the figures: returns (value text, met?))


def _v(f, key):
    return f.get(key)


def t_start(f):
    p50, p99 = _v(f, 'latency.start_p50'), _v(f, 'latency.start_p99')
    if p50 is None:
        return None
    return 'p50 %s / p99 %s ms' % (fmt(p50), fmt(p99)), p50 <= 2.5 and p99 <= 10


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


def t_throughput(f):
    v = _v(f, 'throughput.jobs_per_s_full')
    if v is None:
        return None
    extra = _v(f, 'throughput.jobs_per_s_normal')
    text = '%s jobs/s' % fmt(v) + (' (`--sync normal`: %s)' % fmt(extra) if extra else '')
    return text, v >= 800


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


TARGETS = [
    ('submit → start, idle pool', 'p50 ≤ 2.5 ms, p99 ≤ 10 ms',
     'Parsl 2.6 / 4.4 ms; huey 14–16 / 35–39 ms', t_start),
    ('first job after 3 s idle', 'as fast as the rest (≤ the idle pool\'s p99)',
     'huey 290–420 ms; Parsl 2.8 ms', t_idle),
    ('parent finished → child started', 'p50 ≤ 5 ms', '—', t_parent_child),
    ('real pilots, `/bin/true` jobs, 8 pilots', '≥ 800 jobs/s',
     'huey 739/s, Parsl 508/s, ceiling 2,334/s', t_throughput),
    ('brokerage capacity (simulated pilots)', '≥ 1,500 job cycles/s at 64 pilots; at 256 '
     'pilots ≥ 80 % of the 16-pilot figure; p99 ≤ 100 ms', 'Parsl HTEX 1,181 tasks/s '
     '(published)', t_brokerage),
    ('claim cost 10⁶ vs 10³ queued', 'ratio ≤ 1.5', '—', t_claim),
    ('10,000-job submission', '≤ 1 s', '—', t_submit),
    ('1,000-vertex workflow', '≤ 1 s', '—', t_workflow),
    ('dashboard at 10⁶ jobs', '≤ 300 ms', '—', t_dashboard),
    ('pilot RSS', '≤ 25 MB', 'Parsl worker 47 MB, huey consumer 25 MB', t_rss),
    ('1,000 idle pilots', 'server ≤ 10 % of one core', '—', t_idle_cpu),
]


def target_table(figures):
    rows = []
    for name, target, peers, judge in TARGETS:
        got = judge(figures)
        if got is None:
            rows.append([name, target, peers, 'not measured', '—'])
            continue
        text, met = got
        verdict = '—' if met is None else ('**met**' if met else '**not met**')
        rows.append([name, target, peers, text, verdict])
    return common.table('Targets', ['figure', 'target', 'peers measured here',
                                               'measured (median)', 'verdict'], rows)


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
    text = '\n'.join(head) + '\n' + target_table(figures) + '\n' + '\n'.join(sections)
    with open(args.out, 'w') as f:
        f.write(text)
    print(target_table(figures))
    print('written to %s' % args.out)
    return 0


if __name__ == '__main__':
    sys.exit(main())
