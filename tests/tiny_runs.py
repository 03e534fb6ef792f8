"""Plain helpers shared by the test modules (no fixtures here: those live in conftest.py and wrap these).

- `kscale(...)`: the `kscale` command in a subprocess, this interpreter, the repository first on the path.
- `real_text()`: real English prose that ships with every CPython (its LICENSE.txt), found through
  `sysconfig`, not a hard-coded interpreter path.
- `losses(run_dir)`: the training losses a run logged, by step.
- The one tiny dataset (`prepare_dataset`), the one tiny training config (`write_config`) and the one
  tiny-run factory (`trained_run`, with the shared runs `gpt2_run`, `llama_tp2_run`, `bpe_run` and
  `hf_export`): real `kscale train` runs (gloo processes, GPT-2's real vocabulary, real text), made once
  per pytest session under `shared_base(...)` and shared by every module that asks for them.

Test modules import these as `import tiny_runs` / `from tiny_runs import kscale` (pytest puts tests/ on
the path); conftest.py exposes the dataset, config and runs as fixtures (`tiny_dataset`, `tiny_config`,
`gpt2_run`, ...).
"""

from __future__ import annotations

import fcntl
import functools
import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]

# DeepSpeed's first start JIT-builds its shm_comm op (~35 s); the build is cached here between sessions
DEEPSPEED_ENV = {
    "TORCH_EXTENSIONS_DIR": os.environ.get(
        "TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "kscale" / "torch_extensions")
    )
}

# the model shapes the exporter maps: GPT-2 style (the default) and Llama style
GPT2_STYLE = {}
LLAMA_STYLE = {"position": "rope", "norm": "rmsnorm", "activation": "swiglu", "bias": False}


def kscale(*args, env=None, cwd=REPO, timeout=600) -> subprocess.CompletedProcess:
    """`python -m kronecker_scale.cli ARGS` with this interpreter (the venv's when run from it), the
    repository first on PYTHONPATH and `env` added to this process's environment; output captured as text."""
    return subprocess.run(
        [sys.executable, "-m", "kronecker_scale.cli", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=timeout,
        env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})},
    )


def python_license() -> Path:
    """CPython's LICENSE.txt: in the standard library's folder on POSIX installs (pyenv, Debian, conda,
    python.org builds; a venv points there too), next to python.exe on Windows."""
    candidates = [Path(sysconfig.get_paths()["stdlib"]) / "LICENSE.txt", Path(sys.base_prefix) / "LICENSE.txt"]
    for path in candidates:
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"CPython's LICENSE.txt (the tests' real text) is in none of {candidates}; this Python install left it out"
    )


@functools.cache
def real_text() -> str:
    return python_license().read_text(encoding="utf-8")


def losses(run_dir) -> dict[int, float]:
    """{step: loss} from a run's metrics.jsonl."""
    return {
        r["step"]: r["loss"]
        for r in map(json.loads, (Path(run_dir) / "metrics.jsonl").read_text().splitlines())
        if "loss" in r
    }


def shared_base(tmp_path_factory) -> Path:
    """One folder per pytest session for the tiny dataset and runs, shared by every test module."""
    return tmp_path_factory.getbasetemp() / "tiny-runs"


def prepare_dataset(base: Path) -> Path:
    """The tiny training set (made once under `base`): CPython's LICENSE plus up to six of Debian's licence
    texts (/usr/share/common-licenses), GPT-2 tokens in 32-token samples, prepared by two workers; its
    validation split is the first 8,000 characters of the LICENSE."""
    from kronecker_scale.data import prepare_data
    from kronecker_scale.tokenizer.assets import tokenizer_path

    base.mkdir(parents=True, exist_ok=True)
    root = base / "data"
    with open(base / ".data.lock", "w") as lock:  # one writer, also across processes
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (root / "ds" / "manifest.json").is_file():
            return root / "ds"
        (root / "in").mkdir(parents=True, exist_ok=True)
        (root / "in" / "python.txt").write_text(real_text())
        for f in sorted(Path("/usr/share/common-licenses").glob("*"))[:6]:
            if f.is_file():
                (root / "in" / f"{f.name}.txt").write_bytes(f.read_bytes())
        (root / "val.txt").write_text(real_text()[:8000])
        prepare_data(tokenizer_path("gpt2"), [root / "in"], root / "ds", 32, val_inputs=[root / "val.txt"], workers=2)
    return root / "ds"


