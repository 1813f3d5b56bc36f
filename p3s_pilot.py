#!/usr/bin/env python3
"""p3s pilot: registers with the p3s server, pulls jobs, runs them and reports back.

usage: python p3s_pilot.py [--server URL] [--site NAME] [--joblog DIR] [--pilotlog DIR]
                           [--cycles N] [--period S] [--beat S] [--wait S]
                           [--jobtypes a,b] [--extra TEXT] [--keep-logs DAYS] [--max-log-size N]
                           [--lifetime S] [--token-file FILE] [--pass-env NAME[,NAME...]]
       python p3s_pilot.py --define-site site.json      define or replace a site, then exit
       python p3s_pilot.py --drain UUID[,UUID...]       order pilots to drain, then exit

Defaults come from the environment: P3S_SERVER (http://127.0.0.1:8080/; several servers over
one database, comma-separated: the pilot moves to the next when one does not answer), P3S_SITE,
P3S_JOBLOG (/tmp/$USER/p3s/jobs), P3S_PILOTLOG (/tmp/$USER/p3s/pilots). The pilot token, when
the server has tokens, is read from --token-file or the file P3S_PILOT_TOKEN_FILE (else
P3S_TOKEN_FILE) names, else from P3S_PILOT_TOKEN or P3S_TOKEN; it only registers the pilot.
Registration gives the pilot a secret of its own, which its later calls carry: no other pilot
can report, heartbeat or stop for it. A server that no longer knows the pilot (its database
was restored) is told who it is again.

A pilot of a site defined on the server (--define-site, the original's inputs/sites/*.json:
name, env, pilotperiod, pilotcycles, pilotbeat, pilots, ...) takes the site's period, cycles,
beat and wait unless given on its own command line, and adds the site's env to every payload's
environment (the job's env wins). Without a site record the built-in defaults apply.

A cycle is one job run or one request that found nothing; --cycles 0 runs for ever. A request
waits on the server up to --wait seconds for a job, so a job submitted to an idle pilot starts
at once; when the server cannot hold the request the pilot polls again after --period.

Each payload runs in its own process group with the job's env (over the site's) plus
P3S_JOB_UUID, P3S_PILOT_UUID and P3S_SERVER, and nothing else of the pilot's environment but
the variables --pass-env names (never a token); stdout and stderr go to <joblog>/<job
uuid>.out and .err (new files: whatever was at those paths is removed, never followed).
P3S_MODE=COPY in the job env copies the executable into a private sandbox (removed after the
job; its path is P3S_SANDBOX); P3S_EXECMODE (any value) runs the payload through the shell.
At the job's timelimit, or on a kill order, the whole group gets SIGTERM, then SIGKILL. A
payload dies with its pilot, even by kill -9 (Linux: PR_SET_PDEATHSIG); whatever it leaves
behind when it ends, in its group or escaped with setsid (the pilot is a child subreaper), is
ended too. A job that may be retried ("retries") is killed, and reported lost, when the server
has not answered for a pilot timeout: the server takes the pilot for lost and may run the job
again, so the first attempt must not go on.
The pilot's log is <pilotlog>/<pilot uuid>.log; its warnings and errors go to stderr too.

While the server cannot be reached (or a proxy in front of it answers 502, 503 or 504) the
pilot retries with back-off, at most 30 s apart; an answer that is not p3s's, or a refusal,
ends it at once (exit 3 or 1). On SIGTERM or SIGINT it kills its payload, then tries for at
most 20 s in all to deliver the last report and deregister.

So that payloads cannot fill the node's disk, a job's .out and .err are each cut at
--max-log-size bytes (default 1G), ending with a marker line, and job logs last written more
than --keep-logs days ago (default 7) are removed from the job log folder at the pilot's start
and every few hours. Only files named <uuid>.out or <uuid>.err are ever removed.

SIGTERM or SIGINT: the payload is killed (its job ends `killed`) and the pilot leaves. SIGUSR1,
or a drain order from the server (--drain): the pilot drains: it lets its job finish, takes no
more and leaves (`stopped`). A pilot of a batch job knows its end: --lifetime seconds after its
start, SLURM_JOB_END_TIME, or what squeue says of SLURM_JOB_ID; it takes no job whose timelimit
would outlast it and leaves before the batch system kills it. Its --extra is then
slurm:<SLURM_JOB_ID> (or htcondor:<cluster>.<proc>) unless given.

Exit codes (shared by every p3s client):
  0  success                        2  bad command line
  1  the server refused a request   3  the server could not be reached or answered nonsense
                                    4  a local file is missing or invalid
This file uses the Python standard library only: copy it alone onto any node.
"""
import argparse
import ctypes
import errno
import functools
import getpass
import http.client
import json
import logging
import math
import os
import random
import re
import secrets
import select
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid as uuidlib
from contextlib import contextmanager

PROG = 'p3s_pilot'                # the name in every message
DEFAULT_SERVER = 'http://127.0.0.1:8080/'
HTTP_TIMEOUT = 30.0          # seconds for one ordinary request
TOKEN_VARIABLES = ('P3S_PILOT_TOKEN', 'P3S_TOKEN')   # the token, from the first that is set
BEAT_TIMEOUT = 5.0           # a heartbeat must not hold up timelimit enforcement for long
KILL_GRACE = 3.0             # seconds between SIGTERM and SIGKILL of a payload's group
LOG_TAIL = 64 * 1024         # bytes of stdout/stderr sent with the final report
BACKOFF = (0.5, 1, 2, 4, 8, 15, 30)   # seconds between retries while the server is away ...
BACKOFF_MAX = 30.0                    # ... jitter included, never more
# Seconds a signalled pilot keeps trying to deliver its last report and say goodbye, in all:
# a batch system kills it this long after SIGTERM (Slurm's KillWait is 30 s by default).
SHUTDOWN_PATIENCE = 20.0
# Settings a site may give; the pilot's own flags win, then the site's, then these.
# A long poll is answered the moment a job comes, so its length costs no latency; the longer
# it is, the fewer requests an idle pool makes (2,000 idle pilots: 67 a second, not 100).
DEFAULTS = {'cycles': 1, 'period': 5.0, 'beat': 5.0, 'wait': 30.0}
# Keys of the original site files, as the server names them ('server' is ignored, as it was).
SITE_KEYS = {'pilotperiod': 'period', 'pilotcycles': 'cycles', 'pilotbeat': 'beat',
             'pilotwait': 'wait', 'pilotlife': 'lifetime', 'pilots': 'pilots'}
