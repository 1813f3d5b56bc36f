#!/usr/bin/env python3
"""p3s pool manager: keeps a site's pool of pilots at its target on a batch system.

usage:
  python p3s_batch.py --site S [--system slurm|htcondor] [--once | --period S] [--keep N]
                      [--pilot PATH] [--python PY] [--batchlog DIR] [--warn S] [--dry-run]
  python p3s_batch.py --list [--site S] [-s STATE[,STATE]] [--limit N] [--json]

Each cycle (every --period seconds, or once with --once, for cron):
  1. asks the server for the site's pool: its live pilots, the queued jobs its pilots could run,
     its batch jobs still pending or running, and what to do (GET /api/sites/S/pool);
  2. asks the batch system what became of those batch jobs (squeue, then sacct for the ones
     squeue no longer shows; condor_q) and tells the server (POST /api/batchjobs/update); a
     batch job that ended without its pilot registering keeps its output's tail;
  3. cancels the batch jobs pending longer than the site's pending_timeout (scancel, condor_rm);
  4. submits the difference between the pilots wanted and those live, pending or starting
     (sbatch --parsable, condor_submit), never more than the site's pilots in all nor
     max_pending waiting, and records each submission (POST /api/batchjobs).
The site holds the settings (p3s_pilot.py --define-site): pilots (the target), lifetime (the
pilots' wall time), max_pending, pending_timeout, partition, account, options (extra sbatch
options, or extra lines of the HTCondor submit description). Pilots are wanted only while the
site has queued jobs they could run, or with --keep N, that many at least.

Each batch job runs p3s_pilot.py (--pilot, default: beside this file) with --site S, --cycles 0
unless the site sets cycles, and --lifetime; Slurm also sends it SIGUSR1 --warn seconds before
its wall time, and it drains: its job runs to its end, it takes no more and leaves.
The server is --server or P3S_SERVER; P3S_TOKEN is sent as a bearer token when set (the
pilots inherit the environment: give them P3S_PILOT_TOKEN).

Exit codes (shared by every p3s client):
    0  success                        3  the server could not be reached or answered nonsense
    1  the server refused a request,  4  a local file is missing or invalid
       or a batch command failed    130  interrupted (Ctrl-C)
    2  bad command line
This file uses the Python standard library only: copy it alone onto any node.
"""
import argparse
import fcntl
import getpass
import http.client
import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request

PROG = 'p3s_batch'                # the name in every message
DEFAULT_SERVER = 'http://127.0.0.1:8080/'
HTTP_TIMEOUT = 30.0
TOKEN_VARIABLES = ('P3S_TOKEN',)   # the token, from the first that is set
COMMAND_TIMEOUT = 60.0       # seconds for one sbatch, squeue, scancel, condor_* command
LOG_TAIL = 16 * 1024         # bytes of a batch job's output kept when no pilot came of it
DEFAULT_PERIOD = 60.0
DEFAULT_WARN = 120           # seconds: Slurm's SIGUSR1 before the wall time (--signal=B:USR1@)
# Slurm may send that signal up to a minute earlier than asked, so it is asked only of a batch
# job whose wall time leaves the pilot at least this much time besides.
SIGNAL_SLACK = 60
SITE_NAME = re.compile(r'^[A-Za-z0-9][A-Za-z0-9_.-]*$')   # a batch job name, a ClassAd string
LIST_COLUMNS = ('id', 'system', 'batchid', 'site', 'state', 'pilot', 'host', 'submitted_at',
                'ended_at', 'reason')

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
# Batch systems
# ---------------------------------------------------------------------------------------------
# A batch system is asked four things: submit pilots, what became of them, cancel some, and
# where their output is. Each answer is parsed from the commands' plain output.

