"""Benchmark sizes: the full run, the quick smoke run, and CLI overrides."""

from __future__ import annotations

import argparse
import dataclasses


@dataclasses.dataclass
class Sizes:
    repeats: int = 3
    relay_events: int = 100_000  # a_relay: pre-filled outbox
    latency_rate: float = 200.0  # b_latency: orders/s
    latency_seconds: float = 60.0
    latency_low_rate: float = 10.0  # b_latency: one extra run at a rate it sustains
    latency_threads: int = 4  # b_latency: order-placing threads (one cannot offer 200/s)
    latency_repeats: int = 3
    latency_drain: float = 30.0  # b_latency: wait this long after the load for stragglers
    latency_baseline_tasks: int = 300
    # b_latency: runs with the relay task (EVENTING_RELAY_WAKE=celery) after those with
    # the relay process, at the main rate and (if any) the low rate. 0: none.
    latency_task_repeats: int = 3
    consumer_events: int = 50_000  # c_consumer: backlog on one queue
    consumer_repeats: int = 2  # a 50,000 backlog takes minutes per run
    replay_events: int = 1_000_000  # d_replay: stored events read raw
    replay_rebuild_events: int = 1_000_000  # d_replay: events the rebuild applies
    write_orders: int = 2_000  # e_write: orders per run
    scale_small: int = 10_000  # f_scale: store sizes
    scale_large: int = 5_000_000
    scale_outbox: int = 20_000  # f_scale: outbox rows, both sizes
    soak_seconds: float = 600.0  # g_memory
    soak_rate: float = 10.0
    soak_warmup: float = 60.0
    soak_window: float = 60.0
    soak_interval: float = 5.0


QUICK = Sizes(
    repeats=3,
    relay_events=10_000,
    latency_rate=200.0,
    latency_seconds=10.0,
    latency_low_rate=10.0,
    latency_threads=4,
    latency_baseline_tasks=100,
    latency_drain=5.0,
    latency_repeats=2,
    latency_task_repeats=2,
    consumer_events=2_000,
    consumer_repeats=3,
    replay_events=200_000,
    replay_rebuild_events=200_000,
    write_orders=500,
    scale_small=10_000,
    scale_large=200_000,
    scale_outbox=20_000,
    soak_seconds=60.0,
    soak_rate=10.0,
    soak_warmup=10.0,
    soak_window=15.0,
    soak_interval=1.0,
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    for field in dataclasses.fields(Sizes):
        parser.add_argument(
            f"--{field.name.replace('_', '-')}",
            type=type(field.default),
            default=None,
            metavar="N",
            help=f"default {field.default:,} (quick: {getattr(QUICK, field.name):,})",
        )


def from_args(args: argparse.Namespace) -> Sizes:
    sizes = dataclasses.replace(QUICK if args.quick else Sizes())
    for field in dataclasses.fields(Sizes):
        value = getattr(args, field.name)
        if value is not None:
            setattr(sizes, field.name, value)
    return sizes
