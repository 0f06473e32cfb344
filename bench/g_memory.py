"""g_memory: RSS of the worker and the relay process across a soak at a steady rate.

Measured: a worker on all four queues (prefork -c 2) and the relay process
woken by NOTIFY, as `make run` deploys them, while orders are placed at a
steady rate the platform sustains on this machine (10/s by default) for the
soak duration. The RSS (VmRSS from /proc) of the worker's main process, its
pool children and the relay process is sampled at a
fixed interval. Value: mean total RSS over the last window; baseline: mean
total RSS over the first window after the warm-up. Flat is a ratio of ~1.0;
"met" allows 5% for noise.
"""

from __future__ import annotations

import statistics
import threading
import time

from . import setup_data
from .common import (
    RELAY_PROCESS_ENV,
    BenchRelayProcess,
    BenchWorker,
    Result,
    log,
    purge_queues,
    relay_woken,
    reset_database,
    rounded,
    rss_bytes,
)
from .env import APP_QUEUES
from .load import place_steadily
from .sizes import Sizes

TARGET = 1.05
MB = 1024 * 1024


class RssSampler(threading.Thread):
    def __init__(self, processes: list[BenchWorker | BenchRelayProcess], interval: float) -> None:
        super().__init__(name="rss-sampler", daemon=True)
        self.processes = processes
        self.interval = interval
        self.samples: list[dict] = []
        self.stopping = threading.Event()
        self.started_at = time.monotonic()

    def run(self) -> None:
        while not self.stopping.is_set():
            per_pid = {pid: rss_bytes(pid) for p in self.processes for pid in p.pids()}
            self.samples.append(
                {
                    "t": round(time.monotonic() - self.started_at, 2),
                    "total_mb": round(sum(per_pid.values()) / MB, 2),
                    "per_pid_mb": {str(pid): round(rss / MB, 2) for pid, rss in per_pid.items()},
                }
            )
            self.stopping.wait(self.interval)

    def stop(self) -> None:
        self.stopping.set()
        self.join(timeout=10)


def window_mean(samples: list[dict], start: float, end: float) -> float | None:
    values = [s["total_mb"] for s in samples if start <= s["t"] < end]
    return statistics.mean(values) if values else None


def run(sizes: Sizes) -> Result:
    reset_database()
    purge_queues()
    customer = setup_data.seed()
    with (
        BenchWorker(APP_QUEUES, log_name="g_memory", extra_env=RELAY_PROCESS_ENV) as worker,
        relay_woken("notify", log_name="g_memory_relay") as relay_process,
    ):
        assert relay_process is not None
        sampler = RssSampler([worker, relay_process], sizes.soak_interval)
        sampler.start()
        try:
            log(f"g_memory: soak at {sizes.soak_rate:g} orders/s for {sizes.soak_seconds:g}s")
            placed, took = place_steadily(customer, sizes.soak_rate, sizes.soak_seconds)
        finally:
            sampler.stop()
    purge_queues()
    samples = sampler.samples
    end = samples[-1]["t"] if samples else 0.0
    first = window_mean(samples, sizes.soak_warmup, sizes.soak_warmup + sizes.soak_window)
    last = window_mean(samples, end - sizes.soak_window, end + 1)
    peak = max((s["total_mb"] for s in samples), default=None)
    peak_per_process = max((mb for s in samples for mb in s["per_pid_mb"].values()), default=None)
    r = None if first is None or last is None else last / first
    log(f"g_memory: first window {first} MB, last window {last} MB, peak {peak} MB")
    return Result(
        name="g_memory",
        value=rounded(last, 2),
        baseline=rounded(first, 2),
        ratio=rounded(r),
        unit="MB RSS (last window)",
        baseline_unit="MB RSS (first window after warm-up)",
        target=f"flat: ratio <= {TARGET}",
        met=None if r is None else r <= TARGET,
        runs=samples,
        baseline_runs=[],
        what="RSS of the worker main process + pool children + the relay process",
        baseline_what="the same, first window after the warm-up",
        sizes={
            "rate_per_s": sizes.soak_rate,
            "seconds": sizes.soak_seconds,
            "warmup_s": sizes.soak_warmup,
            "window_s": sizes.soak_window,
            "interval_s": sizes.soak_interval,
        },
        extra={
            "peak_total_mb": peak,
            "peak_process_mb": peak_per_process,
            "orders_placed": placed,
            "achieved_rate": round(placed / took, 1) if took else None,
        },
    )
