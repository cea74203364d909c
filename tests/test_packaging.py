"""The wheel holds everything that ships, and the container image runs what the wheel holds.

Docker is not needed: the wheel is built and run the way the Dockerfile builds and runs it. The
build stage's COPY inputs are copied (symlinks kept, as Docker keeps them) to a temporary
directory and built into a wheel; the wheel is installed with its declared dependencies into a
fresh venv outside the source tree; from an empty working directory, without PYTHONPATH, the
installed `xds-server` validates its embedded demo snapshot and runs as the image's ENTRYPOINT +
CMD until /healthz and the image's HEALTHCHECK answer, then stops on SIGTERM. Every product
module is imported there with only the declared dependencies.

About 15-30 s, mostly the wheel build and the dependencies' install (from pip's cache or the
index). The build is offline (--no-build-isolation) when this venv's setuptools can build
wheels (70.1 or later, or the `wheel` package installed); else pip fetches setuptools for an
isolated build, as `docker build` does.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import metadata, util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
PRODUCT = ("xds_server", "lrs")
SHIPPED = (*PRODUCT, "xds_lab")
#: Left out of the build-stage copy, as .dockerignore leaves them out of the build context.
NOT_IN_CONTEXT = shutil.ignore_patterns("__pycache__", "*.py[cod]")
INSTALL_TIMEOUT = 300  # a cold pip cache downloads grpcio, protobuf, xds-protos, aiohttp
RUN_TIMEOUT = 60


# --- the Dockerfile, read as Docker reads it (the parts used here) -------------------------


def stages(path: Path = DOCKERFILE) -> list[list[tuple[str, str]]]:
    """Per FROM, its (INSTRUCTION, arguments), continuation lines joined, comments dropped."""
    result: list[list[tuple[str, str]]] = []
    for line in re.sub(r"\\\n", " ", path.read_text()).splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        word, _, rest = line.partition(" ")
        if word.upper() == "FROM":
            result.append([])
        elif result:
            result[-1].append((word.upper(), rest.strip()))
    return result


def copies(stage: list[tuple[str, str]]) -> list[tuple[list[str], str]]:
    """(sources, destination) of each COPY from the build context (not --from a stage)."""
    found = []
    for word, rest in stage:
        if word == "COPY" and "--from=" not in rest:
            args = [arg for arg in shlex.split(rest) if not arg.startswith("--")]
            found.append((args[:-1], args[-1]))
    return found


def exec_form(stage: list[tuple[str, str]], instruction: str) -> list[str]:
    """The last `instruction ["...", ...]` of the stage (HEALTHCHECK: its CMD)."""
    (rest, *_) = [rest for word, rest in reversed(stage) if word == instruction]
    if instruction == "HEALTHCHECK":
        rest = rest.partition("CMD ")[2]
    argv = json.loads(rest)
    assert isinstance(argv, list) and all(isinstance(arg, str) for arg in argv), rest
    return argv


def docker_copy(sources: list[str], destination: str, workdir: Path) -> None:
    """COPY into WORKDIR: a directory's contents go into the destination, a file into a
    destination ending in / under its own name; symlinks stay symlinks."""
    assert not destination.startswith("/"), "the build stage copies relative to its WORKDIR"
    target = workdir / destination
    for source in sources:
        path = ROOT / source
        if path.is_dir():
            shutil.copytree(path, target, symlinks=True, ignore=NOT_IN_CONTEXT, dirs_exist_ok=True)
        else:
            into = target / path.name if destination.endswith("/") else target
            into.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, into, follow_symlinks=False)


# --- the wheel, installed in a fresh venv --------------------------------------------------


def builds_wheels_offline() -> bool:
    """Whether this venv's setuptools builds a wheel without fetching anything: bdist_wheel
    is part of setuptools from 70.1, before that it comes from the `wheel` package."""
    if util.find_spec("wheel") is not None:
        return True
    try:
        version = re.match(r"(\d+)\.(\d+)", metadata.version("setuptools"))
    except metadata.PackageNotFoundError:
        return False
    return version is not None and (int(version[1]), int(version[2])) >= (70, 1)


def run_ok(
    argv: list[str], timeout: float, cwd: Path | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{shlex.join(argv)}\n{result.stdout}\n{result.stderr}"
    return result


@dataclass(frozen=True)
class Installed:
    wheel: Path
    venv: Path
    site_packages: Path
    cwd: Path  # an empty working directory outside the source tree
    env: dict[str, str]  # no PYTHONPATH; the venv's bin first on PATH, as in the image

    def bin(self, name: str) -> str:
        return str(self.venv / "bin" / name)

    def run(self, *argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            argv, cwd=self.cwd, env=self.env, capture_output=True, text=True, timeout=RUN_TIMEOUT
        )


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Installed]:
    base = tmp_path_factory.mktemp("packaging")
    source, dist, venv, cwd = (base / name for name in ("source", "dist", "venv", "cwd"))
    cwd.mkdir()
    for sources, destination in copies(stages()[0]):
        docker_copy(sources, destination, source)

    build = [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--wheel-dir", str(dist)]
    if builds_wheels_offline():
        build.append("--no-build-isolation")
    run_ok([*build, "."], INSTALL_TIMEOUT, cwd=source)
    (wheel,) = dist.glob("xds_server-*.whl")

    # Without pip (ensurepip takes seconds): this venv's pip installs into it.
    run_ok([sys.executable, "-m", "venv", "--without-pip", str(venv)], RUN_TIMEOUT)
    python = venv / "bin" / "python"
    run_ok(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet", str(wheel)],
        INSTALL_TIMEOUT,
    )
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in {"PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "VIRTUAL_ENV"}
    }
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    purelib = run_ok(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
        RUN_TIMEOUT,
        cwd=cwd,
        env=env,
    )
    yield Installed(wheel, venv, Path(purelib.stdout.strip()), cwd, env)
    shutil.rmtree(venv, ignore_errors=True)  # ~90 MB; the wheel and logs stay for a look


def test_the_wheel_holds_every_module_and_data_file_and_nothing_else(installed: Installed):
    with zipfile.ZipFile(installed.wheel) as wheel:
        names = set(wheel.namelist())
        demo = (
            wheel.read("xds_server/data/demo.yaml") if "xds_server/data/demo.yaml" in names else b""
        )
    assert {name.split("/")[0] for name in names if ".dist-info/" not in name} == set(SHIPPED)

    def shipped(pattern: str) -> set[str]:
        found = {
            path.relative_to(ROOT).as_posix()
            for path in ROOT.glob(pattern)
            if path.is_file() and "__pycache__" not in path.parts
        }
        assert found, f"nothing in the source matches {pattern}"
        return found

    wanted = set().union(*(shipped(f"{package}/**/*.py") for package in SHIPPED))
    for pattern in ("lrs/weights/*.py", "xds_server/static/*", "xds_server/data/demo.yaml"):
        wanted |= shipped(pattern)
    assert sorted(wanted - names) == []
    # The embedded demo is a symlink in the source: the wheel holds the file it points to.
    assert demo == (ROOT / "snapshots" / "demo.yaml").read_bytes()


IMPORT_EVERY_MODULE = """
import importlib, pkgutil, sys
for name in PRODUCT:
    package = importlib.import_module(name)
    for module in pkgutil.walk_packages(package.__path__, name + "."):
        importlib.import_module(module.name)
