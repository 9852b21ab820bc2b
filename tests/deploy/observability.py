"""The metrics contract (deploy/METRICS.md) against the code, the alerting rules and the
Grafana dashboard against the contract, with PromQL parsed by promql-parser."""

from __future__ import annotations

import itertools
import json
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import promql_parser

__all__ = [
    "Metric",
    "contract_vs_code",
    "dashboard_problems",
    "expr_problems",
    "read_contract",
    "rule_problems",
]

SEVERITIES = {"info", "warning", "critical"}
DURATION = re.compile(r"^(\d+(ms|s|m|h|d|w|y))+$")
#: Metric names checked against the contract: Usher's, the process collector's, and the
#: Redis exporter's / kube-state-metrics' ones the Redis alerts use.
METRIC_TOKEN = re.compile(r"\b((?:usher|process|redis|kube)_[a-z0-9_]+)\b")


@dataclass(frozen=True)
class Metric:
    name: str
    type: str
    labels: tuple[str, ...]


def read_contract(path: Path) -> dict[str, Metric]:
    """Metrics of the tables in METRICS.md (| `name` | type | `label`, ... | meaning |) and
    the process / exporter metrics named in its text."""
    text = path.read_text()
    contract: dict[str, Metric] = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 3 or not re.fullmatch(r"`usher_[a-z0-9_]+`", cells[0]):
            continue
        name = cells[0].strip("`")
        contract[name] = Metric(
            name, cells[1].split()[0], tuple(re.findall(r"`([a-z_]+)`", cells[2]))
        )
    for name in re.findall(r"`((?:process|redis|kube)_[a-z_]+)`", text):
        contract[name] = Metric(name, "external", ())
    return contract


def contract_vs_code(contract: Mapping[str, Metric]) -> list[str]:
    from prometheus_client.metrics import MetricWrapperBase

    import usher.metrics
    from services.gateway.metrics import GatewayMetrics

    collectors = [*vars(usher.metrics).values(), *vars(GatewayMetrics()).values()]
    code: dict[str, Metric] = {}
    for value in collectors:
        if isinstance(value, MetricWrapperBase):
            family = next(iter(value.describe()))
            name = family.name + ("_total" if family.type == "counter" else "")
            code[name] = Metric(name, family.type, tuple(value._labelnames))
    documented = {k: v for k, v in contract.items() if k.startswith("usher_")}
    problems = [
        f"{n} is defined in the code, not in METRICS.md"
        for n in sorted(set(code) - set(documented))
    ]
    problems += [
        f"{n} is in METRICS.md, not in the code" for n in sorted(set(documented) - set(code))
    ]
    for name in sorted(set(code) & set(documented)):
        doc, real = documented[name], code[name]
        if doc.type != real.type:
            problems.append(f"{name}: METRICS.md says {doc.type}, the code {real.type}")
        if set(doc.labels) != set(real.labels):
            problems.append(f"{name}: METRICS.md labels {doc.labels}, the code's {real.labels}")
    return problems


def _metric_base(token: str, contract: Mapping[str, Metric]) -> str | None:
    if token in contract:
        return token
    for suffix in ("_bucket", "_sum", "_count"):
        base = token.removesuffix(suffix)
        if base != token and base in contract and contract[base].type == "histogram":
            return base
    return None


def expr_problems(expr: str, contract: Mapping[str, Metric]) -> list[str]:
    if not expr.strip():
        return ["empty expression"]
    problems = []
    try:
        promql_parser.parse(expr)
    except Exception as exc:  # promql_parser raises ValueError with the parser's message
        problems.append(f"PromQL does not parse: {exc} in {expr!r}")
    for token in sorted(set(METRIC_TOKEN.findall(expr))):
        if _metric_base(token, contract) is None:
            problems.append(f"metric {token} is not in deploy/METRICS.md")
    return problems


def rule_problems(rule_obj: Mapping[str, Any], contract: Mapping[str, Metric]) -> list[str]:
    problems: list[str] = []
    groups = rule_obj.get("spec", {}).get("groups") or []
    names = [g.get("name") for g in groups]
    if not groups or len(names) != len(set(names)):
        problems.append("no rule groups, or duplicate group names")
    alerts: set[str] = set()
    for group in groups:
        for rule in group.get("rules") or []:
            where = f"{group.get('name')}/{rule.get('alert') or rule.get('record')}"
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
            problems.extend(
                f"{where}: {p}" for p in expr_problems(str(rule.get("expr", "")), contract)
            )
    return problems


GRAFANA_VARIABLES = {
    "$__rate_interval": "5m",
    "$__interval": "1m",
    "$__range": "1h",
    "${datasource}": "prometheus",
}


def _grafana_expr(expr: str) -> str:
    for variable, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(variable, value)
    return re.sub(r"\$\{?\w+\}?", ".*", expr)


def _flatten(panels: Iterable[Mapping[str, Any]]) -> Iterator[Mapping[str, Any]]:
    for panel in panels:
        yield panel
        yield from _flatten(panel.get("panels", []))


def _panel_problems(panels: list[Mapping[str, Any]], contract: Mapping[str, Metric]) -> list[str]:
    problems = []
    cells: set[tuple[int, int]] = set()
    for panel in panels:
        where = f"panel {panel.get('id')} {panel.get('title')!r}"
        grid = panel.get("gridPos", {})
        if not all(k in grid for k in ("x", "y", "w", "h")) or grid["x"] + grid["w"] > 24:
            problems.append(f"{where}: bad gridPos {grid}")
            continue
        area = set(
            itertools.product(
                range(grid["x"], grid["x"] + grid["w"]), range(grid["y"], grid["y"] + grid["h"])
            )
        )
        if area & cells:
            problems.append(f"{where}: overlaps another panel")
        cells |= area
        if panel.get("type") == "row":
            continue
        if not panel.get("targets"):
            problems.append(f"{where}: no queries")
        for target in panel.get("targets", []):
            problems.extend(
                f"{where}: {p}"
                for p in expr_problems(_grafana_expr(target.get("expr", "")), contract)
            )
    return problems


def dashboard_problems(path: Path, contract: Mapping[str, Metric]) -> list[str]:
    try:
        dashboard = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        return [f"not valid JSON: {exc}"]
    problems = [
        f"no {key!r}" for key in ("title", "uid", "panels", "schemaVersion") if key not in dashboard
    ]
    if dashboard.get("id") is not None:
        problems.append("`id` must be null or absent (Grafana assigns it on import)")
    panels = list(_flatten(dashboard.get("panels", [])))
    ids = [p.get("id") for p in panels]
    if len(ids) != len(set(ids)) or None in ids:
        problems.append("panel ids must be present and unique")
    problems += _panel_problems(panels, contract)
    for variable in dashboard.get("templating", {}).get("list", []):
        query = variable.get("query")
        text = query.get("query", "") if isinstance(query, dict) else str(query or "")
        if variable.get("type") != "query":
            continue
        inner = re.fullmatch(r"label_values\((.*),\s*\w+\)", text.strip())
        if inner is None:
            problems.append(f"variable {variable.get('name')}: unexpected query {text!r}")
            continue
        problems.extend(
            f"variable {variable.get('name')}: {p}"
            for p in expr_problems(_grafana_expr(inner[1]), contract)
        )
    return problems
