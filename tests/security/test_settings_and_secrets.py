"""Production settings: `check --deploy` is clean, secrets come only from the
environment, and nothing starts without them."""

from __future__ import annotations

import ast
import os
import re
import secrets
import subprocess
import sys
from pathlib import Path

import pytest

from ..support import ROOT

pytestmark = pytest.mark.security

CONFIG = ROOT / "config"


def _manage(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "manage.py", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def production_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """What a deployment sets: the real settings, DEBUG off, a long random key,
    and no .env (ENV_FILE points at an empty file). Nothing of the suite's own
    tuning (DEBUG=1, EVENTING_*) leaks in."""
    empty = tmp_path / "empty.env"
    empty.write_text("")
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in {"DEBUG", "SECRET_KEY", "HTTPS", "EMAIL_BACKEND"}
        and not key.startswith(("EVENTING_", "SECURE_", "SESSION_", "CSRF_"))
    }
    env.update(
        {
            "DJANGO_SETTINGS_MODULE": "config.settings",
            "ENV_FILE": str(empty),
            "SECRET_KEY": secrets.token_urlsafe(64),
            **extra,
        }
    )
    return env


def test_check_deploy_is_clean_with_production_settings(tmp_path: Path) -> None:
    result = _manage("check", "--deploy", "--fail-level", "WARNING", env=production_env(tmp_path))

    assert result.returncode == 0, result.stdout + result.stderr
    assert "System check identified no issues" in result.stdout, result.stdout


def test_check_deploy_flags_the_insecure_local_switch(tmp_path: Path) -> None:
    """The check is not vacuous: the local plain-HTTP switch makes it fail."""
    result = _manage(
        "check", "--deploy", "--fail-level", "WARNING", env=production_env(tmp_path, HTTPS="0")
    )

    assert result.returncode != 0
    for warning in ("security.W004", "security.W008", "security.W012", "security.W016"):
        assert warning in result.stderr, result.stderr


def test_without_a_secret_key_nothing_starts(tmp_path: Path) -> None:
    env = production_env(tmp_path)
    del env["SECRET_KEY"]

    result = _manage("check", env=env)

    assert result.returncode != 0
    assert "SECRET_KEY must be set in the environment" in result.stderr


def test_the_development_key_exists_only_with_debug_on(tmp_path: Path) -> None:
    env = production_env(tmp_path, DEBUG="1")
    del env["SECRET_KEY"]
    code = "from django.conf import settings; print(settings.SECRET_KEY, settings.DEBUG)"

    result = subprocess.run(
        [sys.executable, "-c", f"import django; django.setup(); {code}"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )

    assert result.stdout.split() == ["insecure-development-only-key", "True"], result.stderr


# -- no hard-coded secrets -----------------------------------------------------------

SECRET_NAME = re.compile(r"(SECRET|PASSWORD|PASSWD|TOKEN|API_KEY|PRIVATE_KEY|BASIC_AUTH)", re.I)
URL_WITH_PASSWORD = re.compile(r"^[a-z][a-z0-9+.-]*://[^/@:\s]+:([^/@\s]+)@", re.I)
ALLOWED = {
    # The DEBUG-only fallback; settings refuse to start without a key otherwise.
    ("settings.py", "insecure-development-only-key"),
    # RabbitMQ's own default account, which it accepts only over loopback.
    ("settings.py", "amqp://guest:guest@127.0.0.1:5672//"),
}


def _text(node: ast.AST | None) -> str:
    """A non-empty string literal's value, else ""."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value.strip()
    return ""


def _string_literals_that_look_secret(path: Path) -> list[tuple[int, str]]:
    """String literals that are, or carry, a credential: assigned to a name (or
    keyword, or dict key) that says secret/password/token, an env() default for
    such a variable, or a URL with a password in it."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found: list[tuple[int, str]] = []
    pairs: list[tuple[str, ast.AST | None]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and URL_WITH_PASSWORD.search(_text(node)):
            found.append((node.lineno, f"URL with a password: {node.value!r}"))
        if isinstance(node, ast.Assign):
            pairs += [(t.id, node.value) for t in node.targets if isinstance(t, ast.Name)]
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            pairs.append((node.target.id, node.value))
        elif isinstance(node, ast.keyword) and node.arg:
            pairs.append((node.arg, node.value))
        elif isinstance(node, ast.Dict):
            pairs += [(_text(k), v) for k, v in zip(node.keys, node.values, strict=True)]
        elif isinstance(node, ast.Call) and node.args and _text(node.args[0]):
            # env.str("SECRET_KEY", default="..."): such a default must be empty.
            pairs += [(_text(node.args[0]), k.value) for k in node.keywords if k.arg == "default"]
    for name, value in pairs:
        if name and SECRET_NAME.search(name) and _text(value):
            found.append((getattr(value, "lineno", 0), f"{name} = {_text(value)!r}"))
    return [
        (lineno, text)
        for lineno, text in found
        if not any(path.name == name and allowed in text for name, allowed in ALLOWED)
    ]


def test_settings_hold_no_secret_but_the_debug_only_fallback() -> None:
    offenders = {
        f"{path.relative_to(ROOT)}:{lineno}: {text}"
        for path in sorted(CONFIG.glob("*.py"))
        if path.name != "test_settings.py"
        for lineno, text in _string_literals_that_look_secret(path)
    }

    assert not offenders, "\n".join(sorted(offenders))


def test_the_scan_catches_a_hard_coded_secret(tmp_path: Path) -> None:
    planted = tmp_path / "planted.py"
    planted.write_text(
        'SECRET_KEY = "abc123"\n'
        'DATABASES = {"default": {"PASSWORD": "hunter2"}}\n'
        'BROKER = "amqp://admin:s3cret@rabbit:5672//"\n'
        'TOKEN = env.str("METRICS_TOKEN", default="letmein")\n'
    )

    found = [text for _, text in _string_literals_that_look_secret(planted)]

    assert len(found) == 4, found


def test_the_process_layout_takes_secrets_from_the_environment() -> None:
    procfile = (ROOT / "Procfile").read_text()
    flower = next(line for line in procfile.splitlines() if line.startswith("flower:"))
    # Flower refuses to start without FLOWER_BASIC_AUTH (shell ${VAR:?message}).
    assert '--basic-auth="${FLOWER_BASIC_AUTH:?' in flower
    tracked = subprocess.run(
        ["git", "ls-files", ".env", "*.env"], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert tracked.stdout.strip() == "", "an env file with secrets is tracked by git"
