"""Helpers of the client tests: polling a request, running the ``usher`` command."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from clients.aio import AsyncUsherClient
from clients.types import Request, RequestState
from usher.testing.stack import LocalStack

__all__ = ["MODEL", "REPO", "CliResult", "cli_env", "run_cli", "wait_for_state"]

REPO = Path(__file__).resolve().parents[2]
MODEL = "llama3.2:1b"


async def wait_for_state(
    client: AsyncUsherClient, request_id: str, *states: RequestState, timeout: float = 10.0
) -> Request:
    """Poll Get until the request is in one of ``states``."""
    async with asyncio.timeout(timeout):
        while True:
            request = await client.get(request_id)
            if request.state in states:
                return request
            await asyncio.sleep(0.05)


def cli_env(stack: LocalStack, token: str = "alice-token") -> dict[str, str]:
    """The environment the ``usher`` command reads its addresses and token from."""
    return {
        **os.environ,
        "USHER_SCHEDULER_ADDRESS": stack.scheduler_address,
        "USHER_NOTIFIER_ADDRESS": stack.notifier_address,
        "USHER_POOL_ADDRESS": stack.pool_address,
        "USHER_TOKEN": token,
        "TERM": "xterm-256color",
        "COLUMNS": "160",
        "PYTHONPATH": str(REPO),
    }


@dataclass(frozen=True)
class CliResult:
    code: int
    stdout: str
    stderr: str


def run_cli(
    *args: str,
    env: Mapping[str, str],
    stdin: str = "",
    timeout: float = 30.0,
) -> CliResult:
    """``usher ARGS`` with pipes (not a terminal) for stdin, stdout and stderr."""
    done = subprocess.run(
        [sys.executable, "-m", "clients.cli", *args],
        input=stdin,
        capture_output=True,
        text=True,
        env=dict(env),
        cwd=REPO,
        timeout=timeout,
        check=False,
    )
    return CliResult(done.returncode, done.stdout, done.stderr)
