"""``make demo``: the stack starts, three tenants share one queue to the end, all stops."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.up.conftest import REPO, up_env

pytestmark = pytest.mark.slow


def test_the_demo_runs_to_completion(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "clients.cli", "up", "--demo", "--exit-when-ready"],
        env=up_env(tmp_path),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "Your response is ready!" in done.stdout
    assert "bob and carol arrived" in done.stdout
    assert "Stopped: nothing Usher started is left running" in done.stdout
