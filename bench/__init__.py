"""circuit-proxy benchmarks (see README.md)."""