# Slurm's job states (squeue %T, sacct State) as the server names a batch job's.
SLURM_STATES = {
    'PENDING': 'pending', 'CONFIGURING': 'pending', 'REQUEUED': 'pending',
    'REQUEUE_HOLD': 'pending', 'REQUEUE_FED': 'pending', 'RESV_DEL_HOLD': 'pending',
    'RUNNING': 'running', 'COMPLETING': 'running', 'SUSPENDED': 'running',
    'STOPPED': 'running', 'SIGNALING': 'running', 'STAGE_OUT': 'running', 'RESIZING': 'running',
    'COMPLETED': 'finished', 'CANCELLED': 'cancelled',
    'FAILED': 'failed', 'TIMEOUT': 'failed', 'NODE_FAIL': 'failed', 'BOOT_FAIL': 'failed',
    'OUT_OF_MEMORY': 'failed', 'DEADLINE': 'failed', 'PREEMPTED': 'failed',
    'SPECIAL_EXIT': 'failed', 'REVOKED': 'failed'}
# HTCondor's JobStatus numbers: a held pilot is stuck, so it counts as pending (and its
# pending_timeout removes it).
CONDOR_STATES = {'1': ('pending', ''), '2': ('running', ''), '3': ('cancelled', 'removed'),
                 '4': ('finished', ''), '5': ('pending', 'held'), '6': ('running', ''),
                 '7': ('running', 'suspended')}
CONDOR_SUBMITTED = re.compile(r'(\d+) job\(s\) submitted to cluster (\d+)\.')


def run_batch(argv, stdin=None):
    """A batch system's command; its standard output, or a one-line error."""
    try:
        proc = subprocess.run(argv, input=stdin, capture_output=True, text=True,
                              timeout=COMMAND_TIMEOUT)
    except (OSError, subprocess.SubprocessError) as e:
        raise P3SError('%s failed: %s' % (argv[0], e)) from None
    if proc.returncode != 0:
        reason = ' '.join(proc.stderr.split()) or 'exit code %d' % proc.returncode
        raise P3SError('%s failed: %s' % (argv[0], reason[:300]))
    return proc.stdout


def pilot_argv(args, pool, pilot, extra=()):
    """The pilot's command line in a batch job (`pilot`: the file as the node sees it)."""
    argv = [args.python, pilot, '--server', args.server, '--site', args.site]
    settings = pool['settings']
    if settings['cycles'] is None:          # else the pilot takes the site's
        argv += ['--cycles', '0']           # a batch pilot lives until its end or a drain
    if settings['lifetime']:
        argv += ['--lifetime', str(settings['lifetime'])]
    return argv + list(extra)


def parse_slurm_states(text):
    """squeue -o '%i|%T|%N|%r' lines: {batch id: (state, host, reason)}."""
    seen = {}
    for line in text.splitlines():
        fields = line.strip().split('|')
        if len(fields) < 4 or fields[1] not in SLURM_STATES:
            continue
        reason = fields[3] if fields[3] not in ('None', '(null)') else ''
        seen[fields[0]] = (SLURM_STATES[fields[1]], fields[2], reason or fields[1])
    return seen


def parse_sacct_states(text):
    """sacct -n -P -X -o JobID,State,NodeList,ExitCode lines ('CANCELLED by 0' is CANCELLED)."""
    seen = {}
    for line in text.splitlines():
        fields = line.strip().split('|')
        if len(fields) < 4 or not fields[1]:
            continue
        word = fields[1].split()[0]
        if word in SLURM_STATES:
            seen[fields[0]] = (SLURM_STATES[word], fields[2], '%s (exit %s)' % (word, fields[3]))
    return seen


