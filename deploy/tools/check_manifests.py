"""Offline checks of Usher's deployment files (run by scripts/validate_deploy.sh).

    python deploy/tools/check_manifests.py --repo . NAME=RENDERED.yaml [NAME=RENDERED.yaml ...]

Each RENDERED.yaml is the output of one `kustomize build`. For each of them:

- every object validates against the Kubernetes OpenAPI schemas (kubernetes-validate,
  strict: unknown fields are errors) for the oldest and newest supported versions; the
  Prometheus Operator's objects (no schema bundled) are checked by hand below;
- references resolve: selectors select pods, Service target ports and probe ports exist,
  ConfigMaps / Secrets / keys used by env, envFrom and volumes exist, autoscalers and
  disruption budgets have targets;
- pods are hardened (non-root, read-only root filesystem, no capabilities, no privilege
  escalation, seccomp, requests and limits) and drain cleanly (preStop sleep and the
  service's shutdown grace fit in terminationGracePeriodSeconds);
- each Usher service's settings load with the real code from the rendered environment
  (ConfigMap + Secret + env), including the Pool's pool.yaml, and agree with the ports;
- the NetworkPolicies allow exactly the intended traffic between components;
- the ServiceMonitor scrapes a `metrics` port of every Usher Service, and every alerting
  rule's expression parses (promql-parser) and uses metrics of the contract.

Once: deploy/METRICS.md matches usher/metrics.py (names, types, labels), and the Grafana
dashboard parses, is laid out sanely and queries only contract metrics with valid PromQL.
"""

from __future__ import annotations

import argparse
import base64
import itertools
import json
import re
import sys
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import kubernetes_validate
import promql_parser
import yaml

#: Oldest and newest Kubernetes versions the manifests must validate against. 1.29 is the
#: oldest with every field used here on by default (gRPC probes, matchLabelKeys,
#: unhealthyPodEvictionPolicy, StatefulSet PVC retention).
KUBERNETES_VERSIONS = ("1.29.0", "1.37.0")
#: Kinds without a bundled schema that are checked by hand.
CUSTOM_KINDS = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"),
    ("monitoring.coreos.com/v1", "PrometheusRule"),
}
WORKLOAD_KINDS = ("Deployment", "StatefulSet")
USHER_MODULES = ("services.scheduler", "services.pool", "services.notifier", "services.gateway")
#: Services that serve /metrics on USHER_METRICS_PORT (the gateway uses its HTTP port).
METRICS_PORT_MODULES = ("services.scheduler", "services.pool", "services.notifier")
#: Traffic that must be allowed: (from component, to component, port).
REQUIRED_FLOWS = (
    ("gateway", "scheduler", 50051),
    ("gateway", "notifier", 50053),
    ("gateway", "pool", 50052),
    ("scheduler", "pool", 50052),
    ("notifier", "pool", 50052),
    *((c, "redis", 6379) for c in ("scheduler", "pool", "notifier", "gateway")),
)
#: Traffic that must be denied (spot checks of the default deny).
FORBIDDEN_FLOWS = (
    ("scheduler", "notifier", 50053),
    ("notifier", "scheduler", 50051),
    ("pool", "scheduler", 50051),
    ("redis", "pool", 50052),
    ("scheduler", "gateway", 8080),
)
SEVERITIES = {"info", "warning", "critical"}
DURATION = re.compile(r"^(\d+(ms|s|m|h|d|w|y))+$")
METRIC_TOKEN = re.compile(r"\b(usher_[a-z0-9_]+|process_[a-z0-9_]+)\b")


class Report:
    def __init__(self) -> None:
        self.errors: list[str] = []
        self.notes: list[str] = []

    def error(self, where: str, message: str) -> None:
        self.errors.append(f"{where}: {message}")

    def note(self, message: str) -> None:
        self.notes.append(message)


# ---- Objects ------------------------------------------------------------------------------


def name_of(obj: Mapping[str, Any]) -> str:
    return f"{obj.get('kind')}/{obj.get('metadata', {}).get('name')}"


def matches(selector: Mapping[str, Any] | None, labels: Mapping[str, str]) -> bool:
    """Kubernetes label-selector semantics (an empty selector selects everything)."""
    if selector is None:
        return False
    for key, value in (selector.get("matchLabels") or {}).items():
        if labels.get(key) != value:
            return False
    for expr in selector.get("matchExpressions") or []:
        key, op, values = expr["key"], expr["operator"], expr.get("values") or []
        if op == "In" and labels.get(key) not in values:
            return False
        if op == "NotIn" and labels.get(key) in values:
            return False
        if op == "Exists" and key not in labels:
            return False
        if op == "DoesNotExist" and key in labels:
            return False
    return True


