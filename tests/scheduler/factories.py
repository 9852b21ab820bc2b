"""Builders for scheduler tests."""

from __future__ import annotations

from services.scheduler.store import NewRequest
from usher.ids import new_request_id
from usher.v1 import request_pb2, scheduler_pb2


def generate_submit(
    model: str = "llama3.2", prompt: str = "hello", **options: float
) -> scheduler_pb2.SubmitRequest:
    submit = scheduler_pb2.SubmitRequest(
        model=model, generate=request_pb2.GenerateInput(prompt=prompt)
    )
    for name, value in options.items():
        setattr(submit.options, name, value)
    return submit


def new_request(
    model: str = "llama3.2",
    user: str = "alice",
    org: str = "acme",
    priority: int = request_pb2.PRIORITY_NORMAL,
    prompt_tokens: int = 100,
    num_predict: int | None = None,
    fallback: int = request_pb2.FALLBACK_POLICY_NONE,
    queue_timeout_ms: int | None = None,
    deadline_ms: int = 0,
    idempotency_key: str = "",
    fingerprint: str = "",
    result_only: bool = False,
) -> NewRequest:
    return NewRequest(
        id=new_request_id(model=model),
        model=model,
        kind=request_pb2.REQUEST_KIND_GENERATE,
        user=user,
        organization=org,
        priority=priority,
        fallback=fallback,
        payload=generate_submit(model).SerializeToString(),
        prompt_tokens=prompt_tokens,
        num_predict=num_predict,
        queue_timeout_ms=queue_timeout_ms,
        deadline_ms=deadline_ms,
        idempotency_key=idempotency_key,
        fingerprint=fingerprint,
        result_only=result_only,
    )
