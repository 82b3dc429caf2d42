-- SentryPeer database schema, version 1 (PRAGMA user_version = 1).
--
-- Run on a fresh (empty) database, and as the middle part of the upgrade of a database made by the
-- original SentryPeer (see upgrade-from-original.sql); every statement is therefore IF NOT EXISTS.
-- The caller (sentrypeer.storage.queries.migrate) runs it inside one transaction and sets
-- user_version itself.
--
-- Table "honey" keeps the original's name, column names, types and order (reference §4.1) so the
-- queries people already run keep working; the columns after created_at are ours (interface.md §4),
-- in the order the upgrade appends them, so a fresh and an upgraded database look alike.

CREATE TABLE IF NOT EXISTS honey (
    honey_id INTEGER PRIMARY KEY,
    event_timestamp TEXT,
    event_uuid TEXT,
    collected_method TEXT,
    source_ip TEXT,
    called_number TEXT,
    transport_type TEXT,
    method TEXT,
    user_agent TEXT,
    sip_message TEXT,
    created_by_node_id TEXT,
    created_at DATETIME DEFAULT (strftime('%Y-%m-%d %H:%M:%f','now')),
    destination_ip TEXT,
    source_port INTEGER,
    destination_port INTEGER,
    parse_status TEXT,
    auth_username TEXT,
    auth_realm TEXT,
    sip_message_bytes BLOB
);

-- The original's three index names. event_uuid_index is UNIQUE here (the original's was not): one
-- index serves both the uniqueness rule and the look-ups, and the original's own
-- "CREATE INDEX IF NOT EXISTS event_uuid_index" stays a no-op on this database.
CREATE INDEX IF NOT EXISTS source_ip_index ON honey (source_ip);
CREATE INDEX IF NOT EXISTS called_number_index ON honey (called_number);
CREATE UNIQUE INDEX IF NOT EXISTS event_uuid_index ON honey (event_uuid);
-- Ours: retention pruning and "seen last"/time-ordered API queries.
CREATE INDEX IF NOT EXISTS event_timestamp_index ON honey (event_timestamp);

-- Rows of an original database whose event_uuid repeated an earlier row's (the original's
-- check-then-insert dedupe was racy). The upgrade moves them here, unchanged and with their
-- honey_id, so the unique index can be built without losing anything. Same columns as honey.
-- Empty in a database created by us.
CREATE TABLE IF NOT EXISTS honey_duplicate_uuid (
    honey_id INTEGER PRIMARY KEY,
    event_timestamp TEXT,
    event_uuid TEXT,
    collected_method TEXT,
    source_ip TEXT,
    called_number TEXT,
    transport_type TEXT,
    method TEXT,
    user_agent TEXT,
    sip_message TEXT,
    created_by_node_id TEXT,
    created_at DATETIME DEFAULT (strftime('%Y-%m-%d %H:%M:%f','now')),
    destination_ip TEXT,
    source_port INTEGER,
    destination_port INTEGER,
    parse_status TEXT,
    auth_username TEXT,
    auth_realm TEXT,
    sip_message_bytes BLOB
);

-- This node's persistent identity (created_by_node_id of the events it collects): one row only.
CREATE TABLE IF NOT EXISTS sentrypeer_node (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    node_id TEXT NOT NULL,
    created_at DATETIME NOT NULL DEFAULT (strftime('%Y-%m-%d %H:%M:%f','now'))
);
