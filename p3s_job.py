#!/usr/bin/env python3
"""p3s job client: submit, list, show, adjust, kill and delete jobs.

usage:
  python p3s_job.py -j myjob.json [-f FILE[,FILE...]] [-N n] [-t]   submit (prints uuids)
  python p3s_job.py --list [-s STATE[,STATE]] [-T TYPE] [--user U] [--limit N]
  python p3s_job.py --show UUID            a job; a queued one says why it is not running
  python p3s_job.py --logs UUID            the tails of its stdout and stderr
  python p3s_job.py --wait UUID[,UUID...]  follow jobs until they end (exit 5 unless finished)
  python p3s_job.py -a -u UUID[,UUID...] [-s defined|dropped] [-P PRIORITY]
  python p3s_job.py --kill UUID[,UUID...]
  python p3s_job.py --retry -u UUID[,UUID...]      run ended jobs again, as new attempts
  python p3s_job.py --retry -s STATE[,STATE] [-T TYPE] [--user U] [--since S] [--limit N]
  python p3s_job.py -d -u UUID[,UUID...]
  python p3s_job.py --drop -T TYPE [--older S]      drop the queued jobs of a type
  python p3s_job.py -l [-T TYPE]                    list job types and their caps
  python p3s_job.py -l -L N|none [-T TYPE]          set a cap (no -T: every known type)
  python p3s_job.py --summary                                       the dashboard's numbers
Add --json for machine-readable output. The server is --server or P3S_SERVER
(default http://127.0.0.1:8080/); the token, when the server needs one, is read from
--token-file FILE or the file P3S_TOKEN_FILE names, else from P3S_TOKEN (never give it
on a command line: ps shows command lines to every user). A 503 (the server's database
is busy) is asked again after the wait the server names.

The job file is the original p3s format: a JSON list of objects with name, jobtype, payload,
env (an object), priority, timeout (the timelimit in seconds), deadline (seconds after
definition by which it must be dispatched, else it goes stale) and state (defined, the default,
or template); numbers may be strings. -f makes one job per input file for each job of the
list, with env.P3S_INPUT_FILE set to it; -N makes n replicas of each.

Exit codes (shared by every p3s client):
    0  success                        3  the server could not be reached or answered nonsense
    1  the server refused a request   4  a local file is missing or invalid
    2  bad command line               5  --wait: a job ended without finishing
  130  interrupted (Ctrl-C)
This file uses the Python standard library only: copy it alone onto any node.
"""
import argparse
import getpass
import http.client
import json
import os
import socket
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid as uuidlib
from datetime import datetime

PROG = 'p3s_job'                # the name in every message
DEFAULT_SERVER = 'http://127.0.0.1:8080/'
HTTP_TIMEOUT = 60.0
TOKEN_VARIABLES = ('P3S_TOKEN',)   # the token, from the first that is set
SUBMIT_ATTEMPTS = 5          # a submission is idempotent (uuids are made here), so retry it
LIST_COLUMNS = ('uuid', 'state', 'jobtype', 'priority', 'name', 'host', 'exit', 'ran',
                'defined_at')
JOB_ENDED = ('finished', 'failed', 'timelimit', 'nonstarter', 'lost', 'killed', 'stale',
             'dropped', 'cancelled')
POLL = (0.5, 1, 2, 3, 5)     # seconds between looks at what --wait follows
JOBTYPE_COLUMNS = ('name', 'cap', 'active', 'queued', 'updated_at')


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
# Reading the original job format
# ---------------------------------------------------------------------------------------------


def read_json_file(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, UnicodeDecodeError) as e:
        raise P3SError('cannot read %s: %s' % (path, getattr(e, 'strerror', None) or e),
                       EXIT_INPUT) from None
    except ValueError as e:
        raise P3SError('%s is not valid JSON: %s' % (path, e), EXIT_INPUT) from None


