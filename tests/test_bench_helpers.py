"""The benchmarks' pure helpers (no services started): percentiles, JSON tidying, Jain's
index and the non-preemptive floor the fairness scenario prints, the streaming scenario's
token delays, word counts, ceiling and cores at a rate, the overhead scenario's summary."""

from __future__ import annotations

import json
import math
import statistics

from hypothesis import given
from hypothesis import strategies as st

from bench.fairness_bench import first_free_waits, jain
from bench.load import Load
from bench.overhead_bench import summarize
from bench.stats import goal, percentile, tidy
from bench.streaming_bench import ceiling, cores_at_rate, count_words, token_delays


def test_percentile_is_nearest_rank() -> None:
    samples = [5.0, 1.0, 3.0, 2.0, 4.0]
    assert percentile(samples, 0) == 1.0
    assert percentile(samples, 50) == 3.0
    assert percentile(samples, 100) == 5.0
    assert math.isnan(percentile([], 50))


def test_tidy_makes_nested_figures_json_ready() -> None:
    tidied = tidy({"a": 1.23456, "b": {"c": float("nan"), "d": (1, 2.00049)}, "e": [math.inf]})
    assert tidied == {"a": 1.235, "b": {"c": None, "d": [1, 2.0]}, "e": [None]}
    json.dumps(tidied, allow_nan=False)


def test_goal_says_whether_it_was_met() -> None:
    assert goal(0.9, 1.2, at_most=True)["met"] is True
    assert goal(900.0, 1000, at_most=False) == {
        "target": ">= 1000",
        "measured": 900.0,
        "met": False,
    }
    assert goal(None, 1.0, at_most=True)["met"] is None


def test_jain_index() -> None:
    assert jain([3.0, 3.0, 3.0]) == 1.0
    assert math.isclose(jain([1.0, 0.0, 0.0, 0.0]), 0.25)


def test_first_free_wait_of_exponential_service_is_mean_over_slots() -> None:
    # Memoryless service: each busy slot's remaining time is exponential with mean S, so the
    # first of k to finish takes S/k on average.
    waits = first_free_waits(4, lambda rng: rng.expovariate(1 / 0.05), arrivals=20_000)
    assert math.isclose(statistics.fmean(waits), 0.05 / 4, rel_tol=0.05)


def test_first_free_wait_of_one_fixed_service_is_half_of_it() -> None:
    waits = first_free_waits(1, lambda _: 0.04, arrivals=5_000)
    assert math.isclose(statistics.fmean(waits), 0.02, rel_tol=0.05)


@given(st.lists(st.text(alphabet=" ab\n", max_size=8), max_size=12))
def test_count_words_piecewise_matches_the_whole_text(pieces: list[str]) -> None:
    words, spaced = 0, True
    for piece in pieces:
        words, spaced = count_words(words, spaced, piece)
    assert words == len("".join(pieces).split())


def test_token_delays_take_the_least_delayed_token_as_instant() -> None:
    # 50 tokens/s: token i is made 20 ms after token i-1. Tokens 2 and 3 arrive together
    # at 1.05 s, token 3 (due 60 ms after token 0) least delayed of all: it sets the clock.
    arrivals = [(1.000, 1), (1.020, 2), (1.050, 4)]
    delays = token_delays(arrivals)
    assert [round(d, 3) for d in delays] == [0.01, 0.01, 0.02, 0.0]


def test_the_ceiling_is_the_most_streams_within_the_goal() -> None:
    assert ceiling({100: 40.0, 200: 90.0, 300: 150.0, 500: 400.0}) == 200
    # A noisy smaller burst over the goal does not hide a larger one within it.
    assert ceiling({100: 120.0, 200: 80.0}) == 200
    assert ceiling({100: 101.0}) == 0


def test_cores_at_a_rate_are_cpu_seconds_per_second_by_process() -> None:
    # 25,000 tokens/s: 0.088 ms a token is 2.2 cores, 0.039 ms is 0.975.
    cores = cores_at_rate({"serve": 0.088, "emulators": 0.039}, 25_000)
    assert math.isclose(cores["serve"], 2.2)
    assert math.isclose(cores["emulators"], 0.975)
    assert math.isclose(cores["total"], 3.175)


def _load(latency_ms: float, requests: int = 100, cpu_ms: float = 1.0) -> Load:
    return Load(1, 1.0, [latency_ms / 1000] * requests, 0, {"proxy": cpu_ms * requests / 1000})


def test_a_streamed_path_is_measured_against_the_model_servers_own_stream() -> None:
    paths = ("trio", "gateway", "serve", "serve_openai", "herd")
    loads = {
        c: {
            "direct": _load(1.0),
            "direct_stream": _load(1.5),
            **{path: _load(3.0) for path in paths},
            "serve_stream": _load(4.0, cpu_ms=2.0),
            "herd_stream": _load(4.5, requests=50),
        }
        for c in (1, 32)
    }
    summary = summarize(loads, {})
    assert summary["c1"]["serve_added_ms"]["p50"] == 2.0  # over direct
    assert summary["c1"]["serve_stream_added_ms"]["p50"] == 2.5  # over direct_stream
    assert "direct_stream_added_ms" not in summary["c1"]
    assert summary["streamed"] == {
        "serve_stream": {
            "added_p50_ms_c1": 2.5,
            "requests_per_second_c32": 100.0,
            "proxy_cpu_ms_per_request_c32": 2.0,
        },
        "herd_stream": {
            "added_p50_ms_c1": 3.0,
            "requests_per_second_c32": 50.0,
            "proxy_cpu_ms_per_request_c32": 1.0,
        },
    }
