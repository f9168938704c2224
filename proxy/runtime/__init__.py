"""What lives while the proxy runs: breakers by name (the registry), metrics, stored state."""
