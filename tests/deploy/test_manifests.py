"""The rendered manifests: schemas, references, settings loaded with the services' own
code, drain arithmetic, disruption budgets, probes, Redis, NetworkPolicies, monitoring."""

from __future__ import annotations

import pytest

from tests.deploy import manifests as m
from tests.deploy.observability import read_contract, rule_problems
from tests.deploy.schemas import schema_problems

#: Builds made of the bare base keep the CHANGE-ME templates: production mode refuses them.
TEMPLATE_BUILDS = {"base"}


def test_every_object_matches_its_schema(build: m.Build) -> None:
    assert [p for obj in build.objects for p in schema_problems(obj)] == []


def test_references_resolve(build: m.Build) -> None:
    assert m.reference_problems(build) == []


def test_settings_load_with_the_services_code(build: m.Build) -> None:
    problems = m.settings_problems(build)
    if build.name in TEMPLATE_BUILDS:
        # The templates are refused, each service naming the placeholders.
        assert problems
        assert all("placeholder" in p for p in problems), problems
    else:
        assert problems == []


def test_drain_covers_the_longest_request(build: m.Build) -> None:
    assert m.drain_problems(build) == []


def test_disruption_budgets(build: m.Build) -> None:
    assert m.pdb_problems(build) == []


def test_probes(build: m.Build) -> None:
    assert m.probe_problems(build) == []


def test_redis_is_protected(build: m.Build) -> None:
    assert m.redis_problems(build) == []


def test_network_policies(build: m.Build) -> None:
    assert m.network_problems(build) == []


def test_service_monitor_scrapes_every_metrics_port(build: m.Build) -> None:
    assert m.monitor_problems(build) == []


def test_prometheus_rules_in_the_build(build: m.Build) -> None:
    contract = read_contract(m.REPO / "deploy/METRICS.md")
    for rules in build.by_kind.get("PrometheusRule", {}).values():
        assert rule_problems(rules, contract) == []


def test_no_overlay_owns_the_namespace(builds: dict[str, m.Build]) -> None:
    assert [n for n, b in builds.items() if b.by_kind.get("Namespace")] == []


@pytest.mark.parametrize("name", ["example", "external-redis", "tls", "keda"])
def test_generated_secrets_roll_the_pods(builds: dict[str, m.Build], name: str) -> None:
    """Secrets come from a generator: their names carry a content hash that every reference
    follows, so a changed secret restarts what uses it."""
    build = builds[name]
    secrets = build.by_kind["Secret"]
    assert all(build.generated("Secret", s) is not None for s in ("usher-secrets", "usher-redis"))
    assert not {"usher-secrets", "usher-redis"} & set(secrets)
