"""Build-time check of the installed package (run by the Dockerfile's build stage).

`pip install .` installs only what pyproject.toml declares: a data file loaded at run time
(the Lua scripts) that is missing from `[tool.setuptools.package-data]` would be left out,
and the service would fail only when it first runs. This fails the image build instead.

    python deploy/docker/check_install.py SOURCE_DIR
"""

from __future__ import annotations

import importlib
import importlib.machinery
import importlib.util
import sys
from pathlib import Path

#: Files of these kinds inside a package are read at run time and must be installed too.
DATA_SUFFIXES = (".lua",)
#: Modules every service needs; importing them proves the stubs and dependencies resolve.
MODULES = (
    "usher.server",
    "usher.v1.scheduler_pb2_grpc",
    "services.scheduler.app",
    "services.pool.app",
    "services.notifier.app",
)
#: Services that may not exist yet in this version of the source.
OPTIONAL_MODULES = ("services.gateway",)


def _find(name: str) -> importlib.machinery.ModuleSpec | None:
    try:
        return importlib.util.find_spec(name)
    except ModuleNotFoundError:
        return None


def main(source: Path) -> int:
    problems: list[str] = []
    for name in MODULES:
        try:
            importlib.import_module(name)
        except Exception as exc:  # report every failure, not only the first
            problems.append(f"cannot import {name}: {exc!r}")
    for name in OPTIONAL_MODULES:
        if (source / Path(*name.split("."))).is_dir() and _find(name) is None:
            problems.append(f"{name} is in the source but was not installed")

    # Only the source's top-level packages (folders with an __init__.py): not build/ etc.
    packages = sorted(p.parent for p in source.glob("*/__init__.py"))
    for data in sorted(f for package in packages for f in package.rglob("*")):
        if data.suffix not in DATA_SUFFIXES or not data.is_file():
            continue
        relative = data.relative_to(source)
        # The nearest importable package above the file (lua/ folders are not packages).
        parts = list(relative.parent.parts)
        while parts and _find(".".join(parts)) is None:
            parts.pop()
        if not parts:
            continue  # not inside an installed package at all (e.g. a script folder)
        spec = _find(".".join(parts))
        locations = list(spec.submodule_search_locations or []) if spec else []
        if not locations:
            continue
        installed = Path(locations[0])
        target = installed.joinpath(*relative.parent.parts[len(parts) :], data.name)
        if not target.is_file():
            problems.append(
                f"{relative} is not installed (add it to [tool.setuptools.package-data] "
                f"for {'.'.join(parts)!r} in pyproject.toml; looked for {target})"
            )

    for problem in problems:
        print(f"check_install: {problem}", file=sys.stderr)
    if not problems:
        print("check_install: installed package is complete")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1] if len(sys.argv) > 1 else ".")))