@dataclass
class Build:
    name: str
    objects: list[dict[str, Any]]
    report: Report
    by_kind: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for obj in self.objects:
            kinds = self.by_kind.setdefault(obj["kind"], {})
            name = obj["metadata"]["name"]
            if name in kinds:
                self.error(name_of(obj), "defined twice")
            kinds[name] = obj

    def error(self, where: str, message: str) -> None:
        self.report.error(f"[{self.name}] {where}", message)

    def note(self, message: str) -> None:
        self.report.note(message)

    def get(self, kind: str, name: str) -> dict[str, Any] | None:
        return self.by_kind.get(kind, {}).get(name)

    def workloads(self) -> Iterator[dict[str, Any]]:
        for kind in WORKLOAD_KINDS:
            yield from self.by_kind.get(kind, {}).values()

    def pods_selected(self, selector: Mapping[str, Any] | None) -> list[dict[str, Any]]:
        return [
            w
            for w in self.workloads()
            if matches(selector, w["spec"]["template"]["metadata"].get("labels", {}))
        ]

    def component(self, component: str) -> dict[str, Any] | None:
        for w in self.workloads():
            labels = w["spec"]["template"]["metadata"].get("labels", {})
            if labels.get("app.kubernetes.io/component") == component:
                return w
        return None

    def config_data(self, kind: str, name: str) -> dict[str, str] | None:
        obj = self.get(kind, name)
        if obj is None:
            return None
        data = {str(k): str(v) for k, v in (obj.get("stringData") or {}).items()}
        for key, value in (obj.get("data") or {}).items():
            data.setdefault(
                str(key), base64.b64decode(value).decode() if kind == "Secret" else str(value)
            )
        return data


def containers(workload: Mapping[str, Any]) -> list[dict[str, Any]]:
    spec = workload["spec"]["template"]["spec"]
    return [*spec.get("initContainers", []), *spec["containers"]]


def container_ports(container: Mapping[str, Any]) -> dict[str | int, int]:
    ports: dict[str | int, int] = {}
    for port in container.get("ports", []):
        ports[port["containerPort"]] = port["containerPort"]
        if "name" in port:
            ports[port["name"]] = port["containerPort"]
    return ports


# ---- Schemas ------------------------------------------------------------------------------


def check_schemas(build: Build) -> None:
    for obj in build.objects:
        if (obj.get("apiVersion"), obj.get("kind")) in CUSTOM_KINDS:
            continue
        for version in KUBERNETES_VERSIONS:
            try:
                kubernetes_validate.validate(obj, version, strict=True)
            except kubernetes_validate.SchemaNotFoundError:
                build.error(name_of(obj), f"no schema for {obj.get('apiVersion')} in {version}")
            except kubernetes_validate.ValidationError as exc:
                path = ".".join(str(p) for p in exc.path)
                build.error(name_of(obj), f"Kubernetes {version}: {path}: {exc.message}")


def check_namespaces(build: Build) -> None:
    """One namespace for everything (none in the base); the overlay's Namespace if any."""
    declared = set(build.by_kind.get("Namespace", {}))
    used = {o["metadata"].get("namespace") for o in build.objects if o["kind"] != "Namespace"}
    if len(used) > 1:
        build.error("namespaces", f"objects are spread over namespaces {sorted(map(str, used))}")
    if declared and not used <= declared:
        build.error("namespaces", f"objects use {used}, the build declares {declared}")


# ---- Workloads ----------------------------------------------------------------------------


def check_workloads(build: Build) -> None:
    for w in build.workloads():
        where = name_of(w)
        spec, template = w["spec"], w["spec"]["template"]
        pod = template["spec"]
        labels = template["metadata"].get("labels", {})
        if not matches(spec["selector"], labels):
            build.error(where, "selector does not select its own pod template")
        if pod.get("automountServiceAccountToken") is not False:
            build.error(where, "automountServiceAccountToken should be false")
        sa = pod.get("serviceAccountName")
        if sa and build.get("ServiceAccount", sa) is None:
            build.error(where, f"ServiceAccount {sa!r} is not in the build")
        psc = pod.get("securityContext", {})
        if psc.get("runAsNonRoot") is not True:
            build.error(where, "pod securityContext.runAsNonRoot must be true")
        if psc.get("seccompProfile", {}).get("type") not in ("RuntimeDefault", "Localhost"):
            build.error(where, "pod seccompProfile must be RuntimeDefault")
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        claim_names = {c["metadata"]["name"] for c in spec.get("volumeClaimTemplates", [])}
        check_volumes(build, where, volumes)
        for c in containers(w):
            check_container(build, w, c, volumes, claim_names)


