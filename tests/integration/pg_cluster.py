"""A throw-away PostgreSQL cluster for tests, from Debian's ``postgresql`` package.

``PgCluster`` runs ``initdb`` as the ``postgres`` user into a fresh temp dir
(``egt-pg-*``), starts it with ``pg_ctl`` listening only on 127.0.0.1 at a
free port and on a unix socket inside that dir (reachable from any network
namespace: a socket file is not bound to one), with scram-sha-256 passwords
everywhere and fsync off. It creates the role and database ``egressd`` with
a random password. On exit it stops the server (``pg_ctl stop``; if that
fails, the postmaster by the PID it wrote) and removes the dir. Never uses
or touches the system's own clusters.
"""

from __future__ import annotations

import os
import pwd
import secrets
import shutil
import signal
import tempfile
import time
from contextlib import suppress
from pathlib import Path
from typing import Self

from tests.integration.egressd_proc import free_port
from tests.integration.peers import run

PG_USER = "postgres"


def pg_bin_dir() -> Path | None:
    """The newest ``/usr/lib/postgresql/<major>/bin`` that has initdb, or None."""
    found = sorted(
        Path("/usr/lib/postgresql").glob("*/bin/initdb"),
        key=lambda p: int(p.parent.parent.name) if p.parent.parent.name.isdigit() else 0,
    )
    return found[-1].parent if found else None


class PgCluster:
    def __init__(self, *, database: str = "egressd", user: str = "egressd") -> None:
        bindir = pg_bin_dir()
        if bindir is None:
            raise RuntimeError("PostgreSQL server binaries not found (apt: postgresql)")
        self.bindir = bindir
        self.port = free_port()
        self.database, self.user = database, user
        self.password = secrets.token_urlsafe(18)
        self._superuser_password = secrets.token_urlsafe(18)
        self._pid: int | None = None
        self.dir = Path()

    # -- URLs ---------------------------------------------------------------------

    def url(self, *, database: str | None = None) -> str:
        """TCP on 127.0.0.1 (for processes in the host's own netns)."""
        db = database or self.database
        return f"postgresql+psycopg://{self.user}:{self.password}@127.0.0.1:{self.port}/{db}"

    def socket_url(self, *, database: str | None = None) -> str:
        """The unix socket (for processes in any netns)."""
        db = database or self.database
        return (
            f"postgresql+psycopg://{self.user}:{self.password}@/{db}"
            f"?host={self.socket_dir}&port={self.port}"
        )

    @property
    def socket_dir(self) -> Path:
        return self.dir / "sock"

    # -- lifecycle ----------------------------------------------------------------

    def __enter__(self) -> Self:
        self.dir = Path(tempfile.mkdtemp(prefix="egt-pg-"))
        try:
            self._start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _as_postgres(self, *argv: str, timeout: float = 60) -> None:
        run(["runuser", "-u", PG_USER, "--", *argv], timeout=timeout)

    def _start(self) -> None:
        owner = pwd.getpwnam(PG_USER)
        data, pwfile = self.dir / "data", self.dir / "superuser-password"
        self.socket_dir.mkdir()
        pwfile.write_text(self._superuser_password + "\n")
        for path in (self.dir, self.socket_dir, pwfile):
            os.chown(path, owner.pw_uid, owner.pw_gid)
        os.chmod(self.dir, 0o700)
        os.chmod(pwfile, 0o600)
        self._as_postgres(
            str(self.bindir / "initdb"),
            "-D",
            str(data),
            "-U",
            PG_USER,
            f"--pwfile={pwfile}",
            "--auth=scram-sha-256",
            "--encoding=UTF8",
            "--no-sync",
            "--no-instructions",
        )
        pwfile.unlink()
        options = (
            f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.socket_dir} "
            "-c fsync=off -c synchronous_commit=off -c full_page_writes=off "
            "-c max_connections=200"
        )
        self._as_postgres(
            str(self.bindir / "pg_ctl"),
            "-D",
            str(data),
            "-l",
            str(self.dir / "server.log"),
            "-o",
            options,
            "-w",
            "-t",
            "30",
            "start",
        )
        self._pid = int((data / "postmaster.pid").read_text().split()[0])
        self._create_role_and_database()

    def _create_role_and_database(self) -> None:
        import psycopg
        from psycopg import sql

        with psycopg.connect(
            host="127.0.0.1",
            port=self.port,
            user=PG_USER,
            password=self._superuser_password,
            dbname="postgres",
            autocommit=True,
        ) as conn:
            conn.execute(
                sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(
                    sql.Identifier(self.user), sql.Literal(self.password)
                )
            )
            conn.execute(
                sql.SQL("CREATE DATABASE {} OWNER {}").format(
                    sql.Identifier(self.database), sql.Identifier(self.user)
                )
            )

    def create_database(self, name: str) -> str:
        """Another empty database owned by our role; returns its TCP URL."""
        import psycopg
        from psycopg import sql

        with psycopg.connect(
            host="127.0.0.1",
            port=self.port,
            user=PG_USER,
            password=self._superuser_password,
            dbname="postgres",
            autocommit=True,
        ) as conn:
            conn.execute(
                sql.SQL("CREATE DATABASE {} OWNER {}").format(
                    sql.Identifier(name), sql.Identifier(self.user)
                )
            )
        return self.url(database=name)

    def log(self) -> str:
        path = self.dir / "server.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def close(self) -> None:
        data = self.dir / "data"
        if self._pid is not None:
            stopped = (
                run(
                    [
                        "runuser",
                        "-u",
                        PG_USER,
                        "--",
                        str(self.bindir / "pg_ctl"),
                        "-D",
                        str(data),
                        "-m",
                        "fast",
                        "-w",
                        "-t",
                        "30",
                        "stop",
                    ],
                    check=False,
                    timeout=60,
                ).returncode
                == 0
            )
            if not stopped:
                self._kill_postmaster()
            self._pid = None
        if self.dir != Path() and not os.environ.get("EGT_KEEP"):
            shutil.rmtree(self.dir, ignore_errors=True)

    def _kill_postmaster(self) -> None:
        """SIGQUIT (immediate shutdown), then SIGKILL: only the postmaster we started."""
        assert self._pid is not None
        for sig in (signal.SIGQUIT, signal.SIGKILL):
            with suppress(ProcessLookupError):
                os.kill(self._pid, sig)
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                try:
                    os.kill(self._pid, 0)
                except ProcessLookupError:
                    return
                time.sleep(0.05)
