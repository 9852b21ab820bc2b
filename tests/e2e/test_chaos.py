"""Chaos, small: requests through the SDK while the Scheduler, the Pool, the Notifier, a
model server and Redis (AOF, appendfsync always) are each SIGKILLed at least once and
brought back. Every accepted request completes exactly once and no watcher gets an event
twice. ``python -m bench chaos`` runs the same machinery with 1,000 requests."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.chaos import VICTIMS, chaos_config, run_chaos

pytestmark = pytest.mark.slow
REQUESTS = 160


# The run takes 40 to 60 s on 2 idle cores; the timeouts leave room for a busy machine.
@pytest.mark.timeout(600)
async def test_every_accepted_request_completes_exactly_once_under_chaos(
    tmp_path: Path,
) -> None:
    report = await run_chaos(
        REQUESTS,
        rate=8.0,
        # Slow answers (about 0.5 s) so that kills catch requests running and watches
        # streaming; attempts to spare, since several kills in a row can catch the same
        # request and the Scheduler fails a request after USHER_MAX_ATTEMPTS (3) attempts.
        config=chaos_config(str(tmp_path), tokens_per_second=50, max_attempts=50),
        watch_every=4,
        pause=(1.0, 2.0),
        kill_each_at_least=1,
        settle_timeout=240.0,
        watch_timeout=120.0,
    )
    logs = f"(services' logs in {report.state_dir})"
    # Shown when the test fails (or with -s): what the chaos did.
    print(
        f"{len(report.accepted)} accepted, {dict(report.outcomes)}, {report.retried} retried, "
        f"{sum(report.resumed.values())} stream resumes, kills {dict(report.killed())}, "
        f"{report.seconds:.1f} s"
    )
    killed = report.killed()
    assert all(killed[victim] >= 1 for victim in VICTIMS), f"killed only {dict(killed)}"
    assert len(report.accepted) == REQUESTS
    assert report.lost == 0, f"{report.lost} accepted requests never finished {logs}"
    assert report.completed == len(report.accepted), f"{dict(report.outcomes)} {logs}"
    # Completed exactly once: one terminal event in each request's log.
    assert report.not_finished_once == {}, logs
    assert len(report.watched) == REQUESTS // 4
    assert report.duplicates == 0, logs
    assert report.notifier_duplicates == 0, logs
    assert report.watches_not_completed == {}, logs
