"""Schema validation of rendered objects, offline: the Kubernetes OpenAPI schemas bundled
with kubernetes-validate (strict: unknown fields are errors) for the oldest and newest
supported versions, and the custom resources' own CRD schemas vendored in deploy/crds/
(Prometheus Operator, KEDA), made strict the same way: the API server prunes unknown
fields of a structural schema silently, so a typo such as `honorLabel` would vanish."""

from __future__ import annotations

import copy
import functools
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import yaml

__all__ = ["KUBERNETES_VERSIONS", "crd_schemas", "schema_problems"]

#: Oldest and newest Kubernetes versions the manifests must validate against. 1.29 is the
#: oldest with every field used here on by default (gRPC probes, matchLabelKeys,
#: unhealthyPodEvictionPolicy, StatefulSet PVC retention, CronJob timeZone).
KUBERNETES_VERSIONS = ("1.29.0", "1.37.0")
CRDS = Path(__file__).resolve().parents[2] / "deploy/crds"


def _strict(schema: Any) -> Any:
    """Close every object schema that lists its properties (as kubectl --validate=strict
    treats them), except where the CRD keeps unknown fields on purpose."""
    if isinstance(schema, list):
        return [_strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _strict(v) for k, v in schema.items() if k != "properties"}
    if "properties" in schema:
        out["properties"] = {k: _strict(v) for k, v in schema["properties"].items()}
        if "additionalProperties" not in schema and not schema.get(
            "x-kubernetes-preserve-unknown-fields"
        ):
            out["additionalProperties"] = False
    return out


@functools.cache
def crd_schemas() -> dict[tuple[str, str], dict[str, Any]]:
    """(apiVersion, kind) -> strict JSON schema, from deploy/crds/*.yaml."""
    schemas = {}
    for path in sorted(CRDS.glob("*.yaml")):
        for crd in yaml.safe_load_all(path.read_text()):
            if not crd:
                continue
            group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
            for version in crd["spec"]["versions"]:
                schema = copy.deepcopy(version["schema"]["openAPIV3Schema"])
                schema.setdefault("properties", {})["metadata"] = {"type": "object"}
                schemas[(f"{group}/{version['name']}", kind)] = _strict(schema)
    return schemas


def schema_problems(obj: Mapping[str, Any]) -> list[str]:
    where = f"{obj.get('kind')}/{obj.get('metadata', {}).get('name')}"
    key = (str(obj.get("apiVersion")), str(obj.get("kind")))
    custom = crd_schemas().get(key)
    if custom is not None:
        validator = jsonschema.Draft7Validator(custom)
        return [
            f"{where}: {'.'.join(map(str, e.absolute_path)) or '(top)'}: {e.message}"
            for e in validator.iter_errors(dict(obj))
        ]
    problems = []
    for version in KUBERNETES_VERSIONS:
        try:
            kubernetes_validate.validate(dict(obj), version, strict=True)
        except kubernetes_validate.SchemaNotFoundError:
            problems.append(f"{where}: no schema for {key[0]} in Kubernetes {version}")
        except kubernetes_validate.ValidationError as exc:
            path = ".".join(str(p) for p in exc.path)
            problems.append(f"{where}: Kubernetes {version}: {path}: {exc.message}")
    return problems