START_REPORT_DELAY = 0.2     # a payload that ends sooner is reported once, at its end
# Retention: a runaway payload must not fill the node's disk.
DEFAULT_KEEP_LOGS = 7.0      # days a job's .out and .err stay in the job log folder
TIDY_PERIOD = 3 * 3600.0     # seconds between two removals of old job logs
DEFAULT_MAX_LOG_SIZE = '1G'  # a job's .out, and its .err, are cut at this size
LOG_CHECK = 0.5              # seconds between two looks at a running payload's log sizes
CUT_MARKER = '\n[p3s_pilot: output cut at %d bytes (--max-log-size); the rest was dropped]\n'
JOB_LOG_NAME = re.compile(r'^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}'
                          r'\.(out|err)\Z')
# The logs a pilot makes ahead for its next job: .<pilot uuid>.next.out and .err.
SPARE_LOG_NAME = re.compile(r'^\.[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}'
                            r'\.next\.(out|err)\Z')
SIZE_UNITS = {'': 1, 'k': 1024, 'm': 1024 ** 2, 'g': 1024 ** 3}
# A batch pilot keeps this much of its wall time free: a job killed at its timelimit still has
# the kill grace and its final report before the end (the server counts with the same margin).
END_MARGIN = 10.0
SQUEUE_TIMEOUT = 10.0        # seconds to ask Slurm when this pilot's batch job ends
# Supervision (Linux's prctl(2)): a payload dies with its pilot, and what it leaves behind comes
# to the pilot, which ends it.
PR_SET_PDEATHSIG, PR_SET_CHILD_SUBREAPER = 1, 36
LEFTOVER_CHECK = 0.05        # seconds between two looks for what a payload left behind
# The pilot's own secrets: never handed to a payload, even when --pass-env names them.
SECRET_VARIABLES = ('P3S_TOKEN', 'P3S_PILOT_TOKEN', 'P3S_TOKEN_FILE', 'P3S_PILOT_TOKEN_FILE')

log = logging.getLogger('p3s_pilot')


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
# Running one payload
# ---------------------------------------------------------------------------------------------


def kill_group(proc):
    """SIGTERM the payload's whole process group, then SIGKILL what is left after a grace."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass
        if sig == signal.SIGTERM:
            try:
                proc.wait(KILL_GRACE)
            except subprocess.TimeoutExpired:
                pass
    proc.wait()


@functools.lru_cache(maxsize=None)
def libc():
    try:
        return ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None


def prctl(option, value):
    """prctl(2) where there is one (Linux): whether it took effect."""
    c = libc()
    return bool(c is not None and hasattr(c, 'prctl') and c.prctl(option, value, 0, 0, 0) == 0)


def start_payload(command, shell, env, out, err):
    """Start a payload in a session of its own, to be killed (SIGKILL) when the pilot dies,
    however the pilot dies, kill -9 included (PR_SET_PDEATHSIG). Through setpriv where it can
    set that signal: that costs about 0.6 ms a job here, where a preexec_fn costs 1.6 ms (Python
    then forks rather than vforks, and runs code in the child)."""
    wrapper = pdeathsig_wrapper()
    if wrapper is None:
        return subprocess.Popen(command, shell=shell, env=env, stdout=out, stderr=err,
                                stdin=subprocess.DEVNULL, start_new_session=True,
                                preexec_fn=die_with(os.getpid()))
    if shell:
        command = ['/bin/sh', '-c', command]
    else:
        check_executable(command[0], env)    # a missing one is a nonstarter, not setpriv's 127
    return subprocess.Popen(dying_with_parent(wrapper, command), env=env,
                            stdout=out, stderr=err, stdin=subprocess.DEVNULL,
                            start_new_session=True)


@functools.lru_cache(maxsize=None)
def pdeathsig_wrapper():
    """setpriv of util-linux 2.33 or newer (it sets the parent-death signal, then execs the
    payload), or None: the payload is then started with a preexec_fn that does the same."""
    path = shutil.which('setpriv')
    try:
        ok = path and subprocess.run(dying_with_parent(path, [path, '--version']),
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     timeout=10).returncode == 0
    except (OSError, subprocess.SubprocessError):
        ok = False
    return path if ok else None


def dying_with_parent(wrapper, command):
    """`command` run through `wrapper` (setpriv), which sets the parent-death signal to SIGKILL,
    then execs it."""
    return [wrapper, '--pdeathsig', 'KILL', '--'] + command


def check_executable(name, env):
    """Raise what Popen would for a program it cannot start (its search of PATH included)."""
    found = name if os.sep in name else shutil.which(name, os.X_OK,
                                                     env.get('PATH') or os.defpath)
    if found is None or not os.path.exists(found):
        raise FileNotFoundError(errno.ENOENT, 'No such file or directory', name)
    if os.path.isdir(found) or not os.access(found, os.X_OK):
        raise PermissionError(errno.EACCES, 'Permission denied', name)


def die_with(pilot_pid):
    """For a payload, between its fork and its exec: it is killed (SIGKILL) when the pilot dies,
    however the pilot dies, kill -9 included; if the pilot is gone already, it never starts."""
    libc()                       # loaded here, not in the child

    def arm():
        prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != pilot_pid:
            os._exit(127)
    return arm


def end_leftovers(group, adopted):
    """Stop what a payload left behind when it ended or was killed: the rest of its process
    group and, with `adopted` (the pilot is a child subreaper), every process the pilot
    adopted, which takes in children that left the group with setsid. SIGTERM, then SIGKILL
    for what is left after KILL_GRACE. Returns (how many there were, how many could not be
    ended: a process that cannot be signalled, or is stuck in the kernel)."""
    seen, sig, kill_at = set(), signal.SIGTERM, time.monotonic() + KILL_GRACE
    while True:
        found = leftovers(group, adopted)
        if not found or time.monotonic() > kill_at + KILL_GRACE:
            return len(seen | found), len(found)
        if sig == signal.SIGTERM and time.monotonic() >= kill_at:
            sig = signal.SIGKILL
        for pid in found - seen if sig == signal.SIGTERM else found:
            try:
                os.kill(pid, sig)
            except (ProcessLookupError, PermissionError):
                pass
        seen |= found
        time.sleep(LEFTOVER_CHECK)


def leftovers(group, adopted):
    """The live processes of the payload's group, and with `adopted` this pilot's children.
    The /proc scan runs only when there is something to find."""
    alive = adopted and reap_adopted()
    try:
        os.killpg(group, 0)
        alive = True
    except (ProcessLookupError, PermissionError):
        pass
    if not alive:
        return set()
    me, found = os.getpid(), set()
    for name in os.listdir('/proc'):
        try:
            with open('/proc/%s/stat' % name) as f:
                state, ppid, pgrp = f.read().rsplit(')', 1)[1].split()[:3]
        except (OSError, ValueError):
            continue               # not a process, or it is gone
        if state != 'Z' and (int(pgrp) == group or adopted and int(ppid) == me):
            found.add(int(name))
    return found


def reap_adopted():
    """Reap this pilot's children that ended (only orphans it adopted are left once the payload
    was waited for): whether any is still alive."""
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return False
        if pid == 0:
            return True


def wait_exit(proc, timeout):
    """proc.wait(timeout), woken the moment the payload exits. Popen.wait with a timeout polls
    with sleeps growing from 0.5 ms, which adds about 1 ms to a job that lasts 1 ms; a pidfd
    (Linux 5.3+) becomes readable at the exit itself (bench/NOTES.md)."""
    if proc.returncode is None and hasattr(os, 'pidfd_open'):
        try:
            fd = os.pidfd_open(proc.pid)
        except OSError:
            return proc.wait(timeout)
        try:
            poller = select.poll()
            poller.register(fd, select.POLLIN)
            poller.poll(timeout * 1000)
        finally:
            os.close(fd)
        return proc.wait(0)
    return proc.wait(timeout)


def open_logs(joblog, out_path, err_path):
    """The job's .out and .err, creating the directory the first time it is missing."""
    try:
        return new_log(out_path), new_log(err_path)
    except FileNotFoundError:
        os.makedirs(joblog, exist_ok=True)
        return new_log(out_path), new_log(err_path)


