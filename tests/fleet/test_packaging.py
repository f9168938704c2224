"""What can be checked of the packaging without docker or a cluster: the Dockerfile, the
Kubernetes manifests and the systemd unit agree with the proxy's own command line and config.

The ConfigMap's config goes through the proxy's own loader (what `circuit-proxy check` runs),
in a folder laid out as the image lays it out: config/ beside fallback_responses/.
"""

from __future__ import annotations

import json
import shlex
import shutil
import tomllib
from fnmatch import fnmatch
from pathlib import Path

import pytest
import yaml

from proxy.cli import _parser
from proxy.config.load import load_settings

ROOT = Path(__file__).resolve().parent.parent.parent
K8S = ROOT / "deploy" / "kubernetes"


def dockerfile() -> list[tuple[str, str]]:
    """(instruction, arguments) of the final stage, continuation lines joined."""
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]
    stages: list[list[tuple[str, str]]] = []
    for line in lines:
        instruction, _, rest = line.partition(" ")
        if instruction.upper() == "FROM":
            stages.append([])
        stages[-1].append((instruction.upper(), rest.strip()))
    return stages[-1]


def one(instructions: list[tuple[str, str]], name: str) -> str:
    found = [rest for instruction, rest in instructions if instruction == name]
    assert len(found) == 1, (name, found)
    return found[0]


def manifests() -> dict[str, dict]:
    """Every Kubernetes object in deploy/kubernetes, by "Kind/name"."""
    objects = {}
    for path in sorted(K8S.glob("*.yaml")):
        for document in yaml.safe_load_all(path.read_text()):
            assert document["apiVersion"] and document["metadata"]["name"], path
            objects[f"{document['kind']}/{document['metadata']['name']}"] = document
    return objects


def sidecar(objects: dict[str, dict]) -> dict:
    pod = objects["Deployment/shop"]["spec"]["template"]["spec"]
    return next(c for c in pod["containers"] if c["name"] == "circuit-proxy")


def config_text(objects: dict[str, dict]) -> str:
    return objects["ConfigMap/circuit-proxy-config"]["data"]["breakers.yaml"]


def test_the_image_is_slim_non_root_and_runs_the_proxy_on_its_exposed_port():
    stage = dockerfile()
    assert one(stage, "FROM") == "python:3.11-slim"
    user = one(stage, "USER")
    assert user.split(":")[0] not in ("0", "root")
    command = json.loads(one(stage, "CMD"))
    args = _parser().parse_args(command[1:])
    assert command[0] == "circuit-proxy" and args.command == "run"
    assert args.config == "/etc/circuit-proxy/config/breakers.yaml"
    assert one(stage, "EXPOSE") == str(args.port) == "8080"
    healthcheck = one(stage, "HEALTHCHECK")
    assert f"http://127.0.0.1:{args.port}/healthz" in healthcheck
    # The shipped config and fallback files are where the command and the loader look.
    copies = [rest.split() for instruction, rest in stage if instruction == "COPY" and "--from" not in rest]
    assert ["config/breakers.yaml", args.config] in copies
    assert ["fallback_responses", str(Path(args.config).parent.parent / "fallback_responses")] in copies


def test_the_build_context_keeps_what_the_image_copies():
    ignored = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")]
    text = (ROOT / "Dockerfile").read_text()
    sources = []
    for line in text.splitlines():
        if line.startswith("COPY ") and "--from" not in line:
            sources += line.split()[1:-1]
    assert sources, "no COPY found"
    for source in sources:
        assert (ROOT / source).exists(), source
        assert not any(fnmatch(source, pattern) or source.startswith(pattern + "/") for pattern in ignored), source


