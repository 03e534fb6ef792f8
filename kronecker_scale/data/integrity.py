"""Shard integrity of prepared datasets: every file prepare-data writes into a split (index.json and the MDS
shards) is recorded in manifest.json with its size and SHA-256, and checked before anything reads the shards.

A flipped byte in a zstd shard otherwise goes unnoticed (zstd frames carry no checksum: the run trains on
wrong tokens) or ends in a long traceback from a decompressing thread. The loader calls `verify_split` once
per node-cache copy, just before it reads the original shards to write that copy (loader._write_copy); every
later start on the node reads the copy and hashes nothing.

Datasets prepared before the hashes existed (no "files" in the manifest's split) are read as before, without a
check and without a word.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from ..errors import KScaleError

MANIFEST = "manifest.json"  # the same name as prepare.MANIFEST (prepare imports this module)
INDEX = "index.json"


def sha256_file(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def split_files(split_dir: Path) -> list[str]:
    """The names of the files an MDS split folder consists of: index.json, then every shard its index lists
    (the compressed file where the shard is compressed)."""
    split_dir = Path(split_dir)
    index = json.loads((split_dir / INDEX).read_text())
    names = [INDEX]
    for shard in index["shards"]:
        zipped = shard.get("zip_data")
        names.append(zipped["basename"] if zipped and shard.get("compression") else shard["raw_data"]["basename"])
    return names


def file_records(split_dir: Path) -> list[dict]:
    """[{"file", "bytes", "sha256"}] of every file of the split, for the manifest."""
    split_dir = Path(split_dir)
    return [
        {"file": name, "bytes": (split_dir / name).stat().st_size, "sha256": sha256_file(split_dir / name)}
        for name in split_files(split_dir)
    ]


def verify_split(split_dir: Path, manifest: dict | None = None) -> bool:
    """Check every file of one split (`<dataset>/<split>`) against the sizes and SHA-256 the manifest holds.

    Returns True when checked, False for a dataset prepared without hashes (nothing to check). A missing,
    resized or changed file raises KScaleError naming the file and the dataset."""
    split_dir = Path(split_dir)
    dataset, split = split_dir.parent, split_dir.name
    if manifest is None:
        try:
            manifest = json.loads((dataset / MANIFEST).read_text())
        except (OSError, ValueError) as e:
            raise KScaleError(
                f"cannot read the dataset's manifest ({e})",
                where=str(dataset / MANIFEST),
                fix="prepare the dataset again with `kscale prepare-data`",
            ) from None
    records = (manifest.get("splits") or {}).get(split, {}).get("files")
    if records is None:
        return False  # prepared before shard hashes: read as before
    fix = (
        "the file changed after prepare-data wrote it (a disk, copy or sync fault, or an edit): copy the "
        "dataset again from a good copy, or prepare it again with `kscale prepare-data ... --overwrite`"
    )
    for rec in records:
        path = split_dir / rec["file"]
        where = f"{path} (dataset {dataset}, split {split!r})"
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            raise KScaleError(f"a file of the dataset is missing: {rec['file']}", where=where, fix=fix) from None
        except OSError as e:
            raise KScaleError(f"cannot read {rec['file']} ({e.strerror})", where=where) from None
        if size != rec["bytes"]:
            raise KScaleError(
                f"{rec['file']} has {size:,} bytes; prepare-data wrote {rec['bytes']:,}", where=where, fix=fix
            )
        try:
            digest = sha256_file(path)
        except OSError as e:
            raise KScaleError(f"cannot read {rec['file']} ({e.strerror})", where=where) from None
        if digest != rec["sha256"]:
            raise KScaleError(
                f"{rec['file']} is damaged: its SHA-256 is {digest[:16]}..., prepare-data wrote "
                f"{rec['sha256'][:16]}...",
                where=where,
                fix=fix,
            )
    return True


def verify_shards(manifest: dict, dataset_dir: Path, splits=None) -> dict[str, bool]:
    """`verify_split` for each split of a dataset (all of the manifest's when `splits` is None):
    {split: checked}."""
    names = list(manifest.get("splits", {})) if splits is None else list(splits)
    return {name: verify_split(Path(dataset_dir) / name, manifest) for name in names}