def new_log(path):
    """A new, empty log in append mode: once cap_log cuts it short, the payload's next write
    lands at its new end, not beyond a hole at the old one. Whatever was at its path before (an
    earlier attempt's log, or a symlink planted there: job uuids are public, and the default
    log folder is under /tmp) is removed, never followed or written into."""
    flags = os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    for _ in range(3):
        try:
            return os.fdopen(os.open(path, flags, 0o644), 'a+b')   # read too: its tail is sent
        except FileExistsError:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
    raise FileExistsError('something keeps putting a file at %s' % path)


def cap_log(log_file, cap):
    """Cut a job's log back to `cap` bytes, the last of them a marker line, if it grew past.
    The payload may write more before the next look; that look cuts it again."""
    if not cap or os.fstat(log_file.fileno()).st_size <= cap:
        return
    marker = (CUT_MARKER % cap).encode()
    os.ftruncate(log_file.fileno(), cap - len(marker))
    os.write(log_file.fileno(), marker)


def remove_old_logs(joblog, max_age, now):
    """Remove the job logs (<uuid>.out and .err, and the spare ones a pilot killed -9 left)
    last written more than max_age seconds before now (a time.time()); any other file is left
    alone. Returns how many went."""
    removed = 0
    try:
        entries = list(os.scandir(joblog))
    except OSError:
        return 0
    for entry in entries:
        try:
            if ((JOB_LOG_NAME.match(entry.name) or SPARE_LOG_NAME.match(entry.name))
                    and entry.is_file(follow_symlinks=False)
                    and entry.stat(follow_symlinks=False).st_mtime < now - max_age):
                os.unlink(entry.path)
                removed += 1
        except OSError:
            pass          # removed by another pilot of the node, or not ours to remove
    return removed


def log_tail(log_file, size=LOG_TAIL):
    """The last `size` bytes of a job's log, read through the file the payload wrote."""
    log_file.flush()
    try:
        end = os.fstat(log_file.fileno()).st_size
        return os.pread(log_file.fileno(), size, max(0, end - size)).decode('utf-8', 'replace')
    except OSError:
        return ''


def copy_to_sandbox(executable, env, job_uuid):
    """P3S_MODE=COPY: a private copy of the executable in a fresh per-job directory."""
    source = executable if os.sep in executable else shutil.which(executable, path=env.get('PATH'))
    if not source or not os.path.isfile(source):
        raise FileNotFoundError('payload %r not found for P3S_MODE=COPY' % executable)
    sandbox = tempfile.mkdtemp(prefix='p3s-job-%s-' % job_uuid[:8])
    target = os.path.join(sandbox, os.path.basename(source))
    shutil.copy2(source, target)
    return sandbox, target


def command_for(job, env):
    """(command for Popen, shell?, sandbox or None) for a job's payload."""
    payload = job['payload'].strip()
    shell = 'P3S_EXECMODE' in job['env']
    if job['env'].get('P3S_MODE') != 'COPY':
        return (payload if shell else shlex.split(payload)), shell, None
    first = payload.split(None, 1)[0]
    sandbox, copy = copy_to_sandbox(shlex.split(first)[0], env, job['uuid'])
    env['P3S_SANDBOX'] = sandbox
    if shell:
        return shlex.quote(copy) + payload[len(first):], shell, sandbox
    return [copy] + shlex.split(payload)[1:], shell, sandbox


# ---------------------------------------------------------------------------------------------
# The batch job around the pilot
# ---------------------------------------------------------------------------------------------


def batch_id_from_environment(env=os.environ):
    """'slurm:<job id>' or 'htcondor:<cluster>.<proc>' when run by a batch system, else ''."""
    if env.get('SLURM_JOB_ID'):
        return 'slurm:' + env['SLURM_JOB_ID']
    ad = {}
    try:
        with open(env.get('_CONDOR_JOB_AD') or '') as f:
            ad = dict(line.split(' = ', 1) for line in f.read().splitlines() if ' = ' in line)
    except OSError:
        pass
    if ad.get('ClusterId', '').isdigit() and ad.get('ProcId', '').isdigit():
        return 'htcondor:%s.%s' % (ad['ClusterId'], ad['ProcId'])
    return ''


