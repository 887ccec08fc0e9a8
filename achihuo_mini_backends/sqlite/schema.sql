-- The achihuo_mini SQLite schema, version 2 (PRAGMA user_version = 2).
-- connection.py runs it statement by statement (split at semicolons, so none in comments)
-- inside the BEGIN IMMEDIATE transaction that creates a file's schema. The package
-- docstring describes every table.
-- Every row carries its namespace id (ns) and every index starts with it.

CREATE TABLE namespaces (
    id       INTEGER PRIMARY KEY,
    name     BLOB NOT NULL UNIQUE,
    ready    INTEGER NOT NULL DEFAULT 0,
    delayed  INTEGER NOT NULL DEFAULT 0,
    leased   INTEGER NOT NULL DEFAULT 0,
    dead     INTEGER NOT NULL DEFAULT 0,
    done     INTEGER NOT NULL DEFAULT 0
);

CREATE TABLE tasks (
    id       INTEGER PRIMARY KEY AUTOINCREMENT,
    ns       INTEGER NOT NULL,
    payload  BLOB NOT NULL,
    key      BLOB,
    pos      INTEGER,
    due      REAL,
    worker   TEXT,
    attempt  INTEGER NOT NULL DEFAULT 0,
    failures INTEGER NOT NULL DEFAULT 0,
    CHECK ((pos IS NOT NULL) + (due IS NOT NULL) + (worker IS NOT NULL) = 1)
);
CREATE INDEX tasks_ready ON tasks (ns, pos) WHERE pos IS NOT NULL;
CREATE INDEX tasks_delayed ON tasks (ns, due) WHERE due IS NOT NULL;
CREATE INDEX tasks_leased ON tasks (ns, worker) WHERE worker IS NOT NULL;

CREATE TABLE pending (
    ns  INTEGER NOT NULL,
    key BLOB NOT NULL,
    n   INTEGER NOT NULL,
    PRIMARY KEY (ns, key)
) WITHOUT ROWID;

CREATE TABLE done (
    ns  INTEGER NOT NULL,
    key BLOB NOT NULL,
    expires REAL,
    PRIMARY KEY (ns, key)
) WITHOUT ROWID;
CREATE INDEX done_expiring ON done (ns, expires) WHERE expires IS NOT NULL;

CREATE TABLE dead (
    id       INTEGER PRIMARY KEY AUTOINCREMENT,
    ns       INTEGER NOT NULL,
    task_id  INTEGER NOT NULL,
    payload  BLOB NOT NULL,
    key      BLOB,
    error    TEXT NOT NULL,
    failures INTEGER NOT NULL
);
CREATE INDEX dead_order ON dead (ns, id);

CREATE TABLE workers (
    ns        INTEGER NOT NULL,
    worker    TEXT NOT NULL,
    alias     TEXT NOT NULL,
    role      TEXT NOT NULL,
    info      TEXT NOT NULL,
    last_seen REAL NOT NULL,
    ttl       REAL NOT NULL,
    PRIMARY KEY (ns, worker),
    UNIQUE (ns, alias)
) WITHOUT ROWID;

CREATE TABLE mailbox (
    id      INTEGER PRIMARY KEY AUTOINCREMENT,
    ns      INTEGER NOT NULL,
    worker  TEXT NOT NULL,
    command TEXT NOT NULL
);
CREATE INDEX mailbox_worker ON mailbox (ns, worker, id);

CREATE TABLE counters (
    ns    INTEGER NOT NULL,
    name  TEXT NOT NULL,
    value INTEGER NOT NULL,
    PRIMARY KEY (ns, name)
) WITHOUT ROWID;

CREATE TABLE host_slots (
    ns      INTEGER NOT NULL,
    host    TEXT NOT NULL,
    worker  TEXT NOT NULL,
    n       INTEGER NOT NULL,
    expires REAL NOT NULL,
    waiting REAL NOT NULL,
    PRIMARY KEY (ns, host, worker)
) WITHOUT ROWID;
CREATE INDEX host_slots_worker ON host_slots (ns, worker);
CREATE INDEX host_slots_expiry ON host_slots (ns, expires);

CREATE TABLE host_turns (
    ns         INTEGER NOT NULL,
    host       TEXT NOT NULL,
    next_start REAL NOT NULL,
    PRIMARY KEY (ns, host)
) WITHOUT ROWID;
CREATE INDEX host_turns_expiry ON host_turns (ns, next_start);
