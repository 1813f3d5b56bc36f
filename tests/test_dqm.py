"""The DQM controls: deadlines (stale), drop, jobtype caps, sites, service messages.

In-process tests call the domain functions on a temporary database with time passed in;
end-to-end tests run the real server, p3s_job.py and p3s_pilot.py processes."""
import json
import signal
import threading
import urllib.request
from datetime import datetime, timedelta, timezone

import pytest

import p3s_server as srv
from conftest import (InProcessFront, fresh_database, full_scans, make_job, query_plan, sql_db,
                      wait_for)

T0 = '2026-01-01T00:00:00.000000+00:00'


def at(seconds):
    """The stored time `seconds` after T0."""
    return (datetime.fromisoformat(T0) + timedelta(seconds=seconds)).isoformat(
        timespec='microseconds')


@pytest.fixture
def store(tmp_path):
    st = srv.configure(fresh_database(tmp_path, 'unit.db'))
    yield st
    st.close()


def pilot(store, site='', jobtypes=()):
    return srv.register_pilot(store, {'site': site, 'jobtypes': list(jobtypes)}, T0)['uuid']


def claim(store, pilot_uuid, now=T0):
    reply, _ = srv.request_work(store, pilot_uuid, now)
    return reply.get('job')


def finish(store, pilot_uuid, job, now=T0):
    srv.report_job(store, pilot_uuid, srv.check_report(
        {'job': job['uuid'], 'state': 'finished', 'errcode': 0}), now)


def plan(store, sql, **params):
    return query_plan(sql_db(store), sql, params)


# -- in process -------------------------------------------------------------------------------


def test_claim_plan_stays_on_indexes(store):
    """Both forms of the claim read queue indexes from the top, and the capped types are counted
    through an index: no sort of jobs, no scan of the jobs table (docs/performance.md)."""
    params = dict(pilot='p', host='h', site='', jobtypes='[]', now=T0, blocked='[]',
                  left=srv.MAX_TIMELIMIT, last_queued=0)
    steps = plan(store, srv.CLAIM_JOB, **params)
    assert any(st.reads('jobs', 'jobs_queue', 'SCAN') for st in steps), steps
    assert not full_scans(steps) and not any(st.sorts for st in steps), steps
    by_type = plan(store, srv.CLAIM_JOB_BY_TYPE, **params)
    wheres = {st.where for st in by_type if st.reads('jobs', 'jobs_type_queue', 'SEARCH')}
    assert {'jobtype=?', 'jobtype>?'} <= wheres, by_type                  # the skip-scan
    assert not full_scans(by_type), by_type
    assert any(st.reads('held', 'jobs_active', 'SEARCH')
               for st in plan(store, srv.BLOCKED_JOBTYPES))
    [stale] = plan(store, srv.STALE_JOBS, now=T0)
    assert stale.reads('jobs', 'jobs_deadline', 'SEARCH') and 'deadline_at' in stale.where


def test_deadline_skips_at_claim_and_sweep_makes_stale(store):
    late, fine, forever = srv.submit_jobs(store, [
        {'payload': 'late', 'deadline': 10, 'priority': 2},
        {'payload': 'fine', 'deadline': 100, 'priority': 1},
        {'payload': 'forever'}], T0)
    p = pilot(store)
    assert claim(store, p, now=at(11))['uuid'] == fine          # late is past its deadline
    assert srv.get_job(store, late)['deadline_at'] == at(10)
    assert srv.sweep(store, at(11), 1e9)['stale_jobs'] == 1
    job = srv.get_job(store, late)
    assert (job['state'], job['stopped_at'], job['pilot']) == ('stale', at(11), None)
    assert srv.sweep(store, at(10 ** 6), 1e9)['stale_jobs'] == 0   # dispatched, or no deadline
    assert srv.get_job(store, forever)['state'] == 'defined'


def test_deadline_counts_from_definition_of_a_template(store):
    [job] = srv.submit_jobs(store, [{'payload': 'x', 'deadline': 5, 'state': 'template'}], T0)
    assert srv.get_job(store, job)['deadline_at'] is None
    srv.adjust_job(store, job, {'state': 'defined'}, at(100))
    assert srv.get_job(store, job)['deadline_at'] == at(105)
    assert srv.sweep(store, at(104), 1e9)['stale_jobs'] == 0
    assert srv.sweep(store, at(105), 1e9)['stale_jobs'] == 1


