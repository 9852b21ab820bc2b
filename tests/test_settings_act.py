"""A setting that does nothing fails the build.

Walks every documented setting (the environment variables and YAML keys in the READMEs'
settings tables) and proves each is read by the code, and that the settings field it fills
is used where it acts: somewhere other than the code that parses, validates or serializes
settings. Every field of every settings class is held to the same rule, documented or not.
(Dead functions, which could "use" a field for nothing, are vulture's job in ``make lint``.)
"""

from __future__ import annotations

import ast
import importlib
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
READMES = (
    "README.md",
    "services/gateway/README.md",
    "clients/README.md",
    "deploy/README.md",
)
#: Code that reads settings: the services, the shared runtime, the SDK and CLI.
SOURCE_DIRS = ("services", "usher", "clients")
#: Not the product's runtime: generated stubs, test helpers (they set variables, not read).
SKIP_DIRS = ("usher/v1", "usher/testing")
#: Settings classes: (module path, class name).
SETTINGS_CLASSES = (
    ("services/scheduler/settings.py", "SchedulerSettings"),
    ("services/scheduler/dispatcher.py", "DispatchSettings"),
    ("usher/queue/records.py", "QueueDefaults"),
    ("services/scheduler/quotas.py", "Limits"),
    ("services/pool/settings.py", "PoolSettings"),
    ("services/pool/settings.py", "InstanceSpec"),
    ("services/pool/circuit.py", "CircuitConfig"),
    ("services/notifier/settings.py", "NotifierSettings"),
    ("usher/queue/settings.py", "QueueSettings"),
    ("services/gateway/settings.py", "GatewaySettings"),
    ("usher/settings.py", "ServiceSettings"),
    ("usher/auth.py", "AuthSettings"),
    ("usher/tls.py", "TlsSettings"),
    ("usher/crypto.py", "EncryptionSettings"),
    ("usher/server.py", "ConnectionSettings"),
    ("usher/metrics.py", "MetricsSettings"),
)
SETTINGS_MODULES = frozenset(module for module, _ in SETTINGS_CLASSES)
#: Functions (of those modules) that only parse, validate or serialize settings: a field used only there acts
#: on nothing.
PARSING = {
    "__post_init__",
    "check",
    "from_env",
    "from_proto",
    "to_proto",
    "from_config",
    "load_pool_settings",
    "_load_instances",
    "_instance",
    "parse_instances",
    "_parse_instances",
    "_entry",
    "_file_settings",
    "_default_memory_budget",
    "_local_entry",
    "_instance_error",
    "replace",
}
#: pydantic's validators (``@field_validator``, ``@model_validator``) only parse and check
#: too: a field read only there acts on nothing. Found by their decorators.
_VALIDATORS = ("field_validator", "model_validator")
_NAME = re.compile(r"`([A-Za-z_][A-Za-z0-9_]*)`")
_ENV = re.compile(r"^[A-Z][A-Z0-9_]{2,}$")
_KEY = re.compile(r"^[a-z][a-z0-9_]*$")


@dataclass(frozen=True)
class Documented:
    name: str
    where: str
    yaml: bool


def documented() -> list[Documented]:
    """Names in the first two columns of every settings table: variables (UPPER_CASE) and,
    in tables headed "YAML key", keys (lower_case)."""
    out: list[Documented] = []
    for readme in READMES:
        yaml_table = False
        for number, line in enumerate((ROOT / readme).read_text().splitlines(), 1):
            if not line.startswith("|"):
                yaml_table = False
                continue
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if cells and cells[0].lower() in ("yaml key", "variable", "setting"):
                yaml_table = cells[0].lower() == "yaml key"
                continue
            for column, cell in enumerate(cells[:2]):
                for name in _NAME.findall(cell):
                    if _ENV.match(name) and name.startswith(
                        ("USHER_", "MAX_", "MODEL_", "OLLAMA_", "QUEUE_", "REDIS_", "OTEL_")
                    ):
                        out.append(Documented(name, f"{readme}:{number}", yaml=False))
                    elif yaml_table and column == 0 and _KEY.match(name):
                        out.append(Documented(name, f"{readme}:{number}", yaml=True))
    return out


