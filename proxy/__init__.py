"""circuit-proxy: a circuit-breaking HTTP sidecar with useful fallbacks."""

__version__ = "0.1.0"
