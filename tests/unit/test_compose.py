"""docker-compose.yml checked statically (no Docker engine here): in step with settings and CLI."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
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


# Prometheus and Grafana --------------------------------------------------------------------

PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="needs promtool (apt-get install prometheus; CI installs it)"
)
#: PromQL words that are not metric names.
PROMQL_WORDS = {
    "by", "without", "on", "ignoring", "group_left", "group_right", "bool", "offset",
    "and", "or", "unless", "inf", "nan",
}  # fmt: skip


def promql_metric_names(expr: str) -> set[str]:
    """The metric names an expression selects: what is left once strings, label matchers,
    ranges, groupings, functions, keywords and numbers are taken out."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', "", expr)  # strings
    expr = re.sub(r"\{[^}]*\}", "", expr)  # label matchers
    expr = re.sub(r"\[[^\]]*\]", "", expr)  # ranges
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", expr)
    names = set()
    for match in re.finditer(r"(?<![\w.$])([a-zA-Z_:][a-zA-Z0-9_:]*)\b(\s*\()?", expr):
        word, call = match.group(1), match.group(2)
        if call or word.lower() in PROMQL_WORDS:
            continue
        names.add(word)
    return names


def test_promql_names_are_found_in_what_grafana_writes() -> None:
    expr = (
        'histogram_quantile(0.99, sum by (le, stage) (rate(a_seconds_bucket{job="x"}'
        "[$__rate_interval]))) / on (job) group_left b_total offset 5m > bool 0.5e3"
    )
    assert promql_metric_names(expr) == {"a_seconds_bucket", "b_total"}


@needs_promtool
def test_promtool_accepts_the_compose_scrape_configuration() -> None:
    check = subprocess.run(
        [PROMTOOL, "check", "config", str(REPO / "deploy" / "prometheus.yml")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert check.returncode == 0, check.stdout + check.stderr


@needs_promtool
def test_promtool_accepts_the_configuration_tagstream_up_writes(tmp_path) -> None:
    from infra.prometheus import scrape_config
    from tagstream.up import metrics_targets

    ports = {"faust": 6066, "infer": 9101, "sink": 8088, "producer": 9102}
    path = tmp_path / "prometheus.yml"
    path.write_text(json.dumps(scrape_config(metrics_targets(ports), interval_s=1.0)))
    check = subprocess.run(
        [PROMTOOL, "check", "config", str(path)], capture_output=True, text=True, timeout=60
    )
    assert check.returncode == 0, check.stdout + check.stderr


def test_prometheus_scrapes_every_tagstream_service_where_it_serves(compose) -> None:
    config = yaml.safe_load((REPO / "deploy" / "prometheus.yml").read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    services = compose["services"]
    for name, service in tagstream_services(compose).items():
        if name in ("topics", "images"):  # runs once and exits; the demo's photo host
            continue
        (discovery,) = jobs[name]["dns_sd_configs"]  # Docker's DNS: scaled replicas too
        assert discovery["names"] == [name] and discovery["type"] == "A", name
        environment = {**compose["x-tagstream"]["environment"], **service["environment"]}
        if name == "faust":
            command = service["command"]
            port = int(command[command.index("--web-port") + 1])
        elif name == "sink":
            port = int(environment["TAGSTREAM_SINK_PORT"])
        else:
            port = int(environment["TAGSTREAM_METRICS_PORT"])
        assert discovery["port"] == port, name
        assert environment["TAGSTREAM_METRICS_HOST"] == "0.0.0.0", name  # reachable
    prometheus = services["prometheus"]
    assert "./deploy/prometheus.yml:/etc/prometheus/prometheus.yml:ro" in prometheus["volumes"]
    sink = services["sink"]["environment"]
    assert sink["TAGSTREAM_PROMETHEUS_URL"] == "http://prometheus:9090"


def grafana_dashboard() -> dict:
    return json.loads((REPO / "deploy" / "grafana" / "dashboards" / "tagstream.json").read_text())


def test_grafana_is_provisioned_with_prometheus_and_the_dashboard(compose) -> None:
    grafana = compose["services"]["grafana"]
    mounts = {}
    for volume in grafana["volumes"]:
        here, there = volume.split(":")[:2]
        assert (REPO / here).is_dir(), volume
        mounts[there] = REPO / here
    provisioning = mounts["/etc/grafana/provisioning"]
    (source,) = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())[
        "datasources"
    ]
    assert source["type"] == "prometheus" and source["url"] == "http://prometheus:9090"
    (provider,) = yaml.safe_load((provisioning / "dashboards" / "tagstream.yml").read_text())[
        "providers"
    ]
    served = mounts[provider["options"]["path"]]
    assert (served / "tagstream.json").is_file()
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home.startswith(provider["options"]["path"]) and home.endswith("tagstream.json")
    # Every panel queries that data source.
    for panel in grafana_dashboard()["panels"]:
        for target in panel.get("targets", []):
            assert target["datasource"]["uid"] == source["uid"], panel["title"]


def test_the_dashboard_uses_only_metrics_the_code_defines() -> None:
    from infra.metrics import exposed_names

    defined = exposed_names()
    used: set[str] = set()
    titles = []
    for panel in grafana_dashboard()["panels"]:
        titles.append(panel["title"].lower())
        for target in panel.get("targets", []):
            names = promql_metric_names(target["expr"])
            assert names, (panel["title"], target["expr"])
            unknown = names - set(defined)
            assert not unknown, f"panel {panel['title']!r} uses undefined {sorted(unknown)}"
            used |= names
    # What an operator asks first has a panel.
    for topic in ("throughput", "shed", "lag", "latency", "batch", "fetch failures"):
        assert any(topic in title for title in titles), topic
    assert {"tagstream_agent_tweets_shed_total", "tagstream_consumer_lag_messages"} <= used
    assert "tagstream_inference_batch_size_images_bucket" in used
