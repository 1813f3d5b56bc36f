-- p3s database schema. Applied idempotently at every server start.
-- Times are ISO 8601 UTC text with microseconds ('2026-11-21T11:42:38.123456+00:00'):
-- fixed width, so they sort and compare as text.
-- A new database is made whole by this script. A database of an older version is first brought
-- up to date by the migrations at the end of the file (the server runs those it lacks).
-- The same script makes a PostgreSQL database: lines after `-- [sqlite]` or `-- [postgresql]`
-- are that database's alone, up to `-- [all]`; the server gives the common part PostgreSQL's
-- column types (see PG_TYPES in p3s_server.py). An identifier that is a keyword is quoted.

CREATE TABLE IF NOT EXISTS jobs (
    id            INTEGER PRIMARY KEY,
    uuid          TEXT NOT NULL UNIQUE,
    name          TEXT NOT NULL DEFAULT '',
    "user"          TEXT NOT NULL DEFAULT '',
    subhost       TEXT NOT NULL DEFAULT '',          -- host the job was submitted from
    jobtype       TEXT NOT NULL DEFAULT 'default',
    payload       TEXT NOT NULL CHECK (payload <> ''),
    env           TEXT NOT NULL DEFAULT '{}',        -- JSON object of strings
    priority      INTEGER NOT NULL DEFAULT 0,        -- higher first
    timelimit     INTEGER NOT NULL DEFAULT 1000,     -- seconds of running
    deadline      INTEGER,                           -- seconds after definition to be dispatched
    deadline_at   TEXT,                              -- defined_at + deadline
    retries       INTEGER NOT NULL DEFAULT 0,        -- re-queues left after lost/nonstarter
    site          TEXT NOT NULL DEFAULT '',          -- '' runs anywhere
    infile        TEXT NOT NULL DEFAULT '',          -- env.P3S_INPUT_FILE
    workflow      TEXT,                              -- uuid of the owning workflow
    state         TEXT NOT NULL CHECK (state IN ('template', 'defined', 'dispatched', 'running',
                      'finished', 'failed', 'timelimit', 'nonstarter', 'lost', 'killed',
                      'stale', 'dropped', 'cancelled')),
    pilot         TEXT,                              -- uuid of the pilot that holds it
    host          TEXT,
    pid           INTEGER,
    errcode       INTEGER,
    created_at    TEXT NOT NULL,
    defined_at    TEXT,
    dispatched_at TEXT,
    started_at    TEXT,
    stopped_at    TEXT,
    retry_of      TEXT,                              -- uuid of the attempt this one retries
    attempt       INTEGER NOT NULL DEFAULT 1         -- 1, then one more for each retry
);

-- The brokerage queue: only queued jobs, in dispatch order. The claim walks it from the top,
-- so a claim costs the same with ten or a million jobs of history (docs/performance.md).
CREATE INDEX IF NOT EXISTS jobs_queue ON jobs (priority DESC, defined_at, id) WHERE state = 'defined';
-- The same queue by type: the claim when some types are blocked by their caps, or the pilot
-- takes only some types (CLAIM_JOB_BY_TYPE).
CREATE INDEX IF NOT EXISTS jobs_type_queue ON jobs (jobtype, priority DESC, defined_at, id)
    WHERE state = 'defined';
