#!/usr/bin/env python3
"""p3s data client: datatypes, data files, the injector and service messages.

usage:
  python p3s_data.py -R -j '{"name":"TXT","ext":".txt","comment":"text"}'   register a datatype
  python p3s_data.py -R -j txtDataType.json                                (or from a file)
  python p3s_data.py -D NAME                                               delete a datatype
  python p3s_data.py -r -j '{"name":"f.root","datatype":"ROOT"}'          register a data file
  python p3s_data.py -G -f NAME           print the files of that name as JSON ([] when none)
  python p3s_data.py -a UUID -j '{"state":"done"}'                        adjust a data file
  python p3s_data.py -d -u UUID[,UUID...]                                  delete data files
  python p3s_data.py -g -J template.json -f FILE [-i DIR] [-T DATATYPE] [-A]
                          submit the template's jobs for one input file, and register it
  python p3s_data.py --list [-f NAME] [-s STATE] [--limit N]    the datatypes and data files
  python p3s_data.py --watch DIR --pattern 'np04_*.root' (--job TEMPLATE.json | --dag NAME)
                     [--fraction F] [--min-size BYTES] [--max-files N] [--cycles N]
                     [--period S] [--settle S] [-T DATATYPE] [--deadline S]    the injector
  python p3s_data.py --service NAME [-m MESSAGE]   leave a service message (or list them)
Add --json for machine-readable output. The server is --server or P3S_SERVER
(default http://127.0.0.1:8080/); the token, when the server needs one, is read from
--token-file FILE or the file P3S_TOKEN_FILE names, else from P3S_TOKEN (never give it
on a command line: ps shows command lines to every user). A 503 (the server's database
is busy) is asked again after the wait the server names.

A datatype has a name and an extension with its dot (`.txt`): workflow files are named
<uuid><ext> by default. Registering an existing name updates its extension and comment.
Every datatype named on a DAG's edges must exist before a workflow is made from the DAG.

-r takes the data file's directory from P3S_DIRPATH unless the JSON gives "dirpath".
-g sets env.P3S_INPUT_FILE of every job of the template (the original job format) to the
file's full path (-i DIR, else the directory in FILE, else P3S_DIRPATH), submits them and
registers the file, in one request; a file whose name is registered already is skipped
unless -A is given.

The injector scans DIR every --period seconds (--cycles scans; 0 = for ever). A matching file
is taken once it is complete (its size and modification time did not change over --settle
seconds) and has at least --min-size bytes; at most --max-files are submitted per scan, oldest
first. Each one is registered and gets the template's jobs with P3S_INPUT_FILE set to its full
path, or a defined workflow of the DAG with the file on its source edges. --fraction F
processes a stable portion of the files (a hash of the file name decides, so a file always
gets the same answer); the others are registered as skipped. The server decides what is new:
a file is submitted once, across scans, restarts and injectors watching the same directory.
A DIR that does not exist or is not a directory is an error at once (exit 4).

Exit codes (shared by every p3s client):
    0  success                        3  the server could not be reached or answered nonsense
    1  the server refused a request   4  a local file is missing or invalid
    2  bad command line             130  interrupted (Ctrl-C)
This file uses the Python standard library only: copy it alone onto any node.
"""
import argparse
import getpass
import glob
import hashlib
import http.client
import json
import os
import socket
import sys
import time
import urllib.error
import urllib.parse
import urllib.request

PROG = 'p3s_data'                # the name in every message
DEFAULT_SERVER = 'http://127.0.0.1:8080/'
HTTP_TIMEOUT = 60.0
TOKEN_VARIABLES = ('P3S_TOKEN',)   # the token, from the first that is set
DATATYPE_COLUMNS = ('name', 'ext', 'comment', 'created_at')
DATA_COLUMNS = ('uuid', 'name', 'dirpath', 'datatype', 'state', 'workflow', 'updated_at')
INJECT_BATCH = 5000          # files offered to the server in one request
DEFAULT_SETTLE = 1.0         # seconds between the two looks at a file, which must agree


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
# Commands
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


# -- datatypes --------------------------------------------------------------------------------


def register_datatype(args):
    datatype = call(args.server, 'POST', '/api/datatypes', json_option(args.json_text, '-j'))
    if args.json:
        print(json.dumps(datatype, indent=1))
    else:
        print('datatype %s (%s) registered' % (datatype['name'], datatype['ext']))
    return EXIT_OK


def delete_datatype(args):
    reply = call(args.server, 'DELETE', '/api/datatypes/%s' % quote(args.delete_type))
    print(json.dumps(reply) if args.json else 'datatype %s deleted' % args.delete_type)
    return EXIT_OK