def batch_end(env=os.environ):
    """The end of this pilot's Slurm job (seconds since the epoch), or None. Newer Slurm sets
    SLURM_JOB_END_TIME; 22.05 (Debian 12's) does not, and squeue tells."""
    if env.get('SLURM_JOB_END_TIME', '').isdigit():
        return float(env['SLURM_JOB_END_TIME'])
    if not env.get('SLURM_JOB_ID'):
        return None
    try:
        out = subprocess.run(['squeue', '-h', '-j', env['SLURM_JOB_ID'], '-o', '%e'],
                             capture_output=True, text=True, timeout=SQUEUE_TIMEOUT).stdout
        return time.mktime(time.strptime(out.strip(), '%Y-%m-%dT%H:%M:%S'))   # local time
    except (OSError, ValueError, subprocess.SubprocessError):
        return None                  # no squeue here, or no time limit ('Unknown', 'N/A')


# ---------------------------------------------------------------------------------------------
# The pilot
# ---------------------------------------------------------------------------------------------


class Interrupted(Exception):
    """Raised by the signal handler while the pilot only waits (for work, or to retry)."""


class Pilot:
    """One pilot. `clock` and `sleep` are the time it lives by; tests pass their own and call
    step() themselves."""

    def __init__(self, args, clock=time.monotonic, sleep=time.sleep):
        self.args = args
        self.clock = clock
        self.pause = sleep
        self.server = args.server
        self.uuid = str(uuidlib.uuid4())
        self.site_env = {}
        self.cycles_left = None
        self.pending = None           # the last job's final report, until the server has it
        self.spare = None             # the next job's logs, made ahead (ready_logs)
        self.signalled = None
        self.gone = False             # the server told us to stop
        self.next_tidy = None         # when to remove old job logs again (by clock)
        self.registered = False
        self.nonce = secrets.token_urlsafe(24)   # makes a repeated registration this pilot's
        self.secret = None            # given at registration: this pilot's own calls carry it
        self.pilot_timeout = None     # the server's: silence after which it takes us for lost
        self.contact = None           # (clock) when the last call the server answered was sent
        self.adopts = False           # a child subreaper: a payload's orphans come to us
        self.jobs_run = 0
        self.draining = False         # SIGUSR1 or a drain order: finish the job, take no more
        self.leaving = False
        self.ends = None              # by the clock: when a batch pilot must be gone
        self._interruptible = False

    # -- signals ------------------------------------------------------------------------------

    def on_signal(self, signum, frame):
        self.signalled = signum
        if self._interruptible:
            self._interruptible = False
            raise Interrupted()

    def on_drain(self, signum, frame):
        """SIGUSR1 (Slurm's warning before the wall time): the job runs on, no other starts."""
        self.draining = True
        if self._interruptible and not self.leaving:
            self._interruptible = False
            raise Interrupted()

    @contextmanager
    def interruptible(self):
        """While only waiting, a signal ends the wait at once."""
        if self.signalled:
            raise Interrupted()
        self._interruptible = True
        try:
            yield
        finally:
            self._interruptible = False

    def sleep(self, seconds):
        with self.interruptible():
            self.pause(seconds)

    # -- talking to the server ----------------------------------------------------------------

    def call(self, method, path, body=None, timeout=HTTP_TIMEOUT, until=None, token=None):
        """A request retried with back-off while the server is away (for ever, or until the
        clock reads `until`). Anything else (a refusal, a server that is not p3s) is raised at
        once: asking again would not change it. `body` may be a function, called for each
        attempt."""
        for attempt in range(10 ** 9):
            left = None if until is None else until - self.clock()
            try:
                return call(self.server, method, path, body() if callable(body) else body,
                            timeout if left is None else max(min(timeout, left), 0.1), token)
            except P3SError as e:
                if not e.transient or (until is not None and self.clock() >= until):
                    raise
                delay = min(BACKOFF[min(attempt, len(BACKOFF) - 1)] * random.uniform(0.8, 1.2),
                            BACKOFF_MAX)
                if until is None:
                    log.warning('%s; retrying in %.1f s', e, delay)
                    self.sleep(delay)
                else:
                    delay = min(delay, max(until - self.clock(), 0))
                    log.warning('%s; retrying in %.1f s (giving up in %.0f s)', e, delay,
                                until - self.clock())
                    self.pause(delay)

    def take_site_defaults(self):
        """Settings not given on the command line come from the site record, if there is one."""
        site = {}
        if self.args.site:
            sites = self.call('GET', '/api/sites?name=%s' % urllib.parse.quote(self.args.site))
            site = (sites.get('sites') or [{}])[0]
            if not site:
                log.warning('site %r is not defined on the server: built-in defaults apply',
                            self.args.site)
        for key, default in DEFAULTS.items():
            if getattr(self.args, key) is None:
                setattr(self.args, key, default if site.get(key) is None else site[key])
        self.site_env = site.get('env') or {}
        self.cycles_left = self.args.cycles if self.args.cycles > 0 else None
        log.info('settings: cycles %s, period %g s, beat %g s, wait %g s, site env %s',
                 self.args.cycles, self.args.period, self.args.beat, self.args.wait,
                 ','.join(sorted(self.site_env)) or 'none')

    def register(self, until=None):
        """Register (with the pilot token, if the server has tokens), and take the secret that
        this pilot's own calls carry from then on."""
        body = {'uuid': self.uuid, 'host': socket.gethostname(), 'site': self.args.site,
                'pid': os.getpid(), 'extra': self.args.extra, 'jobtypes': self.args.jobtypes,
                'nonce': self.nonce}
        sent = self.clock()
        reply = self.call('POST', '/api/pilots', body, until=until)
        self.secret, self.contact = reply.get('secret'), sent
        self.pilot_timeout = reply.get('pilot_timeout')
        self.registered = True
        log.info('registered as %s with %s (site %r, jobtypes %s)', self.uuid, self.server,
                 self.args.site, ','.join(self.args.jobtypes) or 'any')
        self.fit_timeout(reply.get('pilot_timeout'))
        return reply

    def fit_timeout(self, pilot_timeout):
        """Talk to the server often enough that it never takes this pilot for lost."""
        if not pilot_timeout:
            return
        most = pilot_timeout / 3.0
        for name in ('beat', 'period', 'wait'):
            if getattr(self.args, name) > most:
                log.info('--%s lowered to %.1f s: the server loses pilots silent for %.0f s',
                         name, most, pilot_timeout)
                setattr(self.args, name, most)

    def find_end(self, wall_clock=time.time):
        """A batch pilot's end: --lifetime from now, or its batch job's end, whichever is first
        (Slurm is asked only when no --lifetime is given)."""
        now = self.clock()
        ends = [now + self.args.lifetime] if self.args.lifetime else []
        end = batch_end() if not ends or os.environ.get('SLURM_JOB_END_TIME') else None
        if end is not None:
            ends.append(now + end - wall_clock())
        self.ends = min(ends) if ends else None
        if self.ends is not None:
            log.info('this pilot leaves within %.0f s (its batch job ends then)',
                     self.ends - now)

    def time_left(self):
        """Seconds a job may run and still end before this pilot must be gone; None: no end."""
        if self.ends is None:
            return None
        return self.ends - END_MARGIN - self.clock()

    def request_work(self):
        def body():
            request = {'wait': self.args.wait, 'report': self.final_report()}
            left = self.time_left()               # now: a retried request has less of it
            if left is not None:
                request.update(left=int(max(left, 0)), wait=min(self.args.wait, max(left, 0)))
            return request
        with self.interruptible():
            reply = self.call_own('work', body, timeout=self.args.wait + HTTP_TIMEOUT)
        if self.pending:
            note = reply.get('report', {})
            if note.get('status') == 'REFUSED':
                log.warning('server refused the report on job %s: %s', self.pending['job'],
                            note.get('error'))
            self.pending = None
        return reply

    def final_report(self):
        """The pending final report as sent now: its times are durations up to this moment."""
        if not self.pending:
            return None
        report = dict(self.pending)
        now = self.clock()
        started, ended = report.pop('started'), report.pop('ended')
        if started is not None:
            report['elapsed'] = now - started
        report['ago'] = now - ended
        return report

    def report(self, job_uuid, state, **fields):
        """The start report: one attempt, as the final report will do in its place."""
        try:
            return self.tell('report', dict(fields, job=job_uuid, state=state))
        except P3SError as e:
            log.warning('report %s on job %s not delivered: %s', state, job_uuid, e)
            return {'status': 'OK'}

    def heartbeat(self, job):
        """A heartbeat on a job (its uuid and attempt: a server that lost the job's dispatch in a
        crash gives it back to this pilot)."""
        try:
            return self.tell('heartbeat', {'job': job['uuid'], 'attempt': job.get('attempt')})
        except P3SError as e:
            log.warning('heartbeat not delivered (the payload goes on): %s', e)
            return {'status': 'OK'}

    def beat(self, job):
        """A heartbeat; returns its order (OK, KILL, STOP) and takes note of a drain order."""
        reply = self.heartbeat(job)
        if reply.get('drain') and not self.draining:
            log.info('drain ordered: job %s runs to its end, then this pilot leaves', job['uuid'])
            self.draining = True
        return reply.get('status')

    # -- who this pilot is: its own calls carry its secret -------------------------------------

    def own(self, action):
        return '/api/pilots/%s/%s' % (self.uuid, action)

    def call_own(self, action, body=None, timeout=HTTP_TIMEOUT, until=None):
        """One of this pilot's own calls (work, report, stop), retried while the server is
        away. A server that does not know this pilot (its database was restored from before
        the pilot registered) is told again who the pilot is, and asked once more."""
        sent = self.clock()
        try:
            reply = self.call('POST', self.own(action), body, timeout, until, self.secret)
        except P3SError as e:
            if e.status != 404:
                raise
            self.rejoin(e, until)
            reply = self.call('POST', self.own(action), body, timeout, until, self.secret)
        self.contact = sent
        return reply

    def tell(self, action, body):
        """One attempt of one of its own calls while the payload runs (a heartbeat, a start
        report): the next one, or the final report, says it again if this one is lost."""
        sent = self.clock()
        try:
            reply = call(self.server, 'POST', self.own(action), body, BEAT_TIMEOUT, self.secret)
        except P3SError as e:
            if e.status == 404:
                self.rejoin(e, self.clock() + BEAT_TIMEOUT)
            raise
        self.contact = sent
        return reply

    def cut_off(self, job):
        """Whether the server has heard nothing from this pilot for its whole pilot timeout
        while it runs a job that may be retried: the server takes the pilot for lost and may
        run the job again, so this attempt must end now (the server waits for that)."""
        return bool(job.get('retries') and self.pilot_timeout and self.contact is not None
                    and self.clock() - self.contact > self.pilot_timeout)

    def rejoin(self, refusal, until=None):
        log.warning('%s: registering again', refusal)
        self.register(until)

    # -- one job ------------------------------------------------------------------------------

    def job_environment(self, job):
        """A payload's whole environment: the job's env over the site's, the variables that
        --pass-env names (from the pilot's own environment), and P3S_JOB_UUID, P3S_PILOT_UUID
        and P3S_SERVER. Nothing else of the pilot's, its tokens above all."""
        env = {name: os.environ[name] for name in self.args.pass_env if name in os.environ}
        env.update(self.site_env)
        env.update(job['env'])
        env.update(P3S_JOB_UUID=job['uuid'], P3S_PILOT_UUID=self.uuid, P3S_SERVER=self.server)
        return env

    def run_job(self, job):
        """Run a job's payload to its end; returns its final report."""
        job_uuid = job['uuid']
        out_path = os.path.join(self.args.joblog, job_uuid + '.out')
        err_path = os.path.join(self.args.joblog, job_uuid + '.err')
        env = self.job_environment(job)
        sandbox = None
        try:
            out, err = self.job_logs(out_path, err_path)
        except OSError as e:
            log.error('job %s: cannot write its logs in %s: %s', job_uuid, self.args.joblog, e)
            return {'job': job_uuid, 'state': 'nonstarter', 'errcode': None, 'pid': None,
                    'stdout': '', 'stderr': 'nonstarter: cannot write the job logs: %s' % e,
                    'started': None, 'ended': self.clock(), 'attempt': job.get('attempt')}
        try:
            with out, err:
                try:
                    command, shell, sandbox = command_for(job, env)
                    proc = start_payload(command, shell, env, out, err)
                except (OSError, ValueError, IndexError) as e:
                    err.write(('nonstarter: %s\n' % e).encode())
                    log.warning('job %s (%s) could not start: %s: %s', job_uuid,
                                job['jobtype'], job['payload'], e)
                    state, errcode, pid, started = 'nonstarter', None, None, None
                else:
                    started = self.clock()
                    log.info('job %s (%s) started, pid %d: %s', job_uuid, job['jobtype'],
                             proc.pid, job['payload'])        # not before: it costs 0.1 ms
                    state, errcode = self.supervise(proc, job, started, (out, err))
                    pid = proc.pid
                ended = self.clock()
                if pid is not None:
                    self.end_leftovers(job_uuid, pid)
                self.cap_logs((out, err))
                stdout, stderr = log_tail(out), log_tail(err)
        finally:
            if sandbox:
                shutil.rmtree(sandbox, ignore_errors=True)
        log.info('job %s %s (errcode %s)', job_uuid, state, errcode)
        return {'job': job_uuid, 'state': state, 'errcode': errcode, 'pid': pid,
                'stdout': stdout, 'stderr': stderr,
                'started': started, 'ended': ended, 'attempt': job.get('attempt')}

    # A file's creation can cost a millisecond or more (a busy local disk, a shared file system),
    # its renaming far less: the pilot makes its next job's logs while it waits for the job.

    def spare_paths(self):
        return [os.path.join(self.args.joblog, '.%s.next.%s' % (self.uuid, kind))
                for kind in ('out', 'err')]

    def ready_logs(self):
        """Make the next job's logs, if not made yet; on trouble they are made when the job
        comes, and the trouble reported then."""
        if self.spare is None:
            try:
                self.spare = open_logs(self.args.joblog, *self.spare_paths())
            except OSError:
                pass

    def job_logs(self, out_path, err_path):
        """The job's .out and .err: the spare logs renamed (a rename replaces whatever was at
        the path, a planted symlink included, never following it), else new ones."""
        spare, self.spare = self.spare, None
        if spare is not None:
            try:
                for path, new_path in zip(self.spare_paths(), (out_path, err_path)):
                    os.rename(path, new_path)
                return spare
            except OSError:
                self.drop_logs(spare)
        return open_logs(self.args.joblog, out_path, err_path)

    def drop_logs(self, spare):
        for log_file, path in zip(spare, self.spare_paths()):
            log_file.close()
            try:
                os.unlink(path)
            except OSError:
                pass

    def end_leftovers(self, job_uuid, group):
        left, alive = end_leftovers(group, self.adopts)
        if left:
            log.warning('job %s left %s behind: %s', job_uuid,
                        count_of(left, 'process', 'processes'),
                        '%d could not be ended' % alive if alive else 'ended')

    def supervise(self, proc, job, started, logs):
        """Wait for the payload, heartbeating every beat, killing it at its timelimit, on a kill
        order or on a signal, keeping its logs within their size. Returns (final state, errcode).

        The start report goes out only if the payload is still running after
        START_REPORT_DELAY: a short job costs the server one request, its final report."""
        limit_at = started + job['timelimit']
        next_beat = started + self.args.beat
        start_report_at = started + START_REPORT_DELAY
        while True:
            timeout = min(limit_at, next_beat, start_report_at) - self.clock()
            try:
                code = wait_exit(proc, max(0.0, min(timeout, LOG_CHECK)))
                return ('finished' if code == 0 else 'failed'), code
            except subprocess.TimeoutExpired:
                pass
            self.cap_logs(logs)
            now = self.clock()
            order = None
            if self.signalled:
                order = 'signal'
            elif now >= limit_at:
                log.warning('job %s reached its timelimit of %d s', job['uuid'], job['timelimit'])
                kill_group(proc)
                return 'timelimit', proc.returncode
            elif self.cut_off(job):
                log.error('job %s killed: the server has not answered for %.0f s, takes this '
                          'pilot for lost and may run the job again', job['uuid'],
                          now - self.contact)
                kill_group(proc)
                return 'lost', proc.returncode
            elif now >= start_report_at:
                start_report_at = float('inf')
                order = self.report(job['uuid'], 'running', pid=proc.pid, elapsed=now - started,
                                    attempt=job.get('attempt')).get('status')
            elif now >= next_beat:
                next_beat = now + self.args.beat
                order = self.beat(job)
            if order in ('KILL', 'STOP', 'signal'):
                log.warning('job %s killed: %s', job['uuid'], order)
                self.gone = self.gone or order == 'STOP'
                kill_group(proc)
                return 'killed', proc.returncode

    def cap_logs(self, logs):
        for log_file in logs:
            cap_log(log_file, self.args.max_log_size)

    # -- the loop -----------------------------------------------------------------------------

    def tidy_when_due(self):
        """Remove old job logs: at the first step, then every TIDY_PERIOD (by the clock)."""
        now = self.clock()
        if not self.args.keep_logs or (self.next_tidy is not None and now < self.next_tidy):
            return
        self.next_tidy = now + TIDY_PERIOD
        removed = remove_old_logs(self.args.joblog, self.args.keep_logs * 86400, time.time())
        if removed:
            log.info('removed %d job logs older than %g days from %s', removed,
                     self.args.keep_logs, self.args.joblog)

    def step(self):
        """One cycle: ask for work (delivering the last report), run what comes. Returns whether
        the pilot goes on."""
        left = self.time_left()
        if self.draining or (left is not None and left < 1):
            log.info('%s: leaving', 'drained' if self.draining else 'end of its lifetime')
            return False
        self.tidy_when_due()
        self.ready_logs()
        reply = self.request_work()
        if reply.get('status') == 'STOP':
            log.warning('server says stop: this pilot is %s%s', reply.get('state'),
                        ' (drained)' if reply.get('drain') else '')
            self.gone = True
            return False
        if reply.get('state') == 'dispatched':
            self.pending = self.run_job(reply['job'])
            self.jobs_run += 1
        elif not reply.get('waited'):             # the server did not hold the request
            self.sleep(self.args.period if left is None else min(self.args.period, left))
        if self.cycles_left is not None:
            self.cycles_left -= 1
        return not self.gone and not self.signalled and self.cycles_left != 0

    def finish(self):
        """Deliver the last report and leave: `stopped`, or `killed` after a signal."""
        self.leaving = True
        if self.spare is not None:
            self.drop_logs(self.spare)
            self.spare = None
        try:
            self.deliver_and_leave()
        except Interrupted:
            self.deliver_and_leave()          # signalled now, so its patience is bounded

    def deliver_and_leave(self):
        """A signalled pilot tries for SHUTDOWN_PATIENCE seconds in all, a batch pilot until its
        end; one that used up its cycles tries until the server is back. A pilot that never
        registered has nothing to say."""
        if not self.registered:
            return
        until = self.clock() + SHUTDOWN_PATIENCE if self.signalled else None
        if until is None and self.ends is not None:
            until = max(self.ends, self.clock() + SHUTDOWN_PATIENCE)
        try:
            if self.pending:
                self.call_own('report', self.final_report, until=until)
                self.pending = None
            if not self.gone:
                state = 'killed' if self.signalled else 'stopped'
                self.call_own('stop', {'state': state},
                              until=until or self.clock() + SHUTDOWN_PATIENCE)
                log.info('pilot %s %s', self.uuid, state)
        except P3SError as e:
            log.error('leaving without the server: %s', e)

    def run(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self.on_signal)
        signal.signal(signal.SIGUSR1, self.on_drain)
        self.adopts = prctl(PR_SET_CHILD_SUBREAPER, 1)
        if not self.adopts:
            log.warning('cannot become a child subreaper (Linux only): what a payload leaves '
                        'behind outside its process group is not ended')
        log.info('payloads die with this pilot through %s',
                 pdeathsig_wrapper() or 'a preexec_fn (no setpriv --pdeathsig here)')
        try:
            self.take_site_defaults()
            self.find_end()
            self.register()
            while self.step():
                pass
        except Interrupted:
            log.info('signal %s: stopping', self.signalled or 'SIGUSR1 (drain)')
        self.finish()
        return EXIT_OK


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


