"""Container images without a container daemon: Debian's buildah builds the Dockerfile and runs commands in
its images (`--isolation chroot`, the host's network), mmdebstrap makes the Debian base they build on.

Used by tests/test_container_images.py; needs root (`make test` installs buildah and mmdebstrap when it is
root). Every process a run starts is stopped by its PID, with the processes it started.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# the Debian release and packages of the local base: the same Python minor as python:3.11-slim
BASE_SUITE = "bookworm"
BASE_PACKAGES = ("python3", "python3-venv", "ca-certificates", "passwd")
BASE_REPO = "localhost/cxrlt-debian-base"
CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")  # the host's trust store, which knows a TLS proxy's CA
ULIMITS = ("--ulimit", "nofile=4096:4096", "--ulimit", "nproc=4096:4096")


def missing_tools() -> str | None:
    """Why images cannot be built here, or None."""
    if os.geteuid() != 0:
        return "building images with buildah (chroot isolation) needs root; run `make test` as root"
    lacking = [t for t in ("buildah", "mmdebstrap") if shutil.which(t) is None]
    if lacking:
        return f"{' and '.join(lacking)} not installed (as root: apt-get install -y buildah mmdebstrap)"
    return None


def cache_dir() -> Path:
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    path = root / "cxrlt" / "images"
    path.mkdir(parents=True, exist_ok=True)
    return path


def buildah(*args, timeout: float = 900, check: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run(["buildah", *map(str, args)], capture_output=True, text=True, timeout=timeout)
    if check and r.returncode != 0:
        raise RuntimeError(f"buildah {' '.join(map(str, args[:3]))} failed ({r.returncode}):\n"
                           f"{r.stdout[-6000:]}\n{r.stderr[-4000:]}")
    return r


def image_exists(ref: str) -> bool:
    return buildah("inspect", "--type", "image", ref, check=False).returncode == 0


def image_size(ref: str) -> int:
    """The image's size in bytes, as `buildah images` reports it (decimal units, three digits)."""
    number, unit = json.loads(buildah("images", "--json", ref).stdout)[0]["size"].split()
    return round(float(number) * 1000 ** ["B", "kB", "MB", "GB", "TB"].index(unit))


def debian_base() -> tuple[str, float]:
    """The local base image (Debian + Python 3.11 + venv), built once per set of inputs and then reused:
    its reference and the seconds spent making it now (0 when it was there)."""
    key = hashlib.sha256(json.dumps([BASE_SUITE, BASE_PACKAGES, "minbase", 1]).encode()).hexdigest()[:12]
    ref = f"{BASE_REPO}:{BASE_SUITE}-{key}"
    if image_exists(ref):
        return ref, 0.0
    t0 = time.monotonic()
    work = cache_dir() / f"base-{key}"
    work.mkdir(exist_ok=True)
    tar = work / "rootfs.tar"
    if not tar.exists():
        part = work / "rootfs.tar.part"
        r = subprocess.run(["mmdebstrap", "--variant=minbase", "--include=" + ",".join(BASE_PACKAGES),
                            BASE_SUITE, str(part)], capture_output=True, text=True, timeout=600)
        if r.returncode != 0:
            raise RuntimeError(f"mmdebstrap failed ({r.returncode}):\n{r.stderr[-4000:]}")
        part.rename(tar)
    (work / "Containerfile").write_text('FROM scratch\nADD rootfs.tar /\nCMD ["/bin/bash"]\n')
    buildah("bud", "--isolation", "chroot", "-t", ref, "-f", work / "Containerfile", work, timeout=600)
    return ref, time.monotonic() - t0


def build(target: str, tag: str, base: str, build_args: dict | None = None) -> tuple[str, float, str]:
    """Build the project's Dockerfile `target` on `base` (layers cached between runs; the host's CA bundle
    as the build secret `ca`): the image reference, seconds and the build's log."""
    # docker's format: the OCI format has no HEALTHCHECK
    args = ["bud", "--isolation", "chroot", "--layers", "--format", "docker", *ULIMITS, "--target", target,
            "-t", tag, "--build-arg", f"BASE_IMAGE={base}"]
    for k, v in (build_args or {}).items():
        args += ["--build-arg", f"{k}={v}"]
    if CA_BUNDLE.exists():
        args += ["--secret", f"id=ca,src={CA_BUNDLE}"]
    t0 = time.monotonic()
    r = buildah(*args, "-f", ROOT / "Dockerfile", ROOT, timeout=1500)
    return tag, time.monotonic() - t0, r.stdout


def image_config(ref: str) -> dict:
    return json.loads(buildah("inspect", "--type", "image", ref).stdout)


def descendants(pid: int) -> list[int]:
    """`pid` and every process below it (from /proc), parents first."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        p = todo.pop(0)
        out.append(p)
        todo += children.get(p, [])
    return out


def proc_uid(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("Uid:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def _signal_all(pids, sig) -> None:
    for p in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(p, sig)


class Container:
    """A working container of `image` (`buildah from`), one command running in it (`buildah run`)."""

    def __init__(self, image: str, name: str):
        self.image, self.name = image, name
        buildah("rm", name, check=False)
        self.id = buildah("from", "--name", name, image).stdout.strip().splitlines()[-1]
        self.proc: subprocess.Popen | None = None

    def start(self, cmd: list[str], log: Path, env: dict | None = None, volumes: dict | None = None,
              user: str | None = None, workdir: str | None = None) -> subprocess.Popen:
        args = ["buildah", "run", "--isolation", "chroot"]
        for k, v in (env or {}).items():
            args += ["--env", f"{k}={v}"]
        for host, inside in (volumes or {}).items():
            args += ["--volume", f"{host}:{inside}"]
        if user:
            args += ["--user", user]
        if workdir:
            args += ["--workingdir", workdir]
        with open(log, "wb") as fh:
            self.proc = subprocess.Popen([*args, self.name, "--", *cmd], stdout=fh, stderr=subprocess.STDOUT)
        return self.proc

    def processes(self) -> list[int]:
        """The processes of the command (below buildah's own, which runs as root to set up the chroot)."""
        out = []
        for p in descendants(self.proc.pid)[1:] if self.proc else []:
            try:
                argv0 = Path(f"/proc/{p}/cmdline").read_bytes().split(b"\0")[0]
            except OSError:
                continue
            if argv0 and not argv0.startswith(b"buildah"):  # buildah-chroot-runtime / -exec: buildah's own
                out.append(p)
        return out

    def stop(self) -> None:
        """SIGTERM to the command and everything it started (they outlive `buildah run`), SIGKILL after 20 s."""
        if self.proc is not None:
            pids = descendants(self.proc.pid)
            _signal_all(reversed(pids[1:]), signal.SIGTERM)
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline and any(Path(f"/proc/{p}").exists() for p in pids[1:]):
                time.sleep(0.3)
            _signal_all(pids, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=20)
            self.proc = None
        buildah("rm", self.name, check=False)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()
