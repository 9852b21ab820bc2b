"""A faithful, cheap emulator of Ollama's HTTP API and scheduler for tests, demos
(``make up``) and benchmarks.

Quick start::

    from usher.emulator import EmulatorConfig, EmulatorFleet

    async with EmulatorFleet(3, config=EmulatorConfig(num_parallel=2)) as fleet:
        fleet.urls                     # three base URLs on free ports
        fleet[0].set_faults(fail_next=1)
        fleet[0].stats.loads           # model loads so far

CLI: ``python -m usher.emulator --port 0 --models llama3.2:1b,qwen2.5:0.5b``.

Layout: ``config`` (models, settings, faults), ``durations`` (Go duration and
time formats), ``textgen`` (deterministic text/embeddings), ``scheduler`` (slots,
queue, loads, eviction, keep-alive), ``stats``, ``engine`` (HTTP-free request
core), ``protocol`` (Ollama JSON in and out), ``native`` / ``openai_compat``
(aiohttp handlers), ``server`` (one instance + admin API), ``fleet`` (many
instances, subprocesses), ``cli``.
"""

from usher.emulator.config import (
    CATALOG,
    RUNNER_STOPPED_MESSAGE,
    EmulatorConfig,
    FaultConfig,
    ModelSpec,
    model_spec,
    parse_model_list,
)
from usher.emulator.durations import parse_go_duration, parse_keep_alive
from usher.emulator.fleet import EmulatorFleet, EmulatorProcess
from usher.emulator.scheduler import MAX_QUEUE_MESSAGE, Scheduler
from usher.emulator.server import CRASH_EXIT_CODE, EmulatorServer
from usher.emulator.stats import EmulatorStats, ModelStats

__all__ = [
    "CATALOG",
    "CRASH_EXIT_CODE",
    "MAX_QUEUE_MESSAGE",
    "RUNNER_STOPPED_MESSAGE",
    "EmulatorConfig",
    "EmulatorFleet",
    "EmulatorProcess",
    "EmulatorServer",
    "EmulatorStats",
    "FaultConfig",
    "ModelSpec",
    "ModelStats",
    "Scheduler",
    "model_spec",
    "parse_go_duration",
    "parse_keep_alive",
    "parse_model_list",
]
