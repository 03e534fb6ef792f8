"""Inputs users already have: files without an extension are read when they are UTF-8 text and every file
left out is listed with its reason; --val-fraction gives a validation split whenever there are two or more
documents, with each split's documents and tokens reported; and a run that evaluates on a dataset without
validation samples stops at start saying what to do, instead of skipping evaluation without a word."""

import json
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from kronecker_scale.data import prepare_data
from kronecker_scale.errors import KScaleError
from kronecker_scale.tokenizer.assets import tokenizer_path
from tiny_runs import kscale, real_text, write_config

SNIFF = 64 * 1024
BINARY = b"MZ\x90\x00\x03\x00\x00\x00\x04"  # the start of a Windows executable: NUL at offset 3
INVALID = b"good text \xff\xfe bad bytes"  # not UTF-8 from offset 10


def _licence_folder(root: Path) -> Path:
    """A folder like /usr/share/common-licenses: text files without extensions (one longer than the sniffed
    prefix, with a two-byte character cut by the prefix's end), a binary file, a file that is not UTF-8, and a
    hidden file."""
    folder = root / "licenses"
    folder.mkdir()
    text = real_text()
    (folder / "Python").write_text(text, encoding="utf-8")
    (folder / "LICENSE-2.0").write_text(text[: len(text) // 2], encoding="utf-8")
    (folder / "Long").write_bytes(b"a" * (SNIFF - 1) + "é".encode() + text.encode())
    (folder / "setup.exe").write_bytes(BINARY)
    (folder / "Latin1").write_bytes(INVALID)
    (folder / ".gitignore").write_text("*.pyc\n")
    return folder


def test_extensionless_utf8_files_are_read_and_others_are_listed_with_their_reasons(tmp_path):
    from kronecker_scale.data.prepare import discover_inputs

    folder = _licence_folder(tmp_path)
    files, skipped = discover_inputs([folder])
    assert [f.name for f in files] == ["LICENSE-2.0", "Long", "Python"]
    reasons = {Path(s["file"]).name: s["reason"] for s in skipped}
    assert reasons["setup.exe"] == "binary (NUL byte at offset 3)"
    assert reasons["Latin1"] == "invalid UTF-8 at offset 10"
    assert reasons[".gitignore"].startswith("hidden")
    assert len(skipped) == 3

    # named on the command line: an error with the reason, or listed as skipped with --skip-bad
    with pytest.raises(KScaleError, match=r"setup.exe as text: binary \(NUL byte at offset 3\)"):
        discover_inputs([folder / "setup.exe"])
    (tmp_path / "notes.gz").write_bytes(b"\x1f\x8b\x08\x00")
    files, skipped = discover_inputs([folder / "Python", folder / "Latin1", tmp_path / "notes.gz"], skip_bad=True)
    assert [f.name for f in files] == ["Python"]
    assert [s["reason"] for s in skipped] == ["invalid UTF-8 at offset 10", skipped[1]["reason"]]
    assert skipped[1]["reason"].startswith("unsupported format (gzip-compressed")


def test_nothing_left_to_read_says_which_files_were_skipped_and_why(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "setup.exe").write_bytes(BINARY)
    (folder / "Latin1").write_bytes(INVALID)
    with pytest.raises(KScaleError) as e:
        prepare_data(tokenizer_path("gpt2"), [folder], tmp_path / "out", 16, workers=1)
    msg = str(e.value)
    assert "no input files found" in msg
    assert f"{folder / 'setup.exe'}: binary (NUL byte at offset 3)" in msg
    assert f"{folder / 'Latin1'}: invalid UTF-8 at offset 10" in msg
    assert not (tmp_path / "out").exists()


@pytest.mark.slow  # `kscale prepare-data` in a subprocess, with a tokenizer process
def test_prepare_data_reads_a_folder_of_extensionless_licences_and_lists_what_it_skipped(tmp_path):
    folder = _licence_folder(tmp_path)
    r = kscale("prepare-data", "--tokenizer", "gpt2", "--seq-len", "32", "--out", tmp_path / "ds", folder)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    m = json.loads((tmp_path / "ds" / "manifest.json").read_text())
    assert sorted(Path(s["file"]).name for s in m["sources"]) == ["LICENSE-2.0", "Long", "Python"]
    assert m["documents"] == 3 and m["splits"]["train"]["samples"] > 100
    reasons = {Path(s["file"]).name: s["reason"] for s in m["skipped_files"]}
    assert reasons["setup.exe"] == "binary (NUL byte at offset 3)"
    assert reasons["Latin1"] == "invalid UTF-8 at offset 10"
    out = " ".join(r.stdout.split())  # the console may wrap long lines
    assert f"skipped {folder / 'setup.exe'}: binary (NUL byte at offset 3)" in out
    assert f"skipped {folder / 'Latin1'}: invalid UTF-8 at offset 10" in out


# --- validation you can count on ------------------------------------------------------------------------------
def _unlucky_name(folder: Path, n: int, fraction: float) -> Path:
    """A JSON Lines path none of whose n documents the (file, index) hash sends to the val split."""
    from kronecker_scale.data.prepare import _validation_doc

    for k in range(1000):
        path = folder / f"docs-{k}.jsonl"
        if not any(_validation_doc(str(path), i, fraction) for i in range(n)):
            return path
    raise AssertionError("no name found")  # (1 - fraction) ** n of the names qualify


@pytest.mark.slow  # `kscale prepare-data` in a subprocess, with a tokenizer process
def test_five_documents_with_val_fraction_get_a_val_split_and_the_counts_are_reported(tmp_path):
    text = real_text()
    sizes = [1600, 1200, 2000, 500, 900]  # document 3 is the smallest
    path = _unlucky_name(tmp_path, len(sizes), 0.2)
    path.write_text("".join(json.dumps({"text": text[i * 100 : i * 100 + n]}) + "\n" for i, n in enumerate(sizes)))
    r = kscale(
        "prepare-data", "--tokenizer", "gpt2", "--seq-len", "16", "--out", tmp_path / "ds", path, "--val-fraction", 0.2
    )
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    m = json.loads((tmp_path / "ds" / "manifest.json").read_text())
    train, val = m["splits"]["train"], m["splits"]["val"]
    assert (train["documents"], val["documents"]) == (4, 1)
    assert val["samples"] >= 1 and val["tokens"] > 17
    assert train["tokens"] + val["tokens"] == sum(sp["tokens"] for sp in m["splits"].values())
    assert m["val_moved_document"] == {"to": "val", "file": str(path), "document": 3, "tokens": val["tokens"]}
    out = " ".join(r.stdout.split())
    assert "documents" in out and "moved document 3" in out
    rows = {
        line.split()[1]: line.split()[2:] for line in r.stdout.splitlines() if line.split()[1:2] in (["train"], ["val"])
    }
    assert rows["train"][1] == "4" and rows["val"][1] == "1"  # split | documents | samples | tokens
    assert rows["val"][5].replace(",", "") == str(val["tokens"])


@pytest.fixture(scope="module")
def no_val_dataset(tmp_path_factory) -> Path:
    """Real text in 32-token GPT-2 samples, prepared without a validation split."""
    root = tmp_path_factory.mktemp("noval")
    (root / "license.txt").write_text(real_text(), encoding="utf-8")
    prepare_data(tokenizer_path("gpt2"), [root / "license.txt"], root / "ds", 32, workers=1)
    return root / "ds"


@pytest.mark.slow  # prepares a dataset (a tokenizer process)
def test_build_loaders_refuses_evaluation_without_validation_samples(no_val_dataset, tmp_path):
    from kronecker_scale.tokenizer import load_tokenizer
    from kronecker_scale.train.inputs import build_loaders

    cfg = OmegaConf.create(
        {
            "data": {
                "train": [{"path": str(no_val_dataset), "proportion": None}],
                "val": None,
                "micro_batch_size": 2,
                "seed": 1,
                "cache_dir": str(tmp_path / "cache"),
                "cache_limit": None,
                "num_workers": 0,
            },
            "eval": {"every": 4, "batches": 2},
        }
    )
    tok = load_tokenizer(tokenizer_path("gpt2"))
    with pytest.raises(KScaleError) as e:
        build_loaders(cfg, tok, 32, 0, 1)
    msg = str(e.value)
    assert str(no_val_dataset) in msg and "0 sample(s)" in msg
    assert "--val-fraction" in msg and "--val-input" in msg and "data.val" in msg and "eval.every=0" in msg
    cfg.eval.every = 0  # without evaluation the same data trains
    train, val = build_loaders(cfg, tok, 32, 0, 1)
    assert val is None and next(iter(train))["tokens"].shape == (2, 32)


@pytest.mark.slow  # a real `kscale train` (a gloo rank)
def test_training_with_eval_on_data_without_validation_stops_at_start(no_val_dataset, tmp_path):
    cfg = write_config(tmp_path / "config.yaml", no_val_dataset)  # eval.every 4, data.val not set
    r = kscale("train", cfg, env={"OMP_NUM_THREADS": "1"})
    assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-3000:]
    err = " ".join((r.stdout + r.stderr).split())
    assert "val split, which has 0 sample(s)" in err and str(no_val_dataset) in err
    assert "--val-fraction" in err and "eval.every=0" in err
    assert "Traceback" not in err
    assert not (tmp_path / "run" / "checkpoints").exists() or not any((tmp_path / "run" / "checkpoints").iterdir())
    assert (
        not (tmp_path / "run" / "metrics.jsonl").exists()
        or "loss" not in (tmp_path / "run" / "metrics.jsonl").read_text()
    )
