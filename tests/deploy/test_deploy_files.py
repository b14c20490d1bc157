"""deploy/: the compose file, Kubernetes manifests and systemd units, checked offline.

Docker and a cluster cannot run here, so the files are validated statically: the
compose file against the compose-spec schema vendored in check-jsonschema, the
manifests against kubernetes-validate's bundled API schemas (strict: no unknown
fields). Every studybridge command they run must exist in our CLI, and every
STUDYBRIDGE_* variable they set must be a real setting (a typo would be silently
ignored at run time otherwise).
"""

from __future__ import annotations

import configparser
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from gateway.cli import app
from gateway.config import Settings
from tests.servers import missing

pytestmark = pytest.mark.fast

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
MANIFESTS = sorted((DEPLOY / "kubernetes").glob("*.yaml"))
UNITS = sorted((DEPLOY / "systemd").glob("*.service"))
SETTINGS_ENV = {f"STUDYBRIDGE_{name.upper()}" for name in Settings.model_fields} | {
    "STUDYBRIDGE_CONFIG",  # names the TOML file
    "STUDYBRIDGE_HOSTNAME",  # the proxy's, not the gateway's
}


def tool(name: str) -> str:
    path = shutil.which(name) or str(Path(sys.executable).with_name(name))
    if not Path(path).exists():
        missing(f"{name} is not installed (pip install '.[test]')")
    return path


def cli_commands() -> set[tuple[str, ...]]:
    """Every command path of the studybridge CLI, e.g. ("serve",), ("db", "backup")."""
    import typer.main

    group = typer.main.get_command(app)
    found: set[tuple[str, ...]] = set()

    def walk(cmd, prefix: tuple[str, ...]) -> None:
        for name, sub in getattr(cmd, "commands", {}).items():
            found.add((*prefix, name))
            walk(sub, (*prefix, name))

    walk(group, ())
    return found


def assert_command(words: list[str]) -> None:
    commands = cli_commands()
    path = tuple(w for w in words if not w.startswith("-"))
    assert any(path[: len(c)] == c for c in commands), f"no studybridge command {words}"


def test_compose_file_matches_the_compose_spec():
    result = subprocess.run(
        [
            tool("check-jsonschema"),
            "--builtin-schema",
            "vendor.compose-spec",
            str(DEPLOY / "docker-compose.yml"),
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_compose_stack_is_complete_and_consistent():
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    services = compose["services"]
    assert {"postgres", "minio", "redis", "gateway", "worker", "proxy"} <= services.keys()
    for name in ("gateway", "worker", "migrate"):
        service = services[name]
        assert_command(service["command"])
        for key in service["environment"]:
            assert key in SETTINGS_ENV, f"{name}: {key} is not a setting"
    example = (DEPLOY / "studybridge.env.example").read_text()
    for key in re.findall(r"^(STUDYBRIDGE_\w+)=", example, re.M):
        assert key in SETTINGS_ENV, f"studybridge.env.example: {key} is not a setting"
    assert services["gateway"]["healthcheck"]["test"][-1].find("/readyz") > 0


def test_kubernetes_manifests_validate_strictly():
    result = subprocess.run(
        [tool("kubernetes-validate"), "--strict", "-k", "1.30.0", *map(str, MANIFESTS)],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("passed") >= 10


def test_kubernetes_deployments_have_probes_limits_and_real_settings():
    docs = [d for path in MANIFESTS for d in yaml.safe_load_all(path.read_text()) if d]
    kinds = {(d["kind"], d["metadata"]["name"]) for d in docs}
    assert ("Deployment", "studybridge-gateway") in kinds
    assert ("Deployment", "studybridge-worker") in kinds
    for doc in docs:
        if doc["kind"] in ("ConfigMap", "Secret") and doc["metadata"]["name"] == "studybridge":
            values = doc.get("data") or doc.get("stringData")
            assert set(values) <= SETTINGS_ENV, set(values) - SETTINGS_ENV
        if doc["kind"] not in ("Deployment", "Job"):
            continue
        for container in doc["spec"]["template"]["spec"]["containers"]:
            assert_command(container["args"])
            assert {"requests", "limits"} <= container["resources"].keys()
            if doc["metadata"]["name"] == "studybridge-gateway":
                assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
                assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"


def test_systemd_units_run_real_commands():
    assert UNITS
    for path in UNITS:
        unit = configparser.ConfigParser(strict=False, interpolation=None)
        unit.optionxform = str  # keys are case-sensitive
        unit.read(path)
        assert {"Unit", "Service"} <= set(unit.sections()), path.name
        for key in ("ExecStart", "ExecStartPre"):
            line = unit["Service"].get(key)
            if line and "studybridge " in line:
                words = line.split("studybridge ", 1)[1].split()
                assert_command(words)
        for line in unit["Service"].get("Environment", "").split():
            name = line.split("=", 1)[0]
            assert name in SETTINGS_ENV, f"{path.name}: {name}"
    timers = sorted((DEPLOY / "systemd").glob("*.timer"))
    for timer in timers:
        assert timer.with_suffix(".service").exists(), timer.name