def check_volumes(build: Build, where: str, volumes: Mapping[str, Any]) -> None:
    for name, volume in volumes.items():
        if "configMap" in volume:
            ref = volume["configMap"]["name"]
            if build.get("ConfigMap", ref) is None and not volume["configMap"].get("optional"):
                build.error(where, f"volume {name}: ConfigMap {ref!r} is not in the build")
        if "secret" in volume:
            ref = volume["secret"]["secretName"]
            if build.get("Secret", ref) is None and not volume["secret"].get("optional"):
                build.note(f"[{build.name}] Secret {ref!r} must be created outside this build")


def check_container(
    build: Build,
    workload: Mapping[str, Any],
    c: Mapping[str, Any],
    volumes: Mapping[str, Any],
    claim_names: set[str],
) -> None:
    where = f"{name_of(workload)} container {c['name']}"
    if not c.get("image"):
        build.error(where, "no image")
    resources = c.get("resources", {})
    for part in ("requests", "limits"):
        for resource in ("cpu", "memory"):
            if resource not in resources.get(part, {}):
                build.error(where, f"resources.{part}.{resource} is not set")
    sc = c.get("securityContext", {})
    if sc.get("allowPrivilegeEscalation") is not False:
        build.error(where, "allowPrivilegeEscalation must be false")
    if sc.get("readOnlyRootFilesystem") is not True:
        build.error(where, "readOnlyRootFilesystem must be true")
    if "ALL" not in sc.get("capabilities", {}).get("drop", []):
        build.error(where, "capabilities must drop ALL")
    if sc.get("privileged"):
        build.error(where, "privileged")

    ports = container_ports(c)
    for probe_name in ("livenessProbe", "readinessProbe"):
        if probe_name not in c:
            build.error(where, f"no {probe_name}")
    for probe_name in ("startupProbe", "livenessProbe", "readinessProbe"):
        probe = c.get(probe_name)
        if not probe:
            continue
        for arg in probe.get("exec", {}).get("command", []):
            mounted = any(
                arg.startswith(m["mountPath"].rstrip("/") + "/") for m in c.get("volumeMounts", [])
            )
            if arg.startswith("/etc/usher/") and (
                not mounted or mounted_file(build, c, volumes, arg) is None
            ):
                build.error(where, f"{probe_name} runs {arg}, which is not mounted")
        for handler in ("grpc", "httpGet", "tcpSocket"):
            if handler in probe and probe[handler]["port"] not in ports:
                build.error(where, f"{probe_name} port {probe[handler]['port']!r} is not declared")

    for ref in c.get("envFrom", []):
        for kind, key in (("ConfigMap", "configMapRef"), ("Secret", "secretRef")):
            if key in ref and build.get(kind, ref[key]["name"]) is None:
                build.error(where, f"envFrom {kind} {ref[key]['name']!r} is not in the build")
    for env in c.get("env", []):
        source = env.get("valueFrom", {})
        for kind, key in (("ConfigMap", "configMapKeyRef"), ("Secret", "secretKeyRef")):
            if key not in source:
                continue
            ref = source[key]
            data = build.config_data(kind, ref["name"])
            if data is None or ref["key"] not in data:
                build.error(where, f"env {env['name']}: {kind} {ref['name']}/{ref['key']} missing")
    for mount in c.get("volumeMounts", []):
        volume = volumes.get(mount["name"])
        if volume is None and mount["name"] not in claim_names:
            build.error(where, f"volumeMount {mount['name']!r} has no volume")
        if volume and "subPath" in mount and "configMap" in volume:
            data = build.config_data("ConfigMap", volume["configMap"]["name"]) or {}
            if mount["subPath"] not in data:
                build.error(where, f"subPath {mount['subPath']!r} is not a key of the ConfigMap")
    args = [*c.get("command", []), *c.get("args", [])]
    if any(a in USHER_MODULES for a in args):
        check_drain(build, workload, c, where)


