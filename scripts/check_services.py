"""Fail fast, with the command that fixes it, when PostgreSQL or RabbitMQ is down.

Runs before anything else in `make setup`, possibly before the virtualenv has its
dependencies, so it is stdlib-only. It resolves the URLs the way the settings do:
the real environment wins over `.env`, which wins over the settings' defaults.
"""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path
from urllib.parse import unquote, urlsplit

ROOT = Path(__file__).resolve().parent.parent
ENV_FILE = ROOT / ".env"

DEFAULTS = {
    "DATABASE_URL": "postgres://postgres@127.0.0.1:5432/eventflow",
    "CELERY_BROKER_URL": "amqp://guest:guest@127.0.0.1:5672//",
}
TIMEOUT_SECONDS = 2.0

POSTGRES_HINT = (
    "pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start"
    " (or: sudo systemctl start postgresql)"
)
RABBITMQ_HINT = "rabbitmq-server -detached (or: sudo systemctl start rabbitmq-server)"


def read_env_file(path: Path) -> dict[str, str]:
    """Parse the simple KEY=value lines of a dotenv file (enough for ours)."""
    values: dict[str, str] = {}
    if not path.is_file():
        return values
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        key, _, value = line.removeprefix("export ").partition("=")
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        values[key.strip()] = value
    return values


def setting(name: str, file_values: dict[str, str]) -> str:
    """Resolve one variable with the settings' precedence: env, then `.env`, then default."""
    return os.environ.get(name) or file_values.get(name) or DEFAULTS[name]


def postgres_address(url: str) -> tuple[str, int | str]:
    """Return (host, port) for TCP, or ("unix", socket path) for a socket directory."""
    parts = urlsplit(url)
    host = unquote(parts.hostname or "")
    port = parts.port or 5432
    if not host:
        host = "/var/run/postgresql"
    if host.startswith("/"):
        return "unix", f"{host}/.s.PGSQL.{port}"
    return host, port


def broker_address(url: str) -> tuple[str, int] | None:
    """Return (host, port) of the first AMQP broker in the URL; None for other transports."""
    first = url.split(";")[0].strip()
    parts = urlsplit(first)
    if parts.scheme not in {"amqp", "pyamqp", "amqps", "librabbitmq"}:
        return None
    default_port = 5671 if parts.scheme == "amqps" else 5672
    return parts.hostname or "127.0.0.1", parts.port or default_port


def reachable(host: str, port: int | str) -> bool:
    """True when a TCP (or unix socket) connection succeeds within the timeout."""
    try:
        if host == "unix":
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.settimeout(TIMEOUT_SECONDS)
                sock.connect(str(port))
        else:
            with socket.create_connection((host, int(port)), timeout=TIMEOUT_SECONDS):
                pass
    except OSError:
        return False
    return True


def describe(host: str, port: int | str) -> str:
    return str(port) if host == "unix" else f"{host}:{port}"


def main() -> int:
    file_values = read_env_file(ENV_FILE)
    failures: list[str] = []
    checked: list[str] = []

    pg_host, pg_port = postgres_address(setting("DATABASE_URL", file_values))
    if reachable(pg_host, pg_port):
        checked.append(f"PostgreSQL {describe(pg_host, pg_port)}")
    else:
        failures.append(
            f"PostgreSQL is not reachable at {describe(pg_host, pg_port)}"
            f" — start it with: {POSTGRES_HINT}"
        )

    broker = broker_address(setting("CELERY_BROKER_URL", file_values))
    if broker is None:
        checked.append("broker (not AMQP, not checked)")
    elif reachable(*broker):
        checked.append(f"RabbitMQ {describe(*broker)}")
    else:
        failures.append(
            f"RabbitMQ is not reachable at {describe(*broker)} — start it with: {RABBITMQ_HINT}"
        )

    for line in failures:
        print(line, file=sys.stderr)
    if failures:
        return 1
    print("Services OK: " + ", ".join(checked))
    return 0


if __name__ == "__main__":
    sys.exit(main())
