"""The states of an exchange, shared by `exchange` and its mixins (`answering`, `retrying`)."""

# WAITING: permit held, body being buffered; CONNECTING: opening an upstream connection;
# SENT: request head on its way, no answer yet; STREAMING: the answer is being relayed;
# FALLBACK: the route's fallback is answering; DONE: answered or given up;
# RETRY_WAIT: backing off before the next attempt (§3b).
WAITING, CONNECTING, SENT, STREAMING, FALLBACK, DONE, RETRY_WAIT = range(7)
