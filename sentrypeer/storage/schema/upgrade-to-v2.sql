-- SentryPeer database schema, version 2 (PRAGMA user_version = 2): summary tables.
--
-- Run on a version-1 database (a new one, or one just upgraded from the original) by
-- sentrypeer.storage.queries.migrate, in one transaction; the caller sets user_version. The
-- text NUMBER_FILTER[x] stands for the SQL condition "x is a number the API lists"
-- (sentrypeer.storage.api_queries.number_filter_sql, interface.md §5) and is replaced before
-- the statements run.
--
-- ip_summary has one row per source_ip of honey, number_summary one row per called_number of
-- the form ^\+?[0-9]{1,32}$, so the API's list routes read a few thousand summary rows instead of
-- grouping a million rows of honey. Triggers keep them up to date on every insert into and delete
-- from honey, whoever writes (this program, a peer's event, an operator's sqlite3 shell), so
--
--     seen_count = (rows of honey with that value) + shed_count
--
-- shed_count counts the probes whose full event was not stored because the write queue was full
-- (sentrypeer.storage.queries.record_shed adds them): the summaries stay the truth for seen_count
-- when the database cannot keep up. seen_last follows the API's rule
-- coalesce(max(event_timestamp), max(created_at)): "timestamped" says whether it came from an
-- event_timestamp (1) or, for rows without one, from created_at (0).
--
-- sentrypeer.storage.queries.insert_events writes thousands of rows per transaction: it sets
-- summary_state.batching to 1 for the duration of its transaction (never committed as 1), which
-- stops the insert triggers, and adds the rows to the summaries itself, once per distinct value
-- of the batch rather than once per row.

CREATE TABLE IF NOT EXISTS ip_summary (
    source_ip TEXT PRIMARY KEY,
    seen_count INTEGER NOT NULL,
    shed_count INTEGER NOT NULL DEFAULT 0,
    seen_last TEXT,
    timestamped INTEGER NOT NULL
) WITHOUT ROWID;

CREATE TABLE IF NOT EXISTS number_summary (
    called_number TEXT PRIMARY KEY,
    seen_count INTEGER NOT NULL,
    shed_count INTEGER NOT NULL DEFAULT 0,
    seen_last TEXT,
    timestamped INTEGER NOT NULL
) WITHOUT ROWID;

-- needs_escape: 1 once any summary value or seen_last may be text that JSON must escape
-- (PLAIN[x] false: non-ASCII, control characters, quotes, backslashes). Until then the list
-- routes write values as they are, without checking each row; afterwards they encode in Python.
-- It is set, never cleared, by the migration below, the insert trigger, and
-- sentrypeer.storage.queries for the rows it summarises itself.
CREATE TABLE IF NOT EXISTS summary_state (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    batching INTEGER NOT NULL DEFAULT 0,
    needs_escape INTEGER NOT NULL DEFAULT 0
);
INSERT OR IGNORE INTO summary_state (id, batching, needs_escape) VALUES (1, 0, 0);

-- The list order (seen_last descending, ties by value ascending), so a page is an index walk;
-- with seen_count the index covers the list. (seen_last changes with nearly every insert, so
-- the index entry is rewritten then anyway: seen_count in it costs nothing more.)
CREATE INDEX IF NOT EXISTS ip_summary_seen_last_index
    ON ip_summary (seen_last DESC, source_ip, seen_count);
CREATE INDEX IF NOT EXISTS number_summary_seen_last_index
    ON number_summary (seen_last DESC, called_number, seen_count);

-- Existing rows (an upgraded database); nothing in a new one.
INSERT INTO ip_summary (source_ip, seen_count, seen_last, timestamped)
SELECT source_ip, count(*), coalesce(max(event_timestamp), max(created_at)),
       max(event_timestamp) IS NOT NULL
FROM honey WHERE source_ip IS NOT NULL GROUP BY source_ip;

INSERT INTO number_summary (called_number, seen_count, seen_last, timestamped)
SELECT called_number, count(*), coalesce(max(event_timestamp), max(created_at)),
       max(event_timestamp) IS NOT NULL
FROM honey WHERE NUMBER_FILTER[called_number] GROUP BY called_number;

UPDATE summary_state SET needs_escape = 1 WHERE id = 1
    AND (EXISTS (SELECT 1 FROM ip_summary WHERE NOT PLAIN[source_ip] OR NOT PLAIN[seen_last])
         OR EXISTS (SELECT 1 FROM number_summary WHERE NOT PLAIN[seen_last]));

-- The triggers' bodies are two fragments, written once in sentrypeer.storage.queries and
-- expanded for the row named in brackets (NEW or OLD):
--   COUNT_ROW[r]: one more row r: count it in each summary (creating the summary row); its time
--     replaces seen_last when it is later, or when it is the first event_timestamp after rows
--     that had only created_at; set needs_escape when r's address or time is not PLAIN.
--   UNCOUNT_ROW[r]: one row r less: uncount it, forget a value with nothing left, and when r may
--     have been the latest, read seen_last again from the rows left (through the value's index).
--     A value that also has shed probes keeps its seen_last: their times are not in honey.

-- One trigger for both summaries: its WHEN clause runs for every row, batched or not, so it is
-- kept to one look-up.
CREATE TRIGGER IF NOT EXISTS honey_insert_summaries AFTER INSERT ON honey
WHEN NOT coalesce((SELECT batching FROM summary_state WHERE id = 1), 0)
BEGIN
    COUNT_ROW[NEW];
END;

-- Retention pruning, or a delete by hand.
CREATE TRIGGER IF NOT EXISTS honey_delete_summaries AFTER DELETE ON honey
BEGIN
    UNCOUNT_ROW[OLD];
END;

-- A row changed by hand (an operator's UPDATE of an address, number or time): as a delete of the
-- old row and an insert of the new one.
CREATE TRIGGER IF NOT EXISTS honey_update_summaries
AFTER UPDATE OF source_ip, called_number, event_timestamp, created_at ON honey
WHEN OLD.source_ip IS NOT NEW.source_ip OR OLD.called_number IS NOT NEW.called_number
    OR OLD.event_timestamp IS NOT NEW.event_timestamp OR OLD.created_at IS NOT NEW.created_at
BEGIN
    UNCOUNT_ROW[OLD];
    COUNT_ROW[NEW];
END;
