"""Workflows end to end: the real server, p3s_workflow.py, p3s_data.py and real pilots
running the original's example DAGs (tests/data, rewritten to temporary paths)."""
import json
import os
import signal
from xml.sax.saxutils import escape

import pytest

from conftest import ROOT, database_connection, wait_for

DATA = os.path.join(ROOT, 'tests', 'data')
NODE_KEYS = {'payload': 'd101', 'env': 'd102', 'jobtype': 'd103', 'timelimit': 'd104',
             'priority': 'd105'}
EDGE_KEYS = {'name': 'd1', 'dirpath': 'd2', 'datatype': 'd3', 'datatag': 'd4', 'comment': 'd5'}


def graphml(nodes, edges):
    """GraphML in the original's style. nodes: {id: {attr: value}}; edges: [(s, t, {attr})]."""
    keys = ['<key attr.name="%s" attr.type="%s" for="node" id="%s"/>'
            % (a, 'int' if a in ('timelimit', 'priority') else 'string', k)
            for a, k in NODE_KEYS.items()]
    keys += ['<key attr.name="%s" attr.type="string" for="edge" id="%s"/>' % (a, k)
             for a, k in EDGE_KEYS.items()]
    body = ['<node id="%s">%s</node>' % (n, ''.join(
        '<data key="%s">%s</data>' % (NODE_KEYS[a], escape(str(v))) for a, v in attrs.items()))
        for n, attrs in nodes.items()]
    body += ['<edge source="%s" target="%s">%s</edge>' % (s, t, ''.join(
        '<data key="%s">%s</data>' % (EDGE_KEYS[a], escape(str(v))) for a, v in attrs.items()))
        for s, t, attrs in edges]
    return ('<?xml version="1.0" encoding="utf-8"?>\n'
            '<graphml xmlns="http://graphml.graphdrawing.org/xmlns">\n%s\n'
            '<graph edgedefault="directed">\n%s\n</graph>\n</graphml>\n'
            % ('\n'.join(keys), '\n'.join(body)))


def shell_job(payload, **attrs):
    return dict({'payload': payload, 'env': '{"P3S_EXECMODE":"SHELL"}', 'jobtype': 'test',
                 'timelimit': 100, 'priority': 0}, **attrs)


NOOP = {'jobtype': 'noop', 'payload': '', 'env': '{}', 'timelimit': 0}


def txt(name, tag, dirpath=''):
    return {'name': name, 'dirpath': dirpath, 'datatype': 'TXT', 'datatag': tag}


class Flows:
    """The workflow clients against one server, with a data directory for the payloads."""

    def __init__(self, clients, server, tmp_path):
        self.clients, self.server, self.tmp = clients, server, tmp_path
        self.datadir = tmp_path / 'p3sdata'
        self.datadir.mkdir()
        (self.datadir / 'input.txt').write_text(open(os.path.join(DATA, 'input.txt')).read())

    def file(self, name):
        """A copy of tests/data/<name> with @DATADIR@ made the temporary data directory."""
        path = self.tmp / name
        path.write_text(open(os.path.join(DATA, name)).read().replace('@DATADIR@',
                                                                       str(self.datadir)))
        return str(path)

    def run(self, name, *args, check=0):
        return self.clients.run(name, *args, check=check)

    def register_txt(self):
        self.run('data', '-R', '-j', os.path.join(DATA, 'txtDataType.json'))

    def dag(self, source, *args, name=None):
        """Register a DAG from a tests/data file name or from GraphML text (then -n name)."""
        if name is not None:
            path = self.tmp / (name + '.graphml')
            path.write_text(source)
            source = str(path)
        else:
            source = self.file(source)
        return self.run('workflow', '-g', source, *args)

    def add(self, dag, *args):
        out = self.run('workflow', '-a', dag, *args).stdout.split()
        assert len(out) == 1, out
        return out[0]

    def get(self, wf_uuid):
        status, wf = self.server.api('GET', '/api/workflows/' + wf_uuid)
        assert status == 200, wf
        return wf

    def jobs(self, wf_uuid):
        return {j['name']: self.server.job(j['uuid']) for j in self.get(wf_uuid)['jobs']}

    def wait(self, wf_uuid, state):
        wait_for(lambda: self.get(wf_uuid)['state'] == state, 30, what='workflow ' + state)
        return self.get(wf_uuid)

    def counts(self):
        """Rows of every table workflows touch, read from the server's database file."""
        db = database_connection(self.server.db)
        try:
            return {t: db.execute('SELECT count(*) FROM ' + t).fetchone()[0]
                    for t in ('dags', 'dag_vertices', 'dag_edges', 'workflows', 'jobs', 'data',
                              'datatypes')}
        finally:
            db.close()


