"""(service, method, path) → route target, compiled once per config.

Pure: no asyncio, aiohttp, SQLite or Prometheus. Paths here are the raw (still
percent-encoded) request paths, so what is matched is what is forwarded.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Generic, TypeVar
from urllib.parse import unquote

if TYPE_CHECKING:
    from proxy.config.model import Route, Service


T = TypeVar("T")

_DOT_SEGMENTS = frozenset({".", ".."})


def has_dot_segment(raw_path: str) -> bool:
    """True when any segment is `.` or `..`, also percent-encoded (`%2e`, `%2E%2e`)."""
    for segment in raw_path.split("/"):
        if segment in _DOT_SEGMENTS or ("%" in segment and unquote(segment) in _DOT_SEGMENTS):
            return True
    return False


@dataclass(frozen=True, slots=True)
class _Matcher(Generic[T]):
    methods: frozenset[str] | None
    prefix: str | None
    pattern: re.Pattern[str] | None
    target: T

    def matches(self, method: str, path: str) -> bool:
        if self.methods is not None and method not in self.methods:
            return False
        if self.prefix is not None:
            # A path-segment prefix: /charges matches /charges and /charges/x, not /chargesX.
            prefix = self.prefix
            if prefix != "/" and not (path == prefix or path.startswith(prefix)
                                      and path[len(prefix)] == "/"):
                return False
        if self.pattern is not None and self.pattern.fullmatch(path) is None:
            return False
        return True


class Router(Generic[T]):
    """Routes of every service, in config order; the last route of a service is `default`."""

    __slots__ = ("_services", "catch_all")

    def __init__(self, services: Iterable[Service], target_for: Callable[[Route], T]) -> None:
        self._services: dict[str, tuple[_Matcher[T], ...]] = {}
        # Services whose first route takes every request (most have only `default`): no
        # matching to do, and a caller may look here before decoding what `resolve` needs.
        self.catch_all: dict[str, T] = {}
        for service in services:
            matchers = []
            for route in service.routes:
                match = route.match
                pattern = re.compile(match.path_regex) if match.path_regex else None
                matchers.append(_Matcher(match.methods, match.path, pattern, target_for(route)))
            self._services[service.name] = tuple(matchers)
            first = matchers[0] if matchers else None
            if first is not None and first.methods is None and first.prefix in (None, "/") \
                    and first.pattern is None:
                self.catch_all[service.name] = first.target

    def services(self) -> list[str]:
        return list(self._services)

    def resolve(self, service: str, method: str, path: str) -> T | None:
        """The first matching route's target, or None for an unknown service.

        `path` is the part after `/<service>`, starting with `/`.
        """
        target = self.catch_all.get(service)
        if target is not None:
            return target
        matchers = self._services.get(service)
        if matchers is None:
            return None
        for matcher in matchers:
            if matcher.matches(method, path):
                return matcher.target
        return matchers[-1].target  # unreachable while `default` matches everything


def split_service(raw_path: str) -> tuple[str, str]:
    """`/payment/charges/x` → (`payment`, `/charges/x`); `/payment` → (`payment`, `/`)."""
    slash = raw_path.find("/", 1)
    if slash == -1:
        return raw_path[1:], "/"
    return raw_path[1:slash], raw_path[slash:]
