"""b_latency: commit -> read model updated by a consumer, at a steady rate.

Measured: orders placed through `orders.services.order_place()` at a steady
rate (200/s) for a duration, by `latency_threads` threads (4) on one schedule,
with the real worker (orders, inventory, notifications and relay queues;
prefork -c 2) and the relay woken on commit, as `make run` deploys it: a relay
process (`relay_outbox --loop`) woken by NOTIFY. `extra.relay_task` repeats the
runs with the settings' default instead, a relay task in the worker.
Latency of one order = the moment its OrderSummary row (the orders consumer's
projection of OrderPlaced) is visible - the moment its COMMIT returned. A
watcher thread is notified as the consumer's transaction commits (a trigger's
NOTIFY, installed for the run; until 26 November it polled every 5 ms).
Orders still unseen `drain` seconds after the load stops count as infinitely
late (they push p99 to null).
Baseline: a raw Celery round trip, send -> task starts (`bench.stamp`, sent
with send_task to the same orders queue of the same idle worker), p50.
"""

from __future__ import annotations

import math
import time

from django.db import connection

from config.celery import app
from eventing.relay import WAKE_BY_CELERY, WAKE_BY_NOTIFY

from . import setup_data
from .common import (
    BenchWorker,
    PySpy,
    Result,
    count,
    log,
    median,
    percentile,
    purge_queues,
    queue_name,
    ratio,
    relay_woken,
    reset_database,
    retried,
    rounded,
    scalar,
    wait_until,
)
from .env import APP_QUEUES
from .load import SummaryWatcher, place_steadily
from .sizes import Sizes

P50_MS, P99_MS, RATIO_MAX = 25.0, 150.0, 4.0


def round_trips(n: int, spacing: float = 0.02) -> list[float]:
    """Send `n` stamp tasks, one every `spacing` s; send -> start latencies (ms)."""
    for seq in range(n):
        app.send_task("bench.stamp", args=(seq, time.time()), queue=queue_name("orders"))
        time.sleep(spacing)
    wait_until(lambda: count("bench_stamp") >= n, timeout=60, what="stamp tasks")
    values = scalar("SELECT array_agg(latency ORDER BY seq) FROM bench_stamp") or []
    truncate_stamps()
    return [v * 1000 for v in values]


def truncate_stamps() -> None:
    with connection.cursor() as cursor:
        cursor.execute("TRUNCATE bench_stamp")


def one_run(
    rate: float,
    seconds: float,
    drain: float,
    seed: int,
    baseline_tasks: int,
    threads: int,
    wake: str = WAKE_BY_CELERY,
) -> dict:
    reset_database()
    purge_queues()
    customer = setup_data.seed()
    worker_env = {"EVENTING_RELAY_WAKE": wake}
    with (
        BenchWorker(APP_QUEUES, log_name="b_latency", extra_env=worker_env) as worker,
        relay_woken(wake, log_name="b_latency_relay"),
    ):
        baseline = round_trips(20)  # warm-up, discarded
        baseline = round_trips(baseline_tasks)
        watcher = SummaryWatcher()
        spy = PySpy(f"b_latency_{int(rate)}", worker.pids()[1:], seconds=seconds)
        try:
            watcher.start()
            placed, took = place_steadily(
                customer, rate, seconds, watcher, seed=seed, threads=threads
            )
            spy.stop()
            try:
                wait_until(lambda: watcher.outstanding() == 0, timeout=drain, interval=0.1)
            except TimeoutError:
                pass
        finally:
            watcher.stop()
            spy.stop()
        drained_at = time.time()
        unseen = dict(watcher.pending)
    missing = len(unseen)
    latencies = [v * 1000 for v in watcher.latencies.values()]
    # Unseen orders are censored at the end of the drain: their latency is at
    # least that. A percentile that lands on one is a lower bound.
    censored = sorted((drained_at - at) * 1000 for at in unseen.values())
    everything = sorted([(v, False) for v in latencies] + [(v, True) for v in censored])

    def pct(p: float) -> tuple[float | None, bool]:
        if not everything:
            return None, False
        rank = min(max(1, math.ceil(p * len(everything) / 100)), len(everything))
        # Exact only if no censored sample ranks at or below it: an unseen
        # order's true latency could lie anywhere above its lower bound.
        return everything[rank - 1][0], any(c for _, c in everything[:rank])

    (p50, c50), (p95, c95), (p99, c99) = pct(50), pct(95), pct(99)
    return {
        "rate": rate,
        "wake": wake,
        "placed": placed,
        "achieved_rate": round(placed / took, 1),
        "p50_ms": rounded(p50, 2),
        "p95_ms": rounded(p95, 2),
        "p99_ms": rounded(p99, 2),
        # True: that percentile is an unseen order, so the figure is a lower bound.
        "censored": {"p50": c50, "p95": c95, "p99": c99},
        "max_seen_ms": rounded(max(latencies), 1) if latencies else None,
        "unseen_after_drain": missing,
        "watcher_wakeups": watcher.polls,
        "baseline_p50_ms": rounded(percentile(baseline, 50), 3),
        "baseline_p99_ms": rounded(percentile(baseline, 99), 3),
    }


