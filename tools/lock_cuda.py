#!/usr/bin/env python
"""Writes requirements/lock-cuda.txt and requirements/constraints-cuda.txt: the exact lock for the CUDA
build of torch 2.13.0 (what `KSCALE_TARGET=cuda bash scripts/setup.sh` installs).

    .venv/bin/python tools/lock_cuda.py            # regenerate both files
    .venv/bin/python tools/lock_cuda.py --check    # exit 1 if the files on disk differ from a fresh resolve

How: pip's own resolver in `--dry-run --report` mode, from package metadata only (nothing multi-GB is
downloaded), for Linux x86_64 and the running CPython (3.11, as on the CPU path):
  1. torch is asked as `torch==2.13.0,!=2.13.0+cpu` (so that no local CPU wheel can stand in for it);
     its own Requires-Dist decides triton (3.7.1 for 2.13.0) and the nvidia-*/cuda-* packages;
  2. everything else keeps the exact version of requirements/lock-cpu.txt (triton excepted: the CPU
     lock's 3.9.0 is for the CPU interpreter tests and conflicts with the CUDA wheel's pin);
  3. requirements/no-deps.txt (megatron-core, mosaicml-streaming, tokenizer-file packages) stays out of
     the resolve, exactly as on the CPU path: setup.sh installs it with --no-deps --ignore-requires-python
     (megatron-core 0.19.x declares Requires-Python >= 3.12 but its cp311 wheel works);
     tests/test_install.py checks megatron-core's own requirements against the lock.

pip: PyPI's simple index here advertises no PEP 658 metadata files, so pip would download every wheel
(torch's alone is 527 MB) to read its METADATA. `--use-feature=fast-deps` reads only the wheel's
METADATA through HTTP range requests; it needs a newer pip than the 23.2 that Python 3.11's venv brings,
so a pinned pip (PIP_VERSION) is installed once with `pip install --target` under $KSCALE_CACHE and run
from there (the .venv's own pip is not touched).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REQ = ROOT / "requirements"
LOCK_CPU = REQ / "lock-cpu.txt"
NO_DEPS = REQ / "no-deps.txt"
LOCK_CUDA = REQ / "lock-cuda.txt"
CONSTRAINTS_CUDA = REQ / "constraints-cuda.txt"

TORCH_VERSION = "2.13.0"
TORCH_CUDA_REQ = f"torch=={TORCH_VERSION},!={TORCH_VERSION}+cpu"
PIP_VERSION = "26.3"
# the CUDA build's own stack: torch and what its Requires-Dist pins (kept apart in the lock, and dropped
# from it on the NGC path, where the container brings its own)
CUDA_STACK = re.compile(r"^(torch|triton|nvidia-.*|cuda-.*)$")
# pins of lock-cpu.txt that the CUDA lock does not take over (torch's CUDA wheel decides them)
NOT_FROM_CPU_LOCK = {"triton"}


def canon(name: str) -> str:
    """PEP 503 normalized project name."""
    return re.sub(r"[-_.]+", "-", name).lower()


def read_pins(path: Path) -> dict[str, tuple[str, str]]:
    """{canonical name: (name as written, version)} of a `name==version` file (comments, blank lines skipped)."""
    pins: dict[str, tuple[str, str]] = {}
    for n, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        m = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)==([^=,;\s]+)", line)
        if not m:
            raise ValueError(f"{path.name}:{n}: not an exact `name==version` pin: {raw!r}")
        key = canon(m.group(1))
        if key in pins:
            raise ValueError(f"{path.name}:{n}: {m.group(1)} is pinned twice")
        pins[key] = (m.group(1), m.group(2))
    return pins


def cache_dir() -> Path:
    return Path(os.environ.get("KSCALE_CACHE", Path.home() / ".cache" / "kronecker-scale"))


def pip_command() -> tuple[list[str], dict[str, str]]:
    """(argv prefix, environment) that run pip PIP_VERSION with the running interpreter."""
    target = cache_dir() / f"pip-{PIP_VERSION}"
    if not (target / "pip" / "__init__.py").exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".pip-{PIP_VERSION}-", dir=target.parent))
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "--disable-pip-version-check",
                "-q",
                "install",
                "--no-deps",
                "--target",
                str(tmp),
                f"pip=={PIP_VERSION}",
            ],
            check=True,
            stdout=subprocess.DEVNULL,
        )
        try:
            tmp.rename(target)  # atomic: a concurrent run may have won, which is fine
        except OSError:
            subprocess.run(["rm", "-rf", str(tmp)], check=False)
    env = dict(
        os.environ,
        PYTHONPATH=str(target) + os.pathsep + os.environ.get("PYTHONPATH", ""),
        PIP_DISABLE_PIP_VERSION_CHECK="1",
    )
    return [sys.executable, "-m", "pip"], env


def resolve(
    requirements: list[str],
    constraints: list[Path] = (),
    *,
    no_deps: bool = False,
    ignore_requires_python: bool = False,
) -> dict:
    """pip's resolver on `requirements` (lines of a requirements file), metadata only: the --report JSON."""
    argv, env = pip_command()
    with tempfile.TemporaryDirectory(prefix="kscale-resolve-") as tmp:
        reqs = Path(tmp) / "requirements.txt"
        reqs.write_text("\n".join(requirements) + "\n")
        report = Path(tmp) / "report.json"
        cmd = [
            *argv,
            "install",
            "--dry-run",
            "--ignore-installed",
            "--quiet",
            "--use-feature=fast-deps",
            "--report",
            str(report),
            "-r",
            str(reqs),
        ]
        for c in constraints:
            cmd += ["-c", str(c)]
        if no_deps:
            cmd.append("--no-deps")
        if ignore_requires_python:
            cmd.append("--ignore-requires-python")
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            noise = "is ignored: it is neither a file nor a directory"
            err = "\n".join(line for line in (proc.stdout + proc.stderr).splitlines() if noise not in line)
            raise RuntimeError(f"pip's resolver refused the requirements ({' '.join(cmd[3:])}):\n{err}")
        return json.loads(report.read_text())