def test_the_manifests_parse_and_name_each_other():
    objects = manifests()
    assert {"ConfigMap/circuit-proxy-config", "Secret/circuit-proxy-db", "Deployment/shop", "Service/shop",
            "PodDisruptionBudget/shop"} <= set(objects)
    deployment = objects["Deployment/shop"]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert objects["PodDisruptionBudget/shop"]["spec"]["selector"]["matchLabels"].items() <= labels.items()
    pod = deployment["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    container = sidecar(objects)
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    command = _parser().parse_args(container["command"][1:])
    assert volumes[mounts[str(Path(command.config).parent)]]["configMap"]["name"] == "circuit-proxy-config"
    for variable in container["env"]:
        ref = variable["valueFrom"]["secretKeyRef"]
        assert ref["key"] in objects[f"Secret/{ref['name']}"]["stringData"]
    for each in pod["containers"]:
        assert each["resources"]["requests"] and each["resources"]["limits"], each["name"]


def test_the_configmap_config_passes_the_proxys_check_and_matches_the_probes(tmp_path):
    objects = manifests()
    container = sidecar(objects)
    (tmp_path / "config").mkdir()
    shutil.copytree(ROOT / "fallback_responses", tmp_path / "fallback_responses")  # as the image has them
    path = tmp_path / "config" / "breakers.yaml"
    path.write_text(config_text(objects))
    environ = {variable["name"]: "postgresql://u:p@db:5432/shop" for variable in container["env"]}
    settings = load_settings(path, environ)  # raises ConfigError with every problem, as `check` prints
    # The database URL comes from the Secret through storage.url_env, never from the file.
    assert settings.storage.url is None
    assert settings.storage.url_env in {v["name"] for v in container["env"]}
    assert settings.cluster.share_breakers and settings.cluster.quorum >= 1
    assert settings.admin.token_env in {v["name"] for v in container["env"]}
    command = _parser().parse_args(container["command"][1:])
    port = command.port or settings.server.port
    host = command.host or settings.server.host
    assert host == "0.0.0.0"  # probes and scrapes come to the pod's IP
    assert [p["containerPort"] for p in container["ports"]] == [port]
    for probe in ("readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"] == {"path": "/healthz", "port": port}
    annotations = objects["Deployment/shop"]["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == str(port) and annotations["prometheus.io/path"] == "/metrics"
    grace = objects["Deployment/shop"]["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace > settings.server.drain_timeout_s
    # The shop reaches its upstreams through the sidecar, one configured service each.
    shop = next(c for c in objects["Deployment/shop"]["spec"]["template"]["spec"]["containers"]
                if c["name"] == "shop")
    targets = {v["value"] for v in shop["env"] if v["name"].endswith("_URL")}
    assert targets == {f"http://127.0.0.1:{port}/{s.name}" for s in settings.services}


def test_the_configmap_check_fails_without_the_secret(tmp_path):
    """The check is real: the same config without its database variable is refused."""
    from proxy.config.load import ConfigError  # noqa: PLC0415
    (tmp_path / "config").mkdir()
    shutil.copytree(ROOT / "fallback_responses", tmp_path / "fallback_responses")
    path = tmp_path / "config" / "breakers.yaml"
    path.write_text(config_text(manifests()).replace("url_env: CIRCUIT_PROXY_DATABASE_URL", "path: x.db"))
    with pytest.raises(ConfigError) as problem:
        load_settings(path, {})
    assert any("cluster.share_breakers" in line for line in problem.value.problems)


def test_the_systemd_unit_runs_the_installed_command():
    unit = (ROOT / "deploy" / "systemd" / "circuit-proxy.service").read_text()
    entries = {}
    for line in unit.splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            entries.setdefault(key.strip(), value.strip())
    argv = shlex.split(entries["ExecStart"])
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert Path(argv[0]).is_absolute() and Path(argv[0]).name in scripts
    args = _parser().parse_args(argv[1:])
    assert args.command == "run" and Path(args.config).is_absolute()
    check = shlex.split(entries["ExecStartPre"])
    assert check[0] == argv[0] and _parser().parse_args(check[1:]).command == "check"
    assert entries["User"] not in ("root", "0") and entries["ExecReload"].endswith("-HUP $MAINPID")


def test_the_image_installs_every_library_the_proxy_imports():
    """`pip install .` in the Dockerfile brings the declared dependencies and what they require:
    each third-party module imported anywhere under proxy/ must come with them."""
    import ast  # noqa: PLC0415
    import sys  # noqa: PLC0415
    from importlib.metadata import PackageNotFoundError, packages_distributions, requires  # noqa: PLC0415

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared: set[str] = set()
    todo = [_dist_name(spec) for spec in project["dependencies"] if "extra ==" not in spec]
    while todo:  # the closure: a declared library's own requirements are installed too
        name = todo.pop()
        if name in declared:
            continue
        declared.add(name)
        try:
            todo += [_dist_name(r) for r in requires(name) or [] if "extra ==" not in r]
        except PackageNotFoundError:
            pass  # not installed here (another platform's marker): nothing more to follow
    imported: set[str] = set()
    for path in (ROOT / "proxy").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                imported.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                imported.add(node.module.split(".")[0])
    third_party = imported - set(sys.stdlib_module_names) - {"proxy", "fake_upstreams", "__future__"}
    by_module = packages_distributions()
    missing = {module for module in third_party
               if not {_dist_name(d) for d in by_module.get(module, [module])} & declared}
    assert not missing, f"imported by proxy/ but not in pyproject dependencies: {sorted(missing)}"


def _dist_name(spec: str) -> str:
    for stop in "<>=!~;[ ":
        spec = spec.split(stop)[0]
    return spec.strip().lower().replace("_", "-")
