"""Weights & Biases logging (`logging.wandb`, kronecker_scale/train/metrics.py), tested in offline mode
(no network): the offline run folder must hold every record metrics.jsonl holds and the resolved config,
and a resumed run must continue the same W&B run id (kept in the checkpoints' run state).

W&B's offline files are read back without the network or a W&B account: `run-<id>.wandb` is a LevelDB-style
log of `wandb_internal_pb2.Record` protobufs (read_wandb_file below).
"""

from __future__ import annotations

import json
import math
import os
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kronecker_scale.errors import KScaleError
from tiny_runs import kscale

pytestmark = pytest.mark.timeout(900)
WANDB_ENV = {"WANDB_SILENT": "true", "WANDB_DISABLE_CODE": "true", "OMP_NUM_THREADS": "1"}


# --- reading W&B's offline files --------------------------------------------------------------------------
def _log_records(data: bytes):
    """Payloads of a W&B transaction log: 7-byte file header (":W&B", magic 0xBEE1, version), then 32 KiB
    blocks of records, each a 7-byte header (crc32c, length, type: 1 full, 2 first, 3 middle, 4 last)."""
    ident, magic, _version = struct.unpack("<4sHB", data[:7])
    assert ident == b":W&B" and magic == 0xBEE1, (ident, magic)
    pos, block, pending = 7, 32768, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # block trailer: too short for a header
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if length == 0 and kind == 0:
            break
        payload, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind == 1:
            yield payload
        elif kind == 2:
            pending = payload
        elif kind == 3:
            pending += payload
        elif kind == 4:
            yield pending + payload
            pending = b""