class Slurm:
    name = 'slurm'

    def __init__(self, args):
        self.args = args
        self.accounting = True          # until sacct says there is none

    def job_name(self, site):
        return 'p3s-' + site

    def output_path(self, batchid):
        return os.path.join(self.args.batchlog, 'p3s-pilot-%s.out' % batchid)

    def sbatch_argv(self, pool):
        settings, args = pool['settings'], self.args
        argv = ['sbatch', '--parsable', '--job-name=' + self.job_name(args.site),
                '--output=' + self.output_path('%j')]
        lifetime = settings['lifetime']
        if lifetime:
            argv.append('--time=%d' % -(-lifetime // 60))      # minutes, rounded up
        if args.warn and (not lifetime or lifetime >= args.warn + SIGNAL_SLACK):
            argv.append('--signal=B:USR1@%d' % args.warn)
        if settings['partition']:
            argv.append('--partition=' + settings['partition'])
        if settings['account']:
            argv.append('--account=' + settings['account'])
        return argv + settings['options']

    def script(self, pool):
        """The batch script: the pilot, exec'd, so that it gets Slurm's signals itself."""
        return ('#!/bin/sh\n# a p3s pilot of site %s, from p3s_batch.py\nexec %s\n'
                % (self.args.site, ' '.join(shlex.quote(a) for a in
                                           pilot_argv(self.args, pool, self.args.pilot))))

    def describe(self, pool):
        return '%s <<EOF\n%sEOF\n' % (' '.join(map(shlex.quote, self.sbatch_argv(pool))),
                                      self.script(pool))

    def submit(self, pool, count):
        """sbatch, once per pilot: each batch id as soon as it is known."""
        for _ in range(count):
            out = run_batch(self.sbatch_argv(pool), stdin=self.script(pool))
            batchid = out.strip().split(';')[0]          # 'id' or 'id;cluster'
            if not re.match(r'^\d+(_\d+)?$', batchid):
                raise P3SError('sbatch answered %r, not a job id' % out.strip()[:100])
            yield batchid

    def observe(self, site):
        """Every batch job of the site's pilots that Slurm still knows, ended ones included
        (for MinJobAge, 300 s by default)."""
        return parse_slurm_states(run_batch(
            ['squeue', '-h', '-t', 'all', '-u', user_name(), '-n', self.job_name(site),
             '-o', '%i|%T|%N|%r']))

    def ended(self, batchids):
        """What accounting says of batch jobs squeue no longer shows; {} without accounting
        (they are then judged by what became of their pilots)."""
        if not self.accounting or not batchids:
            return {}
        try:
            return parse_sacct_states(run_batch(
                ['sacct', '-n', '-P', '-X', '-j', ','.join(batchids),
                 '-o', 'JobID,State,NodeList,ExitCode']))
        except P3SError as e:
            warn('no Slurm accounting (%s): an ended batch job is judged by its pilot' % e)
            self.accounting = False
            return {}

    def cancel(self, batchids):
        run_batch(['scancel'] + list(batchids))

    def output_tail(self, batchid):
        return read_tail(self.output_path(batchid))


def condor_quote(argv):
    """A list of arguments in the submit description's new syntax: each in single quotes,
    quotes doubled, the whole in double quotes."""
    return '"%s"' % ' '.join("'%s'" % a.replace('"', '""').replace("'", "''") for a in argv)


def parse_condor_submit(text):
    """condor_submit's '3 job(s) submitted to cluster 1234.': ['1234.0', '1234.1', '1234.2']."""
    found = CONDOR_SUBMITTED.search(text)
    if not found:
        raise P3SError('condor_submit answered %r, not a cluster' % ' '.join(text.split())[:100])
    return ['%s.%d' % (found.group(2), i) for i in range(int(found.group(1)))]


def parse_condor_q(text):
    """condor_q -af:j JobStatus RemoteHost lines ('1234.0 2 slot1@node7'): {id: (state, host,
    reason)}."""
    seen = {}
    for line in text.splitlines():
        fields = line.split()
        if len(fields) >= 2 and fields[1] in CONDOR_STATES:
            state, reason = CONDOR_STATES[fields[1]]
            host = fields[2] if len(fields) > 2 and fields[2] != 'undefined' else ''
            seen[fields[0]] = (state, host.split('@')[-1], reason)
    return seen


class HTCondor:
    """HTCondor: a submit description per cycle, condor_submit, condor_q, condor_rm. The pilot
    travels with the job (no shared file system needed), and its output comes back here."""
    name = 'htcondor'

    def __init__(self, args):
        self.args = args

    def batch_name(self, site):
        return 'p3s-' + site

    def output_path(self, batchid, ext='out'):
        return os.path.join(self.args.batchlog, 'p3s-pilot-%s.%s' % (batchid, ext))

    def description(self, pool, count):
        args, settings = self.args, pool['settings']
        argv = pilot_argv(args, pool, 'p3s_pilot.py',       # sent along: transfer_input_files
                          ['--extra', 'htcondor:$(ClusterId).$(ProcId)'])
        lines = [
            '# p3s pilots of site %s, from p3s_batch.py' % args.site,
            'universe = vanilla',
            'executable = /usr/bin/env',
            'transfer_executable = false',
            'arguments = ' + condor_quote(argv),
            'transfer_input_files = ' + args.pilot,
            'should_transfer_files = YES',
            'when_to_transfer_output = ON_EXIT',
            'batch_name = ' + self.batch_name(args.site),
            'output = ' + self.output_path('$(ClusterId).$(ProcId)'),
            'error = ' + self.output_path('$(ClusterId).$(ProcId)', 'err'),
            'log = ' + os.path.join(args.batchlog, 'p3s-%s.log' % args.site)]
        if os.environ.get('P3S_PILOT_TOKEN'):
            lines.append('getenv = P3S_PILOT_TOKEN')   # from the environment, never the file
        if settings['lifetime']:
            lines.append('+MaxRuntime = %d' % settings['lifetime'])   # CERN's batch service
        if settings['account']:
            lines.append('accounting_group = ' + settings['account'])
        return '\n'.join(lines + settings['options'] + ['queue %d' % count]) + '\n'

    def describe(self, pool):
        return self.description(pool, max(pool['submit'], 1))

    def submit(self, pool, count):
        """One condor_submit for all of them; the batch ids (cluster.proc)."""
        path = os.path.join(self.args.batchlog, 'p3s-%s.sub' % self.args.site)
        with open(path, 'w') as f:
            f.write(self.description(pool, count))
        return parse_condor_submit(run_batch(['condor_submit', path]))

    def observe(self, site):
        return parse_condor_q(run_batch(
            ['condor_q', '-constraint', 'JobBatchName == "%s"' % self.batch_name(site),
             '-af:j', 'JobStatus', 'RemoteHost']))

    def ended(self, batchids):
        return {}                # gone from condor_q: judged by what became of the pilot

    def cancel(self, batchids):
        run_batch(['condor_rm'] + list(batchids))

    def output_tail(self, batchid):
        return (read_tail(self.output_path(batchid)) + read_tail(self.output_path(batchid, 'err'))
                )[-LOG_TAIL:]


SYSTEMS = {'slurm': Slurm, 'htcondor': HTCondor}


def read_tail(path, size=LOG_TAIL):
    try:
        with open(path, 'rb') as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - size))
            return f.read().decode('utf-8', 'replace')
    except OSError:
        return ''


