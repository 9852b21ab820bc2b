"""The ``usher`` command against a running Usher: in a pseudo-terminal as a person sees it
(place in the queue, tokens, the ready line; Ctrl-C cancels), and with pipes as scripts
use it (tokens only on stdout, one error line, exit codes)."""

from __future__ import annotations

import contextlib
import json
import re
import sys

import pytest

from clients.aio import AsyncUsherClient
from clients.errors import UsherError
from clients.types import RequestState
from tests.clients.helpers import MODEL, REPO, cli_env, run_cli, wait_for_state
from tests.clients.terminal import Terminal
from usher.testing.stack import LocalStack

pytestmark = pytest.mark.slow
CHAT = [sys.executable, "-m", "clients.cli", "chat"]


async def _fill_the_slots(bob: AsyncUsherClient, count: int = 3) -> list[str]:
    """Both slots busy (and one more waiting) for a couple of seconds."""
    ids = []
    for i in range(count):
        submission = await bob.submit(MODEL, f"keep busy {i}", num_predict=150)
        ids.append(submission.id)
    for request_id in ids[:2]:
        await wait_for_state(bob, request_id, RequestState.RUNNING, RequestState.COMPLETED)
    return ids


async def test_chat_in_a_terminal_shows_the_place_then_tokens_then_ready(
    stack: LocalStack, alice: AsyncUsherClient, bob: AsyncUsherClient
) -> None:
    await _fill_the_slots(bob)
    argv = [*CHAT, MODEL, "What is a queue?", "--max-tokens", "40"]
    with Terminal(argv, cli_env(stack), cwd=str(REPO)) as terminal:
        terminal.expect(r"You are #\d+ of \d+ in the queue • Estimated wait: ")
        terminal.expect(r"Your request is now being processed…")
        terminal.expect(r"Your response is ready! Processing took \d+ seconds?\.")
        assert terminal.wait() == 0
        output = terminal.output
    (latest,) = await alice.list(model=MODEL, limit=1)
    assert latest.state == RequestState.COMPLETED and latest.usage is not None
    assert latest.usage.completion_tokens == 40
    place = output.index("You are #")
    tokens = output.index(latest.text)  # the answer, streamed as it was generated
    assert place < output.index("now being processed") < tokens < output.index("is ready!")


async def test_ctrl_c_in_the_terminal_cancels_the_request(
    stack: LocalStack, alice: AsyncUsherClient
) -> None:
    argv = [*CHAT, MODEL, "A very long essay", "--max-tokens", "300"]
    with Terminal(argv, cli_env(stack), cwd=str(REPO)) as terminal:
        terminal.expect(r"now being processed…\n\S")  # tokens are arriving
        terminal.send(b"\x03")  # Ctrl-C, as typed
        assert terminal.wait() == 130
        request_id = terminal.expect(r"cancel(?:led|ling) request (\w+)").group(1)
    cancelled = await wait_for_state(alice, request_id, RequestState.CANCELLED)
    assert cancelled.state == RequestState.CANCELLED


async def test_without_a_terminal_stdout_gets_only_the_answer(stack: LocalStack) -> None:
    result = run_cli("chat", MODEL, "-", "--max-tokens", "25", env=cli_env(stack), stdin="Hi")
    assert result.code == 0, result.stderr
    assert "Your response is ready!" in result.stderr
    assert "\x1b[" not in result.stdout
    request_id = run_cli("list", "--json", "--limit", "1", env=cli_env(stack)).stdout
    final = json.loads(request_id)
    assert result.stdout == final["result"]["text"] + "\n"


async def test_submit_watch_get_cancel_and_list(stack: LocalStack) -> None:
    env = cli_env(stack, "carol-token")
    submitted = run_cli(
        "submit", MODEL, "Hello", "--max-tokens", "20", "--priority", "low", env=env
    )
    assert submitted.code == 0, submitted.stderr
    request_id = submitted.stdout.strip()
    assert re.fullmatch(r"\w{20,}", request_id)
    watched = run_cli("watch", request_id, env=env)
    assert watched.code == 0, watched.stderr
    got = json.loads(run_cli("get", request_id, "--json", env=env).stdout)
    assert got["state"] == "REQUEST_STATE_COMPLETED" and got["priority"] == "PRIORITY_LOW"
    assert watched.stdout == got["result"]["text"] + "\n"
    listed = run_cli("list", env=env)
    assert request_id in listed.stdout and "completed" in listed.stdout
    finished = run_cli("cancel", request_id, env=env)
    assert finished.code == 1
    assert finished.stderr.startswith("usher: ") and "already finished" in finished.stderr


