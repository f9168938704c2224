"""The one database connection, its schemas and its batched writer: SQLite (embedded, one
process) or PostgreSQL (a fleet, §8), chosen by `storage_for` from the settings."""

from __future__ import annotations

from collections.abc import Mapping

from proxy.config.model import StorageSettings
from proxy.storage.base import BatchedStorage, StorageError
from proxy.storage.postgres import PostgresStorage
from proxy.storage.sqlite import Storage


def database_url(settings: StorageSettings, environ: Mapping[str, str]) -> str | None:
    """`storage.url`, or the value of the variable `storage.url_env` names; None: SQLite."""
    if settings.url is not None:
        return settings.url
    if settings.url_env is None:
        return None
    url = environ.get(settings.url_env, "").strip()
    if not url:
        raise StorageError(f"storage.url_env: the environment variable {settings.url_env} is not set")
    if not url.startswith(("postgresql://", "postgres://")):
        raise StorageError(f"storage.url_env: {settings.url_env} must hold a postgresql:// URL")
    return url


def storage_for(settings: StorageSettings, environ: Mapping[str, str]) -> BatchedStorage:
    """The storage the settings name, not yet open."""
    url = database_url(settings, environ)
    if url is None:
        return Storage(settings.path)
    return PostgresStorage(url)