@pytest.fixture
def flows(clients, server, tmp_path):
    return Flows(clients, server, tmp_path)


def test_3filters_working_example(flows, clients, server):
    """WORKFLOW.md's working example: workflow.py -g 3filters.graphml; workflow.py -a 3filters
    -f fileinfo -s defined. Fan-out, then an AND-join on NOOP2."""
    flows.register_txt()
    assert '3filters: 5 vertices, 6 edges' in flows.dag('3filters.graphml').stdout
    wf_uuid = flows.add('3filters', '-f', flows.file('fileinfo_3filters.json'), '-s', 'defined')
    wf = flows.get(wf_uuid)
    assert (wf['name'], wf['dag'], wf['nvertices']) == ('3filters', '3filters', 5)
    clients.run_pilot('--cycles', '3', '--wait', '5')
    for n in (1, 2, 3):
        assert (flows.datadir / ('output%d.txt' % n)).read_text() == '%d\n' % n
    wf = flows.wait(wf_uuid, 'finished')
    assert wf['ndone'] == 5 and wf['started_at'] and wf['stopped_at']
    assert {d['state'] for d in wf['data']} == {'available'}
    jobs = flows.jobs(wf_uuid)
    assert {j['state'] for j in jobs.values()} == {'finished'}
    assert jobs['NOOP1']['pilot'] is None and jobs['NOOP2']['pilot'] is None
    filters = [jobs['filter%d' % n] for n in (1, 2, 3)]
    assert all(f['pilot'] for f in filters)
    assert jobs['NOOP2']['stopped_at'] >= max(f['stopped_at'] for f in filters)   # AND-join
    assert filters[0]['env'] == {'P3S_EXECMODE': 'SHELL',
                                 'INPTXT': str(flows.datadir / 'input.txt'),
                                 'OUTTXT1': str(flows.datadir / 'output1.txt')}


def test_1filter_default_names_template_then_defined(flows, clients, server):
    """Default <uuid><ext> names, a dirpath without its trailing slash (the original glued it
    on), jobinfo on a noop, and a workflow made as a template and started with -m."""
    flows.register_txt()
    flows.dag('1filter.graphml')
    wf_uuid = flows.add('1filter', '-n', 'night42', '-f', flows.file('fileinfo_1filter_m.json'),
                        '-j', os.path.join(DATA, 'jobinfo_1filter.json'))
    wf = flows.get(wf_uuid)
    assert (wf['state'], wf['name']) == ('template', 'night42')
    assert {j['state'] for j in wf['jobs']} == {'template'}
    assert {d['state'] for d in wf['data']} == {'template'}
    by_tag = {d['datatag']: d for d in wf['data']}
    for d in wf['data']:
        assert d['name'] == d['uuid'] + '.txt' and d['dirpath'] == str(flows.datadir)
    jobs = flows.jobs(wf_uuid)
    inp = os.path.join(str(flows.datadir), by_tag['INPTXT']['name'])
    out = os.path.join(str(flows.datadir), by_tag['OUTTXT']['name'])
    assert jobs['filter']['env'] == {'P3S_EXECMODE': 'SHELL', 'INPTXT': inp, 'OUTTXT': out}
    assert jobs['NOOP1']['env'] == {'INPTXT': inp} and jobs['NOOP1']['payload'] == '/bin/date'
    listing = json.loads(flows.run('workflow', '--list', '--json').stdout)['workflows']
    assert [w['uuid'] for w in listing] == [wf_uuid]
    assert wf_uuid in flows.run('workflow', '--list').stdout

    os.link(str(flows.datadir / 'input.txt'), inp)
    assert 'defined' in flows.run('workflow', '-m', '-u', wf_uuid, '-s', 'defined').stdout
    again = flows.run('workflow', '-m', '-u', wf_uuid, '-s', 'defined', check=1)
    assert 'cannot define' in again.stderr
    clients.run_pilot('--cycles', '1', '--wait', '5')
    assert open(out).read() == '6\n'
    wf = flows.wait(wf_uuid, 'finished')
    assert wf['ndone'] == 3 and {d['state'] for d in wf['data']} == {'available'}
    shown = flows.run('workflow', '--show', wf_uuid).stdout
    assert 'finished' in shown and 'filter' in shown and by_tag['OUTTXT']['name'] in shown


