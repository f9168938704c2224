"""The living demo: shop traffic through the proxy (`traffic`) and scripted outages
(`scenarios`) played through the fake upstreams' control API. Used by `circuit-proxy demo`
and `circuit-proxy scenario`; nothing below the CLI imports it."""
