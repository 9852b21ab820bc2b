"""The waiting page in a real browser (Chromium, headless) against the whole stack: open it,
paste a token, watch the badges, submit while the queue is busy and see the place go down,
the answer stream in, cancel, switch to the external provider, a badge turn red as the
queue grows, and the operator panel for an admin. A screenshot of each state is kept in
``test-artifacts/browser/``."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest
from playwright.async_api import Browser, Locator, Page, expect

from tests.gateway.conftest import ADMIN, WAITING_MODELS, Ahead, Services, one_slot_stack
from usher.testing.stack import LocalStack
from usher.v1 import request_pb2, scheduler_pb2

pytestmark = pytest.mark.slow
MODEL = WAITING_MODELS[0]
EMBEDDING = "nomic-embed-text:latest"
S = request_pb2
PHONE = {"width": 390, "height": 844}
DESKTOP = {"width": 1100, "height": 900}


@pytest.fixture(scope="module")
def stack() -> Iterator[LocalStack]:
    # About 2 s per answer; an embedding model beside the chat models.
    yield from one_slot_stack(
        tokens_per_second="12", output_tokens="20:28", keepalive="1", extra_models=(EMBEDDING,)
    )


async def idle(services: Services, timeout: float = 20.0) -> None:
    """Until nothing runs or waits for the model."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        stats = await services.admin.GetQueueStats(
            scheduler_pb2.GetQueueStatsRequest(models=[MODEL]), metadata=ADMIN, timeout=5
        )
        if not stats.stats or (stats.stats[0].queued == 0 and stats.stats[0].running == 0):
            return
        await asyncio.sleep(0.1)


@pytest.fixture
async def queue(services: Services) -> AsyncIterator[Ahead]:
    ahead = Ahead(services, S.PRIORITY_HIGH)
    yield ahead
    await ahead.release()
    await idle(services)


@pytest.fixture
async def page(browser: Browser, stack: LocalStack) -> AsyncIterator[Page]:
    context = await browser.new_context(viewport=DESKTOP)  # type: ignore[arg-type]
    opened = await context.new_page()
    errors: list[str] = []
    opened.on("pageerror", lambda exc: errors.append(str(exc)))
    await opened.goto(stack.gateway_url + "/ui")
    yield opened
    await context.close()
    assert not errors, errors


async def use_token(page: Page, token: str) -> None:
    access = page.locator("#access")
    if await access.get_attribute("open") is None:
        await access.locator("summary").click()
    await page.get_by_label("API token").fill(token)
    await page.get_by_role("button", name="Use token").click()


async def snap(page: Page, artifacts: Path, name: str) -> None:
    await page.screenshot(path=str(artifacts / f"{name}.png"), full_page=True)


def badge(page: Page, model: str = MODEL) -> Locator:
    return page.locator(f'li.badge[data-model="{model}"]')


async def positions_until_running(page: Page, timeout: float = 40.0) -> list[int]:
    """The places the status line showed, in order, until the request ran."""
    seen: list[int] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = await page.locator("#status").text_content() or ""
        found = re.search(r"You are #(\d+) of (\d+)", text)
        if found and (not seen or seen[-1] != int(found.group(1))):
            seen.append(int(found.group(1)))
        if "processed" in text or "Processing is" in text or "ready" in text:
            return seen
        await asyncio.sleep(0.05)
    raise AssertionError(f"never ran; places seen {seen}")


async def test_without_a_token_the_page_asks_for_one(page: Page, artifacts: Path) -> None:
    await expect(page.locator("#models-error")).to_contain_text("Paste an access token")
    # The models are listed all the same (no token needed for the list).
    await expect(page.locator("#model option")).to_have_count(2)
    await snap(page, artifacts, "00-no-token")


async def test_the_picker_offers_only_models_that_can_chat(page: Page, stack: LocalStack) -> None:
    """The fleet serves an embedding-only model too (its /api/show: capabilities
    ["embedding"]; /v1/models lists it): the chat picker leaves it out."""
    await use_token(page, "alice-token")
    async with httpx.AsyncClient(timeout=30) as client:
        embedded = await client.post(
            stack.gateway_url + "/api/embed",
            json={"model": EMBEDDING, "input": "a vector, please"},
            headers={"authorization": "Bearer alice-token"},
        )
    assert embedded.status_code == 200, embedded.text  # it is served, for embeddings
    options = page.locator("#model option")
    await expect(options).to_have_count(len(WAITING_MODELS))
    offered = [await option.get_attribute("value") or "" for option in await options.all()]
    assert sorted(offered) == sorted(WAITING_MODELS)