def run(sizes: Sizes) -> Result:
    drain = sizes.latency_drain
    # As `make run` deploys it: the relay process, woken by NOTIFY.
    low, runs = mode_runs(sizes, drain, WAKE_BY_NOTIFY, sizes.latency_repeats)
    by_task = None
    if sizes.latency_task_repeats > 0:
        task_low, task_runs = mode_runs(sizes, drain, WAKE_BY_CELERY, sizes.latency_task_repeats)
        by_task = summary(
            task_runs,
            task_low,
            "the relay as a Celery task woken on commit "
            "(EVENTING_RELAY_WAKE=celery, the settings' default)",
        )
    purge_queues()

    p50, p95, p99 = (median([r[k] for r in runs]) for k in ("p50_ms", "p95_ms", "p99_ms"))
    censored = {
        k: sum(r["censored"][k] for r in runs) > len(runs) // 2 for k in ("p50", "p95", "p99")
    }
    baseline = median([r["baseline_p50_ms"] for r in runs])
    r = ratio(p50, baseline)
    met = (
        not censored["p50"]
        and not censored["p99"]
        and p50 is not None
        and p99 is not None
        and r is not None
        and p50 <= P50_MS
        and p99 <= P99_MS
        and r <= RATIO_MAX
    )
    return Result(
        name="b_latency",
        value=rounded(p50, 2),
        baseline=rounded(baseline, 3),
        ratio=rounded(r),
        unit="ms p50",
        baseline_unit="ms p50",
        target=f"p50 <= {P50_MS:g} ms, p99 <= {P99_MS:g} ms, ratio <= {RATIO_MAX:g}",
        met=met,
        status="measured (lower bound: orders unseen after the drain)"
        if censored["p50"]
        else "measured",
        runs=runs,
        baseline_runs=[r["baseline_p50_ms"] for r in runs],
        what="order_place() COMMIT -> OrderSummary visible (orders consumer applied OrderPlaced)",
        baseline_what="Celery send_task -> task body starts, idle worker, same queue",
        sizes={
            "rate_per_s": sizes.latency_rate,
            "seconds": sizes.latency_seconds,
            "drain_s": drain,
            "watcher": "LISTEN/NOTIFY at the consumer's commit",
            "placing_threads": sizes.latency_threads,
            "relay": "a relay process woken by NOTIFY (EVENTING_RELAY_WAKE=notify)",
        },
        extra={
            "p95_ms": rounded(p95, 2),
            "p99_ms": rounded(p99, 2),
            "censored": censored,
            "low_rate_run": low,
            "relay_task": by_task,
        },
    )


def mode_runs(
    sizes: Sizes, drain: float, wake: str, repeats: int
) -> tuple[dict | None, list[dict]]:
    """The low-rate run (if any) and `repeats` runs at the main rate, with the
    relay woken the `wake` way."""
    how = "relay process" if wake == WAKE_BY_NOTIFY else "relay task"
    low = None
    if sizes.latency_low_rate > 0:
        # First, while nothing of a saturated run (backlogs, purges) lingers.
        low = retried(
            lambda: one_run(
                sizes.latency_low_rate,
                sizes.latency_seconds,
                drain,
                seed=99,
                baseline_tasks=sizes.latency_baseline_tasks,
                threads=sizes.latency_threads,
                wake=wake,
            ),
            f"b_latency low-rate run, {how}",
        )
        log(f"b_latency: {how}, at {sizes.latency_low_rate:g}/s: {describe(low)}")
    runs = []
    for rep in range(repeats):
        result = retried(
            lambda rep=rep: one_run(
                sizes.latency_rate,
                sizes.latency_seconds,
                drain,
                seed=rep + 1,
                baseline_tasks=sizes.latency_baseline_tasks,
                threads=sizes.latency_threads,
                wake=wake,
            ),
            f"b_latency run, {how}",
        )
        runs.append(result)
        log(f"b_latency: {how}, run {rep + 1}: {describe(result)}")
    return low, runs


def summary(runs: list[dict], low: dict | None, what: str) -> dict:
    p50 = median([r["p50_ms"] for r in runs])
    baseline = median([r["baseline_p50_ms"] for r in runs])
    return {
        "what": what,
        "p50_ms": rounded(p50, 2),
        "p95_ms": rounded(median([r["p95_ms"] for r in runs]), 2),
        "p99_ms": rounded(median([r["p99_ms"] for r in runs]), 2),
        "baseline_p50_ms": rounded(baseline, 3),
        "ratio": rounded(ratio(p50, baseline)),
        "low_rate_ratio": rounded(ratio(low["p50_ms"], low["baseline_p50_ms"])) if low else None,
        "runs": runs,
        "low_rate_run": low,
    }


def describe(result: dict) -> str:
    marks = {k: ">=" if v else "" for k, v in result["censored"].items()}
    return (
        f"achieved {result['achieved_rate']}/s, p50 {marks['p50']}{result['p50_ms']} ms, "
        f"p95 {marks['p95']}{result['p95_ms']}, p99 {marks['p99']}{result['p99_ms']}, "
        f"unseen {result['unseen_after_drain']}/{result['placed']}; "
        f"raw round trip p50 {result['baseline_p50_ms']} ms"
    )
