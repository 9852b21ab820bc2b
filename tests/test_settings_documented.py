"""The READMEs' settings tables and the settings models say the same.

Each service's table lists every variable its model reads (a field's first variable or
any of its aliases), nothing the model does not read (but for the few variables other
code reads, named below with their reader), and each default as the model has it. The
Pool's tables do the same for YAML keys. A setting added to a model without a row, a row
left behind by a removed setting, or a default changed on one side only fails here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import pytest
from pydantic import BaseModel

from services.gateway.settings import GatewaySettings
from services.notifier.settings import NotifierSettings
from services.pool.settings import InstanceSpec, PoolSettings
from services.scheduler.settings import SchedulerSettings
from usher.settings import variables

ROOT = Path(__file__).resolve().parent.parent
_NAME = re.compile(r"`([A-Za-z_][A-Za-z0-9_]*)`")


@dataclass(frozen=True)
class Table:
    """A settings table: the first after ``heading`` in ``readme``."""

    readme: str
    heading: str

    def rows(self) -> list[dict[str, str]]:
        lines = (ROOT / self.readme).read_text().splitlines()
        start = lines.index(self.heading)
        header: list[str] = []
        rows: list[dict[str, str]] = []
        for line in lines[start + 1 :]:
            if not line.startswith("|"):
                if header:
                    break
                if line.startswith("#"):
                    raise AssertionError(f"{self.readme}: no table under {self.heading!r}")
                continue
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if not header:
                header = [c.lower() for c in cells]
            elif not set(cells[0]) <= set("-: "):
                rows.append(dict(zip(header, cells, strict=False)))
        return rows


#: Variables a service's table documents that its model does not read, and who does.
READ_ELSEWHERE = {
    "USHER_AUTH_OPEN": "usher.auth.open_access_from_env (every service)",
    "USHER_INSTANCES": "services.pool.settings.load_pool_settings (one source of instances)",
    "OLLAMA_HOST": "services.pool.settings.load_pool_settings (one source of instances)",
    "MAX_MODEL_MEMORY_GB": "services.pool.settings.load_pool_settings (instances' budget)",
    "MODEL_POOL_AUTO_UNLOAD_MINUTES": "services.pool.settings.load_pool_settings (PRD name)",
}

SERVICES: list[tuple[type[BaseModel], Table]] = [
    (SchedulerSettings, Table("README.md", "### Settings (environment)")),
    (NotifierSettings, Table("README.md", "### Notifier settings (environment)")),
    (
        PoolSettings,
        Table("README.md", "### Pool settings (YAML file `USHER_POOL_CONFIG`, environment)"),
    ),
    (GatewaySettings, Table("services/gateway/README.md", "## Settings")),
]


def _documented(row: dict[str, str], column: str) -> list[str]:
    return _NAME.findall(row.get(column, ""))


def _shown(value: object) -> str | None:
    """A default as a table shows it; None where a table explains it in words."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int | float):
        return f"{value:g}" if isinstance(value, float) else str(value)
    if isinstance(value, str) and value:
        return str(getattr(value, "value", value))
    return None


def _cell(text: str) -> str:
    """The value of a default cell: ``604800 (7 days)`` shows 604800."""
    return re.sub(r"\s*\(.*\)$", "", text.replace("`", "")).strip()


@pytest.mark.parametrize(("model", "table"), SERVICES, ids=lambda x: getattr(x, "__name__", ""))
def test_every_variable_of_the_model_has_a_row_and_every_row_a_variable(
    model: type[BaseModel], table: Table
) -> None:
    rows = table.rows()
    documented = {name for row in rows for name in _documented(row, "variable")}
    read = {v for name, field in model.model_fields.items() for v in variables(name, field)}
    missing = [
        " / ".join(variables(name, field))
        for name, field in model.model_fields.items()
        if not set(variables(name, field)) & documented
    ]
    assert not missing, f"{table.readme} {table.heading!r}: no row for {missing}"
    stray = sorted(documented - read - set(READ_ELSEWHERE))
    assert not stray, (
        f"{table.readme} {table.heading!r}: rows for what the model doesn't read {stray}"
    )


@pytest.mark.parametrize(("model", "table"), SERVICES, ids=lambda x: getattr(x, "__name__", ""))
def test_the_tables_defaults_are_the_models(model: type[BaseModel], table: Table) -> None:
    by_variable = {
        v: name for name, field in model.model_fields.items() for v in variables(name, field)
    }
    wrong = []
    for row in table.rows():
        names = [by_variable[v] for v in _documented(row, "variable") if v in by_variable]
        if not names:
            continue
        default = model.model_fields[names[0]].get_default(call_default_factory=True)
        shown = _shown(default)
        if shown is not None and _cell(row["default"]) != shown:
            wrong.append(f"{row['variable']}: table {row['default']!r}, model {shown!r}")
    assert not wrong, f"{table.readme} {table.heading!r}:\n" + "\n".join(wrong)


def test_the_pool_files_keys_are_its_fields() -> None:
    table = SERVICES[2][1]
    keys = {name for row in table.rows() for name in _documented(row, "yaml key")}
    fields = set(PoolSettings.model_fields) - {"tokens"}  # tokens: only USHER_API_TOKENS
    assert keys - {"default_memory_budget"} == fields


def test_the_instance_keys_are_the_instances_fields() -> None:
    rows = Table(
        "README.md",
        "Instance keys (`instances:` entries, or `;key=value` options of `USHER_INSTANCES`):",
    ).rows()
    keys = {name for row in rows for name in _documented(row, "yaml key")}
    # The file's key for memory is the short one (a size: "24GiB"), the field is in bytes.
    fields = {
        "memory_budget" if f == "memory_budget_bytes" else f for f in InstanceSpec.model_fields
    }
    assert keys == fields
