"""A real PostgreSQL for the tests: one cluster per session, a fresh database per test.

``postgres_server`` (session) runs Debian's PostgreSQL (``/usr/lib/postgresql/<v>/bin``) from
``initdb`` in a temporary folder, on a free loopback port with trust authentication, as the
unprivileged ``postgres`` user when the tests run as root (PostgreSQL refuses root).
``postgres_url`` (function) creates a new database from ``template0`` and gives its
``postgresql://`` URL; ``database_url`` (function, parametrized ``sqlite``/``postgresql``) is
None (SQLite, the default) or such a URL, to run one test against both backends.

Without PostgreSQL the PostgreSQL cases skip with the reason, and fail under
``DICOM_NODE_REQUIRE_PEERS=1`` (``make test``), as the other peers do.
"""

from __future__ import annotations

import glob
import itertools
import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import REQUIRE_PEERS, free_port

#: The cluster's superuser (and the OS user that runs it when the tests run as root).
SUPERUSER = "postgres"


def postgres_bin() -> Path | None:
    """Folder of Debian's newest PostgreSQL server programs, or None."""
    found = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"),
        key=lambda p: int(Path(p).parts[-3]) if Path(p).parts[-3].isdigit() else 0,
    )
    if found:
        return Path(found[-1]).parent
    on_path = shutil.which("pg_ctl")
    return Path(on_path).parent if on_path else None


def require_postgres() -> Path:
    folder = postgres_bin()
    if folder is None or not (folder / "initdb").exists():
        message = "PostgreSQL is not installed (Debian package postgresql)"
        if REQUIRE_PEERS:
            pytest.fail(message + "; `make test` installs it")
        pytest.skip(message)
    return folder


class PostgresServer:
    """One PostgreSQL cluster in a temporary folder, listening on 127.0.0.1:``port``."""

    def __init__(self, bin_dir: Path) -> None:
        self.bin_dir = bin_dir
        self.folder = Path(tempfile.mkdtemp(prefix="dicom-node-pg-"))
        self.data_dir = self.folder / "data"
        self.socket_dir = self.folder / "run"
        self.log_file = self.folder / "server.log"
        self.port = free_port()
        self._names = itertools.count(1)
        self._as_user: list[str] = []
        if os.geteuid() == 0:
            try:
                user = pwd.getpwnam(SUPERUSER)
            except KeyError:
                raise RuntimeError(
                    f"no user {SUPERUSER!r} to run PostgreSQL as (it refuses root); "
                    "Debian's postgresql package creates it"
                ) from None
            self._as_user = [
                "setpriv",
                f"--reuid={user.pw_uid}",
                f"--regid={user.pw_gid}",
                "--init-groups",
                "--reset-env",
            ]
        self.socket_dir.mkdir()
        if self._as_user:
            for path in (self.folder, self.socket_dir):
                shutil.chown(path, SUPERUSER, SUPERUSER)

    def _run(self, *args: str) -> None:
        cmd = [*self._as_user, *args]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            log = self.log_file.read_text() if self.log_file.exists() else ""
            raise RuntimeError(
                f"{' '.join(args[:2])} failed ({done.returncode}): {done.stderr}{done.stdout}{log}"
            )

    def start(self) -> PostgresServer:
        self._run(
            str(self.bin_dir / "initdb"),
            "-D",
            str(self.data_dir),
            "-U",
            SUPERUSER,
            "--auth=trust",
            "--encoding=UTF8",
            "--locale=C",
            "--no-sync",
        )
        return self.resume()

    def resume(self) -> PostgresServer:
        """Start the server on its data folder and port (again, after :meth:`halt`)."""
        options = " ".join(
            (
                "-c listen_addresses=127.0.0.1",
                f"-p {self.port}",
                f"-k {self.socket_dir}",
                "-c fsync=off",
                "-c synchronous_commit=off",
                "-c full_page_writes=off",
                "-c max_connections=300",
                "-c shared_buffers=32MB",
            )
        )
        self._run(
            str(self.bin_dir / "pg_ctl"),
            "start",
            "-D",
            str(self.data_dir),
            "-l",
            str(self.log_file),
            "-o",
            options,
            "-w",
            "-t",
            "60",
        )
        return self

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://{SUPERUSER}@127.0.0.1:{self.port}/{database}"

    def create_database(self) -> str:
        """A new empty database (from ``template0``); its URL."""
        import psycopg

        name = f"test_{os.getpid()}_{next(self._names)}"
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}" TEMPLATE template0')
        return self.url(name)

    def halt(self, mode: str = "immediate") -> None:
        """Stop the server, keeping its data (:meth:`resume`): ``immediate`` at once, like a
        crash (with this cluster's ``synchronous_commit=off`` the last commits may be lost);
        ``fast`` cuts every session but first writes what was committed."""
        if self.data_dir.exists():
            subprocess.run(
                [
                    *self._as_user,
                    str(self.bin_dir / "pg_ctl"),
                    "stop",
                    "-D",
                    str(self.data_dir),
                    "-m",
                    mode,
                    "-w",
                ],
                capture_output=True,
                timeout=60,
            )

    def stop(self) -> None:
        self.halt()
        shutil.rmtree(self.folder, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """A PostgreSQL cluster for the whole session (stopped and removed at the end)."""
    server = PostgresServer(require_postgres())
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.fixture
def postgres_url(postgres_server: PostgresServer) -> str:
    """The ``postgresql://`` URL of a new, empty database for this test."""
    return postgres_server.create_database()


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest) -> str | None:
    """None (SQLite in the storage folder, the default) or a fresh PostgreSQL database URL."""
    if request.param == "sqlite":
        return None
    return str(request.getfixturevalue("postgres_url"))
