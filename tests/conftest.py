"""Shared test set-up: the process environment, and the fixtures every module may ask for.

Fixtures (never imported by test modules; pytest hands them over by name):
- `tiny_dataset` (session): the prepared tiny training set (tiny_runs.prepare_dataset).
- `tiny_config` (session): a factory, `tiny_config(directory, **sections)` -> the tiny training config
  written to directory/config.yaml (loader cache and run under `directory`), each keyword updating one
  section (tiny_runs.write_config).
- `tiny_runs_base` (session): the session's folder of shared tiny runs; `gpt2_run`, `llama_tp2_run`,
  `bpe_run` (session): their run directories, trained on first use; `gpt2_hf`: gpt2_run exported to
  transformers.
Plain helpers (the `kscale` subprocess helper, `real_text`, `losses`, ...) live in tests/tiny_runs.py.

Multi-process tests (torch.multiprocessing ranks, `kscale train` / `launch`, Slurm, DeepSpeed; so every test
that uses the fixtures above) and tests over ~5 s are marked `slow`: `pytest -m "not slow"` is the fast
tier, scripts/test.sh (the README's command) runs everything.
"""

import os

# Multi-process tests on 2 cores stall with several OpenMP threads per process (two threads per process).
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

import tiny_runs  # noqa: E402  (tests/ is on the path: pytest's rootdir-relative conftest import)

# Without a GPU the Triton kernels run in Triton's interpreter, which must be chosen before the kernels
# are defined. On a GPU machine the same tests run the compiled kernels; a machine whose GPU torch
# cannot use (a broken driver, a CPU build of torch) stops here instead of passing in the interpreter,
# unless KSCALE_TESTS_ALLOW_CPU=1 says that is intended.
HAS_CUDA = torch.cuda.is_available()


def _gpu_listed() -> bool:
    import shutil
    import subprocess

    if shutil.which("nvidia-smi") is None:
        return False
    out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=60)
    return out.returncode == 0 and "GPU" in out.stdout


if not HAS_CUDA and os.environ.get("KSCALE_TESTS_ALLOW_CPU") != "1" and _gpu_listed():
    from kronecker_scale.distributed import cuda_problem

    pytest.exit(
        f"nvidia-smi lists a GPU but torch cannot use it: {cuda_problem()}. Fix the CUDA set-up "
        f"(docs/setup.md), or set KSCALE_TESTS_ALLOW_CPU=1 to run the tests on the CPU.",
        returncode=2,
    )
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)


def random_bytes_and_lengths(n_per_length: int, pos_dim: int, *, generator=None):
    """Tokens of every length 0..pos_dim (n_per_length each), random bytes; bytes past L are 0."""
    lengths = torch.arange(pos_dim + 1).repeat_interleave(n_per_length)
    table = torch.randint(0, 256, (len(lengths), pos_dim), dtype=torch.uint8, generator=generator)
    table[torch.arange(pos_dim)[None, :] >= lengths[:, None]] = 0
    return table, lengths.to(torch.int16)


# --- the tiny dataset, config and runs ---------------------------------------------------------------
@pytest.fixture(scope="session")
def tiny_runs_base(tmp_path_factory):
    return tiny_runs.shared_base(tmp_path_factory)


@pytest.fixture(scope="session")
def tiny_dataset(tiny_runs_base):
    return tiny_runs.prepare_dataset(tiny_runs_base)


@pytest.fixture(scope="session")
def tiny_config(tiny_dataset):
    def make(directory, **sections):
        return tiny_runs.write_config(directory / "config.yaml", tiny_dataset, **sections)

    return make


@pytest.fixture(scope="session")
def gpt2_run(tiny_runs_base):
    return tiny_runs.gpt2_run(tiny_runs_base)


@pytest.fixture(scope="session")
def llama_tp2_run(tiny_runs_base):
    return tiny_runs.llama_tp2_run(tiny_runs_base)


@pytest.fixture(scope="session")
def bpe_run(tiny_runs_base):
    return tiny_runs.bpe_run(tiny_runs_base)


@pytest.fixture(scope="session")
def gpt2_hf(tiny_runs_base, gpt2_run):
    return tiny_runs.hf_export(tiny_runs_base, gpt2_run)