def test_twostep_sticky_is_a_true_sequence(flows, clients, server):
    flows.register_txt()
    flows.dag('twostep.graphml')
    wf_uuid = flows.add('twostep', '-f', 'sticky', '-s', 'defined')
    clients.run_pilot('--cycles', '2', '--wait', '5')
    assert (flows.datadir / 'output.txt').read_text().split() == ['TEST1', 'TEST2', 'TEST2',
                                                                 'TEST3', 'TEST3', 'TEST3']
    assert (flows.datadir / 'final.txt').read_text() == '6\n'
    flows.wait(wf_uuid, 'finished')
    jobs = flows.jobs(wf_uuid)
    assert jobs['reco']['started_at'] > jobs['reduction']['stopped_at']
    assert jobs['reco']['env']['OUTTXT'] == str(flows.datadir / 'output.txt')


def test_3filters_mod_key_ids_equal_names_and_failing_filters(flows, clients, server):
    """Key ids equal to the attribute names parse like d101...; the bare `grep` exits 2, which
    the original still called finished: here each filter fails, NOOP2 is cancelled and the
    workflow fails."""
    flows.register_txt()
    flows.dag('3filters.graphml')
    flows.dag('3filters_mod.graphml')
    plain = server.api('GET', '/api/dags/3filters')[1]
    mod = server.api('GET', '/api/dags/3filters_mod')[1]
    assert mod['edges'] == plain['edges']
    for v in plain['vertices']:
        if v['jobtype'] == 'filter':
            v['payload'] = 'grep'
    assert mod['vertices'] == plain['vertices']
    wf_uuid = flows.add('3filters_mod', '-f', 'inherit:night', '-s', 'defined')
    data = flows.get(wf_uuid)['data']
    assert {d['name'] for d in data} == {'night:3filters_mod:NOOP1:INPTXT.txt'} | {
        'night:3filters_mod:filter%d:OUTTXT%d.txt' % (n, n) for n in (1, 2, 3)}
    clients.run_pilot('--cycles', '3', '--wait', '5')
    wf = flows.wait(wf_uuid, 'failed')
    jobs = flows.jobs(wf_uuid)
    assert [(jobs['filter%d' % n]['state'], jobs['filter%d' % n]['errcode']) for n in (1, 2, 3)] \
        == [('failed', 2)] * 3
    assert jobs['NOOP2']['state'] == 'cancelled' and jobs['NOOP1']['state'] == 'finished'
    assert 'ended failed' in wf['comment'] and wf['ndone'] == 1


def test_wfmulti1_parallel_edges(flows, server):
    out = flows.dag('wfmulti1.graphml').stdout
    assert 'wfmulti1: 3 vertices, 3 edges' in out
    dag = server.api('GET', '/api/dags/wfmulti1')[1]
    assert sorted((e['source'], e['target'], e['name']) for e in dag['edges']) == [
        ('adc', 'adcViz', 'mean.txt'), ('adc', 'adcViz', 'rms.txt'),
        ('adc', 'stats', 'summary.txt')]
    assert dag['root'] == 'adc'
    original = open(flows.file('wfmulti1.graphml')).read()
    assert flows.run('workflow', '-G', 'wfmulti1').stdout == original
    listing = flows.run('workflow', '--list', '-w', 'dag').stdout
    assert 'wfmulti1' in listing
    # The bare edges have no datatype: no workflow can be made from it, and nothing is left.
    before = flows.counts()
    refused = flows.run('workflow', '-a', 'wfmulti1', check=1)
    assert "vertex 'adc' has no payload" in refused.stderr
    jobinfo = json.dumps({v: {'payload': '/bin/true'} for v in ('adc', 'adcViz', 'stats')})
    refused = flows.run('workflow', '-a', 'wfmulti1', '-j', jobinfo, check=1)
    assert "edge adc:adcViz has no datatype" in refused.stderr
    assert refused.stderr.count('\n') == 1
    assert flows.counts() == before


