"""PostgreSQL for store tests: the local server when one runs, else a throwaway cluster."""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from edgefleet.server.netutil import free_port

INSTALL_HINT = (
    "PostgreSQL is needed for the coordinator's store tests and neither a local server "
    "answered nor `initdb` was found. Install it with `sudo apt-get install -y postgresql` "
    "or run `bash deploy/test.sh`, which installs what is missing."
)

# Tried in order; the first that accepts a connection is used.
LOCAL_DSNS = (
    "host=/var/run/postgresql dbname=postgres",
    "host=127.0.0.1 port=5432 user=postgres dbname=postgres",
)


def _can_connect(dsn: str) -> bool:
    import psycopg

    try:
        with psycopg.connect(dsn, connect_timeout=3):
            return True
    except psycopg.Error:
        return False


def _find_pg_bin(name: str) -> str | None:
    """initdb and pg_ctl live in /usr/lib/postgresql/N/bin on Debian, off PATH."""
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), reverse=True)
    return candidates[0] if candidates else None


def _with_dbname(dsn: str, dbname: str) -> str:
    parts = [p for p in dsn.split() if not p.startswith("dbname=")]
    return " ".join([*parts, f"dbname={dbname}"])


@contextmanager
def _throwaway_cluster() -> Iterator[str]:
    """initdb + pg_ctl in a temp dir on a free port; yields an admin DSN."""
    initdb, pg_ctl = _find_pg_bin("initdb"), _find_pg_bin("pg_ctl")
    if not initdb or not pg_ctl:
        raise RuntimeError(INSTALL_HINT)
    root = Path(tempfile.mkdtemp(prefix="edgefleet-pg-"))
    data, sock = root / "data", root / "sock"
    sock.mkdir()
    port = free_port()
    # initdb refuses to run as root; run the cluster as the postgres (or nobody) user.
    run_as: list[str] = []
    if os.geteuid() == 0:
        user = "postgres"
        try:
            pwd.getpwnam(user)
        except KeyError:
            user = "nobody"
        shutil.chown(root, user=user)
        shutil.chown(sock, user=user)
        run_as = ["runuser", "-u", user, "--"]
    else:
        user = pwd.getpwuid(os.getuid()).pw_name
    subprocess.run(
        [*run_as, initdb, "-D", str(data), "-A", "trust", "-U", "postgres", "--no-sync"],
        check=True,
        capture_output=True,
    )
    subprocess.run(
        [
            *run_as,
            pg_ctl,
            "-D",
            str(data),
            "-l",
            str(root / "pg.log"),
            "-w",
            "-o",
            f"-p {port} -k {sock} -c listen_addresses='' -c fsync=off",
            "start",
        ],
        check=True,
        capture_output=True,
    )
    try:
        yield f"host={sock} port={port} user=postgres dbname=postgres"
    finally:
        subprocess.run(
            [*run_as, pg_ctl, "-D", str(data), "-m", "fast", "stop"], capture_output=True
        )
        shutil.rmtree(root, ignore_errors=True)


@contextmanager
def postgres_server() -> Iterator[str]:
    """Yield an admin DSN: EDGEFLEET_TEST_PG_DSN, a local server, or a throwaway cluster."""
    env = os.environ.get("EDGEFLEET_TEST_PG_DSN")
    if env:
        yield env
        return
    for dsn in LOCAL_DSNS:
        if _can_connect(dsn):
            yield dsn
            return
    with _throwaway_cluster() as dsn:
        yield dsn


@contextmanager
def scratch_database(admin_dsn: str) -> Iterator[str]:
    """Create a uniquely named database and drop it afterwards; yields its DSN."""
    import psycopg

    name = f"edgefleet_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield _with_dbname(admin_dsn, name)
    finally:
        with psycopg.connect(admin_dsn, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
