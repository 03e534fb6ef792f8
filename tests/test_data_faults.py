"""Data faults get a clear error (what, where, what to do; `kscale` exits 2) and damage nothing:
a damaged shard is named with its dataset before anything reads it, --eod-id must be a real token,
--overwrite replaces only what prepare-data wrote, and --out naming a file is refused."""

import json
import shutil
from pathlib import Path

import pytest

from kronecker_scale.data import build_loader, prepare_data, read_manifest
from kronecker_scale.data.integrity import verify_shards
from kronecker_scale.errors import KScaleError
from kronecker_scale.tokenizer.assets import tokenizer_path
from tiny_runs import kscale, real_text

SEQ = 32


@pytest.fixture(scope="module")
def text_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("text") / "license.txt"
    path.write_text(real_text(), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, text_file) -> Path:
    """GPT-2 tokens of real text in shards of 16 KB (so the train split has several), one tokenizer process."""
    out = tmp_path_factory.mktemp("prepared") / "ds"
    prepare_data(tokenizer_path("gpt2"), [text_file], out, SEQ, workers=1, shard_size="16kb")
    return out


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.slow  # prepares a dataset (a tokenizer process)
def test_a_flipped_byte_in_a_shard_is_named_with_its_dataset_before_anything_reads_it(dataset, tmp_path):
    shards = sorted(p.name for p in (dataset / "train").glob("shard.*"))
    assert len(shards) >= 2
    damaged = tmp_path / "damaged"
    shutil.copytree(dataset, damaged)
    shard = damaged / "train" / shards[0]
    raw = bytearray(shard.read_bytes())
    raw[len(raw) // 2] ^= 0x01  # one bit, in the middle of the zstd data
    shard.write_bytes(bytes(raw))
    with pytest.raises(KScaleError) as e:
        build_loader([str(damaged)], "train", micro_batch_size=2, dp_rank=0, dp_size=1, cache_dir=tmp_path / "cache")
    msg = str(e.value)
    assert shards[0] in msg and str(damaged) in msg and "damaged" in msg and "fix:" in msg
    assert not [p for p in (tmp_path / "cache").iterdir() if p.is_dir()]  # no copy, not even half of one
    assert shard.read_bytes() == bytes(raw)  # the evidence is left as it was

    # what the check stands on: every file of each split, its size and SHA-256, in the manifest
    manifest = read_manifest(dataset)
    assert {r["file"] for r in manifest["splits"]["train"]["files"]} == {"index.json", *shards}
    assert verify_shards(manifest, dataset) == {"train": True, "val": True}

    # a dataset prepared before shard hashes (no "files" in its manifest) still loads, without a word
    legacy = tmp_path / "legacy"
    shutil.copytree(dataset, legacy)
    old = json.loads((legacy / "manifest.json").read_text())
    for split in old["splits"].values():
        del split["files"]
    (legacy / "manifest.json").write_text(json.dumps(old, indent=2))
    loader = build_loader(
        [str(legacy)], "train", micro_batch_size=2, dp_rank=0, dp_size=1, shuffle=False, cache_dir=tmp_path / "cache"
    )
    assert next(iter(loader))["tokens"].shape == (2, SEQ)


@pytest.mark.parametrize("eod", [50300, 1_000_000], ids=["padding-range", "past-the-vocabulary"])
def test_eod_id_outside_the_tokenizers_ids_is_refused_naming_id_and_range(text_file, tmp_path, eod):
    # GPT-2 has ids 0..50256; 50300 is in a model's padded table (50304 rows), 1,000,000 in none
    with pytest.raises(KScaleError) as e:
        prepare_data(tokenizer_path("gpt2"), [text_file], tmp_path / "out", SEQ, workers=1, eod_id=eod)
    msg = str(e.value)
    assert f"--eod-id {eod}" in msg and "0..50256" in msg and "fix:" in msg
    assert list(tmp_path.iterdir()) == []  # nothing written, not even a temporary folder
    if eod == 50300:  # the command: the same message, exit 2
        r = kscale(
            "prepare-data",
            text_file,
            "--tokenizer",
            "gpt2",
            "--seq-len",
            SEQ,
            "--eod-id",
            eod,
            "--out",
            tmp_path / "out",
        )
        assert r.returncode == 2 and "--eod-id 50300" in r.stderr and "0..50256" in r.stderr, r.stderr
        assert "Traceback" not in r.stderr and list(tmp_path.iterdir()) == []


@pytest.mark.slow  # prepares a dataset again through `kscale prepare-data` (a tokenizer process)
def test_overwrite_replaces_only_the_datasets_own_files_and_keeps_the_rest(dataset, text_file, tmp_path):
    out = tmp_path / "ds"
    shutil.copytree(dataset, out)
    (out / "NOTES.md").write_text("how this dataset was made\n")
    (out / "train" / "README").write_text("a note inside a split folder\n")
    (out / "extra").mkdir()
    (out / "extra" / "val_text_stats.json").write_text('{"tokens": 1}\n')
    foreign = {k: v for k, v in _files(out).items() if k in ("NOTES.md", "train/README", "extra/val_text_stats.json")}
    old_shards = {p.name for p in (out / "train").glob("shard.*")}

    r = kscale(
        "prepare-data", text_file, "--tokenizer", "gpt2", "--seq-len", 16, "--workers", 1, "--out", out, "--overwrite"
    )
    assert r.returncode == 0, r.stderr
    after = _files(out)
    assert all(after.get(k) == v for k, v in foreign.items())  # every foreign file, unchanged
    assert "kept 3 other file(s)" in r.stdout
    m = read_manifest(out)
    assert m["seq_len"] == 16 and verify_shards(m, out) == {"train": True, "val": True}
    new_shards = {p.name for p in (out / "train").glob("shard.*")}
    assert new_shards == {f["file"] for f in m["splits"]["train"]["files"]} - {"index.json"}
    assert len(new_shards) < len(old_shards)  # the old dataset's shards are gone
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]  # no temporary or old folder left


