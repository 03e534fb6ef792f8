"""The install targets of scripts/setup.sh and the CUDA lock (requirements/lock-cuda.txt).

The lock tests ask pip's own resolver (`pip install --dry-run --report`, metadata only: nothing is installed
and no multi-GB wheel is downloaded) what torch 2.13.0's CUDA build declares, and whether the lock is one
consistent, complete set. They need PyPI (reachable in CI) but no GPU.
"""

import importlib.util
import os
import subprocess
import time
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("lock_cuda", ROOT / "tools" / "lock_cuda.py")
lock_cuda = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(lock_cuda)
canon = lock_cuda.canon


def pins(*files) -> dict[str, str]:
    out = {}
    for f in files:
        out.update({k: v for k, (_, v) in lock_cuda.read_pins(f).items()})
    return out


def cuda_pins() -> dict[str, str]:
    return pins(lock_cuda.LOCK_CUDA, lock_cuda.NO_DEPS)


def test_setup_rejects_an_unknown_target():
    t0 = time.monotonic()
    proc = subprocess.run(
        ["bash", "scripts/setup.sh"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        env=dict(os.environ, KSCALE_TARGET="bogus"),
    )
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "KSCALE_TARGET=bogus" in proc.stderr and "cpu, cuda, ngc" in proc.stderr
    assert proc.stdout == ""  # nothing created, nothing installed
    assert time.monotonic() - t0 < 10


def test_gpu_acceptance_needs_a_gpu():
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: scripts/gpu-acceptance.sh would run for minutes")
    t0 = time.monotonic()
    proc = subprocess.run(["bash", "scripts/gpu-acceptance.sh"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "needs a CUDA GPU" in proc.stderr
    assert time.monotonic() - t0 < 60


def test_cuda_lock_is_exact_and_follows_the_cpu_lock():
    """Every line one exact pin, each package once, torch the CUDA build, every lock-cpu.txt pin kept
    (triton excepted), the --no-deps packages left out; constraints-cuda.txt guards torch and triton."""
    assert lock_cuda.check_lock() == []
    lock = pins(lock_cuda.LOCK_CUDA)
    assert all("+" not in v for v in lock.values())  # no local (e.g. +cpu) build
    constraints = [
        line for line in lock_cuda.CONSTRAINTS_CUDA.read_text().splitlines() if line and not line.startswith("#")
    ]
    assert constraints == [lock_cuda.TORCH_CUDA_REQ, f"triton=={lock['triton']}"]


def test_project_ranges_admit_both_locks():
    """pyproject.toml holds ranges; each lock (with its --no-deps packages and torch) must satisfy them all."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = [Requirement(r) for r in project["dependencies"]]
    reqs += [Requirement(r) for extra in project.get("optional-dependencies", {}).values() for r in extra]
    cpu = pins(lock_cuda.LOCK_CPU, lock_cuda.NO_DEPS)
    cpu["torch"] = pins(ROOT / "requirements" / "constraints-cpu.txt")["torch"]
    for name, lock in (("lock-cpu.txt", cpu), ("lock-cuda.txt", cuda_pins())):
        for r in reqs:
            assert canon(r.name) in lock, f"{r.name} (pyproject.toml) is not in {name}"
            assert r.specifier.contains(Version(lock[canon(r.name)]), prereleases=True), (
                f"pyproject.toml asks {r}, {name} pins {lock[canon(r.name)]}"
            )
        assert all("==" not in str(r.specifier) for r in reqs), "exact pins live in the lock files only"


@pytest.mark.slow
def test_cuda_lock_agrees_with_torchs_declared_requirements():
    """torch 2.13.0's CUDA wheel, resolved from metadata: its Requires-Dist (triton's pin above all, and
    the nvidia-*/cuda-* packages) must hold for the pins of lock-cuda.txt."""
    report, requirements = lock_cuda.torch_requirements()
    torch = lock_cuda.installed(report)["torch"]
    assert "+cpu" not in torch["download_info"]["url"]
    lock = cuda_pins()
    names = {canon(r.name) for r in requirements}
    assert "triton" in names and any(n.startswith("nvidia-") for n in names)
    triton = next(r for r in requirements if canon(r.name) == "triton")
    assert str(triton.specifier) == f"=={lock['triton']}", f"torch pins {triton}, lock-cuda.txt has {lock['triton']}"
    for r in requirements:
        assert canon(r.name) in lock, f"torch requires {r}, which lock-cuda.txt lacks"
        assert r.specifier.contains(Version(lock[canon(r.name)]), prereleases=True), (
            f"torch requires {r}, lock-cuda.txt pins {lock[canon(r.name)]}"
        )


@pytest.mark.slow
def test_resolver_accepts_the_cuda_lock_as_setup_installs_it():
    """The same pip call as `KSCALE_TARGET=cuda scripts/setup.sh` (lock + constraints), as a dry run: it must
    succeed and install exactly the lock, nothing more (complete) and nothing else (consistent); the
    --no-deps packages' own runtime requirements (megatron-core: torch, numpy, packaging) must hold too."""
    report = lock_cuda.resolve(["-r " + str(lock_cuda.LOCK_CUDA)], [lock_cuda.CONSTRAINTS_CUDA])
    got = {k: i["metadata"]["version"] for k, i in lock_cuda.installed(report).items()}
    lock = pins(lock_cuda.LOCK_CUDA)
    assert got == lock
    no_deps = lock_cuda.resolve(["-r " + str(lock_cuda.NO_DEPS)], no_deps=True, ignore_requires_python=True)
    megatron = lock_cuda.installed(no_deps)["megatron-core"]["metadata"]
    for r in lock_cuda.applicable_requirements(megatron, no_deps["environment"]):
        assert r.specifier.contains(Version(lock[canon(r.name)]), prereleases=True), f"megatron-core requires {r}"