def read_jobs(path):
    """The jobs of a job file of the original format (a list, or one object), as the API
    takes them."""
    jobs = read_json_file(path)
    jobs = [jobs] if isinstance(jobs, dict) else jobs
    if not isinstance(jobs, list) or not jobs:
        raise P3SError('%s must hold a JSON list of jobs' % path, EXIT_INPUT)
    return [normalize(job, '%s: job %d' % (path, n)) for n, job in enumerate(jobs, 1)]


def normalize(raw, where):
    """One job of the original format as the API takes it: timeout -> timelimit, numbers from
    strings, env values as strings, user and submit host filled in. Anything else is left for
    the server to judge."""
    if not isinstance(raw, dict):
        raise P3SError('%s is not a JSON object' % where, EXIT_INPUT)
    job = dict(raw)
    if 'timeout' in job:
        if 'timelimit' in job:
            raise P3SError('%s: give timeout or timelimit, not both' % where, EXIT_INPUT)
        job['timelimit'] = job.pop('timeout')
    for key in ('timelimit', 'priority', 'deadline'):
        if isinstance(job.get(key), str):
            job[key] = whole_number(job[key], key, where)
    job['env'] = env_strings(job.get('env'), where)
    job.setdefault('user', user_name())
    job.setdefault('subhost', socket.gethostname())
    return job


def whole_number(text, key, where):
    try:
        return int(text.strip())
    except ValueError:
        raise P3SError('%s: %s must be a whole number, not %r' % (where, key, text),
                       EXIT_INPUT) from None


def env_strings(env, where):
    """A job's env as the original wrote it (an object, or an object in a JSON string), with
    every value a string."""
    if isinstance(env, str):
        try:
            env = json.loads(env)
        except ValueError:
            raise P3SError('%s: env is not a JSON object' % where, EXIT_INPUT) from None
    if not isinstance(env or {}, dict):
        raise P3SError('%s: env must be a JSON object' % where, EXIT_INPUT)
    return {k: v if isinstance(v, str) else json.dumps(v) for k, v in (env or {}).items()}


def build_jobs(templates, input_files, replicas):
    """The jobs to submit: for each template, one per input file (in order), times replicas."""
    jobs = []
    for template in templates:
        for infile in input_files or [None]:
            for _ in range(replicas):
                job = dict(template, env=dict(template['env']), uuid=str(uuidlib.uuid4()))
                if infile is not None:
                    job['env']['P3S_INPUT_FILE'] = infile
                jobs.append(job)
    return jobs


# ---------------------------------------------------------------------------------------------
# Commands
# ---------------------------------------------------------------------------------------------


def submit(args):
    templates = read_jobs(args.jobfile)
    files = [f for f in (args.files or '').split(',') if f]
    jobs = build_jobs(templates, files, args.replicas)
    if args.dry_run:
        print(json.dumps(jobs, indent=2))
        return EXIT_OK
    for attempt in range(SUBMIT_ATTEMPTS):
        try:
            uuids = call(args.server, 'POST', '/api/jobs', jobs)['uuids']
            break
        except P3SError as e:
            if not e.transient or attempt == SUBMIT_ATTEMPTS - 1:
                raise
            time.sleep(0.5 * 2 ** attempt)
    print(json.dumps({'uuids': uuids}) if args.json else '\n'.join(uuids))
    return EXIT_OK


def list_jobs(args):
    query = {k: v for k, v in (('state', args.state), ('jobtype', args.jobtype),
                               ('user', args.user), ('limit', args.limit)) if v}
    jobs = call(args.server, 'GET', '/api/jobs?' + urllib.parse.urlencode(query))['jobs']
    if args.json:
        print(json.dumps({'jobs': jobs}, indent=1))
    else:
        print_table([dict(j, exit=j['errcode'], ran=ran(j)) for j in jobs], LIST_COLUMNS)
    return EXIT_OK


