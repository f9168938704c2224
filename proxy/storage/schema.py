"""Which tables each component needs: migrations registered at import, applied by `open`.

A component (`queue`, `fallback_logs`, …) declares its migrations once, oldest first, in SQL
written for SQLite; the PostgreSQL storage translates the column types. A component may exist
on one engine only (the fleet's lease table). Each storage records in `schema_versions` how far
each component got.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping, Sequence

_SCHEMAS: dict[str, tuple[str, ...]] = {}
_DIALECTS: dict[str, str] = {}  # component → the only dialect it exists on
COMPONENT = re.compile(r"[a-z][a-z0-9_]*")


class StorageError(Exception):
    """The database cannot be opened, migrated or written."""


def register_schema(component: str, migrations: Sequence[str], *, dialect: str | None = None) -> None:
    """Declare a component's migrations, oldest first; each is one SQL script.

    Append to the list to change a schema; never edit a migration that has shipped. With
    `dialect` ("sqlite", "postgresql") the component exists on that engine only.
    """
    if not COMPONENT.fullmatch(component):
        raise ValueError(f"component names use a-z, 0-9 and _, got {component!r}")
    known = _SCHEMAS.get(component)
    if known is not None and (known != tuple(migrations) or _DIALECTS.get(component) != dialect):
        raise ValueError(f"schema of component {component!r} registered twice, differently")
    _SCHEMAS[component] = tuple(migrations)
    if dialect is not None:
        _DIALECTS[component] = dialect


def registered_schemas(dialect: str | None = None) -> dict[str, tuple[str, ...]]:
    """Every registered schema; with `dialect`, those that exist on it."""
    return {component: migrations for component, migrations in _SCHEMAS.items()
            if dialect is None or _DIALECTS.get(component, dialect) == dialect}


def pending_migrations(schemas: Mapping[str, Sequence[str]], versions: Mapping[str, int],
                       where: str) -> Iterator[tuple[str, int, str]]:
    """(component, version, script) of every migration not applied yet, in order; an unknown
    component name or a schema newer than this program's is a StorageError (`where` names
    the database in the message)."""
    for component, migrations in sorted(schemas.items()):
        if not COMPONENT.fullmatch(component):
            raise StorageError(f"component names use a-z, 0-9 and _, got {component!r}")
        current = versions.get(component, 0)
        if current > len(migrations):
            raise StorageError(f"{where}: schema of {component} is version {current}, "
                               f"newer than this program's {len(migrations)}")
        for number, script in enumerate(migrations[current:], start=current + 1):
            yield component, number, script
