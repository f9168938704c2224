"""Walking composed YAML nodes with their key paths, collecting problems as `file:line: path: msg`.

Pure: no file or environment access; the loader hands in the composed document.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import yaml

from proxy.config.values import Invalid, unknown_key

# How YAML 1.1 reads some plain words, so a problem can say why `jitter: yes` is no number.
_YAML_READS = {
    "tag:yaml.org,2002:bool": "a boolean",
    "tag:yaml.org,2002:null": "null",
    "tag:yaml.org,2002:timestamp": "a date",
}


@dataclass(slots=True)
class Ctx:
    source: str
    loader: yaml.SafeLoader
    problems: list[str]

    def report(self, node: yaml.Node | None, path: str, message: str) -> None:
        where = f"{self.source}:{node.start_mark.line + 1}" if node is not None else self.source
        if node is not None:
            message = self.as_written(node, message)
        line = f"{where}: {path}: {message}" if path else f"{where}: {message}"
        if line not in self.problems:
            self.problems.append(line)

    def value(self, node: yaml.Node) -> Any:
        return self.loader.construct_object(node, deep=True)

    def as_written(self, node: yaml.Node, message: str) -> str:
        """Quote a value as the YAML spelled it: "not a number: 'yes' (YAML reads it as a
        boolean)", never "True". Looks at the node and its direct items only."""
        items = [node]
        if isinstance(node, yaml.SequenceNode):
            items += node.value
        elif isinstance(node, yaml.MappingNode):
            items += [value for _, value in node.value]
        for item in items:
            kind = _YAML_READS.get(item.tag) if isinstance(item, yaml.ScalarNode) else None
            if kind is None or item.style:  # quoted: a string, spelled as read
                continue
            try:
                shown = repr(self.value(item))
            except yaml.YAMLError:
                continue
            if shown in message:
                return message.replace(shown, f"{item.value!r} (YAML reads it as {kind})", 1)
        return message


def mapping(ctx: Ctx, node: yaml.Node, path: str) -> dict[str, tuple[yaml.Node, yaml.Node]] | None:
    """The mapping's entries by key, reporting non-mappings, odd keys and duplicates."""
    if is_null(node):
        return {}
    if not isinstance(node, yaml.MappingNode):
        ctx.report(node, path, "must be a mapping")
        return None
    if node.tag != "tag:yaml.org,2002:map":
        ctx.report(node, path, f"unsupported YAML tag {node.tag}")
        return None
    entries: dict[str, tuple[yaml.Node, yaml.Node]] = {}
    for key_node, value_node in node.value:
        key = key_node.value if isinstance(key_node, yaml.ScalarNode) else None
        if not isinstance(key, str):
            ctx.report(key_node, path, "keys must be strings")
            continue
        if key in entries:
            ctx.report(key_node, join(path, key), "duplicate key")
        entries[key] = (key_node, value_node)
    return entries


def is_null(node: yaml.Node) -> bool:
    return isinstance(node, yaml.ScalarNode) and node.tag == "tag:yaml.org,2002:null"


def join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def unknown_keys(ctx: Ctx, entries: Mapping[str, tuple[yaml.Node, yaml.Node]], known: Any, path: str) -> None:
    for key, (key_node, _) in entries.items():
        if key not in known:
            ctx.report(key_node, join(path, key), unknown_key(key, known))


def scalar(ctx: Ctx, node: yaml.Node, path: str, check: Callable[[Any], Any]) -> Any:
    try:
        return check(ctx.value(node))
    except Invalid as exc:
        ctx.report(node, path, str(exc))
    except yaml.MarkedYAMLError as exc:
        ctx.report(node, path, f"cannot read value: {exc.problem}")
    except yaml.YAMLError as exc:
        ctx.report(node, path, f"cannot read value: {exc}")
    return MISSING


MISSING = object()


def section_values(ctx: Ctx, node: yaml.Node | None, path: str,
             schema: Mapping[str, Callable[[Any], Any]]) -> dict[str, Any]:
    """Validate a flat mapping of scalars against `schema`; the valid values by key."""
    if node is None:
        return {}
    entries = mapping(ctx, node, path)
    if entries is None:
        return {}
    unknown_keys(ctx, entries, schema, path)
    values = {}
    for key, (_, value_node) in entries.items():
        if key in schema:
            value = scalar(ctx, value_node, join(path, key), schema[key])
            if value is not MISSING:
                values[key] = value
    return values


