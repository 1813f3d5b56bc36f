"""The monitor in a real browser: Debian's chromium, driven by Playwright's Python package.

Skipped when /usr/bin/chromium or playwright is missing; .ci/run installs chromium. Screenshots
go to a temporary directory, or to $P3S_SCREENSHOTS (e.g. docs/screenshots) when it is set.
"""
import os
import re

import pytest

from conftest import Clients, Server, database_connection, make_job
from synthetic import fill

CHROMIUM = '/usr/bin/chromium'
CHROMIUM_ARGS = ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
                 '--disable-background-networking', '--disable-component-update', '--disable-sync']
sync_api = pytest.importorskip('playwright.sync_api')
pytestmark = pytest.mark.skipif(not os.path.exists(CHROMIUM), reason='no ' + CHROMIUM)


@pytest.fixture(scope='module')
def browser():
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={'width': 1400, 'height': 900})
    pg = context.new_page()
    pg.set_default_timeout(20000)
    yield pg
    context.close()


@pytest.fixture
def busy_server(tmp_path):
    """A server on a database with a day of synthetic history (the real jobs of a test get a
    higher priority than the synthetic queue)."""
    srv = Server(tmp_path)
    fill(srv.db, 5000, pilots=12)
    srv.start()
    yield srv
    srv.stop()


@pytest.fixture
def busy_clients(tmp_path, busy_server):
    c = Clients(tmp_path, busy_server)
    yield c
    c.cleanup()


def shots_dir(tmp_path):
    path = os.environ.get('P3S_SCREENSHOTS') or str(tmp_path / 'screenshots')
    os.makedirs(path, exist_ok=True)
    return path


def test_from_a_failed_count_to_the_stderr_of_the_job(busy_server, busy_clients, page, tmp_path):
    payload = tmp_path / 'crash.sh'
    payload.write_text('#!/bin/sh\necho "reading run 42"\necho "ERROR: <calibration> missing" >&2\n'
                       'exit 3\n')
    payload.chmod(0o755)
    [job] = busy_clients.submit([make_job(str(payload), name='reco-run42', jobtype='reco', priority='99')])
    busy_clients.run_pilot()
    page.goto(busy_server.url)
    assert page.title() == 'Dashboard · p3s'
    assert page.locator('.checklist tr').count() >= 3
    assert page.locator('svg.chart rect.finished').count() == 60
    page.click('a[data-state="failed"]')
    assert re.search(r'/monitor/jobs\?state=failed$', page.url)
    page.click('a[href="/monitor/jobs/%s"]' % job)
    assert page.inner_text('#stderr').strip() == 'ERROR: <calibration> missing'
    assert 'reading run 42' in page.inner_text('#stdout')
    assert page.locator('text=reco-run42').count() >= 1


def test_auto_refresh_reloads_and_is_kept_while_navigating(busy_server, page):
    page.goto(busy_server.url)
    page.click('header .refresh a:text-is("5 s")')
    assert page.url.endswith('/?refresh=5')
    with page.expect_navigation(timeout=20000):        # the meta refresh reloads the page
        pass
    assert page.url.endswith('/?refresh=5')
    page.click('header nav a:text-is("Jobs")')
    assert page.url.endswith('/monitor/jobs?refresh=5')
    assert page.locator('meta[http-equiv="refresh"]').get_attribute('content') == '5'
    page.click('header .refresh a:text-is("never")')
    assert page.locator('meta[http-equiv="refresh"]').count() == 0


def test_screenshots_on_a_laptop_and_a_wall_display(busy_server, busy_clients, browser, tmp_path):
    busy_clients.submit([make_job('/bin/true', jobtype='reco', priority='99') for _ in range(3)])
    busy_clients.run_pilot('--cycles', '3')
    out = shots_dir(tmp_path)
    for name, size in (('dashboard', (1400, 900)), ('dashboard-wall', (2560, 1440))):
        context = browser.new_context(viewport={'width': size[0], 'height': size[1]})
        pg = context.new_page()
        pg.goto(busy_server.url)
        # Nothing overflows the window sideways: readable without scrolling.
        assert pg.evaluate('document.documentElement.scrollWidth') <= size[0]
        pg.screenshot(path=os.path.join(out, name + '.png'), full_page=True)
        if name == 'dashboard':
            pg.goto(busy_server.url + 'monitor/jobs?state=failed,finished&perpage=25')
            pg.screenshot(path=os.path.join(out, 'jobs.png'), full_page=True)
            pg.click('table.list tbody tr:first-child td:first-child a')
            pg.screenshot(path=os.path.join(out, 'job.png'), full_page=True)
        context.close()
    assert os.path.getsize(os.path.join(out, 'dashboard.png')) > 10000