-- Jobs a pilot holds or held (re-delivery of a lost reply, lost pilots, the pilot's page).
CREATE INDEX IF NOT EXISTS jobs_pilot ON jobs (pilot, id) WHERE pilot IS NOT NULL;
-- Listings by state, newest first.
CREATE INDEX IF NOT EXISTS jobs_state ON jobs (state, id);
-- The monitor's windows (1 min .. 24 h) count by time, so each timestamp it counts is indexed,
-- and only once set: each count is one range of an index (a window's rows, never the table).
CREATE INDEX IF NOT EXISTS jobs_defined ON jobs (defined_at) WHERE defined_at IS NOT NULL;
CREATE INDEX IF NOT EXISTS jobs_started ON jobs (started_at, defined_at) WHERE started_at IS NOT NULL;
CREATE INDEX IF NOT EXISTS jobs_ended ON jobs (state, stopped_at) WHERE stopped_at IS NOT NULL;
CREATE INDEX IF NOT EXISTS jobs_type_ended ON jobs (jobtype, state, stopped_at)
    WHERE stopped_at IS NOT NULL;
-- A job is retried at most once: its retry, if any, is found here, and two operators retrying
-- it at once cannot make two new attempts.
CREATE UNIQUE INDEX IF NOT EXISTS jobs_retry_of ON jobs (retry_of) WHERE retry_of IS NOT NULL;
-- Queued and running jobs per type (the dashboard, jobtype caps): only live jobs are indexed.
CREATE INDEX IF NOT EXISTS jobs_live_types ON jobs (jobtype, state)
    WHERE state IN ('defined', 'dispatched', 'running');

-- The tails of a job's stdout and stderr, sent by the pilot with its final report.
CREATE TABLE IF NOT EXISTS joblogs (
    job    TEXT PRIMARY KEY REFERENCES jobs (uuid) ON DELETE CASCADE,
    stdout TEXT NOT NULL DEFAULT '',
    stderr TEXT NOT NULL DEFAULT ''
);

CREATE TABLE IF NOT EXISTS pilots (
    id            INTEGER PRIMARY KEY,
    uuid          TEXT NOT NULL UNIQUE,
    host          TEXT NOT NULL DEFAULT '',
    site          TEXT NOT NULL DEFAULT '',
    pid           INTEGER,
    extra         TEXT NOT NULL DEFAULT '',          -- free text, e.g. a batch job id
    jobtypes      TEXT NOT NULL DEFAULT '[]',        -- JSON list; [] accepts every type
    state         TEXT NOT NULL CHECK (state IN ('active', 'idle', 'dispatched', 'running',
                      'stopped', 'lost', 'killed')),
    job           TEXT,                              -- current or last job
    jobs_done     INTEGER NOT NULL DEFAULT 0,
    registered_at TEXT NOT NULL,
    last_seen     TEXT NOT NULL,                     -- the heartbeat: any request of the pilot
    stopped_at    TEXT,
    secret_hash   TEXT,                              -- SHA-256 of the secret its calls carry
    nonce_hash    TEXT                               -- SHA-256 of its registration's nonce
);

-- The pilot a batch job became: its batch id is its `extra` ('slurm:1234', 'htcondor:77.0').
CREATE INDEX IF NOT EXISTS pilots_extra ON pilots (extra) WHERE extra <> '';
-- Live pilots by silence, for the lost-pilot sweep.
CREATE INDEX IF NOT EXISTS pilots_live ON pilots (last_seen)
    WHERE state IN ('active', 'idle', 'dispatched', 'running');
CREATE INDEX IF NOT EXISTS pilots_state ON pilots (state, id);

-- Workflows: DAG templates, the workflows made from them, datatypes and data files.
-- A DAG is a template, a workflow a copy: workflows keep the DAG's name as text, so replacing or
-- deleting a DAG leaves the workflows already made from it intact.
CREATE TABLE IF NOT EXISTS dags (
    id          INTEGER PRIMARY KEY,
    name        TEXT NOT NULL UNIQUE,
    "user"        TEXT NOT NULL DEFAULT '',
    description TEXT NOT NULL DEFAULT '',
    nvertices   INTEGER NOT NULL,
    nedges      INTEGER NOT NULL,
    root        TEXT NOT NULL,                     -- first vertex in topological order
    graphml     TEXT NOT NULL,                     -- the text as registered
    created_at  TEXT NOT NULL
);

CREATE TABLE IF NOT EXISTS dag_vertices (
    id        INTEGER PRIMARY KEY,
    dag       INTEGER NOT NULL REFERENCES dags (id) ON DELETE CASCADE,
    name      TEXT NOT NULL,
    position  INTEGER NOT NULL,                    -- in topological order
    jobtype   TEXT NOT NULL DEFAULT 'default',     -- 'noop' finishes on the server at once
    payload   TEXT NOT NULL DEFAULT '',
    env       TEXT NOT NULL DEFAULT '{}',          -- JSON object of strings
    timelimit INTEGER NOT NULL DEFAULT 1000,
    priority  INTEGER NOT NULL DEFAULT 0,
    UNIQUE (dag, name)
);

-- Parallel edges between the same two vertices are allowed: edges have no natural key.
CREATE TABLE IF NOT EXISTS dag_edges (
    id       INTEGER PRIMARY KEY,
    dag      INTEGER NOT NULL REFERENCES dags (id) ON DELETE CASCADE,
    source   TEXT NOT NULL,
    target   TEXT NOT NULL,
    name     TEXT NOT NULL,
    dirpath  TEXT NOT NULL DEFAULT '',
    datatype TEXT NOT NULL DEFAULT '',
    datatag  TEXT NOT NULL DEFAULT '',             -- env variable holding the full path
    comment  TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS dag_edges_dag ON dag_edges (dag, id);

CREATE TABLE IF NOT EXISTS workflows (
    id          INTEGER PRIMARY KEY,
    uuid        TEXT NOT NULL UNIQUE,
    name        TEXT NOT NULL DEFAULT '',          -- not unique
    "user"        TEXT NOT NULL DEFAULT '',
    description TEXT NOT NULL DEFAULT '',
    dag         TEXT NOT NULL,                     -- name of the DAG it was made from
    state       TEXT NOT NULL CHECK (state IN ('template', 'defined', 'running', 'finished',
                    'failed', 'cancelled')),
    comment     TEXT NOT NULL DEFAULT '',          -- why it failed or was cancelled
    rootuuid    TEXT,                              -- job made from the DAG's root
    nvertices   INTEGER NOT NULL,
    ndone       INTEGER NOT NULL DEFAULT 0,        -- jobs finished
    created_at  TEXT NOT NULL,
    defined_at  TEXT,
    started_at  TEXT,                              -- its first job started
    stopped_at  TEXT
);
CREATE INDEX IF NOT EXISTS workflows_state ON workflows (state, id);
-- Workflows that ended, by when (the dashboard's failures of the last hour).
CREATE INDEX IF NOT EXISTS workflows_ended ON workflows (state, stopped_at)
    WHERE stopped_at IS NOT NULL;
-- The monitor's workflow filters, newest first.
CREATE INDEX IF NOT EXISTS workflows_user ON workflows ("user", id);
CREATE INDEX IF NOT EXISTS workflows_dag ON workflows (dag, id);
CREATE INDEX IF NOT EXISTS workflows_name ON workflows (name, id);
-- The jobs of a workflow (its engine, its page, its deletion).
CREATE INDEX IF NOT EXISTS jobs_workflow ON jobs (workflow) WHERE workflow IS NOT NULL;

CREATE TABLE IF NOT EXISTS datatypes (
    name       TEXT PRIMARY KEY,
    ext        TEXT NOT NULL DEFAULT '',           -- with its dot: '.txt'
    comment    TEXT NOT NULL DEFAULT '',
    created_at TEXT NOT NULL
);

-- A data file. A workflow edge is one (template -> defined -> available when its producing
-- job finished); files registered from outside use the same table. The state is free text on
-- purpose: the data clients add their own states.
CREATE TABLE IF NOT EXISTS data (
    id         INTEGER PRIMARY KEY,
    uuid       TEXT NOT NULL UNIQUE,
    name       TEXT NOT NULL,                      -- file name
    dirpath    TEXT NOT NULL DEFAULT '',
    datatype   TEXT NOT NULL DEFAULT '',
    datatag    TEXT NOT NULL DEFAULT '',
    state      TEXT NOT NULL DEFAULT 'defined',
    comment    TEXT NOT NULL DEFAULT '',
    workflow   TEXT,                               -- uuid of the owning workflow
    source     TEXT NOT NULL DEFAULT '',           -- producing vertex (job name) ...
    sourceuuid TEXT,                               -- ... and job
    target     TEXT NOT NULL DEFAULT '',           -- consuming vertex ...
    targetuuid TEXT,                               -- ... and job
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS data_source ON data (sourceuuid) WHERE sourceuuid IS NOT NULL;
CREATE INDEX IF NOT EXISTS data_target ON data (targetuuid) WHERE targetuuid IS NOT NULL;
CREATE INDEX IF NOT EXISTS data_workflow ON data (workflow, id) WHERE workflow IS NOT NULL;
CREATE INDEX IF NOT EXISTS data_name ON data (name);
-- The monitor's data filters, newest first.
CREATE INDEX IF NOT EXISTS data_state ON data (state, id);
CREATE INDEX IF NOT EXISTS data_datatype ON data (datatype, id);

-- -- DQM controls --------------------------------------------------------------------------------

-- Deadlines: the sweep finds queued jobs whose deadline passed without reading the whole queue.
CREATE INDEX IF NOT EXISTS jobs_deadline ON jobs (deadline_at)
    WHERE state = 'defined' AND deadline_at IS NOT NULL;
-- Lost jobs with retries left, queued again by the sweep once their pilot surely killed them.
CREATE INDEX IF NOT EXISTS jobs_lost_retries ON jobs (stopped_at) WHERE state = 'lost' AND retries > 0;
-- Jobs holding a slot of their type's cap, counted by the claim (must repeat this WHERE).
CREATE INDEX IF NOT EXISTS jobs_active ON jobs (jobtype) WHERE state IN ('dispatched', 'running');

-- Every job type seen at submission; cap = the most jobs of the type dispatched or running at
-- once (NULL: no cap; 0: paused). Extra jobs wait in the queue; they are never rejected.
CREATE TABLE IF NOT EXISTS jobtypes (
    name       TEXT PRIMARY KEY,
    cap        INTEGER CHECK (cap IS NULL OR cap >= 0),
    updated_at TEXT
);

-- Pilot defaults of a site (the original inputs/sites/*.json); a pilot's own flags win.
CREATE TABLE IF NOT EXISTS sites (
    name       TEXT PRIMARY KEY CHECK (name <> ''),
    period     REAL,                                -- seconds between polls
    cycles     INTEGER,                             -- 0 runs for ever
    beat       REAL,                                -- seconds between heartbeats
    wait       REAL,                                -- seconds a work request may wait
    pilots     INTEGER,                             -- nominal number of pilots
    lifetime   INTEGER,                             -- nominal pilot lifetime, seconds
    env        TEXT NOT NULL DEFAULT '{}',          -- JSON object of strings, for every payload
    comment    TEXT NOT NULL DEFAULT '',
    updated_at TEXT NOT NULL
);

-- Notes left by payloads and cron scripts (the original's service records), for the monitor.
CREATE TABLE IF NOT EXISTS services (
    id         INTEGER PRIMARY KEY,
    name       TEXT NOT NULL,
    message    TEXT NOT NULL,
    created_at TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS services_name ON services (name, id);

-- -- data and injection ---------------------------------------------------------------------

-- Files the injector (or p3s_data.py -g) took, by full path: the primary key is what makes a
-- file's jobs submitted exactly once, across scans, restarts and concurrent injectors.
CREATE TABLE IF NOT EXISTS injections (
    path       TEXT PRIMARY KEY,
    state      TEXT NOT NULL CHECK (state IN ('submitted', 'skipped')),
    data       TEXT,                                -- uuid of its data record
    created_at TEXT NOT NULL
);

-- -- metrics -------------------------------------------------------------------------------------

-- Jobs and workflows that reached an end state, counted by the database itself as they end:
-- every path that ends one (reports, sweeps, kills, drops, the workflow engine) and every server
-- process counts, in the transaction that ends it, and purging old records never lowers a
-- count, as a Prometheus counter must not go down. A job queued again by its retries counts
-- each of its ends. Triggers are SQLite's dialect; PostgreSQL writes them as a function.
-- [sqlite]
CREATE TABLE IF NOT EXISTS job_ends (
    state   TEXT NOT NULL,
    jobtype TEXT NOT NULL,
    n       INTEGER NOT NULL,
    PRIMARY KEY (state, jobtype)
);
CREATE TRIGGER IF NOT EXISTS jobs_count_ends AFTER UPDATE OF state ON jobs
 WHEN NEW.state IN ('finished', 'failed', 'timelimit', 'nonstarter', 'lost', 'killed', 'stale',
                    'dropped', 'cancelled')
  AND OLD.state NOT IN ('finished', 'failed', 'timelimit', 'nonstarter', 'lost', 'killed',
                        'stale', 'dropped', 'cancelled')
BEGIN
    INSERT INTO job_ends (state, jobtype, n) VALUES (NEW.state, NEW.jobtype, 1)
    ON CONFLICT (state, jobtype) DO UPDATE SET n = n + 1;
END;

CREATE TABLE IF NOT EXISTS workflow_ends (
    state TEXT PRIMARY KEY,
    n     INTEGER NOT NULL
);
CREATE TRIGGER IF NOT EXISTS workflows_count_ends AFTER UPDATE OF state ON workflows
 WHEN NEW.state IN ('finished', 'failed', 'cancelled')
  AND OLD.state NOT IN ('finished', 'failed', 'cancelled')
BEGIN
    INSERT INTO workflow_ends (state, n) VALUES (NEW.state, 1)
    ON CONFLICT (state) DO UPDATE SET n = n + 1;
END;
-- [postgresql]
-- Each counter is kept in a row per server session (`shard`), summed when read: transactions
-- that end jobs at once on several servers do not wait for one another's counter row.
CREATE TABLE IF NOT EXISTS job_ends (
    state   TEXT COLLATE "C" NOT NULL,
    jobtype TEXT COLLATE "C" NOT NULL,
    shard   INTEGER NOT NULL DEFAULT 0,
    n       BIGINT NOT NULL,
    PRIMARY KEY (state, jobtype, shard)
);
CREATE OR REPLACE FUNCTION p3s_count_job_end() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO job_ends (state, jobtype, shard, n)
    VALUES (NEW.state, NEW.jobtype, pg_backend_pid() % 64, 1)
    ON CONFLICT (state, jobtype, shard) DO UPDATE SET n = job_ends.n + 1;
    RETURN NULL;
END $$;
CREATE OR REPLACE TRIGGER jobs_count_ends AFTER UPDATE OF state ON jobs FOR EACH ROW
 WHEN (NEW.state IN ('finished', 'failed', 'timelimit', 'nonstarter', 'lost', 'killed', 'stale',
                     'dropped', 'cancelled')
       AND OLD.state NOT IN ('finished', 'failed', 'timelimit', 'nonstarter', 'lost', 'killed',
                             'stale', 'dropped', 'cancelled'))
 EXECUTE FUNCTION p3s_count_job_end();

CREATE TABLE IF NOT EXISTS workflow_ends (
    state TEXT COLLATE "C" NOT NULL,
    shard INTEGER NOT NULL DEFAULT 0,
    n     BIGINT NOT NULL,
    PRIMARY KEY (state, shard)
);
CREATE OR REPLACE FUNCTION p3s_count_workflow_end() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO workflow_ends (state, shard, n) VALUES (NEW.state, pg_backend_pid() % 64, 1)
    ON CONFLICT (state, shard) DO UPDATE SET n = workflow_ends.n + 1;
    RETURN NULL;
END $$;
CREATE OR REPLACE TRIGGER workflows_count_ends AFTER UPDATE OF state ON workflows FOR EACH ROW
 WHEN (NEW.state IN ('finished', 'failed', 'cancelled')
       AND OLD.state NOT IN ('finished', 'failed', 'cancelled'))
 EXECUTE FUNCTION p3s_count_workflow_end();
-- [all]

-- Templates by type, for the jobs gauge (the other live states are in jobs_live_types).
CREATE INDEX IF NOT EXISTS jobs_templates ON jobs (jobtype) WHERE state = 'template';

-- -- batch systems ------------------------------------------------------------------------

-- A drain order: the pilot finishes its job, takes no more and leaves (`stopped`).
CREATE TABLE IF NOT EXISTS pilot_drains (
    pilot        TEXT PRIMARY KEY REFERENCES pilots (uuid) ON DELETE CASCADE,
    requested_at TEXT NOT NULL
);

-- What the pool manager (p3s_batch.py) needs of a site besides its `pilots` (the target) and
-- `lifetime` (the pilots' wall time).
CREATE TABLE IF NOT EXISTS site_batch (
    site            TEXT PRIMARY KEY REFERENCES sites (name) ON DELETE CASCADE,
    max_pending     INTEGER,                        -- batch jobs pending at once
    pending_timeout INTEGER,                        -- seconds pending before it is cancelled
    partition       TEXT NOT NULL DEFAULT '',       -- Slurm partition
    account         TEXT NOT NULL DEFAULT '',       -- Slurm account, HTCondor accounting group
    options         TEXT NOT NULL DEFAULT '[]'      -- JSON list: sbatch options, submit lines
);

-- A pilot submitted to a batch system, from its submission to its end. The batch ids of two
-- clusters may meet, so a batch job is known by its site too.
CREATE TABLE IF NOT EXISTS batchjobs (
    id           INTEGER PRIMARY KEY,
    site         TEXT NOT NULL,
    system       TEXT NOT NULL CHECK (system IN ('slurm', 'htcondor')),
    batchid      TEXT NOT NULL,
    state        TEXT NOT NULL CHECK (state IN ('pending', 'running', 'finished', 'failed',
                     'cancelled', 'never_registered')),
    pilot        TEXT,                              -- uuid of the pilot it became
    host         TEXT NOT NULL DEFAULT '',          -- where it ran
    reason       TEXT NOT NULL DEFAULT '',          -- the batch system's word on it
    output       TEXT NOT NULL DEFAULT '',          -- its output's tail, when no pilot came of it
    submitted_at TEXT NOT NULL,
    started_at   TEXT,
    ended_at     TEXT,
    UNIQUE (site, system, batchid)
);
-- The pool manager's cycle reads the live ones of a site; the listings go newest first.
CREATE INDEX IF NOT EXISTS batchjobs_live ON batchjobs (site, system)
    WHERE state IN ('pending', 'running');
CREATE INDEX IF NOT EXISTS batchjobs_pilot ON batchjobs (pilot) WHERE pilot IS NOT NULL;
CREATE INDEX IF NOT EXISTS batchjobs_state ON batchjobs (state, id);
CREATE INDEX IF NOT EXISTS batchjobs_site ON batchjobs (site, id);
CREATE INDEX IF NOT EXISTS batchjobs_ended ON batchjobs (state, ended_at)
    WHERE ended_at IS NOT NULL;

-- -- recovery ---------------------------------------------------------------------------------

-- A dispatch is committed without waiting for the disk, so a crash of the machine (SQLite) or
-- of the database server (PostgreSQL) may lose the last ones (p3s_server.py, Recovery). One
-- row: the storage's incarnation the last dispatches were made in (the machine's boot, the
-- database server's start), and the recovery begun when a server found another one: the jobs
-- numbered up to `last_job` wait until every live pilot has been heard, or until `ends_at`.
-- Not migrated: it describes the storage, not the history.
CREATE TABLE IF NOT EXISTS recovery (
    one         INTEGER PRIMARY KEY CHECK (one = 1),
    incarnation TEXT NOT NULL,
    began_at    TEXT,
    ends_at     TEXT,
    last_job    INTEGER NOT NULL DEFAULT 0
);

-- [sqlite]
PRAGMA user_version = 4;
-- [postgresql]
CREATE TABLE IF NOT EXISTS p3s_version (version INTEGER NOT NULL);
-- The database server's incarnation (see recovery): a random mark, in a table that crash
-- recovery empties (an unlogged one), as it does on a replica taking over. A clean restart
-- keeps it.
CREATE UNLOGGED TABLE IF NOT EXISTS storage_mark (
    one  INTEGER PRIMARY KEY CHECK (one = 1),
    mark TEXT NOT NULL
);
-- Every job's row is rewritten several times in minutes: autovacuum cleans and analyzes the
-- table after 1 % of it changed (not the default 20 %), so dead entries do not pile up in the
-- queue's index and the claim's plan follows the queue as it is. Only on a jobs table with no
-- settings of its own: an operator's are kept.
DO $$ BEGIN
    IF (SELECT reloptions IS NULL FROM pg_class WHERE oid = 'jobs'::regclass) THEN
        ALTER TABLE jobs SET (autovacuum_vacuum_scale_factor = 0.01,
                              autovacuum_analyze_scale_factor = 0.01);
    END IF;
END $$;
-- Times as SQLite's p3s_ functions give them (connect() in p3s_server.py): the stored text of
-- `then` plus `seconds`, and the seconds from one stored time to another.
CREATE OR REPLACE FUNCTION p3s_seconds_after(then_ TEXT, seconds BIGINT)
RETURNS TEXT LANGUAGE sql STABLE AS $$
    SELECT to_char((CAST(then_ AS timestamptz) + seconds * interval '1 second')
                   AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US') || '+00:00'
$$;
CREATE OR REPLACE FUNCTION p3s_seconds_between(earlier TEXT, later TEXT)
RETURNS DOUBLE PRECISION LANGUAGE sql STABLE AS $$
    SELECT CAST(extract(epoch FROM CAST(later AS timestamptz) - CAST(earlier AS timestamptz))
                AS DOUBLE PRECISION)
$$;
-- [all]

-- -- migrations ------------------------------------------------------------------------------
-- Each block brings a database of the version before it to its own version, inside one
-- transaction, before the script above runs (which then adds the new indexes). These steps
-- are SQLite's: ALTER TABLE cannot change a CHECK constraint there, so a table is rebuilt.

-- migrate to 2: retries as new attempts, and cancelled workflows.
ALTER TABLE jobs ADD COLUMN retry_of TEXT;
ALTER TABLE jobs ADD COLUMN attempt INTEGER NOT NULL DEFAULT 1;
ALTER TABLE workflows RENAME TO workflows_version_1;
CREATE TABLE workflows (
    id          INTEGER PRIMARY KEY,
    uuid        TEXT NOT NULL UNIQUE,
    name        TEXT NOT NULL DEFAULT '',
    "user"        TEXT NOT NULL DEFAULT '',
    description TEXT NOT NULL DEFAULT '',
    dag         TEXT NOT NULL,
    state       TEXT NOT NULL CHECK (state IN ('template', 'defined', 'running', 'finished',
                    'failed', 'cancelled')),
    comment     TEXT NOT NULL DEFAULT '',
    rootuuid    TEXT,
    nvertices   INTEGER NOT NULL,
    ndone       INTEGER NOT NULL DEFAULT 0,
    created_at  TEXT NOT NULL,
    defined_at  TEXT,
    started_at  TEXT,
    stopped_at  TEXT
);
INSERT INTO workflows SELECT * FROM workflows_version_1;
DROP TABLE workflows_version_1;

-- migrate to 3: pilots prove who they are (a pilot registered before has no secret: it is told
-- to register again).
ALTER TABLE pilots ADD COLUMN secret_hash TEXT;
ALTER TABLE pilots ADD COLUMN nonce_hash TEXT;

-- migrate to 4: the recovery of dispatches lost in a crash (a new table: the script above
-- creates it).
