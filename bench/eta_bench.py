"""ETA accuracy: the wait promised at Submit against the wait each request actually had,
over a realistic workload through all three services (emulated fleet at a real model's
pace: tokens/s, time to first token, varied answer lengths, bursty arrivals from several
tenants). Reports the median and p90 absolute percentage error, and a plot of predicted vs
actual under bench/results/ when matplotlib is installed."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

import grpc

from bench.stats import emit, percentile
from usher.testing.stack import LocalStack, StackConfig
from usher.v1 import request_pb2, scheduler_pb2, scheduler_pb2_grpc

MODEL = "llama3.2:1b"
USERS = ("alice", "bob", "carol")
RESULTS = Path(__file__).resolve().parent / "results"
#: Waits shorter than this are "starts now" to a person; percentage errors on them mislead.
MIN_WAIT_SECONDS = 1.0


def _auth(user: str) -> tuple[tuple[str, str]]:
    return (("authorization", f"Bearer {user}-token"),)


async def run(requests: int = 160) -> None:
    config = StackConfig(
        emulator_args=(
            "--fleet",
            "2",
            "--tokens-per-second",
            "60",
            "--ttft",
            "0.05",
            "--load-time",
            "0.3",
            "--parallel",
            "2",
            "--output-tokens",
            "20:120",
        ),
        scheduler_env={"USHER_QUEUE_MAX_SIZE": "10000"},
    )
    rng = random.Random(5)
    with LocalStack(config) as stack:
        async with grpc.aio.insecure_channel(stack.scheduler_address) as channel:
            stub = scheduler_pb2_grpc.SchedulerServiceStub(channel)
            sent: list[tuple[str, str, float]] = []  # (user, id, promised seconds)
            for i in range(requests):
                user = rng.choice(USERS)
                reply = await stub.Submit(
                    scheduler_pb2.SubmitRequest(
                        model=MODEL, generate=request_pb2.GenerateInput(prompt=f"question {i}")
                    ),
                    metadata=_auth(user),
                )
                eta = reply.request.eta
                promised = (eta.min.ToMilliseconds() + eta.max.ToMilliseconds()) / 2000
                sent.append((user, reply.request.id, promised))
                # Bursts: mostly quick arrivals, now and then a pause.
                await asyncio.sleep(rng.choice((0.0, 0.02, 0.05, 0.05, 0.4, 1.5)))
            pairs: list[tuple[float, float]] = []
            for user, request_id, promised in sent:
                while True:
                    got = (
                        await stub.Get(
                            scheduler_pb2.GetRequest(id=request_id), metadata=_auth(user)
                        )
                    ).request
                    if got.state >= request_pb2.REQUEST_STATE_COMPLETED:
                        break
                    await asyncio.sleep(0.2)
                actual = (got.started_at.ToMilliseconds() - got.created_at.ToMilliseconds()) / 1000
                pairs.append((promised, actual))
    errors = [abs(p - a) / a for p, a in pairs if a >= MIN_WAIT_SECONDS]
    absolute = [abs(p - a) for p, a in pairs]
    emit(
        "eta.accuracy",
        requests=len(pairs),
        judged=len(errors),
        median_ape_percent=percentile(errors, 50) * 100 if errors else None,
        p90_ape_percent=percentile(errors, 90) * 100 if errors else None,
        median_abs_error_s=percentile(absolute, 50),
        p90_abs_error_s=percentile(absolute, 90),
        goal_median_ape_percent=20,
        note=f"promised = middle of the range shown at Submit; waits under "
        f"{MIN_WAIT_SECONDS:.0f} s are left out of the percentage errors",
    )
    _plot(pairs)


def _plot(pairs: list[tuple[float, float]]) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    RESULTS.mkdir(parents=True, exist_ok=True)
    figure, axes = plt.subplots(figsize=(6, 6))
    axes.scatter([a for _, a in pairs], [p for p, _ in pairs], s=10)
    top = max(max(a, p) for p, a in pairs) * 1.05
    axes.plot([0, top], [0, top], linestyle="--", linewidth=1)
    axes.set_xlabel("actual wait (s)")
    axes.set_ylabel("promised wait at submit (s)")
    axes.set_title("ETA: promised vs actual queue wait")
    figure.savefig(RESULTS / "eta.png", dpi=100, bbox_inches="tight")
    plt.close(figure)
