#!/usr/bin/env python3
"""p3s pilot: registers with the p3s server, pulls jobs, runs them and reports back.

usage: python p3s_pilot.py [--server URL] [--site NAME] [--joblog DIR] [--pilotlog DIR]
                           [--cycles N] [--period S] [--beat S] [--wait S]
                           [--jobtypes a,b] [--extra TEXT] [--lifetime S]
       python p3s_pilot.py --define-site site.json      define or replace a site, then exit
       python p3s_pilot.py --drain UUID[,UUID...]       order pilots to drain, then exit

Defaults come from the environment: P3S_SERVER (http://127.0.0.1:8080/), P3S_SITE,
P3S_JOBLOG (/tmp/$USER/p3s/jobs), P3S_PILOTLOG (/tmp/$USER/p3s/pilots); P3S_PILOT_TOKEN or
P3S_TOKEN is sent as a bearer token when set.

A pilot of a site defined on the server (--define-site, the original's inputs/sites/*.json:
name, env, pilotperiod, pilotcycles, pilotbeat, pilots, ...) takes the site's period, cycles,
beat and wait unless given on its own command line, and adds the site's env to every payload's
environment (the job's env wins). Without a site record the built-in defaults apply.

A cycle is one job run or one request that found nothing; --cycles 0 runs for ever. A request
waits on the server up to --wait seconds for a job, so a job submitted to an idle pilot starts
at once; when the server cannot hold the request the pilot polls again after --period.

Each payload runs in its own process group with the job's env plus P3S_JOB_UUID,
P3S_PILOT_UUID and P3S_SERVER; stdout and stderr go to <joblog>/<job uuid>.out and .err.
P3S_MODE=COPY in the job env copies the executable into a private sandbox (removed after the
job; its path is P3S_SANDBOX); P3S_EXECMODE (any value) runs the payload through the shell.
At the job's timelimit, or on a kill order, the whole group gets SIGTERM, then SIGKILL.
The pilot's log is <pilotlog>/<pilot uuid>.log.

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
import getpass
import http.client
import json
import logging
import os
import random
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
BACKOFF = (0.5, 1, 2, 4, 8, 15, 30)
SHUTDOWN_PATIENCE = 30.0     # seconds a signalled pilot keeps trying to deliver its report
# Settings a site may give; the pilot's own flags win, then the site's, then these.
DEFAULTS = {'cycles': 1, 'period': 5.0, 'beat': 5.0, 'wait': 20.0}
# Keys of the original site files, as the server names them ('server' is ignored, as it was).
SITE_KEYS = {'pilotperiod': 'period', 'pilotcycles': 'cycles', 'pilotbeat': 'beat',
             'pilotwait': 'wait', 'pilotlife': 'lifetime', 'pilots': 'pilots'}
START_REPORT_DELAY = 0.2     # a payload that ends sooner is reported once, at its end
# A batch pilot keeps this much of its wall time free: a job killed at its timelimit still has
# the kill grace and its final report before the end (the server counts with the same margin).
END_MARGIN = 10.0
SQUEUE_TIMEOUT = 10.0        # seconds to ask Slurm when this pilot's batch job ends

log = logging.getLogger('p3s_pilot')


# ---------------------------------------------------------------------------------------------
# The client skeleton: the same text in every p3s client (tests/test_clients.py compares them),
# so that each file still works when copied alone onto a node.
# ---------------------------------------------------------------------------------------------

EXIT_OK, EXIT_REFUSED, EXIT_USAGE, EXIT_UNREACHABLE, EXIT_INPUT = 0, 1, 2, 3, 4
EXIT_INTERRUPTED, EXIT_BROKEN_PIPE = 130, 141      # what a shell reports for SIGINT and SIGPIPE
EXIT_CODES = ('Exit codes: 0 ok, 1 refused by the server, 2 bad command line, 3 server '
              'unreachable, 4 bad local file, 130 interrupted.')


class P3SError(Exception):
    """A failure with a one-line message; `code` is the exit code it leads to."""

    def __init__(self, message, code=EXIT_REFUSED):
        super().__init__(message)
        self.code = code


class Parser(argparse.ArgumentParser):
    """argparse with the one-line errors of every other failure (the usage is one -h away)."""

    def error(self, message):
        self.exit(EXIT_USAGE, '%s: error: %s (see %s -h)\n' % (PROG, message, self.prog))


def server_url(text):
    """-S/--server and P3S_SERVER: a URL, or HOST:PORT for plain http."""
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
    """One JSON request to the server. The only code that touches urllib."""
    url = server.rstrip('/') + path
    headers = {'Content-Type': 'application/json', 'Accept': 'application/json'}
    token = token or next(filter(None, map(os.environ.get, TOKEN_VARIABLES)), None)
    if token:
        headers['Authorization'] = 'Bearer ' + token
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers=headers, method=method)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as reply:
            return read_reply(server, reply)
    except urllib.error.HTTPError as e:
        raise refusal(server, e) from None
    except (OSError, http.client.HTTPException) as e:
        reason = getattr(e, 'reason', None) or e
        raise P3SError('cannot reach the server at %s: %s' % (server, reason),
                       EXIT_UNREACHABLE) from None


def read_reply(server, reply):
    try:
        return json.loads(reply.read().decode() or '{}')
    except ValueError:
        raise P3SError('%s answered HTTP %d with no JSON: is it a p3s server?'
                       % (server, reply.status), EXIT_UNREACHABLE) from None


def refusal(server, http_error):
    """The error for an HTTP error reply: the server's one-line reason, or the suspicion that
    what answered is not a p3s server (every p3s error is JSON with an `error` field)."""
    try:
        reason = json.loads(http_error.read().decode())['error']
    except Exception:
        return P3SError('%s answered HTTP %d %s: is it a p3s server?'
                        % (server, http_error.code, http_error.reason), EXIT_UNREACHABLE)
    if http_error.code == 401:
        reason += ' (the token is read from %s)' % ' or '.join(TOKEN_VARIABLES)
    code = EXIT_UNREACHABLE if http_error.code >= 500 else EXIT_REFUSED
    return P3SError('server: %s (HTTP %d)' % (reason, http_error.code), code)


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
        return open(out_path, 'wb'), open(err_path, 'wb')
    except FileNotFoundError:
        os.makedirs(joblog, exist_ok=True)
        return open(out_path, 'wb'), open(err_path, 'wb')


def read_tail(path, size=LOG_TAIL):
    try:
        with open(path, 'rb') as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - size))
            return f.read().decode('utf-8', 'replace')
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
        self.signalled = None
        self.gone = False             # the server told us to stop
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

    def call(self, method, path, body=None, timeout=HTTP_TIMEOUT, patience=None):
        """A request retried with back-off while the server is unreachable (for ever, or for
        `patience` seconds). A refusal is raised at once. `body` may be a function, called
        for each attempt."""
        give_up = None if patience is None else self.clock() + patience
        for attempt in range(10 ** 9):
            try:
                return call(self.server, method, path, body() if callable(body) else body,
                            timeout)
            except P3SError as e:
                if e.code != EXIT_UNREACHABLE or (give_up and self.clock() > give_up):
                    raise
                delay = BACKOFF[min(attempt, len(BACKOFF) - 1)] * random.uniform(0.8, 1.2)
                log.warning('%s; retrying in %.1f s', e, delay)
                if patience is None:
                    self.sleep(delay)
                else:
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

    def register(self):
        body = {'uuid': self.uuid, 'host': socket.gethostname(), 'site': self.args.site,
                'pid': os.getpid(), 'extra': self.args.extra, 'jobtypes': self.args.jobtypes}
        reply = self.call('POST', '/api/pilots', body)
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
            reply = self.call('POST', '/api/pilots/%s/work' % self.uuid, body,
                              timeout=self.args.wait + HTTP_TIMEOUT)
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
            return call(self.server, 'POST', '/api/pilots/%s/report' % self.uuid,
                        dict(fields, job=job_uuid, state=state), BEAT_TIMEOUT)
        except P3SError as e:
            log.warning('report %s on job %s not delivered: %s', state, job_uuid, e)
            return {'status': 'OK'}

    def heartbeat(self, job_uuid):
        try:
            return call(self.server, 'POST', '/api/pilots/%s/heartbeat' % self.uuid,
                        {'job': job_uuid}, BEAT_TIMEOUT)
        except P3SError as e:
            log.warning('heartbeat not delivered (the payload goes on): %s', e)
            return {'status': 'OK'}

    def beat(self, job_uuid):
        """A heartbeat; returns its order (OK, KILL, STOP) and takes note of a drain order."""
        reply = self.heartbeat(job_uuid)
        if reply.get('drain') and not self.draining:
            log.info('drain ordered: job %s runs to its end, then this pilot leaves', job_uuid)
            self.draining = True
        return reply.get('status')

    # -- one job ------------------------------------------------------------------------------

    def job_environment(self, job):
        env = dict(os.environ)
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
        log.info('job %s (%s): %s', job_uuid, job['jobtype'], job['payload'])
        try:
            out, err = open_logs(self.args.joblog, out_path, err_path)
        except OSError as e:
            log.error('job %s: cannot write its logs in %s: %s', job_uuid, self.args.joblog, e)
            return {'job': job_uuid, 'state': 'nonstarter', 'errcode': None, 'pid': None,
                    'stdout': '', 'stderr': 'nonstarter: cannot write the job logs: %s' % e,
                    'started': None, 'ended': self.clock()}
        try:
            with out, err:
                try:
                    command, shell, sandbox = command_for(job, env)
                    proc = subprocess.Popen(command, shell=shell, env=env, stdout=out, stderr=err,
                                            stdin=subprocess.DEVNULL, start_new_session=True)
                except (OSError, ValueError, IndexError) as e:
                    err.write(('nonstarter: %s\n' % e).encode())
                    log.warning('job %s could not start: %s', job_uuid, e)
                    state, errcode, pid, started = 'nonstarter', None, None, None
                else:
                    started = self.clock()
                    state, errcode = self.supervise(proc, job, started)
                    pid = proc.pid
        finally:
            if sandbox:
                shutil.rmtree(sandbox, ignore_errors=True)
        log.info('job %s %s (errcode %s)', job_uuid, state, errcode)
        return {'job': job_uuid, 'state': state, 'errcode': errcode, 'pid': pid,
                'stdout': read_tail(out_path), 'stderr': read_tail(err_path),
                'started': started, 'ended': self.clock()}

    def supervise(self, proc, job, started):
        """Wait for the payload, heartbeating every beat, killing it at its timelimit, on a kill
        order or on a signal. Returns (final state, errcode).

        The start report goes out only if the payload is still running after
        START_REPORT_DELAY: a short job costs the server one request, its final report."""
        limit_at = started + job['timelimit']
        next_beat = started + self.args.beat
        start_report_at = started + START_REPORT_DELAY
        while True:
            timeout = min(limit_at, next_beat, start_report_at) - self.clock()
            try:
                code = wait_exit(proc, max(0.0, min(timeout, 1.0)))
                return ('finished' if code == 0 else 'failed'), code
            except subprocess.TimeoutExpired:
                pass
            now = self.clock()
            order = None
            if self.signalled:
                order = 'signal'
            elif now >= limit_at:
                log.warning('job %s reached its timelimit of %d s', job['uuid'], job['timelimit'])
                kill_group(proc)
                return 'timelimit', proc.returncode
            elif now >= start_report_at:
                start_report_at = float('inf')
                order = self.report(job['uuid'], 'running', pid=proc.pid,
                                    elapsed=now - started).get('status')
            elif now >= next_beat:
                next_beat = now + self.args.beat
                order = self.beat(job['uuid'])
            if order in ('KILL', 'STOP', 'signal'):
                log.warning('job %s killed: %s', job['uuid'], order)
                self.gone = self.gone or order == 'STOP'
                kill_group(proc)
                return 'killed', proc.returncode

    # -- the loop -----------------------------------------------------------------------------

    def step(self):
        """One cycle: ask for work (delivering the last report), run what comes. Returns whether
        the pilot goes on."""
        left = self.time_left()
        if self.draining or (left is not None and left < 1):
            log.info('%s: leaving', 'drained' if self.draining else 'end of its lifetime')
            return False
        reply = self.request_work()
        if reply.get('status') == 'STOP':
            log.warning('server says stop: this pilot is %s%s', reply.get('state'),
                        ' (drained)' if reply.get('drain') else '')
            self.gone = True
            return False
        if reply.get('state') == 'dispatched':
            self.pending = self.run_job(reply['job'])
        elif not reply.get('waited'):             # the server did not hold the request
            self.sleep(self.args.period if left is None else min(self.args.period, left))
        if self.cycles_left is not None:
            self.cycles_left -= 1
        return not self.gone and not self.signalled and self.cycles_left != 0

    def finish(self):
        """Deliver the last report and leave: `stopped`, or `killed` after a signal."""
        self.leaving = True
        try:
            self.deliver_and_leave()
        except Interrupted:
            self.deliver_and_leave()          # signalled now, so its patience is bounded

    def deliver_and_leave(self):
        """The last report is retried for ever, or until the pilot must be gone: after a
        signal for SHUTDOWN_PATIENCE, and a batch pilot until its end."""
        patience = SHUTDOWN_PATIENCE if self.signalled else None
        if patience is None and self.ends is not None:
            patience = max(self.ends - self.clock(), SHUTDOWN_PATIENCE)
        try:
            if self.pending:
                self.call('POST', '/api/pilots/%s/report' % self.uuid, self.final_report,
                          patience=patience)
                self.pending = None
            if not self.gone:
                state = 'killed' if self.signalled else 'stopped'
                self.call('POST', '/api/pilots/%s/stop' % self.uuid, {'state': state},
                          patience=SHUTDOWN_PATIENCE)
                log.info('pilot %s %s', self.uuid, state)
        except P3SError as e:
            log.error('leaving without the server: %s', e)

    def run(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self.on_signal)
        signal.signal(signal.SIGUSR1, self.on_drain)
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
                token=os.environ.get('P3S_TOKEN'))['site']
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
                    help='server URL or HOST:PORT (P3S_SERVER; default %s)' % DEFAULT_SERVER)
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
                    help='seconds a request may wait on the server for a job (site, else 20; '
                    '0 = plain polling)')
    ap.add_argument('-j', '--jobtypes', default='',
                    help='comma-separated job types this pilot runs (default: any)')
    ap.add_argument('-e', '--extra', default=None, help='free text stored with the pilot, '
                    'e.g. a batch job id (default: slurm:$SLURM_JOB_ID in a Slurm job)')
    ap.add_argument('--lifetime', type=float, help='seconds this pilot may live: it takes no '
                    'job that would outlast them (default: its Slurm job\'s end, else none)')
    ap.add_argument('--define-site', metavar='SITE.JSON',
                    help='define (or replace) the site in SITE.JSON on the server, then exit')
    ap.add_argument('--drain', metavar='UUID[,UUID...]',
                    help='order these pilots to finish their job, take no more and leave')
    args = ap.parse_args(argv)
    if ((args.cycles is not None and args.cycles < 0) or (args.period or 0) < 0
            or (args.beat is not None and args.beat <= 0)
            or (args.wait is not None and not 0 <= args.wait <= 30)
            or (args.lifetime is not None and args.lifetime <= 0)):
        ap.error('--cycles and --period must be >= 0, --beat and --lifetime > 0, --wait '
                 'between 0 and 30')
    args.jobtypes = [t for t in args.jobtypes.split(',') if t]
    if args.extra is None:
        args.extra = batch_id_from_environment()
    return args


def setup_logging(pilotlog, pilot_uuid):
    os.makedirs(pilotlog, exist_ok=True)
    handler = logging.FileHandler(os.path.join(pilotlog, pilot_uuid + '.log'))
    handler.setFormatter(logging.Formatter('%(asctime)s %(levelname)s %(message)s'))
    log.addHandler(handler)
    log.setLevel(logging.INFO)


def run_pilot(args):
    pilot = Pilot(args)
    try:
        setup_logging(args.pilotlog, pilot.uuid)
    except OSError as e:
        raise P3SError('cannot write the pilot log in %s: %s' % (args.pilotlog, e),
                       EXIT_INPUT) from None
    try:
        return pilot.run()
    except P3SError as e:
        log.error('%s', e)
        raise


def main(argv=None):
    args = parse_args(argv)
    command = define_site if args.define_site else drain_pilots if args.drain else run_pilot
    return run_command(command, args)


if __name__ == '__main__':
    sys.exit(main())
