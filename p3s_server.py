#!/usr/bin/env python3
"""p3s server: the job database, brokerage, housekeeping and the monitor.

    python p3s_server.py [--host 127.0.0.1] [--port 8080] [--db ./p3s.db] [--workers N]
                         [--threads N] [--max-waiters N] [--pilot-timeout S]
                         [--sync normal|full] [--keep-days N] [--request-timeout S]
                         [--log FILE] [--token-file FILE] [--pilot-token-file FILE]
                         [--token T] [--pilot-token T] [--private] [--insecure]
    python p3s_server.py check [--db ./p3s.db]
    python p3s_server.py purge --older 7d [--state S] [--db ./p3s.db]
    python p3s_server.py migrate --from ./p3s.db --to postgresql://…

A Bottle app on a WAL-mode SQLite database, served by gevent's WSGI server in one or several
processes on one port. Every write is one short `BEGIN IMMEDIATE` transaction; brokerage is a
single `UPDATE ... RETURNING` statement.

The file reads top-down, in these sections (tests/test_layout.py keeps them in this order):
configuration, database, recovery, wake-ups, postgresql, migration, validation, jobs, brokerage,
housekeeping, workflows, DQM controls, batch systems, data, dashboard numbers, metrics, API
routes, monitor routes, monitor graph layout, authorization, errors, front, processes, main.
Each domain section starts with the SQL it runs.
"""
import argparse
import bisect
import ctypes
import fcntl
import functools
import hashlib
import hmac
import io
import itertools
import json
import logging
import mmap
import os
import posixpath
import re
import resource
import secrets
import shutil
import signal
import socket
import sqlite3
import sys
import tempfile
import threading
import time
import urllib.parse
import uuid as uuidlib
from collections import deque
from contextlib import closing, contextmanager, nullcontext
from datetime import datetime, timedelta, timezone

import bottle
import gevent
import gevent.event
import gevent.pool
import gevent.pywsgi
import gevent.socket
import gevent.threadpool
import networkx
from bottle import Bottle, HTTPError, request, response

# ---------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------

VERSION = '0.1'
HERE = os.path.dirname(os.path.abspath(__file__))
# The schema, templates and static files sit beside this file in a checkout; a server installed
# with pip finds them in the folder its wheel puts beside it (setup.py).
SERVER_FILES = HERE if os.path.exists(os.path.join(HERE, 'schema.sql')) else os.path.join(
    HERE, 'p3s_server_files')
SCHEMA_FILE = os.path.join(SERVER_FILES, 'schema.sql')
SCHEMA_VERSION = 4
MIN_SQLITE = (3, 35, 0)          # UPDATE ... RETURNING

DEFAULT_PORT = 8080
DEFAULT_DB = './p3s.db'
LOOPBACK = ('127.0.0.1', 'localhost', '::1')
# The front: each connection is a greenlet, so an idle or slow client costs a file descriptor
# and a few kilobytes, and a held long poll costs no thread; the requests themselves run in
# small pools of threads (docs/performance.md).
DEFAULT_WORKERS = os.cpu_count() or 1   # server processes on one port
DEFAULT_THREADS = 8              # threads per process that run requests which read
WRITE_THREADS = 4                # threads per process that run requests which write
DEFAULT_MAX_WAITERS = 10000      # long polls held at once per process
MAX_CONNECTIONS = 20000          # open connections per process
REQUEST_TIMEOUT = 10.0           # seconds for a request's line and headers to arrive
KEEPALIVE_TIMEOUT = 75.0         # an idle connection is closed after this (longer than MAX_WAIT)
MIN_BODY_RATE = 50000            # bytes/s below which a request body is cut off
SHUTDOWN_GRACE = 10.0            # seconds for requests in flight when the server stops
MAX_WAKE_SLOTS = 100             # pilots woken for the free slots of one capped type
LISTEN_BACKLOG = 2048            # connections waiting to be accepted
PR_SET_PDEATHSIG = 1             # prctl(2): the signal a process gets when its parent dies
MAX_WAIT = 30.0                  # seconds a pilot may wait for work in one request
DEFAULT_PILOT_TIMEOUT = 120.0    # silence after which a pilot is lost
SWEEP_PERIOD = 5.0               # seconds between housekeeping passes (at most)
TIMELIMIT_GRACE = 60             # a running job this far past its timelimit is killed by the server
LOST_RETRY_DELAY = 20            # seconds a lost job with retries waits for its pilot to kill it
PURGE_BATCH = 1000               # rows deleted per transaction, so brokerage never waits long
PURGE_WORKFLOW_BATCH = 10        # workflows (with all their jobs) deleted per transaction
PURGE_PERIOD = 3600.0            # seconds between retention passes (--keep-days)
# The pool manager's defaults (p3s_batch.py). DIRAC keeps at most 10 pilots waiting per queue;
# Balsam cancels a batch job pending for 10 minutes (results go stale sooner than that).
DEFAULT_MAX_PENDING = 10
DEFAULT_PENDING_TIMEOUT = 600
REGISTER_GRACE = 300             # seconds a started batch job may take to become a pilot
PILOT_END_MARGIN = 10            # seconds a batch pilot keeps free before its end (the pilot's)
MAX_DURATION = 100 * 365 * 86400  # seconds: the longest timeout or age a command line may give
BUSY_TIMEOUT_MS = 10000
# A writer that has waited this long for SQLite's write lock means another process holds it:
# the other writers of this process answer 503 at once rather than queue behind it.
STALLED_WRITER = 2.0
STORAGE_RETRY_AFTER = 2          # seconds a client is told to wait after a 503

# Limits of what a request may carry.
MAX_BODY = 64 * 1024 * 1024      # bytes in one request body (10,000 jobs are about 5 MB)
MAX_JOBS_PER_SUBMIT = 100000
MAX_LIST = 100000                # rows in one listing
DEFAULT_LIST = 1000
MAX_TEXT = 256                   # names, users, types, hosts
MAX_PAYLOAD = 8192
MAX_ENV_VALUE = 65536
MAX_LOG_TAIL = 64 * 1024         # characters of stdout/stderr kept per job
MAX_TIMELIMIT = 10 ** 8
MAX_RETRIES = 100
INT_RANGE = (-2 ** 62, 2 ** 62)
MAX_GRAPHML = 1024 * 1024        # characters of GraphML in one DAG
MAX_DAG_VERTICES = 10000
MAX_DAG_EDGES = 100000
MAX_PATH = 4096                  # file names and directories of data
MAX_COMMENT = 4096
MAX_EXT = 16
MAX_CAP = 10 ** 6
MAX_MESSAGE = 64 * 1024
MAX_INJECT_FILES = 100000
MIN_NONCE = 16                   # characters of a pilot's registration nonce
# Why a queued job waits (job_waiting): what it looks at, at most.
WAIT_PILOT_KINDS = 50            # kinds of live pilots (site, job types)
WAIT_AHEAD_CAP = 10000           # queued jobs ahead of it, counted up to this many
MAX_BATCH_OPTIONS = 100          # extra sbatch options or submit-description lines of a site
MAX_BATCH_UPDATE = 10000         # batch jobs in one submission or update

# States. A terminal state is final; every transition names the state it expects.
JOB_STATES = ('template', 'defined', 'dispatched', 'running', 'finished', 'failed',
              'timelimit', 'nonstarter', 'lost', 'killed', 'stale', 'dropped', 'cancelled')
ACTIVE_STATES = ('dispatched', 'running')              # held by a pilot
QUEUED_STATES = ('template', 'defined')                # not yet handed out
LIVE_JOB_STATES = QUEUED_STATES + ACTIVE_STATES        # not yet ended
TERMINAL_STATES = ('finished', 'failed', 'timelimit', 'nonstarter', 'lost', 'killed',
                   'stale', 'dropped', 'cancelled')
BAD_END_STATES = ('failed', 'timelimit', 'nonstarter', 'lost')
# 'lost': a pilot cut off from the server for a pilot timeout kills a job that may be retried
# (the server will have taken the pilot for lost, and may run the job again).
REPORT_STATES = ('running', 'finished', 'failed', 'timelimit', 'nonstarter', 'killed', 'lost')
PILOT_STATES = ('active', 'idle', 'dispatched', 'running', 'stopped', 'lost', 'killed')
LIVE_PILOT_STATES = ('active', 'idle', 'dispatched', 'running')
PILOT_GONE = ('stopped', 'lost', 'killed')
WORKFLOW_STATES = ('template', 'defined', 'running', 'finished', 'failed', 'cancelled')
WORKFLOW_ENDED = ('finished', 'failed', 'cancelled')
# The engine's and the injector's data states; data clients may write others.
DATA_STATES = ('template', 'defined', 'available', 'skipped')
# A pilot submitted to a batch system: pending and running are live, the others final;
# never_registered ended without its pilot ever registering (a broken node or environment).
BATCH_SYSTEMS = ('slurm', 'htcondor')
BATCH_STATES = ('pending', 'running', 'finished', 'failed', 'cancelled', 'never_registered')
BATCH_LIVE = ('pending', 'running')
BATCH_ENDS = ('finished', 'failed', 'cancelled', 'ended')    # 'ended': gone, outcome unknown

# \Z, not $: a $ also matches before a final newline, and 'uuid\n' would pass as a uuid.
UUID_RE = re.compile(r'^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}\Z')
ENV_NAME_RE = re.compile(r'^[A-Za-z_][A-Za-z0-9_]*\Z')
# A UTF-16 surrogate in a JSON body: an escape such as \ud800, or its raw UTF-8 bytes (which
# json.loads lets through). Only a complete pair is text; a lone one cannot be stored.
SURROGATE_RE = re.compile(rb'\\u[dD][89a-fA-F]|\xed[\xa0-\xbf]')
CONTROL_RE = re.compile(r'[\x00-\x1f\x7f]')
NUL_REFUSED = 'the %s holds a NUL character (\\u0000), which p3s cannot store'
XML_DECLARATIONS_RE = re.compile(r'<!\s*(DOCTYPE|ENTITY)', re.IGNORECASE)

# The fields each kind of request may carry.
JOB_FIELDS = {'uuid', 'name', 'user', 'subhost', 'jobtype', 'payload', 'env', 'priority',
              'timelimit', 'deadline', 'site', 'state', 'retries'}
PILOT_FIELDS = {'uuid', 'host', 'site', 'pid', 'extra', 'jobtypes', 'nonce'}
REPORT_FIELDS = {'job', 'state', 'pid', 'errcode', 'stdout', 'stderr', 'elapsed', 'ago',
                 'attempt'}
DAG_FIELDS = {'name', 'user', 'description', 'graphml', 'replace'}
WORKFLOW_FIELDS = {'dag', 'name', 'user', 'description', 'state', 'fileinfo', 'jobinfo',
                   'deadline'}
EDGE_ATTRS = ('name', 'dirpath', 'datatype', 'datatag', 'comment')
SITE_FIELDS = {'name', 'period', 'cycles', 'beat', 'wait', 'pilots', 'lifetime', 'env', 'comment',
               'max_pending', 'pending_timeout', 'partition', 'account', 'options'}
# field: (integer?, lowest, highest) -- the pilot's own limits for the same settings, and the
# pool manager's (a site's batch jobs pending at once, and for how long)
SITE_NUMBERS = {'period': (False, 0, 86400), 'cycles': (True, 0, 10 ** 9),
                'beat': (False, 0.1, 86400), 'wait': (False, 0, MAX_WAIT),
                'pilots': (True, 0, 10 ** 6), 'lifetime': (True, 0, 10 ** 9),
                'max_pending': (True, 0, 10 ** 6), 'pending_timeout': (True, 0, 10 ** 9)}
BATCH_FIELDS = {'site', 'system', 'batchids', 'jobs'}
BATCH_OBSERVATION = {'batchid', 'state', 'host', 'reason', 'output'}
DATA_FIELDS = {'uuid', 'name', 'dirpath', 'datatype', 'datatag', 'state', 'comment', 'workflow',
               'source', 'sourceuuid', 'target', 'targetuuid'}
DATA_ADJUSTABLE = {'name', 'dirpath', 'datatype', 'state', 'comment', 'targetuuid'}
INJECT_FIELDS = {'files', 'jobs', 'dag', 'jobinfo', 'deadline', 'datatype', 'comment', 'dedup',
                 'max_files', 'user', 'name'}
DEDUP = ('path', 'name', 'none')
NOOP = 'noop'                    # a vertex of this jobtype finishes on the server at once

# The monitor.
MON_WINDOWS = (('1 min', 60), ('10 min', 600), ('1 h', 3600), ('2 h', 7200), ('24 h', 86400))
MON_GRAPH_MAX = 300              # vertices drawn; a larger graph is shown as tables only
MON_COUNT_CAP = 10000            # a listing counts its matches up to this many
MON_LISTING_KEYS = ('sort', 'page', 'perpage', 'refresh')   # taken besides a listing's filters
MON_PERPAGE = (25, 50, 100, 200, 400)
MON_MAX_PAGE = 10 ** 6           # pages of a listing (its offset must fit SQLite's integers)
MON_LATENCY_CAP = 20000          # starts used for the latency percentiles
MON_WAIT_ALARM = 600             # seconds a queued job may wait before the checklist fails
MON_FAIL_MIN, MON_FAIL_SHARE = 10, 0.5   # jobs that ended badly in an hour: when it is a failure
# Throughput spans: (name, bars, seconds a bar, characters of a stored time that name its bar)
MON_SPANS = (('1h', 60, 60, 16), ('24h', 24, 3600, 13), ('7d', 168, 3600, 13))
MON_REFRESH = ('0', '5', '10', '30', '60')    # seconds between reloads; 0: never
MON_DASHBOARD_REFRESH = '30'     # the dashboard hangs on wall screens: it reloads unless told not
MON_MAX_TYPES = 100              # job types on the dashboard
MON_DETAIL_ROWS = 200            # rows of a table on a detail page
MON_CLIP = 16                    # characters of a listing's cell beyond which it may be clipped
DASHBOARD_SERVICES = 10          # latest service messages on the dashboard
CHART_W, CHART_H = 600, 120

log = logging.getLogger('p3s')


def sql_set(states):
    """A tuple of constant names as an SQL list: ('a', 'b'). Only for the constants above, never
    for a value that came with a request (those are always bound)."""
    return '(%s)' % ', '.join("'%s'" % s for s in states)


# The state lists as the statements name them. A partial index is used only when the statement
# repeats its condition, so these are also the conditions of schema.sql's partial indexes.
SQL_ACTIVE = sql_set(ACTIVE_STATES)
SQL_LIVE_JOB = sql_set(LIVE_JOB_STATES)
SQL_QUEUED = sql_set(QUEUED_STATES)
SQL_TERMINAL = sql_set(TERMINAL_STATES)
SQL_LIVE_PILOT = sql_set(LIVE_PILOT_STATES)
SQL_PILOT_GONE = sql_set(PILOT_GONE)
SQL_WORKFLOW_ENDED = sql_set(WORKFLOW_ENDED)
SQL_BATCH_LIVE = sql_set(BATCH_LIVE)

# ---------------------------------------------------------------------------------------------
# Database
# ---------------------------------------------------------------------------------------------

# The columns each kind of object is read with, shared by the sections below.
JOB_COLUMNS = ('uuid, name, "user", subhost, jobtype, payload, env, priority, timelimit, '
               'deadline, deadline_at, retries, site, infile, workflow, state, pilot, host, pid, '
               'errcode, created_at, defined_at, dispatched_at, started_at, stopped_at, '
               'retry_of, attempt')
PILOT_COLUMNS = ('uuid, host, site, pid, extra, jobtypes, state, job, jobs_done, registered_at, '
                 'last_seen, stopped_at')
WORKFLOW_COLUMNS = ('uuid, name, "user", description, dag, state, comment, rootuuid, nvertices, '
                    'ndone, created_at, defined_at, started_at, stopped_at')
DATA_COLUMNS = ('uuid, name, dirpath, datatype, datatag, state, comment, workflow, source, '
                'sourceuuid, target, targetuuid, created_at, updated_at')
GET_JOB = 'SELECT ' + JOB_COLUMNS + ' FROM jobs WHERE uuid = :uuid'
# A pilot is read with its drain order, if any (the time it was given, else NULL).
PILOT_DRAIN = '(SELECT requested_at FROM pilot_drains WHERE pilot = pilots.uuid) AS drain'
GET_PILOT = 'SELECT ' + PILOT_COLUMNS + ', ' + PILOT_DRAIN + ' FROM pilots WHERE uuid = :uuid'
GET_WORKFLOW = 'SELECT ' + WORKFLOW_COLUMNS + ' FROM workflows WHERE uuid = :workflow'
COUNT_JOBS_BY_STATE = 'SELECT state, count(*) AS n FROM jobs GROUP BY state'
COUNT_PILOTS_BY_STATE = 'SELECT state, count(*) AS n FROM pilots GROUP BY state'
INTEGRITY_CHECK = 'PRAGMA integrity_check'


def utcnow():
    """The current time as stored: ISO 8601 UTC with microseconds (fixed width, sorts as text)."""
    return datetime.now(timezone.utc).isoformat(timespec='microseconds')


def seconds_before(now, seconds):
    """The stored time `seconds` before `now` (the same format, so it compares as text)."""
    then = datetime.fromisoformat(now).timestamp() - seconds
    return datetime.fromtimestamp(then, timezone.utc).isoformat(timespec='microseconds')


def seconds_between(earlier, later):
    if not earlier or not later:
        return None
    return (datetime.fromisoformat(later) - datetime.fromisoformat(earlier)).total_seconds()


def seconds_after(then, seconds):
    """SQL's p3s_seconds_after: the stored time `seconds` after `then` (NULL if either is)."""
    if then is None or seconds is None:
        return None
    return seconds_before(then, -seconds)


class Connection(sqlite3.Connection):
    serial_writes = True            # one writer at a time: what it read stays true till COMMIT
    commits_with_claim = False      # no data-modifying WITH (see CLAIM_MARKING_PILOT)

    def later(self, sql, params=()):
        """A statement whose result nobody reads: run now (PostgreSQL's waits for the next)."""
        self.execute(sql, params)

    def read_each(self, statements):
        """The rows of each of these reads (PostgreSQL's go in one message)."""
        return [self.execute(sql, params).fetchall() for sql, params in statements]


def connect(path):
    """Open the database with the whole connection policy in one place. Commits are not
    synced by SQLite (NORMAL): the store syncs the write-ahead log itself after a commit that
    must survive a power loss (WalSync)."""
    db = sqlite3.connect(path, isolation_level=None, check_same_thread=False,
                         timeout=BUSY_TIMEOUT_MS / 1000, factory=Connection)
    db.row_factory = sqlite3.Row
    db.create_function('p3s_seconds_after', 2, seconds_after, deterministic=True)
    db.create_function('p3s_seconds_between', 2, seconds_between, deterministic=True)
    db.execute('PRAGMA journal_mode = WAL')
    db.execute('PRAGMA synchronous = NORMAL')
    db.execute('PRAGMA foreign_keys = ON')
    db.execute('PRAGMA busy_timeout = %d' % BUSY_TIMEOUT_MS)
    return db


def check_sqlite():
    if sqlite3.sqlite_version_info < MIN_SQLITE:
        raise SystemExit('p3s_server: error: SQLite %s is too old: p3s needs 3.35 or newer '
                         '(UPDATE ... RETURNING)' % sqlite3.sqlite_version)


def apply_schema(db):
    """Bring a database of an older version up to date, then create what is missing; refuse a
    database written by a newer p3s."""
    found = db.execute('PRAGMA user_version').fetchone()[0]
    if found > SCHEMA_VERSION:
        raise SystemExit('p3s_server: error: the database has schema version %d, newer than this '
                         'server (%d)' % (found, SCHEMA_VERSION))
    schema, migrations = schema_parts('sqlite')
    if 0 < found < SCHEMA_VERSION:
        migrate(db, migrations)
    db.executescript(schema)


MIGRATION_MARK = re.compile(r'^-- migrate to (\d+):.*$', re.M)
DIALECT_MARK = re.compile(r'^-- \[(all|sqlite|postgresql)\]$', re.M)


def schema_parts(dialect, common=lambda text: text):
    """schema.sql for one dialect, as (the schema of a new database, [(version, the migration
    to it)]). Lines after `-- [sqlite]` or `-- [postgresql]` are that database's alone, up to
    `-- [all]`; `common` turns the rest into the dialect's. The migrations are SQLite's (a
    PostgreSQL schema starts at this version)."""
    with open(SCHEMA_FILE) as f:
        parts = MIGRATION_MARK.split(f.read())
    marked = DIALECT_MARK.split('-- [all]\n' + parts[0])
    schema = ''.join(common(text) if mark == 'all' else text
                     for mark, text in zip(marked[1::2], marked[2::2]) if mark in ('all', dialect))
    return schema, [(int(v), sql) for v, sql in zip(parts[1::2], parts[2::2])]


def migrate(db, migrations):
    """Run the migrations the database lacks, in order, in one transaction. The version is read
    again under the write lock: another server process may have migrated it meanwhile."""
    db.execute('BEGIN IMMEDIATE')
    try:
        found = db.execute('PRAGMA user_version').fetchone()[0]
        for version, sql in migrations:
            if found < version:
                for statement in sql_statements(sql):
                    db.execute(statement)
                # PRAGMA takes no bound values; the version is this file's own integer.
                db.execute('PRAGMA user_version = %d' % version)
                log.info('database migrated from schema version %d to %d', found, version)
                found = version
    except BaseException:
        db.execute('ROLLBACK')
        raise
    db.execute('COMMIT')


def sql_statements(script):
    """The statements of an SQL script one by one (executescript would commit each)."""
    statements, current = [], ''
    for line in script.splitlines(keepends=True):
        current += line
        if sqlite3.complete_statement(current):
            statements.append(current.strip())
            current = ''
    return statements


class SQLite:
    """The embedded database: a file, one writer at a time."""

    name = 'sqlite'
    serial_writes = True          # a thread lock before SQLite's own (see Store)
    conflicts = (sqlite3.IntegrityError,)
    unavailable = (sqlite3.OperationalError,)

    def __init__(self, path):
        self.path = path
        self.version = sqlite3.sqlite_version

    def connect(self):
        return connect(self.path)

    def begin(self, db, synced):
        db.execute('BEGIN IMMEDIATE')          # synced after the writer's turn (WalSync)

    def syncer(self):
        """What syncs a commit after the writer's turn (see Store.write)."""
        return WalSync(self.path + '-wal', run_directory(self.path))

    def writers_lock(self):
        """The turns of the server processes' writers (see Store)."""
        return FileLock(os.path.join(run_directory(self.path), 'writer.lock'))

    def apply_schema(self, db):
        apply_schema(db)

    def incarnation(self, db):
        """The machine's boot: the commits not yet synced wait in its page cache, which a
        server process that dies leaves behind, and a crash of the machine loses."""
        try:
            with open(BOOT_ID) as f:
                return 'boot ' + f.read().strip()
        except OSError:
            return 'boot unknown'       # not Linux: a crash of the machine goes unseen

    def integrity(self, db):
        return [r[0] for r in db.execute(INTEGRITY_CHECK)]

    def leader_lock(self, rundir):
        return FileLock(os.path.join(rundir, 'housekeeper.lock'))

    def trouble(self, error):
        return storage_trouble(error)

    def unreachable(self, error):
        return False                    # a file of this host: it is never away alone

    def wakeups(self, rundir):
        return Wakeups(rundir)


def is_postgres(db):
    return db.startswith(('postgresql://', 'postgres://'))


class NotSynced(Exception):
    """A commit was made but the disk refused to sync it: a power loss could undo it."""


class CommitCounts:
    """Two counters that the server processes on one SQLite file share, in a small file of
    their run directory mapped into each: the durable commits made (counted in the writers'
    turns) and the last of them known to be on disk. Aligned 8-byte words, read and written
    whole."""

    SIZE = 16

    def __init__(self, path):
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            if os.fstat(fd).st_size < self.SIZE:
                os.ftruncate(fd, self.SIZE)      # zeros; never shortens what another wrote
            self.map = mmap.mmap(fd, self.SIZE)
        finally:
            os.close(fd)
        self.words = (ctypes.c_uint64 * 2).from_buffer(self.map)

    @property
    def written(self):
        return self.words[0]

    def count_one(self):
        """In a writer's turn, which the processes take one at a time."""
        self.words[0] += 1
        return self.words[0]

    @property
    def synced(self):
        return self.words[1]

    @synced.setter
    def synced(self, value):
        self.words[1] = value

    def close(self):
        if self.map is not None:
            del self.words
            self.map.close()
            self.map = None


class WalSync:
    """Group commit for SQLite. Writers commit without a sync, in turn; a writer whose commit
    must survive a power loss then syncs the write-ahead log itself (fdatasync), outside its
    turn: the next writer goes on meanwhile, and one sync makes durable every commit written
    before it, so writers that wait here together share it. The commits are counted across
    the server processes, so that a writer knows whether another process's sync covered the
    commits it waits for; processes do not wait for each other's syncs (a process stopped in
    the middle of one would hold up the others). SQLite's synchronous = FULL syncs the same
    file at each commit, holding the write lock through it."""

    def __init__(self, path, rundir):
        self.path = path
        self.lock = threading.Lock()
        self.counts = CommitCounts(os.path.join(rundir, 'commits'))
        self.fd = -1

    def committed(self):
        """Count a durable commit, in its writer's turn: its number."""
        return self.counts.count_one()

    def last_commit(self):
        """The number of the last durable commit, read in a writer's turn: every commit that
        writer could see."""
        return self.counts.written

    def sync(self, commit):
        """Return once durable commit number `commit`, of any process, is on disk."""
        if self.counts.synced >= commit:
            return                       # the common case, a claim's: not behind a sync
        with self.lock:
            if self.counts.synced >= commit:
                return                   # a sync that began after it covered it
            upto = self.counts.written
            try:
                self.sync_file()
            except OSError as e:
                raise NotSynced('the disk could not sync the database (%s): the change is '
                                'made but a power loss could undo it; the same request, asked '
                                'again, syncs it' % (e.strerror or e))
            # Another process may write a smaller figure meanwhile: that costs a sync, no more.
            if upto > self.counts.synced:
                self.counts.synced = upto

    def sync_file(self):
        """fdatasync the log, on a descriptor opened anew if the file at its path is not the
        one opened before (SQLite removes the log when the last connection closes, in any
        process; with none left it was checkpointed into the database, and synced, first)."""
        try:
            on_disk = os.stat(self.path)
        except FileNotFoundError:
            return
        if self.fd < 0 or not os.path.samestat(os.fstat(self.fd), on_disk):
            self.close_file()
            self.fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        os.fdatasync(self.fd)

    def close_file(self):
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def close(self):
        self.close_file()
        self.counts.close()


def database(db):
    """The database a --db names: a PostgreSQL URL, or an SQLite file."""
    return PostgreSQL(db) if is_postgres(db) else SQLite(db)


def temporary_directory():
    """The temporary directory TMPDIR names now. tempfile keeps the first one it found, and a
    process may set TMPDIR after that (a test session does, so that the run directories of its
    stores go with its other files)."""
    named = os.environ.get('TMPDIR')
    return named if named and os.path.isdir(named) else tempfile.gettempdir()


def run_directory(db):
    """The directory where the server processes that share a database meet: their wake-up
    sockets and locks. Named after the database (an SQLite file's real path), so every process
    finds it; in the temporary directory, because a socket's path must be short."""
    name = db if is_postgres(db) else os.path.realpath(db)
    key = hashlib.sha1(name.encode()).hexdigest()[:16]
    path = os.path.join(temporary_directory(), 'p3s-%d-%s' % (os.getuid(), key))
    os.makedirs(path, mode=0o700, exist_ok=True)
    return path


class FileLock:
    """An exclusive lock shared by the processes that open the same file (flock): the kernel
    drops it when its holder dies, however it dies."""

    def __init__(self, path):
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)

    def try_acquire(self):
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        return True

    def acquire(self):
        """Wait for the lock: the kernel wakes a waiter when its holder lets go."""
        fcntl.flock(self.fd, fcntl.LOCK_EX)

    def release(self):
        fcntl.flock(self.fd, fcntl.LOCK_UN)

    def close(self):
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def held(self):
        return True                      # the kernel drops it only when this process dies


class Store:
    """The database as the server uses it: a pool of connections, one writer at a time.

    A connection is taken from the pool for one read or one transaction and given back, so
    any number of threads share a few connections. SQLite serialises writers anyway; taking a
    thread lock, then a file lock that the server processes on the same database share, first
    keeps an unlucky writer out of SQLite's busy-handler back-off (sleeps of up to 100 ms
    each), which costs up to seconds of tail latency (docs/performance.md): the kernel wakes
    the next writer the moment the last one lets go.

    `sync` is the promise made to clients: with 'full', a write that answers a client with a new
    fact (a submission, a dispatch, a job's end) is on disk before the answer; writes that can be
    recovered (heartbeats, start reports, housekeeping) are not synced. With 'normal' nothing is
    synced: a power loss may lose the last commits, never the database.
    """

    def __init__(self, path, sync='full', pilot_timeout=DEFAULT_PILOT_TIMEOUT, wakeups=None,
                 serving=True):
        self.path = path
        self.db = database(path)
        # An idle pilot's heartbeat is written at most this often, so that most idle polls
        # commit nothing. A poll is held at most a third of the pilot timeout, so the sweep
        # sees an idle pilot at most 7/12 of the timeout ago: alive, with room for delays.
        self.idle_touch = pilot_timeout / 4
        self.sync = sync
        self.wakeups = wakeups
        self.write_lock = threading.Lock() if self.db.serial_writes else nullcontext()
        self.writers_lock = self.db.writers_lock()
        self.syncer = self.db.syncer()
        self.stalled_since = None         # when the writer now in BEGIN IMMEDIATE began to wait
        self.idle = deque()               # connections not in use (append and pop are atomic)
        self.opened = []
        self.recovery = Recovery(pilot_timeout)
        with self.connection() as db:
            apply_schema_or_exit(self.db, db, path)
            if serving:                   # a tool (check, purge) leaves the recovery to servers
                self.recovery.check(self.db, db, utcnow())

    @contextmanager
    def connection(self):
        try:
            db = self.idle.pop()
        except IndexError:
            db = self.new_connection()
        try:
            yield db
        except self.db.unavailable as e:
            self.discard(db)              # it may be broken (a database restart): a new one next
            if self.db.unreachable(e):
                self.discard_idle()       # opened before it, they went with it
            raise
        except BaseException:
            self.idle.append(db)
            raise
        self.idle.append(db)

    def new_connection(self):
        """A connection of the pool. Once the schema is in place, each new one looks at the
        storage's incarnation first: a database server that restarted makes every connection
        new, and may have lost the last dispatches (Recovery)."""
        db = self.db.connect()
        try:
            if self.recovery.incarnation is not None:
                self.recovery.check(self.db, db, utcnow())
        except BaseException:
            db.close()
            raise
        self.opened.append(db)
        return db

    def discard(self, db):
        try:
            self.opened.remove(db)
            db.close()
        except Exception:
            pass

    def discard_idle(self):
        """Close every connection not in use now."""
        while True:
            try:
                self.discard(self.idle.pop())
            except IndexError:
                return

    def read(self):
        """A connection for reads outside a transaction: each statement sees the last commit."""
        return self.connection()

    def query(self, sql, params=None):
        """All rows of one read statement."""
        with self.read() as db:
            return db.execute(sql, params or {}).fetchall()

    def one(self, sql, params=None):
        """The first row of one read statement, or None."""
        with self.read() as db:
            return db.execute(sql, params or {}).fetchone()

    @contextmanager
    def write(self, durable=True):
        """One write transaction: BEGIN (IMMEDIATE: SQLite's write lock first) ... COMMIT,
        rolled back on any error. `durable`: the commit must survive a power loss (under
        --sync full). No write returns before the durable commits it could see are on disk,
        whatever process made them: nothing is answered, a dispatch above all, that rests on a
        commit a power loss could undo."""
        synced = durable and self.sync == 'full'
        with self.write_turn(), self.connection() as db:
            self.stalled_since = time.monotonic()
            try:
                self.db.begin(db, synced)
            finally:
                self.stalled_since = None
            try:
                yield db
                db.commit()
            except BaseException:
                db.rollback()           # if still open: a failed COMMIT may have rolled back
                raise
            # Counted in this writer's turn, synced after it: the next writer goes on meanwhile.
            upto = self.commit_to_sync(synced)
        if upto:
            self.syncer.sync(upto)

    def commit_to_sync(self, synced):
        """In a writer's turn, after its commit: the durable commit it must wait for, if any
        (its own, or the last one before it)."""
        if self.syncer is None or self.sync != 'full':
            return None
        return self.syncer.committed() if synced else self.syncer.last_commit()

    @contextmanager
    def write_turn(self):
        """This thread's turn to write, after the transaction of another thread of this
        process, then of another server process; but not behind a writer that has waited
        STALLED_WRITER seconds for its turn or for SQLite's write lock: another process holds
        it, and waiting in line here would only make each request wait out the busy timeout in
        turn. That is SQLite's own 'database is locked' (a 503), at once. (PostgreSQL's writers
        run at once: no turns.)"""
        if not self.db.serial_writes:
            yield
            return
        while not self.write_lock.acquire(timeout=STALLED_WRITER / 4):
            since = self.stalled_since
            if since is not None and time.monotonic() - since > STALLED_WRITER:
                raise sqlite3.OperationalError('database is locked')
        try:
            self.stalled_since = time.monotonic()
            try:
                self.writers_lock.acquire()          # the other server processes' turns
            finally:
                self.stalled_since = None
            try:
                yield
            finally:
                self.writers_lock.release()
        finally:
            self.write_lock.release()

    def wake(self, jobs):
        """Pilots waiting for work, in any server process, may run these (jobtype, site) now."""
        if jobs and self.wakeups is not None:
            self.wakeups.publish(jobs)

    def close(self):
        for db in self.opened:
            db.close()
        for held in (self.writers_lock, self.syncer):
            if held is not None:
                held.close()
        self.opened.clear()
        self.idle.clear()


# ---------------------------------------------------------------------------------------------
# Recovery: dispatches lost in a crash
# ---------------------------------------------------------------------------------------------

# A dispatch is committed without waiting for the disk: the next synced commit (a submission, a
# job's end) takes it along, and a server process that dies loses nothing. Only a crash of the
# machine (SQLite) or of the database server (PostgreSQL) between the two loses it, and puts its
# job back in the queue while its pilot runs it. So a server that finds the storage in another
# incarnation than the one the last dispatches were made in recovers before it dispatches the
# jobs queued before then: until every live pilot has been heard from (a pilot that runs a job
# the queue holds gets it back, ADOPT_JOB), a pilot timeout at most (a pilot silent that long is
# lost). Jobs submitted since go at once.
BOOT_ID = '/proc/sys/kernel/random/boot_id'
GET_RECOVERY = 'SELECT incarnation, began_at, ends_at, last_job FROM recovery'
FIRST_INCARNATION = """
INSERT INTO recovery (one, incarnation) VALUES (1, :incarnation) ON CONFLICT DO NOTHING
"""
NEW_INCARNATION = """
UPDATE recovery SET incarnation = :incarnation, began_at = :now, ends_at = :ends,
                    last_job = (SELECT coalesce(max(id), 0) FROM jobs)
 WHERE incarnation <> :incarnation
"""
# A live pilot not heard from since the recovery began, but the one asking. Must repeat the
# condition of the partial index pilots_live to use it.
UNHEARD_PILOT = """
SELECT uuid FROM pilots INDEXED BY pilots_live
 WHERE state IN """ + SQL_LIVE_PILOT + """ AND last_seen < :began AND uuid <> :pilot LIMIT 1
"""


def awaited_pilot(db, began, ends, now, asking=''):
    """A live pilot (not `asking`) that a recovery begun at `began` still waits for; None once
    it is over: every one heard from since, or `ends` passed."""
    if now >= ends:
        return None
    row = db.execute(UNHEARD_PILOT, {'began': began, 'pilot': asking}).fetchone()
    return row and row['uuid']


class Recovery:
    """This process's part of the recovery: which jobs wait (`last_job`: those numbered up to
    it; 0 when none does), while it lasts."""

    def __init__(self, timeout):
        self.timeout = timeout
        self.incarnation = None         # the storage's, as this process last found it
        self.began = self.ends = None
        self.last_job = 0

    def check(self, backend, db, now):
        """Take the storage's incarnation: a new one begins a recovery, for every server
        process (the first to see it records it; the others, and those started later, find
        the recovery recorded)."""
        found = backend.incarnation(db)
        if found == self.incarnation:
            return
        values = {'incarnation': found, 'now': now, 'ends': seconds_after(now, self.timeout)}
        backend.begin(db, True)
        try:
            db.execute(FIRST_INCARNATION, values)
            begun = db.execute(NEW_INCARNATION, values).rowcount
            row = db.execute(GET_RECOVERY).fetchone()
            db.commit()
        except BaseException:
            db.rollback()
            raise
        self.incarnation = found
        if begun:
            log.warning('the storage restarted (%s) since the last dispatches, which a crash may '
                        'have lost: the jobs queued before now wait until every live pilot has '
                        'been heard from (until %s at most); new jobs go at once', found,
                        row['ends_at'])
        if row['ends_at'] is not None and now < row['ends_at'] and row['last_job']:
            self.began, self.ends, self.last_job = (row['began_at'], row['ends_at'],
                                                    row['last_job'])

    def last_queued(self, db, pilot_uuid, now):
        """The last job that still waits for the recovery (0: none does). It ends when every
        live pilot but this one has been heard from since it began (this one is, now)."""
        if self.last_job and awaited_pilot(db, self.began, self.ends, now, pilot_uuid) is None:
            log.info('recovery over: every job in the queue may go')
            self.last_job = 0
        return self.last_job

    def heard_after(self, now, idle_touch):
        """An idle pilot seen since then need not be written again; in a recovery, one not seen
        since it began must be (the recovery waits for it)."""
        since = seconds_before(now, idle_touch)
        return max(since, self.began) if self.last_job else since


def counts(store):
    """Jobs and pilots by state."""
    return {'jobs': {r['state']: r['n'] for r in store.query(COUNT_JOBS_BY_STATE)},
            'pilots': {r['state']: r['n'] for r in store.query(COUNT_PILOTS_BY_STATE)}}


# ---------------------------------------------------------------------------------------------
# Wake-ups: jobs that became runnable, told to every server process
# ---------------------------------------------------------------------------------------------

WAKE_MESSAGE_MAX = 60000        # bytes in one datagram; a larger wake-up becomes "anything"
WAKE_ALL = b'[[null, null, 1000000000]]'   # any held pilot, all of them
WAKE_HERE_FIRST = b'!'          # before a wake-up: wake here, pass the rest on (Wakeups)
SOCKET_PATH_MAX = 107           # bytes in a Unix socket's path (Linux; the 108th is a NUL)
PID_MAX = 4194304               # the largest process id Linux gives


def wake_message(jobs):
    """jobs: (jobtype, site) of each job that became runnable, as one datagram."""
    counted = {}
    for key in jobs:
        counted[tuple(key)] = counted.get(tuple(key), 0) + 1
    return kinds_message([(t, s, n) for (t, s), n in counted.items()])


def kinds_message(kinds):
    """(jobtype, site, count) of runnable jobs as one datagram: a JSON list of [jobtype, site,
    count]. Too many kinds at once become WAKE_ALL: wake anyone."""
    message = json.dumps([list(kind) for kind in kinds]).encode()
    return message if len(message) <= WAKE_MESSAGE_MAX else WAKE_ALL


class Wakeups:
    """The server processes that share a database each listen on a Unix datagram socket in
    their run directory. A process that made jobs runnable sends the wake-up to itself first:
    it wakes the pilots it holds, and sends what is left, if anything, to each of the others
    (a job woken in two processes would cost a claim that finds nothing). Any thread may
    publish."""

    def __init__(self, rundir):
        self.dir = os.path.join(rundir, 'wake')
        os.makedirs(self.dir, mode=0o700, exist_ok=True)
        self.path = os.path.join(self.dir, '%d.sock' % os.getpid())
        if os.path.exists(self.path):
            os.unlink(self.path)               # a dead process of the same pid left it
        self.inbox = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.inbox.bind(self.path)
        self.outbox = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.outbox.setblocking(False)
        self.lock = threading.Lock()
        self.peers, self.seen = [], None
        self.here = None        # the front's own intake of this process's wake-ups, if it has one

    def publish(self, jobs):
        """Wake pilots for these jobs: here first, the rest elsewhere (see pass_on)."""
        if jobs:
            self.wake_here(WAKE_HERE_FIRST + wake_message(jobs))

    def wake_here(self, message):
        """A wake-up for this process's own held pilots, from any thread: handed to its front
        directly, which then wakes them before it answers the request that made the jobs
        runnable (a datagram to itself came after that answer); else by the datagram."""
        if self.here is not None:
            self.here(message)
        else:
            self.send(message, [self.path])

    def pass_on(self, kinds):
        """The jobs of a wake-up for which this process held no pilot, to the others."""
        self.send(kinds_message(kinds), [p for p in self.current_peers() if p != self.path])

    def say_hello(self):
        """An empty wake-up to every process: a new one has come."""
        self.send(wake_message([]), self.current_peers())

    def send(self, message, peers):
        for peer in peers:
            try:
                self.outbox.sendto(message, peer)
            except (ConnectionRefusedError, FileNotFoundError):
                self.forget(peer)               # its process is gone
            except BlockingIOError:
                log.warning('wake-up dropped: %s is not reading its wake-ups', peer)

    def current_peers(self):
        """The sockets in the run directory, read again whenever a process came or went. The
        directory's time stamp is coarse, so it is also read again every second and whenever
        a new process says hello (an empty wake-up)."""
        with self.lock:
            changed = (os.stat(self.dir).st_mtime_ns, int(time.monotonic()))
            if changed != self.seen:
                self.seen = changed
                self.peers = [os.path.join(self.dir, name) for name in os.listdir(self.dir)
                              if name.endswith('.sock')]
            return self.peers

    def refresh(self):
        with self.lock:
            self.seen = None

    def forget(self, peer):
        try:
            os.unlink(peer)
        except FileNotFoundError:
            pass

    def close(self):
        self.inbox.close()
        self.outbox.close()
        self.forget(self.path)


def read_wake_message(data):
    """A wake-up datagram as [(jobtype or None, site or None, count)]; nonsense is ignored."""
    try:
        return [(t, s, int(n)) for t, s, n in json.loads(data)]
    except (ValueError, TypeError):
        return []

# ---------------------------------------------------------------------------------------------
# PostgreSQL: the same statements on several servers' shared database
# ---------------------------------------------------------------------------------------------

# The statements of this file are written once, in the SQL both databases take: an identifier
# that is a keyword in quotes ("user"), times through the p3s_ functions (connect() gives them
# to SQLite, schema.sql to PostgreSQL). What stays SQLite's is rewritten here, and only here:
PG_REWRITES = (
    (re.compile(r'\bINDEXED BY \w+'), ''),                  # SQLite's planner pin
    (re.compile(r'json_each\(([^()]*)\)'),                  # a JSON list as rows of `value`
     r'json_array_elements_text(CAST(\1 AS json)) AS value'),
    (re.compile(r'/\*(FOR UPDATE[^*]*)\*/'), r'\1'),        # row locks: SQLite has one writer
)
PG_PARAM = re.compile(r'(?<![:\w]):(\w+)')                  # :name -> %(name)s
# ... and schema.sql's column types: 64-bit integers, numbered rows, and text compared byte by
# byte as SQLite does (stored times sort as text).
PG_TYPES = (
    (re.compile(r'\bINTEGER PRIMARY KEY\b'), 'BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY'),
    (re.compile(r'\bINTEGER\b'), 'BIGINT'),
    (re.compile(r'\bREAL\b'), 'DOUBLE PRECISION'),
    (re.compile(r'\bTEXT\b'), 'TEXT COLLATE "C"'),
)
PG_MIN_VERSION = 140000             # CREATE OR REPLACE TRIGGER
PG_SCHEMA_LOCK = 7103001            # advisory lock keys: applying the schema,
PG_HOUSEKEEPER_LOCK = 7103002       # and the one process that does the housekeeping
PG_WAKE_CHANNEL = 'p3s_wake'
PG_WAKE_MAX = 7900                  # bytes of a NOTIFY payload (PostgreSQL takes 8000)
WAKE_GROUP = re.compile(r'^[0-9A-Za-z_]{1,40}$')    # a host's token, as a channel name holds it
# One NOTIFY to each of these channels, in one transaction: sent once per wake-up, whatever the
# number of hosts told.
NOTIFY_CHANNELS = ('SELECT pg_notify(channel, :message)'
                   ' FROM unnest(CAST(:channels AS text[])) AS channel')
# The database server's incarnation (Recovery): a mark that its crash recovery removes.
STORAGE_MARK = 'SELECT mark FROM storage_mark'
NEW_STORAGE_MARK = 'INSERT INTO storage_mark (one, mark) VALUES (1, :mark) ON CONFLICT DO NOTHING'
PG_CONNECT_TIMEOUT = 10
PG_RETRY = 1.0                      # seconds before a listener or a lock asks again
PG_UNREACHABLE = 'it cannot be reached'


@functools.lru_cache(maxsize=None)
def postgres_sql(sql):
    """A statement of this file as PostgreSQL's (psycopg's %(name)s parameters); for one of
    PG_PREPARED, the EXECUTE of its prepared form."""
    if sql in PG_PREPARED:
        return postgres_prepared(sql)[1]
    return PG_PARAM.sub(r'%(\1)s', postgres_rewritten(sql).replace('%', '%%'))


def postgres_rewritten(sql):
    for pattern, replacement in PG_REWRITES:
        sql = pattern.sub(replacement, sql)
    return sql


@functools.lru_cache(maxsize=None)
def postgres_prepared(sql):
    """(PREPARE, EXECUTE) of a statement: its :names become $1, $2 … in the order they first
    appear, and the EXECUTE passes them in that order (psycopg's %(name)s parameters). The
    database types each parameter by where it stands, as it plans the statement once."""
    text = postgres_rewritten(sql)
    names = list(dict.fromkeys(PG_PARAM.findall(text)))
    number = {name: i + 1 for i, name in enumerate(names)}
    body = PG_PARAM.sub(lambda m: '$%d' % number[m.group(1)], text)
    name = 'p3s_' + hashlib.sha1(sql.encode()).hexdigest()[:16]
    arguments = '(%s)' % ', '.join('%%(%s)s' % n for n in names) if names else ''
    return 'PREPARE %s AS %s' % (name, body), 'EXECUTE ' + name + arguments


def postgres_schema(script):
    """schema.sql's common part with PostgreSQL's column types."""
    for pattern, replacement in PG_TYPES:
        script = pattern.sub(replacement, script)
    return script


class Row:
    """A PostgreSQL row as sqlite3.Row is: by position or by name, and dict(row)."""

    __slots__ = ('values', 'names')

    def __init__(self, values, names):
        self.values, self.names = values, names

    def __getitem__(self, key):
        return self.values[self.names[key] if isinstance(key, str) else key]

    def keys(self):
        return list(self.names)

    def __iter__(self):
        return iter(self.values)

    def __len__(self):
        return len(self.values)

    def __repr__(self):
        return 'Row(%r)' % dict(zip(self.names, self.values))


def pg_rows(cursor):
    names = {c.name: i for i, c in enumerate(cursor.description or ())}
    return lambda values: Row(values, names)


class PostgresConnection:
    """A psycopg connection in autocommit mode (transactions are the Store's BEGIN ... COMMIT)
    that takes the statements as written here and gives rows as sqlite3 does."""

    serial_writes = False           # others write at once: lock what a decision rests on
    commits_with_claim = True       # see CLAIM_MARKING_PILOT
    committed = False               # by commit_with, before the Store's commit

    def __init__(self, dsn):
        import psycopg
        from psycopg.types.numeric import NumericLoader

        class NumberLoader(NumericLoader):
            """sum() and count() of big integers come as numeric: give ints and floats, which
            JSON takes."""

            def load(self, data):
                value = super().load(data)
                return int(value) if value == value.to_integral_value() else float(value)

        # The driver binds the values into the statement text (client-side binding): the
        # server then types a value by where it stands, as SQLite does, instead of wanting one
        # type for a parameter used both as a number and as NULL.
        self.raw = psycopg.connect(dsn, autocommit=True, row_factory=pg_rows,
                                   cursor_factory=psycopg.ClientCursor,
                                   connect_timeout=PG_CONNECT_TIMEOUT)
        self.raw.adapters.register_loader('numeric', NumberLoader)
        self.waiting = []           # statements, values bound, to send with the next one
        self.binder = self.raw.cursor()
        self.prepared = set()       # the statements of PG_PREPARED this session has prepared

    # A round trip to the database costs more than most statements here: the statements whose
    # results nobody reads (BEGIN, the writes of `later` and `executemany`) wait, and go with
    # the next statement that is read, or with the COMMIT, in one message. An error in any of
    # them fails that message, inside the transaction, which is then rolled back as usual.

    def execute(self, sql, params=None):
        if not self.waiting and sql not in PG_QUEUE_WALKS:
            self.prepare(sql)
            return self.raw.execute(postgres_sql(sql), params or {})
        return self.send([(sql, params)])

    def later(self, sql, params=None):
        self.waiting.append(self.bound(sql, params))

    def read_each(self, statements):
        """The rows of each of these reads, all sent in one message with what waits."""
        assert not PG_QUEUE_WALKS.intersection(sql for sql, _ in statements), \
            'a walk of the queue is read alone (its settings would be read as rows)'
        cursor = self.send(statements)
        rows = []
        for _ in statements:
            rows.append(cursor.fetchall())
            cursor.nextset()
        return rows

    def send(self, statements):
        """What waits and these statements in one message; the cursor is at the result of the
        first of these (a walk of the queue, with its settings around it, goes first)."""
        skipped = len(self.waiting)
        for i, (sql, params) in enumerate(statements):
            if sql in PG_QUEUE_WALKS:
                assert i == 0, 'a walk of the queue is sent first, as its result is read'
                self.waiting.extend((PG_SORTS_OFF, self.bound(sql, params), PG_SORTS_DEFAULT))
                skipped += 1
            else:
                self.waiting.append(self.bound(sql, params))
        message, self.waiting = '; '.join(self.waiting), []
        cursor = self.raw.cursor()
        cursor.execute(message)
        for _ in range(skipped):
            cursor.nextset()
        return cursor

    def executemany(self, sql, seq):
        self.waiting.extend(self.bound(sql, params) for params in seq)

    def bound(self, sql, params):
        """The statement as sent, its values in it (the driver's own quoting)."""
        self.prepare(sql)
        return self.binder.mogrify(postgres_sql(sql), params or {})

    def prepare(self, sql):
        """Prepare one of PG_PREPARED at its first use in this session, in a round trip of its
        own (a PREPARE is not undone by a rollback, nor done if a statement before it in a
        message fails)."""
        if sql in PG_PREPARED and sql not in self.prepared:
            self.raw.execute(postgres_prepared(sql)[0])
            self.prepared.add(sql)

    def commit_with(self, statements):
        """These statements, the transaction's last, and its COMMIT, with what waits, in one
        message: the rows of the first. The Store's own commit then has nothing to do."""
        cursor = self.send(statements + [('COMMIT', None)])
        self.committed = True
        return cursor.fetchall()

    def commit(self):
        if self.committed:
            self.committed = False
            return
        self.execute('COMMIT')

    def rollback(self):
        """End the transaction, if one was begun (nothing waiting is sent)."""
        self.waiting = []
        self.committed = False
        if self.raw.info.transaction_status != self.raw.info.transaction_status.IDLE:
            self.raw.execute('ROLLBACK')

    def executescript(self, script):
        self.raw.execute(script)

    def close(self):
        self.raw.close()


class PostgreSQL:
    """PostgreSQL (psycopg 3, an optional package): several servers, on several hosts, share
    it. Transactions are READ COMMITTED; the statements that read before they write lock what
    they read (the claim skips the jobs others are taking; see CLAIM_JOB)."""

    name = 'postgresql'
    serial_writes = False

    def __init__(self, dsn):
        try:
            import psycopg
        except ImportError:
            raise SystemExit('p3s_server: error: %s needs psycopg 3: pip install -r '
                             'requirements-postgresql.txt' % redact(dsn))
        self.dsn = dsn
        self.psycopg = psycopg
        self.conflicts = (psycopg.IntegrityError,)
        self.unavailable = (psycopg.OperationalError, psycopg.InterfaceError)
        self.retryable = (psycopg.errors.SerializationFailure, psycopg.errors.DeadlockDetected)
        self.version = None

    def connect(self):
        db = PostgresConnection(self.dsn)
        self.version = db.raw.info.server_version
        if self.version < PG_MIN_VERSION:
            db.close()
            raise SystemExit('p3s_server: error: PostgreSQL %d is too old: p3s needs 14 or '
                             'newer' % (self.version // 10000))
        return db

    def begin(self, db, synced):
        db.later('BEGIN')
        if not synced:
            db.later('SET LOCAL synchronous_commit = off')

    def syncer(self):
        return None                      # its COMMIT waits for the flush it needs

    def writers_lock(self):
        return None                      # its writers run at once

    def apply_schema(self, db):
        """Create what is missing, one server at a time; refuse a newer schema. A database at
        this version is left alone: DDL locks whole tables (CREATE INDEX IF NOT EXISTS takes a
        SHARE lock on its table even when the index is there), so a server starting beside
        running ones would hold up their writes, or deadlock with them."""
        if schema_version(db) == SCHEMA_VERSION:
            return
        db.execute('BEGIN')
        try:
            self.create_schema(db)
        except BaseException:
            db.execute('ROLLBACK')
            raise
        db.execute('COMMIT')

    def create_schema(self, db):
        """apply_schema inside the caller's transaction (a migration's, which may roll it back:
        PostgreSQL's DDL is transactional)."""
        schema, _ = schema_parts('postgresql', postgres_schema)
        db.execute('SELECT pg_advisory_xact_lock(%d)' % PG_SCHEMA_LOCK)
        db.executescript(schema)
        found = schema_version(db)
        if found is not None and found > SCHEMA_VERSION:
            raise SystemExit('p3s_server: error: the database has schema version %d, newer '
                             'than this server (%d)' % (found, SCHEMA_VERSION))
        if found != SCHEMA_VERSION:
            db.execute('DELETE FROM p3s_version')
            db.execute('INSERT INTO p3s_version (version) VALUES (:v)', {'v': SCHEMA_VERSION})

    def incarnation(self, db):
        """The database server's mark (storage_mark in schema.sql), made anew after a crash."""
        db.execute(NEW_STORAGE_MARK, {'mark': str(uuidlib.uuid4())})
        return 'postgresql ' + db.execute(STORAGE_MARK).fetchone()['mark']

    def integrity(self, db):
        return ['ok (PostgreSQL keeps its own)']

    def leader_lock(self, rundir):
        return AdvisoryLock(self.dsn, PG_HOUSEKEEPER_LOCK)

    def trouble(self, error):
        """The reason a PostgreSQL error makes a request fail for now (a 503), or None."""
        errors = self.psycopg.errors
        for kinds, reason in (
                ((errors.SerializationFailure, errors.DeadlockDetected),
                 'another transaction changed the same rows at the same time'),
                ((errors.DiskFull,), 'its disk is full'),
                ((errors.ReadOnlySqlTransaction,), 'it is read-only'),
                ((errors.QueryCanceled, errors.LockNotAvailable), 'it is busy'),
                (self.unavailable, PG_UNREACHABLE)):
            if isinstance(error, kinds):
                return reason
        return None

    def unreachable(self, error):
        """Whether the error says the database could not be reached (restarting, away), for
        the pilots' requests as for this one."""
        return self.trouble(error) == PG_UNREACHABLE

    def wakeups(self, rundir):
        return PostgresWakeups(rundir, self.dsn)


def schema_version(db):
    """The version a PostgreSQL database's schema has, or None before its first server."""
    if db.execute("SELECT to_regclass('p3s_version') IS NOT NULL AS made").fetchone()['made']:
        return db.execute('SELECT max(version) AS v FROM p3s_version').fetchone()['v']
    return None


def shown_database(db):
    return redact(db) if is_postgres(db) else os.path.abspath(db)


def redact(dsn):
    """A database URL without its password, for messages."""
    return re.sub(r'(://[^:/@]*):[^@]*@', r'\1:***@', dsn)


class AdvisoryLock:
    """A lock held by a session of the database, as FileLock is by a process: PostgreSQL drops
    it when the session ends, when its process dies or its host goes."""

    def __init__(self, dsn, key):
        self.dsn, self.key, self.db = dsn, key, None

    def try_acquire(self):
        """Whether this session holds the lock now; the database's errors are raised."""
        try:
            if self.db is None:
                self.db = PostgresConnection(self.dsn)
            return bool(self.db.execute('SELECT pg_try_advisory_lock(:key) AS held',
                                        {'key': self.key}).fetchone()['held'])
        except Exception:
            self.close()
            raise

    def held(self):
        """Whether the session that took the lock lives on: a restart of the database ends
        it, and releases the lock with it."""
        try:
            self.db.execute('SELECT 1')
            return True
        except Exception:
            self.close()
            return False

    def close(self):
        close_quietly(self.db)
        self.db = None


class PostgresWakeups(Wakeups):
    """Wake-ups between servers that share PostgreSQL, on any host. The processes of this host
    are woken at once by datagrams, as on SQLite; the other hosts' by a NOTIFY on each one's
    own channel, which one process of that host listens to. The thread that made jobs runnable
    sends the NOTIFY itself, on a session kept for it, right after its commit (a round trip
    with no flush: a hand-off to a thread of its own cost the other host's pilot more than
    that).

    Hosts find each other on a common channel. A NOTIFY there says its host's group token and
    its process: a listener says `hello` when it starts listening; every process answers a
    hello with `here`, and answers a `here` once, from a process it had not heard before. A
    process that hears another host marks it known and wakes all the pilots it holds: a job
    submitted over there before that host knew this one was not announced here. (Each side
    hears the other's answer after it has marked the other known, so no job falls between.)
    A host alone sends no wake-up by NOTIFY at all.

    A NOTIFY costs each session listening to its channel a wake-up, and its process another:
    so a host's wake-ups are heard by one process, the holder of the host's forwarding lock,
    which wakes its own pilots first and passes the rest on by datagrams. When it dies another
    process takes the lock within PG_RETRY seconds and wakes the pilots it holds (a wake-up
    may have gone unheard meanwhile)."""

    def __init__(self, rundir, dsn):
        super().__init__(rundir)
        self.dsn = dsn
        self.group = wake_group(rundir)
        self.me = '%s %d ' % (self.group, os.getpid())
        self.channel = quoted(host_channel(self.group))     # where this host's wake-ups come
        self.hosts, self.heard = set(), set()      # other groups; (group, pid) of their processes
        self.forwarding = FileLock(os.path.join(rundir, 'wake.forward'))
        self.forwards = False
        self.sending = threading.Lock()
        self.sender = None
        self.stopping = threading.Event()
        threading.Thread(target=self.listen, name='p3s-listen', daemon=True).start()

    def publish(self, jobs):
        super().publish(jobs)
        hosts = list(self.hosts)
        if jobs and hosts:
            wake = wake_message(jobs).decode()
            self.notify(wake if len(wake) + len(self.me) <= PG_WAKE_MAX else WAKE_ALL.decode(),
                        [host_channel(group) for group in hosts])

    def notify(self, message, channels=(PG_WAKE_CHANNEL,)):
        """NOTIFY this process's message on these channels; a session lost since the last one
        (a restart of the database) is opened again, once."""
        with self.sending:
            for last in (False, True):
                try:
                    if self.sender is None:
                        self.sender = PostgresConnection(self.dsn)
                        # A NOTIFY commits a transaction of its own: a wake-up lost in a crash
                        # is harmless (held pilots ask again), so it need not wait for a flush.
                        self.sender.execute('SET synchronous_commit TO off')
                    self.sender.execute(NOTIFY_CHANNELS, {'channels': list(channels),
                                                          'message': self.me + message})
                    return
                except Exception as e:
                    close_quietly(self.sender)
                    self.sender = None
                    if last:
                        log.warning('wake-up not sent: %s', first_line(e))

    def listen(self):
        """LISTEN, and after a lost session listen again and wake every held pilot: a job
        may have come meanwhile."""
        while not self.stopping.is_set():
            db = None
            try:
                db = PostgresConnection(self.dsn)
                db.execute('LISTEN ' + PG_WAKE_CHANNEL)
                if self.forwards:
                    db.execute('LISTEN ' + self.channel)
                self.wake_here(WAKE_ALL)
                self.notify('hello')
                while not self.stopping.is_set():
                    self.take_forwarding(db)
                    for note in db.raw.notifies(timeout=None if self.forwards else PG_RETRY):
                        self.heard_from(note.payload)
                        if self.stopping.is_set():
                            break
            except Exception as e:
                close_quietly(db)
                if not self.stopping.is_set():
                    log.warning('wake-ups: %s; listening again in %g s', first_line(e),
                                PG_RETRY)
                    self.stopping.wait(PG_RETRY)

    def take_forwarding(self, db):
        """Become the process that hears this host's wake-ups, if none is."""
        if not self.forwards and self.forwarding.try_acquire():
            db.execute('LISTEN ' + self.channel)
            self.forwards = True
            self.wake_here(WAKE_ALL)

    def heard_from(self, payload):
        """One NOTIFY: '<group> <pid> <hello, here or a wake-up>'; this host's are ignored."""
        group, pid, message = (payload.split(' ', 2) + ['', ''])[:3]
        if group == self.group or not WAKE_GROUP.match(group):
            return
        if message in ('hello', 'here'):
            first = (group, pid) not in self.heard
            self.heard.add((group, pid))
            self.hosts.add(group)
            self.wake_here(WAKE_ALL)
            if message == 'hello' or first:
                self.notify('here')
        else:
            self.hosts.add(group)
            self.wake_here(WAKE_HERE_FIRST + message.encode())

    def close(self):
        self.stopping.set()
        with self.sending:
            close_quietly(self.sender)
            self.sender = None
        super().close()


def host_channel(group):
    """The channel on which a host hears the wake-ups other hosts send it."""
    return '%s_%s' % (PG_WAKE_CHANNEL, group)


def wake_group(rundir):
    """The token of the server processes that meet in this run directory: those of one host,
    which wake each other by datagrams. The first process to come writes it."""
    path = os.path.join(rundir, 'wake.group')
    mine = '%s.%d' % (path, os.getpid())
    with open(mine, 'w') as f:
        f.write(secrets.token_hex(8))
    try:
        os.link(mine, path)                 # fails if another process wrote it first
    except FileExistsError:
        pass
    finally:
        os.unlink(mine)
    with open(path) as f:
        return f.read().strip()


def close_quietly(db):
    try:
        if db is not None:
            db.close()
    except Exception:
        pass

# ---------------------------------------------------------------------------------------------
# Migration: a laptop's SQLite history moved whole to PostgreSQL
# ---------------------------------------------------------------------------------------------
# `migrate --from ./p3s.db --to postgresql://…` copies every table of schema.sql into an empty
# PostgreSQL database, parents first (schema.sql's order), in one transaction of the target that
# also creates the schema if it is absent: all of it or nothing. The source is opened read-only
# and read in one transaction, so what moves is one moment of it; a source of an older schema
# version is brought up to date in a temporary copy, never in place. Rows travel by COPY with
# their ids, uuids, times and JSON text as stored; then each numbered table goes on after its
# last id. The statements name tables and columns, which come from schema.sql and the two
# databases' own catalogues (never from a user), in quotes; the values are bound or copied.

MIGRATE_BATCH = 10000           # source rows read at a time
SCHEMA_TABLE = re.compile(r'^CREATE TABLE IF NOT EXISTS (\w+)', re.M)
SOURCE_TABLES = "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite%'"
# The storage's own state, not the history: a migrated database begins without it.
STORAGE_TABLES = ('recovery',)
SOURCE_VERSION = 'PRAGMA user_version'
SOURCE_COLUMNS = 'SELECT name FROM pragma_table_info(:table) ORDER BY cid'
SOURCE_ROWS = 'SELECT {columns} FROM {table}'
TARGET_COLUMNS = """
SELECT column_name FROM information_schema.columns
 WHERE table_schema = current_schema() AND table_name = :table
"""
# Kept from other writers (a server started on the target meanwhile) until the COMMIT, so that
# the target found empty stays empty but for what is copied.
TARGET_LOCK = 'LOCK TABLE {table} IN EXCLUSIVE MODE'
TARGET_HAS_ROWS = 'SELECT EXISTS (SELECT 1 FROM {table}) AS found'
TARGET_COPY = 'COPY {table} ({columns}) FROM STDIN'
TARGET_COUNT = 'SELECT count(*) AS n FROM {table}'
# The numbered tables: SQLite's INTEGER PRIMARY KEY is an identity column there (PG_TYPES).
TARGET_IDENTITIES = """
SELECT table_name, column_name FROM information_schema.columns
 WHERE table_schema = current_schema() AND is_identity = 'YES'
"""
TARGET_LAST_ID = 'SELECT max({columns}) AS last FROM {table}'
SET_NEXT_ID = 'SELECT setval(pg_get_serial_sequence(:table, :column), :next, false)'


def quoted(name):
    return '"%s"' % name.replace('"', '""')


def named(sql, table, columns=()):
    """One of the statements above for one table and its columns, their names in quotes."""
    return sql.format(table=quoted(table), columns=', '.join(map(quoted, columns)))


def schema_tables():
    """The tables of schema.sql that hold the history, parents before the tables that refer to
    them."""
    return [t for t in SCHEMA_TABLE.findall(schema_parts('sqlite')[0]) if t not in STORAGE_TABLES]


def refuse(message, *args):
    raise SystemExit('p3s_server: error: ' + message % args)


@contextmanager
def migration_source(path):
    """The p3s database at `path` for reading, at this schema version: the file itself, opened
    read-only, or a temporary copy brought up to date. Yields (connection, the version found);
    the connection is in a read transaction (one moment of the database)."""
    if not os.path.exists(path):
        refuse('no database at %s', path)
    if not os.path.isfile(path):
        refuse('%s is not an SQLite database (not a file)', path)
    with not_served(path), closing(open_read_only(path)) as src:
        found = checked_source(src, path)
        if found == SCHEMA_VERSION:
            yield src, found
            return
        with tempfile.TemporaryDirectory(prefix='p3s-migrate-') as scratch, \
                closing(upgraded_copy(src, os.path.join(scratch, 'p3s.db'))) as copy:
            yield copy, found


@contextmanager
def not_served(path):
    """While no server serves the file: one of its servers holds their housekeeping lock from
    its first housekeeping pass on (this one keeps them from taking it meanwhile)."""
    lock = FileLock(os.path.join(run_directory(path), 'housekeeper.lock'))
    try:
        if not lock.try_acquire():
            refuse('a p3s server is serving %s: stop it first, so that nothing happens after '
                   'the moment copied', path)
        yield
    finally:
        os.close(lock.fd)


def open_read_only(path):
    """mode=ro: SQLite never writes the file (a WAL reader may leave empty -wal and -shm)."""
    try:
        return sqlite3.connect('file:%s?mode=ro' % urllib.parse.quote(os.path.abspath(path)),
                               uri=True, isolation_level=None)
    except sqlite3.Error as e:
        refuse('cannot open %s: %s', path, first_line(e))


def checked_source(src, path):
    """The schema version of a sound p3s database, read in the transaction begun here; a
    one-line refusal for anything else."""
    try:
        src.execute('BEGIN')
        tables = {r[0] for r in src.execute(SOURCE_TABLES)}
        found = src.execute(SOURCE_VERSION).fetchone()[0]
    except sqlite3.DatabaseError as e:
        refuse('%s is not an SQLite database (%s)', path, first_line(e))
    if not {'jobs', 'pilots'} <= tables or found < 1:
        refuse('%s is not a p3s database', path)
    if found > SCHEMA_VERSION:
        refuse('%s has schema version %d, newer than this p3s (%d)', path, found, SCHEMA_VERSION)
    try:
        verdict = SQLite(path).integrity(src)[0]
    except sqlite3.DatabaseError as e:
        verdict = first_line(e)
    if verdict != 'ok':
        refuse('%s fails SQLite\'s integrity check: %s', path, verdict)
    return found


def upgraded_copy(src, path):
    """A copy of an older database at `path`, brought to this version as the server would."""
    plain = sqlite3.connect(path)
    src.backup(plain)
    plain.close()
    copy = connect(path)
    apply_schema(copy)
    copy.row_factory = None
    copy.execute('BEGIN')
    return copy


def source_tables(src, path):
    """{table: its columns} of schema.sql's tables in the source, in schema.sql's order. A
    table of schema.sql missing is a refusal; a table it does not have is left behind, and
    said."""
    present = {r[0] for r in src.execute(SOURCE_TABLES)}
    wanted = schema_tables()
    missing = [t for t in wanted if t not in present]
    if missing:
        refuse('%s is not a whole p3s database: it has no table %s', path, ', '.join(missing))
    for other in sorted(present - set(wanted) - set(STORAGE_TABLES)):
        log.warning('table %s of %s is not p3s\'s: it is left behind', other, path)
    return {t: [r[0] for r in src.execute(SOURCE_COLUMNS, {'table': t})] for t in wanted}


def migration_target(pg, url):
    """A connection to the target, or a one-line refusal."""
    try:
        return pg.connect()
    except pg.psycopg.Error as e:
        refuse('cannot open the database %s: %s', redact(url), redact(first_line(e)))


def migrate_history(src, pg, db, tables, url):
    """Copy the tables, in one transaction of the target that creates the schema if absent and
    refuses a target holding any p3s row; then the identities go on after the copied ids.
    Returns {table: rows copied}."""
    db.execute('BEGIN')
    try:
        pg.create_schema(db)
        for table in tables:
            db.execute(named(TARGET_LOCK, table))
        held = [t for t in tables if db.execute(named(TARGET_HAS_ROWS, t)).fetchone()['found']]
        if held:
            refuse('%s holds p3s records already (%s): migrate fills an empty database only',
                   redact(url), ', '.join(held))
        copied = {table: copy_table(src, db, table, columns) for table, columns in tables.items()}
        for table, rows in copied.items():
            stored = db.execute(named(TARGET_COUNT, table)).fetchone()['n']
            if stored != rows:
                refuse('%s: %d rows read but %d stored: nothing was migrated', table, rows,
                       stored)
        continue_identities(db, tables)
    except BaseException:
        db.execute('ROLLBACK')
        raise
    db.execute('COMMIT')
    return copied


def copy_table(src, db, table, columns):
    """COPY one table's rows, as the source holds them, in batches; returns how many."""
    wanted = set(r['column_name'] for r in db.execute(TARGET_COLUMNS, {'table': table}))
    lacking = [c for c in columns if c not in wanted]
    if lacking:
        refuse('table %s of PostgreSQL has no column %s', table, ', '.join(lacking))
    rows = src.execute(named(SOURCE_ROWS, table, columns))
    n = 0
    with db.raw.cursor() as cursor, cursor.copy(named(TARGET_COPY, table, columns)) as copy:
        for batch in iter(lambda: rows.fetchmany(MIGRATE_BATCH), []):
            for row in batch:
                copy.write_row(row)
            n += len(batch)
    return n


def continue_identities(db, tables):
    """Each numbered table's next id follows its last copied one."""
    for r in db.execute(TARGET_IDENTITIES).fetchall():
        table, column = r['table_name'], r['column_name']
        if table in tables:
            last = db.execute(named(TARGET_LAST_ID, table, [column])).fetchone()['last']
            db.execute(SET_NEXT_ID, {'table': quoted(table), 'column': column,
                                     'next': (last or 0) + 1})


# ---------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------


class Refused(Exception):
    """The domain's one error: a request that cannot be done, with the HTTP status that says why
    (400 bad input, 404 no such object, 409 wrong state, 413 too large). The web layer turns it
    into {"error": message}; the domain never imports the web framework's errors."""

    def __init__(self, status, message):
        message = one_line(message)
        super().__init__(message)
        self.status = status
        self.message = message


def one_line(text):
    """A message that echoes what a request sent stays one line: its control characters (a
    newline after a uuid) are written as escapes."""
    return CONTROL_RE.sub(lambda m: repr(m.group())[1:-1], text)


def first_line(error):
    """An error's message as a log line: libpq's come with hints on lines of their own."""
    return one_line((str(error).strip().splitlines() or [type(error).__name__])[0])


def fail(status, message):
    raise Refused(status, message)


def check_object(value, what):
    if not isinstance(value, dict):
        fail(400, '%s must be a JSON object' % what)
    return value


def check_known(d, allowed, what):
    unknown = sorted(set(d) - allowed)
    if unknown:
        fail(400, 'unknown %s field %r' % (what, unknown[0]))


def text_field(d, key, default='', maxlen=MAX_TEXT, required=False):
    value = d.get(key, default)
    if value is None and not required:
        value = default
    if not isinstance(value, str):
        fail(400, '%s must be a string' % key)
    if required and not value.strip():
        fail(400, '%s is required' % key)
    if len(value) > maxlen:
        fail(400, '%s is longer than %d characters' % (key, maxlen))
    if '\x00' in value:
        fail(400, '%s contains a NUL character' % key)
    return value


def int_field(d, key, default=None, lo=INT_RANGE[0], hi=INT_RANGE[1]):
    value = d.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        fail(400, '%s must be an integer' % key)
    if not lo <= value <= hi:
        fail(400, '%s must be between %d and %d' % (key, lo, hi))
    return value


def number_field(d, key, default, lo, hi):
    value = d.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
        fail(400, '%s must be a number' % key)
    return min(max(float(value), lo), hi)


def env_field(d, key='env'):
    env = d.get(key, {})
    if env is None:
        env = {}
    if not isinstance(env, dict):
        fail(400, '%s must be a JSON object' % key)
    for name, value in env.items():
        if not name or '=' in name or '\x00' in name or len(name) > MAX_TEXT:
            fail(400, '%s has an invalid variable name %r' % (key, name[:MAX_TEXT]))
        if not isinstance(value, str):
            fail(400, '%s.%s must be a string' % (key, name))
        if len(value) > MAX_ENV_VALUE or '\x00' in value:
            fail(400, '%s.%s is too long or contains a NUL character' % (key, name))
    return env


def uuid_field(d, key, required=False):
    value = d.get(key)
    if value is None and not required:
        return None
    if not isinstance(value, str) or not UUID_RE.match(value):
        fail(400, '%s must be a uuid' % key)
    return value.lower()


def check_uuid(value, what='uuid'):
    if not UUID_RE.match(value):
        fail(404, 'no such %s: %s' % (what, value[:64]))
    return value.lower()


# Listing filters: a query string narrows a listing by fixed SQL fragments, chosen by which
# filters it gives; the values are bound.
FILTER_KEYS = ('jobtype', 'user', 'site', 'pilot', 'host', 'workflow', 'dag', 'datatype', 'name',
               'dirpath', 'system')


def filters_from(query, allowed, known_states=None, also=('limit',)):
    """A listing's WHERE clause from a query string: ({name: value}, ' WHERE …' or '').

    `state` may be repeated or comma-separated; `state=error` (jobs) means a non-zero exit code.
    A typo must not look like an empty listing, so a query key that is neither one of the
    listing's filters nor in `also`, and a state not in `known_states`, are refused (400);
    `known_states` None takes any state (the data clients write states of their own).
    """
    keys = [k for k in FILTER_KEYS if k in allowed] + ['state'] * ('state' in allowed)
    check_query(query, keys + list(also))
    params, where = {}, []
    for key in FILTER_KEYS:
        if key in allowed and query.get(key):
            params[key] = query.get(key)
            where.append(allowed[key])
    states = [s for v in query_all(query, 'state') for s in v.split(',')
              if s and 'state' in allowed]
    unknown = [s for s in states if known_states is not None and s not in known_states]
    if unknown:
        fail(400, 'unknown state %r: the states are %s' % (unknown[0][:32],
                                                            ', '.join(known_states)))
    error = 'error' in states and 'error' in allowed
    states = [s for s in states if not (error and s == 'error')]
    if error and states:
        params['states'] = json.dumps(states)
        where.append(allowed['states_or_error'])
    elif error:
        where.append(allowed['error'])
    elif len(states) == 1:
        params['state'] = states[0]
        where.append(allowed['state'])
    elif states:
        params['states'] = json.dumps(states)
        where.append(allowed['states'])
    return params, ' WHERE ' + ' AND '.join(where) if where else ''


def check_query(query, known):
    """Refuse a query parameter the request cannot mean (a misspelt filter finds nothing)."""
    unknown = sorted(set(query.keys()) - set(known))
    if unknown:
        fail(400, 'unknown query parameter %r: this listing takes %s'
             % (unknown[0][:32], ', '.join(known) or 'none'))


def query_all(query, key):
    """Every value of a repeated query parameter (a Bottle FormsDict, or a plain dict)."""
    return query.getall(key) if hasattr(query, 'getall') else [query.get(key) or '']


def limit_from(query):
    try:
        limit = int(query.get('limit', DEFAULT_LIST))
    except ValueError:
        fail(400, 'limit must be an integer')
    if not 1 <= limit <= MAX_LIST:
        fail(400, 'limit must be between 1 and %d' % MAX_LIST)
    return limit


def newest_rows(store, select, filters, query, known_states=None):
    """An API listing: `select` ('SELECT … FROM table') narrowed by the query's filters,
    newest first, at most ?limit= rows."""
    params, where = filters_from(query, filters, known_states)
    params['limit'] = limit_from(query)
    return store.query(select + where + ' ORDER BY id DESC LIMIT :limit', params)

# ---------------------------------------------------------------------------------------------
# Jobs
# ---------------------------------------------------------------------------------------------

INSERT_JOB = """
INSERT INTO jobs (uuid, name, "user", subhost, jobtype, payload, env, priority, timelimit, site,
                  infile, retries, state, created_at, defined_at, deadline, deadline_at)
VALUES (:uuid, :name, :user, :subhost, :jobtype, :payload, :env, :priority, :timelimit, :site,
        :infile, :retries, :state, :now, :defined_at, :deadline, :deadline_at)
ON CONFLICT (uuid) DO NOTHING
"""
SEEN_JOBTYPE = 'INSERT INTO jobtypes (name) VALUES (:jobtype) ON CONFLICT (name) DO NOTHING'
GET_JOB_LOGS = 'SELECT stdout, stderr FROM joblogs WHERE job = :uuid'
# With its type's cap: a job of a capped type that ends frees a slot for a waiting pilot.
GET_JOB_HOLDER = ('SELECT state, pilot, workflow, jobtype, attempt,'
                  ' (SELECT cap FROM jobtypes WHERE name = jobs.jobtype) AS cap'
                  ' FROM jobs WHERE uuid = :uuid')
LIST_JOBS = 'SELECT ' + JOB_COLUMNS + ' FROM jobs'
JOB_FILTERS = {
    'state': 'state = :state',
    'states': 'state IN (SELECT value FROM json_each(:states))',
    'error': 'errcode <> 0',                       # state=error: a non-zero exit code
    'states_or_error': '(state IN (SELECT value FROM json_each(:states)) OR errcode <> 0)',
    'workflow': 'workflow = :workflow',
    'jobtype': 'jobtype = :jobtype',
    'user': '"user" = :user',
    'site': 'site = :site',
    'pilot': 'pilot = :pilot',
}
KILL_JOB = """
UPDATE jobs SET state = 'killed', stopped_at = :now
 WHERE uuid = :uuid AND state IN """ + SQL_LIVE_JOB
SET_JOB_PRIORITY = """
UPDATE jobs SET priority = :priority
 WHERE uuid = :uuid AND state IN """ + SQL_LIVE_JOB
# A workflow's jobs are released by the workflow engine and deleted with their workflow.
DEFINE_JOB = """
UPDATE jobs SET state = 'defined', defined_at = :now,
       deadline_at = CASE WHEN deadline IS NOT NULL
                          THEN p3s_seconds_after(:now, deadline) END
 WHERE uuid = :uuid AND state = 'template' AND workflow IS NULL
RETURNING jobtype, site
"""
DROP_JOB = """
UPDATE jobs SET state = 'dropped', stopped_at = :now
 WHERE uuid = :uuid AND state IN """ + SQL_QUEUED
DELETE_JOB = """
DELETE FROM jobs WHERE uuid = :uuid AND state NOT IN """ + SQL_ACTIVE + """ AND workflow IS NULL
"""
# Retries on request: a new attempt of a job that ended, linked to it by retry_of; the old
# attempt keeps its state and its history. Each attempt is retried at most once (a unique
# index), so a retry repeated by mistake makes nothing new.
INSERT_ATTEMPT = """
INSERT INTO jobs (uuid, name, "user", subhost, jobtype, payload, env, priority, timelimit, site,
                  infile, retries, workflow, state, created_at, defined_at, deadline,
                  deadline_at, retry_of, attempt)
VALUES (:uuid, :name, :user, :subhost, :jobtype, :payload, :env, :priority, :timelimit, :site,
        :infile, :retries, :workflow, :state, :now, :defined_at, :deadline, :deadline_at,
        :retry_of, :attempt)
"""
GET_RETRY_OF = 'SELECT uuid, attempt FROM jobs WHERE retry_of = :uuid'
NOT_RETRIED = 'NOT EXISTS (SELECT 1 FROM jobs AS retry WHERE retry.retry_of = jobs.uuid)'
SELECT_RETRYABLE = 'SELECT ' + JOB_COLUMNS + ' FROM jobs'
RETRYABLE_SELECTED = """
   AND state IN """ + SQL_TERMINAL + """ AND workflow IS NULL
   AND (:since IS NULL OR stopped_at >= :since)
   AND """ + NOT_RETRIED + """
 ORDER BY id LIMIT :limit
"""


def check_job(raw, now):
    """A submitted job, checked and shaped as a row of the jobs table."""
    job = check_object(raw, 'each job')
    check_known(job, JOB_FIELDS, 'job')
    env = env_field(job)
    state = text_field(job, 'state', 'defined')
    if state not in QUEUED_STATES:
        fail(400, "state must be 'defined' or 'template', not %r" % state[:32])
    deadline = int_field(job, 'deadline', None, 1, MAX_TIMELIMIT)
    defined = state == 'defined'           # a template is defined, and given its deadline, later
    return {
        'uuid': uuid_field(job, 'uuid') or str(uuidlib.uuid4()),
        'name': text_field(job, 'name'),
        'user': text_field(job, 'user'),
        'subhost': text_field(job, 'subhost'),
        'jobtype': text_field(job, 'jobtype', 'default') or 'default',
        'payload': text_field(job, 'payload', maxlen=MAX_PAYLOAD, required=True),
        'env': json.dumps(env),
        'priority': int_field(job, 'priority', 0),
        'timelimit': int_field(job, 'timelimit', 1000, 1, MAX_TIMELIMIT),
        'deadline': deadline,
        'site': text_field(job, 'site'),
        'retries': int_field(job, 'retries', 0, 0, MAX_RETRIES),
        'infile': env.get('P3S_INPUT_FILE', ''),
        'state': state,
        'now': now,
        'defined_at': now if defined else None,
        'deadline_at': seconds_after(now, deadline) if defined and deadline else None,
    }


def job_dict(row):
    job = dict(row)
    job['env'] = json.loads(job['env'])
    return job


def runnable(rows):
    """(jobtype, site) of the rows that are queued now: who may be woken for them."""
    return [(r['jobtype'], r['site']) for r in rows if r['state'] == 'defined']


def submit_jobs(store, raw_jobs, now):
    """Store a list of jobs in one transaction: all of them or none. Returns their uuids.

    A uuid already stored is accepted again without a change, so a client may safely retry a
    submission whose answer it never got.
    """
    if not isinstance(raw_jobs, list) or not raw_jobs:
        fail(400, 'expected a non-empty JSON list of jobs')
    if len(raw_jobs) > MAX_JOBS_PER_SUBMIT:
        fail(413, 'at most %d jobs in one submission' % MAX_JOBS_PER_SUBMIT)
    rows = [check_job(raw, now) for raw in raw_jobs]
    with store.write() as db:
        insert_jobs(db, rows)
    store.wake(runnable(rows))
    return [r['uuid'] for r in rows]


def insert_jobs(db, rows):
    """Checked job rows into the jobs table, their types into the jobtypes table."""
    db.executemany(INSERT_JOB, rows)
    db.executemany(SEEN_JOBTYPE, [{'jobtype': t} for t in {r['jobtype'] for r in rows}])


def get_job(store, job_uuid, logs=False, now=None):
    """One job; a queued one says why it waits (`waiting`), an attempt that was retried names
    its retry (`retried_by`)."""
    job_uuid = check_uuid(job_uuid, 'job')
    with store.read() as db:
        row = db.execute(GET_JOB, {'uuid': job_uuid}).fetchone()
        if row is None:
            fail(404, 'no such job: %s' % job_uuid)
        job = job_dict(row)
        retry = db.execute(GET_RETRY_OF, job).fetchone()
        job['retried_by'] = retry['uuid'] if retry else None
        job['waiting'] = job_waiting(db, job, now or utcnow())
        if logs:
            tails = db.execute(GET_JOB_LOGS, {'uuid': job_uuid}).fetchone()
            job['stdout'], job['stderr'] = tuple(tails) if tails else ('', '')
    return job


def list_jobs(store, query):
    return [job_dict(r) for r in newest_rows(store, LIST_JOBS, JOB_FILTERS, query,
                                             JOB_STATES + ('error',))]


def job_conflict(db, job_uuid, action):
    """Why a conditional update of a job touched no row: it is missing (404), in a state that
    does not allow the action, or part of a workflow that manages it (409)."""
    row = db.execute(GET_JOB_HOLDER, {'uuid': job_uuid}).fetchone()
    if row is None:
        fail(404, 'no such job: %s' % job_uuid)
    if row['workflow'] and action in ('define', 'delete') and row['state'] not in ACTIVE_STATES:
        fail(409, 'cannot %s job %s: it belongs to workflow %s, which manages it'
             % (action, job_uuid, row['workflow']))
    fail(409, 'cannot %s job %s: it is %s' % (action, job_uuid, row['state']))


def adjust_job(store, job_uuid, changes, now):
    """Change a job's priority and/or move it to defined (from template) or dropped."""
    job_uuid = check_uuid(job_uuid, 'job')
    check_object(changes, 'adjustment')
    check_known(changes, {'priority', 'state'}, 'adjustment')
    priority = int_field(changes, 'priority')
    state = changes.get('state')
    if state not in (None, 'defined', 'dropped'):
        fail(400, "a job can be adjusted to state 'defined' or 'dropped' only")
    if priority is None and state is None:
        fail(400, 'nothing to adjust: give priority and/or state')
    woken = []
    with store.write() as db:
        params = {'uuid': job_uuid, 'priority': priority, 'now': now}
        if priority is not None and not db.execute(SET_JOB_PRIORITY, params).rowcount:
            job_conflict(db, job_uuid, 'change the priority of')
        if state == 'defined':
            woken = [tuple(r) for r in db.execute(DEFINE_JOB, params).fetchall()]
            if not woken:
                job_conflict(db, job_uuid, 'define')
        if state == 'dropped':
            if not db.execute(DROP_JOB, params).rowcount:
                job_conflict(db, job_uuid, 'drop')
            workflow_hook(db, [job_uuid], now)
    store.wake(woken)
    return get_job(store, job_uuid)


def kill_job(store, job_uuid, now):
    """A queued job is killed at once; a running one is killed by its pilot at its next beat."""
    job_uuid = check_uuid(job_uuid, 'job')
    with store.write() as db:
        if not db.execute(KILL_JOB, {'uuid': job_uuid, 'now': now}).rowcount:
            job_conflict(db, job_uuid, 'kill')
        workflow_hook(db, [job_uuid], now)
    wake_capped(store, job_uuid=job_uuid)
    return get_job(store, job_uuid)


def delete_job(store, job_uuid):
    job_uuid = check_uuid(job_uuid, 'job')
    with store.write() as db:
        if not db.execute(DELETE_JOB, {'uuid': job_uuid}).rowcount:
            job_conflict(db, job_uuid, 'delete')
    return {'deleted': job_uuid}


def retry_job(store, job_uuid, now):
    """A new attempt of one job that ended: the new job."""
    [retried] = retry_selection(store, {'uuids': [job_uuid]}, now)['retried']
    return get_job(store, retried['retry'])


def retry_selection(store, body, now):
    """New attempts of ended jobs, in one transaction: those named in `uuids` (all of them or
    none), or those a filter selects (`state`, required, and `jobtype`, `user`, `site`, `since`
    seconds, `limit`) among the jobs not retried yet. A workflow's jobs are retried with
    their workflow."""
    check_object(body, 'retry')
    check_known(body, {'uuids', 'state', 'jobtype', 'user', 'site', 'since', 'limit'}, 'retry')
    try:
        with store.write() as db:
            old = (named_attempts(db, body['uuids']) if 'uuids' in body
                   else selected_attempts(db, body, now))
            new = insert_attempts(db, old, now, 'defined')
    except store.db.conflicts:
        # Where writers run at once (PostgreSQL) the unique index on retry_of is what finds a
        # retry made meanwhile by another; the insert may wait for the COMMIT to be sent.
        fail(409, 'a job of these was retried meanwhile: nothing was retried')
    store.wake(runnable(new))
    return {'retried': [{'uuid': o['uuid'], 'retry': n['uuid']} for o, n in zip(old, new)]}


def named_attempts(db, uuids):
    """The rows of the jobs named for a retry, each one checked: ended, alone, not retried."""
    if not isinstance(uuids, list) or not 1 <= len(uuids) <= MAX_JOBS_PER_SUBMIT:
        fail(400, 'uuids must be a list of 1 to %d job uuids' % MAX_JOBS_PER_SUBMIT)
    rows = []
    for raw in uuids:
        job_uuid = uuid_field({'uuid': raw}, 'uuid', required=True)
        row = db.execute(GET_JOB, {'uuid': job_uuid}).fetchone()
        if row is None:
            fail(404, 'no such job: %s' % job_uuid)
        if row['workflow']:
            fail(409, 'cannot retry job %s alone: it belongs to workflow %s; retry the workflow '
                 '(p3s_workflow.py --retry -u %s)' % (job_uuid, row['workflow'], row['workflow']))
        if row['state'] not in TERMINAL_STATES:
            fail(409, 'cannot retry job %s: it is %s; only a job that ended is retried'
                 % (job_uuid, row['state']))
        retry = db.execute(GET_RETRY_OF, {'uuid': job_uuid}).fetchone()
        if retry:
            fail(409, 'job %s was retried already, as %s (attempt %d): retry that one'
                 % (job_uuid, retry['uuid'], retry['attempt']))
        rows.append(row)
    return rows


def selected_attempts(db, body, now):
    """The jobs a retry's filter selects: ended in one of its states, not in a workflow, not
    retried yet, oldest first."""
    query = {k: text_field(body, k) for k in ('state', 'jobtype', 'user', 'site') if k in body}
    if not query.get('state'):
        fail(400, 'give the uuids of the jobs to retry, or a state (e.g. failed) to select them')
    params, where = filters_from(query, JOB_FILTERS, TERMINAL_STATES + ('error',), also=())
    since = number_field(body, 'since', None, 0, 10 ** 9)
    params.update(since=None if since is None else seconds_before(now, since),
                  limit=int_field(body, 'limit', DEFAULT_LIST, 1, MAX_LIST))
    return db.execute(SELECT_RETRYABLE + where + RETRYABLE_SELECTED, params).fetchall()


def insert_attempts(db, old_rows, now, state):
    """A new attempt of each job, `defined` (queued at once) or `template` (released by its
    workflow); its deadline, if it has one, counts from now."""
    rows = [dict(old, uuid=str(uuidlib.uuid4()), state=state, now=now, retry_of=old['uuid'],
                 attempt=old['attempt'] + 1, defined_at=now if state == 'defined' else None,
                 deadline_at=None if old['deadline'] is None
                 else seconds_before(now, -old['deadline']))
            for old in old_rows]
    db.executemany(INSERT_ATTEMPT, rows)
    return rows

# ---------------------------------------------------------------------------------------------
# Brokerage: pilots, claims, reports, heartbeats, long polls
# ---------------------------------------------------------------------------------------------

INSERT_PILOT = """
INSERT INTO pilots (uuid, host, site, pid, extra, jobtypes, state, registered_at, last_seen,
                    secret_hash, nonce_hash)
VALUES (:uuid, :host, :site, :pid, :extra, :jobtypes, 'active', :now, :now, :secret_hash,
        :nonce_hash)
ON CONFLICT (uuid) DO NOTHING
"""
# A registration repeated with the nonce of the first (whose answer was lost) gets a new secret.
RENEW_PILOT_SECRET = """
UPDATE pilots SET secret_hash = :secret_hash WHERE uuid = :uuid AND nonce_hash = :nonce_hash
"""
GET_PILOT_SECRET = 'SELECT secret_hash FROM pilots WHERE uuid = :uuid'
GET_PILOT_AND_SECRET = ('SELECT ' + PILOT_COLUMNS + ', ' + PILOT_DRAIN + ', secret_hash'
                        ' FROM pilots WHERE uuid = :uuid')
LIST_PILOTS = 'SELECT ' + PILOT_COLUMNS + ', ' + PILOT_DRAIN + ' FROM pilots'
PILOT_FILTERS = {
    'state': 'state = :state',
    'states': 'state IN (SELECT value FROM json_each(:states))',
    'site': 'site = :site',
    'host': 'host = :host',
}
# What a pilot may take. The claim statements below and the account of why a queued job waits
# (job_waiting) are written with these same conditions, so that they cannot disagree. :site and
# :jobtypes are the pilot's; TAKES_TYPE and NOT_BLOCKED are given the column of the job type.
TAKES_SITE = "(site = '' OR site = :site)"
IN_TIME = '(deadline_at IS NULL OR deadline_at > :now)'
TAKES_TYPE = "(:jobtypes = '[]' OR %s IN (SELECT value FROM json_each(:jobtypes)))"
NOT_BLOCKED = '%s NOT IN (SELECT value FROM json_each(:blocked))'
# The claim: one statement takes the best queued job the pilot may run. On SQLite it takes the
# write lock before it reads, so two pilots can never get the same job; on PostgreSQL the row it
# picks is locked as it is read, and a row another claim holds is skipped (FOR UPDATE SKIP
# LOCKED, in a comment SQLite ignores: see PG_REWRITES). `state = 'defined'` is written as a
# literal, and the queue index is named: with the (state, id) index the planner would read every
# queued job and sort them, and INDEXED BY makes that an error instead. Jobs past their deadline
# are skipped (the sweep makes them stale). :left is the seconds the pilot has left (a batch
# pilot's wall time; MAX_TIMELIMIT for the others): a job that might outlast it is left for
# another pilot. :last_queued holds back the jobs queued before a recovery began (Recovery; 0
# when none lasts). Both only filter the walk, so the plan stays the same (the unary + keeps
# SQLite from making the id a bound of the walk: it would skip-scan every priority and time).
CLAIM_JOB = """
UPDATE jobs SET state = 'dispatched', pilot = :pilot, host = :host, dispatched_at = :now
 WHERE id = (SELECT id FROM jobs INDEXED BY jobs_queue
              WHERE state = 'defined'
                AND """ + TAKES_SITE + """
                AND """ + IN_TIME + """
                AND timelimit <= :left
                AND +id > :last_queued
              ORDER BY priority DESC, defined_at, id
              LIMIT 1 /*FOR UPDATE SKIP LOCKED*/)
RETURNING """ + JOB_COLUMNS
# When some types are blocked (at their cap, or paused with cap 0) or the pilot takes only some
# types, the queue's top may hold thousands of jobs this pilot cannot take, and walking past them
# would cost milliseconds per claim. This form visits each type that has queued jobs instead
# (a skip-scan of jobs_type_queue), takes the head of each type it may run, and the best head:
# a few index seeks per type, whatever is queued. Where claims run at once (PostgreSQL) a head
# is the first job of its type that no other claim holds: were it the first of the type, the
# claims of one type would all find the same head, and all but one would come back empty.
CLAIM_JOB_BY_TYPE = """
WITH RECURSIVE queued (jobtype) AS (
    SELECT min(jobtype) FROM jobs INDEXED BY jobs_type_queue WHERE state = 'defined'
    UNION ALL
    SELECT (SELECT min(jobtype) FROM jobs INDEXED BY jobs_type_queue
             WHERE state = 'defined' AND jobtype > queued.jobtype)
      FROM queued WHERE queued.jobtype IS NOT NULL),
heads (id) AS (
    SELECT (SELECT id FROM jobs INDEXED BY jobs_type_queue
             WHERE state = 'defined' AND jobtype = queued.jobtype
               AND """ + TAKES_SITE + """
               AND """ + IN_TIME + """
               AND timelimit <= :left AND +id > :last_queued  -- as in CLAIM_JOB
             ORDER BY priority DESC, defined_at, id
             LIMIT 1 /*FOR UPDATE SKIP LOCKED*/)
      FROM queued
     WHERE queued.jobtype IS NOT NULL
       AND """ + NOT_BLOCKED % 'queued.jobtype' + """
       AND """ + TAKES_TYPE % 'queued.jobtype' + """)
UPDATE jobs SET state = 'dispatched', pilot = :pilot, host = :host, dispatched_at = :now
 WHERE id = (SELECT head.id FROM heads JOIN jobs AS head ON head.id = heads.id
              WHERE head.state = 'defined'
              ORDER BY head.priority DESC, head.defined_at, head.id
              LIMIT 1 /*FOR UPDATE OF head SKIP LOCKED*/)
RETURNING """ + JOB_COLUMNS
# The types at their cap, read in the claim's own transaction (so two pilots cannot both take
# the last slot of a cap), counting the active jobs through the jobs_active index.
ACTIVE_OF_TYPE = """(SELECT count(*) FROM jobs AS held INDEXED BY jobs_active
                  WHERE held.state IN """ + SQL_ACTIVE + """ AND held.jobtype = jobtypes.name)"""
BLOCKED_JOBTYPES = 'SELECT name FROM jobtypes WHERE cap IS NOT NULL AND cap <= ' + ACTIVE_OF_TYPE
CAPPED_JOBTYPES = ('SELECT name, cap <= ' + ACTIVE_OF_TYPE + ' AS blocked FROM jobtypes'
                   ' WHERE cap IS NOT NULL')
# Where writers run at once (PostgreSQL), two claims may each see a last free slot: a claim of a
# capped type locks the type's row (waiting for the other claims of it to commit), then counts
# again, in a statement of its own so that it sees what they committed.
LOCK_JOBTYPE = 'SELECT cap FROM jobtypes WHERE name = :jobtype /*FOR UPDATE*/'
COUNT_ACTIVE_OF_TYPE = ('SELECT cap, ' + ACTIVE_OF_TYPE + ' AS active FROM jobtypes'
                        ' WHERE name = :jobtype')
# A pilot asking for work while its job is still dispatched never got the reply that carried it.
REDELIVER_JOB = ('SELECT ' + JOB_COLUMNS + ' FROM jobs'
                 " WHERE uuid = :job AND pilot = :pilot AND state = 'dispatched'")
# A job its pilot reports on though the queue holds it: its dispatch was lost in a crash (see
# Recovery), so it is the pilot's again, at the attempt the pilot was given and no later one.
ADOPT_JOB = """
UPDATE jobs SET state = 'dispatched', pilot = :pilot, dispatched_at = :now,
                host = (SELECT host FROM pilots WHERE uuid = :pilot)
 WHERE uuid = :uuid AND state = 'defined' AND pilot IS NULL AND attempt = :attempt
"""
# :started and :stopped are server times: the report's arrival less the seconds the pilot says
# have passed since the payload started or ended (a duration, so the clocks need not agree).
START_JOB = """
UPDATE jobs SET state = 'running', started_at = :started, pid = :pid
 WHERE uuid = :uuid AND pilot = :pilot AND state = 'dispatched'
"""
FINISH_JOB = """
UPDATE jobs SET state = :state, errcode = :errcode, pid = coalesce(:pid, pid),
                started_at = coalesce(started_at, :started), stopped_at = :stopped
 WHERE uuid = :uuid AND pilot = :pilot AND state IN """ + SQL_ACTIVE
SAVE_JOB_LOGS = """
INSERT INTO joblogs (job, stdout, stderr) VALUES (:uuid, :stdout, :stderr)
ON CONFLICT (job) DO UPDATE SET stdout = excluded.stdout, stderr = excluded.stderr
"""
# Opt-in retries ("retries": N): a job that was lost or could not start, never one that ran to
# an exit code, goes back to the queue in its old place, as its next attempt: a report on an
# earlier attempt is refused. A job its pilot reported lost or nonstarter is queued at once; one
# the sweep found lost waits until its pilot, if still alive, has surely killed it (sweep).
RETRY_SET = """
UPDATE jobs SET state = 'defined', retries = retries - 1, attempt = attempt + 1, pilot = NULL,
                host = NULL, pid = NULL, errcode = NULL, dispatched_at = NULL, started_at = NULL,
                stopped_at = NULL
"""
RETRY_JOBS = RETRY_SET + """
 WHERE uuid IN (SELECT value FROM json_each(:jobs)) AND state IN ('lost', 'nonstarter')
   AND retries > 0
RETURNING jobtype, site
"""
# A pilot that stops positively never started the jobs still dispatched to it: queue them again.
RELEASE_PILOT_JOBS = """
UPDATE jobs SET state = 'defined', pilot = NULL, host = NULL, dispatched_at = NULL
 WHERE pilot = :pilot AND state = 'dispatched'
RETURNING jobtype, site
"""
PILOT_DISPATCHED = """
UPDATE pilots SET state = 'dispatched', job = :job, last_seen = :now WHERE uuid = :pilot
"""
PILOT_IDLE = "UPDATE pilots SET state = 'idle', last_seen = :now WHERE uuid = :pilot"
# On PostgreSQL a woken pilot's claim is the last round trip of its request: the claim marks its
# pilot in the same statement (a data-modifying WITH, which SQLite lacks) and goes with the
# COMMIT, the pilot's idle mark after it for the claim that finds nothing (see claim_for).
def claim_marking_pilot(claim, first=''):
    return ('WITH ' + first + 'claimed AS (' + claim + """),
     marked AS (UPDATE pilots SET state = 'dispatched', job = claimed.uuid, last_seen = :now
                  FROM claimed WHERE pilots.uuid = :pilot)
SELECT * FROM claimed""")


CLAIM_MARKING_PILOT = {sql: claim_marking_pilot(sql) for sql in (CLAIM_JOB, CLAIM_JOB_BY_TYPE)}
PILOT_IDLE_UNLESS_CLAIMED = PILOT_IDLE + " AND state <> 'dispatched'"
# A held pilot's claim after a wake-up, on PostgreSQL: the request's only round trip, with the
# COMMIT. The request proved its pilot when it was first asked; the claim is made only if the
# pilot is still free and not drained and no type has a cap (else it finds nothing, and the
# request takes the usual way).
PILOT_READY = """ready AS (
    SELECT 1 FROM pilots
     WHERE uuid = :pilot AND state IN ('active', 'idle')
       AND NOT EXISTS (SELECT 1 FROM pilot_drains WHERE pilot = :pilot)
       AND NOT EXISTS (SELECT 1 FROM jobtypes WHERE cap IS NOT NULL)),
     """
def gated(claim):
    """The claim, made only if `ready` holds a row (a condition after its WHERE)."""
    where_ends = ')\nRETURNING '
    if claim.count(where_ends) != 1:
        raise AssertionError('the claim statement changed its shape: gate it anew')
    return claim.replace(where_ends, ')\n   AND EXISTS (SELECT 1 FROM ready)\nRETURNING ')


HELD_CLAIM = {sql: claim_marking_pilot(gated(sql), PILOT_READY)
              for sql in (CLAIM_JOB, CLAIM_JOB_BY_TYPE)}
PILOT_RUNNING = """
UPDATE pilots SET state = 'running', job = :job, last_seen = :now WHERE uuid = :pilot
"""
PILOT_JOB_DONE = """
UPDATE pilots SET state = 'active', jobs_done = jobs_done + 1, last_seen = :now WHERE uuid = :pilot
"""
PILOT_SEEN = 'UPDATE pilots SET last_seen = :now WHERE uuid = :pilot RETURNING state'
DRAIN_ORDER = 'SELECT requested_at FROM pilot_drains WHERE pilot = :pilot'
STOP_PILOT = """
UPDATE pilots SET state = :state, stopped_at = :now, last_seen = :now
 WHERE uuid = :pilot AND state IN """ + SQL_LIVE_PILOT
# Why a queued job waits: the claim's own conditions (TAKES_SITE, IN_TIME, TAKES_TYPE,
# NOT_BLOCKED, BLOCKED_JOBTYPES and its queue order) asked about this one job.
JOB_IN_TIME = 'SELECT ' + IN_TIME + ' AS in_time FROM jobs WHERE uuid = :uuid'
JOB_PLACE = 'SELECT id, priority, defined_at FROM jobs WHERE uuid = :uuid'
GET_JOBTYPE_CAP = """
SELECT cap, (SELECT count(*) FROM jobs INDEXED BY jobs_active
              WHERE state IN """ + SQL_ACTIVE + """ AND jobtype = :jobtype) AS active
  FROM jobtypes WHERE name = :jobtype
"""
# The live pilots by what they may take; `free` are those not holding a job.
LIVE_PILOT_KINDS = """
SELECT site, jobtypes, count(*) AS n,
       sum(CASE WHEN state IN ('active', 'idle') THEN 1 ELSE 0 END) AS free
  FROM pilots WHERE state IN """ + SQL_LIVE_PILOT + """
 GROUP BY site, jobtypes ORDER BY n DESC LIMIT :limit
"""
PILOT_MAY_TAKE = ('SELECT 1 FROM jobs WHERE uuid = :uuid AND ' + TAKES_SITE + ' AND '
                  + TAKES_TYPE % 'jobtype')
# The queued jobs such a pilot takes first: the claim's order is priority DESC, defined_at, id.
COUNT_AHEAD = """
SELECT count(*) FROM (
  SELECT 1 FROM jobs
   WHERE state = 'defined' AND """ + TAKES_SITE + ' AND ' + IN_TIME + """
     AND """ + TAKES_TYPE % 'jobtype' + ' AND ' + NOT_BLOCKED % 'jobtype' + """
     AND (-priority, defined_at, id) < (-:priority, :defined_at, :id)
   LIMIT :cap) AS ahead
"""
# A workflow's job waits for the parents that have not finished (PARENTS_FINISHED's test).
WAITING_PARENTS = """
SELECT DISTINCT parent.uuid, parent.name, parent.state
  FROM data AS d JOIN jobs AS parent ON parent.uuid = d.sourceuuid
 WHERE d.targetuuid = :uuid AND parent.state <> 'finished'
 ORDER BY parent.name
"""
GET_WORKFLOW_STATE = 'SELECT state FROM workflows WHERE uuid = :workflow'


def check_pilot(raw, now):
    p = check_object(raw, 'pilot')
    check_known(p, PILOT_FIELDS, 'pilot')
    jobtypes = p.get('jobtypes') or []
    if not isinstance(jobtypes, list) or not all(isinstance(t, str) and t for t in jobtypes):
        fail(400, 'jobtypes must be a list of names')
    nonce = text_field(p, 'nonce') or None
    if nonce is not None and len(nonce) < MIN_NONCE:
        fail(400, 'nonce must be at least %d characters (a random one)' % MIN_NONCE)
    return {
        'uuid': uuid_field(p, 'uuid') or str(uuidlib.uuid4()),
        'host': text_field(p, 'host'),
        'site': text_field(p, 'site'),
        'pid': int_field(p, 'pid', None, 0, 2 ** 31),
        'extra': text_field(p, 'extra', maxlen=4096),
        'jobtypes': json.dumps(sorted(set(jobtypes))),
        'nonce_hash': None if nonce is None else digest(nonce),
        'now': now,
    }


def check_report(raw):
    rep = check_object(raw, 'report')
    check_known(rep, REPORT_FIELDS, 'report')
    state = text_field(rep, 'state', required=True)
    if state not in REPORT_STATES:
        fail(400, 'a pilot reports one of %s, not %r' % (', '.join(REPORT_STATES), state[:32]))
    errcode = int_field(rep, 'errcode', None, -1024, 1024)
    if state == 'finished' and errcode not in (0, None):
        fail(400, 'a finished job has errcode 0')
    if state == 'failed' and not errcode:
        fail(400, 'a failed job has a non-zero errcode')
    return {
        'uuid': uuid_field(rep, 'job', required=True),
        'state': state,
        'pid': int_field(rep, 'pid', None, 0, 2 ** 31),
        'errcode': errcode,
        'stdout': log_tail(rep, 'stdout'),
        'stderr': log_tail(rep, 'stderr'),
        'elapsed': number_field(rep, 'elapsed', None, 0, MAX_TIMELIMIT),  # since the start
        'ago': number_field(rep, 'ago', 0, 0, MAX_TIMELIMIT),             # since the end
        'attempt': int_field(rep, 'attempt', None, 1),
    }


def log_tail(rep, key):
    """A payload's output is data, not a name: keep it, whatever bytes it printed."""
    text = rep.get(key) or ''
    if not isinstance(text, str):
        fail(400, '%s must be a string' % key)
    return text[-MAX_LOG_TAIL:].replace('\x00', '\ufffd')


def pilot_dict(row):
    pilot = dict(row)
    pilot['jobtypes'] = json.loads(pilot['jobtypes'])
    return pilot


def register_pilot(store, raw, now):
    """Create the pilot with a secret of its own, which every later call of the pilot carries:
    the pilot, with `secret` (only this answer holds it; the database keeps its hash).

    A registration repeated because its answer was lost carries the first one's nonce, and
    gets a new secret. A uuid registered already is refused to anyone else: the shared pilot
    token does not let one pilot become another. A pilot of a batch job (`extra`
    'slurm:1234') is linked to that batch job."""
    row = check_pilot(raw, now)
    secret = secrets.token_urlsafe(32)
    row['secret_hash'] = digest(secret)
    with store.write() as db:
        if not db.execute(INSERT_PILOT, row).rowcount and not (
                row['nonce_hash'] and db.execute(RENEW_PILOT_SECRET, row).rowcount):
            fail(409, 'pilot %s is registered already; a pilot registers once, and a new '
                 'pilot takes a new uuid' % row['uuid'])
        pilot = db.execute(GET_PILOT, row).fetchone()
        link_batch_pilot(db, pilot, now)
    return dict(pilot_dict(pilot), secret=secret)


def digest(secret):
    """What the database keeps of a secret: its SHA-256 (the secrets are random, 256 bits)."""
    return hashlib.sha256(secret.encode()).hexdigest()


def authenticate_pilot(store, pilot_uuid, secret):
    """The pilot a call of its own names (work, report, heartbeat, stop), once the call proved
    it comes from that pilot: it carries the secret given at its registration."""
    pilot_uuid = check_uuid(pilot_uuid, 'pilot')
    check_pilot_secret(store.one(GET_PILOT_SECRET, {'uuid': pilot_uuid}), pilot_uuid, secret)
    return pilot_uuid


def check_pilot_secret(row, pilot_uuid, secret):
    """404 for a pilot the server does not know, 401 for a call without the pilot's secret."""
    if row is None:
        fail(404, 'no such pilot: %s (a pilot that the server does not know registers '
             'again)' % pilot_uuid)
    if not (secret and row['secret_hash']
            and hmac.compare_digest(digest(secret), row['secret_hash'])):
        fail(401, "this call needs pilot %s's own secret, given at its registration, as its "
             'bearer token' % pilot_uuid)


def get_pilot(store, pilot_uuid):
    row = store.one(GET_PILOT, {'uuid': check_uuid(pilot_uuid, 'pilot')})
    if row is None:
        fail(404, 'no such pilot: %s' % pilot_uuid)
    return pilot_dict(row)


def list_pilots(store, query):
    return [pilot_dict(r) for r in newest_rows(store, LIST_PILOTS, PILOT_FILTERS, query,
                                               PILOT_STATES)]


def live_pilot(db, pilot_uuid, secret=None):
    """The pilot, read in the caller's transaction. A `secret` (a string, empty if the call
    carried none) is checked against the pilot's on the same row: the work request, the
    hottest call, proves its pilot without a statement of its own."""
    return checked_pilot(db.execute(*pilot_read(pilot_uuid, secret)).fetchone(), pilot_uuid,
                         secret)


def pilot_read(pilot_uuid, secret):
    return (GET_PILOT if secret is None else GET_PILOT_AND_SECRET), {'uuid': pilot_uuid}


def checked_pilot(pilot, pilot_uuid, secret):
    if secret is not None:
        check_pilot_secret(pilot, pilot_uuid, secret)
    elif pilot is None:
        fail(404, 'no such pilot: %s' % pilot_uuid)
    return pilot


def stop_reply(pilot):
    return {'status': 'STOP', 'state': pilot['state']}


# The plain walk of the queue must follow jobs_queue whatever the statistics say. Once a purge
# has emptied the table and vacuum has counted it, or before autovacuum has seen a burst of
# submissions, they say that hardly a job is queued; the planner then costs a sort as nothing,
# takes another index and sorts the whole queue at every claim (measured after 10^6 jobs run
# and purged: 0.56 ms a claim against 0.14 ms, for 1,000 queued). SQLite's INDEXED BY pins the
# plan; here sorts are off while the walk is planned and run, and on again right after it.
PG_QUEUE_WALKS = frozenset((CLAIM_JOB, CLAIM_MARKING_PILOT[CLAIM_JOB], HELD_CLAIM[CLAIM_JOB]))
PG_SORTS_OFF = 'SET LOCAL enable_sort = off'
PG_SORTS_DEFAULT = 'SET LOCAL enable_sort TO DEFAULT'
# The statements of every short job, which PostgreSQL plans once per session instead of at
# each use (planning costs more than running most of them): submission, brokerage, reports.
PG_PREPARED = frozenset((
    INSERT_JOB, SEEN_JOBTYPE, GET_PILOT, GET_PILOT_AND_SECRET, CAPPED_JOBTYPES, CLAIM_JOB,
    CLAIM_JOB_BY_TYPE, REDELIVER_JOB, PILOT_DISPATCHED, PILOT_IDLE, GET_JOB_HOLDER, START_JOB,
    PILOT_RUNNING, FINISH_JOB, PILOT_JOB_DONE, SAVE_JOB_LOGS, GET_JOB, GET_RETRY_OF,
    PILOT_IDLE_UNLESS_CLAIMED) + tuple(CLAIM_MARKING_PILOT.values())
    + tuple(HELD_CLAIM.values()))


def request_work(store, pilot_uuid, now, report=None, left=None, secret=None, held=None):
    """One brokerage attempt for a pilot, applying first the report it carries (in the same
    transaction: one commit per short job). Returns (reply, pilot row). `left`: the seconds the
    pilot has left; a drained pilot is stopped instead. `secret`: the call's proof that it
    comes from the pilot (see live_pilot). `held`: the pilot as the request's first attempt
    found it, when the front asks again after a wake-up."""
    if held is not None and report is None:
        job = held_claim(store, held, now, left)
        if job is not None:
            return dispatch_reply(job), held
    try:
        return brokerage(store, pilot_uuid, now, report, left, secret, durable=report is not None)
    except SyncNeeded:
        return brokerage(store, pilot_uuid, now, report, left, secret, durable=True)


class SyncNeeded(Exception):
    """The transaction must be synced after all: it is rolled back, to be done again, synced."""


def brokerage(store, pilot_uuid, now, report, left, secret, durable):
    """request_work's transaction. Synced if it applies a report, or stops a drained pilot; a
    dispatch alone need not be (see Recovery)."""
    woken, caps = [], None
    with store.write(durable) as db:
        if report is None:
            # The types at their cap are read with the pilot (one round trip on PostgreSQL);
            # after a report, they are read once the report is in (it may free a slot).
            rows, caps = db.read_each([pilot_read(pilot_uuid, secret), (CAPPED_JOBTYPES, {})])
            pilot = checked_pilot(rows[0] if rows else None, pilot_uuid, secret)
        else:
            pilot = live_pilot(db, pilot_uuid, secret)
        note = None
        if report is not None:
            note, woken = apply_report(db, pilot, report, now)
        if pilot['drain'] and pilot['state'] not in PILOT_GONE:
            if not durable:
                raise SyncNeeded()
            reply, released = leave_drained(db, pilot, now)
            woken += released
        else:
            # The job a report just ended is not one to deliver again (a refused report may
            # be on an earlier attempt of the job the pilot holds now).
            redeliver = (report is None or report['uuid'] != pilot['job']
                         or not (note or {}).get('changed'))
            reply = claim_for(db, pilot, now, store, left, redeliver, caps)
    store.wake(woken)
    if note is not None:
        reply['report'] = note
    return reply, pilot


def held_claim(store, pilot, now, left):
    """The claim of a held pilot that a job woke, in one round trip (PostgreSQL): the job, or
    None if it found none or could not be made so."""
    if store.db.name != 'postgresql':
        return None
    with store.write(durable=False) as db:
        # Read once the connection is taken: a new one may have found a recovery begun (the
        # jobs it holds back stay back; the next claim of the usual way sees when it ends).
        params = claim_params(pilot, now, left, store.recovery.last_job)
        sql, values = claim_statement(params, [])
        rows = db.commit_with([(HELD_CLAIM[sql], values)])
    return counted_claim(rows[0] if rows else None)


def claim_params(pilot, now, left, last_queued):
    # Whole seconds left: a job's timelimit is whole, so it fits the floor just as the rest.
    return {'pilot': pilot['uuid'], 'host': pilot['host'], 'site': pilot['site'],
            'jobtypes': pilot['jobtypes'], 'now': now,
            'left': MAX_TIMELIMIT if left is None else int(left), 'last_queued': last_queued}


def claim_for(db, pilot, now, store, left=None, redeliver=True, caps=None):
    """The pilot's undelivered job, else the best queued job it may run, else idle. An idle
    pilot seen within the last `store.idle_touch` seconds is not written again."""
    if pilot['state'] in PILOT_GONE:
        return stop_reply(pilot)
    params = claim_params(pilot, now, left, store.recovery.last_queued(db, pilot['uuid'], now))
    quiet = (pilot['state'] == 'idle'
             and pilot['last_seen'] >= store.recovery.heard_after(now, store.idle_touch))
    if caps is None:
        caps = db.execute(CAPPED_JOBTYPES).fetchall()
    if pilot['state'] == 'dispatched':
        job = db.execute(REDELIVER_JOB, dict(params, job=pilot['job'])).fetchone() \
            if redeliver else None
        job = job or claim(db, params, caps)
    elif db.commits_with_claim and not caps:       # a cap is counted again after a claim
        return dispatch_reply(claim_and_commit(db, params, quiet))
    else:
        job = claim(db, params, caps)
    if job is None:
        if not quiet:
            db.later(PILOT_IDLE, params)
    else:
        db.later(PILOT_DISPATCHED, dict(params, job=job['uuid']))
    return dispatch_reply(job)


def dispatch_reply(job):
    if job is None:
        return {'status': 'OK', 'state': 'idle'}
    return {'status': 'OK', 'state': 'dispatched', 'job': job_dict(job)}


def claim(db, params, caps=None):
    """Take the best queued job the pilot may run (None if there is none): the plain walk of
    the queue when nothing is in the way, else the walk by type. `caps`: the rows of
    CAPPED_JOBTYPES, if read already in this transaction."""
    if caps is None:
        caps = db.execute(CAPPED_JOBTYPES).fetchall()
    blocked = [r['name'] for r in caps if r['blocked']]
    checked = not db.serial_writes and caps
    while True:
        if checked:
            db.execute('SAVEPOINT claim')
        sql, values = claim_statement(params, blocked)
        job = db.execute(sql, values).fetchone()
        if job is None or not checked or within_cap(db, job['jobtype']):
            break
        db.execute('ROLLBACK TO SAVEPOINT claim')   # another claim took the last slot first
        blocked.append(job['jobtype'])
    return counted_claim(job)


def claim_and_commit(db, params, quiet):
    """The claim that marks its pilot, sent with the COMMIT (PostgreSQL, where no type has a
    cap): dispatched, or idle (unless `quiet`) if it found nothing."""
    sql, values = claim_statement(params, [])
    statements = [(CLAIM_MARKING_PILOT[sql], values)]
    if not quiet:
        statements.append((PILOT_IDLE_UNLESS_CLAIMED, params))
    rows = db.commit_with(statements)
    return counted_claim(rows[0] if rows else None)


def claim_statement(params, blocked):
    if not blocked and params['jobtypes'] == '[]':
        return CLAIM_JOB, params
    return CLAIM_JOB_BY_TYPE, dict(params, blocked=json.dumps(blocked))


def counted_claim(job):
    if job is not None:
        # Counted before the commit: only a failed commit, which ends the request in an
        # error, would make the count one too high.
        process_metrics().claimed(job['jobtype'], seconds_between(job['defined_at'],
                                                                  job['dispatched_at']))
    return job


def within_cap(db, jobtype):
    """The type's active jobs, this claim's among them, are no more than its cap."""
    if db.execute(LOCK_JOBTYPE, {'jobtype': jobtype}).fetchone()['cap'] is None:
        return True
    row = db.execute(COUNT_ACTIVE_OF_TYPE, {'jobtype': jobtype}).fetchone()
    return row['active'] <= row['cap']


def job_waiting(db, job, now):
    """Why a queued job does not run yet, and since when: {since, seconds, reasons: [{code,
    text}]}; None for a job that is not queued. The reasons are the claim's conditions asked
    about this job, so they say what the claim does."""
    if job['state'] not in QUEUED_STATES:
        return None
    since = job['defined_at'] or job['created_at']
    reasons = (template_reasons(db, job) if job['state'] == 'template'
               else queue_reasons(db, job, now))
    return {'since': since, 'seconds': seconds_between(since, now), 'reasons': reasons}


def reason(code, text):
    return {'code': code, 'text': text}


def template_reasons(db, job):
    """A template waits for someone to define it, or for its workflow's engine."""
    if not job['workflow']:
        return [reason('template', 'it is a template: define it to queue it (p3s_job.py -a -u '
                       '%s -s defined)' % job['uuid'])]
    wf = db.execute(GET_WORKFLOW_STATE, job).fetchone()
    if wf and wf['state'] == 'template':
        return [reason('workflow', 'its workflow is a template: define it (p3s_workflow.py -m '
                       '-u %s -s defined)' % job['workflow'])]
    parents = db.execute(WAITING_PARENTS, job).fetchall()
    return [reason('parents', 'it waits for its parents to finish: %s' % ', '.join(
        '%s (%s)' % (p['name'], p['state']) for p in parents))] if parents else []


def queue_reasons(db, job, now):
    """A defined job: past its deadline, its type at its cap, no live pilot that may take it,
    all of those busy, or other jobs first in the claim's order."""
    params = dict(job, now=now, blocked=json.dumps([r['name'] for r in
                                                     db.execute(BLOCKED_JOBTYPES)]))
    params.update(db.execute(JOB_PLACE, params).fetchone(), cap=WAIT_AHEAD_CAP)
    reasons = recovery_reasons(db, params['id'], now)
    if not db.execute(JOB_IN_TIME, params).fetchone()['in_time']:
        reasons.append(reason('deadline', 'its deadline passed at %s: no pilot takes it, and '
                              'housekeeping makes it stale' % job['deadline_at']))
    if job['jobtype'] in json.loads(params['blocked']):
        reasons.append(cap_reason(db, job['jobtype']))
    kinds = db.execute(LIVE_PILOT_KINDS, {'limit': WAIT_PILOT_KINDS}).fetchall()
    takers = [k for k in kinds
              if db.execute(PILOT_MAY_TAKE, dict(params, site=k['site'],
                                                 jobtypes=k['jobtypes'])).fetchone()]
    if not takers:
        return reasons + [no_pilot_reason(job, kinds)]
    free = sum(k['free'] for k in takers)
    if not free:
        reasons.append(reason('busy', 'the %s that may run it %s busy with other jobs'
                              % (count_of(sum(k['n'] for k in takers), 'live pilot'),
                                 'is' if sum(k['n'] for k in takers) == 1 else 'are')))
    ahead = min(db.execute(COUNT_AHEAD, dict(params, site=k['site'], jobtypes=k['jobtypes']))
                .fetchone()[0] for k in takers)
    if ahead:
        reasons.append(reason('behind', '%s%s first (higher priority, or defined earlier)'
                              % ('more than ' * (ahead >= WAIT_AHEAD_CAP),
                                 count_of(ahead, 'queued job') + (' comes' if ahead == 1
                                                                  else ' come'))))
    if not reasons:
        reasons.append(reason('next', 'it is next: %s that may run it will take it at its next '
                              'request' % count_of(free, 'free pilot')))
    return reasons


def recovery_reasons(db, job_id, now):
    """A job queued before a recovery that lasts (see Recovery) waits for it."""
    r = db.execute(GET_RECOVERY).fetchone()
    if r is None or job_id > r['last_job'] or not r['ends_at']:
        return []
    awaited = awaited_pilot(db, r['began_at'], r['ends_at'], now)
    if awaited is None:
        return []
    return [reason('recovery', 'the storage restarted at %s, and a crash may have lost the last '
                   'dispatches: the jobs queued before then wait until every live pilot has '
                   'been heard from (pilot %s has not), until %s at most'
                   % (r['began_at'], awaited, r['ends_at']))]


def cap_reason(db, jobtype):
    cap = db.execute(GET_JOBTYPE_CAP, {'jobtype': jobtype}).fetchone()
    if cap['cap'] == 0:
        return reason('cap', 'its type %s is paused (cap 0; p3s_job.py -l -L N -T %s resumes it)'
                      % (jobtype, jobtype))
    return reason('cap', 'its type %s is at its cap: %d of %d dispatched or running '
                  '(p3s_job.py -l -L N -T %s raises it)' % (jobtype, cap['active'], cap['cap'],
                                                            jobtype))


def no_pilot_reason(job, kinds):
    needs = 'it needs a pilot %sthat takes type %s' % (
        'of site %s ' % job['site'] if job['site'] else '', job['jobtype'])
    if not kinds:
        return reason('no_pilot', 'no pilot is live: %s (p3s_pilot.py starts one)' % needs)
    return reason('no_pilot', 'no live pilot may run it: %s; the live ones: %s' % (
        needs, '; '.join(pilot_kind(k) for k in kinds)))


def pilot_kind(kind):
    """'2 of site np04 taking reco, purity', '1 without a site taking any type'."""
    types = ', '.join(json.loads(kind['jobtypes'])) or 'any type'
    where = 'of site %s' % kind['site'] if kind['site'] else 'without a site'
    return '%d %s taking %s' % (kind['n'], where, types)


def count_of(n, one, many=None):
    """'1 job', '2 jobs'; '1 vertex', '3 vertices'."""
    return '%d %s' % (n, one if n == 1 else many or one + 's')


def wait_for_work(store, pilot_uuid, wait, report=None, poll=None, now=utcnow, left=None,
                  secret=None):
    """Brokerage with a long poll: one attempt now. If it finds nothing and the pilot may wait,
    `poll` (given by the server's front, which holds requests without a thread) may take the
    request over: it keeps the connection open, and asks again when a job may have arrived or
    the wait is over. Without a front the pilot is answered at once (`waited: false`) and polls
    again after its period. `left`: the seconds a batch pilot has before it must be gone."""
    if poll is not None:
        left = poll.time_left(left)          # counted down while the request is held
    reply, pilot = request_work(store, pilot_uuid, now(), report, left, secret,
                                held=poll.pilot if poll is not None and poll.held else None)
    if poll is not None:
        poll.pilot = pilot
        reply = poll.carry_note(reply)
    if reply['state'] != 'idle':
        return reply
    if wait > 0 and poll is not None and poll.hold(wait, pilot['site'],
                                                   json.loads(pilot['jobtypes']), left):
        # Held: the front asks again if a job it may run arrives meanwhile; if none does,
        # this is the answer when the wait ends (the pilot's next request asks at once).
        return dict(reply, waited=True)
    return dict(reply, waited=poll is not None and poll.held)


def report_job(store, pilot_uuid, rep, now):
    """A report on its own (a start report, or a final one when the pilot leaves). A start
    report need not survive a power loss: the final report says it all again."""
    with store.write(durable=rep['state'] != 'running') as db:
        note, woken = apply_report(db, live_pilot(db, pilot_uuid), rep, now)
    store.wake(woken)
    if note['status'] == 'REFUSED':
        fail(409, note['error'])
    return note


def apply_report(db, pilot, rep, now):
    """A pilot's word on the job it holds: started (running) or ended (a terminal state).
    Returns (answer for the pilot, jobs that became runnable).

    Each change names the state it expects, so a repeated or late report changes nothing.
    A report on a job the pilot does not hold is refused.
    """
    elapsed = rep.get('elapsed')
    if elapsed is None and rep['state'] == 'running':
        elapsed = 0
    at = rep.get('arrived') or now          # the pilot's durations count back from here
    params = dict(rep, pilot=pilot['uuid'], now=now,
                  started=None if elapsed is None else seconds_before(at, elapsed),
                  stopped=seconds_before(at, rep.get('ago') or 0))
    held = db.execute(GET_JOB_HOLDER, params).fetchone()
    if pilot['state'] not in PILOT_GONE:
        held = adopted(db, held, params)
    if held is None or held['pilot'] != pilot['uuid']:
        return {'status': 'REFUSED',
                'error': 'job %s is not held by pilot %s' % (rep['uuid'], pilot['uuid'])}, []
    if pilot['state'] in PILOT_GONE:
        return stop_reply(pilot), []
    if rep.get('attempt') not in (None, held['attempt']):
        return {'status': 'REFUSED', 'error': 'the report is on attempt %d of job %s, which is '
                'at attempt %d now' % (rep['attempt'], rep['uuid'], held['attempt'])}, []
    # This runs for every job: only the statements a report needs (retries only for a
    # nonstarter or a job its pilot lost, the workflow engine only for a workflow's job).
    woken, state = [], held['state']
    if rep['state'] == 'running':
        changed = db.execute(START_JOB, params).rowcount
        if changed:
            db.later(PILOT_RUNNING, dict(params, job=rep['uuid']))
    else:
        changed = db.execute(FINISH_JOB, params).rowcount
        if changed:
            db.later(PILOT_JOB_DONE, params)
            if elapsed is not None:
                process_metrics().ran(held['jobtype'], elapsed - params['ago'])
            if rep['state'] in ('nonstarter', 'lost'):
                woken = retry_jobs(db, [rep['uuid']])
            if held['cap'] is not None:
                woken += free_slots(db, [held['jobtype']])
        if rep['stdout'] or rep['stderr']:
            db.later(SAVE_JOB_LOGS, params)
    if changed:
        state = 'defined' if woken else rep['state']
        if held['workflow']:
            woken += workflow_hook(db, [rep['uuid']], now)
    if rep['state'] == 'running' and state not in ACTIVE_STATES:
        return {'status': 'KILL', 'state': state, 'changed': False}, woken
    return {'status': 'OK', 'state': state, 'changed': bool(changed)}, woken


def adopted(db, held, params):
    """The job as held now: its pilot's again if the pilot runs the attempt the queue holds
    (its dispatch was lost in a crash). `params`: the pilot, the job's uuid and attempt, now."""
    # Most reports are on a job dispatched or running: no statement for them.
    if held is None or held['state'] != 'defined' or not db.execute(ADOPT_JOB, params).rowcount:
        return held
    log.warning('job %s: pilot %s runs it though it was queued again (its dispatch was lost in '
                'a crash): it is the pilot\'s again', params['uuid'], params['pilot'])
    return dict(held, state='dispatched', pilot=params['pilot'])


def retry_jobs(db, job_uuids):
    """Queue again those of these jobs that ended lost or nonstarter with retries left."""
    return [tuple(r) for r in db.execute(RETRY_JOBS, {'jobs': json.dumps(job_uuids)})]


def heartbeat(store, pilot_uuid, job_uuid, now, attempt=None):
    """A running pilot is alive; tell it to kill its payload if its job was killed or lost,
    and that it is drained (it finishes the job and leaves) if it is. A job whose dispatch was
    lost in a crash is the pilot's again, running."""
    with store.write(durable=False) as db:
        row = db.execute(PILOT_SEEN, {'pilot': pilot_uuid, 'now': now}).fetchone()
        if row is None:
            fail(404, 'no such pilot: %s' % pilot_uuid)
        if row['state'] in PILOT_GONE:
            return stop_reply(row)
        drain = {'drain': True} if db.execute(DRAIN_ORDER, {'pilot': pilot_uuid}).fetchone() \
            else {}
        if job_uuid is None:
            return dict({'status': 'OK'}, **drain)
        params = {'uuid': job_uuid, 'pilot': pilot_uuid, 'attempt': attempt, 'now': now,
                  'started': now, 'pid': None, 'job': job_uuid}
        held = db.execute(GET_JOB_HOLDER, params).fetchone()
        back = adopted(db, held, params)
        if back is not held:          # running: its start report went with its dispatch
            db.execute(START_JOB, params)
            db.later(PILOT_RUNNING, params)
            held = dict(back, state='running')
    if held is None or held['pilot'] != pilot_uuid or held['state'] not in ACTIVE_STATES:
        return {'status': 'KILL', 'state': held['state'] if held else 'deleted'}
    return dict({'status': 'OK', 'state': held['state']}, **drain)


def stop_pilot(store, pilot_uuid, state, now):
    """The pilot leaves: `stopped` (cycles used up) or `killed` (signalled). Jobs still
    dispatched to it were never started, so they go back to the queue."""
    with store.write() as db:
        live_pilot(db, pilot_uuid)
        released = release_pilot(db, pilot_uuid, state, now)
        pilot = db.execute(GET_PILOT, {'uuid': pilot_uuid}).fetchone()
    store.wake(released)
    return dict(pilot_dict(pilot), released=len(released))


def release_pilot(db, pilot_uuid, state, now):
    """Mark a live pilot gone in `state`; returns (jobtype, site) of the jobs it gave back."""
    params = {'pilot': pilot_uuid, 'state': state, 'now': now}
    if not db.execute(STOP_PILOT, params).rowcount:
        return []
    return [tuple(r) for r in db.execute(RELEASE_PILOT_JOBS, params).fetchall()]


def leave_drained(db, pilot, now):
    """A drained pilot asking for work gets none: it is stopped here, and its undelivered job
    (a reply that never reached it) goes back to the queue. Returns (reply, jobs released)."""
    released = release_pilot(db, pilot['uuid'], 'stopped', now)
    return {'status': 'STOP', 'state': 'stopped', 'drain': pilot['drain']}, released

# ---------------------------------------------------------------------------------------------
# Housekeeping: lost pilots, overdue jobs, deadlines, retention
# ---------------------------------------------------------------------------------------------

# Must repeat the condition of the partial index pilots_live to use it.
LOSE_SILENT_PILOTS = """
UPDATE pilots INDEXED BY pilots_live SET state = 'lost', stopped_at = :now
 WHERE state IN """ + SQL_LIVE_PILOT + """ AND last_seen < :cutoff
RETURNING uuid
"""
LOSE_PILOT_JOBS = """
UPDATE jobs SET state = 'lost', stopped_at = :now
 WHERE pilot IN (SELECT value FROM json_each(:pilots)) AND state IN """ + SQL_ACTIVE + """
RETURNING uuid
"""
# A lost job with retries left runs again only once its last attempt cannot be alive: its pilot,
# if it lives, kills the payload of such a job when it has heard nothing from the server for a
# pilot timeout (the server lost it after as long a silence), and takes LOST_RETRY_DELAY at most
# to do it; a pilot that died took its payload with it. Must repeat the condition of the partial
# index jobs_lost_retries to use it.
RETRY_LOST_JOBS = RETRY_SET + """
 WHERE state = 'lost' AND retries > 0 AND stopped_at < :fenced
RETURNING jobtype, site
"""
# A pilot should have killed these itself; it did not (or cannot), so the server ends them and
# the pilot's next heartbeat is answered KILL.
KILL_OVERDUE_JOBS = """
UPDATE jobs SET state = 'timelimit', stopped_at = :now
 WHERE state = 'running' AND p3s_seconds_between(started_at, :now) > timelimit + :grace
RETURNING uuid
"""
# Must repeat the condition of the partial index jobs_deadline to use it.
STALE_JOBS = """
UPDATE jobs INDEXED BY jobs_deadline SET state = 'stale', stopped_at = :now
 WHERE state = 'defined' AND deadline_at IS NOT NULL AND deadline_at <= :now
RETURNING uuid
"""
PURGE_JOBS = """
DELETE FROM jobs WHERE id IN (
  SELECT id FROM jobs
   WHERE state IN """ + SQL_TERMINAL + """
     AND (:state IS NULL OR state = :state) AND coalesce(stopped_at, created_at) < :cutoff
     AND workflow IS NULL
   LIMIT :batch)
"""
PURGE_SERVICES = """
DELETE FROM services WHERE id IN (
  SELECT id FROM services WHERE :state IS NULL AND created_at < :cutoff LIMIT :batch)
"""
# Old workflows go whole, with their jobs and data (DELETE_WORKFLOW_*).
OLD_WORKFLOWS = """
SELECT uuid AS workflow FROM workflows
 WHERE state IN """ + SQL_WORKFLOW_ENDED + """ AND (:state IS NULL OR state = :state)
   AND stopped_at < :cutoff
 LIMIT :batch
"""
PURGE_PILOTS = """
DELETE FROM pilots WHERE id IN (
  SELECT id FROM pilots
   WHERE state IN """ + SQL_PILOT_GONE + """ AND (:state IS NULL OR state = :state)
     AND stopped_at < :cutoff
   LIMIT :batch)
"""
PURGE_BATCHJOBS = """
DELETE FROM batchjobs WHERE id IN (
  SELECT id FROM batchjobs
   WHERE state NOT IN """ + SQL_BATCH_LIVE + """ AND (:state IS NULL OR state = :state)
     AND ended_at < :cutoff
   LIMIT :batch)
"""


def sweep(store, now, pilot_timeout, lose_pilots=True):
    """Housekeeping: pilots silent for longer than pilot_timeout are lost, with their jobs;
    running jobs far past their timelimit end `timelimit`; queued jobs past their deadline
    go stale."""
    params = {'now': now, 'cutoff': seconds_before(now, pilot_timeout), 'grace': TIMELIMIT_GRACE,
              'fenced': seconds_before(now, LOST_RETRY_DELAY)}
    lost, woken = [], []
    with store.write(durable=False) as db:
        if lose_pilots:
            lost = [r['uuid'] for r in db.execute(LOSE_SILENT_PILOTS, params)]
        if lost:
            jobs = [r['uuid'] for r in db.execute(LOSE_PILOT_JOBS,
                                                   dict(params, pilots=json.dumps(lost)))]
            woken = workflow_hook(db, jobs, now)
        woken += [tuple(r) for r in db.execute(RETRY_LOST_JOBS, params)]
        overdue = [r['uuid'] for r in db.execute(KILL_OVERDUE_JOBS, params)]
        woken += workflow_hook(db, overdue, now)
        stale = [r['uuid'] for r in db.execute(STALE_JOBS, params)]
        woken += workflow_hook(db, stale, now)
    store.wake(woken)
    if lost or overdue:
        wake_capped(store)
    if lost:
        log.warning('pilots lost after %.0f s of silence: %s', pilot_timeout, ', '.join(lost))
    if overdue:
        log.warning('%d running jobs ended by the server, %d s past their timelimit',
                    len(overdue), TIMELIMIT_GRACE)
    if stale:
        log.info('%d queued jobs passed their deadline: stale', len(stale))
    return {'lost_pilots': lost, 'woken': len(woken), 'overdue': len(overdue),
            'stale_jobs': len(stale)}


def purge(store, now, older, state=None):
    """Delete terminal jobs, departed pilots and ended batch jobs older than `older` seconds, in
    small batches so that brokerage waits for one batch at most."""
    params = {'cutoff': seconds_before(now, older), 'state': state, 'batch': PURGE_BATCH}
    removed = {'jobs': 0, 'pilots': 0, 'workflows': 0, 'services': 0, 'batchjobs': 0}
    while True:
        with store.write(durable=False) as db:
            old = db.execute(OLD_WORKFLOWS, dict(params, batch=PURGE_WORKFLOW_BATCH)).fetchall()
            for workflow in old:
                erase_workflow(db, dict(workflow))
        removed['workflows'] += len(old)
        if len(old) < PURGE_WORKFLOW_BATCH:
            break
    for what, sql in (('jobs', PURGE_JOBS), ('pilots', PURGE_PILOTS),
                      ('services', PURGE_SERVICES), ('batchjobs', PURGE_BATCHJOBS)):
        while True:
            with store.write(durable=False) as db:
                n = db.execute(sql, params).rowcount
            removed[what] += n
            if n < PURGE_BATCH:
                break
    return removed


class Housekeeper(threading.Thread):
    """Runs sweep() (and purge(), with keep_days) inside the server: no cron needed.

    Several server processes may share the database; only the one holding `leader` (a lock
    shared between them) sweeps, and when it dies another takes the lock at its next pass.
    No pilot is declared lost during the first pilot_timeout after the server started, or
    after a pass found the database out of reach (`started`, on the monotonic clock): while
    the server or its database was away its pilots could not reach it, and they need the time
    to come back. `clock` (seconds, monotonic) and `now` (stored time) can be given, so that
    tests step it.
    """

    def __init__(self, store, pilot_timeout, keep_days=None, clock=time.monotonic, now=utcnow,
                 started=None, leader=None):
        super().__init__(name='p3s-housekeeper', daemon=True)
        self.store, self.pilot_timeout, self.keep_days = store, pilot_timeout, keep_days
        self.clock, self.now = clock, now
        self.period = min(SWEEP_PERIOD, pilot_timeout / 4)
        self.started = clock() if started is None else started
        self.next_purge = self.started
        self.leader, self.leading = leader, leader is None
        self.stopping = threading.Event()

    def run(self):
        while not self.stopping.wait(self.period):
            try:
                self.step()
            except Exception as e:
                reason = self.store.db.trouble(e)
                if reason is None:
                    log.exception('housekeeping failed; trying again in %.1f s', self.period)
                else:
                    if self.store.db.unreachable(e):
                        self.started = self.clock()
                    log.warning('housekeeping put off: the database: %s (%s); trying again in '
                                '%.1f s', reason, first_line(e), self.period)

    def step(self):
        """One pass: the sweep, and the retention purge when it is due (None: another process
        does the housekeeping)."""
        if self.leading and self.leader is not None and not self.leader.held():
            log.warning('process %d lost the housekeeping lock', os.getpid())
            self.leading = False
        if not self.leading:
            self.leading = self.leader.try_acquire()
            if not self.leading:
                return None
            log.info('process %d does the housekeeping', os.getpid())
        clock = self.clock()
        done = sweep(self.store, self.now(), self.pilot_timeout,
                     lose_pilots=clock - self.started >= self.pilot_timeout)
        if self.keep_days and clock >= self.next_purge:
            self.next_purge = clock + PURGE_PERIOD
            done['purged'] = purge(self.store, self.now(), self.keep_days * 86400)
            log.info('retention of %g days: purged %s', self.keep_days, done['purged'])
        return done

# ---------------------------------------------------------------------------------------------
# Workflows: DAGs, the workflows made from them, and the engine that runs them
# ---------------------------------------------------------------------------------------------

DAG_COLUMNS = 'name, "user", description, nvertices, nedges, root, created_at'
VERTEX_COLUMNS = 'name, jobtype, payload, env, timelimit, priority'
EDGE_COLUMNS = 'source, target, name, dirpath, datatype, datatag, comment'
INSERT_DAG = """
INSERT INTO dags (name, "user", description, nvertices, nedges, root, graphml, created_at)
VALUES (:name, :user, :description, :nvertices, :nedges, :root, :graphml, :now)
RETURNING id
"""
INSERT_VERTEX = """
INSERT INTO dag_vertices (dag, name, position, jobtype, payload, env, timelimit, priority)
VALUES (:dag, :name, :position, :jobtype, :payload, :env, :timelimit, :priority)
"""
INSERT_EDGE = """
INSERT INTO dag_edges (dag, source, target, name, dirpath, datatype, datatag, comment)
VALUES (:dag, :source, :target, :name, :dirpath, :datatype, :datatag, :comment)
"""
GET_DAG = 'SELECT id, graphml, ' + DAG_COLUMNS + ' FROM dags WHERE name = :name'
LIST_DAGS = 'SELECT ' + DAG_COLUMNS + ' FROM dags ORDER BY name LIMIT :limit'
GET_DAG_VERTICES = ('SELECT ' + VERTEX_COLUMNS + ' FROM dag_vertices WHERE dag = :dag'
                    ' ORDER BY position')
GET_DAG_EDGES = 'SELECT ' + EDGE_COLUMNS + ' FROM dag_edges WHERE dag = :dag ORDER BY id'
DELETE_DAG = 'DELETE FROM dags WHERE name = :name'        # vertices and edges cascade

INSERT_WORKFLOW = """
INSERT INTO workflows (uuid, name, "user", description, dag, state, rootuuid, nvertices, created_at)
VALUES (:uuid, :name, :user, :description, :dag, 'template', :rootuuid, :nvertices, :now)
"""
INSERT_WORKFLOW_JOB = """
INSERT INTO jobs (uuid, name, "user", jobtype, payload, env, priority, timelimit, workflow, state,
                  created_at, deadline)
VALUES (:uuid, :name, :user, :jobtype, :payload, :env, :priority, :timelimit, :workflow,
        'template', :now, :deadline)
"""
INSERT_WORKFLOW_DATA = """
INSERT INTO data (uuid, name, dirpath, datatype, datatag, state, comment, workflow, source,
                  sourceuuid, target, targetuuid, created_at, updated_at)
VALUES (:uuid, :name, :dirpath, :datatype, :datatag, 'template', :comment, :workflow, :source,
        :sourceuuid, :target, :targetuuid, :now, :now)
"""
GET_WORKFLOW_JOBS = """
SELECT uuid, name, state, jobtype, priority, errcode, pilot, host, defined_at, started_at,
       stopped_at, retry_of, attempt
  FROM jobs WHERE workflow = :workflow ORDER BY id
"""
GET_WORKFLOW_DATA = ('SELECT ' + DATA_COLUMNS + ' FROM data WHERE workflow = :workflow'
                     ' ORDER BY id')
COUNT_ACTIVE_WORKFLOW_JOBS = """
SELECT count(*) FROM jobs WHERE workflow = :workflow AND state IN """ + SQL_ACTIVE
DELETE_WORKFLOW_JOBS = 'DELETE FROM jobs WHERE workflow = :workflow'
DELETE_WORKFLOW_DATA = 'DELETE FROM data WHERE workflow = :workflow'
DELETE_WORKFLOW = 'DELETE FROM workflows WHERE uuid = :workflow'
LIST_WORKFLOWS = 'SELECT ' + WORKFLOW_COLUMNS + ' FROM workflows'
WORKFLOW_FILTERS = {
    'state': 'state = :state',
    'states': 'state IN (SELECT value FROM json_each(:states))',
    'user': '"user" = :user',
}

# The engine. Dependencies are the data edges: a job's parents are the producers of its inputs.
# A released job becomes defined, or finished at once if it is a 'noop'.
DEFINE_WORKFLOW = """
UPDATE workflows SET state = 'defined', defined_at = :now
 WHERE uuid = :workflow AND state = 'template'
"""
DEFINE_WORKFLOW_DATA = """
UPDATE data SET state = 'defined', updated_at = :now
 WHERE workflow = :workflow AND state = 'template'
"""
# A workflow's deadline counts from its definition, for every job of it, whenever released.
SET_WORKFLOW_DEADLINE = """
UPDATE jobs SET deadline_at = p3s_seconds_after(:now, deadline)
 WHERE workflow = :workflow AND deadline IS NOT NULL
"""
RELEASE_SET = """
UPDATE jobs SET state = CASE jobtype WHEN 'noop' THEN 'finished' ELSE 'defined' END,
       defined_at = :now,
       dispatched_at = CASE jobtype WHEN 'noop' THEN :now END,
       started_at = CASE jobtype WHEN 'noop' THEN :now END,
       stopped_at = CASE jobtype WHEN 'noop' THEN :now END,
       errcode = CASE jobtype WHEN 'noop' THEN 0 END
"""
# AND-join: a job is released when the last of its parents has finished (a source at once).
PARENTS_FINISHED = """
   AND NOT EXISTS (SELECT 1 FROM data AS d JOIN jobs AS parent ON parent.uuid = d.sourceuuid
                    WHERE d.targetuuid = jobs.uuid AND parent.state <> 'finished')
RETURNING uuid, state, jobtype, site
"""
# Every job of the workflow that may run now: its sources when it is defined; after a retry,
# the new attempts whose parents have all finished.
RELEASE_READY = RELEASE_SET + """
 WHERE workflow = :workflow AND state = 'template'""" + PARENTS_FINISHED
RELEASE_CHILDREN = RELEASE_SET + """
 WHERE state = 'template'
   AND uuid IN (SELECT targetuuid FROM data WHERE sourceuuid = :job)""" + PARENTS_FINISHED
GET_FLOW_JOB = 'SELECT uuid, name, state, workflow FROM jobs WHERE uuid = :job'
# Where writers run at once (PostgreSQL), two parents ending together would each see the other
# unfinished and neither would release their child: the engine takes its workflow's row first,
# so the second waits for the first's commit and then sees both finished.
LOCK_WORKFLOW = 'SELECT uuid FROM workflows WHERE uuid = :workflow /*FOR UPDATE*/'
DATA_AVAILABLE = """
UPDATE data SET state = 'available', updated_at = :now WHERE sourceuuid = :job AND state = 'defined'
"""
CANCEL_DOWNSTREAM = """
WITH RECURSIVE downstream (uuid) AS (
    SELECT targetuuid FROM data WHERE sourceuuid = :job AND targetuuid IS NOT NULL
    UNION
    SELECT d.targetuuid FROM data AS d JOIN downstream ON d.sourceuuid = downstream.uuid
     WHERE d.targetuuid IS NOT NULL)
UPDATE jobs SET state = 'cancelled', stopped_at = :now
 WHERE uuid IN (SELECT uuid FROM downstream) AND state IN """ + SQL_QUEUED
FAIL_WORKFLOW = """
UPDATE workflows SET state = 'failed', comment = :comment, stopped_at = :now
 WHERE uuid = :workflow AND state IN ('template', 'defined', 'running')
"""
# A workflow started when its first job did, even when that job failed it at once (a short
# job is reported only at its end, and the failure is applied first); defined becomes running.
WORKFLOW_STARTED = """
UPDATE workflows SET state = CASE state WHEN 'defined' THEN 'running' ELSE state END,
       started_at = (SELECT min(started_at) FROM jobs
                      WHERE workflow = :workflow AND jobtype <> 'noop')
 WHERE uuid = :workflow AND started_at IS NULL
   AND EXISTS (SELECT 1 FROM jobs WHERE workflow = :workflow AND jobtype <> 'noop'
                                    AND started_at IS NOT NULL)
"""
WORKFLOW_PROGRESS = """
UPDATE workflows SET ndone = (SELECT count(*) FROM jobs WHERE workflow = :workflow
                                                      AND state = 'finished')
 WHERE uuid = :workflow
"""
# Finished when every job has: an attempt that was retried counts through its retry.
WORKFLOW_FINISHED = """
UPDATE workflows SET state = 'finished', stopped_at = :now
 WHERE uuid = :workflow AND state IN ('defined', 'running')
   AND NOT EXISTS (SELECT 1 FROM jobs WHERE workflow = :workflow AND state <> 'finished'
                                        AND """ + NOT_RETRIED + """)
"""
# Cancel: the workflow stops where it is and keeps its history. Queued jobs are cancelled;
# running ones are killed, by their pilots at the next heartbeat.
CANCEL_WORKFLOW = """
UPDATE workflows SET state = 'cancelled', comment = :comment, stopped_at = :now
 WHERE uuid = :workflow AND state IN ('template', 'defined', 'running')
"""
CANCEL_WORKFLOW_JOBS = """
UPDATE jobs SET state = 'cancelled', stopped_at = :now
 WHERE workflow = :workflow AND state IN """ + SQL_QUEUED
KILL_WORKFLOW_JOBS = """
UPDATE jobs SET state = 'killed', stopped_at = :now
 WHERE workflow = :workflow AND state IN """ + SQL_ACTIVE + """
RETURNING jobtype
"""
# Retry: a failed or cancelled workflow runs again. Each of its jobs that ended without
# finishing (and has no retry yet) gets a new attempt, which takes the old one's place on the
# workflow's data edges, so the engine sees the new attempts only.
WORKFLOW_JOBS_TO_RETRY = 'SELECT ' + JOB_COLUMNS + """ FROM jobs
 WHERE workflow = :workflow AND state IN """ + SQL_TERMINAL + """ AND state <> 'finished'
   AND """ + NOT_RETRIED + """
 ORDER BY id
"""
MOVE_DATA_SOURCE = 'UPDATE data SET sourceuuid = :uuid WHERE sourceuuid = :retry_of'
MOVE_DATA_TARGET = 'UPDATE data SET targetuuid = :uuid WHERE targetuuid = :retry_of'
MOVE_WORKFLOW_ROOT = """
UPDATE workflows SET rootuuid = :uuid WHERE uuid = :workflow AND rootuuid = :retry_of
"""
RESUME_WORKFLOW = """
UPDATE workflows SET state = CASE WHEN started_at IS NULL THEN 'defined' ELSE 'running' END,
       comment = '', stopped_at = NULL, defined_at = coalesce(defined_at, :now)
 WHERE uuid = :workflow AND state IN ('failed', 'cancelled')
"""


@contextmanager
def context(where):
    """Prefix the one-line message of a refusal raised inside with where it happened."""
    try:
        yield
    except Refused as e:
        fail(e.status, '%s: %s' % (where, e.message))


def parse_graphml(text):
    """A directed acyclic multigraph from GraphML text, or a 400 that says why not.

    The text is refused before parsing if it declares a DOCTYPE or entities (entity expansion
    is the classic XML bomb) and read from the string itself (the original wrote it to a file in
    /tmp first)."""
    if len(text.encode()) > MAX_GRAPHML:
        fail(413, 'GraphML larger than %d bytes' % MAX_GRAPHML)
    if XML_DECLARATIONS_RE.search(text):
        fail(400, 'GraphML with a DOCTYPE or ENTITY declaration is refused')
    try:
        graph = networkx.parse_graphml(text, force_multigraph=True)
    except Exception as e:          # whatever the parser trips on is a fault of the text
        fail(400, 'invalid GraphML: %s' % (str(e).splitlines() or [type(e).__name__])[0])
    if not graph.is_directed():
        fail(400, 'the graph must be directed (edgedefault="directed")')
    if not 0 < graph.number_of_nodes() <= MAX_DAG_VERTICES:
        fail(400, 'a DAG has 1 to %d vertices' % MAX_DAG_VERTICES)
    if graph.number_of_edges() > MAX_DAG_EDGES:
        fail(400, 'a DAG has at most %d edges' % MAX_DAG_EDGES)
    if not networkx.is_directed_acyclic_graph(graph):
        cycle = [u for u, v, *_ in networkx.find_cycle(graph)]
        fail(400, 'not a DAG: it has the cycle %s' % ' -> '.join(cycle + cycle[:1]))
    return graph


def graphml_int(attrs, key, default, lo, hi):
    """An integer attribute, declared int or string in the GraphML."""
    value = attrs.get(key, default)
    if isinstance(value, str):
        try:
            value = int(value.strip() or default)
        except ValueError:
            fail(400, '%s must be an integer, not %r' % (key, value[:32]))
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return int_field({key: value}, key, default, lo, hi)


def check_vertex(name, attrs, position):
    with context('vertex %r' % name[:MAX_TEXT]):
        if ':' in name or len(name) > MAX_TEXT:
            fail(400, "a vertex name has at most %d characters and no ':'" % MAX_TEXT)
        env = attrs.get('env') or '{}'
        try:
            env = json.loads(env) if isinstance(env, str) else env
        except ValueError:
            fail(400, 'env is not valid JSON')
        texts = {k: str(v) for k, v in attrs.items() if k in ('jobtype', 'payload')}
        jobtype = text_field(texts, 'jobtype', 'default') or 'default'
        return {'name': name, 'position': position, 'jobtype': jobtype,
                'payload': text_field(texts, 'payload', maxlen=MAX_PAYLOAD),
                'env': json.dumps(env_field({'env': env})),
                'timelimit': graphml_int(attrs, 'timelimit', 1000, 0 if jobtype == NOOP else 1,
                                         MAX_TIMELIMIT),
                'priority': graphml_int(attrs, 'priority', 0, *INT_RANGE)}


def check_edge(source, target, attrs):
    with context('edge %s:%s' % (source, target)):
        attrs = {k: str(v) for k, v in attrs.items() if k in EDGE_ATTRS}
        edge = {'source': source, 'target': target,
                'name': text_field(attrs, 'name', required=True, maxlen=MAX_PATH),
                'dirpath': text_field(attrs, 'dirpath', maxlen=MAX_PATH),
                'datatype': text_field(attrs, 'datatype'),
                'datatag': text_field(attrs, 'datatag'),
                'comment': text_field(attrs, 'comment', maxlen=MAX_COMMENT)}
        if edge['datatag'] and not ENV_NAME_RE.match(edge['datatag']):
            fail(400, 'datatag %r is not a valid environment variable name' % edge['datatag'])
        return edge


def check_dag(raw):
    """A DAG registration: its fields, vertices (in topological order) and edges."""
    body = check_object(raw, 'DAG')
    check_known(body, DAG_FIELDS, 'DAG')
    graph = parse_graphml(text_field(body, 'graphml', required=True, maxlen=MAX_GRAPHML))
    order = list(networkx.topological_sort(graph))
    return {
        'name': text_field(body, 'name', required=True),
        'user': text_field(body, 'user'),
        'description': text_field(body, 'description', maxlen=MAX_COMMENT),
        'replace': bool(body.get('replace')),
        'graphml': body['graphml'],
        'root': order[0],
        'vertices': [check_vertex(v, graph.nodes[v], i) for i, v in enumerate(order)],
        'edges': [check_edge(s, t, a) for s, t, a in graph.edges(data=True)],
    }


def add_dag(store, raw, now):
    """Register a DAG; an existing one of the same name is replaced only when asked to be."""
    dag = check_dag(raw)
    params = dict(dag, nvertices=len(dag['vertices']), nedges=len(dag['edges']), now=now)
    with store.write() as db:
        if dag['replace']:
            db.execute(DELETE_DAG, params)
        elif db.execute(GET_DAG, params).fetchone():
            fail(409, 'a DAG named %r exists: give replace (--replace) to replace it'
                 % dag['name'])
        dag_id = db.execute(INSERT_DAG, params).fetchone()['id']
        db.executemany(INSERT_VERTEX, [dict(v, dag=dag_id) for v in dag['vertices']])
        db.executemany(INSERT_EDGE, [dict(e, dag=dag_id) for e in dag['edges']])
    return get_dag(store, dag['name'])


def load_dag(db, name):
    row = db.execute(GET_DAG, {'name': name}).fetchone()
    if row is None:
        fail(404, 'no such DAG: %s' % name[:MAX_TEXT])
    dag = dict(row)
    params = {'dag': dag.pop('id')}
    dag['vertices'] = [dict(r, env=json.loads(r['env']))
                       for r in db.execute(GET_DAG_VERTICES, params)]
    dag['edges'] = [dict(r) for r in db.execute(GET_DAG_EDGES, params)]
    return dag


def get_dag(store, name):
    with store.read() as db:
        return load_dag(db, name)


def list_dags(store, query):
    check_query(query, ('limit',))
    return [dict(r) for r in store.query(LIST_DAGS, {'limit': limit_from(query)})]


def delete_dag(store, name):
    with store.write() as db:
        if not db.execute(DELETE_DAG, {'name': name}).rowcount:
            fail(404, 'no such DAG: %s' % name[:MAX_TEXT])
    return {'deleted': name}


def check_fileinfo(fileinfo, edges):
    """The file naming policy: ('uuid' | 'sticky' | 'inherit:NAME', per-edge overrides)."""
    if fileinfo in (None, ''):
        return 'uuid', {}
    if isinstance(fileinfo, str):
        if fileinfo == 'sticky' or (fileinfo.startswith('inherit:') and len(fileinfo) > 8):
            return fileinfo, {}
        fail(400, "fileinfo is 'sticky', 'inherit:NAME' or a JSON object keyed 'source:target'")
    keys = {'%s:%s' % (e['source'], e['target']) for e in edges}
    overrides = {}
    for key, value in check_object(fileinfo, 'fileinfo').items():
        with context('fileinfo %r' % key[:MAX_TEXT]):
            if key not in keys:
                fail(400, 'no such edge in the DAG')
            check_known(check_object(value, 'each entry'), {'name', 'dirpath', 'comment'},
                        'fileinfo')
            no_nulls(value)
            overrides[key] = {field: text_field(value, field, maxlen=MAX_PATH,
                                                required=field == 'name') for field in value}
    return 'uuid', overrides


# What jobinfo may override in each vertex, and how each override is checked.
JOBINFO_CHECKS = {'payload': lambda v: text_field(v, 'payload', maxlen=MAX_PAYLOAD),
                  'env': env_field,
                  'priority': lambda v: int_field(v, 'priority'),
                  'timelimit': lambda v: int_field(v, 'timelimit', None, 1, MAX_TIMELIMIT)}


def check_jobinfo(jobinfo, vertices):
    """{vertex: {field: value}}: the overrides given, checked."""
    names = {v['name'] for v in vertices}
    overrides = {}
    for vertex, value in check_object(jobinfo or {}, 'jobinfo').items():
        with context('jobinfo %r' % vertex[:MAX_TEXT]):
            if vertex not in names:
                fail(400, 'no such vertex in the DAG')
            check_known(check_object(value, 'each entry'), set(JOBINFO_CHECKS), 'jobinfo')
            no_nulls(value)
            overrides[vertex] = {k: check(value) for k, check in JOBINFO_CHECKS.items()
                                 if k in value}
    return overrides


def no_nulls(entry):
    """An override is a value: a null would silently override nothing."""
    for key, value in entry.items():
        if value is None:
            fail(400, '%s is null: give a value, or leave it out' % key)


def check_new_workflow(raw):
    body = check_object(raw, 'workflow')
    check_known(body, WORKFLOW_FIELDS, 'workflow')
    state = text_field(body, 'state', 'template')
    if state not in ('template', 'defined'):
        fail(400, "a new workflow is 'template' or 'defined', not %r" % state[:32])
    return {'dag': text_field(body, 'dag', required=True),
            'name': text_field(body, 'name'),
            'user': text_field(body, 'user'),
            'description': text_field(body, 'description', maxlen=MAX_COMMENT),
            'state': state,
            'fileinfo': body.get('fileinfo'),
            'jobinfo': body.get('jobinfo'),
            'deadline': int_field(body, 'deadline', None, 1, MAX_TIMELIMIT)}


def workflow_jobs(wf, dag, jobinfo, now):
    """A job row per vertex, with the vertex attributes overridden by jobinfo."""
    jobs = {}
    for v in dag['vertices']:
        over = jobinfo.get(v['name'], {})
        job = dict(v, uuid=str(uuidlib.uuid4()), workflow=wf['uuid'], user=wf['user'], now=now,
                   env=dict(v['env'], **over.get('env', {})), deadline=wf.get('deadline'))
        job.update((k, over[k]) for k in ('payload', 'priority', 'timelimit') if k in over)
        if job['jobtype'] == NOOP:
            job['payload'] = job['payload'] or NOOP
        elif not job['payload']:
            fail(400, 'vertex %r has no payload: give one in the DAG or in jobinfo' % v['name'])
        jobs[v['name']] = job
    return jobs


def file_name(policy, edge, data_uuid, ext, dag_name):
    """The name of an edge's file: `<uuid><ext>`, the DAG's own (sticky) or inherited."""
    if policy == 'sticky':
        return edge['name']
    if policy.startswith('inherit:'):
        return '%s:%s:%s:%s%s' % (policy[len('inherit:'):], dag_name, edge['source'],
                                  edge['datatag'], ext)
    return data_uuid + ext


def workflow_data(wf, dag, jobs, policy, overrides, datatypes, now):
    """A data row per edge; each edge's datatag goes into the env of both its jobs."""
    rows = []
    for e in dag['edges']:
        key = '%s:%s' % (e['source'], e['target'])
        if not e['datatype']:
            fail(400, 'edge %s has no datatype: give every edge of the DAG a registered datatype '
                 '(p3s_data.py -R registers one); nothing was created' % key)
        if e['datatype'] not in datatypes:
            fail(400, 'edge %s: unknown datatype %r: register it first (p3s_data.py -R); '
                 'nothing was created' % (key, e['datatype']))
        data_uuid = str(uuidlib.uuid4())
        row = dict(e, uuid=data_uuid, workflow=wf['uuid'], now=now,
                   name=file_name(policy, e, data_uuid, datatypes[e['datatype']], dag['name']),
                   sourceuuid=jobs[e['source']]['uuid'], targetuuid=jobs[e['target']]['uuid'])
        row.update(overrides.get(key, {}))
        if e['datatag']:
            path = posixpath.join(row['dirpath'], row['name'])
            jobs[e['source']]['env'][e['datatag']] = jobs[e['target']]['env'][e['datatag']] = path
        rows.append(row)
    return rows


def add_workflow(store, raw, now):
    """Instantiate a DAG: a template job per vertex, a data record per edge, in one transaction.
    Nothing is left behind when any part is refused (the original left half a workflow)."""
    req = check_new_workflow(raw)
    with store.write() as db:
        wf_uuid, woken = create_workflow(db, req, now)
    store.wake(woken)
    return get_workflow(store, wf_uuid)


def create_workflow(db, req, now, dag=None):
    """add_workflow inside the caller's transaction (the injector's too): (uuid, woken)."""
    wf = dict(req, uuid=str(uuidlib.uuid4()), now=now)
    dag = dag or load_dag(db, req['dag'])
    policy, overrides = check_fileinfo(req['fileinfo'], dag['edges'])
    jobs = workflow_jobs(wf, dag, check_jobinfo(req['jobinfo'], dag['vertices']), now)
    datatypes = {r['name']: r['ext'] for r in db.execute(GET_DATATYPES)}
    data = workflow_data(wf, dag, jobs, policy, overrides, datatypes, now)
    wf.update(name=req['name'] or dag['name'], rootuuid=jobs[dag['root']]['uuid'],
              nvertices=len(jobs))
    db.execute(INSERT_WORKFLOW, wf)
    db.executemany(INSERT_WORKFLOW_JOB, [dict(j, env=json.dumps(j['env']))
                                         for j in jobs.values()])
    db.executemany(SEEN_JOBTYPE, [{'jobtype': t} for t in {j['jobtype'] for j in jobs.values()}])
    db.executemany(INSERT_WORKFLOW_DATA, data)
    woken = define_workflow(db, wf['uuid'], now) if req['state'] == 'defined' else []
    return wf['uuid'], woken


def define_workflow(db, wf_uuid, now):
    """template -> defined: its data are defined and its source jobs released."""
    params = {'workflow': wf_uuid, 'now': now}
    if not db.execute(DEFINE_WORKFLOW, params).rowcount:
        wf = db.execute(GET_WORKFLOW, params).fetchone()
        if wf is None:
            fail(404, 'no such workflow: %s' % wf_uuid)
        fail(409, 'cannot define workflow %s: it is %s' % (wf_uuid, wf['state']))
    db.execute(SET_WORKFLOW_DEADLINE, params)
    db.execute(DEFINE_WORKFLOW_DATA, params)
    return release_ready(db, params)


def release_ready(db, params):
    """Release the workflow's jobs whose parents have all finished (a released noop finishes
    and releases its own children); returns who may be woken for the defined ones."""
    ready = db.execute(RELEASE_READY, params).fetchall()
    woken = [(r['jobtype'], r['site']) for r in ready if r['state'] == 'defined']
    woken += workflow_hook(db, [r['uuid'] for r in ready if r['state'] == 'finished'],
                           params['now'])
    workflow_progress(db, params['workflow'], params['now'])
    return woken


def set_workflow_state(store, wf_uuid, raw, now):
    body = check_object(raw, 'state change')
    check_known(body, {'state'}, 'state change')
    if body.get('state') != 'defined':
        fail(400, "a workflow can be moved to 'defined' only")
    with store.write() as db:
        woken = define_workflow(db, check_uuid(wf_uuid, 'workflow'), now)
    store.wake(woken)
    return get_workflow(store, wf_uuid)


def workflow_hook(db, job_uuids, now):
    """The workflow engine, called inside the transaction in which jobs started or reached a
    terminal state (a pilot's report, a kill, a drop, the lost-pilot sweep).

    A finished job makes its output data available and releases each child whose parents have
    all finished (AND-join); a released noop finishes at once and releases its own children.
    Any other terminal state cancels every job downstream and fails the workflow. Jobs outside
    workflows are ignored. Returns the (jobtype, site) of the jobs made defined, for waking
    pilots after the commit."""
    woken, workflows, todo = [], set(), list(job_uuids)
    while todo:
        job = db.execute(GET_FLOW_JOB, {'job': todo.pop()}).fetchone()
        if job is None or job['workflow'] is None:
            continue
        params = {'job': job['uuid'], 'workflow': job['workflow'], 'now': now}
        if job['workflow'] not in workflows and not db.serial_writes:
            db.execute(LOCK_WORKFLOW, params)
        workflows.add(job['workflow'])
        if job['state'] == 'finished':
            db.execute(DATA_AVAILABLE, params)
            for child in db.execute(RELEASE_CHILDREN, params).fetchall():
                if child['state'] == 'finished':
                    todo.append(child['uuid'])
                else:
                    woken.append((child['jobtype'], child['site']))
        elif job['state'] in TERMINAL_STATES:
            db.execute(CANCEL_DOWNSTREAM, params)
            db.execute(FAIL_WORKFLOW, dict(params, comment='job %s (%s) ended %s'
                                           % (job['name'], job['uuid'], job['state'])))
    for wf_uuid in workflows:
        workflow_progress(db, wf_uuid, now)
    return woken


def workflow_progress(db, wf_uuid, now):
    """running from the first job start; finished when every job has finished."""
    params = {'workflow': wf_uuid, 'now': now}
    db.execute(WORKFLOW_STARTED, params)
    db.execute(WORKFLOW_PROGRESS, params)
    db.execute(WORKFLOW_FINISHED, params)


def get_workflow(store, wf_uuid):
    params = {'workflow': check_uuid(wf_uuid, 'workflow')}
    with store.read() as db:
        row = db.execute(GET_WORKFLOW, params).fetchone()
        if row is None:
            fail(404, 'no such workflow: %s' % wf_uuid)
        return dict(row, jobs=[dict(r) for r in db.execute(GET_WORKFLOW_JOBS, params)],
                    data=[dict(r) for r in db.execute(GET_WORKFLOW_DATA, params)])


def list_workflows(store, query):
    return [dict(r) for r in newest_rows(store, LIST_WORKFLOWS, WORKFLOW_FILTERS, query,
                                         WORKFLOW_STATES)]


def delete_workflow(store, wf_uuid, force=False):
    """A workflow with its jobs and data, in one transaction. Jobs that pilots are running are
    killed by their pilots at the next heartbeat (the job is gone); without force, refused."""
    params = {'workflow': check_uuid(wf_uuid, 'workflow')}
    with store.write() as db:
        if db.execute(GET_WORKFLOW, params).fetchone() is None:
            fail(404, 'no such workflow: %s' % wf_uuid)
        active = db.execute(COUNT_ACTIVE_WORKFLOW_JOBS, params).fetchone()[0]
        if active and not force:
            fail(409, 'workflow %s has %d job(s) dispatched or running: cancel it to stop them '
                 'and keep its history (p3s_workflow.py --cancel), or delete it anyway with '
                 'force=1 (p3s_workflow.py -d --force)' % (wf_uuid, active))
        jobs, data = erase_workflow(db, params)
    return {'deleted': params['workflow'], 'jobs': jobs, 'data': data}


def erase_workflow(db, params):
    """Delete a workflow with its jobs and data: (jobs deleted, data deleted)."""
    jobs = db.execute(DELETE_WORKFLOW_JOBS, params).rowcount
    data = db.execute(DELETE_WORKFLOW_DATA, params).rowcount
    db.execute(DELETE_WORKFLOW, params)
    return jobs, data


def cancel_workflow(store, wf_uuid, now):
    """Stop a workflow and keep its history: its queued jobs are cancelled, its running ones
    killed (their pilots stop the payloads at the next heartbeat), and it ends `cancelled`. A
    workflow that failed already keeps its state; its jobs still live are stopped the same way."""
    params = {'workflow': check_uuid(wf_uuid, 'workflow'), 'now': now}
    with store.write() as db:
        wf = db.execute(GET_WORKFLOW, params).fetchone()
        if wf is None:
            fail(404, 'no such workflow: %s' % wf_uuid)
        if wf['state'] in ('finished', 'cancelled'):
            fail(409, 'cannot cancel workflow %s: it is %s' % (wf_uuid, wf['state']))
        cancelled = db.execute(CANCEL_WORKFLOW_JOBS, params).rowcount
        killed = [r['jobtype'] for r in db.execute(KILL_WORKFLOW_JOBS, params)]
        if wf['state'] == 'failed' and not (cancelled or killed):
            fail(409, 'cannot cancel workflow %s: it failed, and none of its jobs is left to '
                 'stop' % wf_uuid)
        db.execute(CANCEL_WORKFLOW, dict(params, comment='cancelled on request: %s cancelled, '
                                         '%s killed' % (count_of(cancelled, 'queued job'),
                                                        count_of(len(killed), 'running job'))))
    if killed:
        wake_capped(store, names=sorted(set(killed)))
    return get_workflow(store, wf_uuid)


def retry_workflow(store, wf_uuid, now):
    """Run a failed or cancelled workflow again: a new attempt of each job that ended without
    finishing, in its place; those whose parents have all finished are released at once."""
    params = {'workflow': check_uuid(wf_uuid, 'workflow'), 'now': now}
    with store.write() as db:
        wf = db.execute(GET_WORKFLOW, params).fetchone()
        if wf is None:
            fail(404, 'no such workflow: %s' % wf_uuid)
        if wf['state'] not in ('failed', 'cancelled'):
            fail(409, 'cannot retry workflow %s: it is %s; a failed or cancelled workflow is '
                 'retried' % (wf_uuid, wf['state']))
        old = db.execute(WORKFLOW_JOBS_TO_RETRY, params).fetchall()
        for row in insert_attempts(db, old, now, 'template'):
            for move in (MOVE_DATA_SOURCE, MOVE_DATA_TARGET, MOVE_WORKFLOW_ROOT):
                db.execute(move, row)
        db.execute(RESUME_WORKFLOW, params)
        db.execute(DEFINE_WORKFLOW_DATA, params)
        woken = release_ready(db, params)
    store.wake(woken)
    return get_workflow(store, wf_uuid)

# ---------------------------------------------------------------------------------------------
# DQM controls: dropping queued jobs, job type caps, sites, service messages
# ---------------------------------------------------------------------------------------------

DROP_QUEUED_JOBS = """
UPDATE jobs SET state = 'dropped', stopped_at = :now
 WHERE state = 'defined' AND jobtype = :jobtype AND defined_at <= :cutoff
RETURNING uuid
"""
JOBTYPE_ACTIVE = """(SELECT count(*) FROM jobs INDEXED BY jobs_active
         WHERE state IN """ + SQL_ACTIVE + """ AND jobtype = jobtypes.name)"""
LIST_JOBTYPES = ('SELECT name, cap, updated_at, ' + JOBTYPE_ACTIVE + ' AS active'
                 ' FROM jobtypes ORDER BY name')
COUNT_QUEUED_BY_TYPE = """
SELECT jobtype, count(*) AS n FROM jobs INDEXED BY jobs_queue WHERE state = 'defined'
 GROUP BY jobtype
"""
SET_CAP = """
INSERT INTO jobtypes (name, cap, updated_at) VALUES (:name, :cap, :now)
ON CONFLICT (name) DO UPDATE SET cap = excluded.cap, updated_at = excluded.updated_at
"""
SET_ALL_CAPS = 'UPDATE jobtypes SET cap = :cap, updated_at = :now'
# Free slots of the named types, or (names NULL) of every type; NULL when a type has no cap.
FREE_SLOTS = ('SELECT name, cap - ' + JOBTYPE_ACTIVE + ' AS free FROM jobtypes'
              ' WHERE :names IS NULL OR name IN (SELECT value FROM json_each(:names))')
GET_JOBTYPE_OF = 'SELECT jobtype FROM jobs WHERE uuid = :uuid'
SITE_COLUMNS = 'name, period, cycles, beat, wait, pilots, lifetime, env, comment, updated_at'
UPSERT_SITE = """
INSERT INTO sites (name, period, cycles, beat, wait, pilots, lifetime, env, comment, updated_at)
VALUES (:name, :period, :cycles, :beat, :wait, :pilots, :lifetime, :env, :comment, :now)
ON CONFLICT (name) DO UPDATE SET
    period = excluded.period, cycles = excluded.cycles, beat = excluded.beat,
    wait = excluded.wait, pilots = excluded.pilots, lifetime = excluded.lifetime,
    env = excluded.env, comment = excluded.comment, updated_at = excluded.updated_at
"""
# A site's settings for the pool manager live beside it (site_batch), read with it.
SITE_BATCH_COLUMNS = 'max_pending, pending_timeout, partition, account, options'
UPSERT_SITE_BATCH = """
INSERT INTO site_batch (site, max_pending, pending_timeout, partition, account, options)
VALUES (:name, :max_pending, :pending_timeout, :partition, :account, :options)
ON CONFLICT (site) DO UPDATE SET
    max_pending = excluded.max_pending, pending_timeout = excluded.pending_timeout,
    partition = excluded.partition, account = excluded.account, options = excluded.options
"""
SITES_WITH_BATCH = ('SELECT ' + SITE_COLUMNS + ', ' + SITE_BATCH_COLUMNS
                    + ' FROM sites LEFT JOIN site_batch ON site_batch.site = sites.name')
GET_SITE = SITES_WITH_BATCH + ' WHERE name = :name'
LIST_SITES = SITES_WITH_BATCH + ' ORDER BY name'
DELETE_SITE = 'DELETE FROM sites WHERE name = :name'
SERVICE_COLUMNS = 'id, name, message, created_at'
INSERT_SERVICE = """
INSERT INTO services (name, message, created_at) VALUES (:name, :message, :now)
RETURNING """ + SERVICE_COLUMNS
LIST_SERVICES = """
SELECT """ + SERVICE_COLUMNS + """ FROM services
 WHERE :name IS NULL OR name = :name ORDER BY id DESC LIMIT :limit
"""


def drop_jobs(store, body, now):
    """An operator drops the queued jobs of a type, all of them or those older than `older` s."""
    check_object(body, 'drop')
    check_known(body, {'jobtype', 'older'}, 'drop')
    jobtype = text_field(body, 'jobtype', required=True)
    older = number_field(body, 'older', 0, 0, 10 ** 9)
    params = {'jobtype': jobtype, 'cutoff': seconds_before(now, older), 'now': now}
    with store.write() as db:
        dropped = [r['uuid'] for r in db.execute(DROP_QUEUED_JOBS, params)]
        woken = workflow_hook(db, dropped, now)         # their workflows fail
    store.wake(woken)
    return {'jobtype': jobtype, 'dropped': len(dropped)}


def list_jobtypes(store):
    with store.read() as db:
        queued = {r['jobtype']: r['n'] for r in db.execute(COUNT_QUEUED_BY_TYPE)}
        return [dict(r, queued=queued.get(r['name'], 0)) for r in db.execute(LIST_JOBTYPES)]


def set_cap(store, body, now):
    """Set the cap of one type (`name`) or of every known type; `cap` null removes it.
    Raising a cap wakes waiting pilots for the new slots."""
    check_object(body, 'cap')
    check_known(body, {'name', 'cap'}, 'cap')
    if 'cap' not in body:
        fail(400, 'cap is required (null removes the cap)')
    params = {'name': text_field(body, 'name'), 'cap': int_field(body, 'cap', None, 0, MAX_CAP),
              'now': now}
    with store.write() as db:
        db.execute(SET_CAP if params['name'] else SET_ALL_CAPS, params)
    wake_capped(store, names=[params['name']] if params['name'] else None, uncapped=True)
    return {'jobtypes': list_jobtypes(store)}


def wake_capped(store, job_uuid=None, names=None, uncapped=False):
    """Wake a waiting pilot for each free slot of a capped type: the type of one job that just
    ended, the named types, or every type. A job of an uncapped type woke a pilot when it was
    queued, so uncapped types are woken only when asked (a cap was just removed)."""
    if job_uuid is not None:
        row = store.one(GET_JOBTYPE_OF, {'uuid': job_uuid})
        if row is None:
            return
        names = [row['jobtype']]
    with store.read() as db:
        store.wake(free_slots(db, names, uncapped))


def free_slots(db, names=None, uncapped=False):
    """(type, '') once for each free slot of the named (or all) capped types, as many as
    waiting pilots to wake; of uncapped types too when asked."""
    slots = []
    for row in db.execute(FREE_SLOTS, {'names': None if names is None else json.dumps(names)}):
        if row['free'] is not None or uncapped:
            free = MAX_WAKE_SLOTS if row['free'] is None else max(row['free'], 0)
            slots += [(row['name'], '')] * min(free, MAX_WAKE_SLOTS)
    return slots


def site_dict(row):
    site = dict(row)
    site['env'] = json.loads(site['env'])
    site['options'] = json.loads(site['options'] or '[]')
    site['partition'], site['account'] = site['partition'] or '', site['account'] or ''
    return site


def site_number(d, key):
    integer, lo, hi = SITE_NUMBERS[key]
    value = d.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int if integer else (int, float)):
        fail(400, '%s must be %s' % (key, 'an integer' if integer else 'a number'))
    if not lo <= value <= hi:
        fail(400, '%s must be between %s and %s' % (key, lo, hi))
    return value


def define_site(store, raw, now):
    """Create or replace a site: the defaults its pilots take (their own flags win), and what
    the pool manager needs to submit them to a batch system."""
    site = check_object(raw, 'site')
    check_known(site, SITE_FIELDS, 'site')
    row = {key: site_number(site, key) for key in SITE_NUMBERS}
    row.update(name=text_field(site, 'name', required=True), env=json.dumps(env_field(site)),
               comment=text_field(site, 'comment', maxlen=4096),
               partition=text_field(site, 'partition'), account=text_field(site, 'account'),
               options=json.dumps(batch_options(site)), now=now)
    with store.write() as db:
        db.execute(UPSERT_SITE, row)
        db.execute(UPSERT_SITE_BATCH, row)
        return site_dict(db.execute(GET_SITE, row).fetchone())


def batch_options(site):
    """Extra sbatch options, or lines of an HTCondor submit description: a list of strings,
    each on one line (a line break would smuggle in another submit command)."""
    options = site.get('options') or []
    if not isinstance(options, list) or len(options) > MAX_BATCH_OPTIONS:
        fail(400, 'options must be a list of at most %d strings' % MAX_BATCH_OPTIONS)
    for option in options:
        if not isinstance(option, str) or not option.strip() or len(option) > MAX_TEXT * 4 \
                or any(c in option for c in '\n\r\x00'):
            fail(400, 'each option must be one non-empty line of at most %d characters'
                 % (MAX_TEXT * 4))
    return options


def list_sites(store, name=None):
    if name:
        return [site_dict(r) for r in store.query(GET_SITE, {'name': name})]
    return [site_dict(r) for r in store.query(LIST_SITES)]


def delete_site(store, name):
    with store.write() as db:
        if not db.execute(DELETE_SITE, {'name': name}).rowcount:
            fail(404, 'no such site: %s' % name[:MAX_TEXT])
    return {'deleted': name}


def add_service_message(store, raw, now):
    body = check_object(raw, 'service message')
    check_known(body, {'name', 'message'}, 'service message')
    row = {'name': text_field(body, 'name', required=True),
           'message': text_field(body, 'message', maxlen=MAX_MESSAGE), 'now': now}
    with store.write() as db:
        return dict(db.execute(INSERT_SERVICE, row).fetchone())


def list_service_messages(store, query):
    check_query(query, ('name', 'limit'))
    params = {'name': query.get('name') or None, 'limit': limit_from(query)}
    return [dict(r) for r in store.query(LIST_SERVICES, params)]


# ---------------------------------------------------------------------------------------------
# Batch systems: drain orders, pilots submitted by the pool manager, the pool's numbers
# ---------------------------------------------------------------------------------------------
# p3s_batch.py keeps a site's pool of pilots full: it asks for the pool's numbers, tells what the
# batch system says of its batch jobs, and records what it submits. Each pilot names its batch
# job in `extra` ('slurm:1234'), which links the two.

INSERT_DRAIN = """
INSERT INTO pilot_drains (pilot, requested_at) VALUES (:pilot, :now)
ON CONFLICT (pilot) DO NOTHING
"""
BATCH_COLUMNS = ('id, site, system, batchid, state, pilot, host, reason, submitted_at, '
                 'started_at, ended_at')
GET_BATCHJOB = 'SELECT ' + BATCH_COLUMNS + ', output FROM batchjobs WHERE id = :id'
LIST_BATCHJOBS = 'SELECT ' + BATCH_COLUMNS + ' FROM batchjobs'
BATCH_FILTERS = {                 # json_each is SQLite's, as in the other listings' filters
    'state': 'state = :state',
    'states': 'state IN (SELECT value FROM json_each(:states))',
    'site': 'site = :site',
    'system': 'system = :system',
    'pilot': 'pilot = :pilot',
    'host': 'host = :host',
}
INSERT_BATCHJOB = """
INSERT INTO batchjobs (site, system, batchid, state, submitted_at)
VALUES (:site, :system, :batchid, 'pending', :now)
ON CONFLICT (site, system, batchid) DO NOTHING
"""
GET_BATCHJOB_OF = ('SELECT ' + BATCH_COLUMNS + ' FROM batchjobs'
                      ' WHERE site = :site AND system = :system AND batchid = :batchid')
# A pilot may register before its submission is recorded (a free node starts it at once): the
# record then adopts it. Must repeat the condition of the partial index pilots_extra.
ADOPT_EARLY_PILOT = """
UPDATE batchjobs
   SET pilot = (SELECT uuid FROM pilots
                 WHERE extra = :extra AND extra <> '' AND site = :site ORDER BY id LIMIT 1),
       state = 'running', started_at = coalesce(started_at, :now)
 WHERE site = :site AND system = :system AND batchid = :batchid AND pilot IS NULL
   AND state = 'pending'
   AND EXISTS (SELECT 1 FROM pilots WHERE extra = :extra AND extra <> '' AND site = :site)
"""
# A registering pilot names its batch job: that batch job is running and became this pilot.
LINK_BATCH_PILOT = """
UPDATE batchjobs
   SET pilot = :uuid, state = CASE state WHEN 'pending' THEN 'running' ELSE state END,
       started_at = coalesce(started_at, :now), host = CASE host WHEN '' THEN :host ELSE host END
 WHERE site = :site AND system = :system AND batchid = :batchid AND pilot IS NULL
"""
# What the batch system says of a live batch job: still pending, or running (where).
SEE_BATCHJOB = """
UPDATE batchjobs
   SET state = :state, reason = :reason, host = CASE :host WHEN '' THEN host ELSE :host END,
       started_at = CASE WHEN :state = 'running' THEN coalesce(started_at, :now)
                         ELSE started_at END
 WHERE site = :site AND system = :system AND batchid = :batchid
   AND state IN """ + SQL_BATCH_LIVE + """
RETURNING """ + BATCH_COLUMNS
# A batch job that ended. One that never became a pilot is never_registered, and keeps its
# output's tail (unless it was cancelled before it ever ran); one whose outcome the batch
# system no longer knows ('ended': no accounting) ends as its pilot did.
END_BATCHJOB = """
UPDATE batchjobs
   SET state = CASE
           WHEN pilot IS NULL AND :state = 'cancelled' AND started_at IS NULL THEN 'cancelled'
           WHEN pilot IS NULL THEN 'never_registered'
           WHEN :state <> 'ended' THEN :state
           ELSE coalesce((SELECT CASE p.state WHEN 'stopped' THEN 'finished'
                                              WHEN 'killed' THEN 'cancelled' ELSE 'failed' END
                            FROM pilots AS p WHERE p.uuid = batchjobs.pilot), 'failed') END,
       output = CASE WHEN pilot IS NULL THEN :output ELSE output END,
       reason = :reason, host = CASE :host WHEN '' THEN host ELSE :host END, ended_at = :now
 WHERE site = :site AND system = :system AND batchid = :batchid
   AND state IN """ + SQL_BATCH_LIVE + """
RETURNING """ + BATCH_COLUMNS
# The pool's numbers. Live pilots of the site, and how many of them hold a job; a drained pilot
# is leaving and counts no more.
POOL_PILOTS = """
SELECT count(*) AS live,
       coalesce(sum(CASE WHEN state IN """ + sql_set(ACTIVE_STATES) + """ THEN 1 ELSE 0 END), 0)
           AS busy
  FROM pilots
 WHERE state IN """ + SQL_LIVE_PILOT + """ AND site = :site
   AND NOT EXISTS (SELECT 1 FROM pilot_drains WHERE pilot = pilots.uuid)
"""
# Queued jobs the site's pilots could run (their site, a time limit their wall time allows, a
# deadline not passed, a type not held at its cap), counted up to :cap: no more pilots than that
# are ever wanted. The held types are the claim's BLOCKED_JOBTYPES.
POOL_QUEUED = """
SELECT count(*) AS n FROM (
    SELECT 1 FROM jobs
     WHERE state = 'defined' AND (site = '' OR site = :site) AND timelimit <= :longest
       AND (deadline_at IS NULL OR deadline_at > :now)
       AND jobtype NOT IN (
           SELECT name FROM jobtypes
            WHERE cap IS NOT NULL
              AND cap <= (SELECT count(*) FROM jobs AS held
                           WHERE held.state IN """ + SQL_ACTIVE + """
                             AND held.jobtype = jobtypes.name))
     LIMIT :cap) AS runnable
"""
POOL_BATCHJOBS = """
SELECT id, batchid, state, pilot, submitted_at, started_at FROM batchjobs
 WHERE site = :site AND system = :system AND state IN """ + SQL_BATCH_LIVE + """
 ORDER BY id
"""


def batch_of(extra):
    """(system, batch id) named by a pilot's `extra` ('slurm:1234'), or None."""
    system, _, batchid = (extra or '').partition(':')
    return (system, batchid) if system in BATCH_SYSTEMS and batchid else None


def link_batch_pilot(db, pilot, now):
    """A pilot of a batch job (by its `extra`) is that batch job's pilot."""
    named = batch_of(pilot['extra'])
    if named:
        db.execute(LINK_BATCH_PILOT, {'uuid': pilot['uuid'], 'site': pilot['site'],
                                      'host': pilot['host'], 'system': named[0],
                                      'batchid': named[1], 'now': now})


def drain_pilot(store, pilot_uuid, now):
    """Order a live pilot to finish its job, take no more and leave: it hears of it in its next
    heartbeat or work request. Ordering it again changes nothing."""
    params = {'pilot': check_uuid(pilot_uuid, 'pilot'), 'now': now}
    with store.write() as db:
        pilot = live_pilot(db, params['pilot'])
        if pilot['state'] in PILOT_GONE:
            fail(409, 'pilot %s is %s already' % (pilot['uuid'], pilot['state']))
        db.execute(INSERT_DRAIN, params)
        return pilot_dict(db.execute(GET_PILOT, {'uuid': params['pilot']}).fetchone())


def batch_request(raw, items):
    """The common part of a submission record and an update: site, system and a list."""
    body = check_object(raw, 'request')
    check_known(body, BATCH_FIELDS, 'batch')
    system = text_field(body, 'system', required=True)
    if system not in BATCH_SYSTEMS:
        fail(400, 'system must be one of %s' % ', '.join(BATCH_SYSTEMS))
    listed = body.get(items)
    if not isinstance(listed, list) or not listed:
        fail(400, '%s must be a non-empty list' % items)
    if len(listed) > MAX_BATCH_UPDATE:
        fail(413, 'at most %d %s in one request' % (MAX_BATCH_UPDATE, items))
    return {'site': text_field(body, 'site', required=True), 'system': system}, listed


def batch_id(value):
    if not isinstance(value, str) or not value.strip() or len(value) > MAX_TEXT \
            or any(c.isspace() or c == '\x00' for c in value):
        fail(400, 'a batch id is a non-empty word, not %r' % (str(value)[:64],))
    return value


def record_batchjobs(store, raw, now):
    """The pool manager submitted these batch jobs (pending). Recording one again is harmless."""
    req, batchids = batch_request(raw, 'batchids')
    rows = [dict(req, batchid=batch_id(b), now=now, extra='%s:%s' % (req['system'], b))
            for b in batchids]
    with store.write() as db:
        db.executemany(INSERT_BATCHJOB, rows)
        db.executemany(ADOPT_EARLY_PILOT, rows)
        return [dict(db.execute(GET_BATCHJOB_OF, r).fetchone()) for r in rows]


def check_observation(raw, req, now):
    obs = check_object(raw, 'batch job')
    check_known(obs, BATCH_OBSERVATION, 'batch job')
    state = text_field(obs, 'state', required=True)
    if state not in BATCH_LIVE + BATCH_ENDS:
        fail(400, 'a batch job is seen %s, not %r' % (', '.join(BATCH_LIVE + BATCH_ENDS),
                                                      state[:32]))
    output = obs.get('output') or ''
    if not isinstance(output, str):
        fail(400, 'output must be a string')
    return dict(req, batchid=batch_id(obs.get('batchid')), state=state, now=now,
                host=text_field(obs, 'host'), reason=text_field(obs, 'reason', maxlen=4096),
                output=output[-MAX_LOG_TAIL:].replace('\x00', '\ufffd'))


def update_batchjobs(store, raw, now):
    """What the batch system says of live batch jobs. Only a live batch job changes (each
    statement names the states it expects), so a late or repeated word changes nothing.
    Returns the batch jobs that changed."""
    req, listed = batch_request(raw, 'jobs')
    seen = [check_observation(obs, req, now) for obs in listed]
    changed = []
    with store.write() as db:
        for obs in seen:
            sql = SEE_BATCHJOB if obs['state'] in BATCH_LIVE else END_BATCHJOB
            changed += [dict(r) for r in db.execute(sql, obs)]
    for job in changed:
        if job['state'] == 'never_registered':
            log.warning('%s batch job %s of site %s ended without its pilot ever registering '
                        '(%s)', job['system'], job['batchid'], job['site'], job['reason'] or '?')
    return changed


def list_batchjobs(store, query):
    return [dict(r) for r in newest_rows(store, LIST_BATCHJOBS, BATCH_FILTERS, query)]


def get_batchjob(store, batchjob_id):
    row = find_batchjob(store, batchjob_id)
    if row is None:
        fail(404, 'no such batch job: %d' % batchjob_id)
    return dict(row)


def find_batchjob(store, batchjob_id):
    """A batch job by its number, or None (also for a number no row can have)."""
    if not INT_RANGE[0] <= batchjob_id <= INT_RANGE[1]:
        return None
    return store.one(GET_BATCHJOB, {'id': batchjob_id})


def pool_settings(site):
    """The pool manager's settings of a site, with the defaults filled in."""
    return {'lifetime': site['lifetime'], 'cycles': site['cycles'],
            'partition': site['partition'],
            'account': site['account'], 'options': site['options'],
            'max_pending': DEFAULT_MAX_PENDING if site['max_pending'] is None
            else site['max_pending'],
            'pending_timeout': DEFAULT_PENDING_TIMEOUT if site['pending_timeout'] is None
            else site['pending_timeout']}


def pool_site(store, name, system):
    """The site whose pool is asked for, if it has one."""
    if system not in BATCH_SYSTEMS:
        fail(400, 'system must be one of %s' % ', '.join(BATCH_SYSTEMS))
    sites = list_sites(store, name)
    if not sites:
        fail(404, 'no such site: %s' % name[:MAX_TEXT])
    if sites[0]['pilots'] is None:
        fail(409, 'site %s has no target number of pilots: define it with "pilots"' % name)
    return sites[0]


def pool_status(store, name, system, keep, now):
    """How a site's pool stands, and what the pool manager should do now (pool_plan)."""
    site = pool_site(store, name, system)
    lifetime = site['lifetime']
    params = {'site': name, 'system': system, 'now': now, 'cap': site['pilots'],
              'longest': lifetime - PILOT_END_MARGIN if lifetime else MAX_TIMELIMIT}
    with store.read() as db:
        pilots = dict(db.execute(POOL_PILOTS, params).fetchone())
        queued = db.execute(POOL_QUEUED, params).fetchone()['n']
        batch = [dict(r, age=seconds_between(r['submitted_at'], now))
                 for r in db.execute(POOL_BATCHJOBS, params)]
    pool = {'site': name, 'system': system, 'target': site['pilots'], 'keep': keep,
            'settings': pool_settings(site), 'pilots': pilots, 'queued': queued,
            'batchjobs': batch}
    return dict(pool, **pool_plan(pool, now))


def pool_plan(pool, now):
    """The pool wants a pilot for each busy pilot and each queued job its pilots could run (at
    least `keep`, at most the site's `pilots`); it has its live pilots, its pending batch jobs
    and the batch jobs just started that have not registered yet. It submits the difference,
    keeping at most `max_pending` batch jobs pending, and cancels those pending for longer than
    `pending_timeout` (0: never)."""
    settings, batch = pool['settings'], pool['batchjobs']
    pending = [b for b in batch if b['state'] == 'pending']
    cancel = [b['batchid'] for b in pending
              if settings['pending_timeout'] and b['age'] > settings['pending_timeout']]
    starting = [b for b in batch if b['state'] == 'running' and b['pilot'] is None
                and seconds_between(b['started_at'] or b['submitted_at'], now) < REGISTER_GRACE]
    waiting = len(pending) - len(cancel)
    wanted = min(pool['target'], max(pool['keep'], pool['pilots']['busy'] + pool['queued']))
    have = pool['pilots']['live'] + len(starting) + waiting
    return {'starting': len(starting), 'pending': len(pending), 'wanted': wanted,
            'submit': max(0, min(wanted - have, settings['max_pending'] - waiting)),
            'cancel': cancel}

# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------

DATATYPE_COLUMNS = 'name, ext, comment, created_at'
GET_DATATYPES = 'SELECT ' + DATATYPE_COLUMNS + ' FROM datatypes ORDER BY name'
UPSERT_DATATYPE = """
INSERT INTO datatypes (name, ext, comment, created_at) VALUES (:name, :ext, :comment, :now)
ON CONFLICT (name) DO UPDATE SET ext = excluded.ext, comment = excluded.comment
RETURNING """ + DATATYPE_COLUMNS
DELETE_DATATYPE = 'DELETE FROM datatypes WHERE name = :name'
# The DAGs whose edges name a datatype: workflows cannot be made from them without it.
DAGS_USING_DATATYPE = """
SELECT DISTINCT dags.name FROM dag_edges JOIN dags ON dags.id = dag_edges.dag
 WHERE dag_edges.datatype = :name ORDER BY dags.name LIMIT :limit
"""
INSERT_DATA = """
INSERT INTO data (uuid, name, dirpath, datatype, datatag, state, comment, workflow, source,
                  sourceuuid, target, targetuuid, created_at, updated_at)
VALUES (:uuid, :name, :dirpath, :datatype, :datatag, :state, :comment, :workflow, :source,
        :sourceuuid, :target, :targetuuid, :now, :now)
"""
GET_DATA = 'SELECT ' + DATA_COLUMNS + ' FROM data WHERE uuid = :uuid'
DATA_NAMED = 'SELECT 1 FROM data WHERE name = :name LIMIT 1'
ADJUST_DATA = """
UPDATE data SET name = coalesce(:name, name), dirpath = coalesce(:dirpath, dirpath),
       datatype = coalesce(:datatype, datatype), state = coalesce(:state, state),
       comment = coalesce(:comment, comment), targetuuid = coalesce(:targetuuid, targetuuid),
       updated_at = :now
 WHERE uuid = :uuid
"""
DELETE_DATA = 'DELETE FROM data WHERE uuid = :uuid'
LIST_DATA = 'SELECT ' + DATA_COLUMNS + ' FROM data'
DATA_FILTERS = {
    'name': 'name = :name',
    'state': 'state = :state',
    'datatype': 'datatype = :datatype',
    'workflow': 'workflow = :workflow',
    'dirpath': 'dirpath = :dirpath',
    'states': 'state IN (SELECT value FROM json_each(:states))',
}
# The injector's exactly-once: the first claim of a file's path wins, in the transaction that
# also submits its jobs; every later claim, by any injector, finds the row.
CLAIM_PATH = """
INSERT INTO injections (path, state, data, created_at) VALUES (:path, :state, :data, :now)
ON CONFLICT (path) DO NOTHING
"""
# A workflow's deadline counts from its definition, for every job of it, whenever released.

def add_datatype(store, raw, now):
    """Create or update a datatype (the original's registertype overwrote, too)."""
    body = check_object(raw, 'datatype')
    check_known(body, {'name', 'ext', 'comment'}, 'datatype')
    row = {'name': text_field(body, 'name', required=True),
           'ext': text_field(body, 'ext', maxlen=MAX_EXT),
           'comment': text_field(body, 'comment', maxlen=MAX_COMMENT), 'now': now}
    if '/' in row['ext']:
        fail(400, "ext must not contain '/'")
    with store.write() as db:
        return dict(db.execute(UPSERT_DATATYPE, row).fetchone())


def list_datatypes(store):
    return [dict(r) for r in store.query(GET_DATATYPES)]


def delete_datatype(store, name):
    """Delete a datatype no DAG uses (a DAG that names a missing datatype is unusable)."""
    params = {'name': name, 'limit': 6}
    with store.write() as db:
        dags = [r['name'] for r in db.execute(DAGS_USING_DATATYPE, params)]
        if dags:
            fail(409, 'datatype %s is used by DAG %s%s: delete those DAGs first (p3s_workflow.py '
                 '-d -w dag -n NAME) or replace them without it' % (
                     name[:MAX_TEXT], ', '.join(dags[:5]), ' and others' if len(dags) > 5 else ''))
        if not db.execute(DELETE_DATATYPE, params).rowcount:
            fail(404, 'no such datatype: %s' % name[:MAX_TEXT])
    return {'deleted': name}


def check_data(raw, now):
    d = check_object(raw, 'data')
    check_known(d, DATA_FIELDS, 'data')
    row = {key: text_field(d, key, maxlen=MAX_PATH) for key in
           ('name', 'dirpath', 'datatype', 'datatag', 'state', 'comment', 'source', 'target')}
    text_field(d, 'name', required=True)
    row.update(uuid=uuid_field(d, 'uuid') or str(uuidlib.uuid4()), state=row['state'] or 'defined',
               workflow=uuid_field(d, 'workflow'), sourceuuid=uuid_field(d, 'sourceuuid'),
               targetuuid=uuid_field(d, 'targetuuid'), now=now)
    return row


def register_data(store, raw, now):
    """Register a data file (from a client or a payload); the record as stored."""
    row = check_data(raw, now)
    with store.write() as db:
        db.execute(INSERT_DATA, row)
    return get_data(store, row['uuid'])


def get_data(store, data_uuid):
    row = store.one(GET_DATA, {'uuid': check_uuid(data_uuid, 'data')})
    if row is None:
        fail(404, 'no such data: %s' % data_uuid)
    return dict(row)


def list_data(store, query):
    return [dict(r) for r in newest_rows(store, LIST_DATA, DATA_FILTERS, query)]


def adjust_data(store, data_uuid, raw, now):
    changes = check_object(raw, 'adjustment')
    check_known(changes, DATA_ADJUSTABLE, 'data adjustment')
    if not changes:
        fail(400, 'nothing to adjust: give one of %s' % ', '.join(sorted(DATA_ADJUSTABLE)))
    params = {key: text_field(changes, key, maxlen=MAX_PATH) if key in changes else None
              for key in DATA_ADJUSTABLE if key != 'targetuuid'}
    params.update(targetuuid=uuid_field(changes, 'targetuuid'),
                  uuid=check_uuid(data_uuid, 'data'), now=now)
    with store.write() as db:
        if not db.execute(ADJUST_DATA, params).rowcount:
            fail(404, 'no such data: %s' % data_uuid)
    return get_data(store, data_uuid)


def delete_data(store, data_uuid):
    with store.write() as db:
        if not db.execute(DELETE_DATA, {'uuid': check_uuid(data_uuid, 'data')}).rowcount:
            fail(404, 'no such data: %s' % data_uuid)
    return {'deleted': data_uuid}


def check_injection(raw):
    body = check_object(raw, 'injection')
    check_known(body, INJECT_FIELDS, 'injection')
    files = body.get('files')
    if not isinstance(files, list) or not files or len(files) > MAX_INJECT_FILES:
        fail(400, 'files must be a list of 1 to %d files' % MAX_INJECT_FILES)
    for f in files:
        check_known(check_object(f, 'each file'), {'path', 'skip'}, 'file')
        text_field(f, 'path', maxlen=MAX_PATH, required=True)
        if not isinstance(f.get('skip', False), bool):
            fail(400, 'skip must be true or false')
    if (body.get('jobs') is None) == (body.get('dag') is None):
        fail(400, 'give jobs (a list of job templates) or dag (a DAG name), not both')
    if body.get('jobs') is not None and (not isinstance(body['jobs'], list) or not body['jobs']):
        fail(400, 'jobs must be a non-empty list of job templates')
    for template in body.get('jobs') or ():             # each file's jobs add to their env
        env_field(check_object(template, 'each job'))
    if body.get('dag') is not None:
        text_field(body, 'dag', required=True)
    dedup = text_field(body, 'dedup', 'path')
    if dedup not in DEDUP:
        fail(400, 'dedup is one of %s' % ', '.join(DEDUP))
    return dict(body, dedup=dedup, datatype=text_field(body, 'datatype'),
                comment=text_field(body, 'comment', 'injected', maxlen=MAX_COMMENT),
                max_files=int_field(body, 'max_files', MAX_INJECT_FILES, 0, MAX_INJECT_FILES))


def inject(store, raw, now):
    """Files that arrived: for each one not seen before, register it and submit its jobs (or
    a workflow of a DAG), all in one transaction, so the server alone decides what is new.

    dedup 'path' (the injector): a path is taken once, ever, whoever asks. 'name' (-g): a
    file whose name is registered already is skipped. 'none' (-g -A): always submitted.
    Files sampled out (skip) are recorded as skipped. At most max_files are submitted; the
    rest are answered 'deferred' and left for the next scan."""
    req = check_injection(raw)
    results, woken, taken = [], [], 0
    with store.write() as db:
        for f in req['files']:
            if not f.get('skip') and taken >= req['max_files']:
                results.append({'path': f['path'], 'status': 'deferred'})
                continue
            result, jobs_woken = inject_file(db, req, f['path'], f.get('skip', False), now)
            results.append(result)
            woken += jobs_woken
            taken += result['status'] == 'submitted'
    store.wake(woken)
    return {'files': results}


def inject_file(db, req, path, skip, now):
    name, dirpath = posixpath.basename(path), posixpath.dirname(path)
    if req['dedup'] == 'name' and db.execute(DATA_NAMED, {'name': name}).fetchone():
        return {'path': path, 'status': 'seen'}, []
    data = {'uuid': str(uuidlib.uuid4()), 'name': name, 'dirpath': dirpath,
            'datatype': req['datatype'], 'datatag': '', 'comment': req['comment'],
            'state': 'skipped' if skip else 'defined', 'workflow': None, 'source': '',
            'sourceuuid': None, 'target': '', 'targetuuid': None, 'now': now}
    claim = {'path': path, 'state': 'skipped' if skip else 'submitted', 'data': data['uuid'],
             'now': now}
    if not db.execute(CLAIM_PATH, claim).rowcount and req['dedup'] != 'none':
        return {'path': path, 'status': 'seen'}, []
    result = {'path': path, 'status': claim['state'], 'data': data['uuid']}
    woken = []
    if not skip and req.get('jobs') is not None:
        rows = [check_job(dict(t, uuid=str(uuidlib.uuid4()),
                               env=dict(t.get('env') or {}, P3S_INPUT_FILE=path)), now)
                for t in req['jobs']]
        insert_jobs(db, rows)
        data['targetuuid'] = rows[-1]['uuid']
        result['jobs'] = [r['uuid'] for r in rows]
        woken = [(r['jobtype'], r['site']) for r in rows if r['state'] == 'defined']
    elif not skip:
        wf_uuid, woken = inject_workflow(db, req, path, now)
        data['workflow'] = result['workflow'] = wf_uuid
    db.execute(INSERT_DATA, data)
    return result, woken


def inject_workflow(db, req, path, now):
    """A defined workflow of the DAG with the file on its source edges (the edges out of the
    vertices that have no parents)."""
    if 'loaded_dag' not in req:
        req['loaded_dag'] = load_dag(db, req['dag'])
    dag = req['loaded_dag']
    targets = {e['target'] for e in dag['edges']}
    fileinfo = {'%s:%s' % (e['source'], e['target']):
                {'name': posixpath.basename(path), 'dirpath': posixpath.dirname(path)}
                for e in dag['edges'] if e['source'] not in targets}
    wf = check_new_workflow({'dag': req['dag'], 'name': req.get('name') or '',
                             'user': req.get('user') or '', 'state': 'defined',
                             'fileinfo': fileinfo, 'jobinfo': req.get('jobinfo'),
                             'deadline': req.get('deadline'),
                             'description': 'injected: %s' % path[-MAX_COMMENT // 2:]})
    return create_workflow(db, wf, now, dag)


# ---------------------------------------------------------------------------------------------
# Dashboard numbers
# ---------------------------------------------------------------------------------------------
# Every count the dashboard makes is bounded by a time window or by the live jobs, and reads an
# index shaped for it (schema.sql); tests/test_monitor.py checks the plans.

# One count per window and row: a range of one index each, far cheaper than one scan that
# evaluates every window per row (10x at 100k jobs).
MON_COUNT_DEFINED = 'SELECT count(*) FROM jobs WHERE defined_at >= :since'
MON_COUNT_STARTED = 'SELECT count(*) FROM jobs WHERE started_at >= :since'
MON_COUNT_ENDED = 'SELECT count(*) FROM jobs WHERE state = :state AND stopped_at >= :since'
MON_COUNT_TYPE_ENDED = """
SELECT count(*) FROM jobs INDEXED BY jobs_type_ended
 WHERE jobtype = :jobtype AND state = :state AND stopped_at >= :since
"""
MON_TYPES_LIVE = """
SELECT jobtype, state, count(*) AS n FROM jobs INDEXED BY jobs_live_types
 WHERE state IN ('defined', 'dispatched', 'running') GROUP BY jobtype, state
"""
# The types that ever ended, by skipping through the index: one seek per type, not a scan.
MON_TYPES_ENDED = """
WITH RECURSIVE t (jobtype) AS (
    SELECT min(jobtype) FROM jobs WHERE stopped_at IS NOT NULL
    UNION ALL
    SELECT (SELECT min(jobtype) FROM jobs INDEXED BY jobs_type_ended
             WHERE stopped_at IS NOT NULL AND jobtype > t.jobtype)
      FROM t WHERE t.jobtype IS NOT NULL)
SELECT jobtype FROM t WHERE jobtype IS NOT NULL LIMIT :limit
"""
# Queue latency: the newest starts of the window, at most :cap of them.
MON_LATENCY = """
SELECT p3s_seconds_between(defined_at, started_at) AS wait FROM jobs
 WHERE started_at >= :since AND defined_at IS NOT NULL ORDER BY started_at DESC LIMIT :cap
"""
# Jobs ended per bucket: a bucket is the first :chars characters of a stored time (16: a
# minute, 13: an hour).
MON_THROUGHPUT = """
SELECT substr(stopped_at, 1, :chars) AS bucket,
       sum(CASE WHEN state = 'finished' THEN 1 ELSE 0 END) AS finished,
       sum(CASE WHEN state = 'finished' THEN 0 ELSE 1 END) AS other
  FROM jobs INDEXED BY jobs_ended
 WHERE state IN (SELECT value FROM json_each(:states)) AND stopped_at >= :since GROUP BY bucket
"""
MON_WAITING = """
SELECT count(*) AS n, min(defined_at) AS oldest FROM jobs INDEXED BY jobs_queue
 WHERE state = 'defined' AND defined_at < :cutoff
"""
MON_PILOTS_LOST = "SELECT count(*) FROM pilots WHERE state = 'lost' AND stopped_at >= :since"
MON_WORKFLOWS_FAILED = """
SELECT count(*) FROM workflows WHERE state = 'failed' AND stopped_at >= :since
"""
MON_JOBTYPE_CAPS = 'SELECT name, cap FROM jobtypes WHERE cap IS NOT NULL ORDER BY name'
MON_BATCH_NO_PILOT = """
SELECT count(*) FROM batchjobs WHERE state = 'never_registered' AND ended_at >= :since
"""
MON_COUNT_WORKFLOWS = 'SELECT state, count(*) AS n FROM workflows GROUP BY state'


def local_time(iso):
    """A stored time shown in the server's local time zone (named once in the page header)."""
    if not iso:
        return ''
    return datetime.fromisoformat(iso).astimezone().strftime('%Y-%m-%d %H:%M:%S')


def local_zone():
    """The server's zone by name and offset, e.g. 'CET (UTC+01:00)'."""
    now = datetime.now().astimezone()
    offset = now.strftime('%z')
    if now.tzname() == 'UTC' and offset == '+0000':
        return 'UTC'
    return '%s (UTC%s:%s)' % (now.tzname(), offset[:3], offset[3:])


def percentile(sorted_values, q):
    if not sorted_values:
        return None
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


def window_counts(db, sql, now, **params):
    return [db.execute(sql, dict(params, since=seconds_before(now, secs))).fetchone()[0]
            for _, secs in MON_WINDOWS]


def timeline(db, now):
    """Jobs defined, started and ended (by state) in each window: {row: [n per window]}."""
    rows = {'defined': window_counts(db, MON_COUNT_DEFINED, now),
            'started': window_counts(db, MON_COUNT_STARTED, now)}
    for state in ('finished',) + BAD_END_STATES + ('killed', 'stale', 'dropped'):
        rows[state] = window_counts(db, MON_COUNT_ENDED, now, state=state)
    return rows


def jobtype_counts(db, now):
    """Per jobtype: queued, dispatched and running now; finished and ended badly in 24 h."""
    types = {}
    blank = {'defined': 0, 'dispatched': 0, 'running': 0, 'finished_24h': 0, 'failed_24h': 0}
    for r in db.execute(MON_TYPES_LIVE):
        types.setdefault(r['jobtype'], dict(blank))[r['state']] = r['n']
    since = seconds_before(now, 86400)
    for (jobtype,) in db.execute(MON_TYPES_ENDED, {'limit': MON_MAX_TYPES}).fetchall():
        n = types.setdefault(jobtype, dict(blank))
        for state in ('finished',) + BAD_END_STATES:
            key = 'finished_24h' if state == 'finished' else 'failed_24h'
            n[key] += db.execute(MON_COUNT_TYPE_ENDED, {'jobtype': jobtype, 'state': state,
                                                         'since': since}).fetchone()[0]
    return dict(sorted(types.items())[:MON_MAX_TYPES])


def jobtype_caps(db):
    """{jobtype: cap} of the capped types (0: paused)."""
    return {r['name']: r['cap'] for r in db.execute(MON_JOBTYPE_CAPS)}


def latency(db, now):
    """Queue latency (defined -> started) of jobs started in the last hour, in seconds."""
    waits = sorted(r[0] for r in db.execute(MON_LATENCY, {'since': seconds_before(now, 3600),
                                                           'cap': MON_LATENCY_CAP}))
    return {'n': len(waits), 'p50': percentile(waits, 0.50), 'p95': percentile(waits, 0.95)}


def throughput(db, now, span=MON_SPANS[0][0]):
    """Jobs ended per bucket over a span (a minute over the last hour, an hour over the last
    24 h or 7 days), oldest first, with empty buckets as zeros: [{start, finished, other}]."""
    spans = {name: rest for name, *rest in MON_SPANS}
    if span not in spans:
        fail(400, 'throughput is one of %s, not %r' % (', '.join(spans), span[:32]))
    buckets, seconds, chars = spans[span]
    start = datetime.fromisoformat(seconds_before(now, (buckets - 1) * seconds))
    start = start.replace(second=0, microsecond=0, minute=start.minute if seconds < 3600 else 0)
    found = {r['bucket']: r for r in db.execute(MON_THROUGHPUT, {
        'since': start.isoformat(timespec='microseconds'), 'chars': chars,
        'states': json.dumps(TERMINAL_STATES)})}
    out = []
    for i in range(buckets):
        at = (start + timedelta(seconds=i * seconds)).isoformat(timespec='microseconds')
        r = found.get(at[:chars])
        out.append({'start': at, 'finished': r['finished'] if r else 0,
                    'other': r['other'] if r else 0})
    return out


def checklist(db, now, jobs, pilots, types, caps, ended):
    """What is wrong, said plainly: a list of {check, status (ok|warn|fail), detail, link}.
    `ended`: jobs ended in the last hour, by state."""
    live = sum(pilots.get(s, 0) for s in LIVE_PILOT_STATES)
    queued = jobs.get('defined', 0)
    checks = []
    if live:
        checks.append(check('Live pilots', 'ok', '%s, %d idle'
                            % (count_of(live, 'live pilot'), pilots.get('idle', 0)),
                            '/monitor/pilots?state=' + ','.join(LIVE_PILOT_STATES)))
    else:
        checks.append(check('Live pilots', 'fail' if queued else 'warn',
                            'No live pilots: %s cannot run' % count_of(queued, 'queued job')
                            if queued else 'No live pilots (no job is waiting either)',
                            '/monitor/pilots'))
    waiting = db.execute(MON_WAITING, {'cutoff': seconds_before(now, MON_WAIT_ALARM)}).fetchone()
    if waiting['n']:
        checks.append(check('Queue', 'fail', '%s waited longer than %d min (the oldest since %s)'
                            % (count_of(waiting['n'], 'job') + (' has' if waiting['n'] == 1
                                                                 else ' have'),
                               MON_WAIT_ALARM // 60, local_time(waiting['oldest'])),
                            '/monitor/jobs?state=defined&sort=defined_at'))
    else:
        checks.append(check('Queue', 'ok', 'no job has waited longer than %d min (%d queued)'
                            % (MON_WAIT_ALARM // 60, queued), '/monitor/jobs?state=defined'))
    hour_ago = seconds_before(now, 3600)
    lost = db.execute(MON_PILOTS_LOST, {'since': hour_ago}).fetchone()[0]
    checks.append(check('Lost pilots', 'warn' if lost else 'ok',
                        '%s lost in the last hour' % count_of(lost, 'pilot'),
                        '/monitor/pilots?state=lost'))
    checks.append(failed_jobs_check(ended))
    failed = db.execute(MON_WORKFLOWS_FAILED, {'since': hour_ago}).fetchone()[0]
    checks.append(check('Failed workflows', 'warn' if failed else 'ok',
                        '%s failed in the last hour' % count_of(failed, 'workflow'),
                        '/monitor/workflows?state=failed&sort=-stopped_at'))
    checks.extend(cap_checks(types, caps))
    checks.extend(batch_checks(db, now))
    return checks


def failed_jobs_check(ended):
    """Jobs that ended badly in the last hour: a warning if any, a failure when they are many
    and at least half of all that ended."""
    bad = {s: ended.get(s, 0) for s in BAD_END_STATES if ended.get(s)}
    n = sum(bad.values())
    link = '/monitor/jobs?state=%s&sort=-stopped_at' % ','.join(BAD_END_STATES)
    if not n:
        return check('Failed jobs', 'ok', 'no job ended badly in the last hour (%d finished)'
                     % ended.get('finished', 0), link)
    share = n / (n + ended.get('finished', 0))
    status = 'fail' if n >= MON_FAIL_MIN and share >= MON_FAIL_SHARE else 'warn'
    return check('Failed jobs', status, '%s ended badly in the last hour (%s), %d%% of those '
                 'that ended' % (count_of(n, 'job'), ', '.join('%d %s' % (bad[s], s) for s in bad),
                                 round(100 * share)), link)


def batch_checks(db, now):
    """Batch jobs that ended without their pilot ever registering: a broken node or environment
    (their output's tail is on their page)."""
    broken = db.execute(MON_BATCH_NO_PILOT, {'since': seconds_before(now, 3600)}).fetchone()[0]
    if not broken:
        return []
    return [check('Batch pilots', 'fail', '%d batch jobs ended in the last hour without their '
                  'pilot ever registering' % broken, '/monitor/batchjobs?state=never_registered')]


def cap_checks(types, caps):
    """A type is paused by its cap when as many of its jobs run as the cap allows while
    others of it wait."""
    paused = [(t, c, types[t]) for t, c in sorted(caps.items()) if t in types
              and types[t]['defined'] and types[t]['dispatched'] + types[t]['running'] >= c]
    if not paused:
        return [check('Jobtype caps', 'ok', 'no type is held back by its cap', '')]
    return [check('Jobtype caps', 'warn', 'type %s paused by its cap: %d running of %d allowed, '
                  '%d waiting' % (t, n['dispatched'] + n['running'], c, n['defined']),
                  '/monitor/jobs?state=defined&jobtype=' + urllib.parse.quote(t))
            for t, c, n in paused]


def check(name, status, detail, link):
    return {'check': name, 'status': status, 'detail': detail, 'link': link}


def summary(store, now, started=None, span=None):
    """The dashboard's numbers (and GET /api/summary): the original's /?out=json, extended.
    `span`: the throughput's, 1h (the default), 24h or 7d."""
    base = counts(store)
    with store.read() as db:
        return dashboard_numbers(db, base, now, started or now, span or MON_SPANS[0][0])


def dashboard_numbers(db, base, now, started, span):
    types = jobtype_counts(db, now)
    caps = jobtype_caps(db)
    workflows = {r['state']: r['n'] for r in db.execute(MON_COUNT_WORKFLOWS)}
    rows = timeline(db, now)
    hour = [w for w, _ in MON_WINDOWS].index('1 h')
    ended = {state: n[hour] for state, n in rows.items()}
    return dict(base, workflows=workflows, time=now, timezone=local_zone(),
                host=socket.gethostname(),
                uptime=round(seconds_between(started, now) or 0),
                windows=[w for w, _ in MON_WINDOWS], timeline=rows,
                jobtypes=types, caps=caps, latency=latency(db, now),
                throughput=throughput(db, now, span), throughput_span=span,
                checks=checklist(db, now, base['jobs'], base['pilots'], types, caps, ended))

# ---------------------------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------------------------
# GET /metrics, in Prometheus's text format. What the database holds is read from it at each
# scrape, so every server process answers the same: live jobs, pilots and workflows through
# indexes that hold the live ones only (cheap with millions of ended jobs), and the numbers of
# ended jobs and workflows from the counts its triggers keep (schema.sql). Events the database
# does not record (claims, long polls, queue waits, run times) are counted by each process with
# prometheus_client. A server of several worker processes names a folder for their counts in
# PROMETHEUS_MULTIPROC_DIR before any of them calls configure(), which makes the process's
# metrics; /metrics in any of them then adds up all of them (prometheus_client's multiprocess
# mode), and prometheus_client.multiprocess.mark_process_dead(pid) drops a dead worker's share
# of p3s_long_polls_waiting.

METRICS_TEMPLATES = """
SELECT jobtype, 'template' AS state, count(*) AS n FROM jobs WHERE state = 'template'
 GROUP BY jobtype
"""
METRICS_JOB_ENDS = 'SELECT state, jobtype, sum(n) AS n FROM job_ends GROUP BY state, jobtype'
METRICS_PILOTS = """
SELECT state, site, count(*) AS n FROM pilots WHERE state IN """ + SQL_LIVE_PILOT + """
 GROUP BY state, site
"""
METRICS_SITES = 'SELECT name FROM sites'
METRICS_LIVE_WORKFLOW_STATES = tuple(s for s in WORKFLOW_STATES if s not in WORKFLOW_ENDED)
METRICS_WORKFLOWS = ('SELECT state, count(*) AS n FROM workflows WHERE state IN '
                     + sql_set(METRICS_LIVE_WORKFLOW_STATES) + ' GROUP BY state')
METRICS_WORKFLOW_ENDS = 'SELECT state, sum(n) AS n FROM workflow_ends GROUP BY state'
METRICS_CONTENT_TYPE = 'text/plain; version=0.0.4; charset=utf-8'   # what every Prometheus reads
# Seconds. DQM jobs wait milliseconds on an idle pool and run from seconds to an hour or so.
QUEUE_WAIT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300,
                      600, 1800, 3600)
RUN_TIME_BUCKETS = (0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200,
                    14400, 43200)


class ProcessMetrics:
    """The counts this process keeps itself (process_metrics() has the one instance)."""

    def __init__(self):
        # Imported here, not with the other modules: prometheus_client decides when it is
        # imported whether counts live in this process or in PROMETHEUS_MULTIPROC_DIR, which a
        # server of several processes sets only when it starts them.
        import prometheus_client.core
        import prometheus_client.multiprocess
        self.prom = prom = prometheus_client
        prom.disable_created_metrics()           # no *_created series: Prometheus needs none
        self.registry = r = prom.CollectorRegistry()
        self.claims = prom.Counter('p3s_claims', 'Jobs handed to pilots (a job sent again '
                                   'after a lost reply counts once)', registry=r)
        self.queue_wait = prom.Histogram('p3s_job_queue_wait_seconds', 'Seconds from a '
                                         "job's definition to its dispatch, by type",
                                         ['jobtype'], buckets=QUEUE_WAIT_BUCKETS, registry=r)
        self.run_time = prom.Histogram('p3s_job_run_seconds', 'Seconds a payload ran, as its '
                                       'pilot measured, by type', ['jobtype'],
                                       buckets=RUN_TIME_BUCKETS, registry=r)
        self.long_polls = prom.Counter('p3s_long_polls', 'Requests for work held until a job '
                                       'came or the wait ended', registry=r)
        self.long_polls_refused = prom.Counter('p3s_long_polls_refused', 'Requests for work '
                                               'answered at once: --max-waiters polls were '
                                               'held already', registry=r)
        self.long_polls_waiting = prom.Gauge('p3s_long_polls_waiting', 'Requests for work '
                                             'held now', multiprocess_mode='livesum', registry=r)

    def claimed(self, jobtype, waited):
        self.claims.inc()
        self.queue_wait.labels(jobtype).observe(max(0.0, waited or 0.0))

    def ran(self, jobtype, seconds):
        self.run_time.labels(jobtype).observe(max(0.0, seconds))

    def long_polls_held(self, change):
        if change > 0:
            self.long_polls.inc()
        self.long_polls_waiting.inc(change)

    def own_registry(self):
        """What this server's processes counted: this one's, or all of them added up."""
        if not os.environ.get('PROMETHEUS_MULTIPROC_DIR'):
            return self.registry
        registry = self.prom.CollectorRegistry()
        self.prom.multiprocess.MultiProcessCollector(registry)
        return registry


@functools.lru_cache(maxsize=None)
def process_metrics():
    """This process's ProcessMetrics, made at the first call."""
    return ProcessMetrics()


class Families:
    """Metric families made beforehand, in the shape generate_latest() reads."""

    def __init__(self, families):
        self.families = families

    def collect(self):
        return self.families


def metrics_text(store):
    """The whole exposition: the processes' own counts, then what the database holds."""
    own = process_metrics()
    with store.read() as db:
        families = database_families(db, own.prom.core, store.db)
    return (own.prom.generate_latest(own.own_registry())
            + own.prom.generate_latest(Families(families)))


def database_families(db, core, dialect):
    """Gauges of the live jobs, pilots and workflows, counters of the ended ones, and the
    server's description. A live state with nothing in it is a 0, not a missing series."""
    jobs = core.GaugeMetricFamily('p3s_jobs', 'Jobs not yet ended, by state and type',
                                  labels=['state', 'jobtype'])
    ended = core.CounterMetricFamily('p3s_jobs_ended', 'Jobs that reached an end state, by '
                                     'state and type', labels=['state', 'jobtype'])
    live = {(r['state'], r['jobtype']): r['n'] for sql in (METRICS_TEMPLATES, MON_TYPES_LIVE)
            for r in db.execute(sql)}
    ends = {(r['state'], r['jobtype']): r['n'] for r in db.execute(METRICS_JOB_ENDS)}
    for jobtype in sorted({t for _, t in live} | {t for _, t in ends}):
        for state in LIVE_JOB_STATES:
            jobs.add_metric([state, jobtype], live.get((state, jobtype), 0))
    for (state, jobtype), n in sorted(ends.items()):
        ended.add_metric([state, jobtype], n)
    return [jobs, ended, pilot_family(db, core)] + workflow_families(db, core) + [
        core.InfoMetricFamily('p3s_server', 'The server: its version and database', value={
            'version': VERSION, 'database': dialect.name,
            'database_version': str(dialect.version),
            'python_version': '%d.%d.%d' % sys.version_info[:3]})]


def pilot_family(db, core):
    pilots = core.GaugeMetricFamily('p3s_pilots', 'Live pilots, by state and site',
                                    labels=['state', 'site'])
    counts = {(r['state'], r['site']): r['n'] for r in db.execute(METRICS_PILOTS)}
    sites = {site for _, site in counts} | {r['name'] for r in db.execute(METRICS_SITES)}
    for site in sorted(sites):
        for state in LIVE_PILOT_STATES:
            pilots.add_metric([state, site], counts.get((state, site), 0))
    return pilots


def workflow_families(db, core):
    workflows = core.GaugeMetricFamily('p3s_workflows', 'Workflows not yet ended, by state',
                                       labels=['state'])
    counts = {r['state']: r['n'] for r in db.execute(METRICS_WORKFLOWS)}
    for state in METRICS_LIVE_WORKFLOW_STATES:
        workflows.add_metric([state], counts.get(state, 0))
    ended = core.CounterMetricFamily('p3s_workflows_ended', 'Workflows that ended, by state',
                                     labels=['state'])
    for r in db.execute(METRICS_WORKFLOW_ENDS):
        ended.add_metric([r['state']], r['n'])
    return [workflows, ended]

# ---------------------------------------------------------------------------------------------
# API routes
# ---------------------------------------------------------------------------------------------

app = Bottle()
bottle.TEMPLATE_PATH[:] = [os.path.join(SERVER_FILES, 'views')]
# The front has read each body into memory already: Bottle must not copy a large one into a
# temporary file (a full or failing /tmp would make a submission fail for no reason of its own).
bottle.BaseRequest.MEMFILE_MAX = MAX_BODY + 1


def store():
    return app.config['p3s.store']


def arrival():
    """When the front received this request, as stored (now, without the front): a submission
    defines its jobs then, and a pilot's report counts its durations back from then, so that
    the time a request waited in the server does not shift the times it carries."""
    return request.environ.get('p3s.arrived') or utcnow()


def own_pilot(pilot_uuid):
    """The pilot named by a call of its own, which must carry the pilot's secret as its bearer
    token (the shared pilot token only registers)."""
    return authenticate_pilot(store(), pilot_uuid, bearer_token())


def json_body():
    """The request body as JSON, within the size limit."""
    if request.content_length > MAX_BODY:
        fail(413, 'request body larger than %d bytes' % MAX_BODY)
    raw = request.body.read(MAX_BODY + 1)
    if len(raw) > MAX_BODY:
        fail(413, 'request body larger than %d bytes' % MAX_BODY)
    try:
        value = json.loads(raw or b'{}')
    except (ValueError, UnicodeDecodeError) as e:
        fail(400, 'request body is not valid JSON: %s' % e)
    except RecursionError:
        fail(400, 'request body is not valid JSON: nested too deeply')
    if SURROGATE_RE.search(raw):
        check_unicode(value)
    return value


def check_unicode(value):
    """Refuse text that cannot be written as UTF-8: a lone surrogate."""
    try:
        json.dumps(value, ensure_ascii=False).encode()
    except UnicodeEncodeError:
        fail(400, 'request body holds a lone UTF-16 surrogate (\\ud800 to \\udfff), which is '
             'not text')


@app.get('/api')
@app.get('/api/ping')
def api_ping():
    return {'status': 'OK', 'version': VERSION, 'time': utcnow()}


@app.post('/api/jobs')
def api_submit_jobs():
    return {'uuids': submit_jobs(store(), json_body(), arrival())}


@app.get('/api/jobs')
def api_list_jobs():
    return {'jobs': list_jobs(store(), request.query)}


@app.get('/api/jobs/<job_uuid>')
def api_get_job(job_uuid):
    return get_job(store(), job_uuid, logs=request.query.get('logs') in ('1', 'true'))


@app.post('/api/jobs/<job_uuid>/adjust')
def api_adjust_job(job_uuid):
    return adjust_job(store(), job_uuid, json_body(), utcnow())


@app.post('/api/jobs/<job_uuid>/kill')
def api_kill_job(job_uuid):
    return kill_job(store(), job_uuid, utcnow())


@app.delete('/api/jobs/<job_uuid>')
def api_delete_job(job_uuid):
    return delete_job(store(), job_uuid)


@app.post('/api/jobs/<job_uuid>/retry')
def api_retry_job(job_uuid):
    return retry_job(store(), job_uuid, utcnow())


@app.post('/api/jobs/retry')
def api_retry_jobs():
    return retry_selection(store(), json_body(), utcnow())


@app.post('/api/pilots')
def api_register_pilot():
    pilot = register_pilot(store(), json_body(), utcnow())
    secret = pilot.pop('secret')
    return {'status': 'OK', 'state': pilot['state'], 'pilot': pilot, 'secret': secret,
            'pilot_timeout': app.config['p3s.pilot_timeout'], 'max_wait': MAX_WAIT}


@app.get('/api/pilots')
def api_list_pilots():
    return {'pilots': list_pilots(store(), request.query)}


@app.get('/api/pilots/<pilot_uuid>')
def api_get_pilot(pilot_uuid):
    return get_pilot(store(), pilot_uuid)


@app.post('/api/pilots/<pilot_uuid>/work')
def api_request_work(pilot_uuid):
    """Ask for a job, optionally delivering the final report of the previous one with it.
    The pilot's secret is checked in the brokerage's own transaction (with its pilot's row)."""
    pilot_uuid = check_uuid(pilot_uuid, 'pilot')
    body = check_object(json_body(), 'request')
    check_known(body, {'wait', 'report', 'left'}, 'request')
    # A held pilot sends nothing, so it must be answered well within the pilot timeout.
    wait = number_field(body, 'wait', 0, 0, min(MAX_WAIT, app.config['p3s.pilot_timeout'] / 3))
    left = number_field(body, 'left', None, 0, MAX_TIMELIMIT)      # a batch pilot's time left
    report, refusal = None, None
    if body.get('report') is not None:
        try:
            report = dict(check_report(body['report']), arrived=arrival())
        except Refused as e:           # a bad report must not cost the pilot its next job
            refusal = {'status': 'REFUSED', 'error': e.message}
    reply = wait_for_work(store(), pilot_uuid, wait, report, request.environ.get('p3s.poll'),
                          left=left, secret=bearer_token())
    return dict(reply, report=refusal) if refusal else reply


@app.post('/api/pilots/<pilot_uuid>/report')
def api_report(pilot_uuid):
    pilot_uuid = own_pilot(pilot_uuid)
    return report_job(store(), pilot_uuid, check_report(json_body()), arrival())


@app.post('/api/pilots/<pilot_uuid>/heartbeat')
def api_heartbeat(pilot_uuid):
    pilot_uuid = own_pilot(pilot_uuid)
    body = check_object(json_body(), 'heartbeat')
    check_known(body, {'job', 'attempt'}, 'heartbeat')
    return heartbeat(store(), pilot_uuid, uuid_field(body, 'job'), utcnow(),
                     int_field(body, 'attempt', None, 1))


@app.post('/api/pilots/<pilot_uuid>/stop')
def api_stop_pilot(pilot_uuid):
    pilot_uuid = own_pilot(pilot_uuid)
    body = check_object(json_body(), 'stop')
    check_known(body, {'state'}, 'stop')
    state = body.get('state', 'stopped')
    if state not in ('stopped', 'killed'):
        fail(400, "a pilot stops as 'stopped' or 'killed'")
    return stop_pilot(store(), pilot_uuid, state, utcnow())


@app.post('/api/dags')
def api_add_dag():
    return add_dag(store(), json_body(), utcnow())


@app.get('/api/dags')
def api_list_dags():
    return {'dags': list_dags(store(), request.query)}


@app.get('/api/dags/<name>')
def api_get_dag(name):
    return get_dag(store(), name)


@app.delete('/api/dags/<name>')
def api_delete_dag(name):
    return delete_dag(store(), name)


@app.post('/api/workflows')
def api_add_workflow():
    return add_workflow(store(), json_body(), utcnow())


@app.get('/api/workflows')
def api_list_workflows():
    return {'workflows': list_workflows(store(), request.query)}


@app.get('/api/workflows/<wf_uuid>')
def api_get_workflow(wf_uuid):
    return get_workflow(store(), wf_uuid)


@app.post('/api/workflows/<wf_uuid>/state')
def api_set_workflow_state(wf_uuid):
    return set_workflow_state(store(), wf_uuid, json_body(), utcnow())


@app.post('/api/workflows/<wf_uuid>/cancel')
def api_cancel_workflow(wf_uuid):
    return cancel_workflow(store(), wf_uuid, utcnow())


@app.post('/api/workflows/<wf_uuid>/retry')
def api_retry_workflow(wf_uuid):
    return retry_workflow(store(), wf_uuid, utcnow())


@app.delete('/api/workflows/<wf_uuid>')
def api_delete_workflow(wf_uuid):
    return delete_workflow(store(), wf_uuid, force=request.query.get('force') in ('1', 'true'))


@app.post('/api/datatypes')
def api_add_datatype():
    return add_datatype(store(), json_body(), utcnow())


@app.get('/api/datatypes')
def api_list_datatypes():
    return {'datatypes': list_datatypes(store())}


@app.delete('/api/datatypes/<name>')
def api_delete_datatype(name):
    return delete_datatype(store(), name)

# -- DQM controls --


@app.post('/api/jobs/drop')
def api_drop_jobs():
    return drop_jobs(store(), json_body(), utcnow())


@app.get('/api/jobtypes')
def api_list_jobtypes():
    return {'jobtypes': list_jobtypes(store())}


@app.post('/api/jobtypes')
def api_set_cap():
    return set_cap(store(), json_body(), utcnow())


@app.get('/api/sites')
def api_list_sites():
    return {'sites': list_sites(store(), request.query.get('name'))}


@app.post('/api/sites')
def api_define_site():
    return {'site': define_site(store(), json_body(), utcnow())}


@app.delete('/api/sites/<name>')
def api_delete_site(name):
    return delete_site(store(), name)


@app.get('/api/services')
def api_list_service_messages():
    return {'services': list_service_messages(store(), request.query)}


@app.post('/api/services')
def api_add_service_message():
    return {'service': add_service_message(store(), json_body(), utcnow())}


# -- batch systems --


@app.post('/api/pilots/<pilot_uuid>/drain')
def api_drain_pilot(pilot_uuid):
    return {'pilot': drain_pilot(store(), pilot_uuid, utcnow())}


@app.get('/api/sites/<name>/pool')
def api_pool_status(name):
    try:
        keep = int(request.query.get('keep') or 0)
    except ValueError:
        fail(400, 'keep must be an integer')
    if keep < 0:
        fail(400, 'keep must be 0 or more')
    return pool_status(store(), name, request.query.get('system') or 'slurm', keep, utcnow())


@app.get('/api/batchjobs')
def api_list_batchjobs():
    return {'batchjobs': list_batchjobs(store(), request.query)}


@app.get('/api/batchjobs/<batchjob_id:int>')
def api_get_batchjob(batchjob_id):
    return get_batchjob(store(), batchjob_id)


@app.post('/api/batchjobs')
def api_record_batchjobs():
    return {'batchjobs': record_batchjobs(store(), json_body(), utcnow())}


@app.post('/api/batchjobs/update')
def api_update_batchjobs():
    return {'batchjobs': update_batchjobs(store(), json_body(), utcnow())}

# -- data and injection --


@app.post('/api/data')
def api_register_data():
    return register_data(store(), json_body(), utcnow())


@app.get('/api/data')
def api_list_data():
    return {'data': list_data(store(), request.query)}


@app.post('/api/data/inject')
def api_inject():
    return inject(store(), json_body(), utcnow())


@app.get('/api/data/<data_uuid>')
def api_get_data(data_uuid):
    return get_data(store(), data_uuid)


@app.post('/api/data/<data_uuid>/adjust')
def api_adjust_data(data_uuid):
    return adjust_data(store(), data_uuid, json_body(), utcnow())


@app.delete('/api/data/<data_uuid>')
def api_delete_data(data_uuid):
    return delete_data(store(), data_uuid)


@app.get('/api/summary')
def api_summary():
    return summary(store(), utcnow(), app.config.get('p3s.started'),
                   request.query.get('throughput'))


@app.get('/metrics')
def api_metrics():
    """Prometheus's text format (not JSON): what scrapers read."""
    response.content_type = METRICS_CONTENT_TYPE
    return metrics_text(store())
# ---------------------------------------------------------------------------------------------
# Monitor routes
# ---------------------------------------------------------------------------------------------
# The monitor computes everything in Python and hands the templates plain values: the templates
# only lay them out and escape them ({{x}} everywhere).

MON_JOB_COLUMNS = ('uuid, name, "user", jobtype, priority, state, site, pilot, host, errcode, '
                   'workflow, defined_at, started_at, stopped_at, retry_of, attempt')
MON_PILOT_JOBS = ('SELECT ' + MON_JOB_COLUMNS + ' FROM jobs WHERE pilot = :pilot'
                  ' ORDER BY id DESC LIMIT :limit')
# Listing sorts: ?sort=KEY or ?sort=-KEY picks one of these fixed ORDER BY fragments.
MON_JOB_SORTS = ('id', 'name', 'user', 'jobtype', 'priority', 'state', 'site', 'errcode',
                 'defined_at', 'started_at', 'stopped_at')
MON_PILOT_SORTS = ('id', 'host', 'site', 'state', 'jobs_done', 'registered_at', 'last_seen',
                   'stopped_at')
MON_WORKFLOW_SORTS = ('id', 'name', 'user', 'dag', 'state', 'nvertices', 'ndone', 'created_at',
                      'defined_at', 'started_at', 'stopped_at')
MON_DAG_SORTS = ('id', 'name', 'user', 'nvertices', 'nedges', 'created_at')
MON_DATA_SORTS = ('id', 'name', 'datatype', 'datatag', 'state', 'source', 'target', 'created_at',
                  'updated_at')
MON_DATATYPE_SORTS = ('id', 'name', 'ext', 'created_at')
MON_SITE_SORTS = ('id', 'name', 'pilots', 'lifetime', 'updated_at')
MON_SERVICE_SORTS = ('id', 'name', 'created_at')
MON_BATCH_SORTS = ('id', 'site', 'state', 'host', 'submitted_at', 'started_at', 'ended_at')


def order_fragments(columns, rowid='id'):
    """{'col': 'ORDER BY col, id', '-col': 'ORDER BY col DESC, id DESC'} for whitelisted columns.
    The key `id` stands for `rowid` in a table without an id column: the time its rows were made
    or changed (datatypes, sites)."""
    frags = {}
    for col in columns:
        sql_col = rowid if col == 'id' else '"user"' if col == 'user' else col
        tie = '' if col == 'id' else ', ' + rowid
        frags[col] = ' ORDER BY %s%s' % (sql_col, tie)
        frags['-' + col] = ' ORDER BY %s DESC%s' % (sql_col, tie and tie + ' DESC')
    return frags


MON_JOB_ORDER = order_fragments(MON_JOB_SORTS)
MON_PILOT_ORDER = order_fragments(MON_PILOT_SORTS)
MON_WORKFLOW_ORDER = order_fragments(MON_WORKFLOW_SORTS)
MON_DAG_ORDER = order_fragments(MON_DAG_SORTS)
MON_DATA_ORDER = order_fragments(MON_DATA_SORTS)
MON_DATATYPE_ORDER = order_fragments(MON_DATATYPE_SORTS, rowid='created_at')
MON_SITE_ORDER = order_fragments(MON_SITE_SORTS, rowid='updated_at')
MON_SERVICE_ORDER = order_fragments(MON_SERVICE_SORTS)
MON_BATCH_ORDER = order_fragments(MON_BATCH_SORTS)
# A batch job beside the pilot it became: the pilot's state is read with it.
BATCH_LIST_COLUMNS = (BATCH_COLUMNS + ', (SELECT state FROM pilots'
                     ' WHERE pilots.uuid = batchjobs.pilot) AS pilot_state')
MON_PILOT_BATCHJOBS = 'SELECT ' + BATCH_LIST_COLUMNS + ' FROM batchjobs WHERE pilot = :pilot'
# The workflow and data listings' filters: the API's, and the columns the monitor filters on.
MON_WORKFLOW_FILTERS = dict(WORKFLOW_FILTERS, dag='dag = :dag', name='name = :name')
MON_DAG_FILTERS = {'user': '"user" = :user', 'name': 'name = :name'}
MON_NAME_FILTER = {'name': 'name = :name'}        # datatypes, sites, services
MON_DATATYPE_COLUMNS = DATATYPE_COLUMNS
MON_SITE_COLUMNS = SITE_COLUMNS
MON_SERVICE_COLUMNS = 'id, name, message, created_at'
MON_WORKFLOW_JOBS = ('SELECT ' + MON_JOB_COLUMNS + ' FROM jobs WHERE workflow = :workflow'
                     ' ORDER BY id')
MON_DAG_WORKFLOWS = ('SELECT ' + WORKFLOW_COLUMNS + ' FROM workflows WHERE dag = :dag'
                     ' ORDER BY id DESC LIMIT :limit')


class Page:
    """What every monitor page shares: title, refresh period, the links that keep it."""

    NAV = (('Dashboard', '/'), ('Jobs', '/monitor/jobs'), ('Pilots', '/monitor/pilots'),
           ('Workflows', '/monitor/workflows'), ('DAGs', '/monitor/dags'),
           ('Data', '/monitor/data'), ('Datatypes', '/monitor/datatypes'),
           ('Sites', '/monitor/sites'), ('Batch', '/monitor/batchjobs'),
           ('Services', '/monitor/services'))

    def __init__(self, title, query, refresh='0'):
        """`refresh`: the page's own period when none was chosen. A choice (?refresh=) is
        carried by every link; a value not offered means never."""
        self.title = title
        self.query = query
        given = query.get('refresh', '')
        self.chosen = (given if given in MON_REFRESH else '0') if given else ''
        self.refresh = self.chosen or refresh
        self.now = local_time(utcnow())
        self.zone = local_zone()
        self.nav = [(label, self.href(path)) for label, path in self.NAV]
        self.refresh_links = [(r + ' s' if r != '0' else 'never', self.here(refresh=r),
                               r == self.refresh) for r in MON_REFRESH]

    def href(self, path, **params):
        """A link that keeps the chosen refresh period."""
        params = {k: v for k, v in params.items() if v not in (None, '')}
        if self.chosen:
            params['refresh'] = self.chosen
        if not params:
            return path
        return path + ('&' if '?' in path else '?') + urllib.parse.urlencode(params)

    def here(self, **changes):
        """This page's own link with some query parameters changed."""
        items = [(k, v) for k, v in self.query.allitems() if k not in changes and k != 'refresh']
        items += [(k, v) for k, v in changes.items() if v not in (None, '')]
        if self.chosen and 'refresh' not in changes:
            items.append(('refresh', self.chosen))
        qs = urllib.parse.urlencode(items)
        return request.path + ('?' + qs if qs else '')


def not_found(page, what, ident):
    page.title = 'Not found'
    body = bottle.template('notfound', page=page, what=what, ident=ident)
    raise bottle.HTTPResponse(body, status=404)


def refused_page(page, refusal):
    """A monitor request that cannot be answered (an unknown state, filter or sort key): the
    reason on an HTML page, with the status the API would give."""
    page.title = 'Cannot show this'
    body = bottle.template('refused', page=page, message=refusal.message)
    raise bottle.HTTPResponse(body, status=refusal.status)


def cell(text, href='', cls='', title=''):
    """A table cell. A listing clips long text, so the whole of it is also its hover title."""
    text = '' if text is None else str(text)
    return {'text': text, 'href': href, 'cls': cls,
            'title': title or (text if len(text) > MON_CLIP else '')}


def time_cell(iso):
    """A time in a listing, short: the clock time if it is today, else the day and minute;
    the whole of it on hover."""
    full = local_time(iso)
    return cell(full[11:] if full[:10] == local_time(utcnow())[:10] else full[5:16],
                cls='time', title=full)


def short(uuid):
    return (uuid or '')[:8]


def duration(seconds):
    if seconds is None:
        return ''
    if seconds < 100:
        return '%.1f s' % seconds
    if seconds < 6000:
        return '%.1f min' % (seconds / 60)
    return '%.1f h' % (seconds / 3600)


# -- the dashboard --


def dashboard_view(page, s):
    """The summary laid out for the dashboard template: every link and label made here."""
    jobs_link = lambda **q: page.href('/monitor/jobs', **q)
    return {
        'checks': [dict(c, href=page.href(c['link']) if c['link'] else '') for c in s['checks']],
        'jobs': [(st, s['jobs'].get(st, 0), jobs_link(state=st)) for st in JOB_STATES]
        + [('total', sum(s['jobs'].values()), jobs_link())],
        'errors_href': jobs_link(state='error'),
        'pilots': [(st, s['pilots'].get(st, 0), page.href('/monitor/pilots', state=st))
                   for st in PILOT_STATES]
        + [('total', sum(s['pilots'].values()), page.href('/monitor/pilots'))],
        'workflows': [(st, s['workflows'].get(st, 0), page.href('/monitor/workflows', state=st))
                      for st in WORKFLOW_STATES]
        + [('total', sum(s['workflows'].values()), page.href('/monitor/workflows'))],
        'windows': s['windows'],
        'timeline': [(row, n, timeline_href(page, row)) for row, n in s['timeline'].items()],
        'types': [(t, n, (s['caps'] or {}).get(t, ''), jobs_link(jobtype=t))
                  for t, n in s['jobtypes'].items()],
        'caps': s['caps'],
        'latency': {k: duration(v) if k != 'n' else v for k, v in s['latency'].items()},
        'chart': chart(s['throughput'], s['throughput_span']),
        'spans': [(name, page.here(throughput=name), name == s['throughput_span'])
                  for name, *_ in MON_SPANS],
        'host': s['host'], 'uptime': duration(s['uptime']),
    }


def timeline_href(page, row):
    """A timeline row links to its jobs, most recent (by the row's own timestamp) first."""
    if row in ('defined', 'started'):
        return page.href('/monitor/jobs', sort='-%s_at' % row)
    return page.href('/monitor/jobs', state=row, sort='-stopped_at')


CHART_W, CHART_H = 600, 120


# What the throughput chart of each span says: (caption, where a bar's time starts and ends
# in a local time 'YYYY-MM-DD HH:MM:SS', its unit)
CHART_SPANS = {'1h': ('per minute, last hour', 11, 16, 'min'),
               '24h': ('per hour, last 24 h', 11, 16, 'h'),
               '7d': ('per hour, last 7 days', 5, 16, 'h')}


def chart(buckets, span):
    """Bars of jobs ended per bucket (finished, and others stacked on top) as SVG geometry."""
    caption, first, last, unit = CHART_SPANS[span]
    top = max([m['finished'] + m['other'] for m in buckets] + [1])
    step = CHART_W / len(buckets)
    bars = []
    for i, m in enumerate(buckets):
        hf = CHART_H * m['finished'] / top
        ho = CHART_H * m['other'] / top
        when = local_time(m['start'])[first:last]
        bars.append({'x': round(i * step + 0.5, 1), 'w': round(max(step - 1, 1), 1),
                     'yf': round(CHART_H - hf, 1), 'hf': round(hf, 1),
                     'yo': round(CHART_H - hf - ho, 1), 'ho': round(ho, 1),
                     'title': '%s: %d finished, %d other' % (when, m['finished'], m['other'])})
    return {'w': CHART_W, 'h': CHART_H, 'bars': bars, 'top': top, 'unit': unit,
            'caption': caption, 'first': local_time(buckets[0]['start'])[first:last],
            'last': local_time(buckets[-1]['start'])[first:last],
            'total': sum(m['finished'] for m in buckets),
            'others': sum(m['other'] for m in buckets)}


@app.get('/')
def monitor_dashboard():
    page = Page('Dashboard', request.query, MON_DASHBOARD_REFRESH)
    try:
        d = dashboard_view(page, summary(store(), utcnow(), app.config.get('p3s.started'),
                                         request.query.get('throughput')))
    except Refused as e:
        refused_page(page, e)
    d['services'] = [dict(m, when=local_time(m['created_at']),
                          href=page.href('/monitor/services', name=m['name']))
                     for m in list_service_messages(store(), {'limit': DASHBOARD_SERVICES})]
    d['services_href'] = page.href('/monitor/services')
    return bottle.template('dashboard', page=page, d=d)


# -- listings --


def page_number(query, key, default, allowed=None):
    """?page= or ?perpage=: a whole number, at least 1 (or one of `allowed`)."""
    text = query.get(key) or str(default)
    try:
        value = int(text)
    except ValueError:
        fail(400, '%s must be a whole number, not %r' % (key, text[:32]))
    if not 1 <= value <= MON_MAX_PAGE or (allowed and value not in allowed):
        fail(400, '%s must be %s' % (key, 'one of ' + ', '.join(map(str, allowed)) if allowed
                                     else 'between 1 and %d' % MON_MAX_PAGE))
    return value


def listing(db, table, columns, query, filters, orders, known_states):
    """One page of a filtered, sorted table: (rows, matches up to MON_COUNT_CAP, paging)."""
    params, where = filters_from(query, filters, known_states, also=MON_LISTING_KEYS)
    sort = query.get('sort') or '-id'
    if sort not in orders:
        fail(400, 'unknown sort key %r: this listing sorts by %s (a - in front: descending)'
             % (sort[:32], ', '.join(k for k in orders if not k.startswith('-'))))
    perpage = page_number(query, 'perpage', 50, MON_PERPAGE)
    number = page_number(query, 'page', 1)
    params.update(limit=perpage, offset=(number - 1) * perpage, cap=MON_COUNT_CAP)
    rows = db.execute('SELECT ' + columns + ' FROM ' + table + where + orders[sort]
                      + ' LIMIT :limit OFFSET :offset', params).fetchall()
    matches = db.execute('SELECT count(*) FROM (SELECT 1 FROM ' + table + where
                         + ' LIMIT :cap) AS matching', params).fetchone()[0]
    return rows, matches, {'sort': sort, 'perpage': perpage, 'page': number}


# A listing's table fits its page: its columns share the width, the short ones (a width each,
# static/p3s.css) by kind, and a long text is clipped, all of it on hover. Kinds by header label:
COLUMN_KINDS = dict([(label, 'id') for label in ('job', 'pilot', 'workflow', 'data', 'from',
                                                  'to')]
                    + [(label, 'num') for label in ('prio', 'exit', 'vertices', 'edges',
                                                    'period', 'cycles', 'beat', 'wait',
                                                    'timelimit', 'priority')]
                    + [(label, 'time') for label in ('defined', 'started', 'stopped', 'created',
                                                     'updated', 'registered', 'last seen',
                                                     'time')]
                    + [(label, 'duration') for label in ('ran', 'life', 'lifetime',
                                                         'jobs done', 'pilots (nominal)')]
                    + [(label, 'short') for label in ('user', 'type', 'tag', 'site', 'ext',
                                                      'batch id', 'jobtype', 'datatype',
                                                      'datatag', 'service')]
                    + [('state', 'state')])


def sort_headers(page, columns, sort):
    """Column headers; a sortable one links to its sort, descending first."""
    heads = []
    for key, label in columns:
        head = {'label': label, 'href': '', 'mark': '', 'cls': COLUMN_KINDS.get(label, '')}
        if key is not None:
            head.update(mark='▼' if sort == '-' + key else '▲' if sort == key else '',
                        href=page.here(sort=key if sort == '-' + key else '-' + key, page=''))
        heads.append(head)
    return heads


def pager(page, matches, paging, shown):
    n, per = paging['page'], paging['perpage']
    last = (matches + per - 1) // per if matches < MON_COUNT_CAP else None
    return {'matches': '%d' % matches if matches < MON_COUNT_CAP else 'more than %d' % matches,
            'page': n, 'last': last or '',
            'prev': page.here(page=n - 1) if n > 1 else '',
            'next': page.here(page=n + 1) if shown == per and (last is None or n < last) else ''}


def filter_form(page, states, fields, paging):
    checked = set(s for v in query_all(page.query, 'state') for s in v.split(','))
    return {'action': request.path, 'clear': page.href(request.path),
            'states': [(s, s in checked) for s in states],
            'fields': [(f, page.query.get(f, '')) for f in fields],
            'perpage': [(n, n == paging['perpage']) for n in MON_PERPAGE],
            'hidden': [(k, v) for k, v in (('sort', paging['sort']), ('refresh', page.chosen))
                       if v]}


JOB_LIST_HEADS = (('id', 'job'), ('name', 'name'), ('user', 'user'), ('jobtype', 'type'),
                  ('priority', 'prio'), ('state', 'state'), ('errcode', 'exit'), ('site', 'site'),
                  (None, 'workflow'), (None, 'pilot'), (None, 'host'), ('defined_at', 'defined'),
                  ('started_at', 'started'), ('stopped_at', 'stopped'), (None, 'ran'))


def job_cells(page, r):
    return [cell(short(r['uuid']), page.href('/monitor/jobs/' + r['uuid'])),
            cell(r['name'] + (' (attempt %d)' % r['attempt'] if r['attempt'] > 1 else '')),
            cell(r['user']), cell(r['jobtype']), cell(r['priority'], cls='num'),
            cell(r['state'], cls='state ' + r['state']),
            cell(r['errcode'], cls='num' + (' bad' if r['errcode'] else '')), cell(r['site']),
            link_cell(page, '/monitor/workflows/', r['workflow']),
            link_cell(page, '/monitor/pilots/', r['pilot']), cell(r['host']),
            time_cell(r['defined_at']), time_cell(r['started_at']), time_cell(r['stopped_at']),
            cell(duration(seconds_between(r['started_at'], r['stopped_at'])), cls='num')]


def link_cell(page, path, uuid, text=None):
    """A short uuid (or `text`) linking to its page; empty without a uuid."""
    return cell(text or short(uuid), page.href(path + uuid) if uuid else '', title=uuid or '')


PILOT_LIST_HEADS = (('id', 'pilot'), ('host', 'host'), ('site', 'site'), (None, 'batch id'),
                    ('state', 'state'), (None, 'job'), ('jobs_done', 'jobs done'),
                    ('registered_at', 'registered'), ('last_seen', 'last seen'),
                    ('stopped_at', 'stopped'), (None, 'life'))


def pilot_cells(page, r):
    return [cell(short(r['uuid']), page.href('/monitor/pilots/' + r['uuid'])),
            cell(r['host']), cell(r['site']), cell(r['extra']),
            cell(r['state'], cls='state ' + r['state']),
            link_cell(page, '/monitor/jobs/', r['job']),
            cell(r['jobs_done'], cls='num'), time_cell(r['registered_at']),
            time_cell(r['last_seen']), time_cell(r['stopped_at']),
            cell(duration(seconds_between(r['registered_at'], r['last_seen'])), cls='num')]


def list_page(title, table, columns, filters, orders, heads, cells, states, fields,
              free_states=False):
    """A listing page; `states` are offered in its form and are the only ones it takes, unless
    `free_states` (data, whose clients add states of their own)."""
    page = Page(title, request.query)
    try:
        with store().read() as db:
            rows, matches, paging = listing(db, table, columns, request.query, filters, orders,
                                            None if free_states else states)
    except Refused as e:
        refused_page(page, e)
    return bottle.template('list', page=page, heads=sort_headers(page, heads, paging['sort']),
                           rows=[cells(page, r) for r in rows],
                           pager=pager(page, matches, paging, len(rows)),
                           form=filter_form(page, states, fields, paging))


@app.get('/monitor/jobs')
def monitor_jobs():
    return list_page('Jobs', 'jobs', MON_JOB_COLUMNS, JOB_FILTERS, MON_JOB_ORDER, JOB_LIST_HEADS,
                     job_cells, JOB_STATES + ('error',),
                     ('jobtype', 'user', 'workflow', 'pilot', 'site'))


@app.get('/monitor/pilots')
def monitor_pilots():
    return list_page('Pilots', 'pilots', PILOT_COLUMNS, PILOT_FILTERS, MON_PILOT_ORDER,
                     PILOT_LIST_HEADS, pilot_cells, PILOT_STATES, ('site', 'host'))


WORKFLOW_LIST_HEADS = (('id', 'workflow'), ('name', 'name'), ('user', 'user'), ('dag', 'DAG'),
                       ('state', 'state'), ('ndone', 'jobs done'), ('created_at', 'created'),
                       ('started_at', 'started'), ('stopped_at', 'stopped'), (None, 'ran'),
                       (None, 'comment'))


def workflow_cells(page, r):
    return [link_cell(page, '/monitor/workflows/', r['uuid']),
            cell(r['name']), cell(r['user']), cell(r['dag'], dag_href(page, r['dag'])),
            cell(r['state'], cls='state ' + r['state']),
            cell('%d of %d' % (r['ndone'], r['nvertices']), cls='num'),
            time_cell(r['created_at']), time_cell(r['started_at']), time_cell(r['stopped_at']),
            cell(duration(seconds_between(r['started_at'], r['stopped_at'])), cls='num'),
            cell(r['comment'])]


def dag_href(page, name):
    return page.href('/monitor/dags/' + urllib.parse.quote(name, safe=''))


DAG_LIST_HEADS = (('name', 'name'), ('user', 'user'), (None, 'description'),
                  ('nvertices', 'vertices'), ('nedges', 'edges'), (None, 'root'),
                  ('created_at', 'registered'), (None, 'workflows'))


def dag_cells(page, r):
    return [cell(r['name'], dag_href(page, r['name'])), cell(r['user']), cell(r['description']),
            cell(r['nvertices'], cls='num'), cell(r['nedges'], cls='num'), cell(r['root']),
            time_cell(r['created_at']),
            cell('its workflows', page.href('/monitor/workflows', dag=r['name']))]


DATA_LIST_HEADS = (('id', 'data'), ('name', 'name'), (None, 'dirpath'), ('datatype', 'type'),
                   ('datatag', 'tag'), ('state', 'state'), (None, 'workflow'), ('source', 'from'),
                   ('target', 'to'), ('created_at', 'created'), ('updated_at', 'updated'),
                   (None, 'comment'))


def data_cells(page, r):
    """A data file; its jobs are named by their vertex, or (a file injected for jobs) by uuid."""
    return [link_cell(page, '/monitor/data/', r['uuid']), cell(r['name']), cell(r['dirpath']),
            cell(r['datatype'], page.href('/monitor/datatypes', name=r['datatype'])
                 if r['datatype'] else ''),
            cell(r['datatag']), cell(r['state'], cls='state ' + r['state']),
            link_cell(page, '/monitor/workflows/', r['workflow']),
            link_cell(page, '/monitor/jobs/', r['sourceuuid'], r['source']),
            link_cell(page, '/monitor/jobs/', r['targetuuid'], r['target']),
            time_cell(r['created_at']), time_cell(r['updated_at']), cell(r['comment'])]


DATATYPE_LIST_HEADS = (('name', 'name'), ('ext', 'ext'), (None, 'comment'),
                       ('created_at', 'registered'), (None, 'data'))


def datatype_cells(page, r):
    return [cell(r['name']), cell(r['ext']), cell(r['comment']), time_cell(r['created_at']),
            cell('its data', page.href('/monitor/data', datatype=r['name']))]


@app.get('/monitor/workflows')
def monitor_workflows():
    return list_page('Workflows', 'workflows', WORKFLOW_COLUMNS, MON_WORKFLOW_FILTERS,
                     MON_WORKFLOW_ORDER, WORKFLOW_LIST_HEADS, workflow_cells, WORKFLOW_STATES,
                     ('user', 'dag', 'name'))


@app.get('/monitor/dags')
def monitor_dags():
    return list_page('DAGs', 'dags', DAG_COLUMNS, MON_DAG_FILTERS, MON_DAG_ORDER, DAG_LIST_HEADS,
                     dag_cells, (), ('name', 'user'))


@app.get('/monitor/data')
def monitor_data():
    return list_page('Data', 'data', DATA_COLUMNS, DATA_FILTERS, MON_DATA_ORDER,
                     DATA_LIST_HEADS, data_cells, DATA_STATES,
                     ('workflow', 'datatype', 'name'), free_states=True)


@app.get('/monitor/datatypes')
def monitor_datatypes():
    return list_page('Datatypes', 'datatypes', MON_DATATYPE_COLUMNS, MON_NAME_FILTER,
                     MON_DATATYPE_ORDER, DATATYPE_LIST_HEADS, datatype_cells, (), ('name',))


SITE_LIST_HEADS = (('name', 'site'), (None, 'period'), (None, 'cycles'), (None, 'beat'),
                   (None, 'wait'), ('pilots', 'pilots (nominal)'), ('lifetime', 'lifetime'),
                   (None, 'env'), (None, 'comment'), ('updated_at', 'updated'),
                   (None, 'its pilots'), (None, 'its jobs'), (None, 'its batch jobs'))


def site_cells(page, r):
    return [cell(r['name']), cell(r['period'], cls='num'), cell(r['cycles'], cls='num'),
            cell(r['beat'], cls='num'), cell(r['wait'], cls='num'), cell(r['pilots'], cls='num'),
            cell(duration(r['lifetime']), cls='num'), cell(r['env']), cell(r['comment']),
            time_cell(r['updated_at']),
            cell('pilots', page.href('/monitor/pilots', site=r['name'])),
            cell('jobs', page.href('/monitor/jobs', site=r['name'])),
            cell('batch jobs', page.href('/monitor/batchjobs', site=r['name']))]


BATCH_LIST_HEADS = (('id', 'batch job'), ('site', 'site'), ('state', 'state'), (None, 'pilot'),
                    (None, 'pilot state'), ('host', 'host'), (None, 'reason'),
                    ('submitted_at', 'submitted'), ('started_at', 'started'),
                    ('ended_at', 'ended'), (None, 'waited'))


def batch_cells(page, r):
    bad = ' bad' if r['state'] in ('failed', 'never_registered') else ''
    return [cell('%s:%s' % (r['system'], r['batchid']),
                 page.href('/monitor/batchjobs/%d' % r['id'])),
            cell(r['site']), cell(r['state'], cls='state ' + r['state'] + bad),
            cell(short(r['pilot']),
                 page.href('/monitor/pilots/' + r['pilot']) if r['pilot'] else ''),
            cell(r['pilot_state'], cls='state ' + (r['pilot_state'] or '')), cell(r['host']),
            cell(r['reason'], cls='wrap'), cell(local_time(r['submitted_at'])),
            cell(local_time(r['started_at'])), cell(local_time(r['ended_at'])),
            cell(duration(seconds_between(r['submitted_at'], r['started_at'])), cls='num')]


SERVICE_LIST_HEADS = (('created_at', 'time'), ('name', 'service'), (None, 'message'))


def service_cells(page, r):
    return [time_cell(r['created_at']),
            cell(r['name'], page.href('/monitor/services', name=r['name'])),
            cell(r['message'], cls='wrap')]


@app.get('/monitor/sites')
def monitor_sites():
    return list_page('Sites', 'sites', MON_SITE_COLUMNS, MON_NAME_FILTER, MON_SITE_ORDER,
                     SITE_LIST_HEADS, site_cells, (), ('name',))


@app.get('/monitor/batchjobs')
def monitor_batchjobs():
    return list_page('Batch jobs', 'batchjobs', BATCH_LIST_COLUMNS, BATCH_FILTERS,
                     MON_BATCH_ORDER, BATCH_LIST_HEADS, batch_cells, BATCH_STATES,
                     ('site', 'system', 'host'))


@app.get('/monitor/services')
def monitor_services():
    return list_page('Service messages', 'services', MON_SERVICE_COLUMNS, MON_NAME_FILTER,
                     MON_SERVICE_ORDER, SERVICE_LIST_HEADS, service_cells, (), ('name',))


# -- detail pages --


def field_rows(page, obj, links):
    """(name, text, href) for every field; times in local time, JSON pretty-printed."""
    out = []
    for key, value in obj.items():
        if key.endswith('_at') or key == 'last_seen':
            value = local_time(value)
        elif isinstance(value, (dict, list)):
            value = json.dumps(value, indent=1, sort_keys=True)
        href = page.href(links[key] % urllib.parse.quote(value, safe='')) if key in links \
            and value else ''
        out.append((key, '' if value is None else str(value), href))
    return out


@app.get('/monitor/jobs/<job_uuid>')
def monitor_job(job_uuid):
    """Every field of a job, how long it waited and ran, why it waits if it is queued (the
    claim's own reasons), its attempts, and the tails of its output."""
    page = Page('Job', request.query)
    try:
        job = get_job(store(), job_uuid, logs=True)
    except Refused:
        not_found(page, 'job', job_uuid)
    logs = [(name, job.pop(name)) for name in ('stdout', 'stderr')]
    waiting = job.pop('waiting')
    page.title = 'Job %s' % (job['name'] or short(job['uuid']))
    times = [('waited (defined → started)', duration(seconds_between(job['defined_at'],
                                                                     job['started_at']))),
             ('ran (started → stopped)', duration(seconds_between(job['started_at'],
                                                                  job['stopped_at'])))]
    notice = waiting and {'title': 'Why it is not running: %s %s, since %s' % (
        job['state'], duration(waiting['seconds']), local_time(waiting['since'])),
        'lines': [r['text'] for r in waiting['reasons']]}
    links = {'pilot': '/monitor/pilots/%s', 'workflow': '/monitor/workflows/%s',
             'retry_of': '/monitor/jobs/%s', 'retried_by': '/monitor/jobs/%s'}
    return bottle.template('detail', page=page, fields=field_rows(page, job, links), extra=times,
                           logs=logs, graph=None, tables=[], notice=notice)


@app.get('/monitor/data/<data_uuid>')
def monitor_data_file(data_uuid):
    """A data file: every field, its workflow, the jobs that write and read it, its type."""
    page = Page('Data', request.query)
    try:
        data = get_data(store(), data_uuid)
    except Refused:
        not_found(page, 'data file', data_uuid)
    page.title = 'Data %s' % data['name']
    links = {'workflow': '/monitor/workflows/%s', 'sourceuuid': '/monitor/jobs/%s',
             'targetuuid': '/monitor/jobs/%s', 'datatype': '/monitor/datatypes?name=%s'}
    return bottle.template('detail', page=page, fields=field_rows(page, data, links), extra=[],
                           logs=[], graph=None, tables=[])


@app.get('/monitor/pilots/<pilot_uuid>')
def monitor_pilot(pilot_uuid):
    page = Page('Pilot', request.query)
    row = store().one(GET_PILOT, {'uuid': pilot_uuid.lower()})
    if row is None:
        not_found(page, 'pilot', pilot_uuid)
    pilot = pilot_dict(row)
    page.title = 'Pilot %s on %s' % (short(pilot['uuid']), pilot['host'] or '?')
    jobs = store().query(MON_PILOT_JOBS, {'pilot': pilot['uuid'], 'limit': MON_DETAIL_ROWS})
    table = plain_table(page, 'Its jobs (newest first)', page.href('/monitor/jobs',
                                                                   pilot=pilot['uuid']),
                        JOB_LIST_HEADS, job_cells, jobs)
    life = [('life (registered → last seen)',
             duration(seconds_between(pilot['registered_at'], pilot['last_seen'])))]
    batch = store().query(MON_PILOT_BATCHJOBS, {'pilot': pilot['uuid']})
    tables = [plain_table(page, 'Its batch job', '', BATCH_LIST_HEADS, batch_cells, batch)] \
        if batch else []
    return bottle.template('detail', page=page, extra=life, logs=[], graph=None,
                           tables=tables + [table],
                           fields=field_rows(page, pilot, {'job': '/monitor/jobs/%s'}))


@app.get('/monitor/batchjobs/<batchjob_id:int>')
def monitor_batchjob(batchjob_id):
    page = Page('Batch job', request.query)
    row = find_batchjob(store(), batchjob_id)
    if row is None:
        not_found(page, 'batch job', str(batchjob_id))
    job = dict(row)
    output = job.pop('output')
    page.title = 'Batch job %s:%s of %s' % (job['system'], job['batchid'], job['site'])
    times = [('waited (submitted → started)',
              duration(seconds_between(job['submitted_at'], job['started_at']))),
             ('ran (started → ended)', duration(seconds_between(job['started_at'],
                                                                job['ended_at'])))]
    links = {'pilot': '/monitor/pilots/%s', 'site': '/monitor/batchjobs?site=%s'}
    logs = [('output', output)] if job['state'] == 'never_registered' else []
    return bottle.template('detail', page=page, fields=field_rows(page, job, links), extra=times,
                           logs=logs, graph=None, tables=[])


def plain_table(page, title, more, heads, cells, rows):
    """A table of a detail page: unsorted headers, with a link to the full listing."""
    return {'title': title, 'more': more,
            'heads': sort_headers(page, [(None, label) for _, label in heads], None),
            'rows': [cells(page, r) for r in rows]}


@app.get('/monitor/workflows/<wf_uuid>')
def monitor_workflow(wf_uuid):
    page = Page('Workflow', request.query)
    params = {'workflow': wf_uuid.lower()}
    with store().read() as db:
        row = db.execute(GET_WORKFLOW, params).fetchone()
        jobs = db.execute(MON_WORKFLOW_JOBS, params).fetchall()
        data = db.execute(GET_WORKFLOW_DATA, params).fetchall()
    if row is None:
        not_found(page, 'workflow', wf_uuid)
    wf = dict(row)
    page.title = 'Workflow %s' % (wf['name'] or short(wf['uuid']))
    links = {'dag': '/monitor/dags/%s', 'rootuuid': '/monitor/jobs/%s'}
    ran = [('ran (started → stopped)', duration(seconds_between(wf['started_at'],
                                                                 wf['stopped_at'])))]
    tables = [plain_table(page, 'Its jobs', page.href('/monitor/jobs', workflow=wf['uuid']),
                          JOB_LIST_HEADS, job_cells, jobs),
              plain_table(page, 'Its data', page.href('/monitor/data', workflow=wf['uuid']),
                          DATA_LIST_HEADS, data_cells, data)]
    return bottle.template('detail', page=page, fields=field_rows(page, wf, links), extra=ran,
                           logs=[], graph=workflow_graph(page, jobs, data), tables=tables)


@app.get('/monitor/dags/<name:path>')
def monitor_dag(name):
    page = Page('DAG', request.query)
    with store().read() as db:
        found = db.execute(GET_DAG, {'name': name}).fetchone()
        dag = found and load_dag(db, name)
        workflows = db.execute(MON_DAG_WORKFLOWS, {'dag': name, 'limit': MON_DETAIL_ROWS})
        workflows = workflows.fetchall()
    if found is None:
        not_found(page, 'DAG', name)
    page.title = 'DAG %s' % name
    fields = {k: v for k, v in dag.items() if k not in ('graphml', 'vertices', 'edges')}
    tables = [plain_table(page, 'Its vertices (in topological order)', '', VERTEX_HEADS,
                          vertex_cells, dag['vertices']),
              plain_table(page, 'Its edges (the data between the jobs)', '', EDGE_HEADS,
                          edge_cells, dag['edges']),
              plain_table(page, 'Workflows made from it (newest first)',
                          page.href('/monitor/workflows', dag=name), WORKFLOW_LIST_HEADS,
                          workflow_cells, workflows)]
    return bottle.template('detail', page=page, fields=field_rows(page, fields, {}), extra=[],
                           logs=[], graph=dag_graph(dag), tables=tables)


VERTEX_HEADS = tuple((None, h) for h in ('vertex', 'jobtype', 'payload', 'env', 'timelimit',
                                         'priority'))
EDGE_HEADS = tuple((None, h) for h in ('from', 'to', 'name', 'dirpath', 'datatype', 'datatag',
                                       'comment'))


def vertex_cells(page, v):
    return [cell(v['name']), cell(v['jobtype']), cell(v['payload']),
            cell(json.dumps(v['env'], sort_keys=True)), cell(v['timelimit'], cls='num'),
            cell(v['priority'], cls='num')]


def edge_cells(page, e):
    return [cell(e['source']), cell(e['target']), cell(e['name']), cell(e['dirpath']),
            cell(e['datatype'], page.href('/monitor/datatypes', name=e['datatype'])
                 if e['datatype'] else ''),
            cell(e['datatag']), cell(e['comment'])]


# -- the graph of a DAG or workflow, drawn as inline SVG --

GRAPH_NODE_W, GRAPH_NODE_H = 150, 34
GRAPH_GAP, GRAPH_LAYER, GRAPH_MARGIN = 30, 100, 24
GRAPH_LABEL = 20                 # characters of a name shown in its node; all of it on hover
GRAPH_PARALLEL = 50              # pixels between the middles of parallel edges
GRAPH_VIRTUAL_W = 20             # width of the lane an edge takes through a layer it skips
GRAPH_EDGE_STATES = ('template', 'defined', 'available')


@app.get('/static/<path:path>')
def monitor_static(path):
    return bottle.static_file(path, root=os.path.join(SERVER_FILES, 'static'))

# ---------------------------------------------------------------------------------------------
# Monitor graph layout
# ---------------------------------------------------------------------------------------------

def workflow_graph(page, jobs, data):
    """Nodes are the jobs (the latest attempt of each), coloured by state and linking to their
    pages; edges are the data."""
    retried = {j['retry_of'] for j in jobs}
    jobs = [j for j in jobs if j['uuid'] not in retried]
    nodes = {j['name']: {'cls': j['state'], 'href': page.href('/monitor/jobs/' + j['uuid']),
                         'title': '%s: %s (job %s)' % (j['name'], j['state'], j['uuid'])}
             for j in jobs}
    edges = [(d['source'], d['target'], d['datatag'] or d['name'],
              d['state'] if d['state'] in GRAPH_EDGE_STATES else 'other',
              '%s (%s) %s → %s: %s' % (d['name'], d['datatype'], d['source'], d['target'],
                                       d['state'])) for d in data]
    states = [j['state'] for j in jobs]
    legend = [('swatch', st, st, states.count(st)) for st in JOB_STATES if st in states]
    flows = [e[3] for e in edges]
    legend += [('line', st, 'data ' + st, flows.count(st))
               for st in GRAPH_EDGE_STATES + ('other',) if st in flows]
    return graph_view(nodes, edges, legend)


def dag_graph(dag):
    """A DAG's vertices (noops apart) and edges, labelled with their data tags."""
    nodes = {v['name']: {'cls': 'noop' if v['jobtype'] == NOOP else 'vertex', 'href': '',
                         'title': '%s (%s): %s' % (v['name'], v['jobtype'], v['payload'])}
             for v in dag['vertices']}
    edges = [(e['source'], e['target'], e['datatag'] or e['name'], 'template',
              '%s (%s) %s → %s' % (e['name'], e['datatype'], e['source'], e['target']))
             for e in dag['edges']]
    kinds = [n['cls'] for n in nodes.values()]
    legend = [('swatch', k, label, kinds.count(k)) for k, label in (('vertex', 'job'),
                                                                   ('noop', NOOP)) if k in kinds]
    legend += [('line', 'template', 'data', len(edges))] if edges else []
    return graph_view(nodes, edges, legend)


def graph_layers(graph):
    """Vertices in layers, top-down: each vertex one layer below its lowest parent (networkx's
    topological generations). An edge that skips layers passes through a virtual vertex in each
    layer between, so it is routed around the real ones. Within a layer, vertices are ordered
    by the mean position of their parents, then of their children, which uncrosses most edges.
    Returns (layers, {(source, target): [virtual vertices]})."""
    depth = {v: d for d, layer in enumerate(networkx.topological_generations(graph))
             for v in layer}
    flat = networkx.DiGraph()
    flat.add_nodes_from(graph)
    chains = {}
    for source, target in dict.fromkeys(graph.edges()):
        hops = [source] + [('', source, target, d) for d in range(depth[source] + 1,
                                                                   depth[target])] + [target]
        chains[source, target] = hops[1:-1]
        depth.update((v, depth[source] + i) for i, v in enumerate(hops))
        networkx.add_path(flat, hops)
    layers = [[] for _ in range(max(depth.values()) + 1)]
    for v in flat:
        layers[depth[v]].append(v)
    rank = {}

    def place(layer):
        rank.update((v, i - (len(layer) - 1) / 2) for i, v in enumerate(layer))

    def mean_rank(v, neighbours):
        near = [rank[n] for n in neighbours(v)]
        return sum(near) / len(near) if near else rank[v]

    for layer in layers:
        place(layer)
    for sweep, neighbours in ((layers[1:], flat.predecessors), (layers[-2::-1], flat.successors)):
        for layer in sweep:
            layer.sort(key=lambda v: mean_rank(v, neighbours))
            place(layer)
    return layers, chains


def slot(v):
    """Room taken in its layer: a vertex, or a virtual one that only lets edges pass."""
    return (GRAPH_VIRTUAL_W if isinstance(v, tuple) else GRAPH_NODE_W) + GRAPH_GAP


def graph_view(nodes, edges, legend):
    """Geometry for the graph template. nodes: {name: {cls, href, title}}; edges: [(source,
    target, label, cls, title)], parallel edges allowed (drawn as separate curves); legend:
    [(swatch|line, cls, label, count)]."""
    if not nodes:
        return None
    if len(nodes) > MON_GRAPH_MAX:
        return {'too_big': len(nodes), 'legend': legend}
    graph = networkx.MultiDiGraph()
    graph.add_nodes_from(nodes)
    edges = [e for e in edges if e[0] in nodes and e[1] in nodes]
    graph.add_edges_from((e[0], e[1]) for e in edges)
    layers, chains = graph_layers(graph)
    width = max(sum(slot(v) for v in layer) for layer in layers) - GRAPH_GAP + 2 * GRAPH_MARGIN
    height = (len(layers) - 1) * GRAPH_LAYER + GRAPH_NODE_H + 2 * GRAPH_MARGIN
    middle = {}                                   # x of the middle of each (virtual) vertex
    for depth, layer in enumerate(layers):
        x = (width - sum(slot(v) for v in layer) + GRAPH_GAP) / 2
        for v in layer:
            middle[v] = (x + (slot(v) - GRAPH_GAP) / 2, GRAPH_MARGIN + depth * GRAPH_LAYER)
            x += slot(v)
    out_nodes = [dict(nodes[v], x=round(x - GRAPH_NODE_W / 2, 1), y=y, w=GRAPH_NODE_W,
                      h=GRAPH_NODE_H, tx=round(x, 1), ty=y + GRAPH_NODE_H / 2 + 4,
                      label=clip(v, GRAPH_LABEL)) for v, (x, y) in middle.items() if v in nodes]
    curves = edge_curves(edges, middle, chains)
    # Parallel edges bend outwards and may reach past the vertices: the view box takes them in.
    left = min([0] + [e['lx'] - 4 * len(e['label']) - 8 for e in curves])
    right = max([width] + [e['lx'] + 4 * len(e['label']) + 8 for e in curves])
    return {'too_big': 0, 'x0': round(left), 'w': round(right - left), 'h': height,
            'nodes': out_nodes, 'edges': curves, 'legend': legend}


def edge_curves(edges, middle, chains):
    """Each edge a path from the bottom of its source through its virtual vertices to the top
    of its target, curved between layers; the k-th of n parallel edges is moved aside by
    (k - (n-1)/2) * GRAPH_PARALLEL. The label sits in the middle gap between layers, those of
    parallel edges at different heights so that they do not overlap."""
    pairs = {}
    for e in edges:
        pairs.setdefault((e[0], e[1]), []).append(e)
    out = []
    for (source, target), group in pairs.items():
        for k, (_, _, label, cls, title) in enumerate(group):
            aside = k - (len(group) - 1) / 2
            bend, t = aside * GRAPH_PARALLEL, min(max(0.5 + aside * 0.2, 0.15), 0.85)
            (x1, y1), (x2, y2) = middle[source], middle[target]
            points = [(x1, y1 + GRAPH_NODE_H, bend)]
            for v in chains[source, target]:
                x, y = middle[v]
                points += [(x + bend, y, 0), (x + bend, y + GRAPH_NODE_H, 0)]
            points.append((x2, y2, bend))
            d = ['M %.1f %.1f' % points[0][:2]]
            gaps = []
            for i in range(len(points) - 1):
                (ax, ay, ab), (bx, by, bb) = points[i], points[i + 1]
                if i % 2:                         # straight down through a virtual vertex
                    d.append('L %.1f %.1f' % (bx, by))
                    continue
                ym = (ay + by) / 2
                d.append('C %.1f %.1f %.1f %.1f %.1f %.1f' % (ax + ab, ym, bx + bb, ym, bx, by))
                gaps.append(((ax, ay), (ax + ab, ym), (bx + bb, ym), (bx, by)))
            lx, ly = bezier(gaps[len(gaps) // 2], t)
            out.append({'d': ' '.join(d), 'lx': round(lx, 1), 'ly': round(ly + 4, 1),
                        'label': clip(label, 16), 'cls': cls, 'title': title})
    return out


def bezier(points, t):
    """The point at t of a cubic Bézier curve."""
    weights = ((1 - t) ** 3, 3 * (1 - t) ** 2 * t, 3 * (1 - t) * t ** 2, t ** 3)
    return tuple(sum(w * p[i] for w, p in zip(weights, points)) for i in (0, 1))


def clip(text, n):
    return text if len(text) <= n else text[:n - 1] + '…'
# ---------------------------------------------------------------------------------------------
# Authorization
# ---------------------------------------------------------------------------------------------

# What the shared pilot token may change: a pilot's registration, nothing else. A pilot's own
# calls (its work, reports, heartbeats and exit) carry its own secret instead, which their
# routes check (own_pilot), whether or not the server has tokens.
PILOT_REGISTRATION = '/api/pilots'
PILOT_OWN_PATH = re.compile(r'^/api/pilots/[^/]+/(work|report|heartbeat|stop)\Z')


def bearer_token():
    auth = request.get_header('Authorization', '')
    return auth[7:].strip() if auth[:7].lower() == 'bearer ' else ''


def token_matches(given, expected):
    return bool(expected) and hmac.compare_digest(given.encode(), expected.encode())


@app.hook('before_request')
def authorize():
    """With a token set, every state-changing call (and with --private every call) needs
    `Authorization: Bearer <token>`; the pilot token opens a pilot's registration (and reads)
    only; a pilot's own calls need its own secret, whatever the server's tokens."""
    token, pilot_token = app.config.get('p3s.token'), app.config.get('p3s.pilot_token')
    if not token or PILOT_OWN_PATH.match(request.path):
        return
    reading = request.method in ('GET', 'HEAD')
    if reading and not app.config.get('p3s.private'):
        return
    given = bearer_token()
    if token_matches(given, token):
        return
    if token_matches(given, pilot_token) and (reading or request.path == PILOT_REGISTRATION):
        return
    # A hook runs outside the route plugins, so it raises the framework's error itself.
    raise HTTPError(401, 'this call needs a valid token: Authorization: Bearer <token>',
                    **{'WWW-Authenticate': 'Bearer'})


@app.hook('before_request')
def refuse_nul_characters():
    """PostgreSQL cannot store a NUL character: a path or a query that carries one is refused
    on either database. (In a body, names and values are checked field by field, and a job's
    output is stored with its NULs replaced.)"""
    for where, text in (('path', request.path),
                        ('query', urllib.parse.unquote(request.query_string))):
        if '\x00' in text:
            raise HTTPError(400, NUL_REFUSED % where)


# ---------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------


def json_error(err):
    """Every error answers {"error": "..."}; a 500 is logged with its traceback."""
    response.content_type = 'application/json'
    if err.status_code >= 500 and err.status_code != 503:
        log.error('internal error on %s %s: %s\n%s', request.method, request.path,
                  err.exception, err.traceback)
        return json.dumps({'error': 'internal server error'})
    if isinstance(err.body, str) and err.body:
        message = err.body
    else:
        message = err.status_line
    return json.dumps({'error': message})


for _code in (400, 401, 403, 404, 405, 409, 413, 500, 503):
    app.error(_code)(json_error)


@app.hook('after_request')
def no_sniffing():
    """Every answer is what its Content-Type says: a browser must not take an error that echoes
    the request (a 404 naming its path) for HTML."""
    response.set_header('X-Content-Type-Options', 'nosniff')


def domain_errors(callback):
    """The one place where the domain's refusals become HTTP errors. A constraint the
    validation missed is a conflict with stored data, not a crash."""
    def wrapper(*args, **kwargs):
        try:
            return callback(*args, **kwargs)
        except Refused as e:
            raise HTTPError(e.status, e.message)
        except NotSynced as e:
            # Every request a client repeats is one the server knows again (a submission by
            # its uuids, a report by its job): asking again is safe, and makes a new sync.
            log.error('%s %s: %s', request.method, request.path, e)
            raise HTTPError(503, str(e), **{'Retry-After': str(STORAGE_RETRY_AFTER)})
        except Exception as e:
            dialect = store().db
            if isinstance(e, dialect.conflicts):
                # PostgreSQL adds DETAIL lines: an error stays one line
                raise HTTPError(409, 'conflicts with stored data: %s' % ' '.join(str(e).split()))
            reason = dialect.trouble(e)
            if reason is None:
                raise                                   # a bug: a 500, with its traceback
            log.warning('%s %s answered 503: %s', request.method, request.path, first_line(e))
            raise HTTPError(503, 'the database cannot take this request now: %s; nothing was '
                            'changed, try again in %d s' % (reason, STORAGE_RETRY_AFTER),
                            **{'Retry-After': str(STORAGE_RETRY_AFTER)})
    return wrapper


# SQLite's primary result codes that say the storage is in trouble, not the request: the same
# request may succeed later, and the transaction it was in was rolled back whole.
STORAGE_TROUBLE = {5: 'it is locked by another process', 6: 'a table is locked',
                   7: 'the server is out of memory', 8: 'it is read-only',
                   10: 'a disk I/O error', 11: 'it is damaged (p3s_server.py check)',
                   13: 'the disk is full', 14: 'its file cannot be opened',
                   15: 'its lock protocol failed', 26: 'its file is not a database'}
# The same errors by SQLite's message, for a Python without sqlite_errorcode (before 3.11).
STORAGE_MESSAGES = {'database is locked': 5, 'database table is locked': 6, 'out of memory': 7,
                    'attempt to write a readonly database': 8, 'disk I/O error': 10,
                    'database disk image is malformed': 11, 'database or disk is full': 13,
                    'unable to open database file': 14, 'locking protocol': 15,
                    'file is not a database': 26}


def storage_trouble(error):
    """The reason an SQLite error makes a request fail for now (a 503), or None for any other
    error (a bug)."""
    if not isinstance(error, sqlite3.Error):
        return None
    code = getattr(error, 'sqlite_errorcode', None)
    if code is None:
        code = STORAGE_MESSAGES.get(str(error))
    return STORAGE_TROUBLE.get(code & 0xff) if code is not None else None


app.install(domain_errors)

# ---------------------------------------------------------------------------------------------
# Front: connections, deadlines, thread pools, held long polls
# ---------------------------------------------------------------------------------------------

# The front is gevent's WSGI server: every connection is a greenlet, so a client that connects
# and sends nothing, sends slowly, or waits in a long poll costs a file descriptor and a few
# kilobytes, never a thread. Requests run in small thread pools (one for reads, one for writes,
# so reads never queue behind the write lock), except ping and static files, which need no
# database and run at once. A pilot's work request that finds nothing is held here, in its
# greenlet, and asked again when a wake-up comes (from this process or another) or its wait is
# over.

INLINE_PATHS = re.compile(r'^/(api/ping|api|static/.*)$')
WORK_PATH = re.compile(r'^/api/pilots/[^/]+/work$')


class RequestTooSlow(Exception):
    """A request's line and headers did not arrive within the request timeout."""


class Handler(gevent.pywsgi.WSGIHandler):
    """gevent's HTTP handler with deadlines: the line and headers of a request must arrive
    within the request timeout of its first byte; a connection idle for the keep-alive timeout
    is closed."""

    deadline = None

    def handle(self):
        self.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        super().handle()

    def read_requestline(self):
        if not self.server.wait_for_request(self):
            return ''
        self.deadline = gevent.Timeout.start_new(self.server.request_timeout, RequestTooSlow)
        try:
            return super().read_requestline()
        except RequestTooSlow:
            return ''                                   # closes the connection

    def read_request(self, raw_requestline):
        try:
            return super().read_request(raw_requestline)
        finally:
            self.deadline.cancel()

    def handle_one_request(self):
        try:
            result = super().handle_one_request()
        finally:
            if self.deadline is not None:
                self.deadline.cancel()
                self.deadline = None
        if isinstance(result, tuple):         # gevent refused the request line or headers
            return result[0], raw_refusal(result[0])
        return result

    def _write_with_headers(self, data):
        """The status line, headers and body in one write. gevent writes the headers, then the
        body: the client then waits for a second packet (about 0.15 ms here), and the server
        makes two system calls where one does."""
        head = []
        self._sendall = head.append               # the headers, as gevent makes them
        try:
            super()._write_with_headers(b'')      # an empty body is not written
        finally:
            del self._sendall
        if data and not self.response_use_chunked:
            self._sendall(b''.join(head) + data)
        else:
            self._sendall(b''.join(head))
            self._write(data)


# What gevent refuses before a request reaches the app, said in p3s's error shape.
FRONT_REFUSALS = {'414': ('414 Request-URI Too Long', 'request line longer than %d bytes'
                          % gevent.pywsgi.MAX_REQUEST_LINE),
                  '400': ('400 Bad Request', 'malformed request line or headers')}


def raw_refusal(status):
    """A whole HTTP response (status line, headers, JSON body) that closes the connection."""
    line, message = FRONT_REFUSALS.get(status, FRONT_REFUSALS['400'])
    body = json.dumps({'error': message}).encode()
    return (('HTTP/1.1 %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n'
             'X-Content-Type-Options: nosniff\r\nConnection: close\r\n\r\n')
            % (line, len(body))).encode() + body


class FrontServer(gevent.pywsgi.WSGIServer):
    """The WSGI server of one process, knowing which of its connections are idle, so that it
    can close them at once when it stops."""

    handler_class = Handler

    def __init__(self, listener, front, request_timeout=REQUEST_TIMEOUT,
                 keepalive_timeout=KEEPALIVE_TIMEOUT):
        super().__init__(listener, front, spawn=gevent.pool.Pool(MAX_CONNECTIONS), log=None,
                         error_log=logging.getLogger('p3s.front'))
        self.request_timeout, self.keepalive_timeout = request_timeout, keepalive_timeout
        self.idle = set()

    def wait_for_request(self, handler):
        """Wait for the first byte of the next request; False if none comes in time."""
        me = gevent.getcurrent()
        self.idle.add(me)
        try:
            with gevent.Timeout(self.keepalive_timeout, False):
                return bool(handler.rfile.peek(1))
            return False
        except (OSError, gevent.GreenletExit):
            return False
        finally:
            self.idle.discard(me)

    def close_idle(self):
        gevent.killall(list(self.idle), block=False)


class Waiter:
    __slots__ = ('site', 'jobtypes', 'ends', 'event')

    def __init__(self, site, jobtypes, ends=None):
        self.site = site
        self.jobtypes = jobtypes
        self.ends = ends              # when a batch pilot must be gone (the clock's time), or None
        self.event = gevent.event.Event()

    def accepts(self, jobtype, site):
        return ((not site or site == self.site)
                and (jobtype is None or not self.jobtypes or jobtype in self.jobtypes))


class Waiters:
    """The pilots this process holds in a long poll. A wake-up wakes, for each runnable job,
    one held pilot that may run it: not all of them, which would be a thundering herd
    (docs/performance.md). `seq` counts wake-ups, so that a request that found nothing just
    before a wake-up came does not wait for the next one."""

    def __init__(self, limit):
        self.limit = limit
        # In the order they are woken: pilots without an end first, in their order of arrival
        # (a dict: added and removed in constant time, thousands of them held at once), then
        # those with an end, the latest end first.
        self.endless = {}
        self.ending = []                # (-ends, arrival, waiter), sorted
        self.arrivals = itertools.count()
        self.seq = 0
        self.woken = 0                  # pilots woken so far

    def wait(self, site, jobtypes, timeout, seq, ends=None):
        """Wait for a job for this pilot, unless a wake-up came since `seq`; whether it was
        woken for one (False: the wait ended, or a wake-up came before it). The pilots that
        will be gone later are woken first (those without an end before all): a woken pilot
        with too little time left for the job would leave it for the next poll."""
        waiter = Waiter(site, set(jobtypes), ends)
        place = None if ends is None else (-ends, next(self.arrivals), waiter)
        if place is None:
            self.endless[waiter] = None
        else:
            bisect.insort(self.ending, place)
        process_metrics().long_polls_held(+1)
        try:
            return self.seq == seq and waiter.event.wait(timeout)
        finally:
            if place is None:
                del self.endless[waiter]
            else:
                self.ending.remove(place)
            process_metrics().long_polls_held(-1)

    def waiting(self):
        return itertools.chain(self.endless, (waiter for _, _, waiter in self.ending))

    def wake(self, kinds):
        """kinds: (jobtype or None for any, site, count) of the jobs that became runnable.
        Returns those of the jobs for which no pilot held here was woken."""
        self.seq += 1
        left = []
        for jobtype, site, count in kinds:
            for waiter in self.waiting():
                if count <= 0:
                    break
                if not waiter.event.is_set() and waiter.accepts(jobtype, site):
                    waiter.event.set()
                    self.woken += 1
                    count -= 1
            if count > 0:
                left.append((jobtype, site, count))
        return left

    def wake_all(self):
        self.seq += 1
        for waiter in self.waiting():
            waiter.event.set()

    def __len__(self):
        return len(self.endless) + len(self.ending)


class HeldPoll:
    """One pilot's work request while the front holds it (wait_for_work is its other half)."""

    def __init__(self, front):
        self.front = front
        self.deadline = None
        self.ends = None            # when a batch pilot must be gone (by the front's clock)
        self.held = False           # it has waited at least once
        self.note = None            # the first attempt's answer on the report it carried
        self.asked = None           # (site, jobtypes, ends): the last attempt asked to be held
        self.pilot = None           # the pilot as the last attempt found it

    def carry_note(self, reply):
        """The answer on the report travels with the final reply, whichever attempt gives it."""
        if 'report' in reply:
            self.note = reply['report']
        elif self.note is not None:
            reply = dict(reply, report=self.note)
        return reply

    def time_left(self, left):
        """A batch pilot's time left: as it said at first, less the time it has been held."""
        if self.ends is None:
            return left
        return max(self.ends - self.front.clock(), 0.0)

    def hold(self, wait, site, jobtypes, left=None):
        if self.deadline is None:
            self.deadline = self.front.clock() + wait
            self.ends = None if left is None else self.front.clock() + left
        if self.front.closing or self.remaining() <= 0:
            return False
        if len(self.front.waiters) >= self.front.waiters.limit:
            process_metrics().long_polls_refused.inc()
            return False
        self.asked = (site, jobtypes, self.ends)
        return True

    def remaining(self):
        return self.deadline - self.front.clock()


class BadBody(Exception):
    def __init__(self, status, message):
        super().__init__(message)
        self.status = status


def read_body(environ):
    """The whole request body, read here in the connection's greenlet with a deadline that
    allows MIN_BODY_RATE, so that a slow body costs its client's connection only."""
    length = environ.get('CONTENT_LENGTH')
    chunked = environ.get('HTTP_TRANSFER_ENCODING', '').lower() == 'chunked'
    if not length and not chunked:
        return b''
    size = int(length) if length else MAX_BODY
    if size > MAX_BODY:
        raise BadBody('413 Payload Too Large', 'request body larger than %d bytes' % MAX_BODY)
    with gevent.Timeout(REQUEST_TIMEOUT + size / MIN_BODY_RATE, False):
        data = environ['wsgi.input'].read(size if length else MAX_BODY + 1)
        if len(data) > MAX_BODY:
            raise BadBody('413 Payload Too Large', 'request body larger than %d bytes'
                          % MAX_BODY)
        if length and len(data) < size:
            raise BadBody('400 Bad Request', 'request body shorter than its Content-Length')
        return data
    raise BadBody('408 Request Timeout', 'request body arrived too slowly')


def run_wsgi(app, environ):
    """Call a WSGI app to its end in this thread: (status, headers, body bytes)."""
    started = []

    def start_response(status, headers, exc_info=None):
        started[:] = [status, headers]
        return lambda data: None

    result = app(environ, start_response)
    try:
        body = b''.join(result)
    finally:
        if hasattr(result, 'close'):
            result.close()
    return started[0], started[1], body


def json_reply(start_response, status, message, close=False, retry_after=None):
    headers = ([('Content-Type', 'application/json'), ('X-Content-Type-Options', 'nosniff')]
               + ([('Connection', 'close')] if close else []))
    if retry_after is not None:
        headers.append(('Retry-After', str(retry_after)))
    start_response(status, headers)
    return [json.dumps({'error': message}).encode()]


class Front:
    """The WSGI callable of one server process, run in each connection's greenlet."""

    def __init__(self, app, threads=DEFAULT_THREADS, write_threads=WRITE_THREADS,
                 max_waiters=DEFAULT_MAX_WAITERS, clock=time.monotonic):
        self.app = app
        self.readers = gevent.threadpool.ThreadPool(threads)
        self.writers = gevent.threadpool.ThreadPool(write_threads)
        self.waiters = Waiters(max_waiters)
        self.clock = clock
        self.closing = False

    def __call__(self, environ, start_response):
        path = environ.get('PATH_INFO', '')
        if INLINE_PATHS.match(path):
            return self.app(environ, start_response)       # no database: no thread needed
        environ['p3s.arrived'] = utcnow()
        try:
            body = read_body(environ)
        except BadBody as e:
            return json_reply(start_response, e.status, str(e), close=True)
        reading = environ['REQUEST_METHOD'] in ('GET', 'HEAD')
        woken = None if reading else self.waiters.woken
        try:
            if not reading and WORK_PATH.match(path):
                status, headers, out = self.serve_work(environ, body)
            else:
                status, headers, out = self.run(self.readers if reading else self.writers,
                                                environ, body)
        except Exception:
            # The app answers its own errors; this is the front failing (a process stopping,
            # its threads gone): the client may ask again, of this server or another.
            log.exception('request %s %s not served', environ['REQUEST_METHOD'], path)
            return json_reply(start_response, '503 Service Unavailable', 'the server could '
                              'not serve this request now; ask again', close=True,
                              retry_after=1)
        if woken is not None and self.waiters.woken != woken:
            # Pilots held here were woken meanwhile (by this write, as a rule): they hand their
            # claims to the threads before this answer is written, not after.
            gevent.sleep(0)
        start_response(status, headers)
        return [out]

    def run(self, pool, environ, body):
        environ['wsgi.input'] = io.BytesIO(body)
        environ['CONTENT_LENGTH'] = str(len(body))
        return pool.apply(run_wsgi, (self.app, environ))

    def serve_work(self, environ, body):
        """A work request: asked at once, then again after each wake-up while it is held."""
        poll = HeldPoll(self)
        first = dict(environ)
        while True:
            seq = self.waiters.seq
            environ['p3s.poll'] = poll
            answer = self.run(self.writers, environ, body)
            if poll.asked is None:
                return answer
            site, jobtypes, ends = poll.asked
            poll.asked = None
            woken = self.waiters.wait(site, jobtypes, poll.remaining(), seq, ends)
            if not woken and poll.remaining() <= 0:
                return answer               # nothing came for it: idle, as it was found
            poll.held = True
            environ = dict(first)
            body = json.dumps({'wait': max(poll.remaining(), 0)}).encode()

    def listen(self, wakeups):
        """Take this process's own wake-ups from its threads, and read the other processes'."""
        loop = gevent.get_hub().loop
        wakeups.here = lambda data: loop.run_callback_threadsafe(self.take_wake_up, wakeups, data)
        inbox = gevent.socket.socket(fileno=wakeups.inbox.detach())
        while True:
            self.take_wake_up(wakeups, inbox.recv(WAKE_MESSAGE_MAX + len(WAKE_HERE_FIRST) + 1))

    def take_wake_up(self, wakeups, data):
        """Wake the pilots held here; pass on what this process's own wake-ups found no pilot
        here for."""
        here_first = data.startswith(WAKE_HERE_FIRST)
        kinds = read_wake_message(data[len(WAKE_HERE_FIRST):] if here_first else data)
        if not kinds:
            wakeups.refresh()                               # hello from a new process
            return
        left = self.waiters.wake(kinds)
        if here_first and left:
            wakeups.pass_on(left)

    def close(self):
        """Stop holding: every held pilot is answered now."""
        self.closing = True
        self.waiters.wake_all()

# ---------------------------------------------------------------------------------------------
# Processes: the workers on one port, their supervisor, the housekeeping leader
# ---------------------------------------------------------------------------------------------

# `--workers N` (N > 1): a supervisor process opens the port and forks N workers that share it;
# the kernel hands each new connection to one of them. A worker that dies is replaced. Each
# worker runs the housekeeper, but only the one holding the housekeeping lock sweeps; when it
# dies the kernel releases the lock and another takes over. `--workers 1` is one process that
# serves by itself.


def open_listener(host, port):
    """The listening socket, or a one-line error (e.g. the port is in use)."""
    family = socket.AF_INET6 if ':' in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise SystemExit('p3s_server: error: cannot listen on %s:%d: %s'
                         % (host, port, e.strerror or e))
    sock.listen(LISTEN_BACKLOG)
    sock.setblocking(False)             # gevent accepts until nothing is left
    return sock


def check_run_directory(db):
    """A one-line error, before any worker starts, where the wake-up sockets could not be
    made: a Unix socket's path has at most SOCKET_PATH_MAX bytes."""
    rundir = run_directory(db)
    longest = os.path.join(rundir, 'wake', '%d.sock' % PID_MAX)
    if len(os.fsencode(longest)) > SOCKET_PATH_MAX:
        raise SystemExit('p3s_server: error: the run directory %s is too long for the wake-up '
                         "sockets (a Unix socket's path has at most %d bytes): set TMPDIR to a "
                         'shorter directory' % (rundir, SOCKET_PATH_MAX))


def raise_file_limit():
    """Every connection is a file descriptor: allow as many as the system lets us."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = MAX_CONNECTIONS + 1000 if hard == resource.RLIM_INFINITY else hard
    if soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(wanted, hard), hard))


def serve_worker(listener, args, started):
    """One server process: the front on the shared listening socket, until SIGTERM."""
    rundir = run_directory(args.db)
    dialect = database(args.db)
    wakeups = dialect.wakeups(rundir)             # on PostgreSQL: every server, on any host
    st = configure(args.db, args.sync, args.pilot_timeout, args.token, args.pilot_token,
                   args.private, wakeups)
    keeper = Housekeeper(st, args.pilot_timeout, args.keep_days, started=started,
                         leader=dialect.leader_lock(rundir))
    front = Front(app, args.threads, WRITE_THREADS, args.max_waiters)
    server = FrontServer(listener, front, args.request_timeout)
    listening = gevent.spawn(front.listen, wakeups)
    wakeups.say_hello()

    def stop():
        front.close()
        server.close_idle()
        server.stop(timeout=SHUTDOWN_GRACE)

    gevent.signal_handler(signal.SIGTERM, lambda: gevent.spawn(stop))
    gevent.signal_handler(signal.SIGINT, lambda: gevent.spawn(stop))
    gevent.signal_handler(signal.SIGHUP, reopen_log)
    keeper.start()
    try:
        server.serve_forever()
    finally:
        keeper.stopping.set()
        listening.kill()
        wakeups.close()
        st.close()
    return 0


class Supervisor:
    """Forks the workers, replaces any that dies, and stops them all on SIGTERM or SIGINT."""

    def __init__(self, listener, args, started):
        self.listener, self.args, self.started = listener, args, started
        self.workers = {}           # pid -> time it was started
        self.stopping = False
        self.pid = os.getpid()

    def run(self):
        metrics = share_metrics(run_directory(self.args.db))
        try:
            return self.supervise()
        finally:
            if metrics:
                shutil.rmtree(metrics, ignore_errors=True)

    def supervise(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self.stop)
        signal.signal(signal.SIGHUP, self.reopen)
        signal.signal(signal.SIGALRM, self.kill_stragglers)
        for _ in range(self.args.workers):
            self.spawn()
        early_deaths = 0
        while self.workers:
            pid, status = os.wait()
            born = self.workers.pop(pid, None)
            if born is None:
                continue
            forget_metrics(pid)
            if self.stopping:
                continue
            early_deaths = early_deaths + 1 if time.monotonic() - born < 2.0 else 0
            if early_deaths >= 3:
                log.error('workers keep dying as they start: stopping')
                self.stop(None, None)
                continue
            log.error('worker %d ended (%s); starting another', pid, exit_text(status))
            self.spawn()
        return 1 if early_deaths >= 3 else 0

    def spawn(self):
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGALRM):
                    signal.signal(sig, signal.SIG_DFL)
                die_with_parent(self.pid)
                code = serve_worker(self.listener, self.args, self.started)
            except BaseException:
                log.exception('worker %d failed', os.getpid())
            finally:
                logging.shutdown()
                os._exit(code)
        self.workers[pid] = time.monotonic()

    def stop(self, signum, frame):
        self.stopping = True
        self.signal_all(signal.SIGTERM)
        signal.alarm(int(SHUTDOWN_GRACE) + 5)

    def reopen(self, signum, frame):
        reopen_log()
        self.signal_all(signal.SIGHUP)

    def kill_stragglers(self, signum, frame):
        self.signal_all(signal.SIGKILL)

    def signal_all(self, sig):
        for pid in list(self.workers):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass


def share_metrics(rundir):
    """The folder where the workers keep the counts /metrics adds up (prometheus_client's
    multiprocess mode), made empty for this supervisor unless the environment names one.
    Returns the folder made here (to remove at the end), or None."""
    if os.environ.get('PROMETHEUS_MULTIPROC_DIR'):
        return None
    path = os.path.join(rundir, 'metrics-%d' % os.getpid())
    shutil.rmtree(path, ignore_errors=True)
    os.makedirs(path)
    os.environ['PROMETHEUS_MULTIPROC_DIR'] = path
    return path


def forget_metrics(pid):
    """A dead worker's held long polls are no longer held."""
    import prometheus_client.multiprocess
    prometheus_client.multiprocess.mark_process_dead(pid)


def die_with_parent(parent):
    """A worker whose supervisor is gone (even by kill -9) stops too, so that no orphan keeps
    the port: Linux tells it with SIGTERM."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:                  # it died before prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)


def exit_text(status):
    if os.WIFSIGNALED(status):
        return 'killed by signal %d' % os.WTERMSIG(status)
    return 'exit code %d' % os.WEXITSTATUS(status)


def setup_logging(path):
    handler = logging.FileHandler(path) if path else logging.StreamHandler()
    handler.setFormatter(logging.Formatter('%(asctime)s %(process)d %(name)s %(levelname)s '
                                           '%(message)s'))
    logging.basicConfig(level=logging.INFO, handlers=[handler])


def reopen_log(*args):
    """SIGHUP: reopen the log file (after logrotate moved it)."""
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            old = handler.setStream(open(handler.baseFilename, 'a', encoding=handler.encoding))
            if old is not None:
                old.close()

# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------


def configure(db_path, sync='full', pilot_timeout=DEFAULT_PILOT_TIMEOUT, token=None,
              pilot_token=None, private=False, wakeups=None, serving=True):
    """Attach a database and the access policy to the app; returns the Store. `serving`: it
    serves pilots (not a tool's, such as check)."""
    check_sqlite()
    process_metrics()
    st = Store(db_path, sync, pilot_timeout, wakeups, serving)
    app.config.update({'p3s.store': st, 'p3s.pilot_timeout': pilot_timeout, 'p3s.token': token,
                       'p3s.pilot_token': pilot_token, 'p3s.private': private,
                       'p3s.started': utcnow()})
    return st


# SQLite's own catalogue: which tables a database file holds.
DATABASE_TABLES = "SELECT name FROM sqlite_master WHERE type = 'table'"


def foreign_database(db_path):
    """Why the file at db_path must not be taken for p3s's database (None if it is one, or is
    new or empty): p3s never writes its tables into another program's database."""
    if db_path == ':memory:' or not os.path.exists(db_path):
        return None
    db = sqlite3.connect(db_path)
    try:
        tables = {r[0] for r in db.execute(DATABASE_TABLES)}
    except sqlite3.DatabaseError as e:
        return '%s is not an SQLite database (%s)' % (db_path, e)
    finally:
        db.close()
    if tables and not {'jobs', 'pilots'} <= tables:
        return '%s is not a p3s database: its tables are %s' % (
            db_path, ', '.join(sorted(tables)[:5]) + (', ...' if len(tables) > 5 else ''))
    return None


def existing_database(ap, db_path):
    """check and purge work on a p3s database that exists: a one-line error (exit 1) if not.
    (A PostgreSQL database is created by its administrator, and found by connecting.)"""
    if is_postgres(db_path):
        return
    why = 'no database at %s' % db_path if not os.path.exists(db_path) \
        else foreign_database(db_path)
    if why:
        ap.exit(1, 'p3s_server: error: %s\n' % why)


def prepare_database(db_path):
    """Create or check the schema once, before any worker starts (and fail here, once, if the
    database cannot be reached)."""
    check_sqlite()
    why = foreign_database(db_path)
    if why:
        raise SystemExit('p3s_server: error: %s' % why)
    dialect = database(db_path)
    try:
        db = dialect.connect()
    except dialect.unavailable as e:
        raise SystemExit('p3s_server: error: cannot open the database %s: %s'
                         % (redact(db_path), first_line(e)))
    try:
        apply_schema_or_exit(dialect, db, db_path)
    finally:
        db.close()


def apply_schema_or_exit(dialect, db, db_path):
    """Apply the schema, or exit with a one-line error when the storage cannot take it now
    (another process holds SQLite's write lock past the busy timeout, the disk fails)."""
    try:
        dialect.apply_schema(db)
    except Exception as e:
        reason = dialect.trouble(e)
        if reason is None:
            raise
        raise SystemExit('p3s_server: error: cannot prepare the database %s: %s (%s); start '
                         'again once it can' % (redact(db_path), reason, first_line(e)))


def token_file(path):
    """--token-file and --pilot-token-file (or the variables that name the file): the token
    that the file holds, on one line."""
    try:
        with open(path) as f:
            token = f.read().strip()
    except (OSError, UnicodeDecodeError) as e:
        raise argparse.ArgumentTypeError('cannot read the token file %s: %s'
                                         % (path, getattr(e, 'strerror', None) or e))
    if not token or '\n' in token:
        raise argparse.ArgumentTypeError('the token file %s must hold one line, the token'
                                         % path)
    return token


def parse_duration(text):
    """'7d', '12h', '30m', '45s' or a number of days, in seconds."""
    units = {'s': 1, 'm': 60, 'h': 3600, 'd': 86400}
    text = text.strip().lower()
    unit = units.get(text[-1:], None)
    try:
        value = float(text[:-1] if unit else text) * (unit or 86400)
    except ValueError:
        value = float('nan')
    if not 0 <= value <= MAX_DURATION:              # NaN fails this too
        raise argparse.ArgumentTypeError('not a duration: %r (use e.g. 7d, 12h, 30m; at most '
                                         '%d days)' % (text, MAX_DURATION // 86400))
    return value


def add_db_option(ap):
    """--db, the same for the server and its commands."""
    ap.add_argument('--db', default=os.environ.get('P3S_DB') or DEFAULT_DB,
                    help='an SQLite database file (default ./p3s.db) or a postgresql:// URL '
                    '(P3S_DB; the environment keeps a password out of the process list)')


def parse_args(argv):
    env = os.environ.get
    ap = argparse.ArgumentParser(prog='p3s_server.py', description='The p3s server. Other '
                                 'commands: "check" (integrity and counts), "purge" (old '
                                 'records), "migrate --from ./p3s.db --to postgresql://…" (an '
                                 "SQLite database's whole history into an empty PostgreSQL one).")
    ap.add_argument('--host', default='127.0.0.1', help='address to listen on (default 127.0.0.1)')
    ap.add_argument('--port', type=int, default=DEFAULT_PORT,
                    help='port (default %d; 0 picks a free one)' % DEFAULT_PORT)
    add_db_option(ap)
    ap.add_argument('--workers', type=int, default=DEFAULT_WORKERS,
                    help='server processes sharing the port (default: one per core, here %d)'
                    % DEFAULT_WORKERS)
    ap.add_argument('--threads', type=int, default=DEFAULT_THREADS,
                    help='threads per process for requests that read (default %d; %d more '
                    'for writes)' % (DEFAULT_THREADS, WRITE_THREADS))
    ap.add_argument('--max-waiters', type=int, default=DEFAULT_MAX_WAITERS,
                    help='pilots held in a long poll at once, per process (default %d)'
                    % DEFAULT_MAX_WAITERS)
    ap.add_argument('--request-timeout', type=float, default=REQUEST_TIMEOUT,
                    help='seconds for a request\'s headers to arrive, and the least time '
                    'allowed for its body (default %g)' % REQUEST_TIMEOUT)
    ap.add_argument('--log', metavar='FILE', help='log to FILE (reopened on SIGHUP) instead '
                    'of stderr')
    ap.add_argument('--pilot-timeout', type=float, default=DEFAULT_PILOT_TIMEOUT,
                    help='seconds of silence after which a pilot is lost (default %.0f)'
                    % DEFAULT_PILOT_TIMEOUT)
    ap.add_argument('--sync', choices=('normal', 'full'), default='full',
                    help='full (the default): a commit that tells a client something new is '
                    'on disk before the answer; normal: commits reach the disk at checkpoints')
    ap.add_argument('--keep-days', type=float,
                    help='purge terminal jobs and departed pilots older than this, hourly')
    ap.add_argument('--token', default=env('P3S_TOKEN'),
                    help='token needed for every state-changing call (P3S_TOKEN); on a command '
                    'line ps shows it to everyone: prefer --token-file')
    ap.add_argument('--token-file', type=token_file, default=env('P3S_TOKEN_FILE'),
                    metavar='FILE', help='read the token from FILE (P3S_TOKEN_FILE)')
    ap.add_argument('--pilot-token', default=env('P3S_PILOT_TOKEN'),
                    help="a second token that opens only pilots' registrations "
                    '(P3S_PILOT_TOKEN); prefer --pilot-token-file')
    ap.add_argument('--pilot-token-file', type=token_file, default=env('P3S_PILOT_TOKEN_FILE'),
                    metavar='FILE', help='read the pilot token from FILE (P3S_PILOT_TOKEN_FILE)')
    ap.add_argument('--private', action='store_true', help='reads need a token too')
    ap.add_argument('--insecure', action='store_true',
                    help='allow listening beyond loopback without a token')
    args = ap.parse_args(argv)
    for name in ('token', 'pilot_token'):
        if getattr(args, name + '_file'):           # the file's token: it wins
            setattr(args, name, getattr(args, name + '_file'))
    if any(a.split('=')[0] in ('--token', '--pilot-token') for a in argv):
        log.warning('a token given on the command line shows in ps to every user of this host: '
                    'give it in a file (--token-file, --pilot-token-file) or the environment')
    if args.workers < 1 or args.threads < 1 or args.max_waiters < 0:
        ap.error('--workers and --threads must be at least 1, --max-waiters at least 0')
    if not 0 < args.request_timeout <= 3600:
        ap.error('--request-timeout must be between 0 and 3600 seconds')
    if not 0 < args.pilot_timeout <= MAX_DURATION:        # NaN fails this too
        ap.error('--pilot-timeout must be a positive number of seconds')
    if args.keep_days is not None and not 0 < args.keep_days <= MAX_DURATION / 86400:
        ap.error('--keep-days must be a positive number of days')
    if (args.pilot_token or args.private) and not args.token:
        ap.error('--pilot-token and --private need --token (or P3S_TOKEN)')
    if args.host not in LOOPBACK and not args.token and not args.insecure:
        ap.error('listening on %s needs a token (--token or P3S_TOKEN), or --insecure' % args.host)
    return args



def serve(argv):
    args = parse_args(argv)
    setup_logging(args.log)
    raise_file_limit()
    listener = open_listener(args.host, args.port)
    check_run_directory(args.db)
    prepare_database(args.db)
    started = time.monotonic()
    print('p3s server listening on http://%s:%s/ (database %s, %d worker%s)'
          % (args.host, listener.getsockname()[1], shown_database(args.db), args.workers,
             '' if args.workers == 1 else 's'), flush=True)
    if args.workers == 1:
        return serve_worker(listener, args, started)
    return Supervisor(listener, args, started).run()


def check_command(argv):
    """The database's integrity check and the counts per state; exit 1 if the check fails."""
    ap = argparse.ArgumentParser(prog='p3s_server.py check')
    add_db_option(ap)
    args = ap.parse_args(argv)
    existing_database(ap, args.db)
    st = configure(args.db, serving=False)
    with st.read() as db:
        verdict = st.db.integrity(db)
    print('integrity: %s' % '; '.join(verdict))
    for what, by_state in counts(st).items():
        print('%s: %s' % (what, ', '.join('%s %d' % kv for kv in sorted(by_state.items()))
                          or 'none'))
    st.close()
    return 0 if verdict[0].startswith('ok') else 1


def purge_command(argv):
    ap = argparse.ArgumentParser(prog='p3s_server.py purge',
                                 description='Delete finished or failed workflows (with their '
                                 'jobs and data), other terminal jobs and stopped/lost/killed '
                                 'pilots older than --older, in small batches (safe while '
                                 'serving).')
    ap.add_argument('--older', type=parse_duration, required=True, help='e.g. 7d, 12h, 30m')
    ap.add_argument('--state', help='only records in this state')
    add_db_option(ap)
    args = ap.parse_args(argv)
    if args.state and args.state not in TERMINAL_STATES + PILOT_GONE:
        ap.error('--state must be a terminal job state or stopped/lost/killed')
    existing_database(ap, args.db)
    st = configure(args.db, serving=False)
    removed = purge(st, utcnow(), args.older, args.state)
    print('purged %(workflows)d workflows, %(jobs)d other jobs, %(pilots)d pilots and '
          '%(services)d service messages' % removed)
    st.close()
    return 0


def migrate_command(argv):
    """Move an SQLite database's whole history into an empty PostgreSQL database."""
    ap = argparse.ArgumentParser(
        prog='p3s_server.py migrate', description='Move the whole history of a p3s SQLite '
        'database into an empty PostgreSQL database, for servers on several hosts: every table, '
        'with its ids, uuids, times and states as they were, in one transaction (all or '
        'nothing); the schema is created there if absent. Stop the server first. The source is '
        'only read; one of an older schema version is brought up to date in a temporary copy. '
        'Then serve it with: p3s_server.py --db postgresql://…')
    ap.add_argument('--from', dest='source', required=True, metavar='PATH',
                    help='the SQLite database, e.g. ./p3s.db (never written)')
    ap.add_argument('--to', dest='target', required=True, metavar='URL',
                    help='the PostgreSQL database, postgresql://user@host/name; it must hold no '
                    'p3s records')
    args = ap.parse_args(argv)
    if not is_postgres(args.target):
        ap.exit(2, 'p3s_server: error: --to takes a PostgreSQL URL (postgresql://…), not %s\n'
                % redact(args.target))
    check_sqlite()
    started = time.monotonic()
    pg = PostgreSQL(args.target)
    with migration_source(args.source) as (src, found):
        tables = source_tables(src, args.source)
        db = migration_target(pg, args.target)
        try:
            copied = migrate_history(src, pg, db, tables, args.target)
            verdict = pg.integrity(db)
        except (pg.psycopg.Error, sqlite3.Error) as e:
            refuse('nothing was migrated: %s', first_line(e))
        finally:
            db.close()
    if found < SCHEMA_VERSION:
        print('%s has schema version %d: copied as brought up to version %d (the file is left '
              'as it was)' % (args.source, found, SCHEMA_VERSION))
    for table, rows in copied.items():
        print('%-14s %9d rows' % (table, rows))
    print("integrity: source ok (SQLite's check, before the copy); target %s" % '; '.join(verdict))
    print('migrated %d rows of %d tables from %s to %s in %.1f s'
          % (sum(copied.values()), len(copied), args.source, redact(args.target),
             time.monotonic() - started))
    return 0


COMMANDS = {'check': check_command, 'purge': purge_command, 'migrate': migrate_command}


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in COMMANDS:
        return COMMANDS[argv[0]](argv[1:])
    return serve(argv)


if __name__ == '__main__':
    sys.exit(main())