def list_all(args):
    """--list: the datatypes, then the data files (newest first; -f NAME, -s STATE filter)."""
    datatypes = call(args.server, 'GET', '/api/datatypes')['datatypes']
    query = {k: v for k, v in (('name', args.file), ('state', args.state),
                               ('limit', args.limit)) if v}
    data = call(args.server, 'GET', '/api/data?' + urllib.parse.urlencode(query))['data']
    if args.json:
        print(json.dumps({'datatypes': datatypes, 'data': data}, indent=1))
        return EXIT_OK
    print_table(datatypes, DATATYPE_COLUMNS)
    print()
    print_table(data, DATA_COLUMNS)
    return EXIT_OK


def print_table(rows, columns):
    cells = [[str('' if r.get(c) is None else r.get(c)) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    for row in [list(columns)] + cells:
        print('  '.join(v.ljust(w) for v, w in zip(row, widths)).rstrip())


# -- data files -------------------------------------------------------------------------------


def register_data(args):
    data = json_option(args.json_text, '-j')
    if not isinstance(data, dict):
        raise P3SError('-j must be a JSON object', EXIT_INPUT)
    if 'dirpath' not in data and os.environ.get('P3S_DIRPATH'):
        data['dirpath'] = os.environ['P3S_DIRPATH']
    record = call(args.server, 'POST', '/api/data', data)
    print(json.dumps(record, indent=1) if args.json else record['uuid'])
    return EXIT_OK


def get_data(args):
    """-G: the records of that name as a JSON list; payload scripts compare it with `[]`."""
    query = urllib.parse.urlencode({'name': args.file, 'limit': args.limit or 1000})
    print(json.dumps(call(args.server, 'GET', '/api/data?' + query)['data']))
    return EXIT_OK


def adjust_data(args):
    record = call(args.server, 'POST', '/api/data/%s/adjust' % quote(args.adjust),
                  json_option(args.json_text, '-j'))
    print(json.dumps(record, indent=1) if args.json else '%s adjusted' % record['uuid'])
    return EXIT_OK


def delete_data(args):
    code = EXIT_OK
    for data_uuid in [u for u in args.uuids.split(',') if u]:
        try:
            call(args.server, 'DELETE', '/api/data/%s' % quote(data_uuid))
            print('%s deleted' % data_uuid)
        except P3SError as e:
            print('%s: error: %s: %s' % (PROG, data_uuid, e), file=sys.stderr)
            code = max(code, e.code)
    return code


# -- job templates (the original job format) -------------------------------------------------


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


def generate(args):
    """-g: one input file, the template's jobs for it, and its registration, in one request."""
    directory = args.indir or os.path.dirname(args.file) or os.environ.get('P3S_DIRPATH', '')
    path = os.path.join(directory, os.path.basename(args.file)) if directory else args.file
    body = {'files': [{'path': path}], 'jobs': read_jobs(args.template),
            'datatype': args.datatype or '', 'dedup': 'none' if args.again else 'name',
            'comment': ''}
    [result] = call(args.server, 'POST', '/api/data/inject', body)['files']
    if args.json:
        print(json.dumps(result, indent=1))
    elif result['status'] == 'seen':
        print('%s is registered already: nothing submitted (-A submits it again)' % path)
    else:
        print('\n'.join(result['jobs']))
    return EXIT_OK


# -- the injector -----------------------------------------------------------------------------


def sampled(name, fraction):
    """Whether a file is processed: the same name always gets the same answer, and over many
    names a portion `fraction` of them is."""
    if fraction >= 1:
        return True
    digest = hashlib.sha256(name.encode('utf-8', 'surrogateescape')).digest()
    return int.from_bytes(digest[:8], 'big') < fraction * 2 ** 64


def look(paths):
    """(size, mtime in ns) of each path that is a regular file now."""
    seen = {}
    for path in paths:
        try:
            st = os.stat(path)
        except OSError:
            continue
        if os.path.isfile(path):
            seen[path] = (st.st_size, st.st_mtime_ns)
    return seen


def complete_files(args, done):
    """New matching files that did not change between two looks --settle seconds apart,
    oldest first. A directory that went away (an unmounted disk) is said, and looked at again
    at the next scan."""
    if not os.path.isdir(args.watch):
        warn('%s is not a directory now; looking again at the next scan' % args.watch)
        return []
    pattern = os.path.join(glob.escape(os.path.abspath(args.watch)), args.pattern)
    listed = sorted(glob.glob(pattern))
    done.intersection_update(listed)          # forget files that left the directory
    first = {p: v for p, v in look(listed).items() if p not in done and v[0] >= args.min_size}
    if not first:
        return []
    time.sleep(args.settle)
    second = look(first)
    return sorted((p for p in first if second.get(p) == first[p]), key=lambda p: (first[p][1], p))


def scan(args, body, done):
    """One scan: offer the complete new files to the server, which takes each one once."""
    files = [{'path': p, 'skip': not sampled(os.path.basename(p), args.fraction)}
             for p in complete_files(args, done)]
    left = args.max_files
    for start in range(0, len(files), INJECT_BATCH):
        batch = dict(body, files=files[start:start + INJECT_BATCH])
        if left is not None:
            batch['max_files'] = max(left, 0)
        for result in call(args.server, 'POST', '/api/data/inject', batch)['files']:
            if result['status'] != 'deferred':
                done.add(result['path'])
            if left is not None:
                left -= result['status'] == 'submitted'
            report(args, result)


def report(args, result):
    if args.json:
        print(json.dumps(result), flush=True)
    elif result['status'] == 'submitted':
        what = ('workflow ' + result['workflow']) if result.get('workflow') else \
            count_of(len(result.get('jobs', [])), 'job')
        print('submitted %s: %s' % (result['path'], what), flush=True)
    elif result['status'] == 'skipped':
        print('skipped %s (not in the sampled fraction)' % result['path'], flush=True)


def watch(args):
    """The injector: scan DIR every --period seconds, --cycles times (0: for ever)."""
    if not os.path.isdir(args.watch):
        raise P3SError('%s is not a directory: --watch takes the directory the files arrive in'
                       % args.watch if os.path.exists(args.watch) else
                       'no such directory: %s' % args.watch, EXIT_INPUT)
    body = {'datatype': args.datatype or '', 'dedup': 'path', 'comment': 'injected'}
    if args.job:
        body['jobs'] = read_jobs(args.job)
    else:
        body.update(dag=args.dag, deadline=args.deadline, user=user_name())
    if args.cycles != 1:
        print('%s: watching %s for %s every %g s%s' % (
            PROG, os.path.abspath(args.watch), args.pattern, args.period,
            ', for ever (Ctrl-C stops)' if not args.cycles else ', %d times' % args.cycles),
            file=sys.stderr, flush=True)
    done, cycle = set(), 0
    while True:
        cycle += 1
        last = args.cycles and cycle >= args.cycles
        try:
            scan(args, body, done)
        except P3SError as e:
            if not e.transient or last:
                raise
            warn('%s; scanning again in %g s' % (e, args.period))
        if last:
            return EXIT_OK
        time.sleep(args.period)


def count_of(n, one, many=None):
    """'1 job', '2 jobs'; '1 vertex', '3 vertices'."""
    return '%d %s' % (n, one if n == 1 else many or one + 's')


def warn(message):
    print('%s: warning: %s' % (PROG, message), file=sys.stderr, flush=True)


# -- service messages -------------------------------------------------------------------------


def service(args):
    """--service NAME -m MESSAGE leaves a note; without -m, the latest notes of that name."""
    if args.message is not None:
        note = call(args.server, 'POST', '/api/services',
                    {'name': args.service, 'message': args.message})['service']
        print(json.dumps(note) if args.json else note['id'])
        return EXIT_OK
    query = urllib.parse.urlencode({'name': args.service, 'limit': args.limit or 20})
    notes = call(args.server, 'GET', '/api/services?' + query)['services']
    if args.json:
        print(json.dumps({'services': notes}, indent=1))
    else:
        print_table(notes, ('created_at', 'name', 'message'))
    return EXIT_OK


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


def parse_args(argv):
    ap = Parser(prog='p3s_data.py', epilog=EXIT_CODES,
                description='p3s datatypes, data files, injector, service notes.')
    do = ap.add_mutually_exclusive_group(required=True)
    do.add_argument('-R', '--register-type', action='store_true',
                    help='register (or update) the datatype of -j')
    do.add_argument('-D', '--delete-type', metavar='NAME', help='delete a datatype')
    do.add_argument('-r', '--register', action='store_true', help='register the data file of -j')
    do.add_argument('-G', '--get', action='store_true', help='print the files named -f as JSON')
    do.add_argument('-a', '--adjust', metavar='UUID', help='adjust a data file with -j')
    do.add_argument('-d', '--delete', action='store_true', help='delete the data files of -u')
    do.add_argument('-g', '--generate', action='store_true',
                    help='submit the jobs of -J for the input file -f and register it')
    do.add_argument('--list', action='store_true', help='list the datatypes and data files')
    do.add_argument('--watch', metavar='DIR', help='the injector: watch DIR for new files')
    do.add_argument('--service', metavar='NAME', help='leave a service message (-m)')
    ap.add_argument('-j', dest='json_text', metavar='JSON',
                    help='a datatype or data file, or an adjustment: JSON text or a .json file')
    ap.add_argument('-f', '--file', help='file name (-G, -g, --list filter)')
    ap.add_argument('-u', '--uuid', dest='uuids', metavar='UUID[,UUID]', help='data files for -d')
    ap.add_argument('-J', '--template', metavar='JOBS.json', help='job template file for -g')
    ap.add_argument('-i', '--indir', metavar='DIR', help="the input file's directory (-g)")
    ap.add_argument('-T', '--datatype', help='datatype of the input files (-g, --watch)')
    ap.add_argument('-A', '--again', action='store_true',
                    help='-g: submit even if the file is registered already')
    ap.add_argument('-s', '--state', help='state filter (--list)')
    ap.add_argument('-m', '--message', help='the message (--service)')
    ap.add_argument('--limit', type=int, help='at most this many records (--list, -G)')
    watch = ap.add_argument_group('the injector (--watch)')
    watch.add_argument('--pattern', default='*', help="file name pattern, e.g. 'np04_*.root'")
    watch.add_argument('--job', metavar='TEMPLATE.json', help='submit these jobs per file')
    watch.add_argument('--dag', metavar='NAME', help='or make a workflow of this DAG per file')
    watch.add_argument('--deadline', type=int, metavar='S',
                       help="with --dag: the workflow's jobs must be dispatched within S s")
    watch.add_argument('--fraction', type=float, default=1.0,
                       help='portion of the files to process, 0..1 (default 1)')
    watch.add_argument('--min-size', type=int, default=0, metavar='BYTES',
                       help='ignore files smaller than this for now (default 0)')
    watch.add_argument('--max-files', type=int, metavar='N',
                       help='submit at most N files per scan, oldest first (default: all)')
    watch.add_argument('--cycles', type=int, default=1, help='scans; 0 = for ever (default 1)')
    watch.add_argument('--period', type=float, default=60.0,
                       help='seconds between scans (default 60)')
    watch.add_argument('--settle', type=float, default=DEFAULT_SETTLE,
                       help='seconds a file must stay unchanged to count as complete '
                       '(default %g)' % DEFAULT_SETTLE)
    ap.add_argument('--json', action='store_true', help='machine-readable output')
    ap.add_argument('-S', '--server', type=server_url,
                    default=os.environ.get('P3S_SERVER') or DEFAULT_SERVER,
                    help='server URL or HOST:PORT; several, comma-separated, are tried in '
                    'turn (P3S_SERVER; default %s)' % DEFAULT_SERVER)
    ap.add_argument('--token-file', type=token_file, metavar='FILE',
                    help='read the token from FILE (else P3S_TOKEN_FILE names the file, or '
                    'P3S_TOKEN holds the token)')
    args = ap.parse_args(argv)
    check_args(ap, args)
    return args


def check_args(ap, args):
    if (args.register_type or args.register or args.adjust) and not args.json_text:
        ap.error('-R, -r and -a need -j JSON')
    if (args.get or args.generate) and not args.file:
        ap.error('-G and -g need -f FILE')
    if args.generate and not args.template:
        ap.error('-g needs -J TEMPLATE.json')
    if args.delete and not args.uuids:
        ap.error('-d needs -u UUID[,UUID...]')
    if args.watch is not None:
        if bool(args.job) == bool(args.dag):
            ap.error('--watch needs --job TEMPLATE.json or --dag NAME (one of them)')
        if not 0 <= args.fraction <= 1 or args.cycles < 0 or args.period < 0 \
                or args.settle < 0 or (args.max_files or 0) < 0 or args.min_size < 0:
            ap.error('--fraction is 0..1; --cycles, --period, --settle, --max-files and '
                     '--min-size are >= 0')


def main(argv=None):
    args = parse_args(argv)
    commands = ((args.register_type, register_datatype), (args.delete_type, delete_datatype),
                (args.register, register_data), (args.get, get_data), (args.adjust, adjust_data),
                (args.delete, delete_data), (args.generate, generate), (args.list, list_all),
                (args.watch, watch), (args.service, service))
    return run_command(next(run for given, run in commands if given), args)


if __name__ == '__main__':
    sys.exit(main())
