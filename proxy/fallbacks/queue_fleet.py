"""The fleet's side of the queue (§8), PostgreSQL only: the tables, the acceptance lock and the
replay lease, in SQL. `queue` and `replay` use them when their storage is `shared`.

- `queue_leases`: which replica replays a queue, until when (the database's clock). A lease is
  per queue, not per item: two replicas holding one item each of a queue would deliver them
  out of order.
- `queue_counters`: each queue's pending count and exposure, kept by a trigger on
  `queue_items`, so whoever changes a pending row (an acceptance, a mark, a dead letter sent
  again from the status page) keeps them right, and an acceptance reads two numbers instead of
  counting the backlog.
- One advisory lock for every acceptance of every replica (and every counter change, taken by
  the trigger first): the checks an acceptance makes after it, in the same transaction, are
  exact for the fleet. One lock, not one per queue: a batch taking two queues' locks in the
  order its requests came could deadlock with another replica's batch.
"""

from __future__ import annotations

from proxy.storage.base import register_schema

register_schema("queue_leases", ["""
    CREATE TABLE queue_leases (
        queue TEXT PRIMARY KEY,
        owner TEXT NOT NULL,            -- the replica's node id
        expires TIMESTAMPTZ NOT NULL    -- the database's clock: replicas' clocks may differ
    )
    """], dialect="postgresql")
# The trigger takes the acceptance lock before it touches a counter: one lock order, no deadlock.
register_schema("queue_counters", ["""
    CREATE TABLE queue_counters (
        queue TEXT PRIMARY KEY,
        depth BIGINT NOT NULL,          -- pending requests
        exposure NUMERIC NOT NULL       -- sum of their amounts
    );
    INSERT INTO queue_counters (queue, depth, exposure)
        SELECT queue, count(*), coalesce(sum(amount::numeric), 0) FROM queue_items
        WHERE state = 'pending' GROUP BY queue;
    CREATE FUNCTION queue_counters_follow() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        PERFORM pg_advisory_xact_lock(hashtext('circuit-proxy queue acceptance'));
        IF TG_OP IN ('UPDATE', 'DELETE') AND OLD.state = 'pending' THEN
            UPDATE queue_counters SET depth = depth - 1, exposure = exposure - coalesce(OLD.amount::numeric, 0)
            WHERE queue = OLD.queue;
        END IF;
        IF TG_OP IN ('INSERT', 'UPDATE') AND NEW.state = 'pending' THEN
            INSERT INTO queue_counters AS c (queue, depth, exposure)
            VALUES (NEW.queue, 1, coalesce(NEW.amount::numeric, 0))
            ON CONFLICT (queue) DO UPDATE SET depth = c.depth + 1, exposure = c.exposure + excluded.exposure;
        END IF;
        RETURN NULL;
    END $$;
    CREATE TRIGGER queue_items_counters AFTER INSERT OR DELETE OR UPDATE OF queue, state, amount
        ON queue_items FOR EACH ROW EXECUTE FUNCTION queue_counters_follow()
    """], dialect="postgresql")

FLEET_LOCK = ("SELECT pg_advisory_xact_lock(hashtext('circuit-proxy queue acceptance'))", ())
FLEET_LOOKUP = (  # next id, the key's row, pending count, exposure: O(log n), whatever the backlog
    "SELECT (SELECT coalesce(max(id), 0) + 1 FROM queue_items),"
    " (SELECT id FROM queue_items WHERE queue = ? AND idempotency_key = ? ORDER BY id LIMIT 1),"
    " coalesce((SELECT depth FROM queue_counters WHERE queue = ?), 0),"
    " coalesce((SELECT exposure FROM queue_counters WHERE queue = ?), 0)")
FLEET_COUNTS = ("SELECT coalesce((SELECT depth FROM queue_counters WHERE queue = ?), 0),"
                " coalesce((SELECT exposure FROM queue_counters WHERE queue = ?), 0),"
                " (SELECT count(*) FROM queue_items WHERE queue = ? AND state = 'dead_letter')")

LEASE_MARGIN_S = 3.0  # beyond one send's timeout: time to commit its mark
LEASE_ROW = ("INSERT INTO queue_leases (queue, owner, expires) VALUES (?, '', '-infinity')"
             " ON CONFLICT (queue) DO NOTHING")
# One row: TRUE when this replica already held a live lease (renewed), FALSE when it took it
# afresh (free, or expired); no row: another replica holds it (or is claiming it right now).
CLAIM = ("WITH free AS (SELECT queue, owner, expires FROM queue_leases WHERE queue = ?"
         " AND (owner = ? OR expires < clock_timestamp()) FOR UPDATE SKIP LOCKED)"
         " UPDATE queue_leases SET owner = ?, expires = clock_timestamp() + make_interval(secs => ?)"
         " FROM free WHERE queue_leases.queue = free.queue"
         " RETURNING free.owner = queue_leases.owner AND free.expires >= clock_timestamp()")
RELEASE = "UPDATE queue_leases SET expires = '-infinity' WHERE queue = ? AND owner = ?"
