"""What the browser is shown: updates as JSON, the keepalive comment, when to offer the
external provider and with which of the product's prompts."""

from __future__ import annotations

from services.gateway import status
from usher import messages
from usher.v1 import notifier_pb2, pool_pb2, request_pb2

R = request_pb2
NOW = 1_700_000_000.0


def queued(position: int = 3, length: int = 7, waited: float = 10.0) -> R.LlmRequest:
    request = R.LlmRequest(
        id="r1", model="llama3.2:1b", state=R.REQUEST_STATE_QUEUED, route=R.ROUTE_LOCAL
    )
    request.position.position, request.position.queue_length = position, length
    request.eta.min.FromSeconds(120)
    request.eta.max.FromSeconds(180)
    request.created_at.FromMilliseconds(int((NOW - waited) * 1000))
    request.queue_timeout.FromSeconds(600)
    return request


def test_the_queued_comment_names_the_place_and_the_wait() -> None:
    assert messages.queued_comment(queued()) == "queued 3 of 7, about 2–3 minutes"
    assert messages.queued_comment(None) == "waiting"
    assert status.sse_comment("a\nb") == b": a b\n\n"


def test_sse_frames() -> None:
    assert status.sse_event({"a": 1}, "1-2") == b'id: 1-2\ndata: {"a":1}\n\n'
    assert status.sse_event({}, event="end") == b"event: end\ndata: {}\n\n"


EXTERNAL = status.Fleet(external=True, local_models=frozenset({"llama3.2:1b"}))
LOCAL = status.Fleet(external=False, local_models=frozenset({"llama3.2:1b"}))


def test_switch_is_offered_only_while_queued_locally_and_allowed() -> None:
    request = queued()
    assert status.switch_offered(request, EXTERNAL)
    assert not status.switch_offered(request, LOCAL)
    request.fallback_policy = R.FALLBACK_POLICY_LOCAL_ONLY
    assert not status.switch_offered(request, EXTERNAL)
    running = queued()
    running.state = R.REQUEST_STATE_RUNNING
    assert not status.switch_offered(running, EXTERNAL)


def test_the_fleet_as_the_offers_see_it() -> None:
    fleet = status.fleet_of(
        [
            pool_pb2.InstanceStatus(
                config=pool_pb2.InstanceConfig(id="a"),
                health=pool_pb2.INSTANCE_HEALTH_HEALTHY,
                available_models=["llama3.2:1b"],
            ),
            pool_pb2.InstanceStatus(
                config=pool_pb2.InstanceConfig(id="b"),
                health=pool_pb2.INSTANCE_HEALTH_UNHEALTHY,
                available_models=["qwq"],
            ),
            pool_pb2.InstanceStatus(
                config=pool_pb2.InstanceConfig(id="ext", external=True),
                health=pool_pb2.INSTANCE_HEALTH_HEALTHY,
                available_models=["gpt-4o"],
            ),
        ]
    )
    assert fleet == EXTERNAL
    assert not status.fleet_of([]).external


def test_fallback_prompts() -> None:
    assert status.fallback_prompt(queued(), EXTERNAL, NOW) == ""
    assert status.fallback_prompt(queued(length=8), EXTERNAL, NOW) == messages.LONG_QUEUE_PROMPT
    assert status.fallback_prompt(queued(length=8), LOCAL, NOW) == ""
    # Half the queue timeout gone.
    assert status.fallback_prompt(queued(waited=299), EXTERNAL, NOW) == ""
    assert status.fallback_prompt(queued(waited=300), EXTERNAL, NOW) == messages.TIMEOUT_PROMPT
    # On its way out: the notice only when no local instance could serve it (a user's own
    # switch is not "unavailable").
    external = queued()
    external.route = R.ROUTE_EXTERNAL
    assert status.fallback_prompt(external, EXTERNAL, NOW) == ""
    down = status.Fleet(external=True)
    assert status.fallback_prompt(external, down, NOW) == messages.UNAVAILABLE_NOTICE


def test_update_json() -> None:
    update = notifier_pb2.WatchResponse(
        event_id="5-0",
        kind=notifier_pb2.UPDATE_KIND_POSITION,
        request=queued(),
        message="You are #3 of 7 in the queue • Estimated wait: 2–3 minutes",
    )
    body = status.update_json(update, fleet=EXTERNAL, now=NOW)
    assert body["kind"] == "position" and body["event_id"] == "5-0"
    assert body["position"] == 3 and body["queue_length"] == 7
    assert body["eta"] == {"min_seconds": 120.0, "max_seconds": 180.0}
    assert body["switch_offered"] is True and body["prompt"] == ""
    assert "result" not in body and body["state"] == "queued"
    done = R.LlmRequest(id="r1", state=R.REQUEST_STATE_COMPLETED)
    done.result.text = "hello"
    final = status.request_json(done)
    assert final["result"]["text"] == "hello" and "position" not in final
    assert status.is_terminal(notifier_pb2.UPDATE_KIND_COMPLETED)
    assert not status.is_terminal(notifier_pb2.UPDATE_KIND_PROGRESS)
    backing_off = R.LlmRequest(id="r1", state=R.REQUEST_STATE_QUEUED, attempts=1)
    backing_off.retry_at.FromMilliseconds(1_700_000_004_500)
    waiting = status.request_json(backing_off)
    assert waiting["retry_at"] == 1_700_000_004.5 and "position" not in waiting
    assert "retry_at" not in status.request_json(queued())


def test_badges_json() -> None:
    response = notifier_pb2.WatchQueuesResponse(
        badges=[
            notifier_pb2.QueueBadge(
                model="qwq",
                queued=9,
                level=notifier_pb2.QUEUE_LEVEL_LONG,
                label="qwq (9 in queue)",
                suggestion="Consider gpt-4o for faster results",
                suggested_model="gpt-4o",
            )
        ]
    )
    (badge,) = status.badges_json(response)["badges"]
    assert badge["level"] == "long" and badge["suggested_model"] == "gpt-4o"