def check_drain(
    build: Build, workload: Mapping[str, Any], c: Mapping[str, Any], where: str
) -> None:
    pre_stop = c.get("lifecycle", {}).get("preStop", {})
    command = pre_stop.get("exec", {}).get("command", [])
    sleep = pre_stop.get("sleep", {}).get("seconds")
    if sleep is None and command[:1] == ["sleep"] and len(command) == 2:
        sleep = float(command[1])
    if sleep is None:
        build.error(where, "no preStop sleep (endpoints need time to drop the pod)")
        sleep = 0
    grace = None
    for env in c.get("env", []):
        if env["name"] == "USHER_SHUTDOWN_GRACE_SECONDS":
            grace = float(env["value"])
    if grace is None:
        build.error(where, "USHER_SHUTDOWN_GRACE_SECONDS is not set on the container")
        grace = 10.0
    period = workload["spec"]["template"]["spec"].get("terminationGracePeriodSeconds", 30)
    if period < sleep + grace + 5:
        build.error(
            where,
            f"terminationGracePeriodSeconds {period} < preStop {sleep} + drain {grace} + 5",
        )


# ---- Services, autoscalers, budgets --------------------------------------------------------


def check_services(build: Build) -> None:
    for svc in build.by_kind.get("Service", {}).values():
        where = name_of(svc)
        pods = build.pods_selected(svc["spec"].get("selector"))
        if not pods:
            build.error(where, "selects no pods")
            continue
        for port in svc["spec"]["ports"]:
            target = port.get("targetPort", port["port"])
            if not any(target in container_ports(c) for p in pods for c in containers(p)):
                build.error(where, f"targetPort {target!r} is not a port of the selected pods")


def check_autoscalers(build: Build) -> None:
    for hpa in build.by_kind.get("HorizontalPodAutoscaler", {}).values():
        where = name_of(hpa)
        ref = hpa["spec"]["scaleTargetRef"]
        target = build.get(ref["kind"], ref["name"])
        if target is None:
            build.error(where, f"target {ref['kind']}/{ref['name']} is not in the build")
            continue
        if "replicas" in target["spec"]:
            build.error(where, f"{ref['name']} sets spec.replicas: every apply would reset it")
        if hpa["spec"].get("minReplicas", 1) > hpa["spec"]["maxReplicas"]:
            build.error(where, "minReplicas > maxReplicas")
        for c in containers(target):
            if "cpu" not in c.get("resources", {}).get("requests", {}):
                build.error(where, f"container {c['name']} has no CPU request to scale on")
    for pdb in build.by_kind.get("PodDisruptionBudget", {}).values():
        if not build.pods_selected(pdb["spec"]["selector"]):
            build.error(name_of(pdb), "selects no pods")


# ---- Settings, with the services' own code -------------------------------------------------


def container_env(build: Build, c: Mapping[str, Any]) -> dict[str, str]:
    env: dict[str, str] = {}
    for ref in c.get("envFrom", []):
        for kind, key in (("ConfigMap", "configMapRef"), ("Secret", "secretRef")):
            if key in ref:
                env.update(build.config_data(kind, ref[key]["name"]) or {})
    for item in c.get("env", []):
        if "value" in item:
            env[item["name"]] = re.sub(r"\$\((\w+)\)", lambda m: env.get(m[1], m[0]), item["value"])
            continue
        source = item.get("valueFrom", {})
        for kind, key in (("ConfigMap", "configMapKeyRef"), ("Secret", "secretKeyRef")):
            if key in source:
                data = build.config_data(kind, source[key]["name"]) or {}
                if source[key]["key"] in data:
                    env[item["name"]] = data[source[key]["key"]]
    return env


def port_of(listen: str) -> int:
    return int(listen.rpartition(":")[2])


def check_settings(build: Build) -> None:
    from usher.auth import parse_token_map

    services = {
        s["metadata"]["name"]: {p["port"] for p in s["spec"]["ports"]}
        for s in build.by_kind.get("Service", {}).values()
    }
    for w in build.workloads():
        pod = w["spec"]["template"]["spec"]
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        for c in pod["containers"]:
            module = next((a for a in c.get("args", []) if a in USHER_MODULES), None)
            if module is None:
                continue
            where = f"{name_of(w)} container {c['name']}"
            env = container_env(build, c)
            ports = container_ports(c)
            try:
                listen = module_listen(build, where, module, env, c, volumes)
            except Exception as exc:  # the services' ConfigError, or anything else
                build.error(where, f"{module} settings do not load: {exc}")
                continue
            if listen is not None and port_of(listen) not in ports.values():
                build.error(where, f"listens on {listen}, not a declared container port")
            metrics_port = int(env.get("USHER_METRICS_PORT", "0"))
            if module not in METRICS_PORT_MODULES:
                metrics_port = 0
            if metrics_port and ports.get("metrics") != metrics_port:
                build.error(where, f"USHER_METRICS_PORT={metrics_port} is not the `metrics` port")
            for variable in (
                "USHER_POOL_ADDRESS",
                "USHER_SCHEDULER_ADDRESS",
                "USHER_NOTIFIER_ADDRESS",
            ):
                address = env.get(variable)
                if not address:
                    continue
                host, _, port = address.rpartition(":")
                if int(port) not in services.get(host.split(".")[0], set()):
                    build.error(where, f"{variable}={address}: no such Service port in the build")
            check_redis_url(build, where, env, services)
            if module == "services.scheduler" and env.get("USHER_POOL_ADDRESS"):
                tokens = parse_token_map(env.get("USHER_API_TOKENS", ""))
                principal = tokens.get(env.get("USHER_SERVICE_TOKEN", ""))
                if principal is None or "service" not in principal.roles:
                    build.error(
                        where, "USHER_SERVICE_TOKEN is not a `service` token in USHER_API_TOKENS"
                    )
            if any("CHANGE-ME" in value for value in env.values()):
                build.note("placeholder secrets (CHANGE-ME) are in use: replace them to deploy")