# ---------------------------------------------------------------------------------------------
# The pool manager
# ---------------------------------------------------------------------------------------------


def warn(message):
    print('%s: warning: %s' % (PROG, message), file=sys.stderr, flush=True)


def pool_path(args):
    return '/api/sites/%s/pool?system=%s&keep=%d' % (quote(args.site), args.system, args.keep)


def observations(pool, seen, ended, system):
    """What changed of the live batch jobs the server knows: one observation each."""
    changes = []
    for job in pool['batchjobs']:
        batchid = job['batchid']
        state, host, reason = seen.get(batchid) or ended.get(batchid) or (
            'ended', '', 'no longer known to %s' % system.name)
        if state == job['state'] and state == 'pending':
            continue
        if state == job['state'] == 'running' and job['started_at']:
            continue
        change = {'batchid': batchid, 'state': state, 'host': host, 'reason': reason}
        if state not in ('pending', 'running') and not job['pilot']:
            change['output'] = system.output_tail(batchid)
        changes.append(change)
    return changes


def strays(pool, seen):
    """Live batch jobs of ours the server does not know (their record was lost: the pool
    manager stopped between sbatch and the record)."""
    known = {job['batchid'] for job in pool['batchjobs']}
    return sorted(b for b, (state, _, _) in seen.items()
                  if b not in known and state in ('pending', 'running'))


def record(args, batchids):
    return call(args.server, 'POST', '/api/batchjobs',
                {'site': args.site, 'system': args.system, 'batchids': batchids})['batchjobs']


