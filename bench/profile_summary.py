"""Summarise py-spy raw (collapsed) stacks: where the time goes.

    python -m bench.profile_summary bench/results/profiles/c_consumer.*.collapsed

Prints inclusive and self time per function (file:function), as a share of
all samples, idle samples excluded unless --idle.
"""

from __future__ import annotations

import argparse
import collections
import re
from pathlib import Path

ROOT = Path(__file__).absolute().parent.parent
_LINE = re.compile(r"^(?P<stack>.*) (?P<count>\d+)$")
_FRAME = re.compile(r"^(?P<func>[^ ]+) \((?P<file>[^:]+)(?::\d+)?\)$")


def short(frame: str) -> str:
    match = _FRAME.match(frame.strip())
    if not match:
        return frame.strip()
    path = match["file"]
    for marker in ("site-packages/", "lib/python3.11/", f"{ROOT}/"):
        if marker in path:
            path = path.split(marker, 1)[1]
    return f"{path}:{match['func']}"


def summarise(paths: list[Path], top: int, focus: str | None) -> str:
    inclusive: collections.Counter[str] = collections.Counter()
    own: collections.Counter[str] = collections.Counter()
    total = 0
    for path in paths:
        for line in path.read_text(errors="replace").splitlines():
            match = _LINE.match(line)
            if not match:
                continue
            frames = [short(f) for f in match["stack"].split(";") if f.strip()]
            frames = [
                f for f in frames if not f.startswith("process ") and not f.startswith("thread ")
            ]
            if focus and not any(focus in f for f in frames):
                continue
            samples = int(match["count"])
            total += samples
            for frame in set(frames):
                inclusive[frame] += samples
            if frames:
                own[frames[-1]] += samples
    lines = [f"{total} samples from {len(paths)} file(s)" + (f", focus {focus!r}" if focus else "")]
    lines.append("\ninclusive (function and what it calls):")
    for frame, samples in inclusive.most_common(top):
        lines.append(f"  {100 * samples / max(total, 1):5.1f}%  {frame}")
    lines.append("\nself (time in the function itself):")
    for frame, samples in own.most_common(top):
        lines.append(f"  {100 * samples / max(total, 1):5.1f}%  {frame}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("paths", nargs="+", type=Path)
    parser.add_argument("--top", type=int, default=40)
    parser.add_argument("--focus", default=None, help="only stacks through this frame substring")
    args = parser.parse_args()
    print(summarise(args.paths, args.top, args.focus))


if __name__ == "__main__":
    main()