def module_listen(
    build: Build,
    where: str,
    module: str,
    env: dict[str, str],
    c: Mapping[str, Any],
    volumes: Mapping[str, Any],
) -> str | None:
    """Load the service's settings from ``env`` with its own code; its listen address."""
    if module == "services.scheduler":
        from services.scheduler.settings import SchedulerSettings

        return SchedulerSettings.from_env(env).listen
    if module == "services.notifier":
        from services.notifier.app import NotifierSettings

        return NotifierSettings.from_env(env).listen
    if module == "services.pool":
        from services.pool.config import load_pool_settings

        path = env.get("USHER_POOL_CONFIG", "")
        with tempfile.TemporaryDirectory() as tmp:
            if path:
                text = mounted_file(build, c, volumes, path)
                if text is None:
                    build.error(where, f"USHER_POOL_CONFIG={path} is not mounted from a ConfigMap")
                    return None
                local = Path(tmp) / "pool.yaml"
                local.write_text(text)
                env = {**env, "USHER_POOL_CONFIG": str(local)}
            settings = load_pool_settings(env, total_memory_bytes=32 << 30)
        if not settings.instances:
            build.error(where, "the Pool has no instances")
        return str(settings.listen)
    if module == "services.gateway":
        try:
            from services.gateway.settings import GatewaySettings
        except ImportError:
            build.note("services.gateway: not importable here, its settings were not checked")
            return None
        return GatewaySettings.from_env(env).listen
    build.note(f"{module}: settings not checked (its settings loader is not known here)")
    return None


def mounted_file(
    build: Build, c: Mapping[str, Any], volumes: Mapping[str, Any], path: str
) -> str | None:
    for mount in c.get("volumeMounts", []):
        volume = volumes.get(mount["name"], {})
        if "configMap" not in volume:
            continue
        data = build.config_data("ConfigMap", volume["configMap"]["name"]) or {}
        if "subPath" in mount and mount["mountPath"] == path:
            return data.get(mount["subPath"])
        if path.startswith(mount["mountPath"].rstrip("/") + "/"):
            return data.get(path[len(mount["mountPath"].rstrip("/")) + 1 :])
    return None


def check_redis_url(
    build: Build, where: str, env: Mapping[str, str], services: Mapping[str, set[int]]
) -> None:
    url = env.get("USHER_REDIS_URL") or env.get("REDIS_URL")
    if not url:
        build.error(where, "USHER_REDIS_URL is not set")
        return
    parts = urlsplit(url)
    if parts.scheme not in ("redis", "rediss"):
        build.error(where, f"USHER_REDIS_URL scheme {parts.scheme!r} is not redis or rediss")
        return
    redis = build.get("StatefulSet", "usher-redis")
    if redis is None:
        if parts.hostname in services:
            build.error(where, "USHER_REDIS_URL names an in-cluster Service but Redis is removed")
        return
    if parts.hostname != "usher-redis" or parts.port not in services.get("usher-redis", set()):
        build.error(where, f"USHER_REDIS_URL host {parts.netloc!r} is not the usher-redis Service")
    password = container_env(build, redis["spec"]["template"]["spec"]["containers"][0]).get(
        "REDIS_PASSWORD"
    )
    if password is not None and unquote(parts.password or "") != password:
        build.error(where, "the password in USHER_REDIS_URL is not the Redis REDIS_PASSWORD")


# ---- NetworkPolicies -----------------------------------------------------------------------


def peer_allows(peer: Mapping[str, Any], source_labels: Mapping[str, str]) -> bool:
    """Whether a policy peer admits a pod of this namespace with these labels."""
    if "ipBlock" in peer:
        return False  # pod traffic is not judged by ipBlock here
    if "podSelector" in peer:
        return matches(peer["podSelector"], source_labels)
    return "namespaceSelector" in peer  # a namespace selector alone: every pod there


