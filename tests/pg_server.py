"""A throwaway PostgreSQL server for tests: Debian's `postgresql` package, a fresh cluster in a temporary
folder, listening on 127.0.0.1 and a free port only (no Unix socket), stopped by its PID.

PostgreSQL refuses to run as root; when the tests run as root the server runs as the package's `postgres`
user (else `nobody`), with the cluster folder handed to that user. When the binaries are missing and the
tests run as root on Debian, `apt-get install -y postgresql` installs them (as the Makefile does for
Chromium); otherwise the caller skips with `PostgresUnavailable`'s reason.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

from conftest import free_port

INSTALL_TIMEOUT_S = 600


class PostgresUnavailable(RuntimeError):
    """No PostgreSQL server binaries here, and they could not be installed; the message says why."""


def _bindir() -> Path | None:
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"),
                   key=lambda p: int(p.parent.parent.name) if p.parent.parent.name.isdigit() else 0)
    if found:
        return found[-1].parent
    on_path = shutil.which("initdb")
    return Path(on_path).parent if on_path and shutil.which("pg_ctl") else None


def postgres_bindir() -> Path:
    """The folder holding initdb and postgres; installs Debian's package when it can (root, apt-get)."""
    found = _bindir()
    if found:
        return found
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        raise PostgresUnavailable("no PostgreSQL server binaries (initdb) found; install Debian's package as root: "
                                  "apt-get install -y postgresql")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "install", "-y", "-qq", "postgresql"], ["apt-get", "update", "-qq"],
                ["apt-get", "install", "-y", "-qq", "postgresql"]):
        r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=INSTALL_TIMEOUT_S)
        if cmd[1] == "install" and r.returncode == 0 and _bindir():
            return _bindir()
    raise PostgresUnavailable(f"apt-get install -y postgresql failed: {(r.stderr or r.stdout)[-500:]}")


def _run_as() -> tuple[int, int] | None:
    """(uid, gid) to run the server as when we are root; None otherwise."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        try:
            u = pwd.getpwnam(name)
            return u.pw_uid, u.pw_gid
        except KeyError:
            continue
    raise PostgresUnavailable("running as root, and there is no `postgres` or `nobody` user to run PostgreSQL as")


def _others_can_enter(path: Path) -> bool:
    return all(os.stat(p).st_mode & 0o001 for p in [path.resolve(), *path.resolve().parents])


@contextlib.contextmanager
def postgres_server(log: Path, user: str = "cxrlt", database: str = "cxrlt", timeout: float = 60):
    """Start a fresh PostgreSQL; yield its SQLAlchemy URL (postgresql+psycopg://user@127.0.0.1:port/db)."""
    bindir = postgres_bindir()
    ids = _run_as()
    base = Path(tempfile.gettempdir())
    if ids and not _others_can_enter(base):  # the server's user must reach its folder
        base = Path("/tmp")
    root = Path(tempfile.mkdtemp(prefix="cxrlt-pg-", dir=base))
    data = root / "data"
    data.mkdir()
    as_user = {}
    if ids:
        for p in (root, data):
            os.chown(p, *ids)
        as_user = {"user": ids[0], "group": ids[1], "extra_groups": []}
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env["LC_ALL"] = env["LANG"] = "C.UTF-8"
    r = subprocess.run([str(bindir / "initdb"), "-D", str(data), "-U", user, "--auth=trust", "-E", "UTF8",
                        "--no-sync"], capture_output=True, text=True, env=env, cwd=root, timeout=120, **as_user)
    if r.returncode != 0:
        shutil.rmtree(root, ignore_errors=True)
        raise RuntimeError(f"initdb failed: {r.stderr[-2000:]}")
    port = free_port()
    opts = ["-D", str(data), "-p", str(port), "-c", "listen_addresses=127.0.0.1", "-c",
            "unix_socket_directories=", "-c", "fsync=off", "-c", "max_connections=100"]
    with open(log, "wb") as fh:
        proc = subprocess.Popen([str(bindir / "postgres"), *opts], stdout=fh, stderr=subprocess.STDOUT,
                                env=env, cwd=root, **as_user)
    url = f"postgresql+psycopg://{user}@127.0.0.1:{port}/{database}"
    try:
        _wait_ready(proc, port, user, log, timeout)
        import psycopg

        with psycopg.connect(host="127.0.0.1", port=port, user=user, dbname="postgres", autocommit=True) as c:
            c.execute(f'CREATE DATABASE "{database}"')
        yield url
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)  # "fast" shutdown: disconnect clients, stop cleanly
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        shutil.rmtree(root, ignore_errors=True)


def _wait_ready(proc, port: int, user: str, log: Path, timeout: float) -> None:
    import psycopg

    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"PostgreSQL exited with {proc.returncode}: {log.read_text(errors='replace')[-2000:]}")
        try:
            with psycopg.connect(host="127.0.0.1", port=port, user=user, dbname="postgres", connect_timeout=2):
                return
        except psycopg.OperationalError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"PostgreSQL not ready after {timeout} s: "
                                   f"{log.read_text(errors='replace')[-2000:]}") from None
            time.sleep(0.2)
