"""A throwaway PostgreSQL cluster for the tests: ``initdb`` in a temp folder, ``pg_ctl start`` on
127.0.0.1 and a free port, a fresh database per test, stopped at the end of the session.

The server binaries are found on PATH or in ``/usr/lib/postgresql/*/bin``. Where they (or
psycopg) are missing the tests skip with the reason, except under ``CI=true``, where they fail.
``initdb`` refuses to run as root: then the cluster runs as ``nobody`` (``runuser``).
TCP logins need the password (scram-sha-256), so the tests see a URL with one.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

USER, PASSWORD = "inspect3d", "pw-" + uuid.uuid4().hex[:16]


def server_bin() -> Path | None:
    """The folder of ``initdb`` and ``pg_ctl``, or None."""
    found = shutil.which("initdb")
    if found:
        return Path(found).parent
    dirs = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda d: int(d.split("/")[-2]))
    return Path(dirs[-1]) if dirs and Path(dirs[-1], "initdb").exists() else None


def unavailable(why: str) -> None:
    if os.environ.get("CI") == "true":
        pytest.fail(f"PostgreSQL tests cannot run under CI=true: {why}")
    pytest.skip(why)


def require_psycopg():
    """The psycopg module (skip, or under CI fail, where it is not installed)."""
    try:
        import psycopg
    except ImportError:
        if os.environ.get("CI") == "true":
            raise
        pytest.skip('psycopg is not installed: pip install "inspect3d[postgres]"',
                    allow_module_level=True)  # fmt: skip
    return psycopg


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Cluster:
    bin: Path
    data: Path
    port: int
    runas: list[str]  # ["runuser", "-u", "nobody", "--"] under root, else []
    durable: bool = False  # fsync on (benchmarks); the tests need no crash safety of the disk

    def pg_ctl(self, *args: str) -> None:
        log = self.data.parent / "server.log"
        cmd = [*self.runas, str(self.bin / "pg_ctl"), "-D", str(self.data), "-l", str(log)]
        subprocess.run([*cmd, *args], check=True, capture_output=True, timeout=60)

    def start(self) -> None:
        sock = self.data.parent
        opts = f"-p {self.port} -c listen_addresses=127.0.0.1 -k {sock}"
        opts += "" if self.durable else " -c fsync=off"
        self.pg_ctl("-w", "-o", opts, "start")

    def stop(self) -> None:
        self.pg_ctl("-w", "-m", "fast", "stop")

    def url(self, name: str, password: bool = True) -> str:
        secret = f":{PASSWORD}" if password else ""
        return f"postgresql://{USER}{secret}@127.0.0.1:{self.port}/{name}"

    def create_db(self) -> str:
        """A new empty database; its URL (with the password)."""
        import psycopg

        name = "t_" + uuid.uuid4().hex[:12]
        with psycopg.connect(self.url("postgres"), autocommit=True) as con:
            con.execute(f"CREATE DATABASE {name}")
        return self.url(name)


def make_cluster(durable: bool = False) -> Cluster:
    """A running cluster in a new temp folder (stop it and remove the folder when done)."""
    bindir = server_bin()
    if bindir is None:
        unavailable("PostgreSQL server binaries (initdb, pg_ctl) not found: apt install postgresql")
    require_psycopg()
    root = Path(tempfile.mkdtemp(prefix="inspect3d-pg-"))
    runas = []
    if os.geteuid() == 0:  # initdb refuses root: the server runs as nobody
        runas = ["runuser", "-u", "nobody", "--"]
        nobody = pwd.getpwnam("nobody")
        os.chmod(root, 0o755)
        os.chown(root, nobody.pw_uid, nobody.pw_gid)
    (root / "pw").write_text(PASSWORD + "\n")
    os.chmod(root / "pw", 0o644)
    cluster = Cluster(bindir, root / "data", free_port(), runas, durable)
    initdb = [*runas, str(bindir / "initdb"), "-D", str(cluster.data), "-U", USER]
    initdb += ["--pwfile", str(root / "pw"), "--auth-host=scram-sha-256", "--auth-local=trust"]
    subprocess.run(initdb, check=True, capture_output=True, timeout=120)
    (root / "pw").unlink()
    cluster.start()
    return cluster


def remove(cluster: Cluster) -> None:
    try:
        cluster.stop()
    finally:
        shutil.rmtree(cluster.data.parent, ignore_errors=True)


@pytest.fixture(scope="session")
def pg_cluster():
    cluster = make_cluster()
    yield cluster
    remove(cluster)


@pytest.fixture
def pg_url(pg_cluster) -> str:
    """The URL (with password) of a fresh database on the session's cluster."""
    return pg_cluster.create_db()
