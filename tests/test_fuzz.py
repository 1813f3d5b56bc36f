"""Fuzzing every route of the app (its list is read from the app itself, so a new route is
fuzzed as soon as it exists): generated path parameters, query strings and bodies, in-process
against the WSGI app and over HTTP against a real server. Whatever comes, the answer is never a
5xx, an API error is one line of JSON, and a refused request leaves the database as it was."""
import http.client
import json
import urllib.parse

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import p3s_server as srv
from conftest import Server, wsgi_call

ROUTES = [(r.method, r.rule) for r in srv.app.routes]
TABLES = ('jobs', 'pilots', 'joblogs', 'dags', 'dag_vertices', 'dag_edges', 'workflows',
          'datatypes', 'data', 'jobtypes', 'sites', 'services', 'injections')
GRAPHML = """<?xml version="1.0" encoding="utf-8"?>
<graphml xmlns="http://graphml.graphdrawing.org/xmlns">
<key attr.name="payload" attr.type="string" for="node" id="payload"/>
<key attr.name="datatype" attr.type="string" for="edge" id="datatype"/>
<key attr.name="datatag" attr.type="string" for="edge" id="datatag"/>
<key attr.name="name" attr.type="string" for="edge" id="name"/>
<graph edgedefault="directed">
<node id="a"><data key="payload">/bin/true</data></node>
<node id="b"><data key="payload">/bin/true</data></node>
<edge source="a" target="b">
  <data key="name">f</data><data key="datatype">TXT</data><data key="datatag">F</data>
</edge>
</graph>
</graphml>
"""

# Text that has broken servers: lone surrogates, NUL, a newline after a uuid, numbers that
# overflow SQLite's integers, NaN, paths that climb, markup.
NASTY = ['', ' ', '\ud800', 'a\udfff', '\x00', '\n', '0' * 30, '99999999999999999999', '-1',
         '1e400', 'nan', 'inf', '../../etc/passwd', '%00', '<script>', "'; DROP TABLE jobs;--",
         '0f0c2f2e-0000-4000-8000-000000000009\n', 'é' * 300, 'x' * 5000, 'true', '[]', '{}']
nasty = st.sampled_from(NASTY)
texts = st.text(max_size=24) | nasty
scalars = (st.none() | st.booleans() | st.integers(-2 ** 70, 2 ** 70) | st.floats()
           | texts)
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(texts, inner, max_size=4), max_leaves=12)
# Objects with the API's own field names reach deeper into the validation.
FIELDS = sorted(srv.JOB_FIELDS | srv.PILOT_FIELDS | srv.REPORT_FIELDS | srv.DAG_FIELDS
                | srv.WORKFLOW_FIELDS | srv.SITE_FIELDS | srv.DATA_FIELDS | srv.INJECT_FIELDS
                | set(srv.EDGE_ATTRS) | {'wait', 'report', 'cap', 'uuids', 'message', 'ext',
                                         'since', 'limit', 'files', 'path', 'skip', 'nonce'})
field_objects = st.recursive(
    st.dictionaries(st.sampled_from(FIELDS), json_values, max_size=6),
    lambda inner: st.dictionaries(st.sampled_from(FIELDS), inner | json_values, max_size=4),
    max_leaves=8)
DEEP = [b'[' * 100000 + b']' * 100000, b'{"a":' * 50000 + b'1' + b'}' * 50000,
        b'"\\ud800"', b'{"name": "\\udc00"}', b'[{"payload": "\\ud83d"}]', b'\xff\xfe',
        b'{"payload": "/bin/true"', b'1e400', b'NaN', b'-Infinity']
bodies = (json_values | field_objects | st.lists(field_objects, max_size=3)).map(
    lambda v: json.dumps(v).encode()) | st.sampled_from(DEEP)
QUERY_KEYS = ['state', 'limit', 'page', 'perpage', 'sort', 'refresh', 'logs', 'force',
              'throughput', 'name', 'jobtype', 'user', 'site', 'pilot', 'host', 'workflow', 'dag',
              'datatype', 'dirpath', 'since', 'unknown']
queries = st.lists(st.tuples(st.sampled_from(QUERY_KEYS) | st.text(max_size=8), texts),
                   max_size=4)