def test_cap_holds_extra_jobs_until_a_slot_frees(store):
    srv.set_cap(store, {'name': 'reco', 'cap': 1}, T0)
    first, second, other = srv.submit_jobs(store, [
        {'payload': 'a', 'jobtype': 'reco', 'priority': 5},
        {'payload': 'b', 'jobtype': 'reco', 'priority': 5},
        {'payload': 'c', 'jobtype': 'evd'}], T0)
    p1, p2, p3 = pilot(store), pilot(store), pilot(store)
    job = claim(store, p1)
    assert job['uuid'] == first
    assert claim(store, p2)['uuid'] == other                  # reco is full: the next type runs
    assert claim(store, p3) is None
    assert srv.get_job(store, second)['state'] == 'defined'   # waits; never rejected
    finish(store, p1, job)
    assert claim(store, p3)['uuid'] == second


def test_cap_zero_pauses_and_raising_wakes_a_waiting_pilot(store):
    srv.set_cap(store, {'name': 'evd', 'cap': 0}, T0)
    [job] = srv.submit_jobs(store, [{'payload': 'x', 'jobtype': 'evd'}], T0)
    p = pilot(store)
    assert claim(store, p) is None
    door = InProcessFront(store)
    try:
        held = door.spawn_work(p, 30)
        door.wait_until(lambda: len(door.front.waiters) == 1, what='the pilot to wait')
        srv.set_cap(store, {'name': 'evd', 'cap': None}, T0)
        held.join(30)
        assert held.value['job']['uuid'] == job
    finally:
        door.close()


def test_cap_for_every_type_and_listing(store):
    srv.submit_jobs(store, [{'payload': 'x', 'jobtype': t} for t in ('a', 'b', 'b')], T0)
    reply = srv.set_cap(store, {'cap': 3}, at(1))
    assert [(t['name'], t['cap'], t['active'], t['queued']) for t in reply['jobtypes']] == [
        ('a', 3, 0, 1), ('b', 3, 0, 2)]
    claim(store, pilot(store, jobtypes=['b']))
    assert [t['active'] for t in srv.list_jobtypes(store)] == [0, 1]


def test_cap_holds_under_racing_claims(store):
    """Threads claim as fast as they can; dispatched+running of the capped type never passes
    the cap (the count and the take are one statement under the write lock)."""
    cap = 3
    srv.set_cap(store, {'name': 'capped', 'cap': cap}, T0)
    srv.submit_jobs(store, [{'payload': 'x', 'jobtype': 'capped'} for _ in range(60)], T0)
    pilots = [pilot(store) for _ in range(8)]
    peak, errors, lock = [0], [], threading.Lock()

    def worker(p):
        try:
            for _ in range(30):
                job = claim(store, p)
                if job is None:
                    continue
                active = sql_db(store).execute(
                    "SELECT count(*) FROM jobs WHERE jobtype = 'capped' "
                    "AND state IN ('dispatched', 'running')").fetchone()[0]
                with lock:
                    peak[0] = max(peak[0], active)
                finish(store, p, job)
        except Exception as e:       # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(p,)) for p in pilots]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert 1 <= peak[0] <= cap
    done = sql_db(store).execute("SELECT count(*) FROM jobs WHERE state = 'finished'").fetchone()[0]
    assert done > 0


def test_drop_takes_only_queued_jobs_of_the_type(store):
    old, new, other, tpl = srv.submit_jobs(store, [
        {'payload': 'x', 'jobtype': 'a'}, {'payload': 'y', 'jobtype': 'a'},
        {'payload': 'z', 'jobtype': 'b'}, {'payload': 't', 'jobtype': 'a', 'state': 'template'}],
        T0)
    srv.adjust_job(store, new, {'priority': 1}, T0)
    sql_db(store).execute("UPDATE jobs SET defined_at = :t WHERE uuid = :u", {'t': at(50), 'u': new})
    assert srv.drop_jobs(store, {'jobtype': 'a', 'older': 60}, at(100))['dropped'] == 1
    states = [srv.get_job(store, u)['state'] for u in (old, new, other, tpl)]
    assert states == ['dropped', 'defined', 'defined', 'template']
    assert srv.drop_jobs(store, {'jobtype': 'a'}, at(100))['dropped'] == 1