def default_dir(kind):
    return os.path.join(tempfile.gettempdir(), user_name() or 'p3s', 'p3s', kind)


def read_json_file(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, UnicodeDecodeError) as e:
        raise P3SError('cannot read %s: %s' % (path, getattr(e, 'strerror', None) or e),
                       EXIT_INPUT) from None
    except ValueError as e:
        raise P3SError('%s is not valid JSON: %s' % (path, e), EXIT_INPUT) from None


def read_site(path):
    """A site file of the original format (numbers may be strings, env may be a JSON string or
    the original's Python repr) as the API takes it."""
    raw = read_json_file(path)
    if not isinstance(raw, dict):
        raise P3SError('%s must hold a JSON object' % path, EXIT_INPUT)
    site = {}
    for key, value in raw.items():
        key = SITE_KEYS.get(key, key)
        if key == 'server':
            continue
        if key in ('period', 'beat', 'wait', 'cycles', 'pilots', 'lifetime', 'max_pending',
                   'pending_timeout'):
            value = as_number(value, key, path)
        site[key] = value
    site['env'] = env_object(site.get('env'), path)
    return site


def as_number(value, key, path):
    if not isinstance(value, str):
        return value
    try:
        number = float(value.strip())
    except ValueError:
        raise P3SError('%s: %s must be a number, not %r' % (path, key, value), EXIT_INPUT) from None
    return int(number) if number.is_integer() else number