def print_table(rows, columns):
    cells = [[str('' if r.get(c) is None else r.get(c)) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    for row in [list(columns)] + cells:
        print('  '.join(v.ljust(w) for v, w in zip(row, widths)).rstrip())


def show_job(args):
    job = call(args.server, 'GET', '/api/jobs/%s' % quote(args.show))
    if args.json:
        print(json.dumps(job, indent=1))
        return EXIT_OK
    waiting = job.pop('waiting')
    for key, value in dict(job, ran=ran(job)).items():
        print('%-13s %s' % (key + ':', json.dumps(value) if key == 'env'
                            else '' if value is None else value))
    if waiting:
        print('waiting:      %s, since %s' % (duration(waiting['seconds']), waiting['since']))
        for why in waiting['reasons']:
            print('  - %s' % why['text'])
    return EXIT_OK


def show_logs(args):
    """--logs: the tails of a job's stdout and stderr, as its pilot sent them at its end."""
    job = call(args.server, 'GET', '/api/jobs/%s?logs=1' % quote(args.logs))
    if args.json:
        print(json.dumps({k: job[k] for k in ('uuid', 'state', 'stdout', 'stderr')}, indent=1))
        return EXIT_OK
    for name in ('stdout', 'stderr'):
        print('==> %s of job %s (%s; its last 64 KiB) <==' % (name, job['uuid'], job['state']))
        print(job[name].rstrip('\n') if job[name] else '(empty, or not reported yet)')
    return EXIT_OK


def wait_jobs(args):
    """--wait: follow jobs until each has ended, saying each change; fail unless all finished."""
    jobs = follow(args, ['/api/jobs/%s' % quote(u) for u in split(args.wait)],
                  lambda job: job['state'] in JOB_ENDED, job_changes)
    if args.json:
        print(json.dumps({'jobs': jobs}, indent=1))
    unfinished = [j for j in jobs if j['state'] != 'finished']
    if unfinished:
        raise P3SError('%d of %s did not finish: %s' % (
            len(unfinished), count_of(len(jobs), 'job'), ', '.join('%s %s' % (j['uuid'], j['state'])
                                                  for j in unfinished)), EXIT_UNFINISHED)
    return EXIT_OK


def job_changes(old, job):
    """The line to print when a followed job changed: its state, and why it waits or how it
    ended."""
    text = '%s %s' % (job['uuid'], job['state'])
    if job.get('waiting') and job['waiting']['reasons']:
        text += ': ' + '; '.join(r['text'] for r in job['waiting']['reasons'])
    elif job['state'] in JOB_ENDED:
        text += ' (exit %s, ran %s)' % (job['errcode'], ran(job) or '-')
    return [] if old is not None and text == job_changes(None, old)[0] else [text]


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


def count_of(n, one, many=None):
    """'1 job', '2 jobs'; '1 vertex', '3 vertices'."""
    return '%d %s' % (n, one if n == 1 else many or one + 's')


def split(csv):
    return [x for x in (csv or '').split(',') if x]


def retry_jobs(args):
    """--retry: new attempts of the jobs of -u, or of those ended in the states of -s."""
    if args.uuids:
        body = {'uuids': split(args.uuids)}
    else:
        body = {k: v for k, v in (('state', args.state), ('jobtype', args.jobtype),
                                  ('user', args.user), ('limit', args.limit),
                                  ('since', args.since)) if v is not None}
    retried = call(args.server, 'POST', '/api/jobs/retry', body)['retried']
    if args.json:
        print(json.dumps({'retried': retried}, indent=1))
    else:
        for r in retried:
            print('%s retried as %s' % (r['uuid'], r['retry']))
        if not retried:
            print('no job to retry: none ended in that selection without a retry already')
    return EXIT_OK


def summary(args):
    """The monitor's dashboard as text: counts, the timeline, per-type counts, the checklist."""
    s = call(args.server, 'GET', '/api/summary')
    if args.json:
        print(json.dumps(s, indent=1))
        return EXIT_OK
    print('p3s at %s (%s, up %s s), %s' % (args.server, s['host'], s['uptime'], s['time']))
    for what in ('pilots', 'jobs', 'workflows'):
        counts = ', '.join('%s %d' % kv for kv in sorted(s.get(what, {}).items())) or 'none'
        print('%-7s %s' % (what + ':', counts))
    lat = s['latency']
    print('latency: p50 %s s, p95 %s s (defined -> started, %s started in the last hour)'
          % (seconds(lat['p50']), seconds(lat['p95']), count_of(lat['n'], 'job')))
    print('ended per minute, last 10 min: %s'
          % ' '.join(str(m['finished'] + m['other']) for m in s['throughput'][-10:]))
    print()
    print_table([dict(t, state=row) for row, t in
                 ((row, dict(zip(s['windows'], n))) for row, n in s['timeline'].items())],
                ['state'] + s['windows'])
    if s['jobtypes']:
        print()
        caps = s.get('caps') or {}
        print_table([dict(n, jobtype=t, cap=caps.get(t, '')) for t, n in s['jobtypes'].items()],
                    ['jobtype', 'defined', 'dispatched', 'running', 'finished_24h', 'failed_24h']
                    + (['cap'] if s.get('caps') is not None else []))
    print()
    for c in s['checks']:
        print('%-5s %-13s %s' % (c['status'].upper(), c['check'], c['detail']))
    return EXIT_OK


def seconds(value):
    return '-' if value is None else '%.2f' % value



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


def adjust(args):
    body = {}
    if args.state:
        body['state'] = args.state
    if args.priority is not None:
        body['priority'] = args.priority
    if not body:
        raise P3SError('-a needs -s STATE and/or -P PRIORITY', EXIT_USAGE)
    return for_each(args, split(args.uuids), 'POST', '/api/jobs/%s/adjust', 'adjusted', 'jobs',
                    body)


def drop(args):
    body = {'jobtype': args.jobtype}
    if args.older is not None:
        body['older'] = args.older
    reply = call(args.server, 'POST', '/api/jobs/drop', body)
    print(json.dumps(reply) if args.json else
          'dropped %s' % count_of(reply['dropped'], 'queued %s job' % reply['jobtype']))
    return EXIT_OK


def jobtypes(args):
    """-l: list the job types and their caps, or with -L set a cap first."""
    if args.cap is not None:
        cap = None if args.cap.lower() in ('none', '-1') else parse_cap(args.cap)
        body = {'cap': cap, 'name': args.jobtype} if args.jobtype else {'cap': cap}
        types = call(args.server, 'POST', '/api/jobtypes', body)['jobtypes']
    else:
        types = call(args.server, 'GET', '/api/jobtypes')['jobtypes']
    if args.jobtype:
        types = [t for t in types if t['name'] == args.jobtype]
    if args.json:
        print(json.dumps({'jobtypes': types}, indent=1))
    else:
        print_table([dict(t, cap='none' if t['cap'] is None else t['cap']) for t in types],
                    JOBTYPE_COLUMNS)
    return EXIT_OK


def parse_cap(text):
    try:
        cap = int(text)
    except ValueError:
        cap = -1
    if cap < 0:
        raise P3SError('-L takes a number >= 0, or none to remove the cap', EXIT_USAGE)
    return cap


def parse_args(argv):
    ap = Parser(prog='p3s_job.py', description='Submit and manage p3s jobs.', epilog=EXIT_CODES)
    do = ap.add_mutually_exclusive_group(required=True)
    do.add_argument('-j', '--jobs', dest='jobfile', metavar='FILE', help='submit the jobs in FILE')
    do.add_argument('--list', action='store_true', help='list jobs, newest first')
    do.add_argument('--show', metavar='UUID',
                    help='show one job; a queued one says why it is not running')
    do.add_argument('--logs', metavar='UUID', help="the tails of a job's stdout and stderr")
    do.add_argument('--wait', metavar='UUID[,UUID]', help='follow jobs until they end; exit 0 '
                    'if all finished, 5 if not')
    do.add_argument('--retry', action='store_true', help='run ended jobs again as new '
                    'attempts: those of -u, or those ended in the states of -s')
    do.add_argument('-a', '--adjust', action='store_true', help='adjust the jobs of -u')
    do.add_argument('-d', '--delete', action='store_true', help='delete the jobs of -u')
    do.add_argument('--kill', metavar='UUID[,UUID]', help='kill jobs (queued or running)')
    do.add_argument('--drop', action='store_true', help='drop the queued jobs of -T TYPE')
    do.add_argument('-l', '--jobtypes', action='store_true',
                    help='list job types and their caps; with -L set a cap')
    do.add_argument('--summary', action='store_true', help="the monitor dashboard's numbers")
    ap.add_argument('-f', '--files', metavar='FILE[,FILE]', help='input files: one job each')
    ap.add_argument('-N', '--replicas', type=int, default=1, help='copies of each job')
    ap.add_argument('-t', '--dry-run', action='store_true', help='print the jobs, submit nothing')
    ap.add_argument('-u', '--uuid', dest='uuids', metavar='UUID[,UUID]',
                    help='jobs for -a, -d, --retry')
    ap.add_argument('-s', '--state', help='state filter (--list, --retry) or new state (-a)')
    ap.add_argument('-P', '--priority', type=int, help='new priority (-a)')
    ap.add_argument('-T', '--jobtype', help='job type (--list filter, --drop, -l)')
    ap.add_argument('-L', '--cap', metavar='N', help='with -l: most jobs of the type dispatched '
                    'or running at once; 0 pauses the type, none removes the cap')
    ap.add_argument('--older', type=float, metavar='S',
                    help='with --drop: only jobs queued for more than S seconds')
    ap.add_argument('--since', type=float, metavar='S',
                    help='with --retry -s: only jobs that ended in the last S seconds')
    ap.add_argument('--user', help='user filter (--list, --retry)')
    ap.add_argument('--limit', type=int,
                    help='at most this many jobs (--list, --retry; default 1000)')
    ap.add_argument('--json', action='store_true', help='machine-readable output')
    ap.add_argument('-S', '--server', type=server_url,
                    default=os.environ.get('P3S_SERVER') or DEFAULT_SERVER,
                    help='server URL or HOST:PORT; several, comma-separated, are tried in '
                    'turn (P3S_SERVER; default %s)' % DEFAULT_SERVER)
    ap.add_argument('--token-file', type=token_file, metavar='FILE',
                    help='read the token from FILE (else P3S_TOKEN_FILE names the file, or '
                    'P3S_TOKEN holds the token)')
    args = ap.parse_args(argv)
    if args.replicas < 1:
        ap.error('-N must be at least 1')
    if (args.adjust or args.delete) and not args.uuids:
        ap.error('-a and -d need -u UUID[,UUID...]')
    if args.kill:
        args.uuids = args.kill
    if args.drop and not args.jobtype:
        ap.error('--drop needs -T TYPE')
    if args.cap is not None and not args.jobtypes:
        ap.error('-L goes with -l')
    if args.older is not None and (not args.drop or args.older < 0):
        ap.error('--older S (S >= 0) goes with --drop')
    if args.retry and not (args.uuids or args.state):
        ap.error('--retry needs -u UUID[,UUID...], or -s STATE to select the ended jobs')
    if args.since is not None and (not args.retry or args.uuids or args.since < 0):
        ap.error('--since S (S >= 0) goes with --retry -s')
    return args


def delete_jobs(args):
    return for_each(args, split(args.uuids), 'DELETE', '/api/jobs/%s', 'deleted', 'jobs')


def kill_jobs(args):
    return for_each(args, split(args.uuids), 'POST', '/api/jobs/%s/kill', 'killed', 'jobs')


def main(argv=None):
    args = parse_args(argv)
    commands = ((args.jobfile, submit), (args.list, list_jobs), (args.show, show_job),
                (args.logs, show_logs), (args.wait, wait_jobs), (args.retry, retry_jobs),
                (args.summary, summary), (args.adjust, adjust), (args.delete, delete_jobs),
                (args.drop, drop), (args.jobtypes, jobtypes), (args.kill, kill_jobs))
    return run_command(next(run for given, run in commands if given), args)


if __name__ == '__main__':
    sys.exit(main())
