#!/usr/bin/env python3
"""p3s workflow client: DAG templates (GraphML) and the workflows made from them.

usage:
  python p3s_workflow.py -g DAG.graphml [-n NAME] [-D TEXT] [--replace]   register a DAG
  python p3s_workflow.py -a DAG [-n NAME] [-s template|defined] [-f FILEINFO] [-j JOBINFO]
                         [-D TEXT] [--deadline S]                  make a workflow (prints uuid)
  python p3s_workflow.py -m -u UUID -s defined                     start a template workflow
  python p3s_workflow.py --list [-w workflow|dag] [-s STATE[,STATE]] [--limit N]
  python p3s_workflow.py --show UUID                               a workflow, its jobs and data
  python p3s_workflow.py --wait UUID[,UUID...]   follow workflows until they end (5: not finished)
  python p3s_workflow.py --cancel -u UUID[,UUID...]   stop workflows, keeping their history
  python p3s_workflow.py --retry -u UUID[,UUID...]    run the unfinished jobs of failed or
                                                      cancelled workflows again
  python p3s_workflow.py -G DAG                                    print a DAG's GraphML
  python p3s_workflow.py -d -w dag -n NAME[,NAME...]
  python p3s_workflow.py -d -w workflow -u UUID[,UUID...] [--force]
Add --json for machine-readable output. The server is --server or P3S_SERVER
(default http://127.0.0.1:8080/); the token, when the server needs one, is read from
--token-file FILE or the file P3S_TOKEN_FILE names, else from P3S_TOKEN (never give it
on a command line: ps shows command lines to every user). A 503 (the server's database
is busy) is asked again after the wait the server names.

A DAG is named after its file unless -n is given; an existing name is refused without
--replace. A new workflow is named after its DAG unless -n is given, and is a `template` until
defined (-s defined, now or later with -m). -f names the files of the workflow's edges:
`sticky` (the DAG's names), `inherit:NAME`, or JSON {"source:target": {"name", "dirpath",
"comment"}} inline or in a .json file; by default each file is <uuid><ext>. -j overrides
vertices: JSON {"vertex": {"payload", "env", "priority", "timelimit"}} inline or in a .json
file (env is merged into the vertex's env). See docs/workflows.md.

Exit codes (shared by every p3s client):
    0  success                        3  the server could not be reached or answered nonsense
    1  the server refused a request   4  a local file is missing or invalid
    2  bad command line               5  --wait: a workflow ended without finishing
  130  interrupted (Ctrl-C)
This file uses the Python standard library only: copy it alone onto any node.
"""
import argparse
import getpass
import http.client
import json
import os
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from datetime import datetime

PROG = 'p3s_workflow'                # the name in every message
DEFAULT_SERVER = 'http://127.0.0.1:8080/'
HTTP_TIMEOUT = 60.0
TOKEN_VARIABLES = ('P3S_TOKEN',)   # the token, from the first that is set
WORKFLOW_COLUMNS = ('uuid', 'state', 'name', 'dag', 'ndone', 'nvertices', 'ran', 'created_at')
DAG_COLUMNS = ('name', 'nvertices', 'nedges', 'root', 'user', 'created_at')
JOB_COLUMNS = ('uuid', 'name', 'state', 'jobtype', 'errcode', 'attempt', 'ran')
WORKFLOW_ENDED = ('finished', 'failed', 'cancelled')
POLL = (0.5, 1, 2, 3, 5)     # seconds between looks at what --wait follows
DATA_COLUMNS = ('state', 'source', 'target', 'datatag', 'dirpath', 'name')


# ---------------------------------------------------------------------------------------------
# The client skeleton: the same text in every p3s client (tests/test_clients.py compares them),
# so that each file still works when copied alone onto a node.
# ---------------------------------------------------------------------------------------------