@pytest.mark.parametrize('body', [
    {'name': 's', 'period': -1}, {'name': 's', 'cycles': 1.5}, {'name': 's', 'beat': 0},
    {'name': 's', 'wait': 31}, {'name': 's', 'env': {'A': 1}}, {'name': ''},
    {'name': 's', 'server': 'x'}, ['s']])
def test_bad_sites_are_refused(store, body):
    with pytest.raises(srv.Refused) as e:
        srv.define_site(store, body, T0)
    assert e.value.status == 400


# -- end to end -------------------------------------------------------------------------------


def test_stale_job_never_runs(clients, server, tmp_path):
    marker = tmp_path / 'ran'
    [job_uuid] = clients.submit([make_job('/bin/touch %s' % marker, deadline='1')])
    deadline = server.job(job_uuid)['deadline_at']
    # past the deadline: the claim skips it, whether or not the sweep has run yet
    wait_for(lambda: datetime.now(timezone.utc).isoformat(timespec='microseconds') > deadline, what='the deadline')
    clients.run_pilot('--cycles', '1', '--wait', '0', '--period', '0')
    assert not marker.exists()
    wait_for(lambda: server.job(job_uuid)['state'] == 'stale', what='the sweep')
    assert server.jobs(state='stale')[0]['uuid'] == job_uuid


def test_drop_from_the_command_line(clients, server):
    a1, a2, b = clients.submit([make_job('/bin/true', jobtype='a'),
                                make_job('/bin/true', jobtype='a'),
                                make_job('/bin/true', jobtype='b')])
    kept = clients.run('job', '--drop', '-T', 'a', '--older', '3600', check=0)
    assert 'dropped 0 queued a jobs' in kept.stdout
    out = clients.run('job', '--drop', '-T', 'a', '--json', check=0)
    assert json.loads(out.stdout) == {'jobtype': 'a', 'dropped': 2}
    assert [server.job(u)['state'] for u in (a1, a2, b)] == ['dropped', 'dropped', 'defined']
    assert clients.run('job', '--drop', check=2).stderr.startswith('p3s_job: error: --drop needs')


def test_two_pilots_cap_one_never_run_two_at_once(clients, server, tmp_path):
    """A payload that notices another of its type running leaves a mark; with cap 1 it never
    does, while the uncapped type runs on the other pilot at the same time."""
    lock, overlap, log = tmp_path / 'lock', tmp_path / 'overlap', tmp_path / 'log'
    capped = make_job('/bin/sh -c "mkdir %s || touch %s; echo $P3S_JOB_UUID >> %s; sleep 0.3; '
                      'rmdir %s"' % (lock, overlap, log, lock), jobtype='capped', priority='5')
    out = clients.run('job', '-l', '-L', '1', '-T', 'capped', check=0).stdout
    assert out.split('\n')[1].split()[:2] == ['capped', '1']
    uuids = clients.submit([capped] * 4 + [make_job('/bin/sleep 0.3', jobtype='free')] * 2)
    pilots = [clients.pilot('--cycles', '0', '--wait', '10', '--beat', '0.5') for _ in range(2)]
    wait_for(lambda: all(server.job(u)['state'] == 'finished' for u in uuids), 60,
             what='all jobs finished')
    for p in pilots:
        p.send_signal(signal.SIGTERM)
        p.communicate(timeout=30)
    assert not overlap.exists()
    assert len(log.read_text().split()) == 4
    listed = json.loads(clients.run('job', '-l', '--json', check=0).stdout)['jobtypes']
    assert {(t['name'], t['cap'], t['active'], t['queued']) for t in listed} == {
        ('capped', 1, 0, 0), ('free', None, 0, 0)}


