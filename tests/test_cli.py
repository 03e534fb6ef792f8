"""The `kscale` command: real subprocesses, exit codes and messages."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def kscale(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "kronecker_scale.cli", *args], capture_output=True, text=True,
                          cwd=cwd or REPO, env={**os.environ, "PYTHONPATH": str(REPO)})


def test_params_prints_the_paper_figures():
    r = kscale("params")
    assert r.returncode == 0, r.stderr
    assert "38,597,376" in r.stdout and "3,145,728" in r.stdout and "91.85%" in r.stdout and "93.75%" in r.stdout


def test_byte_table_saves_and_reports(tmp_path):
    out = tmp_path / "bt.safetensors"
    r = kscale("byte-table", "gpt2", "--pos-dim", "16", "--pad-to", "128", "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert "50,257" in r.stdout and out.exists()
    from kronecker_scale.embedding import ByteTable
    t = ByteTable.load(out)
    assert t.vocab_size == 50304 and t.num_token_ids == 50257


@pytest.mark.parametrize("args,needle", [
    (["byte-table", "/nonexistent/tokenizer.json"], "/nonexistent/tokenizer.json"),
    (["byte-table", "gpt2", "--pos-dim", "0"], "pos_dim must be an integer in 1..255"),
])
def test_bad_input_exits_non_zero_with_a_message(args, needle):
    r = kscale(*args)
    assert r.returncode == 2 and needle in r.stderr and "Traceback" not in r.stderr


def test_pyproject_lists_every_subpackage():
    import tomllib
    listed = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    pkg = REPO / "kronecker_scale"
    found = {".".join(("kronecker_scale", *p.parent.relative_to(pkg).parts)) for p in pkg.rglob("__init__.py")}
    found |= {"kronecker_scale"} if (pkg / "__init__.py").exists() else set()
    assert found | {"kronecker_scale.kernels"} == listed