def world(store):
    """A database with one of everything, and the values that name them."""
    now = srv.utcnow()
    reg = srv.register_pilot(store, {'host': 'h'}, now)
    pilot, secret = reg['uuid'], reg.get('secret')
    [job] = srv.submit_jobs(store, [{'payload': '/bin/true', 'jobtype': 'reco'}], now)
    srv.request_work(store, pilot, now)
    srv.add_datatype(store, {'name': 'TXT', 'ext': '.txt'}, now)
    srv.add_dag(store, {'name': 'g', 'graphml': GRAPHML}, now)
    wf = srv.add_workflow(store, {'dag': 'g', 'state': 'defined'}, now)['uuid']
    data = srv.register_data(store, {'name': 'f.txt', 'datatype': 'TXT'}, now)['uuid']
    srv.define_site(store, {'name': 'np04', 'env': {'A': 'b'}}, now)
    srv.add_service_message(store, {'name': 'svc', 'message': 'hello'}, now)
    names = {'job_uuid': job, 'pilot_uuid': pilot, 'wf_uuid': wf, 'data_uuid': data,
             'name': 'g', 'path': 'p3s.css'}
    return names, secret


def snapshot(store):
    return [tuple(r) for table in TABLES for r in store.query('SELECT * FROM %s' % table)]


def path_of(rule, names, given):
    """The rule with each wildcard replaced by a known name, or by generated text."""
    out = []
    for part in rule.split('/'):
        if part.startswith('<'):
            key = part[1:-1].split(':')[0]
            value = given if given is not None else names.get(key, 'x')
            out.append(urllib.parse.quote(value.encode('utf-8', 'surrogatepass'), safe=''))
        else:
            out.append(part)
    return '/'.join(out)


def query_of(pairs):
    return urllib.parse.urlencode([(k.encode('utf-8', 'surrogatepass'),
                                    v.encode('utf-8', 'surrogatepass')) for k, v in pairs])


def judge(method, rule, status, headers, body):
    assert status < 500, (method, rule, status, body[:500])
    if status >= 400 and rule.startswith('/api'):
        assert headers.get('Content-Type', '').startswith('application/json'), body[:200]
        error = json.loads(body)['error']
        assert error and '\n' not in error, error


@pytest.mark.parametrize('method,rule', ROUTES)
@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(given_path=st.none() | texts, pairs=queries, body=bodies, own=st.booleans())
def test_no_generated_request_breaks_the_app(tmp_path_factory, method, rule, given_path, pairs,
                                             body, own):
    store, names, secret = fuzzed_world(tmp_path_factory, method, rule)
    path = path_of(rule, names, given_path)
    before = snapshot(store)
    status, headers, reply = wsgi_call(method, path + '?' + query_of(pairs), body,
                                       token=secret if own else None)
    judge(method, rule, status, headers, reply)
    if status >= 400:
        assert snapshot(store) == before, (method, path, status, reply[:300])


WORLD = {}


def fuzzed_world(tmp_path_factory, method, rule):
    """One database per route, made at its first example and kept for the rest of them."""
    if WORLD.get('route') != (method, rule):
        if WORLD:
            WORLD['store'].close()
        store = srv.configure(str(tmp_path_factory.mktemp('fuzz') / 'p3s.db'), sync='normal')
        WORLD.update(route=(method, rule), store=store, world=world(store))
    srv.app.config['p3s.store'] = WORLD['store']
    return (WORLD['store'],) + WORLD['world']


@pytest.fixture(scope='module')
def live(tmp_path_factory):
    tmp = tmp_path_factory.mktemp('live')
    server = Server(tmp, extra_args=['--sync', 'normal', '--workers', '1']).start()
    st_ = srv.configure(server.db, sync='normal')
    names, secret = world(st_)
    yield server, names, secret
    st_.close()
    server.stop()


def http_call(server, method, path, body, token=None):
    conn = http.client.HTTPConnection('127.0.0.1', server.port, timeout=30)
    headers = {'Content-Type': 'application/json'}
    if token:
        headers['Authorization'] = 'Bearer ' + token
    try:
        conn.request(method, path, body=body if method != 'GET' else None, headers=headers)
        reply = conn.getresponse()
        return reply.status, dict(reply.getheaders()), reply.read().decode('utf-8', 'replace')
    finally:
        conn.close()


@pytest.mark.parametrize('method,rule', ROUTES)
@settings(max_examples=15, deadline=None, suppress_health_check=list(HealthCheck))
@given(given_path=st.none() | texts, pairs=queries, body=bodies, own=st.booleans())
def test_no_generated_request_breaks_a_real_server(live, method, rule, given_path, pairs, body,
                                                   own):
    server, names, secret = live
    path = path_of(rule, names, given_path) + '?' + query_of(pairs)
    status, headers, reply = http_call(server, method, path, body, secret if own else None)
    judge(method, rule, status, headers, reply)
