"""Property-based: whatever JSON is thrown at the API, the answer is never a 5xx, and a refused
request leaves the database exactly as it was."""
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import p3s_server as srv
from test_store import submit, wsgi
from conftest import fresh_database

SOME_UUID = '0f0c2f2e-0000-4000-8000-000000000001'

scalars = st.none() | st.booleans() | st.integers(-2 ** 70, 2 ** 70) | st.floats() | st.text(max_size=40)
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=12), inner, max_size=4), max_leaves=12)
# Objects whose keys are the API's own field names reach deeper into the validation.
FIELDS = sorted(srv.JOB_FIELDS | srv.PILOT_FIELDS | {'job', 'errcode', 'stdout', 'stderr', 'wait',
                                                     'report', 'priority', 'state'})
field_objects = st.dictionaries(st.sampled_from(FIELDS), json_values, max_size=6)
bodies = json_values | field_objects | st.lists(field_objects, max_size=3)

ENDPOINTS = [
    ('POST', '/api/jobs'),
    ('POST', '/api/jobs/{job}/adjust'),
    ('POST', '/api/jobs/{job}/kill'),
    ('POST', '/api/pilots'),
    ('POST', '/api/pilots/{pilot}/work'),
    ('POST', '/api/pilots/{pilot}/report'),
    ('POST', '/api/pilots/{pilot}/heartbeat'),
    ('POST', '/api/pilots/{pilot}/stop'),
]


def snapshot(store):
    db = store.db.connect()
    try:
        return [tuple(r) for table, key in (('jobs', 'id'), ('pilots', 'id'), ('joblogs', 'job'))
                for r in db.execute('SELECT * FROM %s ORDER BY %s' % (table, key))]
    finally:
        db.close()


@pytest.fixture(scope='module')
def world(tmp_path_factory):
    store = srv.configure(fresh_database(tmp_path_factory.mktemp('prop')), sync='normal')
    me = srv.register_pilot(store, {'host': 'h'}, srv.utcnow())
    [job] = submit(store)
    srv.request_work(store, me['uuid'], srv.utcnow())
    yield store, {'job': job, 'pilot': me['uuid']}, me['secret']
    store.close()


@pytest.mark.parametrize('method,path', ENDPOINTS)
@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(body=bodies)
def test_generated_json_never_breaks_the_server(world, method, path, body):
    store, ids, secret = world
    before = snapshot(store)
    status, reply = wsgi(method, path.format(**ids), body, token=secret)
    assert status < 500, reply
    if status >= 400:
        assert isinstance(reply['error'], str) and reply['error']
        assert snapshot(store) == before
