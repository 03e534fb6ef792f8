"""Quiet by default (kronecker_scale/quiet.py): the known megatron-core / DeepSpeed / torch notices are
hidden and counted, everything else is shown, and --verbose / KSCALE_VERBOSE=1 shows them all."""

import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from kronecker_scale import quiet

REPO = Path(__file__).resolve().parents[1]

# what the libraries print, verbatim from a 2-rank CPU run of each engine (resume and checkpoint included)
SAMPLES = {
    "Apex/TE absent: torch optimizers": "Transformer Engine and Apex are not installed. Falling back to Torch optimizers.",
    "Apex/TE absent: local multi-tensor ops": "Transformer Engine and Apex are not installed. Falling back to local implementations of "
    "multi_tensor_applier, multi_tensor_l2norm, and multi_tensor_scale",
    "Apex absent: torch norm": "Apex is not installed. Falling back to Torch Norm",
    "cuda-graph 'full scope' deprecation": "full scope is deprecated. Use empty cuda_graph_modules to capture the whole layer.",
    "MimoModelConfig experimental": "MimoModelConfig is experimental and still under active development. The API "
    "may change without notice in future releases.",
    "MCore async save deprecation": "MCore's async save is deprecated and will be removed in the future releases. "
    "Please, use NVRx async solution by setting `async_strategy` to `nvrx`.",
    "ShardedTensor deprecation": "Please use DTensor instead and we are deprecating ShardedTensor.",
    "DCP load argument order": "The argument order of load has been changed. Please check the document to avoid future breakages.",
    "DCP single-process load": "torch.distributed is disabled, unavailable or uninitialized, assuming the intent "
    "is to load in a single process.",
    "all_gather_into_tensor deprecation": "`torch.distributed.all_gather_into_tensor` is deprecated. Please use "
    "`torch.distributed.all_gather_single` instead.",
    "DeepSpeed CPU accelerator": "Setting accelerator to CPU. If you have GPU or other accelerator, we were unable "
    "to detect it.",
    "DeepSpeed shm comm op built": "DeepSpeed deepspeed.ops.comm.deepspeed_shm_comm_op built successfully",
}


def test_every_known_notice_matches_what_its_library_prints_and_nothing_else():
    assert sorted(SAMPLES) == sorted(n.label for n in quiet.KNOWN)
    for label, text in SAMPLES.items():
        n = quiet.match(text)
        assert n is not None and n.label == label, (label, n)
        assert n.library in ("megatron-core", "deepspeed", "torch") and n.channel in ("warnings", "logging", "print")
        assert (n.logger is not None) == (n.channel == "logging")
    for text in [
        "Transformer Engine is not installed",
        "Falling back to Torch Norm",
        "loss is NaN at step 3",
        "DeepSpeed ZeRO stage 2 built successfully but slowly",
        "",
    ]:
        assert quiet.match(text) is None, text


def test_the_stdout_wrapper_drops_only_exact_known_lines_and_buffers_nothing():
    before = quiet.hidden().get("DeepSpeed shm comm op built", 0)
    out = io.StringIO()
    w = quiet._QuietStream(out)
    print("DeepSpeed deepspeed.ops.comm.deepspeed_shm_comm_op built successfully", file=w)
    w.write("step 1 loss 10.8")  # a partial line goes through at once
    assert out.getvalue() == "step 1 loss 10.8"
    w.write("\n")
    print("DeepSpeed x built successfully, and more", file=w)
    print("", file=w)
    assert out.getvalue() == "step 1 loss 10.8\nDeepSpeed x built successfully, and more\n\n"
    assert quiet.hidden()["DeepSpeed shm comm op built"] == before + 1


def test_summary_line():
    saved = quiet.hidden()
    try:
        quiet._counts.clear()
        assert quiet.summary() is None
        quiet._counts.update({"Apex absent: torch norm": 2, "DeepSpeed CPU accelerator": 1})
        assert quiet.summary() == (
            "quiet: 3 known library notices hidden (Apex absent: torch norm x2, "
            "DeepSpeed CPU accelerator x1); --verbose shows them"
        )
    finally:
        quiet._counts.clear()
        quiet._counts.update(saved)


