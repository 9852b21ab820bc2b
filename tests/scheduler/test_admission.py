"""Admission's pure helpers: the fleet's name for a model."""

from __future__ import annotations

from services.scheduler import admission
from usher.v1 import request_pb2, scheduler_pb2


def test_the_fleets_name_follows_ollamas_implied_latest_tag() -> None:
    known = {"llama3.2:1b", "nomic-embed-text:latest", "phi3"}
    assert admission.fleet_name("llama3.2:1b", known) == "llama3.2:1b"
    assert admission.fleet_name("nomic-embed-text", known) == "nomic-embed-text:latest"
    assert admission.fleet_name("phi3:latest", known) == "phi3"
    assert admission.fleet_name("llama3.2", known) is None  # no guessing between tags
    assert admission.fleet_name("llama3.2:3b", known) is None


def test_the_rules_declared_in_proto_name_each_field_by_its_path() -> None:
    submit = scheduler_pb2.SubmitRequest(
        chat=request_pb2.ChatInput(messages=[request_pb2.ChatMessage(role="bot", content="hi")]),
        labels={"k" * 70: "v", "ok": "x" * 300},
        options=request_pb2.GenerationOptions(top_p=2),
        priority=7,  # type: ignore[arg-type]
    )
    named = {v.field for v in admission.validate_submit(submit, admission.AdmissionLimits(), 0)}
    assert named == {
        "model",  # required
        "chat.messages[0].role",
        "labels[kkkkkkkkkkkkkkkkkkkk]",  # a key is cut short in the path
        "labels[ok]",
        "options.top_p",
        "priority",
    }
    nothing = scheduler_pb2.SubmitRequest(model="llama3.2")
    assert [v.field for v in admission.declared_violations(nothing)] == ["input"]


def test_rules_across_fields_stay_in_python_and_add_to_the_declared_ones() -> None:
    submit = scheduler_pb2.SubmitRequest(
        model="llama3.2",
        generate=request_pb2.GenerateInput(prompt="  ", format="yaml"),
        traceparent="t" * 300,
    )
    named = [v.field for v in admission.validate_submit(submit, admission.AdmissionLimits(), 0)]
    assert named == ["traceparent", "generate.prompt", "generate.format"]
