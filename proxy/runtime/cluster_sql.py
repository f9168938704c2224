"""The fleet's tables in PostgreSQL (§8 `cluster`) and every statement `runtime/cluster.py` runs.

Made by the proxy itself (`CREATE … IF NOT EXISTS` under an advisory lock, so proxies starting
together do not race). Liveness and row order use the database's clock (`now()`,
`clock_timestamp()`), never a proxy's; only `retry_at_wall` and `opened_at_wall` are the
opening proxy's wall clock, since every proxy adopts them as they are (docs/scale-out.md,
clock skew). Plain text: nothing here connects or awaits.
"""

from __future__ import annotations

CHANNEL = "circuit_proxy_cluster"  # NOTIFY payload: the sending node's id

_LOCK_KEY = 0x63_70_63_6C  # "cpcl": the schema lock, any constant the proxies share

SCHEMA = [
    f"SELECT pg_advisory_xact_lock({_LOCK_KEY})",
    """
    CREATE TABLE IF NOT EXISTS cluster_nodes (
        node_id TEXT PRIMARY KEY,
        started_at TIMESTAMPTZ NOT NULL DEFAULT now(),
        heartbeat_at TIMESTAMPTZ NOT NULL          -- database time; stale = the node is gone
    )""",
    """
    CREATE TABLE IF NOT EXISTS cluster_breakers (
        breaker TEXT NOT NULL,                     -- <service>.<route>
        node_id TEXT NOT NULL,
        state TEXT NOT NULL,                       -- the node's own breaker state
        reason TEXT NOT NULL,                      -- of its last transition (core.transitions)
        opened_at_wall DOUBLE PRECISION,           -- epoch seconds, the opening node's clock
        retry_at_wall DOUBLE PRECISION,            -- epoch seconds; open only
        open_count INTEGER NOT NULL,               -- the backoff step
        updated_at TIMESTAMPTZ NOT NULL,           -- database time of the write: orders rows
        episode_at TIMESTAMPTZ NOT NULL,           -- when its current open/half-open spell began
        PRIMARY KEY (breaker, node_id)
    )""",
    """
    CREATE TABLE IF NOT EXISTS cluster_trials (
        breaker TEXT PRIMARY KEY,                  -- one half-open trial for the whole fleet
        node_id TEXT NOT NULL,                     -- the node that runs it
        expires_at TIMESTAMPTZ NOT NULL            -- renewed while it runs; then anyone may claim
    )""",
    """
    CREATE TABLE IF NOT EXISTS cluster_actions (
        id BIGSERIAL PRIMARY KEY,                  -- the order every node applies them in
        breaker TEXT NOT NULL,
        action TEXT NOT NULL,                      -- force-open | force-closed | disable | reset
        node_id TEXT NOT NULL,                     -- where the operator acted
        at TIMESTAMPTZ NOT NULL DEFAULT now()
    )""",
]

HEARTBEAT = ("INSERT INTO cluster_nodes (node_id, heartbeat_at) VALUES ($1, now())"
             " ON CONFLICT (node_id) DO UPDATE SET heartbeat_at = now()")

WRITE_ROW = (
    "INSERT INTO cluster_breakers (breaker, node_id, state, reason, opened_at_wall, retry_at_wall,"
    " open_count, updated_at, episode_at)"
    " VALUES ($1, $2, $3, $4, $5, $6, $7, clock_timestamp(), clock_timestamp())"
    " ON CONFLICT (breaker, node_id) DO UPDATE SET state = excluded.state,"
    " reason = excluded.reason, opened_at_wall = excluded.opened_at_wall,"
    " retry_at_wall = excluded.retry_at_wall, open_count = excluded.open_count,"
    " updated_at = excluded.updated_at,"
    # A spell of open and half-open begins when the row enters it; the fleet's trial closes
    # only the spells that began before it succeeded.
    " episode_at = CASE WHEN cluster_breakers.state IN ('open', 'half_open')"
    " AND excluded.state IN ('open', 'half_open') THEN cluster_breakers.episode_at"
    " ELSE excluded.updated_at END"
    # The same row again (a reconnect writes them all) keeps its time: it orders changes only.
    " WHERE (cluster_breakers.state, cluster_breakers.reason, cluster_breakers.opened_at_wall,"
    " cluster_breakers.retry_at_wall, cluster_breakers.open_count) IS DISTINCT FROM"
    " (excluded.state, excluded.reason, excluded.opened_at_wall, excluded.retry_at_wall,"
    " excluded.open_count)")

# A node that left half-open gives its trial back.
RELEASE_TRIAL = "DELETE FROM cluster_trials WHERE breaker = $1 AND node_id = $2"

# Claim (or renew) the fleet's trial: taken only when free, expired, or already ours.
CLAIM_TRIAL = (
    "INSERT INTO cluster_trials (breaker, node_id, expires_at)"
    " VALUES ($1, $2, now() + make_interval(secs => $3))"
    " ON CONFLICT (breaker) DO UPDATE SET node_id = excluded.node_id, expires_at = excluded.expires_at"
    " WHERE cluster_trials.node_id = excluded.node_id OR cluster_trials.expires_at < now()"
    " RETURNING node_id")

# Every breaker row of every live node (this one included).
LIVE_ROWS = (
    "SELECT b.breaker, b.node_id, b.state, b.reason, b.opened_at_wall, b.retry_at_wall,"
    " b.open_count, extract(epoch FROM b.updated_at)::float8 AS updated,"
    " extract(epoch FROM b.episode_at)::float8 AS episode"
    " FROM cluster_breakers b JOIN cluster_nodes n ON n.node_id = b.node_id"
    " WHERE n.heartbeat_at > now() - make_interval(secs => $1)")

LIVE_NODES = "SELECT count(*) FROM cluster_nodes WHERE heartbeat_at > now() - make_interval(secs => $1)"

ADD_ACTION = "INSERT INTO cluster_actions (breaker, action, node_id) VALUES ($1, $2, $3)"
ACTIONS_SINCE = "SELECT id, breaker, action, node_id FROM cluster_actions WHERE id > $1 ORDER BY id"
# At start: where each breaker's manual state stands now, and where to read on from.
LATEST_ACTIONS = ("SELECT DISTINCT ON (breaker) breaker, action FROM cluster_actions"
                  " ORDER BY breaker, id DESC")
LAST_ACTION_ID = "SELECT coalesce(max(id), 0) FROM cluster_actions"

NOTIFY = "SELECT pg_notify($1, $2)"

# Nodes gone for an hour (a pod replaced, a host renamed) and what they left behind.
PRUNE = [
    "DELETE FROM cluster_breakers b WHERE NOT EXISTS (SELECT 1 FROM cluster_nodes n"
    " WHERE n.node_id = b.node_id AND n.heartbeat_at > now() - interval '1 hour')",
    "DELETE FROM cluster_trials t WHERE t.expires_at < now() - interval '1 hour'",
    "DELETE FROM cluster_nodes WHERE heartbeat_at < now() - interval '1 hour'",
]

# A clean stop: this node's rows and trials go, so nobody counts it while it is gone.
LEAVE = [
    "DELETE FROM cluster_trials WHERE node_id = $1",
    "DELETE FROM cluster_breakers WHERE node_id = $1",
    "DELETE FROM cluster_nodes WHERE node_id = $1",
]