async def test_waiting_in_the_queue_until_the_answer(
    page: Page, artifacts: Path, queue: Ahead
) -> None:
    await use_token(page, "alice-token")
    await expect(badge(page)).to_be_visible()
    await expect(page.locator("#token-state")).to_have_text("(set)")
    await page.get_by_label("Choose a model").select_option(MODEL)
    await snap(page, artifacts, "01-open")

    await queue.add(4)  # one runs, three wait ahead of alice
    prompt = page.get_by_label("Message")
    await prompt.fill("Tell me about queues")
    await prompt.press("Enter")
    status = page.locator("#status")
    await expect(status).to_contain_text(re.compile(r"You are #\d+ of \d+ in the queue"))
    await expect(status).to_contain_text("Estimated wait:")
    assert await status.get_attribute("aria-live") == "polite"
    await expect(page.get_by_role("button", name="Cancel")).to_be_visible()
    await expect(page.locator("#request-model")).to_have_text(f"{MODEL} • local model")
    await expect(page.locator("#fair-note")).to_contain_text("Places can move")
    await expect(badge(page)).not_to_have_attribute("data-level", "available")
    await expect(page).to_have_title(re.compile(r"^#\d+ of \d+ — Usher$"))
    await snap(page, artifacts, "02-queued")

    seen = await positions_until_running(page)
    assert len(seen) >= 2 and seen == sorted(seen, reverse=True), seen
    await snap(page, artifacts, "03-running")

    # Tokens appear one batch after another, before the answer is complete.
    answer = page.locator(".conversation .assistant .text")
    lengths: list[int] = []
    while "ready" not in (await status.text_content() or ""):
        if await answer.count():
            length = len(await answer.text_content() or "")
            if length and (not lengths or lengths[-1] != length):
                lengths.append(length)
        await asyncio.sleep(0.05)
    assert len(lengths) >= 2 and lengths == sorted(lengths), lengths
    await expect(status).to_contain_text("Your response is ready!", timeout=20_000)
    await expect(page.get_by_role("button", name="Cancel")).to_be_hidden()
    assert len(await answer.text_content() or "") > 10
    await expect(page).to_have_title("✓ Ready — Usher")
    await snap(page, artifacts, "04-answered")


async def test_a_reload_keeps_the_chat_and_the_place(
    page: Page, artifacts: Path, queue: Ahead
) -> None:
    await use_token(page, "alice-token")
    await expect(badge(page)).to_be_visible()
    await queue.add(3)
    await page.get_by_label("Message").fill("Still there after a reload?")
    await page.get_by_label("Message").press("Enter")
    status = page.locator("#status")
    await expect(status).to_contain_text("in the queue")
    await page.reload()
    await expect(page.locator(".conversation .user")).to_have_text(
        re.compile("Still there after a reload\\?")
    )
    await expect(status).to_contain_text(re.compile(r"You are #\d+ of \d+ in the queue"))
    await snap(page, artifacts, "05a-reloaded")
    await expect(status).to_contain_text("Your response is ready!", timeout=30_000)
    await expect(page.locator(".conversation .assistant .text")).not_to_be_empty()


async def test_cancel_while_queued(page: Page, artifacts: Path, queue: Ahead) -> None:
    await use_token(page, "alice-token")
    await expect(badge(page)).to_be_visible()
    await queue.add(3)
    await page.get_by_label("Message").fill("Never mind this one")
    await page.get_by_role("button", name="Send").click()
    status = page.locator("#status")
    await expect(status).to_contain_text("in the queue")
    await page.get_by_role("button", name="Cancel").click()
    await expect(status).to_contain_text("Your request was cancelled")
    await expect(page.get_by_role("button", name="Send")).to_be_enabled()
    await snap(page, artifacts, "05-cancelled")


