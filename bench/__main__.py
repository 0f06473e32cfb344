"""`python -m bench [--quick] [--only a_relay,e_write] [--profile]`.

Sets the bench environment before Django loads, creates and migrates the bench
database, runs the selected benchmarks, prints a table and writes
bench/results/latest.json.
"""

from __future__ import annotations

import argparse
import atexit
import importlib
import json
import os
import platform
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from . import env

env.apply()  # before anything imports Django settings

import django  # noqa: E402

from .sizes import add_arguments, from_args  # noqa: E402

BENCHMARKS = ("a_relay", "b_latency", "c_consumer", "d_replay", "e_write", "f_scale", "g_memory")
# Run order: the small-store benchmarks first, the 5M-event store last.
RUN_ORDER = ("a_relay", "c_consumer", "e_write", "b_latency", "g_memory", "d_replay", "f_scale")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small sizes, a few minutes")
    parser.add_argument(
        "--only", default="", help=f"comma-separated subset of {', '.join(BENCHMARKS)}"
    )
    parser.add_argument(
        "--output", type=Path, default=env.RESULTS_DIR / "latest.json", help="JSON results path"
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="also profile: pyinstrument in-process, py-spy on workers (bench/results/profiles)",
    )
    add_arguments(parser)
    args = parser.parse_args(argv)
    selected = [name.strip() for name in args.only.split(",") if name.strip()]
    unknown = sorted(set(selected) - set(BENCHMARKS))
    if unknown:
        parser.error(f"unknown benchmark(s): {', '.join(unknown)}")
    args.selected = [name for name in RUN_ORDER if not selected or name in selected]
    return args


def ensure_database() -> None:
    import psycopg2
    from psycopg2 import sql

    url = env.database_url()
    name = env.database_name(url)
    conn = psycopg2.connect(env.maintenance_url(url), connect_timeout=5)
    conn.autocommit = True
    try:
        with conn.cursor() as cursor:
            cursor.execute("SELECT 1 FROM pg_database WHERE datname = %s", [name])
            if not cursor.fetchone():
                cursor.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    finally:
        conn.close()
    subprocess.run(
        [sys.executable, "manage.py", "migrate", "--noinput", "-v", "0"],
        cwd=env.ROOT,
        env={**os.environ, **env.bench_environ()},
        check=True,
    )


def machine_info() -> dict[str, Any]:
    from django.db import connection

    from .common import broker_connection

    cpu = ""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    with connection.cursor() as cursor:
        cursor.execute("SHOW server_version")
        pg_version = cursor.fetchone()[0]
    conn = broker_connection()
    try:
        props = conn.server_properties
        rabbit = props.get("version", "")
        rabbit = rabbit.decode() if isinstance(rabbit, bytes) else str(rabbit)
    finally:
        conn.close()

    def git(*args: str) -> str:
        try:
            return subprocess.run(
                ["git", *args], cwd=env.ROOT, capture_output=True, text=True, check=False
            ).stdout
        except OSError:
            return ""

    commit = git("rev-parse", "--short", "HEAD").strip()
    # Uncommitted changes outside bench/ mean the figures are of a tree no commit has.
    dirty = [
        line[3:]
        for line in git("status", "--porcelain", "--untracked-files=no").splitlines()
        if not line[3:].startswith(("bench/", "BENCHMARKS.md"))
    ]
    return {
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "python": platform.python_version(),
        "postgres": pg_version,
        "rabbitmq": rabbit,
        "loadavg_at_start": [round(x, 2) for x in os.getloadavg()],
        "git_commit": commit,
        "git_uncommitted_changes": dirty,
        "platform": platform.platform(),
    }


def fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "NO"
    if isinstance(value, float):
        return f"{value:,.{digits}f}" if abs(value) < 1000 else f"{value:,.0f}"
    return str(value)


def print_table(entries: list[dict[str, Any]]) -> None:
    headers = ("benchmark", "value", "baseline", "ratio", "target", "met", "status")
    rows = [
        (
            e["name"],
            f"{fmt(e['value'])} {e['unit']}" if e["value"] is not None else "-",
            f"{fmt(e['baseline'])} {e['baseline_unit']}" if e["baseline"] is not None else "-",
            fmt(e["ratio"], 3),
            e["target"],
            fmt(e["met"]),
            e["status"],
        )
        for e in entries
    ]
    widths = [max(len(str(r[i])) for r in [headers, *rows]) for i in range(len(headers))]
    line = "  ".join(f"{{:<{w}}}" for w in widths)
    print(line.format(*headers))
    print(line.format(*("-" * w for w in widths)))
    for row in rows:
        print(line.format(*row))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sizes = from_args(args)
    ensure_database()
    django.setup()

    from . import common

    if args.profile:
        common.PROFILE_DIR = env.RESULTS_DIR / "profiles"

    def on_signal(signum: int, frame: object) -> None:
        common.stop_all_workers()
        raise SystemExit(128 + signum)

    atexit.register(common.stop_all_workers)
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    for old_log in env.RESULTS_DIR.glob("*.log"):
        old_log.unlink()  # worker logs of the previous run
    started = time.time()
    machine = machine_info()
    common.log(f"bench database {env.database_name(env.database_url())}, prefix {env.QUEUE_PREFIX}")
    common.log(f"running {', '.join(args.selected)} ({'quick' if args.quick else 'full'})")
    entries: list[dict[str, Any]] = []
    failures = 0
    for name in args.selected:
        module = importlib.import_module(f"bench.{name}")
        t0 = time.monotonic()
        try:
            result = module.run(sizes)
            result.seconds = round(time.monotonic() - t0, 1)
            entry = result.as_dict()
        except Exception as exc:
            failures += 1
            common.log(f"{name} FAILED: {exc}")
            traceback.print_exc()
            entry = common.Result(
                name=name,
                value=None,
                baseline=None,
                unit="",
                baseline_unit="",
                target="",
                met=None,
                runs=[],
                baseline_runs=[],
                status=f"error: {type(exc).__name__}: {exc}",
                seconds=round(time.monotonic() - t0, 1),
            ).as_dict()
        finally:
            common.stop_all_workers()
        entry["machine"] = machine
        entries.append(entry)
        common.log(f"{name} done in {entry['seconds']}s: {entry['value']} {entry['unit']}")

    try:
        common.purge_queues()
    except Exception as exc:
        common.log(f"final purge failed: {exc}")
    report = {
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
        "duration_s": round(time.time() - started, 1),
        "variant": "quick" if args.quick else "full",
        "sizes": vars(sizes),
        "machine": machine,
        "benchmarks": entries,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2, default=str) + "\n")
    print()
    print_table(entries)
    print(f"\n{report['variant']} run, {report['duration_s']:.0f}s; results in {args.output}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
