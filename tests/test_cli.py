"""The `kscale` command: real subprocesses, exit codes and messages."""

import pytest

from tiny_runs import REPO, kscale


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


@pytest.mark.parametrize(
    "args,needle",
    [
        (["byte-table", "/nonexistent/tokenizer.json"], "/nonexistent/tokenizer.json"),
        (["byte-table", "gpt2", "--pos-dim", "0"], "pos_dim must be an integer in 1..255"),
    ],
)
def test_bad_input_exits_non_zero_with_a_message(args, needle):
    r = kscale(*args)
    assert r.returncode == 2 and needle in r.stderr and "Traceback" not in r.stderr


def test_pyproject_installs_every_subpackage(monkeypatch):
    """What setuptools installs from pyproject.toml's package-dir (automatic discovery) holds every folder
    with an __init__.py under each mapped folder, under its installed name."""
    import tomllib
    import warnings

    from setuptools.config.pyprojecttoml import apply_configuration
    from setuptools.dist import Distribution

    monkeypatch.chdir(REPO)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # setuptools' deprecation notices about other keys
        dist = apply_configuration(Distribution(), REPO / "pyproject.toml")
        dist.set_defaults()
    mapped = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    found = {
        ".".join((name, *p.parent.relative_to(REPO / folder).parts))
        for name, folder in mapped.items()
        for p in (REPO / folder).rglob("__init__.py")
    }
    assert {"kronecker_scale", "kronecker_scale.kernels", "kronecker_scale.train", "kronecker_scale.inference"} <= found
    assert found <= set(dist.packages), found - set(dist.packages)
