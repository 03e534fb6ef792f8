"""Loaders over prepared MDS datasets: explicit data-parallel rank, deterministic, resumable.

`build_loader` returns a `TokenLoader`: an iterator of batches {"tokens": int64 [B, T], "labels":
int64 [B, T]} (inputs and next-token targets from one seq_len + 1 sample) whose `state_dict()` goes
into every checkpoint and whose `load_state_dict()` makes a resumed run continue with exactly the next
sample. TP ranks and PP stages of one replica pass the same dp_rank and get the same batches.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import KScaleError
from .prepare import read_manifest
from .streaming_adapter import data_parallel_world, import_streaming, process_local_construction


@dataclass(frozen=True)
class DataSource:
    path: str
    proportion: float | None = None        # mixing weight; None = every sample once per epoch


def check_manifest(manifest: dict, *, tokenizer_fingerprint: str | None = None, vocab_size: int | None = None,
                   seq_len: int | None = None, where: str = "") -> None:
    """The dataset must match the model: same tokenizer, ids below its vocabulary, same seq_len."""
    if tokenizer_fingerprint and manifest["tokenizer_fingerprint"] != tokenizer_fingerprint:
        raise KScaleError(
            f"dataset was tokenized with another tokenizer: dataset {manifest['tokenizer_fingerprint'][:16]}, "
            f"model {tokenizer_fingerprint[:16]}", where=where,
            fix="prepare the data with the model's tokenizer (or train with the tokenizer the data was made with)")
    if vocab_size is not None and manifest["vocab_size"] > vocab_size:
        raise KScaleError(f"dataset vocabulary ({manifest['vocab_size']}) is larger than the model's ({vocab_size})",
                          where=where)
    if seq_len is not None and manifest["seq_len"] != seq_len:
        raise KScaleError(f"dataset seq_len is {manifest['seq_len']}, the model's is {seq_len}", where=where,
                          fix="prepare the data with --seq-len equal to model.seq_len")


def _token_dataset_class():
    streaming = import_streaming()

    class TokenDataset(streaming.StreamingDataset):
        def __getitem__(self, index):               # used for every sample the loader yields
            sample = super().__getitem__(index)["tokens"].astype(np.int64)
            return torch.from_numpy(sample)
    return TokenDataset


def _collate(samples: list[torch.Tensor]) -> dict:
    x = torch.stack(samples)
    return {"tokens": x[:, :-1].contiguous(), "labels": x[:, 1:].contiguous()}


class TokenLoader:
    """A StreamingDataLoader plus what a checkpoint needs to resume it exactly."""

    def __init__(self, loader, dataset, split: str, dp_rank: int, dp_size: int):
        self.loader, self.dataset, self.split = loader, dataset, split
        self.dp_rank, self.dp_size = dp_rank, dp_size

    def __iter__(self):
        with data_parallel_world(self.dp_rank, self.dp_size):
            return iter(self.loader)

    def __len__(self):
        return len(self.loader)

    def state_dict(self) -> dict:
        # streaming multiplies the samples yielded here by the world size it detects: the DP world's
        with data_parallel_world(self.dp_rank, self.dp_size):
            return self.loader.state_dict()

    def load_state_dict(self, state: dict) -> None:
        with data_parallel_world(self.dp_rank, self.dp_size):
            self.loader.load_state_dict(state)


def build_loader(sources: list[DataSource | str], split: str, *, micro_batch_size: int, dp_rank: int, dp_size: int,
                 seed: int = 1234, shuffle: bool = True, cache_dir: str | Path | None = None,
                 num_workers: int = 0, num_canonical_nodes: int | None = None, tokenizer_fingerprint=None,
                 vocab_size: int | None = None, seq_len: int | None = None) -> TokenLoader:
    """A loader for this data-parallel rank over one or more prepared datasets (mixed by proportion)."""
    streaming = import_streaming()
    sources = [DataSource(s) if isinstance(s, (str, Path)) else s for s in sources]
    if not sources:
        raise KScaleError("no data sources given", where="data.sources")
    if not 0 <= dp_rank < dp_size:
        raise KScaleError(f"data-parallel rank {dp_rank} is outside 0..{dp_size - 1}")
    streams = []
    # every process gets its own cache: TP/PP peers share a DP rank but must not share streaming's locals
    cache = Path(cache_dir or os.environ.get("KSCALE_DATA_CACHE", "/tmp/kscale-data-cache"))
    proc = f"{os.environ.get('RANK', '0')}-{os.getpid()}"
    for i, src in enumerate(sources):
        manifest = read_manifest(src.path)
        check_manifest(manifest, tokenizer_fingerprint=tokenizer_fingerprint, vocab_size=vocab_size,
                       seq_len=seq_len, where=str(src.path))
        split_dir = Path(src.path) / split
        if manifest["splits"].get(split, {}).get("samples", 0) == 0:
            raise KScaleError(f"the dataset has no {split!r} samples", where=str(src.path),
                              fix="prepare it with --val-input or --val-fraction" if split == "val" else None)
        streams.append(streaming.Stream(remote=str(split_dir.resolve()),
                                        local=str(cache / proc / f"{i}-{split}"), proportion=src.proportion))
    dataset_cls = _token_dataset_class()
    with data_parallel_world(dp_rank, dp_size), process_local_construction():
        dataset = dataset_cls(streams=streams, shuffle=shuffle, shuffle_seed=seed, batch_size=micro_batch_size,
                              num_canonical_nodes=num_canonical_nodes or dp_size, shuffle_algo="py1e")
    loader = streaming.StreamingDataLoader(dataset, batch_size=micro_batch_size, num_workers=num_workers,
                                           collate_fn=_collate, drop_last=True,
                                           persistent_workers=num_workers > 0)
    return TokenLoader(loader, dataset, split, dp_rank, dp_size)