async def test_errors_are_one_line_with_an_exit_code(stack: LocalStack) -> None:
    env = cli_env(stack)
    bad = run_cli("chat", "not a model!", "hi", env=env)
    assert bad.code == 2
    (line,) = bad.stderr.strip().splitlines()[-1:]
    assert line.startswith("usher: model: ")
    unknown = run_cli("get", "01" + "0" * 24, env=env)
    assert unknown.code == 3 and "not found" in unknown.stderr
    denied = run_cli("admin", "queue-stats", env=env)  # alice is no operator
    assert denied.code == 3
    down = run_cli("list", "--scheduler", "127.0.0.1:1", "--retry-for", "0", env=env)
    assert down.code == 4 and down.stderr.startswith("usher: ")
    usage = run_cli("admin", "weight", "ollama-0", "heavy", env=env)
    assert usage.code == 2  # argparse: not a number


async def test_a_full_queue_says_when_to_retry(
    stack: LocalStack, operator: AsyncUsherClient, bob: AsyncUsherClient
) -> None:
    model = "qwen2.5:0.5b"
    await operator.admin.update_queue_config(model, max_queue_size=1)
    # Long enough answers that the slots stay busy while the CLI starts, however slow the
    # machine is; cancelled once the CLI has answered.
    held: list[str] = []
    try:
        for i in (1, 2):
            blocker = await bob.submit(model, f"cli blocker {i}", num_predict=5000)
            held.append(blocker.id)
            await wait_for_state(bob, blocker.id, RequestState.RUNNING, RequestState.COMPLETED)
        held.append((await bob.submit(model, "cli waiting", num_predict=10)).id)
        full = run_cli("chat", model, "hi", "--retry-for", "0", env=cli_env(stack))
    finally:
        await operator.admin.update_queue_config(model, max_queue_size=100)
        for request_id in held:
            with contextlib.suppress(UsherError):
                await bob.cancel(request_id, "test over")
    assert full.code == 4
    assert re.search(
        r"usher: the queue for model 'qwen2.5:0.5b' is full .*; retry in \d+s", full.stderr
    )


async def test_top_once_renders_the_badges_and_the_fleet(stack: LocalStack) -> None:
    result = run_cli("top", "--once", MODEL, env=cli_env(stack))
    assert result.code == 0, result.stderr
    assert "Queues" in result.stdout and f"{MODEL} (" in result.stdout
    assert "Instances" in result.stdout and "ollama-0" in result.stdout
    assert "healthy" in result.stdout and "Models" in result.stdout


async def test_admin_commands(stack: LocalStack) -> None:
    env = cli_env(stack, "admin-token")
    configured = run_cli(
        "admin", "queue-config", "nomic-embed-text", "--max-queue-size", "7",
        "--queue-timeout", "5m", "--json", env=env,
    )  # fmt: skip
    assert configured.code == 0, configured.stderr
    config = json.loads(configured.stdout)
    assert config["max_queue_size"] == 7 and config["queue_timeout"] == "300s"
    stats = run_cli("admin", "queue-stats", "nomic-embed-text", "--json", env=env)
    assert json.loads(stats.stdout)["config"]["max_queue_size"] == 7
    weight = run_cli("admin", "tenant-weight", "acme", "bob", "2.5", "--json", env=env)
    assert json.loads(weight.stdout)["weight"] == 2.5
    drained = run_cli("admin", "drain", "ollama-0", "--json", env=env)
    assert json.loads(drained.stdout)["draining"] is True
    resumed = run_cli("admin", "drain", "ollama-0", "--undo", "--json", env=env)
    assert json.loads(resumed.stdout).get("draining", False) is False
    instances = run_cli("admin", "instances", env=env)
    assert instances.code == 0 and "ollama-0" in instances.stdout
    weighted = run_cli("admin", "weight", "ollama-0", "2", "--json", env=env)
    assert json.loads(weighted.stdout)["config"]["weight"] == 2
    reset = run_cli("admin", "reset-circuit", "ollama-0", "--model", MODEL, env=env)
    assert reset.code == 0 and "closed" in reset.stdout
    loaded = run_cli("admin", "load", "ollama-0", "nomic-embed-text", "--json", env=env)
    assert "nomic-embed-text:latest" in {m["name"] for m in json.loads(loaded.stdout)["loaded"]}
    unloaded = run_cli("admin", "unload", "ollama-0", "nomic-embed-text", "--json", env=env)
    assert unloaded.code == 0, unloaded.stderr
    # A second instance that only serves embeddings (the chat models keep their two slots).
    registered = run_cli(
        "admin", "register", "embedder", stack.model_urls[0], "--kind", "ollama",
        "--role", "embedding", "--allowed-model", "nomic-embed-text", "--json", env=env,
    )  # fmt: skip
    assert registered.code == 0, registered.stderr
    assert json.loads(registered.stdout)["config"]["id"] == "embedder"
    assert run_cli("admin", "deregister", "embedder", env=env).code == 0
    missing = run_cli("admin", "drain", "no-such-instance", env=env)
    assert missing.code == 3
