"""deploy/ingress: the streaming Ingress example is a valid object for every supported
Kubernetes version, points at the gateway's Service and port, and keeps the settings
streaming needs (the README says why)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from tests.deploy.schemas import schema_problems

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
EXAMPLE = DEPLOY / "ingress" / "ingress-nginx.yaml"


def _gateway_service() -> dict[str, Any]:
    for doc in yaml.safe_load_all((DEPLOY / "k8s/base/gateway.yaml").read_text()):
        if doc and doc["kind"] == "Service":
            return dict(doc)
    raise AssertionError("no gateway Service in the base")


def test_the_ingress_example_is_valid_and_streams() -> None:
    (ingress,) = [d for d in yaml.safe_load_all(EXAMPLE.read_text()) if d]
    assert schema_problems(ingress) == []
    notes = ingress["metadata"]["annotations"]
    assert int(notes["nginx.ingress.kubernetes.io/proxy-read-timeout"]) >= 600
    assert int(notes["nginx.ingress.kubernetes.io/proxy-send-timeout"]) >= 600
    assert notes["nginx.ingress.kubernetes.io/proxy-buffering"] == "off"
    service = _gateway_service()
    ports = {p["name"] for p in service["spec"]["ports"]}
    paths = ingress["spec"]["rules"][0]["http"]["paths"]
    for path in paths:
        backend = path["backend"]["service"]
        assert backend["name"] == service["metadata"]["name"]
        assert backend["port"]["name"] in ports
    served = {p["path"] for p in paths}
    assert {"/api", "/v1", "/queue", "/ui"} <= served
    assert "/metrics" not in served