def test_paused_type_waits_and_resumes(clients, server):
    clients.run('job', '-l', '-L', '0', check=0)              # no -T: every known type (none yet)
    clients.run('job', '-l', '-L', '0', '-T', 'evd', check=0)
    [job_uuid] = clients.submit([make_job('/bin/true', jobtype='evd')])
    pilot = clients.pilot('--cycles', '1', '--wait', '20')
    wait_for(lambda: server.api('GET', '/api/pilots?state=idle')[1]['pilots'], what='idle pilot')
    assert server.job(job_uuid)['state'] == 'defined'
    clients.run('job', '-l', '-L', 'none', check=0)           # every type: the cap is removed
    pilot.communicate(timeout=60)
    assert server.job(job_uuid)['state'] == 'finished'
    assert clients.run('job', '-l', '-L', '-5', check=2).stderr.startswith('p3s_job: error')


def test_site_defaults_reach_the_pilot(clients, server, tmp_path):
    """A site file of the original format (numbers as strings, a server key, a nested env);
    its pilots take its cycles and env; the job env wins; the pilot's own flags win."""
    site = tmp_path / 'testsite.json'
    site.write_text(json.dumps({
        'name': 'testsite', 'server': 'p3s.example.org:80', 'pilots': '3',
        'pilotcycles': '2', 'pilotperiod': '0', 'pilotbeat': '7', 'pilotlife': '90000',
        'env': {'SITE_ONLY': 'from-site', 'BOTH': 'from-site'}}))
    defined = json.loads(clients.run('pilot', '--define-site', str(site), check=0).stdout)
    assert (defined['cycles'], defined['beat'], defined['pilots']) == (2, 7, 3)
    status, found = server.api('GET', '/api/sites?name=testsite')
    assert status == 200 and found['sites'][0]['env']['SITE_ONLY'] == 'from-site'
    assert server.api('GET', '/api/sites?name=nosuch')[1] == {'sites': []}
    show = make_job('/bin/sh -c "echo $SITE_ONLY $BOTH"', env={'BOTH': 'from-job'})
    uuids = clients.submit([show, show, show])
    clients.run_pilot('--site', 'testsite', '--wait', '5')     # no --cycles: the site's 2
    done = [u for u in uuids if server.job(u)['state'] == 'finished']
    assert len(done) == 2
    assert (clients.joblog / (done[0] + '.out')).read_text() == 'from-site from-job\n'
    assert 'cycles 2, period 0 s, beat 7 s' in clients.pilot_logs()
    clients.run_pilot('--site', 'testsite', '--cycles', '1', '--wait', '5')
    assert all(server.job(u)['state'] == 'finished' for u in uuids)
    assert server.api('GET', '/api/pilots?state=idle')[1]['pilots'] == []


def test_define_site_errors(clients, tmp_path):
    bad = tmp_path / 'bad.json'
    bad.write_text('{"name": "x", "pilotcycles": "many"}')
    assert 'pilotcycles' not in clients.run('pilot', '--define-site', str(bad), check=4).stderr
    bad.write_text('{"name": "x", "pilotbeat": "-1"}')
    assert 'beat must be between' in clients.run('pilot', '--define-site', str(bad), check=1).stderr
    bad.write_text("{\"name\": \"x\", \"env\": \"{'A': 'b'}\"}")       # the original's repr
    assert json.loads(clients.run('pilot', '--define-site', str(bad), check=0).stdout)['env'] == {
        'A': 'b'}


def test_service_messages(server):
    for name, message in (('purge', 'deleted 3 pilots'), ('inputsize', '7G'), ('purge', 'none')):
        status, reply = server.api('POST', '/api/services', {'name': name, 'message': message})
        assert status == 200 and reply['service']['name'] == name
    status, reply = server.api('GET', '/api/services?name=purge')
    assert [s['message'] for s in reply['services']] == ['none', 'deleted 3 pilots']
    assert len(server.api('GET', '/api/services')[1]['services']) == 3
    assert server.api('POST', '/api/services', {'message': 'x'})[0] == 400


def test_dashboard_shows_caps_and_service_messages(server):
    server.api('POST', '/api/jobtypes', {'name': 'evdisp', 'cap': 2})
    server.api('POST', '/api/services', {'name': 'inputsize', 'message': '<7G>'})
    page = urllib.request.urlopen(server.url, timeout=30).read().decode()
    assert 'evdisp' in page and 'inputsize' in page and '&lt;7G&gt;' in page