def rule_allows(
    rule: Mapping[str, Any], key: str, peer_labels: Mapping[str, str], port: int, ports: set[int]
) -> bool:
    peers = rule.get(key)
    if peers is not None and not any(peer_allows(p, peer_labels) for p in peers):
        return False
    rule_ports = rule.get("ports")
    if not rule_ports:
        return True
    for p in rule_ports:
        value = p.get("port")
        if value is None or value == port or (isinstance(value, str) and port in ports):
            return True
        if isinstance(value, int) and p.get("endPort") and value <= port <= p["endPort"]:
            return True
    return False


def allowed(build: Build, source: str, target: str, port: int) -> bool:
    src, dst = build.component(source), build.component(target)
    if src is None or dst is None:
        return False
    src_labels = src["spec"]["template"]["metadata"]["labels"]
    dst_labels = dst["spec"]["template"]["metadata"]["labels"]
    dst_ports = {p for c in containers(dst) for p in container_ports(c).values()}
    if port not in dst_ports:
        return False
    policies = list(build.by_kind.get("NetworkPolicy", {}).values())

    def direction(labels: Mapping[str, str], kind: str, key: str, peer: Mapping[str, str]) -> bool:
        selecting = [
            p
            for p in policies
            if matches(p["spec"]["podSelector"], labels)
            and kind in p["spec"].get("policyTypes", ["Ingress"])
        ]
        if not selecting:
            return True
        rules = [r for p in selecting for r in p["spec"].get(kind.lower(), []) or []]
        return any(rule_allows(r, key, peer, port, dst_ports) for r in rules)

    return direction(src_labels, "Egress", "to", dst_labels) and direction(
        dst_labels, "Ingress", "from", src_labels
    )


def check_network_policies(build: Build) -> None:
    policies = build.by_kind.get("NetworkPolicy", {})
    if not policies:
        return
    for policy in policies.values():
        selector = policy["spec"]["podSelector"]
        if selector and not build.pods_selected(selector):
            build.error(name_of(policy), "selects no pods")
    for source, target, port in REQUIRED_FLOWS:
        if build.component(source) is None or build.component(target) is None:
            continue
        if not allowed(build, source, target, port):
            build.error("NetworkPolicy", f"{source} -> {target}:{port} is not allowed")
    for source, target, port in FORBIDDEN_FLOWS:
        if (
            build.component(source)
            and build.component(target)
            and allowed(build, source, target, port)
        ):
            build.error("NetworkPolicy", f"{source} -> {target}:{port} should be denied")


# ---- Prometheus Operator objects ---------------------------------------------------------


def check_custom(build: Build, contract: Mapping[str, Metric]) -> None:
    for obj in build.objects:
        key = (obj.get("apiVersion"), obj.get("kind"))
        if key not in CUSTOM_KINDS:
            continue
        if not obj.get("metadata", {}).get("name"):
            build.error(name_of(obj), "no metadata.name")
        if obj["kind"] == "ServiceMonitor":
            check_service_monitor(build, obj)
        else:
            for problem in rule_problems(obj, contract):
                build.error(name_of(obj), problem)


def check_service_monitor(build: Build, monitor: Mapping[str, Any]) -> None:
    where = name_of(monitor)
    selected = [
        s
        for s in build.by_kind.get("Service", {}).values()
        if matches(monitor["spec"]["selector"], s["metadata"].get("labels", {}))
    ]
    if not selected:
        build.error(where, "selects no Service")
    wanted = {e.get("port") for e in monitor["spec"]["endpoints"]}
    for s in selected:
        component = s["metadata"]["labels"].get("app.kubernetes.io/component")
        names = {p.get("name") for p in s["spec"]["ports"]}
        if component != "redis" and not wanted & names:
            build.error(where, f"Service {s['metadata']['name']} has no port {sorted(wanted)}")
    for endpoint in monitor["spec"]["endpoints"]:
        if not any(
            endpoint.get("port") in {p.get("name") for p in s["spec"]["ports"]} for s in selected
        ):
            build.error(where, f"endpoint port {endpoint.get('port')!r} matches no Service")


