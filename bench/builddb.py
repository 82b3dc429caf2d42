"""Build the benchmark's database: ``python -m bench.builddb PATH --events N --ips I --numbers M``.

N events from I source addresses to M called numbers, spread over 30 days, written with bulk SQL
(one ``INSERT ... SELECT`` over a recursive counter) on a schema-1 database made from the product's
own ``schema/v1.sql``; then the product's migration (:func:`sentrypeer.storage.queries.migrate`)
upgrades it to the current schema, building the summary tables as it would for an operator's
existing database. Prints one JSON line: the counts and how long the insert and the migration took.
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import sys
import time

from sentrypeer.storage import queries

#: 2024-01-01 00:00:00 UTC: the first event's time.
START = 1_704_067_200
SPAN = 30 * 86400
NODE = "1f45cc1c-4fd4-11ec-89f0-d05099894ba6"

# Every value comes from the row number i: the address and number pools are walked by primes
# coprime with their sizes, the UUID (version 4 layout, lower-case hex) ends with i so it is
# unique, the timestamps grow with i and have nine fraction digits like the product's.
_INSERT = """
WITH RECURSIVE counter(i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM counter WHERE i < :events - 1),
rows AS (
    SELECT i,
        '198.18.' || ((i * 7919 % :ips) / 250) || '.' || ((i * 7919 % :ips) % 250 + 1) AS ip,
        '+4420' || printf('%07d', i * 104729 % :numbers) AS number
    FROM counter
)
INSERT INTO honey (
    event_timestamp, event_uuid, collected_method, source_ip, called_number, transport_type,
    method, user_agent, sip_message, created_by_node_id, destination_ip, source_port,
    destination_port, parse_status, auth_username, auth_realm, sip_message_bytes
)
SELECT
    strftime('%Y-%m-%d %H:%M:%S', :start + i * :span / :events, 'unixepoch')
        || printf('.%09d', i * 2654435761 % 1000000000),
    printf('%08x-%04x-4%03x-%x%03x-%012x', i * 2654435761 % 4294967296, i * 40503 % 65536,
           i * 2971 % 4096, 8 + i % 4, i * 1103 % 4096, i),
    'passive', ip, number, 'UDP', CASE i % 3 WHEN 0 THEN 'INVITE' ELSE 'OPTIONS' END,
    'friendly-scanner', message, :node, '192.0.2.1', 5060 + i % 1000, 5060, 'ok',
    'NOT_FOUND', 'NOT_FOUND', CAST(message AS BLOB)
FROM (
    SELECT i, ip, number,
        'OPTIONS sip:' || number || '@192.0.2.1 SIP/2.0' || char(13, 10)
        || 'Via: SIP/2.0/UDP ' || ip || ':5061;branch=z9hG4bK-' || i || ';rport' || char(13, 10)
        || 'Max-Forwards: 70' || char(13, 10)
        || 'To: "sipvicious"<sip:' || number || '@192.0.2.1>' || char(13, 10)
        || 'From: "sipvicious"<sip:' || number || '@192.0.2.1>;tag=' || i || char(13, 10)
        || 'User-Agent: friendly-scanner' || char(13, 10)
        || 'Call-ID: ' || i || '@bench' || char(13, 10)
        || 'Contact: sip:' || number || '@' || ip || ':5061' || char(13, 10)
        || 'CSeq: 1 OPTIONS' || char(13, 10)
        || 'Accept: application/sdp' || char(13, 10)
        || 'Content-Length: 0' || char(13, 10, 13, 10) AS message
    FROM rows
)
"""


def build(path: str, events: int, ips: int, numbers: int) -> dict:
    """Create *path* (which must not exist) with *events* events; return the report."""
    if os.path.exists(path):
        raise FileExistsError(path)
    if events < 1 or ips < 1 or numbers < 1 or ips > 62500:
        raise ValueError("events, ips and numbers must be at least 1, ips at most 62,500")
    conn = sqlite3.connect(path)
    try:
        conn.execute("PRAGMA journal_mode=WAL")
        with conn:
            for statement in queries.schema_statements("v1.sql"):
                conn.execute(statement)
            conn.execute("PRAGMA user_version = 1")
            conn.execute("INSERT INTO sentrypeer_node (id, node_id) VALUES (1, ?)", (NODE,))
        started = time.monotonic()
        with conn:
            conn.execute(
                _INSERT,
                {"events": events, "ips": ips, "numbers": numbers, "start": START, "span": SPAN,
                 "node": NODE},
            )
        inserted = time.monotonic() - started
        started = time.monotonic()
        before, after = queries.migrate(conn)
        migrated = time.monotonic() - started
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        counts = {
            "events": conn.execute("SELECT count(*) FROM honey").fetchone()[0],
            "ips": conn.execute("SELECT count(*) FROM ip_summary").fetchone()[0],
            "numbers": conn.execute("SELECT count(*) FROM number_summary").fetchone()[0],
        }
    finally:
        conn.close()
    return {
        **counts,
        "schema": [before, after],
        "insert_seconds": round(inserted, 2),
        "migration_seconds": round(migrated, 2),
        "bytes": os.path.getsize(path),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.builddb", description=__doc__.split("\n")[0])
    parser.add_argument("path")
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--ips", type=int, default=20_000)
    parser.add_argument("--numbers", type=int, default=100_000)
    args = parser.parse_args(argv)
    report = build(args.path, args.events, args.ips, args.numbers)
    sys.stdout.write(json.dumps(report) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