# a fresh process: megatron.core and deepspeed emit their import-time notices for real; the ones only a
# checkpoint save or a DeepSpeed gloo engine emits are sent through the same channel their library uses
SCRIPT = r"""
import json, logging, sys, warnings
from kronecker_scale import quiet
quiet.install(sys.argv[1] == "verbose")
import megatron.core
from megatron.core.optimizer import get_megatron_optimizer
from megatron.core.models.gpt import gpt_layer_specs
import deepspeed
from deepspeed.accelerator import get_accelerator
get_accelerator()
print("DeepSpeed deepspeed.ops.comm.deepspeed_shm_comm_op built successfully")               # DeepSpeed: print
logging.getLogger("megatron.core.dist_checkpointing.strategies.torch").warning(
    "MCore's async save is deprecated and will be removed in the future releases.")        # megatron: logging
warnings.warn("kscale-test: an unknown warning")
logging.getLogger("DeepSpeed").warning("kscale-test: an unknown DeepSpeed log line")
logging.getLogger("megatron.core.whatever").warning("kscale-test: an unknown megatron log line")
print("kscale-test: an ordinary line")
print("HIDDEN " + json.dumps(quiet.hidden()))
print("SUMMARY " + str(quiet.summary()))
"""
EMITTED = [
    "Apex/TE absent: torch optimizers",
    "Apex/TE absent: local multi-tensor ops",
    "Apex absent: torch norm",
    "DeepSpeed CPU accelerator",
    "DeepSpeed shm comm op built",
    "MCore async save deprecation",
]
UNKNOWN = [
    "kscale-test: an unknown warning",
    "kscale-test: an unknown DeepSpeed log line",
    "kscale-test: an unknown megatron log line",
    "kscale-test: an ordinary line",
]


@pytest.fixture(scope="module")
def outputs():
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    env.pop("KSCALE_VERBOSE", None)
    procs = {
        mode: subprocess.Popen(
            [sys.executable, "-c", SCRIPT, mode],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            cwd=REPO,
            env=env,
        )
        for mode in ("quiet", "verbose")
    }
    out = {mode: p.communicate(timeout=600)[0] for mode, p in procs.items()}
    for mode, p in procs.items():
        assert p.returncode == 0, out[mode]
    return out


def _known_in(text: str) -> set[str]:
    return {n.label for n in quiet.KNOWN for line in text.splitlines() if n.matches(line.split("] ")[-1])}


@pytest.mark.slow
def test_quiet_hides_the_known_notices_and_shows_everything_else(outputs):
    out = outputs["quiet"]
    assert _known_in(out) == set(), out
    for line in UNKNOWN:
        assert line in out, out
    hidden = json.loads(re.search(r"^HIDDEN (.*)$", out, re.M).group(1))
    assert set(EMITTED) <= set(hidden) and all(k >= 1 for k in hidden.values())
    assert hidden["Apex/TE absent: local multi-tensor ops"] == 3  # optimizer, clip_grads, megatron_fsdp
    summary = re.search(r"^SUMMARY (.*)$", out, re.M).group(1)
    assert summary.startswith(f"quiet: {sum(hidden.values())} known library notices hidden (")
    assert summary.endswith("; --verbose shows them") and "Apex absent: torch norm x" in summary


@pytest.mark.slow
def test_verbose_shows_them_all(outputs):
    out = outputs["verbose"]
    assert set(EMITTED) <= _known_in(out), out
    for line in UNKNOWN:
        assert line in out
    assert "HIDDEN {}" in out and "SUMMARY None" in out


def test_cli_verbose_flag_before_or_after_the_subcommand(monkeypatch, capsys):
    from kronecker_scale import cli

    for argv in (
        ["--verbose", "params", "--vocab", "1000", "--d-model", "64"],
        ["params", "--vocab", "1000", "--d-model", "64", "--verbose"],
    ):
        monkeypatch.delenv("KSCALE_VERBOSE", raising=False)
        assert cli.main(argv) == 0
        assert os.environ["KSCALE_VERBOSE"] == "1"  # inherited by rank processes
    assert "1,000" in capsys.readouterr().out