def rule_problems(rule_obj: Mapping[str, Any], contract: Mapping[str, Metric]) -> list[str]:
    problems: list[str] = []
    groups = rule_obj.get("spec", {}).get("groups") or []
    if not groups:
        problems.append("no rule groups")
    names = [g.get("name") for g in groups]
    if len(names) != len(set(names)):
        problems.append("duplicate group names")
    alerts: set[str] = set()
    for group in groups:
        for rule in group.get("rules") or []:
            label = rule.get("alert") or rule.get("record") or "?"
            where = f"{group.get('name')}/{label}"
            if ("alert" in rule) == ("record" in rule):
                problems.append(f"{where}: needs exactly one of alert / record")
            if "alert" in rule:
                if rule["alert"] in alerts:
                    problems.append(f"{where}: duplicate alert name")
                alerts.add(rule["alert"])
                if rule.get("labels", {}).get("severity") not in SEVERITIES:
                    problems.append(f"{where}: labels.severity must be one of {sorted(SEVERITIES)}")
                for key in ("summary", "description"):
                    if not rule.get("annotations", {}).get(key):
                        problems.append(f"{where}: annotations.{key} is empty")
            if "for" in rule and not DURATION.match(str(rule["for"])):
                problems.append(f"{where}: bad duration for: {rule['for']!r}")
            expr = str(rule.get("expr", ""))
            problems.extend(f"{where}: {p}" for p in expr_problems(expr, contract))
    return problems


# ---- Metrics contract, PromQL, dashboard ---------------------------------------------------


@dataclass(frozen=True)
class Metric:
    name: str
    type: str
    labels: tuple[str, ...]


def read_contract(path: Path, report: Report) -> dict[str, Metric]:
    """Metrics of the tables in METRICS.md: | `name` | type | `label`, ... | meaning |"""
    contract: dict[str, Metric] = {}
    for line in path.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 3 or not re.fullmatch(r"`usher_[a-z0-9_]+`", cells[0]):
            continue
        name = cells[0].strip("`")
        labels = tuple(re.findall(r"`([a-z_]+)`", cells[2]))
        contract[name] = Metric(name, cells[1].split()[0], labels)
    # Process metrics named in the text.
    for name in re.findall(r"`(process_[a-z_]+)`", path.read_text()):
        contract[name] = Metric(name, "process", ())
    if not contract:
        report.error(str(path), "no metrics found in its tables")
    return contract


def check_contract_against_code(contract: Mapping[str, Metric], report: Report) -> None:
    from prometheus_client.metrics import MetricWrapperBase

    import usher.metrics

    collectors: list[Any] = list(vars(usher.metrics).values())
    try:
        from services.gateway.metrics import GatewayMetrics
    except ImportError:
        report.note("services.gateway.metrics is not importable: gateway metrics not checked")
        gateway = False
    else:
        collectors += list(vars(GatewayMetrics()).values())
        gateway = True
    code: dict[str, Metric] = {}
    for value in collectors:
        if not isinstance(value, MetricWrapperBase):
            continue
        family = next(iter(value.describe()))
        name = family.name + ("_total" if family.type == "counter" else "")
        code[name] = Metric(name, family.type, tuple(value._labelnames))
    documented = {
        k: v
        for k, v in contract.items()
        if k.startswith("usher_") and (gateway or not k.startswith("usher_gateway_"))
    }
    for name in sorted(set(code) - set(documented)):
        report.error("deploy/METRICS.md", f"{name} is defined in the code, not here")
    for name in sorted(set(documented) - set(code)):
        report.error("deploy/METRICS.md", f"{name} is not defined in the code")
    for name in sorted(set(code) & set(documented)):
        doc, real = documented[name], code[name]
        if doc.type != real.type:
            report.error("deploy/METRICS.md", f"{name}: type {doc.type}, code says {real.type}")
        if set(doc.labels) != set(real.labels):
            report.error(
                "deploy/METRICS.md", f"{name}: labels {doc.labels}, code says {real.labels}"
            )


def metric_base(token: str, contract: Mapping[str, Metric]) -> str | None:
    if token in contract:
        return token
    for suffix in ("_bucket", "_sum", "_count"):
        base = token.removesuffix(suffix)
        if base != token and contract.get(base, Metric("", "", ())).type == "histogram":
            return base
    return None


def expr_problems(expr: str, contract: Mapping[str, Metric]) -> list[str]:
    problems = []
    if not expr.strip():
        return ["empty expression"]
    try:
        promql_parser.parse(expr)
    except Exception as exc:  # promql_parser raises ValueError with the parser's message
        problems.append(f"PromQL does not parse: {exc} in {expr!r}")
    for token in set(METRIC_TOKEN.findall(expr)):
        if metric_base(token, contract) is None:
            problems.append(f"metric {token} is not in deploy/METRICS.md")
    return problems