async def test_a_badge_turns_long_as_the_queue_grows_and_switch_is_offered(
    page: Page, artifacts: Path, queue: Ahead, services: Services
) -> None:
    await use_token(page, "alice-token")
    await expect(badge(page)).to_have_attribute("data-level", "available")
    await snap(page, artifacts, "06-badge-available")
    await queue.add(9)
    await expect(badge(page)).to_have_attribute("data-level", "long", timeout=10_000)
    await expect(badge(page)).to_contain_text("Long queue")
    await page.get_by_label("Choose a model").select_option(MODEL)
    await expect(page.locator("#suggestion")).to_contain_text("for faster results")
    await snap(page, artifacts, "07-badge-long")

    # Waiting behind 8+: the product's prompt and the switch.
    await page.get_by_label("Message").fill("I would rather not wait")
    await page.get_by_role("button", name="Send").click()
    offer = page.locator("#offer")
    await expect(offer).to_contain_text("Queue is longer than usual")
    switch = page.get_by_role("button", name="Switch to external provider")
    await expect(switch).to_be_visible()
    await snap(page, artifacts, "08-switch-offered")
    await switch.click()
    await expect(page.locator("#request-model")).to_have_text(f"{MODEL} • external provider")
    status = page.locator("#status")
    await expect(status).to_contain_text("Your response is ready!", timeout=20_000)
    await snap(page, artifacts, "09-switched-answered")


async def test_the_operator_panel_for_an_admin(page: Page, artifacts: Path, queue: Ahead) -> None:
    await use_token(page, "alice-token")
    await expect(badge(page)).to_be_visible()
    await expect(page.locator("#operator")).to_be_hidden()  # not an admin
    await queue.add(2)
    await use_token(page, "admin-token")
    panel = page.locator("#operator")
    await expect(panel).to_be_visible()
    await expect(panel.locator("#queues tbody tr").first).to_be_visible()
    await expect(panel.locator("#instances tbody")).to_contain_text("ollama-0")
    await expect(panel.locator("#instances tbody")).to_contain_text("external")
    await snap(page, artifacts, "10-operator")
    await panel.get_by_role("button", name=f"Pause {MODEL}").click()
    await expect(page.locator("#operator-status")).to_contain_text(f"{MODEL}: paused")
    await expect(panel.get_by_role("button", name=f"Resume {MODEL}")).to_be_visible()
    await panel.get_by_role("button", name=f"Resume {MODEL}").click()
    await expect(page.locator("#operator-status")).to_contain_text(f"{MODEL}: resumed")
    # Drain asks first; accepted, the queued requests end with the operator's reason.
    await queue.add(3)
    page.once("dialog", lambda dialog: dialog.accept())
    await panel.get_by_role("button", name=f"Drain {MODEL}").click()
    await expect(page.locator("#operator-status")).to_contain_text(
        re.compile(rf"{re.escape(MODEL)}: [1-9]\d* queued requests ended")
    )
    await snap(page, artifacts, "10b-operator-drained")


async def tab_to(page: Page, element_id: str, limit: int = 30) -> None:
    """Press Tab until the element has the focus (as a keyboard user would)."""
    for _ in range(limit):
        if await page.evaluate("document.activeElement && document.activeElement.id") == element_id:
            return
        await page.keyboard.press("Tab")
    raise AssertionError(f"#{element_id} is not reachable with Tab")


async def test_keyboard_only(page: Page, queue: Ahead) -> None:
    # The token form, the picker, the message, Send and Cancel: all by keyboard.
    await tab_to(page, "access-toggle")
    await page.keyboard.press("Enter")
    await tab_to(page, "token")
    await page.keyboard.type("alice-token")
    await page.keyboard.press("Enter")
    await expect(page.locator("#token-state")).to_have_text("(set)")
    await expect(badge(page)).to_be_visible()
    await tab_to(page, "model")
    await queue.add(3)
    await tab_to(page, "prompt")
    await page.keyboard.type("Typed, not clicked")
    await page.keyboard.press("Enter")
    await expect(page.locator("#status")).to_contain_text("in the queue")
    await tab_to(page, "cancel")
    await page.keyboard.press("Enter")
    await expect(page.locator("#status")).to_contain_text("Your request was cancelled")


async def test_readable_on_a_phone(
    browser: Browser, stack: LocalStack, artifacts: Path, queue: Ahead
) -> None:
    context = await browser.new_context(viewport=PHONE, is_mobile=True)  # type: ignore[arg-type]
    page = await context.new_page()
    await page.goto(stack.gateway_url + "/ui")
    await use_token(page, "alice-token")
    await expect(badge(page)).to_be_visible()
    await queue.add(3)
    await page.get_by_label("Message").fill("Hello from a phone")
    await page.get_by_label("Message").press("Enter")
    await expect(page.locator("#status")).to_contain_text("in the queue")
    # Nothing wider than the screen.
    width = await page.evaluate("document.documentElement.scrollWidth")
    assert width <= PHONE["width"], width
    await snap(page, artifacts, "11-phone-queued")
    await context.close()
