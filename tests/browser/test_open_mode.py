"""The page on a gateway in local open mode (``make up``): no token to paste, nothing sent
as one; the picker, the queue, the answer and cancel work; no operator panel (open callers
are never admins)."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from playwright.async_api import Browser, Page, expect

from tests.gateway.conftest import WAITING_MODELS, Ahead, Services, one_slot_stack
from usher.testing.stack import LocalStack
from usher.v1 import request_pb2

pytestmark = pytest.mark.slow
MODEL = WAITING_MODELS[0]


@pytest.fixture(scope="module")
def stack() -> Iterator[LocalStack]:
    yield from one_slot_stack(
        tokens_per_second="12", output_tokens="20:28", keepalive="1", open_access=True
    )


@pytest.fixture
async def page(browser: Browser, stack: LocalStack) -> AsyncIterator[Page]:
    context = await browser.new_context()
    opened = await context.new_page()
    sent_authorization: list[str] = []
    opened.on(
        "request",
        lambda r: sent_authorization.append(r.url) if "authorization" in r.headers else None,
    )
    await opened.goto(stack.gateway_url + "/ui")
    yield opened
    await context.close()
    assert not sent_authorization, sent_authorization  # an empty token is never sent


async def test_no_token_needed_in_open_mode(
    page: Page, artifacts: Path, services: Services
) -> None:
    ahead = Ahead(services, request_pb2.PRIORITY_HIGH)
    try:
        await expect(page.locator(f'li.badge[data-model="{MODEL}"]')).to_be_visible()
        await expect(page.locator("#token-state")).to_have_text("(none)")
        await expect(page.locator("#models-error")).to_be_hidden()
        await ahead.add(2)
        await page.get_by_label("Message").fill("Hello without a token")
        await page.get_by_label("Message").press("Enter")
        status = page.locator("#status")
        await expect(status).to_contain_text(re.compile(r"You are #\d+ of \d+ in the queue"))
        await page.screenshot(path=str(artifacts / "12-open-mode-queued.png"), full_page=True)
        await expect(status).to_contain_text("Your response is ready!", timeout=30_000)
        await expect(page.locator(".conversation .assistant .text")).not_to_be_empty()
        await expect(page.locator("#operator")).to_be_hidden()
        await page.screenshot(path=str(artifacts / "13-open-mode-answered.png"), full_page=True)
    finally:
        await ahead.release()