def test_overwrite_refuses_folders_that_hold_no_dataset_of_ours(text_file, tmp_path):
    other = tmp_path / "webapp"  # someone else's manifest.json
    other.mkdir()
    (other / "manifest.json").write_text('{"name": "my app", "icons": []}')
    (other / "index.html").write_text("<html></html>")
    plain = tmp_path / "plain"  # files and no manifest at all
    plain.mkdir()
    (plain / "data.txt").write_text("keep me")
    before = {d: _files(d) for d in (other, plain)}
    for folder, needle in ((other, "not a kscale dataset"), (plain, "not empty and is not a dataset")):
        with pytest.raises(KScaleError) as e:
            prepare_data(tokenizer_path("gpt2"), [text_file], folder, SEQ, workers=1, overwrite=True)
        assert needle in str(e.value) and str(folder) in str(e.value) and "fix:" in str(e.value)
        assert _files(folder) == before[folder]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plain", "webapp"]


def test_out_naming_an_existing_file_is_a_clear_error(text_file, tmp_path):
    target = tmp_path / "dataset"
    target.write_text("not a folder\n")
    r = kscale("prepare-data", text_file, "--tokenizer", "gpt2", "--seq-len", SEQ, "--out", target)
    assert r.returncode == 2, r.stderr
    assert "--out is a file, not a folder" in r.stderr and str(target) in r.stderr and "fix:" in r.stderr
    assert "Traceback" not in r.stderr
    with pytest.raises(KScaleError, match="which is a file, not a folder"):  # a file as a parent folder
        prepare_data(tokenizer_path("gpt2"), [text_file], target / "sub", SEQ, workers=1)
    assert target.read_text() == "not a folder\n" and sorted(p.name for p in tmp_path.iterdir()) == ["dataset"]
