"""Building and running the project's container images with podman, on a host without registries:
a Debian base image made with debootstrap, the CPU wheel of torch handed to the build, and
project-local podman settings (nothing under /etc is changed).

Environment (all optional): SMOKE_CACHE (default .cache/container), TORCH_VERSION (2.13.0),
TORCH_WHEEL (a wheel file to use), DEBIAN_MIRROR (default: the host's apt source),
SMOKE_STORAGE_DRIVER (auto | vfs | default), SMOKE_NO_CACHE=1 (build without layer cache).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pytest

from .paths import REPO
from .servers import free_port

CACHE = Path(os.environ.get("SMOKE_CACHE", REPO / ".cache" / "container")).resolve()
BASE_IMAGE = "localhost/sdserve-base:bookworm"
SUITE = "bookworm"
TORCH_VERSION = os.environ.get("TORCH_VERSION", "2.13.0")
TOOLS = ("podman", "runc", "debootstrap")
MODEL_NAME = "sdxl"  # the serving image's default --model_name
READY_TIMEOUT = 300
# crun fails on cgroups in nested sandboxes and the default ulimits cannot be set there.
CONTAINERS_CONF = """# Written by the container tests: runc, no default ulimits, no pids limit.
[containers]
default_ulimits = []
pids_limit = 0

