"""Benchmarks of the event platform against the raw limits of this machine.

`python -m bench` (or `make bench`) runs them all on a dedicated database
(`bench_eventflow`) and the queue prefix `bench.`, so it never touches the dev
database or another stack's queues. See BENCHMARKS.md.
"""