def read_wandb_file(path: Path) -> dict:
    """{run_id, project, name, tags, config {key: value}, history {step: {key: value}}} of one offline run."""
    from wandb.proto import wandb_internal_pb2 as pb

    out: dict = {"config": {}, "history": {}}
    for payload in _log_records(path.read_bytes()):
        rec = pb.Record()
        rec.ParseFromString(payload)
        kind = rec.WhichOneof("record_type")
        if kind == "run":
            out.update(
                run_id=rec.run.run_id, project=rec.run.project, name=rec.run.display_name, tags=list(rec.run.tags)
            )
            out["config"].update({i.key: json.loads(i.value_json) for i in rec.run.config.update})
        elif kind == "config":
            out["config"].update({i.key: json.loads(i.value_json) for i in rec.config.update})
        elif kind == "history":
            row = {(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in rec.history.item}
            out["history"].setdefault(rec.history.step.num, {}).update(row)
    out["config"].pop("_wandb", None)
    return out


def offline_runs(run_dir: Path) -> list[dict]:
    """Every offline run under run_dir/wandb, oldest first."""
    files = sorted((Path(run_dir) / "wandb").glob("offline-run-*/run-*.wandb"))
    return [read_wandb_file(f) for f in files]


def _same(a, b) -> bool:
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return a == b or (isinstance(a, int | float) and isinstance(b, int | float) and math.isclose(a, b, rel_tol=1e-12))


def assert_records_logged(records: list[dict], history: dict[int, dict]) -> None:
    """Every key of every record (metrics.jsonl) is in W&B's history row of its step, with its value."""
    for r in records:
        row = history[r["step"]]
        for k, v in r.items():
            if k != "step":
                assert k in row and _same(row[k], v), (r["step"], k, v, row.get(k))


def _tiny_cfg(tmp_path: Path, **logging):
    from omegaconf import OmegaConf

    from kronecker_scale.config.schema import TrainConfig

    cfg = OmegaConf.structured(TrainConfig)
    cfg.run.dir, cfg.run.name, cfg.logging.tensorboard = str(tmp_path / "run"), "unit", False
    for k, v in logging.items():
        cfg.logging.wandb[k] = v
    return cfg


# --- fast -------------------------------------------------------------------------------------------------
def test_wandb_is_off_by_default_and_not_imported(tmp_path):
    """Default config: no W&B logger, wandb never imported (checked in a fresh interpreter)."""
    script = (
        "import sys\n"
        "from omegaconf import OmegaConf\n"
        "from kronecker_scale.config.schema import TrainConfig\n"
        "from kronecker_scale.train.metrics import MetricsWriter, JsonlLogger\n"
        "cfg = OmegaConf.structured(TrainConfig)\n"
        f"cfg.run.dir = {str(tmp_path / 'run')!r}; cfg.logging.tensorboard = False\n"
        "assert cfg.logging.wandb.mode == 'disabled'\n"
        "import pathlib; pathlib.Path(cfg.run.dir).mkdir()\n"
        "w = MetricsWriter.for_run(cfg, True, console=lambda *a: None)\n"
        "assert [type(x) for x in w.loggers] == [JsonlLogger] and w.wandb_run_id is None\n"
        "w.write({'step': 1, 'loss': 2.0}); w.close()\n"
        "print('wandb imported:', 'wandb' in sys.modules)\n"
    )
    r = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert "wandb imported: False" in r.stdout
    assert json.loads((tmp_path / "run" / "metrics.jsonl").read_text()) == {"step": 1, "loss": 2.0}


def test_a_bad_wandb_mode_is_refused(tmp_path):
    from kronecker_scale.train.metrics import MetricsWriter

    with pytest.raises(KScaleError, match="logging.wandb.mode='upload' is not possible"):
        MetricsWriter.for_run(_tiny_cfg(tmp_path, mode="upload"), True)


def test_every_sink_implements_the_one_logger_interface(tmp_path):
    from kronecker_scale.train.metrics import JsonlLogger, MetricsLogger, MetricsWriter, TensorBoardLogger, WandbLogger

    for cls in (JsonlLogger, TensorBoardLogger, WandbLogger):
        assert callable(cls.write) and callable(cls.close)
    seen = []

    class Memory:
        def write(self, record):
            seen.append(record)

        def close(self):
            seen.append("closed")

    assert isinstance(Memory(), MetricsLogger) and isinstance(JsonlLogger(tmp_path / "m.jsonl"), MetricsLogger)
    w = MetricsWriter(tmp_path, True, False, console=lambda *a: None, loggers=[Memory()])
    w.write({"step": 3, "loss": 1.5})
    w.close()
    assert seen == [{"step": 3, "loss": 1.5}, "closed"]
    assert [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [{"step": 3, "loss": 1.5}]


@pytest.mark.slow
def test_offline_logger_writes_records_and_config_and_resumes_the_same_run(tmp_path, monkeypatch):
    """The logger alone (no training): two writers with the same id are one W&B run in two offline folders."""
    pytest.importorskip("wandb")
    from omegaconf import OmegaConf

    from kronecker_scale.train.metrics import MetricsWriter

    for k, v in WANDB_ENV.items():
        monkeypatch.setenv(k, v)
    cfg = _tiny_cfg(tmp_path, mode="offline", project="kscale-test", tags=["unit", "offline"])
    Path(cfg.run.dir).mkdir(parents=True)
    first = MetricsWriter.for_run(cfg, True, console=lambda *a: None)
    run_id = first.wandb_run_id
    assert run_id and len(run_id) == 16
    records = [
        {"step": s, "loss": 5.0 / s, "lr": 1e-3, "grad_norm": float("nan") if s == 2 else 0.5} for s in (1, 2, 3)
    ]
    for r in records:
        first.write(r, show=False)
    first.write({"step": 3, "val_loss": 4.25}, show=False)
    first.close()
    time.sleep(1.1)  # W&B names offline folders by the second (offline-run-<time>-<id>)
    lr = cfg.optim.lr
    cfg.optim.lr = lr / 10  # changed on resume: the config follows
    second = MetricsWriter.for_run(cfg, True, console=lambda *a: None, resume_step=3, wandb_run_id=run_id)
    second.write({"step": 4, "loss": 1.0}, show=False)
    second.close()
    runs = offline_runs(Path(cfg.run.dir))
    assert [r["run_id"] for r in runs] == [run_id, run_id]
    assert runs[0]["project"] == "kscale-test" and runs[0]["name"] == "unit"
    assert runs[0]["tags"] == ["unit", "offline"]
    assert_records_logged(records + [{"step": 3, "val_loss": 4.25}], runs[0]["history"])
    assert_records_logged([{"step": 4, "loss": 1.0}], runs[1]["history"])
    resolved = OmegaConf.to_container(cfg, resolve=True)
    assert runs[1]["config"] == resolved and runs[0]["config"]["optim"]["lr"] == lr


# --- a real training run, resumed ------------------------------------------------------------------------
@pytest.mark.slow
def test_training_run_logs_to_wandb_offline_and_resume_continues_the_run(tiny_config, tmp_path):
    """`kscale train` on 2 ranks with logging.wandb.mode=offline for 4 steps, then resumed to 8: one W&B run
    id in two offline folders, written by the logging rank only, holding every metrics.jsonl record and the
    resolved config; the id is in the checkpoints' run state."""
    pytest.importorskip("wandb")
    import torch
    from omegaconf import OmegaConf

    cfg = tiny_config(
        tmp_path,
        logging={"tensorboard": False, "wandb": {"mode": "offline", "project": "kscale-test", "tags": ["tiny"]}},
        schedule={"train_steps": 4, "warmup_steps": 2},
        checkpoint={"every": 2},
        eval={"every": 2, "batches": 1},
        run={"dir": str(tmp_path / "run"), "name": "wandb-tiny"},
    )
    run_dir = tmp_path / "run"
    r = kscale("train", cfg, "parallel.nproc=2", env=WANDB_ENV)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "wandb: offline run" in r.stdout + r.stderr
    r = kscale("train", cfg, "parallel.nproc=2", "schedule.train_steps=8", env=WANDB_ENV)
    assert r.returncode == 0, r.stderr[-3000:]
    runs = offline_runs(run_dir)
    assert len(runs) == 2  # one per process run: rank 1 logged nothing
    run_id = runs[0]["run_id"]
    assert runs[1]["run_id"] == run_id and runs[0]["name"] == "wandb-tiny" and runs[0]["tags"] == ["tiny"]
    for ckpt in ("step_00000004", "step_00000008"):
        state = torch.load(run_dir / "checkpoints" / ckpt / "trainer_state.pt", weights_only=False)
        assert state["wandb_run_id"] == run_id
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert sorted({r["step"] for r in records}) == list(range(1, 9))
    assert_records_logged([r for r in records if r["step"] <= 4], runs[0]["history"])
    assert_records_logged([r for r in records if r["step"] > 4], runs[1]["history"])
    assert set(runs[0]["history"]) == {1, 2, 3, 4} and set(runs[1]["history"]) == {5, 6, 7, 8}
    assert any("val_loss" in row for row in runs[1]["history"].values())
    saved = OmegaConf.load(run_dir / "checkpoints" / "step_00000008" / "config.yaml")
    assert runs[1]["config"] == OmegaConf.to_container(saved, resolve=True)
    assert runs[1]["config"]["schedule"]["train_steps"] == 8 and runs[0]["config"]["schedule"]["train_steps"] == 4
