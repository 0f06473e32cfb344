"""Create the application database if the server lacks it, so `migrate` can run.

`migrate` connects to the target database and cannot create it. This reads
DATABASE_URL exactly as the settings do (django-environ: real environment over
`.env` over the default) and issues CREATE DATABASE from a maintenance database.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import environ
import psycopg2
from psycopg2 import errors, sql

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DATABASE_URL = "postgres://postgres@127.0.0.1:5432/eventflow"
MAINTENANCE_DATABASES = ("postgres", "template1")


def connect(db: dict[str, Any], name: str) -> psycopg2.extensions.connection:
    """Connect to database `name` on the server and with the credentials of `db`."""
    params: dict[str, Any] = {
        "dbname": name,
        "user": db.get("USER") or None,
        "password": db.get("PASSWORD") or None,
        "host": db.get("HOST") or None,
        "port": db.get("PORT") or None,
        "connect_timeout": 5,
        **db.get("OPTIONS", {}),
    }
    conn = psycopg2.connect(**{k: v for k, v in params.items() if v is not None})
    conn.autocommit = True  # CREATE DATABASE cannot run inside a transaction
    return conn


def main() -> int:
    env = environ.Env()
    environ.Env.read_env(ROOT / ".env", overwrite=False)
    db = env.db_url("DATABASE_URL", default=DEFAULT_DATABASE_URL)
    name = db["NAME"]
    where = f"{db.get('HOST') or 'local socket'}:{db.get('PORT') or 5432}"
    if "postgresql" not in db["ENGINE"]:
        print(f"DATABASE_URL is not PostgreSQL ({db['ENGINE']}); nothing to create")
        return 0

    last_error: Exception | None = None
    for maintenance in MAINTENANCE_DATABASES:
        try:
            conn = connect(db, maintenance)
        except psycopg2.OperationalError as exc:
            last_error = exc
            continue
        try:
            with conn.cursor() as cur:
                cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", [name])
                if cur.fetchone():
                    print(f"Database {name!r} exists on {where}")
                    return 0
                try:
                    cur.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
                except errors.DuplicateDatabase:
                    print(f"Database {name!r} exists on {where} (created concurrently)")
                    return 0
                print(f"Created database {name!r} on {where}")
                return 0
        except psycopg2.Error as exc:
            print(f"Could not create database {name!r} on {where}: {exc}".strip(), file=sys.stderr)
            return 1
        finally:
            conn.close()

    # No maintenance database was reachable; the target itself may still be (managed hosts).
    try:
        connect(db, name).close()
    except psycopg2.OperationalError:
        message = str(last_error).strip().replace("\n", " ")
        print(f"Cannot reach PostgreSQL at {where}: {message}", file=sys.stderr)
        return 1
    print(f"Database {name!r} exists on {where}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