def update(args, changes):
    return call(args.server, 'POST', '/api/batchjobs/update',
                {'site': args.site, 'system': args.system, 'jobs': changes})['batchjobs']


def cycle(args, system):
    """One pass of the pool manager; returns what it saw and did."""
    pool = call(args.server, 'GET', pool_path(args))
    seen = system.observe(args.site)
    missing = [j['batchid'] for j in pool['batchjobs'] if j['batchid'] not in seen]
    changes = observations(pool, seen, system.ended(missing), system)
    lost = strays(pool, seen)
    ended = update(args, changes) if changes else []
    if lost:
        record(args, lost)
    if changes or lost:
        pool = call(args.server, 'GET', pool_path(args))
    submit, cancelled = pool['submit'], []
    if pool['cancel']:
        try:
            system.cancel(pool['cancel'])
            cancelled = pool['cancel']
            timeout = pool['settings']['pending_timeout']
            update(args, [{'batchid': b, 'state': 'cancelled',
                           'reason': 'pending for more than %d s' % timeout} for b in cancelled])
        except P3SError as e:
            warn('%s: no replacement submitted' % e)
            submit = max(0, submit - len(pool['cancel']))
    submitted = []
    for batchid in system.submit(pool, submit) if submit else ():
        record(args, [batchid])                    # at once: a later failure loses none
        submitted.append(batchid)
    return {'site': args.site, 'system': args.system, 'pilots': pool['pilots'],
            'queued': pool['queued'], 'pending': pool['pending'], 'starting': pool['starting'],
            'wanted': pool['wanted'], 'submitted': submitted, 'cancelled': cancelled,
            'ended': [dict(j) for j in ended if j['state'] not in ('pending', 'running')],
            'recorded': lost}


def cycle_line(done):
    line = ('%(time)s site %(site)s (%(system)s): %(live)d live pilots (%(busy)d busy), '
            '%(queued)d queued jobs they could run, %(pending)d pending and %(starting)d '
            'starting batch jobs; wanted %(wanted)d'
            % dict(done, time=time.strftime('%Y-%m-%d %H:%M:%S'), **done['pilots']))
    for what in ('submitted', 'cancelled', 'recorded'):
        if done[what]:
            line += '; %s %s' % (what, ' '.join(done[what]))
    for job in done['ended']:
        line += '; %s ended %s' % (job['batchid'], job['state'])
    return line


