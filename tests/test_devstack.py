"""`make up` works: the whole local stack starts, the demo runs to completion, all stops."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow


def test_make_up_demo_runs_to_completion(tmp_path: object) -> None:
    env = {**os.environ, "USHER_STATE_DIR": str(tmp_path), "COLUMNS": "160"}
    env.pop("OLLAMA_HOST", None)
    done = subprocess.run(
        [sys.executable, "-m", "usher.devstack", "--exit-after-demo"],
        env=env,
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "Your response is ready!" in done.stdout
    assert "bob and carol arrived" in done.stdout