EXIT_OK, EXIT_REFUSED, EXIT_USAGE, EXIT_UNREACHABLE, EXIT_INPUT = 0, 1, 2, 3, 4
EXIT_UNFINISHED = 5                                # what --wait followed ended, but not finished
EXIT_INTERRUPTED, EXIT_BROKEN_PIPE = 130, 141      # what a shell reports for SIGINT and SIGPIPE
EXIT_CODES = ('Exit codes: 0 ok, 1 refused by the server, 2 bad command line, 3 server '
              'unreachable, 4 bad local file, 5 waited for a job or workflow that did not '
              'finish, 130 interrupted.')
# A proxy in front of a server that is away for now, or a server stopping or in trouble: the
# same request may succeed later, even if the answer is not p3s's JSON.
GATEWAY_ERRORS = (500, 502, 503, 504)
RETRY_AFTER_MAX = 30.0  # seconds: the longest Retry-After a client waits for
KEEP_ALIVE = 30.0       # seconds a connection stays in use between two requests (the server: 75)
CONNECTIONS = {}        # (scheme, host:port) -> (the connection kept for it, when last used)
PROXIED = {}            # (scheme, host:port) -> whether a proxy stands between
ANSWERED = {}           # a list of servers -> the index of the one that answered last
CONNECT_TIMEOUT = 5.0   # seconds: a server that does not accept a connection by then is away


class P3SError(Exception):
    """A failure with a one-line message; `code` is the exit code it leads to. `transient`:
    the same request may succeed later (the server is away or restarting), so it may be
    retried; any other failure will not go away by asking again. `status`: the HTTP status
    of a refusal; `retry_after`: the seconds a p3s server asked to wait before asking again
    (a 503: its database could not take the request, and nothing was changed)."""

    def __init__(self, message, code=EXIT_REFUSED, transient=False, status=None,
                 retry_after=None):
        super().__init__(message)
        self.code = code
        self.transient = transient
        self.status = status
        self.retry_after = retry_after


class Parser(argparse.ArgumentParser):
    """argparse with the one-line errors of every other failure (the usage is one -h away)."""

    def error(self, message):
        self.exit(EXIT_USAGE, '%s: error: %s (see %s -h)\n' % (PROG, message, self.prog))


def server_url(text):
    """-S/--server and P3S_SERVER: a URL, or HOST:PORT for plain http; or several of them,
    comma-separated, for servers that share one database (any of them will do)."""
    return ','.join(one_server_url(one) for one in text.split(','))


def one_server_url(text):
    url = text.strip() if '://' in text else 'http://' + text.strip()
    parts = urllib.parse.urlsplit(url)
    try:
        parts.port
    except ValueError:
        parts = None
    if not parts or parts.scheme not in ('http', 'https') or not parts.hostname:
        raise argparse.ArgumentTypeError('%r is not a server URL; give http://HOST:PORT/ or '
                                         'HOST:PORT' % text)
    return url


def call(server, method, path, body=None, timeout=HTTP_TIMEOUT, token=None):
    """One JSON request to the server. A p3s server that answers 503 with a Retry-After
    changed nothing: the request is sent again after that wait, as long as it fits within
    `timeout`."""
    give_up = time.monotonic() + timeout
    while True:
        try:
            return call_any(server, method, path, body, timeout, token)
        except P3SError as e:
            if e.retry_after is None or time.monotonic() + e.retry_after >= give_up:
                raise
            time.sleep(e.retry_after)
            timeout = max(give_up - time.monotonic(), 0.1)


def call_any(servers, method, path, body, timeout, token):
    """The request sent to one of several servers (a comma-separated list): the one that
    answered last, else the next in the list, each at most once. They share one database, so
    a request that may have reached one that then fell silent is safe to send to another:
    every request a client repeats is one the server recognises when it comes again."""
    urls = servers.split(',')
    first = ANSWERED.get(servers, 0)
    for n in range(len(urls)):
        at = (first + n) % len(urls)
        try:
            answer = call_once(urls[at], method, path, body, timeout, token)
        except P3SError as e:
            if not e.transient or n == len(urls) - 1:
                raise
            continue
        ANSWERED[servers] = at
        return answer


