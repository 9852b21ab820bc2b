"""``make up`` at a terminal: the "try it" block a person reads, and Ctrl-C stopping
everything it started (the pseudo-terminal sends SIGINT to make and all below it, exactly
as pressing the keys does)."""

from __future__ import annotations

import psutil  # type: ignore[import-untyped]  # psutil ships no stubs
import pytest

from tests.clients.terminal import Terminal
from tests.up.conftest import REPO, assert_all_gone, up_env

pytestmark = pytest.mark.slow


def test_make_up_prints_how_to_use_it_and_ctrl_c_leaves_nothing_running(tmp_path: object) -> None:
    env = up_env(tmp_path)  # type: ignore[arg-type]
    gateway = env["USHER_GATEWAY_LISTEN"]
    with Terminal(["make", "--no-print-directory", "-s", "up"], env, cwd=str(REPO)) as term:
        term.expect(r"Press Ctrl-C to stop everything", timeout=120)
        screen = term.output
        assert f"Gateway   http://{gateway}" in screen
        assert f"OLLAMA_HOST={gateway} ollama run llama3.2:1b" in screen
        assert f"curl http://{gateway}/api/chat" in screen
        assert "usher chat llama3.2:1b" in screen and "usher top" in screen
        assert "pyenv" not in screen and "command not found" not in screen
        started = psutil.Process(term.process.pid).children(recursive=True)
        assert len(started) >= 4  # usher up, Redis, the model servers, usher serve
        term.send(b"\x03")
        term.expect(r"Stopped: nothing Usher started is left running", timeout=30)
        term.wait(timeout=30)
    assert_all_gone(started)