def env_object(env, path):
    if isinstance(env, str):
        text = env.strip() or '{}'
        try:
            env = json.loads(text)
        except ValueError:
            try:
                env = json.loads(text.replace("'", '"'))   # the original stored a Python repr
            except ValueError:
                raise P3SError('%s: env is not a JSON object' % path, EXIT_INPUT) from None
    if not isinstance(env or {}, dict):
        raise P3SError('%s: env must be a JSON object' % path, EXIT_INPUT)
    return {k: v if isinstance(v, str) else json.dumps(v) for k, v in (env or {}).items()}


def define_site(args):
    site = call(args.server, 'POST', '/api/sites', read_site(args.define_site),
                token=environment_token(('P3S_TOKEN',)))['site']
    print(json.dumps(site, indent=1))
    return EXIT_OK


def drain_pilots(args):
    """Order each pilot to drain: it finishes its job, takes no more, and leaves."""
    for pilot_uuid in [u for u in args.drain.split(',') if u]:
        pilot = call(args.server, 'POST', '/api/pilots/%s/drain' % quote(pilot_uuid), {},
                     token=os.environ.get('P3S_TOKEN'))['pilot']
        print('pilot %s (%s on %s) drains: it leaves after its job' % (
            pilot['uuid'], pilot['state'], pilot['host'] or '?'))
    return EXIT_OK