def call_once(server, method, path, body, timeout, token):
    url = server.rstrip('/') + path
    headers = {'Content-Type': 'application/json', 'Accept': 'application/json'}
    token = token or environment_token(TOKEN_VARIABLES)
    if token:
        headers['Authorization'] = 'Bearer ' + token
    data = None if body is None else json.dumps(body).encode()
    try:
        status, reason, answer_headers, raw = send(url, method, data, headers, timeout)
    except (OSError, http.client.HTTPException) as e:
        reason = getattr(e, 'reason', None) or e
        raise P3SError('cannot reach the server at %s: %s' % (server, reason),
                       EXIT_UNREACHABLE, transient=True) from None
    if status >= 400:
        raise refusal(server, status, reason, answer_headers, raw)
    try:
        return json.loads(raw.decode() or '{}')
    except ValueError:
        raise P3SError('%s answered HTTP %d with no JSON: is it a p3s server?'
                       % (server, status), EXIT_UNREACHABLE) from None


def send(url, method, data, headers, timeout):
    """(status, reason, headers, body) of one request, on the connection kept for its server:
    a pilot asks many times, and a new connection for each would cost both sides. Through a
    proxy (http_proxy and the like), urllib makes each request, as it knows proxies. The only
    code that touches the network."""
    parts = urllib.parse.urlsplit(url)
    key = (parts.scheme, parts.netloc)
    if key not in PROXIED:
        PROXIED[key] = (parts.scheme in urllib.request.getproxies()
                        and not urllib.request.proxy_bypass(parts.hostname))
    if PROXIED[key]:
        return send_by_urllib(url, method, data, headers, timeout)
    conn, used = CONNECTIONS.pop(key, (None, 0.0))
    if conn is not None and time.monotonic() - used > KEEP_ALIVE:
        conn.close()
        conn = None
    if conn is None:
        kind = http.client.HTTPSConnection if parts.scheme == 'https' else \
            http.client.HTTPConnection
        conn = kind(parts.hostname, parts.port, timeout=min(timeout, CONNECT_TIMEOUT))
    try:
        if conn.sock is None:
            conn.connect()
        conn.timeout = timeout
        conn.sock.settimeout(timeout)
        conn.request(method, parts.path + ('?' + parts.query if parts.query else ''), data,
                     headers)
        reply = conn.getresponse()
        raw = reply.read()
    except BaseException:
        conn.close()
        raise
    if reply.will_close:
        conn.close()
    else:
        CONNECTIONS[key] = (conn, time.monotonic())
    return reply.status, reply.reason, reply.headers, raw


def send_by_urllib(url, method, data, headers, timeout):
    req = urllib.request.Request(url, data=data, headers=headers, method=method)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as reply:
            return reply.status, reply.reason, reply.headers, reply.read()
    except urllib.error.HTTPError as e:
        return e.code, e.reason, e.headers, e.read()


def environment_token(names):
    """The token of the first of these variables that is set: NAME_FILE names a file holding
    it (read at each request, so a token changed in its file is used at once), NAME holds it.
    Neither is seen on a command line, as a token given there would be (ps shows it)."""
    for name in names:
        if os.environ.get(name + '_FILE'):
            return read_token(os.environ[name + '_FILE'])
        if os.environ.get(name):
            return os.environ[name]
    return None


def read_token(path):
    try:
        with open(path) as f:
            token = f.read().strip()
    except (OSError, UnicodeDecodeError) as e:
        raise P3SError('cannot read the token file %s: %s'
                       % (path, getattr(e, 'strerror', None) or e), EXIT_INPUT) from None
    if not token or '\n' in token:
        raise P3SError('the token file %s must hold one line, the token' % path, EXIT_INPUT)
    return token


