"""docker-compose.yml checked statically (no Docker engine here): in step with settings and CLI."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import yaml

from infra.settings import Settings
from tagstream.cli import get_args_parser

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((REPO / "docker-compose.yml").read_text())


def tagstream_services(compose: dict) -> dict[str, dict]:
    return {n: s for n, s in compose["services"].items() if s.get("image") == "tagstream:latest"}


def test_every_tagstream_variable_is_a_setting(compose) -> None:
    fields = set(Settings.model_fields)
    for name, service in tagstream_services(compose).items():
        for variable in service.get("environment", {}):
            assert variable.startswith("TAGSTREAM_"), (name, variable)
            assert variable.removeprefix("TAGSTREAM_").lower() in fields, (name, variable)


def test_every_command_parses_with_our_cli(compose) -> None:
    parser = get_args_parser()
    for name, service in tagstream_services(compose).items():
        command = service["command"]
        if command[0] == "faust":
            assert command[1:4] == ["-A", "processors", "worker"], name
            continue
        assert command[0] == "tagstream", name
        parser.parse_args(command[1:])  # SystemExit on an unknown command or flag


def test_dependencies_wait_for_health_and_required_values_fail_loudly(compose) -> None:
    services = compose["services"]
    for name, service in tagstream_services(compose).items():
        for dependency, condition in service.get("depends_on", {}).items():
            assert dependency in services, (name, dependency)
            wanted = "service_healthy" if "healthcheck" in services[dependency] else None
            if wanted:
                assert condition["condition"] == wanted, (name, dependency)
    text = (REPO / "docker-compose.yml").read_text()
    assert re.search(r"\$\{MODEL_DIR:\?[^}]+\}", text), "MODEL_DIR must be required with a message"
    infer = services["infer"]
    devices = infer["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["capabilities"] == ["gpu"]


def test_dockerfile_installs_every_package(compose) -> None:
    dockerfile = (REPO / "deploy" / "Dockerfile").read_text()
    for package in ("schemas", "producers", "processors", "models", "infra"):
        assert f"COPY {package} {package}" in dockerfile
    assert shlex.split(compose["x-tagstream"]["build"]["dockerfile"]) == ["deploy/Dockerfile"]