def test_diamond_join_reads_both_parents_outputs(flows, clients, server):
    """A -> B, A -> C, B => D (two parallel edges), C -> D, D -> end (noop). D runs once, after
    both B and C, and reads all three files."""
    d = str(flows.datadir)
    nodes = {'A': shell_job('echo hello > $SEED', priority=9),
             'B': shell_job('tr a-z A-Z < $SEED > $UPPER; echo b > $NOTE', priority=5),
             'C': shell_job('rev < $SEED > $REV', priority=1),
             'D': shell_job('cat $UPPER $REV $NOTE > $RESULT'),
             'end': NOOP}
    edges = [('A', 'B', txt('seed.txt', 'SEED', d)), ('A', 'C', txt('seed.txt', 'SEED', d)),
             ('B', 'D', txt('upper.txt', 'UPPER', d)), ('B', 'D', txt('note.txt', 'NOTE', d)),
             ('C', 'D', txt('rev.txt', 'REV', d)), ('D', 'end', txt('result.txt', 'RESULT', d))]
    flows.register_txt()
    flows.dag(graphml(nodes, edges), name='diamond')
    wf_uuid = flows.add('diamond', '-f', 'sticky', '-s', 'defined')
    assert {j['name']: j['state'] for j in flows.get(wf_uuid)['jobs']} == {
        'A': 'defined', 'B': 'template', 'C': 'template', 'D': 'template', 'end': 'template'}
    clients.run_pilot('--cycles', '4', '--wait', '5')
    assert (flows.datadir / 'result.txt').read_text() == 'HELLO\nolleh\nb\n'
    flows.wait(wf_uuid, 'finished')
    jobs = flows.jobs(wf_uuid)
    assert jobs['D']['started_at'] > max(jobs['B']['stopped_at'], jobs['C']['stopped_at'])
    assert set(jobs['D']['env']) == {'P3S_EXECMODE', 'UPPER', 'NOTE', 'REV', 'RESULT'}


def test_failing_middle_job_cancels_downstream_only(flows, clients, server):
    d = str(flows.datadir)
    nodes = {'start': NOOP, 'first': shell_job('echo 1 > $A', priority=9),
             'middle': shell_job('exit 3', priority=8), 'after': shell_job('touch $C'),
             'end': NOOP, 'side': shell_job('echo side > $IN.side', priority=1)}
    edges = [('start', 'first', txt('in', 'IN', d)), ('first', 'middle', txt('a', 'A', d)),
             ('middle', 'after', txt('b', 'B', d)), ('after', 'end', txt('c', 'C', d)),
             ('start', 'side', txt('in', 'IN', d))]
    flows.register_txt()
    flows.dag(graphml(nodes, edges), name='chain')
    wf_uuid = flows.add('chain', '-f', 'sticky', '-s', 'defined')
    clients.run_pilot('--cycles', '3', '--wait', '5')
    wf = flows.wait(wf_uuid, 'failed')
    states = {j['name']: j['state'] for j in wf['jobs']}
    assert states == {'start': 'finished', 'first': 'finished', 'middle': 'failed',
                      'after': 'cancelled', 'end': 'cancelled', 'side': 'finished'}
    assert 'middle' in wf['comment'] and 'failed' in wf['comment']
    assert not (flows.datadir / 'c').exists()
    assert (flows.datadir / 'in.side').read_text() == 'side\n'
    data = {d['datatag']: d['state'] for d in wf['data']}
    assert data == {'IN': 'available', 'A': 'available', 'B': 'defined', 'C': 'defined'}