def sources() -> Iterator[tuple[str, ast.Module]]:
    for folder in SOURCE_DIRS:
        for path in sorted((ROOT / folder).rglob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            if rel.startswith(SKIP_DIRS):
                continue
            yield rel, ast.parse(path.read_text(), rel)


class Index:
    """What the code reads and uses, from its syntax trees."""

    def __init__(self) -> None:
        #: env name → fields it fills ("" for a variable read where it acts).
        self.env_reads: dict[str, set[str]] = {}
        #: attribute name → modules (and the function in them) where it is read.
        self.uses: dict[str, set[tuple[str, str]]] = {}
        self.strings: set[str] = set()
        self.fields: dict[tuple[str, str], list[str]] = {}
        #: (module, function) of every pydantic validator.
        self.validators: set[tuple[str, str]] = set()
        for module, tree in sources():
            self._walk(module, tree)
        self._declared_variables()

    def _declared_variables(self) -> None:
        """Settings declared with pydantic-settings read variables named after their fields
        (usher.settings.variables), which no string in the code spells out."""
        from usher.settings import variables

        for module, name in SETTINGS_CLASSES:
            imported = importlib.import_module(module.removesuffix(".py").replace("/", "."))
            fields = getattr(getattr(imported, name), "model_fields", {})
            for field, info in fields.items():
                for variable in variables(field, info):
                    self.env_reads.setdefault(variable, set()).add(field)

    def _walk(self, module: str, tree: ast.Module) -> None:
        parents: dict[ast.AST, ast.AST] = {}
        for node in ast.walk(tree):
            for child in ast.iter_child_nodes(node):
                parents[child] = node
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                self.strings.add(node.value)
                filled = _filled_field(node, parents) if _ENV.match(node.value) else None
                if filled is not None:
                    self.env_reads.setdefault(node.value, set()).add(filled)
            elif isinstance(node, ast.Attribute):
                self.uses.setdefault(node.attr, set()).add((module, _function_of(node, parents)))
            elif isinstance(node, ast.FunctionDef) and _is_validator(node):
                self.validators.add((module, node.name))
            elif isinstance(node, ast.ClassDef) and (module, node.name) in SETTINGS_CLASSES:
                self.fields[(module, node.name)] = [
                    s.target.id
                    for s in node.body
                    if isinstance(s, ast.AnnAssign) and isinstance(s.target, ast.Name)
                ]

    def acts(self, field: str) -> bool:
        """Read somewhere other than the parsing and validation of settings."""
        return any(
            module not in SETTINGS_MODULES
            or (function not in PARSING and (module, function) not in self.validators)
            for module, function in self.uses.get(field, ())
        )


def _is_validator(node: ast.FunctionDef) -> bool:
    for decorator in node.decorator_list:
        called = decorator.func if isinstance(decorator, ast.Call) else decorator
        name = called.attr if isinstance(called, ast.Attribute) else getattr(called, "id", "")
        if name in _VALIDATORS:
            return True
    return False


def _function_of(node: ast.AST, parents: dict[ast.AST, ast.AST]) -> str:
    while node in parents:
        node = parents[node]
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            return node.name
    return ""


def _filled_field(node: ast.AST, parents: dict[ast.AST, ast.AST]) -> str | None:
    """The settings field a variable's value goes to: the keyword its reader's value is
    passed as (``field=environ.get("NAME")``), the key it maps from (``{"field": "NAME"}``)
    or the field it names (``field: int = Field(..., validation_alias="NAME")``); "" when
    it is read where it acts; None when the name is not read here (a key of a mapping that
    sets it for another process)."""
    holder = parents.get(node)
    passed = parents.get(holder) if isinstance(holder, ast.Call) else None
    if isinstance(passed, ast.keyword) and passed.arg in ("validation_alias", "alias"):
        holder = passed  # AliasChoices("NAME", ...): the field it names
    if isinstance(holder, ast.Dict):
        if node in holder.keys:
            return None
        key = holder.keys[holder.values.index(node)]  # type: ignore[arg-type]
        return key.value if isinstance(key, ast.Constant) and isinstance(key.value, str) else ""
    if isinstance(holder, ast.keyword) and holder.arg in ("validation_alias", "alias"):
        statement: ast.AST = holder
        while statement in parents and not isinstance(statement, ast.stmt):
            statement = parents[statement]
        if isinstance(statement, ast.AnnAssign) and isinstance(statement.target, ast.Name):
            return statement.target.id
        return ""
    if isinstance(holder, ast.Call) and holder.args and holder.args[0] is node:
        passed = parents.get(holder)
        if isinstance(passed, ast.keyword) and passed.arg:
            return passed.arg
    return ""


@pytest.fixture(scope="module")
def index() -> Index:
    return Index()


def test_the_readmes_document_settings() -> None:
    names = {d.name for d in documented()}
    assert {"USHER_QUEUE_MAX_SIZE", "USHER_POOL_STRATEGY", "circuit_half_open_max_calls"} <= names


def test_every_documented_variable_is_read_and_what_it_fills_acts(index: Index) -> None:
    problems = []
    for setting in documented():
        if setting.yaml:
            continue
        if setting.name not in index.env_reads:
            problems.append(f"{setting.where}: {setting.name} is documented but never read")
            continue
        for field in index.env_reads[setting.name] - {""}:
            if not index.acts(field):
                problems.append(
                    f"{setting.where}: {setting.name} fills {field!r}, which nothing uses"
                )
    assert not problems, "\n".join(problems)


def test_every_documented_yaml_key_is_a_setting_that_acts(index: Index) -> None:
    problems = []
    for setting in documented():
        if not setting.yaml:
            continue
        if setting.name not in index.strings and not any(
            setting.name in fields for fields in index.fields.values()
        ):
            problems.append(f"{setting.where}: YAML key {setting.name!r} is never read")
        elif not index.acts(_field_of_key(setting.name)):
            problems.append(f"{setting.where}: YAML key {setting.name!r} sets nothing used")
    assert not problems, "\n".join(problems)


def _field_of_key(key: str) -> str:
    """The InstanceSpec / PoolSettings field a YAML key fills (keys and fields differ in a
    few spellings)."""
    return {
        "memory_budget": "memory_budget_bytes",
        "default_memory_budget": "memory_budget_bytes",
    }.get(key, key)


def test_every_field_of_every_settings_class_acts(index: Index) -> None:
    assert len(index.fields) == len(SETTINGS_CLASSES), "a settings class moved or was renamed"
    idle = [
        f"{module}: {cls}.{field}"
        for (module, cls), fields in index.fields.items()
        for field in fields
        if not index.acts(field)
    ]
    assert not idle, "settings parsed but never used:\n" + "\n".join(idle)
