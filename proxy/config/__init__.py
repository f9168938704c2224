"""The configuration model (frozen dataclasses) and its one validating loader.

Pure: `circuit-proxy check` loads this package and nothing else."""