def test_noop_chains_and_several_sources(flows, clients, server):
    d = str(flows.datadir)
    nodes = {'n1': NOOP, 'n2': NOOP, 'n3': NOOP, 'work': shell_job('cat $X $Y > $OUT'),
             'src1': shell_job('echo one > $X', priority=2),
             'src2': shell_job('echo two > $Y', priority=1), 'n4': NOOP, 'n5': NOOP}
    edges = [('n1', 'n2', txt('a', 'A', d)), ('n2', 'n3', txt('b', 'B', d)),
             ('n3', 'work', txt('c', 'C', d)), ('src1', 'work', txt('x', 'X', d)),
             ('src2', 'work', txt('y', 'Y', d)), ('work', 'n4', txt('out', 'OUT', d)),
             ('n4', 'n5', txt('z', 'Z', d))]
    flows.register_txt()
    flows.dag(graphml(nodes, edges), name='noops')
    wf_uuid = flows.add('noops', '-f', 'sticky', '-s', 'defined')
    states = {j['name']: j['state'] for j in flows.get(wf_uuid)['jobs']}
    assert states == {'n1': 'finished', 'n2': 'finished', 'n3': 'finished', 'work': 'template',
                      'src1': 'defined', 'src2': 'defined', 'n4': 'template', 'n5': 'template'}
    clients.run_pilot('--cycles', '3', '--wait', '5')
    wf = flows.wait(wf_uuid, 'finished')
    assert (flows.datadir / 'out').read_text() == 'one\ntwo\n'
    assert wf['ndone'] == 8
    # A DAG of noops only finishes as soon as it is defined.
    flows.dag(graphml({'a': NOOP, 'b': NOOP, 'c': NOOP},
                      [('a', 'b', txt('f', '')), ('b', 'c', txt('g', ''))]), name='idle')
    assert flows.get(flows.add('idle', '-s', 'defined'))['state'] == 'finished'


def test_refusals_leave_the_database_unchanged(flows, server, tmp_path):
    flows.register_txt()
    flows.dag('1filter.graphml')
    flows.dag('1filter_fail.graphml')            # a DAG may name any datatype ...
    before = flows.counts()
    refused = flows.run('workflow', '-a', '1filter_fail', '-s', 'defined', check=1)
    assert "unknown datatype 'NOSUCH'" in refused.stderr           # ... a workflow may not
    assert flows.counts() == before
    cyclic = graphml({'a': shell_job('true'), 'b': shell_job('true'), 'c': shell_job('true')},
                     [('a', 'b', txt('x', 'X')), ('b', 'c', txt('y', 'Y')),
                      ('c', 'a', txt('z', 'Z'))])
    cases = [
        (cyclic, 'not a DAG: it has the cycle'),
        ('<graphml><graph edgedefault="directed"><node id="a"/>', 'invalid GraphML'),
        ('<?xml version="1.0"?><!DOCTYPE lol [<!ENTITY lol "lol">]><graphml/>', 'DOCTYPE'),
        (graphml({'a': {}}, []).replace('directed', 'undirected'), 'must be directed'),
        (graphml({'a': {}, 'b': {}}, [('a', 'b', {'datatype': 'TXT'})]), 'name is required'),
        (graphml({'a': {'env': '{not json'}}, []), "vertex 'a': env is not valid JSON"),
        (graphml({'a': {'timelimit': 0, 'payload': 'x'}}, []), 'timelimit must be between'),
        (graphml({'a': {}, 'b': {}}, [('a', 'b', {'name': 'n', 'datatag': 'NO-PE'})]),
         'not a valid environment variable name'),
    ]
    for n, (text, message) in enumerate(cases):
        path = tmp_path / ('bad%d.graphml' % n)
        path.write_text(text)
        proc = flows.run('workflow', '-g', str(path), check=1)
        assert message in proc.stderr and proc.stderr.count('\n') == 1, (message, proc.stderr)
    assert flows.counts() == before
    for args, message in [(('-a', 'nosuch'), 'no such DAG'),
                          (('-a', '1filter', '-f', '{"a:b": {}}'), 'no such edge'),
                          (('-a', '1filter', '-j', '{"nosuch": {}}'), 'no such vertex')]:
        proc = flows.run('workflow', *args, check=1)
        assert message in proc.stderr, proc.stderr
    status, reply = server.api('POST', '/api/workflows', {'dag': '1filter', 'fileinfo': 'slippery'})
    assert status == 400 and "fileinfo is 'sticky'" in reply['error']
    assert 'sticky, inherit:NAME' in flows.run('workflow', '-a', '1filter', '-f', 'slippery',
                                               check=2).stderr
    assert flows.counts() == before
    missing = flows.run('workflow', '-g', str(tmp_path / 'missing.graphml'), check=4)
    assert missing.stderr.startswith('p3s_workflow: error: cannot read')
    assert flows.run('workflow', '-a', '1filter', '-j', 'nosuch.json', check=4).stderr


