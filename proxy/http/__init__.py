"""The HTTP server, the exchange per proxied request, deadlines, the upstream pool, wire bytes."""
