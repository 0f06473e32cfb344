"""The Procfile really runs: web, worker, beat, the relay and Flower all start and answer.

Unit tests import the code; only this test proves the process layout a person
gets from `make run` works end to end: the commands, the environment they read,
the queue prefix, Flower's password, and that stopping honcho leaves nothing
behind. It runs against the real services and the dev database (migrated by
`make test`); the queue prefix and a unique worker name keep it from touching a
platform running on the same broker.
"""

from __future__ import annotations

import base64
import contextlib
import os
import re
import secrets
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
HONCHO = ROOT / ".venv" / "bin" / "honcho"
CELERY = ROOT / ".venv" / "bin" / "celery"

QUEUE_PREFIX = "procs-test."
FLOWER_USER, FLOWER_PASSWORD = "test", "secret"
STARTUP_SECONDS = 40.0
SHUTDOWN_SECONDS = 15.0  # honcho itself escalates to SIGKILL after 5 s
POLL_SECONDS = 0.5

# honcho prefixes each line with "HH:MM:SS name.1 | ".
BEAT_SENT = re.compile(r"^.*\bbeat\.1\s*\|.*Sending due task \S+ \(eventing\.relay\)", re.MULTILINE)
WORKER_RECEIVED = re.compile(
    r"^.*\bworker\.1\s*\|.*Task eventing\.relay\[[^\]]+\] received", re.MULTILINE
)
HONCHO_STARTED = re.compile(r"\bstarted \(pid=(\d+)\)")
RELAY_LISTENING = re.compile(
    r"^.*\brelay\.1\s*\|.*relay process: listening on \S+.*EVENTING_RELAY_WAKE=notify\)",
    re.MULTILINE,
)

pytestmark = [
    pytest.mark.processes,
    pytest.mark.timeout(120),
    pytest.mark.skipif(
        not HONCHO.exists(), reason=f"{HONCHO} is missing; run `make venv` to install honcho"
    ),
]

CheckResult = tuple[bool, str]


