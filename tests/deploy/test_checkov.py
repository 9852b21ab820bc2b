"""checkov's generic Kubernetes checks on every namespaced build, offline.

checkov lives in its own virtual environment beside the project's (``.venv/checkov``, from
deploy/tools/checkov-requirements.txt): its pins (packaging<24) conflict with the dev
tools'. ``make test`` creates it; this fixture does too when it is missing."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.deploy.manifests import REPO, Build

CONFIG = REPO / "deploy/checkov.yaml"
REQUIREMENTS = REPO / "deploy/tools/checkov-requirements.txt"
#: The bare base has no namespace (checkov's CKV_K8S_21 would flag `default`); every
#: other build is namespaced.
NAMESPACED = ("example", "external-redis", "tls", "keda", "external-secrets")


@pytest.fixture(scope="session")
def checkov() -> Path:
    venv = Path(sys.prefix) / "checkov"
    binary = venv / "bin" / "checkov"
    if not binary.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run(
            [str(venv / "bin" / "pip"), "install", "--quiet", "-r", str(REQUIREMENTS)], check=True
        )
    return binary


def run_checkov(checkov: Path, manifest: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(checkov), "--config-file", str(CONFIG), "-f", str(manifest)],
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.parametrize("name", NAMESPACED)
def test_checkov_passes(checkov: Path, rendered: dict[str, Path], name: str) -> None:
    done = run_checkov(checkov, rendered[name])
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]


def test_checkov_catches_a_privileged_container(
    checkov: Path, builds: dict[str, Build], tmp_path: Path
) -> None:
    objects = copy.deepcopy(builds["example"].objects)
    pool = next(
        o for o in objects if o["kind"] == "Deployment" and o["metadata"]["name"] == "usher-pool"
    )
    pool["spec"]["template"]["spec"]["containers"][0]["securityContext"]["privileged"] = True
    manifest = tmp_path / "privileged.yaml"
    manifest.write_text(yaml.safe_dump_all(objects))
    done = run_checkov(checkov, manifest)
    assert done.returncode == 1
    assert "CKV_K8S_16" in done.stdout  # "Container should not be privileged"