def test_a_workflow_page_draws_its_graph(server, clients, page, tmp_path):
    """A real workflow run by a real pilot: A feeds B and C, B passes two files to D (parallel
    edges), C fails, so D and the final noop are cancelled. From the dashboard's count of failed
    workflows to its page, whose graph links each node to its job."""
    from test_workflows import NOOP, Flows, graphml, shell_job, txt
    flows = Flows(clients, server, tmp_path)
    d = str(flows.datadir)
    nodes = {'generate': shell_job('echo hello > $SEED', priority=9),
             'upper': shell_job('tr a-z A-Z < $SEED > $UPPER; echo b > $NOTE', priority=5),
             'calibrate': shell_job('echo "no <calibration>" >&2; exit 3', priority=1),
             'merge': shell_job('cat $UPPER $NOTE $CALIB > $RESULT'),
             'publish': NOOP}
    edges = [('generate', 'upper', txt('seed.txt', 'SEED', d)),
             ('generate', 'calibrate', txt('seed.txt', 'SEED', d)),
             ('upper', 'merge', txt('upper.txt', 'UPPER', d)),
             ('upper', 'merge', txt('note.txt', 'NOTE', d)),
             ('calibrate', 'merge', txt('calib.txt', 'CALIB', d)),
             ('merge', 'publish', txt('result.txt', 'RESULT', d)),
             ('generate', 'publish', txt('log.txt', 'LOG', d))]
    flows.register_txt()
    flows.dag(graphml(nodes, edges), name='calibration')
    wf_uuid = flows.add('calibration', '-n', 'run 42 calibration', '-f', 'sticky', '-s',
                        'defined')
    clients.run_pilot('--cycles', '3', '--wait', '5')
    jobs = flows.jobs(flows.wait(wf_uuid, 'failed')['uuid'])
    page.goto(server.url)
    page.click('a[data-workflows="failed"]')
    page.click('a[href="/monitor/workflows/%s"]' % wf_uuid)
    assert page.title() == 'Workflow run 42 calibration · p3s'
    graph = page.locator('svg.graph')
    assert graph.locator('a.node').count() == 5 and graph.locator('g.edge').count() == 7
    assert graph.locator('rect.g-failed').count() == 1
    assert graph.locator('rect.g-cancelled').count() == 2
    assert graph.locator('text:text-is("NOTE")').count() == 1
    box = graph.bounding_box()
    assert box['width'] > 300 and box['height'] > 300
    page.set_viewport_size({'width': 1400, 'height': 900})
    page.screenshot(path=os.path.join(shots_dir(tmp_path), 'workflow.png'), full_page=True)
    page.click('svg.graph a.node[href="/monitor/jobs/%s"]' % jobs['calibrate']['uuid'])
    assert page.url.endswith('/monitor/jobs/' + jobs['calibrate']['uuid'])
    assert page.inner_text('#stderr').strip() == 'no <calibration>'


LISTINGS = ('/monitor/jobs', '/monitor/pilots', '/monitor/workflows', '/monitor/dags',
            '/monitor/data', '/monitor/datatypes', '/monitor/sites', '/monitor/services')


def test_every_listing_fits_a_1400_px_window_with_long_values(tmp_path, browser):
    """Long names, hosts, paths and comments in every column: each listing still fits the
    window and its panel (a long value is clipped, all of it on hover), on a laptop and on a
    wall display."""
    from conftest import api
    from synthetic import fill_workflows
    srv = Server(tmp_path)
    fill(srv.db, 300, pilots=12)
    fill_workflows(srv.db, 12)
    long = 'np04_raw_run005077_0001_dl1_evdisplay_reconstruction_'
    db = database_connection(srv.db)
    db.execute('UPDATE jobs SET name = :a, "user" = :b, jobtype = :c, site = :d, host = :e, '
               'workflow = (SELECT uuid FROM workflows LIMIT 1)',
               dict(a=long, b='shifter_' + long, c='evdisp_' + long, d='np04-' + long,
                    e='worker-' + long))
    db.execute("UPDATE workflows SET name = :a, \"user\" = :b, dag = :c, state = 'failed', "
               "comment = :d", dict(a=long, b='shifter_' + long, c='dag_' + long,
                                    d='job D (%s) ended failed' % long))
    db.execute('UPDATE pilots SET host = :a, site = :b, extra = :c',
               dict(a='worker-' + long, b='np04-' + long, c='slurm:' + long))
    db.execute('UPDATE data SET name = :a, dirpath = :b, comment = :c, datatag = :d',
               dict(a=long + '.root', b='/eos/experiment/' + long, c='injected ' + long,
                    d='TAG_' + long))
    db.close()
    srv.start()
    try:
        api(srv.url, 'POST', '/api/sites', {'name': 'np04-' + long, 'comment': long,
                                            'env': {'DQM': long}})
        api(srv.url, 'POST', '/api/services', {'name': 'purge-' + long, 'message': long * 3})
        for width in (1400, 2560):
            context = browser.new_context(viewport={'width': width, 'height': 900})
            pg = context.new_page()
            for path in LISTINGS:
                pg.goto(srv.url.rstrip('/') + path)
                assert pg.locator('table.list tbody tr').count() >= 1, path
                sideways = pg.evaluate('[document.documentElement.scrollWidth, Math.max(...[...'
                                       'document.querySelectorAll(".panel")].map(e => '
                                       'e.scrollWidth - e.clientWidth))]')
                assert sideways[0] <= width and sideways[1] <= 0, (width, path, sideways)
            context.close()
    finally:
        srv.stop()