def installed(report: dict) -> dict[str, dict]:
    """{canonical name: metadata} of what a --report would install."""
    return {canon(i["metadata"]["name"]): i for i in report["install"]}


def applicable_requirements(metadata: dict, environment: dict) -> list:
    """The Requires-Dist entries of one report item whose markers hold in `environment` (no extras)."""
    from packaging.requirements import Requirement

    out = []
    for spec in metadata.get("requires_dist", []):
        req = Requirement(spec)
        if req.marker is None or req.marker.evaluate(dict(environment, extra="")):
            out.append(req)
    return out


def torch_requirements() -> tuple[dict, list]:
    """(the report of resolving the CUDA torch alone, torch's applicable Requires-Dist)."""
    report = resolve([TORCH_CUDA_REQ])
    item = installed(report)["torch"]
    version = item["metadata"]["version"]
    if version != TORCH_VERSION:
        raise RuntimeError(f"pip picked torch {version}, expected the CUDA build {TORCH_VERSION}")
    return report, applicable_requirements(item["metadata"], report["environment"])


def generate() -> tuple[str, str, dict]:
    """(lock-cuda.txt text, constraints-cuda.txt text, report of the full resolve)."""
    cpu = read_pins(LOCK_CPU)
    base = [f"{name}=={version}" for key, (name, version) in cpu.items() if key not in NOT_FROM_CPU_LOCK]
    report = resolve([TORCH_CUDA_REQ, *base])
    items = installed(report)
    torch = items["torch"]["metadata"]
    if torch["version"] != TORCH_VERSION:
        raise RuntimeError(f"pip picked torch {torch['version']}, expected {TORCH_VERSION}")
    triton = [r for r in applicable_requirements(torch, report["environment"]) if canon(r.name) == "triton"]
    if not triton:
        raise RuntimeError("torch's CUDA wheel declares no triton requirement on this platform")
    triton_version = items["triton"]["metadata"]["version"]
    for key, (name, version) in cpu.items():
        if key not in NOT_FROM_CPU_LOCK and items[key]["metadata"]["version"] != version:
            raise RuntimeError(
                f"{name}: the CUDA resolve picked {items[key]['metadata']['version']}, lock-cpu.txt has {version}"
            )
    env = report["environment"]
    stack = sorted((k for k in items if CUDA_STACK.match(k)), key=lambda k: (k != "torch", k))
    rest = sorted(k for k in items if not CUDA_STACK.match(k))

    def pin(k):
        m = items[k]["metadata"]
        return f"{m['name']}=={m['version']}"

    lock = (
        "\n".join(
            [
                "# Exact versions for the CUDA set-up (KSCALE_TARGET=cuda bash scripts/setup.sh), generated by",
                "# `.venv/bin/python tools/lock_cuda.py` with pip's resolver (--dry-run --report, metadata only) for",
                f"# {env['sys_platform']} {env['platform_machine']}, CPython {env['python_version']}. Do not edit by hand.",
                "# Install with -c constraints-cuda.txt; requirements/no-deps.txt goes on top with --no-deps",
                "# --ignore-requires-python, as on the CPU path (megatron-core declares Requires-Python >= 3.12).",
                f"# torch's CUDA build ({TORCH_CUDA_REQ}) and what its Requires-Dist pins (triton{triton[0].specifier}):",
                *[pin(k) for k in stack],
                "# everything else: the versions of lock-cpu.txt (plus what the CUDA build adds)",
                *[pin(k) for k in rest],
            ]
        )
        + "\n"
    )
    constraints = (
        "\n".join(
            [
                "# Keeps every pip call of the CUDA set-up on torch's CUDA build: `torch==2.13.0` alone would also",
                "# match a local 2.13.0+cpu wheel (PEP 440 ignores the local label), which pip prefers. Generated by",
                "# tools/lock_cuda.py together with lock-cuda.txt; pass with -c on EVERY pip call of the CUDA set-up.",
                TORCH_CUDA_REQ,
                f"triton=={triton_version}",
            ]
        )
        + "\n"
    )
    return lock, constraints, report