def parse_args(argv):
    env = os.environ.get
    ap = Parser(prog='p3s_pilot.py', description='The p3s pilot.', epilog=EXIT_CODES)
    ap.add_argument('-S', '--server', type=server_url,
                    default=env('P3S_SERVER') or DEFAULT_SERVER,
                    help='server URL or HOST:PORT; several, comma-separated, are tried in '
                    'turn (P3S_SERVER; default %s)' % DEFAULT_SERVER)
    ap.add_argument('--token-file', type=token_file, metavar='FILE',
                    help='read the pilot token from FILE, at each registration (else from the '
                    'file P3S_PILOT_TOKEN_FILE or P3S_TOKEN_FILE names, or from P3S_PILOT_TOKEN '
                    'or P3S_TOKEN)')
    ap.add_argument('-s', '--site', default=env('P3S_SITE', ''), help='site name (P3S_SITE)')
    ap.add_argument('-L', '--joblog', default=env('P3S_JOBLOG') or default_dir('jobs'),
                    help='directory of <job uuid>.out/.err (P3S_JOBLOG)')
    ap.add_argument('-l', '--pilotlog', default=env('P3S_PILOTLOG') or default_dir('pilots'),
                    help='directory of <pilot uuid>.log (P3S_PILOTLOG)')
    # Defaults of None: a value not given here comes from the site record, else DEFAULTS.
    ap.add_argument('-c', '--cycles', type=int,
                    help='job requests before exiting; 0 = for ever (site, else 1)')
    ap.add_argument('-p', '--period', type=float,
                    help='seconds between requests when the server cannot hold one (site, else 5)')
    ap.add_argument('-b', '--beat', type=float,
                    help='seconds between heartbeats while a job runs (site, else 5)')
    ap.add_argument('-w', '--wait', type=float,
                    help='seconds a request may wait on the server for a job, at most 30 '
                    '(site, else 30; 0 = plain polling)')
    ap.add_argument('-j', '--jobtypes', default='',
                    help='comma-separated job types this pilot runs (default: any)')
    ap.add_argument('-e', '--extra', default=None, help='free text stored with the pilot, '
                    'e.g. a batch job id (default: slurm:$SLURM_JOB_ID in a Slurm job)')
    ap.add_argument('--lifetime', type=float, help='seconds this pilot may live: it takes no '
                    'job that would outlast them (default: its Slurm job\'s end, else none)')
    ap.add_argument('--keep-logs', type=float, default=DEFAULT_KEEP_LOGS, metavar='DAYS',
                    help='remove job logs last written more than DAYS ago from the job log '
                    'folder, at start and every %d hours (default %g; 0 keeps them)'
                    % (TIDY_PERIOD // 3600, DEFAULT_KEEP_LOGS))
    ap.add_argument('--max-log-size', type=byte_size, default=DEFAULT_MAX_LOG_SIZE, metavar='N',
                    help="cut each job's .out and .err at N bytes, or N with k, M or G, ending "
                    'with a marker line (default %s; 0: no limit)' % DEFAULT_MAX_LOG_SIZE)
    ap.add_argument('--pass-env', type=variable_names, default=(), metavar='NAME[,NAME...]',
                    help="variables of the pilot's own environment that payloads get too (e.g. "
                    'PATH,HOME); by default a payload gets its job\'s env and the P3S_ ones only')
    ap.add_argument('--define-site', metavar='SITE.JSON',
                    help='define (or replace) the site in SITE.JSON on the server, then exit')
    ap.add_argument('--drain', metavar='UUID[,UUID...]',
                    help='order these pilots to finish their job, take no more and leave')
    args = ap.parse_args(argv)
    if not all(math.isfinite(v) for v in (args.period, args.beat, args.wait, args.keep_logs)
               if v is not None):
        ap.error('--period, --beat, --wait and --keep-logs must be numbers')
    if ((args.cycles is not None and args.cycles < 0) or (args.period or 0) < 0
            or (args.beat is not None and args.beat <= 0)
            or (args.wait is not None and not 0 <= args.wait <= 30) or args.keep_logs < 0
            or (args.lifetime is not None and args.lifetime <= 0)):
        ap.error('--cycles, --period and --keep-logs must be >= 0, --beat and --lifetime > 0, '
                 '--wait between 0 and 30')
    if 0 < args.max_log_size < SIZE_UNITS['k']:
        ap.error('--max-log-size must be 0 (no limit) or at least 1k')
    args.jobtypes = [t for t in args.jobtypes.split(',') if t]
    if args.extra is None:
        args.extra = batch_id_from_environment()
    return args


def variable_names(text):
    """--pass-env: names of environment variables, none of them one of the pilot's secrets."""
    names = tuple(n.strip() for n in text.split(',') if n.strip())
    secret = [n for n in names if n in SECRET_VARIABLES]
    if secret:
        raise argparse.ArgumentTypeError('%s holds a secret of the pilot: it is never given to '
                                         'a payload' % secret[0])
    return names


def byte_size(text):
    """A size in bytes: a number, or a number with k, M or G (powers of 1024)."""
    match = re.match(r'^(\d+)([kmg]?)$', text.strip().lower())
    if not match:
        raise argparse.ArgumentTypeError('%r is not a size: give bytes, or e.g. 512M or 1G' % text)
    return int(match.group(1)) * SIZE_UNITS[match.group(2)]


class TerminalFormat(logging.Formatter):
    """Warnings and errors on the terminal as one line each, in the clients' style."""

    def format(self, record):
        return '%s: %s: %s' % (PROG, record.levelname.lower(), record.getMessage())


def setup_logging(pilotlog, pilot_uuid):
    """Everything into <pilotlog>/<uuid>.log; warnings and errors on stderr too, so that
    whoever started the pilot sees why it waits (a wrong --server, a server that is down)."""
    os.makedirs(pilotlog, exist_ok=True)
    path = os.path.join(pilotlog, pilot_uuid + '.log')
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter('%(asctime)s %(levelname)s %(message)s'))
    log.addHandler(handler)
    terminal = logging.StreamHandler(sys.stderr)
    terminal.setLevel(logging.WARNING)
    terminal.setFormatter(TerminalFormat())
    terminal.addFilter(lambda record: getattr(record, 'terminal', True))
    log.addHandler(terminal)
    log.setLevel(logging.INFO)
    return path


def run_pilot(args):
    pilot = Pilot(args)
    try:
        path = setup_logging(args.pilotlog, pilot.uuid)
    except OSError as e:
        raise P3SError('cannot write the pilot log in %s: %s' % (args.pilotlog, e),
                       EXIT_INPUT) from None
    print('%s: pilot %s of %s, its log %s' % (PROG, pilot.uuid, args.server, path), flush=True)
    try:
        code = pilot.run()
    except P3SError as e:
        log.error('%s', e, extra={'terminal': False})      # run_command says it on the terminal
        raise
    print('%s: left after %s' % (PROG, count_of(pilot.jobs_run, 'job')), flush=True)
    return code


def count_of(n, one, many=None):
    """'1 job', '2 jobs'; '1 vertex', '3 vertices'."""
    return '%d %s' % (n, one if n == 1 else many or one + 's')


def main(argv=None):
    args = parse_args(argv)
    command = define_site if args.define_site else drain_pilots if args.drain else run_pilot
    return run_command(command, args)


if __name__ == '__main__':
    sys.exit(main())