def token_file(path):
    """--token-file FILE: the file must hold the token now; it is read again at each request,
    in place of the token variables."""
    try:
        read_token(path)
    except P3SError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    os.environ[TOKEN_VARIABLES[0] + '_FILE'] = path
    return path


def refusal(server, status, reason, headers, raw):
    """The error for an HTTP error reply: the server's one-line reason, or the suspicion that
    what answered is not a p3s server (every p3s error is JSON with an `error` field)."""
    try:
        why = json.loads(raw.decode())['error']
    except Exception:
        return P3SError('%s answered HTTP %d %s: is it a p3s server?' % (server, status, reason),
                        EXIT_UNREACHABLE, transient=status in GATEWAY_ERRORS, status=status)
    if status == 401:
        why += ' (the token is read from %s)' % ' or '.join(
            ['--token-file'] + [v for name in TOKEN_VARIABLES for v in (name + '_FILE', name)])
    failed = status >= 500
    return P3SError('server: %s (HTTP %d)' % (why, status),
                    EXIT_UNREACHABLE if failed else EXIT_REFUSED, transient=failed,
                    status=status, retry_after=retry_after(status, headers))


def retry_after(status, headers):
    """The seconds a p3s server's 503 asks to wait (at most RETRY_AFTER_MAX), or None."""
    try:
        seconds = float(headers.get('Retry-After', ''))
    except ValueError:
        return None
    if status != 503 or not 0 <= seconds <= RETRY_AFTER_MAX:
        return None
    return seconds


def quote(text):
    return urllib.parse.quote(text, safe='')


def user_name():
    try:
        return getpass.getuser()
    except Exception:
        return ''


