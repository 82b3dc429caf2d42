-- Upgrade of a database made by the original SentryPeer (user_version 0, table honey) to
-- version 1, last part. The whole upgrade is one transaction, run by
-- sentrypeer.storage.queries.migrate:
--
--   1. (Python) append the missing v1 columns to honey; split "ip:port" source addresses;
--   2. v1.sql: create the new tables and indexes; it skips event_uuid_index, which the original
--      created without UNIQUE;
--   3. this file: move duplicate event_uuid rows aside, then rebuild event_uuid_index as UNIQUE.

-- Later rows repeating an earlier row's event_uuid move, unchanged, to honey_duplicate_uuid; the
-- earliest row (lowest honey_id) stays in honey. NULL event_uuids are never duplicates.
INSERT INTO honey_duplicate_uuid (
    honey_id, event_timestamp, event_uuid, collected_method, source_ip, called_number,
    transport_type, method, user_agent, sip_message, created_by_node_id, created_at,
    destination_ip, source_port, destination_port, parse_status, auth_username, auth_realm,
    sip_message_bytes
)
SELECT
    honey_id, event_timestamp, event_uuid, collected_method, source_ip, called_number,
    transport_type, method, user_agent, sip_message, created_by_node_id, created_at,
    destination_ip, source_port, destination_port, parse_status, auth_username, auth_realm,
    sip_message_bytes
FROM honey AS later
WHERE EXISTS (
    SELECT 1 FROM honey AS earlier
    WHERE earlier.event_uuid = later.event_uuid AND earlier.honey_id < later.honey_id
);

DELETE FROM honey
WHERE honey_id IN (SELECT honey_id FROM honey_duplicate_uuid);

DROP INDEX IF EXISTS event_uuid_index;
CREATE UNIQUE INDEX event_uuid_index ON honey (event_uuid);