def write_config(path: Path, dataset: Path, **sections) -> Path:
    """The tiny training config, written to `path`: a 2-layer d=32 Kronecker model (untied head, pos_dim 16)
    on `dataset`, 8 steps of 2 x 2 samples, checkpoint and eval every 4 steps, the loader cache and the run
    under path's folder. Each keyword updates that section (`model={"head": "tied"}`, `data={...}`)."""
    path = Path(path)
    cfg = {
        "model": {
            "n_layers": 2,
            "d_model": 32,
            "n_heads": 4,
            "seq_len": 32,
            "input_layer": "kronecker",
            "head": "untied",
            "pos_dim": 16,
        },
        "tokenizer": {"path": "gpt2"},
        "data": {
            "train": [{"path": str(dataset)}],
            "micro_batch_size": 2,
            "global_batch_size": 4,
            "cache_dir": str(path.parent / "cache"),
        },
        "optim": {"lr": 3e-3, "min_lr": 3e-4},
        "schedule": {"train_steps": 8, "warmup_steps": 2},
        "checkpoint": {"every": 4},
        "eval": {"every": 4, "batches": 2},
        "logging": {"tensorboard": False},
        "run": {"dir": str(path.parent / "run")},
    }
    for section, values in sections.items():
        cfg.setdefault(section, {}).update(values)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg))
    return path


def trained_run(
    base: Path, name: str, model: dict | None = None, steps: int = 20, every: int = 10, extra: list[str] = ()
) -> Path:
    """The run directory of a tiny Kronecker model trained for `steps` steps of 4 samples (checkpoints
    every `every`, all kept), trained once per session under `base`."""
    base.mkdir(parents=True, exist_ok=True)
    with open(base / ".lock", "w") as lock:  # one writer per run, also across processes
        fcntl.flock(lock, fcntl.LOCK_EX)
        run = base / name
        if (run / "checkpoints" / "latest").is_file():
            return run
        cfg = write_config(
            base / f"{name}.yaml",
            prepare_dataset(base),
            model=model or {},
            data={"micro_batch_size": 4, "global_batch_size": 4, "cache_dir": str(base / "cache" / name)},
            schedule={"train_steps": steps, "warmup_steps": 2},
            checkpoint={"every": every, "keep_last": 10},
            eval={"every": 0},
            logging={"every": every},
            run={"dir": str(run), "name": name},
        )
        r = kscale("train", cfg, *extra, env={"OMP_NUM_THREADS": "1"})
        if r.returncode != 0:
            raise RuntimeError(f"training {name} failed:\n{r.stderr[-3000:]}")
        return run


# the runs the conversion, probe and device tests share
def gpt2_run(base: Path) -> Path:
    """GPT-2-shaped Kronecker model, untied head, TP=1: 40 steps, checkpoints at 20 and 40."""
    return trained_run(base, "gpt2", GPT2_STYLE, steps=40, every=20)


def llama_tp2_run(base: Path) -> Path:
    """Llama-shaped Kronecker model with the Kronecker-tied head, trained and saved at TP=2."""
    return trained_run(
        base,
        "llama_tp2",
        {**LLAMA_STYLE, "head": "kronecker_tied"},
        steps=10,
        every=10,
        extra=["parallel.nproc=2", "parallel.tensor=2"],
    )


def bpe_run(base: Path) -> Path:
    """The BPE baseline with a tied table: 20 steps."""
    return trained_run(base, "bpe", {"input_layer": "bpe", "head": "tied"}, steps=20, every=10)


def hf_export(base: Path, run: Path) -> Path:
    """The run's latest checkpoint exported to transformers (once)."""
    from kronecker_scale.convert.to_hf import export_to_hf

    out = base / f"hf-{run.name}"
    with open(base / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (out / "config.json").is_file():
            export_to_hf(run, out)
    return out