def run_command(command, args):
    """Run one command with the endings every client shares: a one-line error and its exit
    code, a quiet exit on Ctrl-C, and silence when the reader of the output goes away."""
    try:
        return command(args)
    except P3SError as e:
        print('%s: error: %s' % (PROG, e), file=sys.stderr)
        return e.code
    except KeyboardInterrupt:
        print('%s: interrupted' % PROG, file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # Python flushes stdout once more at exit; aim that flush at /dev/null.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_BROKEN_PIPE


# ---------------------------------------------------------------------------------------------
# Local files
# ---------------------------------------------------------------------------------------------


def read_text(path):
    try:
        with open(path) as f:
            return f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise P3SError('cannot read %s: %s' % (path, getattr(e, 'strerror', None) or e),
                       EXIT_INPUT) from None


def json_option(value, option, words=()):
    """An option that takes JSON text or a file holding it, as the original took them: text
    that starts like JSON is JSON; else a value naming a file (or containing `.json`) is read.
    One of `words` (sticky, inherit:NAME) is passed on as it is."""
    if value is None:
        return None
    if value in words or any(value.startswith(w) for w in words if w.endswith(':')):
        return value
    inline = value.lstrip()[:1] in ('{', '[') or not ('.json' in value or os.path.isfile(value))
    if inline:
        try:
            return json.loads(value)
        except ValueError as e:
            raise P3SError('%s takes %sJSON text or a JSON file: %s' % (
                option, 'sticky, inherit:NAME, ' if words else '', e), EXIT_USAGE) from None
    try:
        return json.loads(read_text(value))
    except ValueError as e:
        raise P3SError('%s is not valid JSON: %s' % (value, e), EXIT_INPUT) from None


def print_table(rows, columns):
    cells = [[str('' if r.get(c) is None else r.get(c)) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    for row in [list(columns)] + cells:
        print('  '.join(v.ljust(w) for v, w in zip(row, widths)).rstrip())


# ---------------------------------------------------------------------------------------------
# Commands
# ---------------------------------------------------------------------------------------------


def add_dag(args):
    """-g: the GraphML goes to the server as it is (the server parses it)."""
    name = args.name or os.path.splitext(os.path.basename(args.graphml))[0]
    body = {'name': name, 'graphml': read_text(args.graphml), 'user': user_name(),
            'description': args.description or '', 'replace': args.replace}
    dag = call(args.server, 'POST', '/api/dags', body)
    if args.json:
        print(json.dumps(dag, indent=1))
    else:
        print('%s: %s, %s' % (dag['name'], count_of(dag['nvertices'], 'vertex', 'vertices'),
                              count_of(dag['nedges'], 'edge')))
    return EXIT_OK


def add_workflow(args):
    body = {'dag': args.add, 'name': args.name or '', 'user': user_name(),
            'description': args.description or '', 'state': args.state or 'template',
            'fileinfo': json_option(args.fileinfo, '-f', ('sticky', 'inherit:')),
            'jobinfo': json_option(args.jobinfo, '-j')}
    if args.deadline is not None:
        body['deadline'] = args.deadline
    wf = call(args.server, 'POST', '/api/workflows', body)
    print(json.dumps(wf, indent=1) if args.json else wf['uuid'])
    return EXIT_OK


def define_workflow(args):
    if args.state != 'defined':
        raise P3SError('-m needs -s defined (a workflow moves from template to defined)',
                       EXIT_USAGE)
    for wf_uuid in split(args.uuids):
        wf = call(args.server, 'POST', '/api/workflows/%s/state' % quote(wf_uuid),
                  {'state': 'defined'})
        print(json.dumps(wf, indent=1) if args.json else '%s %s' % (wf['uuid'], wf['state']))
    return EXIT_OK


def list_things(args):
    query = {k: v for k, v in (('state', args.state), ('limit', args.limit)) if v}
    key, columns = ('dags', DAG_COLUMNS) if args.what == 'dag' else ('workflows', WORKFLOW_COLUMNS)
    rows = call(args.server, 'GET', '/api/%s?%s' % (key, urllib.parse.urlencode(query)))[key]
    if args.json:
        print(json.dumps({key: rows}, indent=1))
    else:
        print_table([dict(r, ran=ran(r)) for r in rows], columns)
    return EXIT_OK


def show_workflow(args):
    wf = call(args.server, 'GET', '/api/workflows/%s' % quote(args.show))
    if args.json:
        print(json.dumps(wf, indent=1))
        return EXIT_OK
    for key, value in dict(wf, ran=ran(wf)).items():
        if key not in ('jobs', 'data'):
            print('%-12s %s' % (key + ':', '' if value is None else value))
    print('\njobs:')
    print_table([dict(j, ran=ran(j)) for j in wf['jobs']], JOB_COLUMNS)
    print('\ndata:')
    print_table(wf['data'], DATA_COLUMNS)
    return EXIT_OK


def wait_workflows(args):
    """--wait: follow workflows until each has ended, saying each change of it and of its
    jobs; fail unless all finished."""
    flows = follow(args, ['/api/workflows/%s' % quote(u) for u in split(args.wait)],
                   lambda wf: wf['state'] in WORKFLOW_ENDED, workflow_changes)
    if args.json:
        print(json.dumps({'workflows': flows}, indent=1))
    unfinished = [wf for wf in flows if wf['state'] != 'finished']
    if unfinished:
        raise P3SError('%d of %s did not finish: %s' % (
            len(unfinished), count_of(len(flows), 'workflow'), '; '.join('%s %s (%s)' % (wf['uuid'], wf['state'],
                                                                  wf['comment'])
                                                   for wf in unfinished)), EXIT_UNFINISHED)
    return EXIT_OK


def workflow_changes(before, wf):
    """The lines to print when a followed workflow changed: its state, and its jobs' states."""
    lines = []
    if before is None or (before['state'], before['comment']) != (wf['state'], wf['comment']):
        lines.append('workflow %s %s%s' % (wf['uuid'], wf['state'],
                                           ': ' + wf['comment'] if wf['comment'] else ''))
    was = {j['uuid']: j['state'] for j in (before or {}).get('jobs', [])}
    for job in wf['jobs']:
        if was.get(job['uuid'], 'template') != job['state']:
            lines.append('  %s %s (job %s%s)' % (job['name'], job['state'], job['uuid'],
                                                 ', exit %s' % job['errcode']
                                                 if job['errcode'] else ''))
    return lines


def follow(args, paths, ended, changes):
    """Look at each object (an API path) until all have ended, printing with the time the
    lines `changes(before, now)` gives (nothing with --json). A server away for a while is
    waited out. Returns the objects as they ended."""
    last = {}
    for attempt in range(10 ** 9):
        for path in [p for p in paths if p not in last or not ended(last[p])]:
            try:
                obj = call(args.server, 'GET', path)
            except P3SError as e:
                if not e.transient:
                    raise
                print('%s: warning: %s; looking again' % (PROG, e), file=sys.stderr, flush=True)
                continue
            for line in [] if args.json else changes(last.get(path), obj):
                print('%s %s' % (time.strftime('%H:%M:%S'), line), flush=True)
            last[path] = obj
        if len(last) == len(paths) and all(ended(obj) for obj in last.values()):
            return [last[p] for p in paths]
        time.sleep(POLL[min(attempt, len(POLL) - 1)])


def ran(row):
    """How long a job or workflow ran, as text ('' until it has started and stopped)."""
    if not row.get('started_at') or not row.get('stopped_at'):
        return ''
    return duration((datetime.fromisoformat(row['stopped_at'])
                     - datetime.fromisoformat(row['started_at'])).total_seconds())


def duration(seconds):
    if seconds < 100:
        return '%.1f s' % seconds
    if seconds < 6000:
        return '%.1f min' % (seconds / 60)
    return '%.1f h' % (seconds / 3600)



def cancel_workflows(args):
    return for_each(args, split(args.uuids), 'POST', '/api/workflows/%s/cancel', 'cancelled',
                    'workflows', {})


def retry_workflows(args):
    return for_each(args, split(args.uuids), 'POST', '/api/workflows/%s/retry', 'retried',
                    'workflows', {})


def get_dag(args):
    dag = call(args.server, 'GET', '/api/dags/%s' % quote(args.getdag))
    if args.json:
        print(json.dumps(dag, indent=1))
    else:
        sys.stdout.write(dag['graphml'] if dag['graphml'].endswith('\n') else dag['graphml'] + '\n')
    return EXIT_OK


def count_of(n, one, many=None):
    """'1 job', '2 jobs'; '1 vertex', '3 vertices'."""
    return '%d %s' % (n, one if n == 1 else many or one + 's')


def split(csv):
    return [x for x in (csv or '').split(',') if x]


def delete(args):
    """-d: each DAG (-n) or workflow (-u); reports each; fails if any failed."""
    if args.what == 'dag':
        targets, path = split(args.name), '/api/dags/%s'
    else:
        targets, path = split(args.uuids), '/api/workflows/%s' + ('?force=1' if args.force else '')
    if not targets:
        raise P3SError('-d -w dag needs -n NAME; -d -w workflow needs -u UUID', EXIT_USAGE)
    return for_each(args, targets, 'DELETE', path, 'deleted', 'deleted')


def for_each(args, targets, method, path, done, key, body=None):
    """One request for each target (`path` % target), one line for each (`done`, or the
    error); --json prints {key: [answers]}. Returns the exit code of the worst failure."""
    code, results = EXIT_OK, []
    for target in targets:
        try:
            results.append(call(args.server, method, path % quote(target), body))
            if not args.json:
                print('%s %s' % (target, done))
        except P3SError as e:
            print('%s: error: %s: %s' % (PROG, target, e), file=sys.stderr)
            code = max(code, e.code)
    if args.json:
        print(json.dumps({key: results}, indent=1))
    return code


def parse_args(argv):
    ap = Parser(prog='p3s_workflow.py', epilog=EXIT_CODES,
                description='Register DAGs and run workflows made from them.')
    do = ap.add_mutually_exclusive_group(required=True)
    do.add_argument('-g', '--graphml', metavar='FILE', help='register the DAG in a GraphML file')
    do.add_argument('-a', '--add', metavar='DAG', help='make a workflow from a DAG')
    do.add_argument('-m', '--modify', action='store_true', help='define the workflows of -u')
    do.add_argument('--list', action='store_true', help='list workflows (or DAGs with -w dag)')
    do.add_argument('--show', metavar='UUID', help='show a workflow with its jobs and data')
    do.add_argument('--wait', metavar='UUID[,UUID]', help='follow workflows until they end; '
                    'exit 0 if all finished, 5 if not')
    do.add_argument('--cancel', action='store_true', help='stop the workflows of -u, keeping '
                    'their history (queued jobs cancelled, running ones killed)')
    do.add_argument('--retry', action='store_true', help='run again the jobs that did not '
                    'finish in the failed or cancelled workflows of -u')
    do.add_argument('-G', '--getdag', metavar='DAG', help="print a DAG's GraphML")
    do.add_argument('-d', '--delete', action='store_true',
                    help='delete DAGs (-n) or workflows (-u)')
    ap.add_argument('-n', '--name', help='name of the new DAG or workflow; DAGs to delete')
    ap.add_argument('-D', '--description', help='description of the new DAG or workflow')
    ap.add_argument('-s', '--state', help='template or defined (-a, -m); state filter (--list)')
    ap.add_argument('-f', '--fileinfo', metavar='POLICY',
                    help='file names: sticky, inherit:NAME, or JSON (inline or a .json file)')
    ap.add_argument('-j', '--jobinfo', metavar='JSON',
                    help='vertex overrides: JSON (inline or a .json file)')
    ap.add_argument('-u', '--uuid', dest='uuids', metavar='UUID[,UUID]',
                    help='workflows (-m, -d, --cancel, --retry)')
    ap.add_argument('--deadline', type=int, metavar='S', help="-a: the workflow's jobs must be "
                    'dispatched within S seconds of its definition, or go stale')
    ap.add_argument('-w', '--what', choices=('workflow', 'dag'), default='workflow',
                    help='what -d deletes and --list lists (default workflow)')
    ap.add_argument('--replace', action='store_true', help='-g: replace a DAG of the same name')
    ap.add_argument('--force', action='store_true', help='-d: delete workflows with running jobs')
    ap.add_argument('--limit', type=int, help='at most this many workflows (--list)')
    ap.add_argument('--json', action='store_true', help='machine-readable output')
    ap.add_argument('-S', '--server', type=server_url,
                    default=os.environ.get('P3S_SERVER') or DEFAULT_SERVER,
                    help='server URL or HOST:PORT; several, comma-separated, are tried in '
                    'turn (P3S_SERVER; default %s)' % DEFAULT_SERVER)
    ap.add_argument('--token-file', type=token_file, metavar='FILE',
                    help='read the token from FILE (else P3S_TOKEN_FILE names the file, or '
                    'P3S_TOKEN holds the token)')
    args = ap.parse_args(argv)
    if args.modify and not args.uuids:
        ap.error('-m needs -u UUID and -s defined')
    if (args.cancel or args.retry) and not args.uuids:
        ap.error('--cancel and --retry need -u UUID[,UUID...]')
    if args.state and args.add and args.state not in ('template', 'defined'):
        ap.error('-a -s takes template or defined')
    return args


def main(argv=None):
    args = parse_args(argv)
    commands = ((args.graphml, add_dag), (args.add, add_workflow), (args.modify, define_workflow),
                (args.list, list_things), (args.show, show_workflow), (args.getdag, get_dag),
                (args.delete, delete), (args.wait, wait_workflows),
                (args.cancel, cancel_workflows), (args.retry, retry_workflows))
    return run_command(next(run for given, run in commands if given), args)


if __name__ == '__main__':
    sys.exit(main())
