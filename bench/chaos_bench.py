"""Chaos: a steady stream of requests while the Scheduler, the Pool, the Notifier and Redis
(AOF, appendfsync always) are SIGKILLed and restarted at random. Reports accepted vs
finished (must be equal: nothing lost), duplicate events delivered to watchers (must be 0)
and how long each outage lasted for clients (recovery time); bench/results/chaos.png shows
completions per second with each kill marked."""

from __future__ import annotations

import math
from collections import Counter
from typing import Any

from bench import plots
from bench.chaos import VICTIMS, Kill, run_chaos
from bench.stats import percentile


async def run(total: int = 1000, per_second: float = 40.0) -> dict[str, Any]:
    report = await run_chaos(total, per_second)
    recoveries = [kill.recovery for kill in report.kills]
    saved: list[str] = []
    _plot(report.accepted_at, report.finished_at, report.kills, saved)
    return {
        "requests_accepted": len(report.accepted),
        "requests_completed": report.completed,
        "all_accepted_completed": report.completed == len(report.accepted),
        "lost": report.lost,
        "outcomes": dict(report.outcomes),
        "requests_retried": report.retried,
        "finished_other_than_once": len(report.not_finished_once),
        "watched_requests": len(report.watched),
        "duplicate_events_delivered": report.duplicates,
        "duplicate_events_sent_by_notifier": report.notifier_duplicates,
        "kills": [
            {"victim": k.victim, "at_s": k.at, "recovery_s": k.recovery} for k in report.kills
        ],
        "recovery_by_victim_s": {
            victim: {"kills": len(rs), "p50": percentile(rs, 50), "max": max(rs)}
            for victim, rs in report.recoveries().items()
        },
        "recovery_p50_s": percentile(recoveries, 50) if recoveries else None,
        "recovery_max_s": max(recoveries) if recoveries else None,
        "run_seconds": report.seconds,
        "note": "recovery = from the kill until a client call goes through again; a model "
        "server stays down 2 s before it returns, the others restart at once; duplicates "
        "counted over the watched requests (every 20th), through the SDK and on plain "
        "Notifier streams resumed by hand; retried = ran more than once (a kill caught it); "
        "finished_other_than_once = terminal events in a request's log other than one",
        "plots": saved,
    }


def _plot(
    accepted_at: list[float], finished_at: list[float], kills: list[Kill], saved: list[str]
) -> None:
    """Requests accepted and completed per second, each kill marked by its victim."""
    end = math.ceil(max([*accepted_at, *finished_at, 1.0]))
    seconds = list(range(end + 1))

    def per_second(times: list[float]) -> list[int]:
        counts = Counter(int(t) for t in times if t >= 0)
        return [counts[s] for s in seconds]

    colors = dict(
        zip(VICTIMS, ("tab:red", "tab:purple", "tab:orange", "tab:brown", "tab:olive"), strict=True)
    )
    with plots.figure(
        "chaos",
        size=(15, 5),
        title="Chaos: completions per second while services are SIGKILLed and restarted",
        saved=saved,
    ) as (axis,):
        axis.bar(seconds, per_second(finished_at), 1.0, align="edge", alpha=0.6, label="completed")
        axis.step(
            seconds,
            per_second(accepted_at),
            where="post",
            color="black",
            linewidth=1,
            label="accepted",
        )
        # Head room above the bars for the victims' names.
        top = axis.get_ylim()[1] * 1.35
        axis.set_ylim(0, top)
        for kill in kills:
            color = colors.get(kill.victim, "tab:gray")
            axis.axvline(kill.at, color=color, linestyle="--", linewidth=1.2)
            axis.axvspan(kill.at, kill.at + kill.recovery, color=color, alpha=0.15)
            axis.text(
                kill.at,
                top * 0.98,
                f"{kill.victim} ",
                rotation=90,
                va="top",
                ha="right",
                fontsize=8,
                color=color,
            )
        axis.set_xlabel("seconds since the run began")
        axis.set_ylabel("requests per second")
        axis.set_xlim(0, end)
        axis.legend(loc="upper right", fontsize=8)
