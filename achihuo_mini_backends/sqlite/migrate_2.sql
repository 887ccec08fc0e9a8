-- From schema version 1 to 2 (expiring done names, per-host slots, the loop's statistics), run by connection.py
-- statement by statement (split at semicolons, so none in comments) inside the BEGIN IMMEDIATE
-- transaction that opens a version 1 file. Every statement matches schema.sql.

ALTER TABLE done ADD COLUMN expires REAL;
CREATE INDEX done_expiring ON done (ns, expires) WHERE expires IS NOT NULL;

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

CREATE TABLE counters (
    ns    INTEGER NOT NULL,
    name  TEXT NOT NULL,
    value INTEGER NOT NULL,
    PRIMARY KEY (ns, name)
) WITHOUT ROWID;
