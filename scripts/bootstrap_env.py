"""Write the secrets a local run needs into `.env`, once, without clobbering edits.

Settings refuse to start without SECRET_KEY (DEBUG is off by default) and Flower
must never run unauthenticated, so `make setup` generates both here. An existing
`.env` only gains the keys it lacks: values a person set are never rewritten.
Stdlib-only, because it runs before anything else is guaranteed to be installed.
"""

from __future__ import annotations

import argparse
import re
import secrets
import string
import sys
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ALPHANUMERIC = string.ascii_letters + string.digits
KEY_LINE = re.compile(r"^\s*(?:export\s+)?([A-Za-z_][A-Za-z0-9_]*)\s*=")


def random_token(length: int) -> str:
    """Letters and digits only, so the value is safe unquoted in `.env` and a shell."""
    return "".join(secrets.choice(ALPHANUMERIC) for _ in range(length))


# Generators rather than values, so nothing random is made for keys already set.
GENERATED: dict[str, Callable[[], str]] = {
    "SECRET_KEY": lambda: secrets.token_urlsafe(50),
    "FLOWER_BASIC_AUTH": lambda: f"admin:{random_token(16)}",
    "DEMO_PASSWORD": lambda: random_token(12),
    # Not a secret: the local stack serves plain HTTP on 127.0.0.1, so the
    # production defaults (HTTPS redirect, secure cookies, HSTS) are off here.
    "HTTPS": lambda: "0",
}


def existing_keys(text: str) -> set[str]:
    """Keys assigned in a dotenv text, commented-out lines excluded."""
    return {m.group(1) for line in text.splitlines() if (m := KEY_LINE.match(line))}


def ensure_env(path: Path) -> list[str]:
    """Create or complete the file; return the keys that were added."""
    text = path.read_text(encoding="utf-8") if path.exists() else ""
    missing = [key for key in GENERATED if key not in existing_keys(text)]
    if not missing:
        return []
    lines = [f"{key}={GENERATED[key]()}" for key in missing]
    if not text:
        header = "# Local secrets written by scripts/bootstrap_env.py; never commit this file.\n"
        path.write_text(header + "\n".join(lines) + "\n", encoding="utf-8")
        path.chmod(0o600)
    else:
        separator = "" if text.endswith("\n") else "\n"
        with path.open("a", encoding="utf-8") as handle:
            handle.write(separator + "\n".join(lines) + "\n")
    return missing


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--env-file", type=Path, default=ROOT / ".env", help="default: ./.env")
    args = parser.parse_args(argv)
    path: Path = args.env_file.resolve()
    existed = path.exists()
    added = ensure_env(path)
    if not existed:
        print(f"Wrote {path} with {', '.join(added)}")
    elif added:
        print(f"Added {', '.join(added)} to {path}")
    else:
        print(f"Using {path} (all keys present)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
