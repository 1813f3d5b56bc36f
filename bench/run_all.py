#!/usr/bin/env python3
"""Run every p3s benchmark and write their tables, with the targets, to
bench/RESULTS.md.

    python bench/run_all.py [--quick] [--only latency,throughput,...] [--out FILE] [NAME ...]

--quick uses fewer runs and smaller sizes (for development; the figures are then only
indicative). Each benchmark starts its own server(s) on free ports of 127.0.0.1 with temporary
databases, and every process it starts is stopped at its end; the PostgreSQL benchmarks start
and stop a private cluster (common.Postgres). NAMEs (or --only) pick benchmarks or groups:
`pg` is every figure on PostgreSQL, `sqlite` every other one, e.g.

    python bench/run_all.py pg --out /tmp/pg.md
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

# name: (module, keyword arguments of its run()), in the order they run
BENCHES = {
    'latency': ('bench_latency', {}),
    'throughput': ('bench_throughput', {}),
    'peers': ('bench_peers', {}),
    'brokerage': ('bench_brokerage', {}),
    'scaling': ('bench_scaling', {}),
    'footprint': ('bench_footprint', {}),
    'claims': ('bench_claims', {}),                  # SQLite and PostgreSQL
    'deadrows': ('bench_deadrows', {}),              # SQLite and PostgreSQL
    'pg_latency': ('bench_latency', {'db': 'postgresql'}),
    'pg_throughput': ('bench_throughput', {'db': 'postgresql', 'syncs': ('full',)}),
    'pg_brokerage': ('bench_brokerage', {'db': 'postgresql', 'variants': (False,)}),
    'costs': ('costs', {}),
}
ORDER = tuple(BENCHES)
GROUPS = {
    'pg': ('claims', 'deadrows', 'pg_latency', 'pg_throughput', 'pg_brokerage'),
    'sqlite': ('latency', 'throughput', 'peers', 'brokerage', 'scaling', 'footprint', 'costs'),
}
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
    normal = _v(f, 'latency.start_p50_normal')
    text = 'p50 %s / p99 %s ms' % (fmt(p50), fmt(p99))
    if normal is not None:
        text += ' (`--sync normal`: p50 %s / p99 %s)' % (fmt(normal),
                                                        fmt(_v(f, 'latency.start_p99_normal')))
    return text, judged_against_peer(p50 <= 2.5 and p99 <= 10, best and p50 <= best[1])


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
    others = [('`--sync normal`', _v(f, 'throughput.jobs_per_s_normal')),
              ('job logs on tmpfs', _v(f, 'throughput.jobs_per_s_full_tmpfs'))]
    others = ['%s: %s' % (name, fmt(x)) for name, x in others if x is not None]
    text = '%s jobs/s' % fmt(v) + (' (%s)' % '; '.join(others) if others else '')
    best = best_peer(f, 'jobs_per_s', max)
    return text, judged_against_peer(v >= 800, best and v >= 1.1 * best[1])


def peers_throughput(f):
    text = peer_list(f, 'jobs_per_s', ' jobs/s')
    for key, (_, name, _) in bench_peers.CEILINGS.items():
        ceiling = _v(f, 'peers.%s.jobs_per_s' % key)
        if ceiling is not None:
            text = (text + '; ' if text else '') + '%s %s/s' % (name, fmt(ceiling))
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


def t_brokerage(f, name='brokerage'):
    c16, c64, c256 = (_v(f, '%s.cycles_%d' % (name, n)) for n in (16, 64, 256))
    if None in (c16, c64, c256):
        return None
    p99 = max(_v(f, '%s.p99_%d' % (name, n)) for n in (16, 64, 256))
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
    cpu, p99 = _v(f, 'footprint.idle_cpu'), _v(f, 'footprint.submit_p99')
    if cpu is None:
        return None
    pilots = _v(f, 'footprint.idle_pilots')
    more = '' if pilots == 2000 else ' (%s pilots in this run)' % fmt(pilots)
    met = cpu <= 10 and p99 <= 50
    return ('server %s %% of one core; submission p99 %s ms%s' % (fmt(cpu), fmt(p99), more),
            met if pilots >= 2000 else None)      # fewer pilots: not judged


def pg_skipped(f, *names):
    """('skipped: why', None) when a PostgreSQL figure could not be measured, else None."""
    for name in names:
        why = f.get(name + '.skipped')
        if why:
            return 'skipped: %s' % why, None
    return None


def t_start_pg(f):
    """Judged where the job is submitted to one server and the pilot waits on another host's,
    and on one host."""
    skipped = pg_skipped(f, 'pg_latency')
    p50, p99 = _v(f, 'pg_latency.start_p50'), _v(f, 'pg_latency.start_p99')
    other = _v(f, 'pg_latency.other_host_start_p50')
    if skipped or p50 is None or other is None:
        return skipped
    return ('p50 %s ms from another host; on one host p50 %s / p99 %s ms'
            % (fmt(other), fmt(p50), fmt(p99)), other <= 5 and p50 <= 5)


def t_throughput_pg(f):
    skipped = pg_skipped(f, 'pg_throughput')
    v = _v(f, 'pg_throughput.jobs_per_s_full')
    if skipped or v is None:
        return skipped
    return '%s jobs/s' % fmt(v), v >= 800


def t_brokerage_pg(f):
    return pg_skipped(f, 'pg_brokerage') or t_brokerage(f, 'pg_brokerage')


def t_deadrows(backend):
    def judge(f):
        skipped = pg_skipped(f, 'deadrows.%s' % backend)
        v = _v(f, 'deadrows.%s.ratio' % backend)
        if skipped or v is None:
            return skipped
        jobs = _v(f, 'deadrows.jobs')
        text = '%.2f' % v
        if backend == 'postgresql':
            after = _v(f, 'deadrows.postgresql.ratio_after_purge')
            if 'deadrows.postgresql.ratio_vacuumed' in f:
                text += ' after autovacuum\'s next pass; %.2f right after the purge' % after
            else:
                text += ' right after the purge (autovacuum did not pass in time)'
        if jobs != 10 ** 6:
            text += ' ({:,} jobs in this run)'.format(jobs)
        return text, v <= 1.5 if jobs >= 10 ** 6 else None     # fewer jobs: not judged
    return judge


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
    ('2,000 idle pilots long-polling one server', 'submission p99 ≤ 50 ms; server ≤ 10 % of '
     'one core', no_peer, t_idle_cpu),
    ('claim cost after 10⁶ jobs run and purged vs an empty table, SQLite', 'ratio ≤ 1.5',
     no_peer, t_deadrows('sqlite')),
    ('claim cost after 10⁶ jobs run and purged vs an empty table, PostgreSQL', 'ratio ≤ 1.5',
     no_peer, t_deadrows('postgresql')),
    ('submit → start, idle pool, PostgreSQL, the job submitted to another host\'s server',
     'p50 ≤ 5 ms', no_peer, t_start_pg),
    ('real pilots, `/bin/true` jobs, 8 pilots, PostgreSQL', '≥ 800 jobs/s', no_peer,
     t_throughput_pg),
    ('brokerage capacity (simulated pilots), PostgreSQL', '≥ 1,500 job cycles/s at 64 pilots; '
     'at 256 pilots ≥ 80 % of the 16-pilot figure; p99 ≤ 100 ms', no_peer, t_brokerage_pg),
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
            ['p3s, `--sync normal`', fmt(_v(f, 'throughput.jobs_per_s_normal')), '—',
             pair(_v(f, 'latency.start_p50_normal'), _v(f, 'latency.start_p99_normal')), '—',
             fmt(_v(f, 'throughput.idle_start_normal')), '—'],
            ['p3s, `--sync full`, the pilots\' job logs on tmpfs',
             fmt(_v(f, 'throughput.jobs_per_s_full_tmpfs')), '—', '—', '—',
             fmt(_v(f, 'throughput.idle_start_full_tmpfs')), '—']]
    for key, label in peers:
        g = {name: _v(f, 'peers.%s.%s' % (key, name)) for name in (
            'jobs_per_s', 'start_p50', 'start_p99', 'idle_start', 'worker_rss')}
        rows.append([label, fmt(g['jobs_per_s']), ratio(rate, g['jobs_per_s']),
                     pair(g['start_p50'], g['start_p99']), ratio(p50, g['start_p50']),
                     fmt(g['idle_start']), fmt(g['worker_rss'])])
    for key, (label, _, _) in bench_peers.CEILINGS.items():
        ceiling = _v(f, 'peers.%s.jobs_per_s' % key)
        if ceiling is not None:
            rows.append([label, fmt(ceiling), ratio(rate, ceiling), '—', '—', '—', '—'])
    return common.table(
        'p3s and its peers, side by side', [
            'system', 'jobs/s, %d workers' % bench_peers.WORKERS, 'p3s jobs/s ÷ this',
            'submit → start p50 / p99 ms, idle pool', 'p3s p50 ÷ this p50',
            'first job after %.0f s idle, ms' % bench_peers.IDLE, 'RSS of a worker process, MB'],
        rows, note='Medians of this run\'s figures (tables below); a ratio above 1 is p3s ahead '
                   'on jobs/s, below 1 ahead on latency.')


def databases_side_by_side(f):
    """The figures measured on both SQLite and PostgreSQL in this run; '' if none."""
    names = ('claims', 'deadrows', 'pg_latency', 'pg_throughput', 'pg_brokerage')
    if not any(key.split('.', 1)[0] in names for key in f):
        return ''

    def pg(bench, value):
        """A PostgreSQL cell: the value, or why it is missing."""
        why = f.get(bench + '.skipped')
        if why:
            return 'skipped: %s' % why
        return 'not measured' if value in (None, 'n/a') else value

    def sq(value):
        return 'not measured' if value in (None, 'n/a') else value

    def pair(prefix, a, b):
        x, y = _v(f, '%s%s' % (prefix, a)), _v(f, '%s%s' % (prefix, b))
        return None if x is None else '%s / %s' % (fmt(x), fmt(y))

    rows = []
    for n in (1, 4, 16, 64):
        def claims(db):
            rate = _v(f, 'claims.%s.rate_%d' % (db, n))
            return None if rate is None else '%s (%s)' % (
                fmt(rate), pair('claims.%s.' % db, 'p50_%d' % n, 'p99_%d' % n))
        rows.append(['claims/s, SQL only, %d connection%s (p50 / p99 ms per claim)'
                     % (n, '' if n == 1 else 's'), sq(claims('sqlite')),
                     pg('claims.postgresql', claims('postgresql'))])
    rows.append(['8 real pilots, `/bin/true` jobs, jobs/s',
                 sq(fmt(_v(f, 'throughput.jobs_per_s_full'))),
                 pg('pg_throughput', fmt(_v(f, 'pg_throughput.jobs_per_s_full')))])
    rows.append(['first job after 3 s idle, submit → start ms',
                 sq(fmt(_v(f, 'throughput.idle_start_full'))),
                 pg('pg_throughput', fmt(_v(f, 'pg_throughput.idle_start_full')))])
    rows.append(['submit → start, idle pool, p50 / p99 ms',
                 sq(pair('latency.', 'start_p50', 'start_p99')),
                 pg('pg_latency', pair('pg_latency.', 'start_p50', 'start_p99'))])
    for n in (16, 64, 256):
        rows.append(['brokerage, %d simulated pilots: job cycles/s (request p99 ms)' % n,
                     sq(_v(f, 'brokerage.cycles_%d' % n) and '%s (%s)' % (
                         fmt(f['brokerage.cycles_%d' % n]), fmt(f['brokerage.p99_%d' % n]))),
                     pg('pg_brokerage', _v(f, 'pg_brokerage.cycles_%d' % n) and '%s (%s)' % (
                         fmt(f['pg_brokerage.cycles_%d' % n]),
                         fmt(f['pg_brokerage.p99_%d' % n])))])
    after = _v(f, 'deadrows.postgresql.ratio_after_purge')
    vacuumed = _v(f, 'deadrows.postgresql.ratio_vacuumed')
    pg_dead = None
    if after is not None:
        pg_dead = ('%.2f after autovacuum\'s next pass, %.2f right after the purge'
                   % (vacuumed, after) if vacuumed is not None else
                   '%.2f right after the purge (autovacuum did not pass in time)' % after)
    jobs = _v(f, 'deadrows.jobs')
    rows.append(['claim after {} jobs run and purged ÷ empty table'.format(
                     '{:,}'.format(jobs) if jobs else '10⁶'),
                 sq(_v(f, 'deadrows.sqlite.ratio') and '%.2f' % f['deadrows.sqlite.ratio']),
                 pg('deadrows.postgresql', pg_dead)])
    return common.table(
        'SQLite and PostgreSQL, side by side', ['figure', 'SQLite', 'PostgreSQL'], rows,
        note='Medians of this run\'s figures (tables below), the server\'s defaults on both '
             '(`--sync full`, --workers = the cores). %s'
             % (_v(f, 'pg_settings') or 'PostgreSQL not measured in this run.'))


def run_bench(name, quick, figures):
    module_name, kwargs = BENCHES[name]
    module = __import__(module_name)
    t0 = time.monotonic()
    kwargs = dict(kwargs)
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
        if key == 'pg_settings':
            figures.setdefault('pg_settings', value)
            continue
        figures['%s.%s' % (name, key)] = value
    text = '\n'.join(result['tables'])
    print(text, flush=True)
    return text, time.monotonic() - t0


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--quick', action='store_true', help='fewer runs, smaller sizes')
    ap.add_argument('--only', help='benchmarks or groups to run, comma-separated (default '
                    'all): %s; groups: %s' % (', '.join(ORDER), ', '.join(
                        '%s (%s)' % (g, ', '.join(n)) for g, n in GROUPS.items())))
    ap.add_argument('--out', default=RESULTS, help='where to write the results (markdown)')
    ap.add_argument('names', nargs='*', metavar='NAME', help='as --only')
    args = ap.parse_args()
    asked = [n for n in (args.only or '').split(',') + args.names if n] or list(ORDER)
    unknown = set(asked) - set(ORDER) - set(GROUPS)
    if unknown:
        ap.error('unknown benchmark(s): %s' % ', '.join(sorted(unknown)))
    wanted = {n for name in asked for n in GROUPS.get(name, (name,))}
    names = [n for n in ORDER if n in wanted]
    m = common.machine()
    print(common.machine_line(m), flush=True)
    figures, sections, took = {}, [], []
    for name in names:
        text, seconds = run_bench(name, args.quick, figures)
        sections.append(text)
        took.append('%s %.0f s' % (name, seconds))
        common.cleanup()
    command = 'bench/run_all.py' + (' --quick' if args.quick else '') + (
        '' if set(names) == set(ORDER) else ' ' + ' '.join(asked))
    head = ['# p3s benchmark results', '',
            'Written by `make bench` (`%s`). How each figure is measured: `bench/README.md`; '
            'what stands in the way of the targets not met: `bench/NOTES.md`.' % command, '',
            common.machine_line(m) + '.', '']
    if 'pg_settings' in figures:
        head += [figures['pg_settings'] + '.', '']
    skips = sorted({v for k, v in figures.items() if k.endswith('.skipped')})
    if skips:
        head += ['**PostgreSQL figures skipped: %s.**' % '; '.join(skips), '']
    head += ['Run time: %s.' % ', '.join(took), '']
    if args.quick:
        head += ['**--quick run**: fewer runs and smaller sizes; the figures are indicative '
                 'only.', '']
    text = '\n'.join(head) + '\n' + target_table(figures) + '\n' + side_by_side(figures) + \
        '\n' + databases_side_by_side(figures) + '\n' + '\n'.join(sections)
    with open(args.out, 'w') as f:
        f.write(text)
    print(target_table(figures))
    print(side_by_side(figures))
    print(databases_side_by_side(figures))
    print('written to %s' % args.out)
    return 0


if __name__ == '__main__':
    sys.exit(main())