def check_lock(lock: Path = LOCK_CUDA) -> list[str]:
    """Problems found without a resolve: every line an exact pin, once; torch the CUDA build; every pin of
    lock-cpu.txt (triton excepted) the same; the no-deps packages' runtime needs satisfied by the lock."""
    problems = []
    pins = read_pins(lock)  # raises on a malformed or doubled line
    if pins.get("torch", (None, None))[1] != TORCH_VERSION:
        problems.append(f"torch must be pinned to {TORCH_VERSION} (no local label), found {pins.get('torch')}")
    for key, (name, version) in read_pins(LOCK_CPU).items():
        if key in NOT_FROM_CPU_LOCK:
            continue
        if pins.get(key, (None, None))[1] != version:
            problems.append(f"{name}: lock-cpu.txt has {version}, {lock.name} has {pins.get(key)}")
    for key in read_pins(NO_DEPS):
        if key in pins:
            problems.append(f"{key} is in no-deps.txt and must not be in {lock.name}")
    return problems


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true", help="compare with the files on disk instead of writing them")
    args = ap.parse_args(argv)
    lock, constraints, report = generate()
    if args.check:
        stale = [
            p.name
            for p, text in ((LOCK_CUDA, lock), (CONSTRAINTS_CUDA, constraints))
            if not p.exists() or p.read_text() != text
        ]
        if stale:
            print(f"out of date: {', '.join(stale)} (run .venv/bin/python tools/lock_cuda.py)", file=sys.stderr)
            return 1
        print("lock-cuda.txt and constraints-cuda.txt are up to date")
        return 0
    LOCK_CUDA.write_text(lock)
    CONSTRAINTS_CUDA.write_text(constraints)
    problems = check_lock()
    for p in problems:
        print("problem:", p, file=sys.stderr)
    n = sum(1 for line in lock.splitlines() if line and not line.startswith("#"))
    print(f"wrote {LOCK_CUDA.relative_to(ROOT)} ({n} pins) and {CONSTRAINTS_CUDA.relative_to(ROOT)}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