GRAFANA_VARIABLES = {
    "$__rate_interval": "5m",
    "$__interval": "1m",
    "$__range": "1h",
    "${datasource}": "prometheus",
}


def grafana_expr(expr: str) -> str:
    for variable, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(variable, value)
    return re.sub(r"\$\{?\w+\}?", ".*", expr)


def check_dashboard(path: Path, contract: Mapping[str, Metric], report: Report, label: str) -> None:
    where = label
    try:
        dashboard = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        report.error(where, f"not valid JSON: {exc}")
        return
    for key in ("title", "uid", "panels", "schemaVersion"):
        if key not in dashboard:
            report.error(where, f"no {key!r}")
    if dashboard.get("id") is not None:
        report.error(where, "`id` must be null or absent (Grafana assigns it on import)")
    panels = list(flatten_panels(dashboard.get("panels", [])))
    ids = [p.get("id") for p in panels]
    if len(ids) != len(set(ids)) or None in ids:
        report.error(where, "panel ids must be present and unique")
    cells: set[tuple[int, int]] = set()
    for panel in panels:
        label = f"{where} panel {panel.get('id')} {panel.get('title')!r}"
        grid = panel.get("gridPos", {})
        if not all(k in grid for k in ("x", "y", "w", "h")) or grid["x"] + grid["w"] > 24:
            report.error(label, f"bad gridPos {grid}")
            continue
        columns = range(grid["x"], grid["x"] + grid["w"])
        area = set(itertools.product(columns, range(grid["y"], grid["y"] + grid["h"])))
        if area & cells:
            report.error(label, "overlaps another panel")
        cells |= area
        if panel.get("type") == "row":
            continue
        if not panel.get("targets"):
            report.error(label, "no queries")
        for target in panel.get("targets", []):
            for problem in expr_problems(grafana_expr(target.get("expr", "")), contract):
                report.error(label, problem)
    for variable in dashboard.get("templating", {}).get("list", []):
        query = variable.get("query")
        text = query.get("query", "") if isinstance(query, dict) else str(query or "")
        inner = re.fullmatch(r"label_values\((.*),\s*\w+\)", text.strip())
        if variable.get("type") == "query":
            if inner is None:
                report.error(where, f"variable {variable.get('name')}: unexpected query {text!r}")
                continue
            for problem in expr_problems(grafana_expr(inner[1]), contract):
                report.error(f"{where} variable {variable.get('name')}", problem)


def flatten_panels(panels: Iterable[Mapping[str, Any]]) -> Iterator[Mapping[str, Any]]:
    for panel in panels:
        yield panel
        yield from flatten_panels(panel.get("panels", []))


def check_dashboard_configmap(build: Build, path: Path) -> None:
    for cm in build.by_kind.get("ConfigMap", {}).values():
        data = cm.get("data") or {}
        if path.name in data and data[path.name] != path.read_text():
            build.error(name_of(cm), f"{path.name} differs from {path}")


# ---- Main -----------------------------------------------------------------------------------


def load_build(name: str, path: Path, report: Report) -> Build | None:
    try:
        objects = [d for d in yaml.safe_load_all(path.read_text()) if d]
    except yaml.YAMLError as exc:
        report.error(name, f"rendered YAML does not parse: {exc}")
        return None
    if not objects:
        report.error(name, "renders nothing")
    return Build(name, objects, report)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--repo", type=Path, default=Path("."))
    parser.add_argument("builds", nargs="+", help="NAME=RENDERED.yaml")
    args = parser.parse_args(argv)
    repo: Path = args.repo
    report = Report()

    contract = read_contract(repo / "deploy/METRICS.md", report)
    check_contract_against_code(contract, report)
    dashboard = repo / "deploy/grafana/usher-dashboard.json"
    check_dashboard(dashboard, contract, report, label="deploy/grafana/usher-dashboard.json")

    for spec in args.builds:
        name, _, file = spec.partition("=")
        build = load_build(name, Path(file), report)
        if build is None:
            continue
        check_schemas(build)
        check_namespaces(build)
        check_workloads(build)
        check_services(build)
        check_autoscalers(build)
        check_network_policies(build)
        check_custom(build, contract)
        check_dashboard_configmap(build, dashboard)
        check_settings(build)
        print(f"checked {name}: {len(build.objects)} objects")

    for note in sorted(set(report.notes)):
        print(f"note: {note}")
    for error in report.errors:
        print(f"ERROR {error}", file=sys.stderr)
    print(f"{len(report.errors)} problem(s)")
    return 1 if report.errors else 0


if __name__ == "__main__":
    sys.exit(main())
