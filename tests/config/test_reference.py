"""docs/configuration.md and config/breakers.schema.json cannot drift: both are generated from
proxy/config/keys.py and the loader's own defaults, they must be current, and they must
describe exactly the keys the loader accepts. The schema takes the shipped config and refuses
a typo where the loader does."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from proxy.config import reference
from proxy.config.keys import BY_ID, SECTIONS
from proxy.config.load import ACCEPTED_KEYS, ConfigError, parse_settings
from proxy.config.model import POLICY_KEYS, Policy

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = ROOT / "config" / "breakers.yaml"


def test_the_committed_reference_and_schema_are_current():
    for path, text in reference.generated().items():
        assert path.read_text(encoding="utf-8") == text, f"{path} is stale: run python -m proxy.config.reference"
    done = subprocess.run([sys.executable, "-m", "proxy.config.reference", "--check"], cwd=ROOT,
                          capture_output=True, text=True, timeout=60, check=False)
    assert (done.returncode, done.stderr) == (0, "")


def test_every_key_the_loader_accepts_is_documented_and_no_other():
    assert [s.id for s in SECTIONS] == list(ACCEPTED_KEYS)
    for section_id, accepted in ACCEPTED_KEYS.items():
        if section_id in ("services.<service>", "routes.<route>"):  # the policy keys: their own section
            assert accepted[-len(POLICY_KEYS):] == POLICY_KEYS
            accepted = accepted[:-len(POLICY_KEYS)]
        assert sorted(k.name for k in BY_ID[section_id].keys) == sorted(accepted), section_id
    doc = reference.DOC.read_text(encoding="utf-8")
    for section in SECTIONS:
        for key in section.keys:
            assert f"| `{key.name}` |" in doc


def test_defaults_in_the_reference_are_the_loaders():
    doc = reference.DOC.read_text(encoding="utf-8")
    built = Policy()
    # A few rows, whole: type, default (read from the model), example.
    assert (f"| `failure_threshold` | integer ≥ 0 | `{built.failure_threshold}` | `failure_threshold: 5` | "
            "Consecutive failures that open the breaker (0 = off). Environment: `CIRCUIT_BREAKER_FAILURE_THRESHOLD`. |"
            ) in doc
    assert "| `failure_statuses` | list of HTTP status | `[500, 502, 503, 504]` |" in doc
    assert "| `max_age_s` | number ≥ 0.001 | `3600` |" in doc  # from the cache fallback's own check
    assert "| `retry_base_ms` | integer ≥ 1 | `500` |" in doc
    assert "| `upstream` | string | **required** |" in doc


def validator() -> jsonschema.Draft7Validator:
    schema = json.loads(reference.SCHEMA.read_text(encoding="utf-8"))
    jsonschema.Draft7Validator.check_schema(schema)
    return jsonschema.Draft7Validator(schema)


def test_the_shipped_config_names_the_schema_and_the_reference_and_passes_it():
    text = SHIPPED.read_text(encoding="utf-8")
    assert text.splitlines()[0] == "# yaml-language-server: $schema=./breakers.schema.json"
    assert "docs/configuration.md" in text
    assert list(validator().iter_errors(yaml.safe_load(text))) == []


def _set(path: tuple[str, ...], key: str, value: Any):
    def mutate(document: dict) -> None:
        node = document
        for part in path:
            node = node[part]
        node[key] = value
    return mutate


CHARGES = ("services", "payment", "routes", "charges")


@pytest.mark.parametrize(("mutate", "where", "message"), [
    (_set(("defaults",), "timout_ms", 5), ["defaults"], "'timout_ms' was unexpected"),
    (_set(("services", "inventory", "routes", "stock", "fallback"), "max_age", 5),
     ["services", "inventory", "routes", "stock", "fallback"], "'max_age' was unexpected"),
    (_set(("defaults",), "jitter", True), ["defaults", "jitter"], "True is not of type 'number'"),
    (_set(("services", "payment"), "tls", {"ca_fle": "x"}), ["services", "payment", "tls"], "'ca_fle' was unexpected"),
    (_set((*CHARGES, "match"), "pth", "/x"), [*CHARGES, "match"], "'pth' was unexpected"),
    (_set(CHARGES, "retry", {"attempts": 11}), [*CHARGES, "retry", "attempts"], "11 is greater than the maximum of 10"),
    (_set(("services",), "status", {"upstream": "http://h:1"}), ["services"], "should not be valid"),
    (_set(("services", "shipping", "routes", "quotes", "fallback", "rows", "eu"), "cst", 1),
     ["services", "shipping", "routes", "quotes", "fallback", "rows", "eu"], "'cst' was unexpected"),
    # What the loader checks across keys, as far as a schema can say it.
    (_set(("services", "notification", "window"), "size", 20), ["services", "notification", "window"],
     "should not be valid under {'required': ['size']}"),
    (_set((*CHARGES, "match"), "path_regex", "/x.*"), [*CHARGES, "match"], "should not be valid"),
    (_set((), "storage", {"url": "postgresql://proxy@db/shop", "url_env": "DATABASE_URL"}), ["storage"],
     "should not be valid"),
    (_set(("services", "notification", "routes", "notifications", "fallback"), "floor_limit", 5),
     ["services", "notification", "routes", "notifications", "fallback"], "'amount_field' is a dependency"),
])
def test_the_schema_refuses_what_the_loader_refuses(mutate, where, message):
    document = yaml.safe_load(SHIPPED.read_text(encoding="utf-8"))
    mutate(document)
    error = jsonschema.exceptions.best_match(validator().iter_errors(document))
    assert (list(error.absolute_path), message in error.message) == (where, True), error.message
    with pytest.raises(ConfigError):  # and the loader refuses it too
        parse_settings(yaml.safe_dump(document), source="F", environ={}, config_path=SHIPPED)


@pytest.mark.parametrize("section_id", ["server", "defaults", "retry", "probe", "match"])
def test_every_example_is_a_value_the_loader_and_the_schema_take(section_id):
    wrap = {"server": lambda k: {"server": k}, "defaults": lambda k: {"defaults": k},
            "retry": lambda k: {"defaults": {"retry": k}},
            "probe": lambda k: {"defaults": {"probe": {"path": "/healthz", **k}}},
            "match": lambda k: {"services": {"a": {"upstream": "http://h:1", "routes": {"r": {"match": k}}}}}}
    for key in BY_ID[section_id].keys:
        if section_id == "match" and key.name == "path_regex":
            continue  # either path or path_regex: checked alone below
        document = {"services": {"a": {"upstream": "http://h:1"}}}
        document.update(wrap[section_id]({key.name: yaml.safe_load(key.example)}))
        parse_settings(yaml.safe_dump(document), source="F", environ={}, config_path=SHIPPED)
        assert list(validator().iter_errors(document)) == [], key.name


def test_the_reference_is_linked_and_nothing_points_outside_the_repo():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert "docs/configuration.md" in readme
    for path in (ROOT / "README.md", reference.DOC, SHIPPED, ROOT / "docs" / "fallbacks.md"):
        assert "../shared" not in path.read_text(encoding="utf-8"), path
        assert "CONTRACT.md" not in path.read_text(encoding="utf-8"), path


def test_an_edited_description_makes_the_committed_files_stale(monkeypatch):
    server = BY_ID["server"]
    edited = dataclasses.replace(server.keys[0], text="Edited.")
    sections = tuple(dataclasses.replace(s, keys=(edited, *s.keys[1:])) if s is server else s for s in SECTIONS)
    monkeypatch.setattr(reference, "SECTIONS", sections)
    assert "| `host` | string | `127.0.0.1` | `host: 127.0.0.1` | Edited. |" in reference.markdown()
    assert reference.markdown() != reference.DOC.read_text(encoding="utf-8")


def test_the_reference_examples_are_configs_the_loader_and_the_schema_take():
    doc = reference.DOC.read_text(encoding="utf-8")
    blocks = [block.split("```", 1)[0] for block in doc.split("```yaml\n")[1:]]
    configs = [block for block in blocks if "services:" in block]
    assert configs  # the small file of the introduction
    for block in configs:
        settings = parse_settings(block, source="doc", environ={}, config_path=SHIPPED)
        assert [r.breaker_name for r in settings.routes()] == [
            "payment.charges", "payment.default", "inventory.stock", "inventory.default"]
        assert list(validator().iter_errors(yaml.safe_load(block))) == []