def free_ports(count: int) -> list[int]:
    """Ports the kernel just handed out; held together so they are distinct."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def http_status(url: str, auth: tuple[str, str] | None = None) -> int | None:
    """HTTP status of a GET, or None while nothing listens yet."""
    request = urllib.request.Request(url)  # noqa: S310 - always http://127.0.0.1
    if auth:
        token = base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    try:
        with urllib.request.urlopen(request, timeout=3) as response:  # noqa: S310
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except (urllib.error.URLError, OSError):
        return None


@dataclass(frozen=True)
class ProcInfo:
    pid: int
    ppid: int
    session: int
    state: str
    cmdline: str


def process_table() -> dict[int, ProcInfo]:
    """Every process on the machine, from /proc (Linux only, like the services)."""
    table: dict[int, ProcInfo] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue  # exited while we looked
        # Fields after the parenthesised command name: state ppid pgrp session ...
        fields = stat[stat.rindex(")") + 2 :].split()
        pid = int(entry.name)
        table[pid] = ProcInfo(pid, int(fields[1]), int(fields[3]), fields[0], cmdline.strip())
    return table


@dataclass
class Stack:
    """A honcho run of the Procfile, tracked by the sessions of everything it spawned.

    honcho starts each Procfile entry in a new session, so killing honcho's own
    process group would not reach them; session ids survive re-parenting, so they
    find every descendant (gunicorn and prefork children included) even after
    honcho has gone.
    """

    process: subprocess.Popen[bytes]
    log_path: Path
    env: dict[str, str]
    sessions: set[int] = field(default_factory=set)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def log_tail(self, lines: int = 80) -> str:
        return "\n".join(self.log().splitlines()[-lines:])

    def track(self) -> None:
        """Remember the session of every current descendant and every started entry."""
        self.sessions.add(self.process.pid)
        self.sessions.update(int(pid) for pid in HONCHO_STARTED.findall(self.log()))
        table = process_table()
        children: dict[int, list[int]] = {}
        for info in table.values():
            children.setdefault(info.ppid, []).append(info.pid)
        todo = [self.process.pid]
        while todo:
            pid = todo.pop()
            for child in children.get(pid, []):
                self.sessions.add(table[child].session)
                todo.append(child)

    def survivors(self) -> list[ProcInfo]:
        """Live (non-zombie) processes in any tracked session."""
        return [
            info
            for info in process_table().values()
            if info.session in self.sessions and info.state != "Z" and info.pid != os.getpid()
        ]

    def _signal_all(self, signum: signal.Signals) -> None:
        for info in self.survivors():
            with contextlib.suppress(ProcessLookupError):
                os.kill(info.pid, signum)

    def stop(self) -> list[ProcInfo]:
        """SIGTERM honcho (it stops its children), SIGKILL whatever outlives the deadline.

        Returns what was still alive after the graceful deadline, so the test can
        insist a plain stop leaves nothing behind.
        """
        self.track()
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
        deadline = time.monotonic() + SHUTDOWN_SECONDS
        while time.monotonic() < deadline and (self.process.poll() is None or self.survivors()):
            time.sleep(POLL_SECONDS)
        left_behind = self.survivors()
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
        self._signal_all(signal.SIGKILL)
        self.process.wait(timeout=SHUTDOWN_SECONDS)
        deadline = time.monotonic() + SHUTDOWN_SECONDS
        while self.survivors() and time.monotonic() < deadline:
            time.sleep(POLL_SECONDS)
        return left_behind


def suite_only(name: str) -> bool:
    """Variables the suite's settings export (DEBUG, fast retries...): not for the stack.

    The processes must run as `make run` runs them, with DEBUG off and the real
    eventing tuning, not with what config.test_settings put into os.environ.
    """
    return name in {"DEBUG", "EMAIL_BACKEND"} or name.startswith("EVENTING_")


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Stack]:
    web_port, flower_port = free_ports(2)
    overrides = {
        "WEB_PORT": str(web_port),
        "FLOWER_PORT": str(flower_port),
        "EVENTING_QUEUE_PREFIX": QUEUE_PREFIX,
        "FLOWER_BASIC_AUTH": f"{FLOWER_USER}:{FLOWER_PASSWORD}",
        "SECRET_KEY": f"procs-test-{secrets.token_urlsafe(32)}",
        "CELERY_WORKER_NAME": f"procs-test-{secrets.token_hex(4)}",
        # The real settings, whatever the test run itself uses.
        "DJANGO_SETTINGS_MODULE": "config.settings",
        "PYTHONUNBUFFERED": "1",
    }
    env = {key: value for key, value in os.environ.items() if not suite_only(key)}
    env.update(overrides)
    # honcho lets its env file override the real environment; pointing it at this
    # file instead of .env keeps .env's FLOWER_BASIC_AUTH & co. from replacing ours.
    # Django still reads .env for DATABASE_URL and the broker (real env wins there).
    env_file = tmp_path / "procs.env"
    env_file.write_text("".join(f"{key}={value}\n" for key, value in overrides.items()))
    log_path = tmp_path / "honcho.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [str(HONCHO), "start", "--no-colour", "--env", str(env_file)],
            cwd=ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    running = Stack(process=process, log_path=log_path, env=env)
    try:
        yield running
    finally:
        running.stop()  # no-op after the test's own stop; the safety net on failure


def check_web(stack: Stack) -> CheckResult:
    status = http_status(f"http://127.0.0.1:{stack.env['WEB_PORT']}/healthz")
    return status == 200, f"GET /healthz -> {status}"


def check_flower(stack: Stack) -> CheckResult:
    url = f"http://127.0.0.1:{stack.env['FLOWER_PORT']}/"
    anonymous = http_status(url)
    if anonymous is None:
        return False, "not listening"
    authorised = http_status(url, auth=(FLOWER_USER, FLOWER_PASSWORD))
    detail = f"GET / anonymous -> {anonymous}, with basic auth -> {authorised}"
    return anonymous == 401 and authorised == 200, detail


def check_worker(stack: Stack) -> CheckResult:
    """Ping through the broker with the stack's own environment, hence the same broker."""
    name = stack.env["CELERY_WORKER_NAME"]
    try:
        result = subprocess.run(
            [str(CELERY), "-A", "config", "inspect", "ping", "--timeout", "2"],
            cwd=ROOT,
            env=stack.env,
            capture_output=True,
            text=True,
            timeout=20,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return False, "celery inspect ping timed out"
    output = (result.stdout + result.stderr).strip()
    answered = re.search(rf"->\s+{re.escape(name)}@\S+:\s+OK", output) is not None
    return answered, f"inspect ping (want {name}@...): {output[-500:]}"


def check_beat(stack: Stack) -> CheckResult:
    log = stack.log()
    match = BEAT_SENT.search(log) or WORKER_RECEIVED.search(log)
    if match:
        return True, match.group(0)
    return False, "no 'Sending due task ... (eventing.relay)' from beat nor receipt by worker"


def check_relay(stack: Stack) -> CheckResult:
    """The relay process listens for wake-ups, in the Procfile's notify mode."""
    match = RELAY_LISTENING.search(stack.log())
    if match:
        return True, match.group(0)
    return False, "no 'relay process: listening ... (EVENTING_RELAY_WAKE=notify)' from relay"


CHECKS: dict[str, Callable[[Stack], CheckResult]] = {
    "web": check_web,
    "flower": check_flower,
    "worker": check_worker,
    "beat": check_beat,
    "relay": check_relay,
}


def test_procfile_starts_all_processes_and_stops_cleanly(stack: Stack) -> None:
    pending = dict(CHECKS)
    details: dict[str, str] = {}
    deadline = time.monotonic() + STARTUP_SECONDS
    while pending and time.monotonic() < deadline:
        stack.track()
        if stack.process.poll() is not None:
            pytest.fail(
                f"honcho exited early (rc={stack.process.returncode}); "
                f"still waiting for {sorted(pending)}; log {stack.log_path}:\n{stack.log_tail()}"
            )
        for name, check in list(pending.items()):
            ok, details[name] = check(stack)
            if ok:
                del pending[name]
        if pending:
            time.sleep(POLL_SECONDS)

    assert not pending, (
        f"no answer within {STARTUP_SECONDS:.0f}s from {sorted(pending)}: "
        + "; ".join(f"{name}: {details.get(name)}" for name in sorted(pending))
        + f"\nlog {stack.log_path}:\n{stack.log_tail()}"
    )

    left_behind = stack.stop()
    assert not left_behind, (
        f"processes outlived the {SHUTDOWN_SECONDS:.0f}s graceful stop (then SIGKILLed): "
        + ", ".join(f"{p.pid} {p.cmdline[:80]}" for p in left_behind)
    )
    assert not stack.survivors(), "processes survived SIGKILL"
