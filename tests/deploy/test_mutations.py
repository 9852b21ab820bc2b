"""Each fault the deployment review planted must make the checks fail: the fault is applied
to a copy of the rendered example overlay, then the same checks as test_manifests.py run."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest

from tests.deploy import manifests as m
from tests.deploy.schemas import schema_problems

Obj = dict[str, Any]


def find(objects: list[Obj], kind: str, name: str) -> Obj:
    return next(o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name)


def container(objects: list[Obj], kind: str, name: str, container_name: str) -> Obj:
    spec = find(objects, kind, name)["spec"]["template"]["spec"]
    return next(c for c in spec["containers"] if c["name"] == container_name)


def pool_ingress_from_another_namespace(objects: list[Obj]) -> None:
    policy = find(objects, "NetworkPolicy", "usher-pool")
    policy["spec"]["ingress"][0]["from"] = [
        {
            "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "elsewhere"}},
            "podSelector": {"matchLabels": {"app.kubernetes.io/component": "scheduler"}},
        }
    ]


def scheduler_ingress_udp_only(objects: list[Obj]) -> None:
    policy = find(objects, "NetworkPolicy", "usher-scheduler")
    for port in policy["spec"]["ingress"][0]["ports"]:
        port["protocol"] = "UDP"


def service_monitor_honor_label_typo(objects: list[Obj]) -> None:
    endpoint = find(objects, "ServiceMonitor", "usher")["spec"]["endpoints"][0]
    endpoint["honorLabel"] = endpoint.pop("honorLabels")


def redis_limit_below_maxmemory(objects: list[Obj]) -> None:
    resources = container(objects, "StatefulSet", "usher-redis", "redis")["resources"]
    resources["limits"]["memory"] = resources["requests"]["memory"] = "1Gi"


def dns_policy_deleted(objects: list[Obj]) -> None:
    objects.remove(find(objects, "NetworkPolicy", "usher-allow-dns"))


def pool_budget_allows_nothing(objects: list[Obj]) -> None:
    find(objects, "PodDisruptionBudget", "usher-pool")["spec"]["maxUnavailable"] = 0


def gateway_liveness_on_health(objects: list[Obj]) -> None:
    gateway = container(objects, "Deployment", "usher-gateway", "gateway")
    gateway["livenessProbe"]["httpGet"]["path"] = "/health"


def schemas(build: m.Build) -> list[str]:
    return [p for obj in build.objects for p in schema_problems(obj)]


#: (fault, the check that must catch it).
FAULTS: dict[str, tuple[Callable[[list[Obj]], None], Callable[[m.Build], list[str]]]] = {
    "pool ingress only from another namespace": (
        pool_ingress_from_another_namespace,
        m.network_problems,
    ),
    "scheduler ingress UDP only": (scheduler_ingress_udp_only, m.network_problems),
    "ServiceMonitor honorLabel typo": (service_monitor_honor_label_typo, schemas),
    "Redis limit below its maxmemory": (redis_limit_below_maxmemory, m.redis_problems),
    "usher-allow-dns deleted": (dns_policy_deleted, m.network_problems),
    "Pool PDB maxUnavailable 0": (pool_budget_allows_nothing, m.pdb_problems),
    "gateway liveness on /health": (gateway_liveness_on_health, m.probe_problems),
}


@pytest.mark.parametrize("fault", FAULTS)
def test_each_planted_fault_fails_the_check(builds: dict[str, m.Build], fault: str) -> None:
    plant, check = FAULTS[fault]
    example = builds["example"]
    assert check(example) == [], "the example must pass before the fault is planted"
    objects = copy.deepcopy(example.objects)
    plant(objects)
    problems = check(m.Build("example+fault", objects))
    assert problems, f"{fault} went unnoticed"


def test_an_instance_allowing_longer_requests_needs_longer_drains(
    builds: dict[str, m.Build],
) -> None:
    objects = copy.deepcopy(builds["example"].objects)
    pool_config = next(o for o in objects if o["metadata"]["name"].startswith("usher-pool-config"))
    text = pool_config["data"]["pool.yaml"].replace(
        "  - id: gpu-c\n", "  - id: gpu-c\n    request_timeout_seconds: 3600\n"
    )
    assert text != pool_config["data"]["pool.yaml"]
    pool_config["data"]["pool.yaml"] = text
    assert any("3600" in p for p in m.drain_problems(m.Build("long", objects)))


def test_network_model_semantics(builds: dict[str, m.Build]) -> None:
    """The reasoning itself: AND of namespace and pod selectors, a podSelector alone is the
    policy's own namespace, protocols differ, named ports resolve on the destination."""
    build = builds["example"]
    pool, scheduler = m.usher_pod(build, "pool"), m.usher_pod(build, "scheduler")
    assert pool is not None and scheduler is not None
    lookalike = m.Endpoint.pod("other", dict(scheduler.labels or ()))
    assert m.traffic_allowed(build, scheduler, pool, 50052)
    assert not m.traffic_allowed(build, lookalike, pool, 50052)
    assert not m.traffic_allowed(build, scheduler, pool, 50052, "UDP")
    named = copy.deepcopy(build.objects)
    rule = find(named, "NetworkPolicy", "usher-pool")["spec"]["ingress"][0]
    rule["ports"] = [{"protocol": "TCP", "port": "grpc"}]
    assert m.traffic_allowed(m.Build("named", named), scheduler, pool, 50052)
    assert not m.traffic_allowed(m.Build("named", named), scheduler, pool, 9090)