files = {getattr(m, "__file__", None) for n, m in sys.modules.items() if n.split(".")[0] in PRODUCT}
print(*sorted(f for f in files if f), sep="\\n")
"""


def test_every_product_module_imports_from_the_fresh_venv(installed: Installed):
    """With only the declared dependencies, and from the install, not the source tree."""
    script = f"PRODUCT = {PRODUCT!r}\n{IMPORT_EVERY_MODULE}"
    result = installed.run(installed.bin("python"), "-c", script)
    assert result.returncode == 0, result.stderr
    files = [Path(line) for line in result.stdout.splitlines()]
    assert len(files) > 40, files
    outside = [path for path in files if not path.is_relative_to(installed.site_packages)]
    assert outside == []


def test_validate_accepts_the_embedded_demo(installed: Installed):
    where = installed.run(
        installed.bin("python"),
        "-c",
        "from xds_server.cli import default_snapshot; print(default_snapshot())",
    )
    demo = Path(where.stdout.strip())
    assert demo.is_relative_to(installed.site_packages), where.stderr
    result = installed.run(installed.bin("xds-server"), "validate", str(demo))
    assert result.returncode == 0, result.stderr
    assert "valid" in result.stdout


def test_the_lab_command_runs(installed: Installed):
    result = installed.run(installed.bin("xds-lab"), "--help")
    assert result.returncode == 0, result.stderr
    assert "usage: xds-lab" in result.stdout


def admin_port(process: subprocess.Popen[bytes], log: Path, timeout: float = 30) -> int:
    """The admin port from serve's start-up line (it binds port 0 here)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = re.search(r"admin on https?://.*?:(\d+),", log.read_text())
        if found:
            return int(found[1])
        assert process.poll() is None, f"serve exited {process.returncode}:\n{log.read_text()}"
        time.sleep(0.1)
    raise AssertionError(f"serve did not start within {timeout} s:\n{log.read_text()}")


def test_the_image_command_serves_until_sigterm(installed: Installed):
    final = stages()[-1]
    entrypoint, command = exec_form(final, "ENTRYPOINT"), exec_form(final, "CMD")
    assert entrypoint == ["xds-server"]
    ports = ["--xds-port", "0", "--admin-port", "0", "--router-port", "0"]
    log = installed.cwd / "serve.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [installed.bin("xds-server"), *command, *ports],
            cwd=installed.cwd,
            env=installed.env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    healthcheck = exec_form(final, "HEALTHCHECK")
    try:
        port = admin_port(process, log)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as response:
            health = json.load(response)
        assert health["status"] == "ok"
        assert Path(health["snapshot"]["file"]).is_relative_to(installed.site_packages)

        # The image's HEALTHCHECK, with its `python` found on the image's PATH, this port.
        assert "127.0.0.1:8080/healthz" in healthcheck[-1]
        python = shutil.which(healthcheck[0], path=installed.env["PATH"])
        assert python is not None and Path(python).is_relative_to(installed.venv)
        check = [python, *healthcheck[1:-1], healthcheck[-1].replace(":8080/", f":{port}/")]
        result = installed.run(*check)
        assert result.returncode == 0, result.stderr

        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0, log.read_text()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert "shutting down" in log.read_text()
    assert installed.run(*check).returncode != 0  # and it fails once nothing answers


def test_the_dockerfile_installs_only_the_wheel_and_runs_unprivileged():
    build, final = stages()[0], stages()[-1]
    assert len(stages()) == 2
    assert copies(final) == [], "the final stage takes only the wheel, from the build stage"
    (user,) = [rest for word, rest in final if word == "USER"]
    assert int(user.partition(":")[0]) != 0, "a numeric, non-root UID"
    (exposed,) = [rest.split() for word, rest in final if word == "EXPOSE"]
    assert sorted(map(int, exposed)) == [8080, 18000, 18001]

    ignored = [
        line.strip()
        for line in DOCKERIGNORE.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert {".git", ".venv", "bench/results"} <= set(ignored)
    for sources, _ in copies(build):
        for source in sources:
            name = source.rstrip("/")
            assert not any(fnmatch.fnmatch(name, pattern) for pattern in ignored), name