[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
"""


def skip_loudly(reason: str) -> None:
    bang = "!" * 80
    print(f"\n{bang}\n!!!! SKIPPED: {reason}\n!!!! The container tests did NOT run.\n{bang}", file=sys.stderr)
    pytest.skip(reason)


def ensure_tools() -> None:
    """podman, runc and debootstrap, installed with apt-get when missing (skip when impossible)."""
    if os.geteuid() != 0:
        skip_loudly("the container tests need root (debootstrap and rootful podman)")
    missing = [t for t in TOOLS if shutil.which(t) is None]
    if not missing:
        return
    if shutil.which("apt-get") is None:
        skip_loudly(f"{', '.join(missing)} missing and there is no apt-get")
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / "apt-get.log", "w") as out:
        ok = subprocess.run(["apt-get", "update", "-q"], stdout=out, stderr=subprocess.STDOUT).returncode == 0 and \
            subprocess.run(["apt-get", "install", "-y", "-q", *missing], stdout=out, stderr=subprocess.STDOUT,
                           env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"}).returncode == 0
    if not ok or any(shutil.which(t) is None for t in missing):
        skip_loudly(f"apt-get install {' '.join(missing)} failed (see {CACHE / 'apt-get.log'})")


class Podman:
    """podman with the project's settings."""

    def __init__(self):
        CACHE.mkdir(parents=True, exist_ok=True)
        (CACHE / "containers.conf").write_text(CONTAINERS_CONF)
        self.env = {**os.environ, "CONTAINERS_CONF": str(CACHE / "containers.conf")}
        driver = os.environ.get("SMOKE_STORAGE_DRIVER", "auto")
        chosen_before = (CACHE / "storage.conf").is_file() and '"vfs"' in (CACHE / "storage.conf").read_text()
        if driver == "vfs" or driver == "auto" and (chosen_before or not self._default_storage_works()):
            self._use_vfs()

    def __call__(self, *args: str, check: bool = True, timeout: float = 3600, **kw) -> subprocess.CompletedProcess:
        run = subprocess.run(["podman", *args], env=self.env, capture_output=True, text=True, timeout=timeout, **kw)
        if check and run.returncode != 0:
            raise AssertionError(f"podman {' '.join(args)} failed ({run.returncode}):\n{run.stderr[-3000:]}")
        return run

    def _use_vfs(self) -> None:
        (CACHE / "storage").mkdir(parents=True, exist_ok=True)
        (CACHE / "storage.conf").write_text(
            f'# Written by the container tests: overlay does not work on this host.\n[storage]\ndriver = "vfs"\n'
            f'graphroot = "{CACHE / "storage" / "vfs"}"\nrunroot = "/run/sdserve-smoke-containers"\n')
        self.env["CONTAINERS_STORAGE_CONF"] = str(CACHE / "storage.conf")

    def _default_storage_works(self) -> bool:
        """Can the default storage driver create and mount a container's root filesystem here?"""
        if self("info", check=False).returncode != 0:
            return False
        probe, tag = Path(tempfile.mkdtemp()), "localhost/sdserve-storage-probe:latest"
        (probe / "root").mkdir()
        (probe / "root" / "probe").write_text("probe")
        subprocess.run(["tar", "-C", str(probe / "root"), "-cf", str(probe / "probe.tar"), "."], check=True)
        works = self("import", "-q", str(probe / "probe.tar"), tag, check=False).returncode == 0
        shutil.rmtree(probe)
        if works:
            created = self("create", tag, "/probe", check=False)
            mounted = self("mount", created.stdout.strip(), check=False) if created.returncode == 0 else created
            works = mounted.returncode == 0 and (Path(mounted.stdout.strip()) / "probe").is_file()
            if created.returncode == 0:
                self("umount", created.stdout.strip(), check=False)
                self("rm", "-f", created.stdout.strip(), check=False)
        self("rmi", "-f", tag, check=False)
        return works

    # -- images ------------------------------------------------------------------------------------
    def base_image(self) -> str:
        """Debian bookworm from debootstrap (python3, venv, CA certificates), imported once."""
        if self("image", "exists", BASE_IMAGE, check=False).returncode == 0:
            return BASE_IMAGE
        tarball = CACHE / f"base-{SUITE}.tar"
        if not tarball.is_file() or tarball.stat().st_size == 0:
            rootfs = CACHE / f"rootfs-{SUITE}"
            shutil.rmtree(rootfs, ignore_errors=True)
            with open(CACHE / "debootstrap.log", "w") as out:
                run = subprocess.run(["debootstrap", "--variant=minbase", "--include=python3,python3-venv,ca-certificates",
                                      SUITE, str(rootfs), debian_mirror()], stdout=out, stderr=subprocess.STDOUT)
            assert run.returncode == 0, (CACHE / "debootstrap.log").read_text()[-3000:]
            for junk in [*rootfs.glob("var/cache/apt/archives/*.deb"), *rootfs.glob("var/cache/apt/*.bin"),
                         *rootfs.glob("var/lib/apt/lists/*")]:
                junk.unlink() if junk.is_file() else shutil.rmtree(junk, ignore_errors=True)
            subprocess.run(["tar", "--numeric-owner", "-C", str(rootfs), "-cf", f"{tarball}.partial", "."], check=True)
            Path(f"{tarball}.partial").replace(tarball)
            shutil.rmtree(rootfs)
        self("import", "-q", "--change", "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
             "--change", 'CMD ["/bin/bash"]', str(tarball), BASE_IMAGE)
        return BASE_IMAGE

    def build(self, tag: str, containerfile: str = "Containerfile", build_args: dict[str, str] | None = None,
              volumes: tuple[str, ...] = (), contexts: dict[str, Path] | None = None, context: Path = REPO,
              target: str | None = None) -> str:
        """``podman build`` (chroot isolation, host network, no pulls); returns the build log."""
        args = ["build", "--isolation", "chroot", "--network", "host", "--pull=never", "--layers", "-f",
                str(REPO / containerfile), "-t", tag]
        for key, value in (build_args or {}).items():
            args += ["--build-arg", f"{key}={value}"]
        for volume in volumes:
            args += ["--volume", volume]
        for name, path in (contexts or {}).items():
            args += ["--build-context", f"{name}={path}"]
        if target:
            args += ["--target", target]
        ca = os.environ.get("PIP_CERT") or os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("SSL_CERT_FILE") \
            or "/etc/ssl/certs/ca-certificates.crt"
        if Path(ca).is_file():  # for pip behind a TLS-inspecting proxy (build steps only)
            args += ["--volume", f"{Path(ca).resolve()}:/run/host-ca-bundle.crt:ro", "--build-arg",
                     "PIP_CERT=/run/host-ca-bundle.crt"]
        if os.environ.get("PIP_INDEX_URL"):
            args += ["--build-arg", f"PIP_INDEX_URL={os.environ['PIP_INDEX_URL']}"]
        if os.environ.get("SMOKE_NO_CACHE") == "1":
            args.append("--no-cache")
        run = self(*args, str(context), check=False)
        log = run.stdout + run.stderr
        (CACHE / f"build-{re.sub(r'[^a-z0-9]+', '-', tag)}.log").write_text(log)
        assert run.returncode == 0, f"podman build {tag} failed:\n{log[-4000:]}"
        return log

    def inspect(self, image: str, template: str) -> str:
        return self("image", "inspect", "--format", template, image).stdout.strip()


def debian_mirror() -> str:
    """DEBIAN_MIRROR, else the host's apt source, else deb.debian.org."""
    if os.environ.get("DEBIAN_MIRROR"):
        return os.environ["DEBIAN_MIRROR"]
    sources = Path("/etc/apt/sources.list.d/debian.sources")
    if sources.is_file():
        for line in sources.read_text().splitlines():
            if line.startswith("URIs:"):
                uris = [u for u in line.split()[1:] if "security" not in u]
                if uris:
                    return uris[0]
    listing = Path("/etc/apt/sources.list")
    if listing.is_file():
        for line in listing.read_text().splitlines():
            parts = line.split()
            if parts[:1] == ["deb"] and "security" not in line:
                urls = [p for p in parts[1:] if p.startswith(("http://", "https://"))]
                if urls:
                    return urls[0]
    return "http://deb.debian.org/debian"


def torch_cpu_wheel() -> Path:
    """The CPU wheel of torch for the image (the default TORCH_SPEC is the multi-GB CUDA build):
    TORCH_WHEEL, a cached one, pip's configured local wheels, else the PyTorch CPU index."""
    wheels = CACHE / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    if os.environ.get("TORCH_WHEEL"):
        given = Path(os.environ["TORCH_WHEEL"])
        shutil.copy(given, wheels / given.name)
        return wheels / given.name
    arch = platform.machine()
    cached = sorted(wheels.glob(f"torch-{TORCH_VERSION}+cpu-cp311-cp311-*_{arch}.whl"))
    if cached:
        return cached[0]
    target = ["--no-deps", "--only-binary=:all:", "--python-version", "3.11", "--implementation", "cp", "--abi",
              "cp311", "--platform", f"manylinux_2_28_{arch}"]
    tmp = Path(tempfile.mkdtemp())
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", *target, "--no-index", "-d", str(tmp),
                    f"torch=={TORCH_VERSION}"], capture_output=True)
    found = [f for f in tmp.glob("torch-*.whl") if "+cpu" in f.name.replace("%2B", "+")]
    if not found:
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", *target, "--index-url",
                        "https://download.pytorch.org/whl/cpu", "-d", str(tmp), f"torch=={TORCH_VERSION}+cpu"],
                       check=True)
        found = list(tmp.glob("torch-*.whl"))
    wheel = wheels / found[0].name.replace("%2B", "+")
    assert "+cpu" in wheel.name, f"the torch wheel found is not the CPU build: {wheel.name}"
    shutil.move(found[0], wheel)
    shutil.rmtree(tmp)
    return wheel


def checksums(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@contextlib.contextmanager
def serving(podman: Podman, image: str, model: Path, user: str):
    """The serving image running as ``user`` with ``model`` at /mnt/models, read-only, as KServe
    mounts it; yields (container name, URL) once it is ready, and prints its log on a failure."""
    port, name = free_port(), f"sdserve-smoke-{free_port()}"
    podman("run", "-d", "--name", name, "--runtime", "runc", "--user", user, "--cap-drop=ALL",
           "--security-opt", "no-new-privileges", "-v", f"{model}:/mnt/models:ro", "-p", f"127.0.0.1:{port}:8080", image)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + READY_TIMEOUT
        while True:
            state = podman("inspect", "--format", "{{.State.Status}}", name, check=False).stdout.strip()
            assert state == "running", f"the container stopped ({state}) before it was ready"
            try:
                if httpx.get(f"{url}/v2/models/{MODEL_NAME}/ready", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, f"not ready after {READY_TIMEOUT} s"
            time.sleep(2)
        yield name, url
    except BaseException:
        print(podman("logs", "--tail", "200", name, check=False).stdout)
        raise
    finally:
        podman("rm", "-f", "-t", "5", name, check=False)