def print_table(rows, columns):
    cells = [[str('' if r.get(c) is None else r.get(c)) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    for row in [list(columns)] + cells:
        print('  '.join(v.ljust(w) for v, w in zip(row, widths)).rstrip())


# ---------------------------------------------------------------------------------------------
# Commands
# ---------------------------------------------------------------------------------------------


def default_dir(kind):
    return os.path.join(tempfile.gettempdir(), user_name() or 'p3s', 'p3s', kind)


def list_batchjobs(args):
    query = {'limit': args.limit, 'site': args.site, 'state': args.state}
    path = '/api/batchjobs?' + urllib.parse.urlencode({k: v for k, v in query.items() if v})
    jobs = call(args.server, 'GET', path)['batchjobs']
    if args.json:
        print(json.dumps({'batchjobs': jobs}, indent=1))
    else:
        print_table(jobs, LIST_COLUMNS)
    return EXIT_OK


def dry_run(args, system):
    """What one cycle would submit now, and how, without asking the batch system anything."""
    pool = call(args.server, 'GET', pool_path(args))
    print('# the pool wants %d pilots and would submit %d now%s' % (
        pool['wanted'], pool['submit'], ', cancel ' + ' '.join(pool['cancel'])
        if pool['cancel'] else ''))
    print(system.describe(pool), end='')
    return EXIT_OK


def lock(args):
    """One pool manager per site and batch system on this host (cron may start the next run
    while the last one still waits on the batch system)."""
    path = os.path.join(args.batchlog, 'p3s_batch-%s-%s.lock' % (args.site, args.system))
    handle = open(path, 'w')
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.close()
        raise P3SError('another p3s_batch.py manages site %s on %s (lock %s)'
                       % (args.site, args.system, path)) from None
    return handle


def manage(args):
    try:
        os.makedirs(args.batchlog, exist_ok=True)
    except OSError as e:
        raise P3SError('cannot make the batch log directory %s: %s' % (args.batchlog, e),
                       EXIT_INPUT) from None
    if not os.path.isfile(args.pilot):
        raise P3SError('the pilot %s is not a file (see --pilot)' % args.pilot, EXIT_INPUT)
    system = SYSTEMS[args.system](args)
    if args.dry_run:
        return dry_run(args, system)
    held = lock(args)
    try:
        while True:
            try:
                done = cycle(args, system)
                print(json.dumps(done) if args.json else cycle_line(done), flush=True)
            except P3SError as e:
                if args.once:
                    raise
                warn('%s; trying again in %g s' % (e, args.period))
            if args.once:
                return EXIT_OK
            time.sleep(args.period)
    finally:
        held.close()


def parse_args(argv):
    env = os.environ.get
    here = os.path.dirname(os.path.abspath(__file__))
    ap = Parser(prog='p3s_batch.py', description='Keeps a site\'s pool of p3s pilots full on '
                'a batch system.', epilog=EXIT_CODES)
    ap.add_argument('-S', '--server', type=server_url,
                    default=env('P3S_SERVER') or DEFAULT_SERVER,
                    help='server URL or HOST:PORT; several, comma-separated, are tried in '
                    'turn (P3S_SERVER; default %s)' % DEFAULT_SERVER)
    ap.add_argument('--site', default=env('P3S_SITE', ''), help='the site whose pool this is '
                    '(P3S_SITE)')
    ap.add_argument('--system', choices=sorted(SYSTEMS), default='slurm',
                    help='the batch system (default slurm)')
    ap.add_argument('--once', action='store_true', help='one cycle, then exit (for cron)')
    ap.add_argument('--period', type=float, default=DEFAULT_PERIOD,
                    help='seconds between cycles (default %g)' % DEFAULT_PERIOD)
    ap.add_argument('--keep', type=int, default=0,
                    help='pilots kept even with no queued job (default 0; at most the site\'s '
                    'pilots)')
    ap.add_argument('--pilot', default=os.path.join(here, 'p3s_pilot.py'),
                    help='p3s_pilot.py as the nodes see it (default: beside this file)')
    ap.add_argument('--python', default='python3', help='the nodes\' Python (default python3)')
    ap.add_argument('--batchlog', default=env('P3S_BATCHLOG') or default_dir('batch'),
                    help='directory of the batch jobs\' output, visible from the nodes '
                    '(P3S_BATCHLOG)')
    ap.add_argument('--warn', type=int, default=DEFAULT_WARN,
                    help='Slurm: seconds before the wall time when SIGUSR1 drains the pilot '
                    '(default %d; 0: no signal)' % DEFAULT_WARN)
    ap.add_argument('--dry-run', action='store_true',
                    help='print what one cycle would submit, and how, then exit')
    ap.add_argument('--list', action='store_true', help='list the recorded batch jobs')
    ap.add_argument('-s', '--state', help='with --list: these states (comma-separated)')
    ap.add_argument('--limit', type=int, default=100, help='with --list: at most N (100)')
    ap.add_argument('--json', action='store_true', help='machine-readable output')
    args = ap.parse_args(argv)
    check_args(ap, args)
    args.pilot = os.path.abspath(args.pilot)
    return args


def check_args(ap, args):
    if args.list:
        return
    if not args.site:
        ap.error('--site (or P3S_SITE) names the site whose pool to keep')
    if not SITE_NAME.match(args.site) or len(args.site) > 100:
        ap.error('a site managed on a batch system is named with letters, digits, _ . - only')
    if args.period <= 0 or args.keep < 0 or args.warn < 0 or args.limit < 1:
        ap.error('--period must be > 0, --keep and --warn >= 0')
    if any(c in args.server + args.python for c in '\n\r"\''):
        ap.error('the server URL and --python must not contain quotes or line breaks')


def main(argv=None):
    args = parse_args(argv)
    return run_command(list_batchjobs if args.list else manage, args)


if __name__ == '__main__':
    sys.exit(main())