def test_replace_and_delete(flows, clients, server, tmp_path):
    flows.register_txt()
    flows.dag('twostep.graphml')
    clash = flows.run('workflow', '-g', flows.file('twostep.graphml'), check=1)
    assert 'exists' in clash.stderr and '--replace' in clash.stderr
    flows.dag(graphml({'only': shell_job('sleep 60')}, []), '--replace', name='twostep')
    assert server.api('GET', '/api/dags/twostep')[1]['nvertices'] == 1
    running = flows.add('twostep', '-s', 'defined')
    waiting = flows.add('twostep')
    pilot = clients.pilot('--cycles', '0', '--wait', '2', '--beat', '0.5')
    wait_for(lambda: flows.get(running)['state'] == 'running', what='workflow running')
    # A DAG goes with its vertices and edges; workflows made from it stay.
    flows.run('workflow', '-d', '-w', 'dag', '-n', 'twostep')
    assert server.api('GET', '/api/dags/twostep')[0] == 404
    assert flows.counts()['dag_vertices'] == 0
    refused = flows.run('workflow', '-d', '-w', 'workflow', '-u', running, check=1)
    assert 'running' in refused.stderr and '--force' in refused.stderr
    assert '--cancel' in refused.stderr
    flows.run('workflow', '-d', '-w', 'workflow', '-u', waiting)
    job = flows.get(running)['jobs'][0]['uuid']
    flows.run('workflow', '-d', '-w', 'workflow', '-u', running, '--force')
    assert flows.counts()['jobs'] == 0 and flows.counts()['data'] == 0
    assert flows.counts()['workflows'] == 0
    assert server.api('GET', '/api/jobs/' + job)[0] == 404
    pilot.send_signal(signal.SIGTERM)
    pilot.communicate(timeout=30)
    assert pilot.returncode == 0
    gone = flows.run('workflow', '-d', '-w', 'workflow', '-u', running, check=1)
    assert 'no such workflow' in gone.stderr


def test_datatypes_client(flows, server):
    flows.run('data', '-R', '-j', '{"name":"ROOT","ext":".root","comment":"ROOT files"}')
    flows.register_txt()
    listed = json.loads(flows.run('data', '--list', '--json').stdout)['datatypes']
    assert [(d['name'], d['ext']) for d in listed] == [('ROOT', '.root'), ('TXT', '.txt')]
    assert '.root' in flows.run('data', '--list').stdout
    flows.run('data', '-R', '-j', '{"name":"TXT","ext":".text"}')          # an update
    assert server.api('GET', '/api/datatypes')[1]['datatypes'][1]['ext'] == '.text'
    flows.run('data', '-D', 'ROOT')
    assert flows.run('data', '-D', 'ROOT', check=1).stderr.startswith('p3s_data: error: ')
    assert 'takes JSON text or a JSON file' in flows.run('data', '-R', '-j', '{bad', check=2).stderr
    assert 'name is required' in flows.run('data', '-R', '-j', '{"ext":".x"}', check=1).stderr
    assert flows.run('data', '-R', check=2).returncode == 2


def test_a_datatype_in_use_cannot_be_deleted(flows, server):
    """A DAG whose edges name a missing datatype cannot make workflows: the datatype stays
    while a DAG uses it, and goes once the DAG has gone."""
    flows.register_txt()
    flows.dag('twostep.graphml')
    refused = flows.run('data', '-D', 'TXT', check=1)
    assert 'datatype TXT is used by DAG twostep' in refused.stderr
    assert refused.stderr.count('\n') == 1
    flows.add('twostep')                                  # still usable
    flows.run('workflow', '-d', '-w', 'dag', '-n', 'twostep')
    flows.run('data', '-D', 'TXT')
    assert server.api('GET', '/api/datatypes')[1]['datatypes'] == []
