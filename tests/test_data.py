"""prepare-data and the streaming loader: round trip, data-parallel split, exact resume, bad input."""

import gzip
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from kronecker_scale.data import build_loader, prepare_data, read_manifest
from kronecker_scale.errors import KScaleError
from kronecker_scale.tokenizer import load_tokenizer
from kronecker_scale.tokenizer.assets import tokenizer_path
from tiny_runs import real_text

# prepare_data tokenizes in a pool of spawned processes, so every test here starts processes (3-30 s a test
# on 2 shared cores); one runs 4 gloo ranks
pytestmark = pytest.mark.slow

SEQ = 32


@pytest.fixture(scope="module")
def docs():
    text = real_text()
    paragraphs = [p for p in text.split("\n\n") if p.strip()]
    return ["\n\n".join(paragraphs[i : i + 6]) for i in range(0, len(paragraphs), 6)]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, docs):
    """Three input formats: a text file, a gzip JSON Lines file and a zstd JSON Lines file."""
    import zstd

    root = tmp_path_factory.mktemp("data")
    (root / "in").mkdir()
    (root / "in" / "a.txt").write_text(docs[0], encoding="utf-8")
    (root / "in" / "b.jsonl.gz").write_bytes(
        gzip.compress("".join(json.dumps({"text": d}) + "\n" for d in docs[1:6]).encode())
    )
    (root / "in" / "c.jsonl.zst").write_bytes(
        zstd.compress("".join(json.dumps({"text": d, "meta": 1}) + "\n" for d in docs[6:]).encode())
    )
    (root / "held.txt").write_text("State of the Union. " * 300, encoding="utf-8")
    manifest = prepare_data(
        tokenizer_path("gpt2"), [root / "in"], root / "out", SEQ, val_inputs=[root / "held.txt"], workers=2
    )
    return root, manifest


def expected_stream(docs):
    tok = load_tokenizer(tokenizer_path("gpt2"))
    return np.concatenate([np.append(tok.encode(d), tok.eos_id) for d in docs]), tok


def test_round_trip_gives_back_the_token_stream_and_the_text(dataset, docs):
    root, manifest = dataset
    ids, tok = expected_stream(docs)
    m = read_manifest(root / "out")
    assert m == manifest and m["documents"] == len(docs) + 1
    assert m["splits"]["train"]["tokens"] == len(ids)
    loader = build_loader(
        [str(root / "out")], "train", micro_batch_size=4, dp_rank=0, dp_size=1, shuffle=False, cache_dir=root / "cache"
    )
    samples = torch.cat([torch.cat([b["tokens"], b["labels"][:, -1:]], 1) for b in loader])
    assert samples.shape[1] == SEQ + 1
    n = m["splits"]["train"]["samples"]
    # drop_last may hold back a partial batch: compare what was yielded
    stream = torch.cat([samples[:, :-1].reshape(-1), samples[-1, -1:]]).numpy()
    assert len(samples) >= n - 3 and np.array_equal(stream, ids[: len(stream)])
    for b in loader:  # labels are the next tokens
        assert torch.equal(b["labels"][:, :-1], b["tokens"][:, 1:])
        break
    text = tok.decode(stream.tolist())
    assert text.startswith(docs[0]) and "<|endoftext|>" + docs[1][:200] in text


def _dp_worker(rank, world, init_file, data_dir, out_dir):
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    dp_rank, dp_size = rank // 2, world // 2  # ranks 2k, 2k+1 are tensor-parallel peers
    loader = build_loader([data_dir], "train", micro_batch_size=2, dp_rank=dp_rank, dp_size=dp_size, seed=7)
    seen = [tuple(row.tolist()) for b in loader for row in b["tokens"]]
    torch.save(seen, Path(out_dir) / f"rank{rank}.pt")
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


@pytest.mark.timeout(300)
def test_data_parallel_ranks_are_disjoint_and_cover_the_set_and_tp_peers_agree(dataset, tmp_path):
    root, manifest = dataset
    mp.start_processes(
        _dp_worker,
        args=(4, str(tmp_path / "init"), str(root / "out"), str(tmp_path)),
        nprocs=4,
        join=True,
        start_method="spawn",
    )
    from collections import Counter

    seen = [torch.load(tmp_path / f"rank{r}.pt") for r in range(4)]
    assert seen[0] == seen[1] and seen[2] == seen[3]  # TP peers: the same samples, same order
    everything = Counter(
        tuple(row.tolist())
        for b in build_loader(
            [str(root / "out")],
            "train",
            micro_batch_size=1,
            dp_rank=0,
            dp_size=1,
            shuffle=False,
            cache_dir=tmp_path / "all",
        )
        for row in b["tokens"]
    )
    assert sum(everything.values()) == manifest["splits"]["train"]["samples"]
    both = Counter(seen[0]) + Counter(seen[2])
    # disjoint: no sample is served twice (texts repeat, so compare multiplicities, not sets)
    assert all(both[k] <= everything[k] for k in both)
    assert sum(both.values()) >= sum(everything.values()) - 2 * 2  # together they cover the set (drop_last)
    assert 0 < len(seen[0]) and abs(len(seen[0]) - len(seen[2])) <= 2


def test_resume_yields_exactly_the_remaining_order(dataset):
    root, _ = dataset
    kw = dict(micro_batch_size=3, dp_rank=0, dp_size=1, seed=11, cache_dir=root / "cache-resume")
    full = [b["tokens"] for b in build_loader([str(root / "out")], "train", **kw)]
    first = build_loader([str(root / "out")], "train", **kw)
    it = iter(first)
    head = [next(it)["tokens"] for _ in range(4)]
    state = first.state_dict()
    resumed = build_loader([str(root / "out")], "train", **kw)
    resumed.load_state_dict(state)
    rest = [b["tokens"] for b in resumed]
    assert len(head) + len(rest) == len(full)
    assert all(torch.equal(a, b) for a, b in zip(head + rest, full))
    again = [b["tokens"] for b in build_loader([str(root / "out")], "train", **kw)]
    assert all(torch.equal(a, b) for a, b in zip(again, full))  # same seed, same order
    other = [b["tokens"] for b in build_loader([str(root / "out")], "train", **{**kw, "seed": 12})]
    assert not all(torch.equal(a, b) for a, b in zip(other, full))  # another seed, another order


def test_validation_split_and_manifest_checks(dataset):
    root, manifest = dataset
    assert manifest["splits"]["val"]["samples"] > 0
    val = build_loader(
        [str(root / "out")],
        "val",
        micro_batch_size=2,
        dp_rank=0,
        dp_size=1,
        shuffle=False,
        cache_dir=root / "cache-val",
    )
    assert "State of the Union" in load_tokenizer(tokenizer_path("gpt2")).decode(next(iter(val))["tokens"][0].tolist())
    other = load_tokenizer(tokenizer_path("mistral-sp")).fingerprint
    with pytest.raises(KScaleError, match="another tokenizer"):
        build_loader(
            [str(root / "out")], "train", micro_batch_size=2, dp_rank=0, dp_size=1, tokenizer_fingerprint=other
        )
    with pytest.raises(KScaleError, match="seq_len"):
        build_loader([str(root / "out")], "train", micro_batch_size=2, dp_rank=0, dp_size=1, seq_len=64)


def test_existing_dataset_is_refused_unless_overwrite_and_left_intact(dataset):
    root, manifest = dataset
    before = sorted(p.name for p in (root / "out" / "train").iterdir())
    with pytest.raises(KScaleError, match="already holds a dataset"):
        prepare_data(tokenizer_path("gpt2"), [root / "held.txt"], root / "out", SEQ, workers=1)
    assert read_manifest(root / "out") == manifest
    assert sorted(p.name for p in (root / "out" / "train").iterdir()) == before


@pytest.mark.parametrize(
    "content,needle",
    [
        (b"good text \xff\xfe bad bytes", "not valid UTF-8 at byte offset 10"),
    ],
)
def test_undecodable_file_names_file_and_offset_or_is_skipped(tmp_path, content, needle):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "ok.txt").write_text("Some real text. " * 50)
    (tmp_path / "in" / "bad.txt").write_bytes(content)
    with pytest.raises(KScaleError) as e:
        prepare_data(tokenizer_path("gpt2"), [tmp_path / "in"], tmp_path / "out", 16, workers=1)
    assert needle in str(e.value) and "bad.txt" in str(e.value)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.tmp*"))  # nothing half-written
    m = prepare_data(tokenizer_path("gpt2"), [tmp_path / "in"], tmp_path / "out", 16, workers=1, skip_bad=True)
    assert len(m["skipped_files"]) == 1 and "bad.txt" in m["skipped_files"][0]["file"]


def test_parquet_input_and_mixing_two_datasets_by_proportion(tmp_path, dataset, docs):
    import pyarrow as pa
    import pyarrow.parquet as pq

    root, _ = dataset
    pq.write_table(
        pa.table({"text": ["State of the Union. " * 150, "Parquet rows are documents. " * 150]}),
        tmp_path / "docs.parquet",
    )
    m = prepare_data(tokenizer_path("gpt2"), [tmp_path / "docs.parquet"], tmp_path / "pq", SEQ, workers=1)
    assert m["documents"] == 2 and m["splits"]["train"]["samples"] > 10
    from kronecker_scale.data import DataSource

    mixed = build_loader(
        [DataSource(str(root / "out"), 0.5), DataSource(str(tmp_path / "pq"), 0.5)],
        "train",
        micro_batch_size=2,
        dp_rank=0,
        dp_size=1,
        seed=3,
        cache_dir=tmp_path / "cache",
    )
    tok = load_tokenizer(tokenizer_path("gpt2"))
    texts = [tok.decode(row.tolist()) for b in mixed for row in b["tokens"]]
    from_pq = sum(("State of the Union" in t or "Parquet rows" in t) for t in texts)
    assert 0.3 < from_pq / len(texts) < 0.7  # about half from each source


def test_bad_inputs_are_clear_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(KScaleError, match="no input files"):
        prepare_data(tokenizer_path("gpt2"), [tmp_path / "empty"], tmp_path / "o1", 16)
    with pytest.raises(KScaleError, match="input not found"):
        prepare_data(tokenizer_path("gpt2"), [tmp_path / "missing.txt"], tmp_path / "o2", 16)
    (tmp_path / "blank.txt").write_text("")
    with pytest.raises(KScaleError, match="no text"):
        prepare_data(tokenizer_path("gpt2"), [tmp_path / "blank.txt"], tmp_path / "o3", 16, workers=1)
    (tmp_path / "t.txt").write_text("Hello world, " * 40)
    with pytest.raises(KScaleError, match=r"token id \d+ is >= the model's vocabulary size 100"):
        prepare_data(tokenizer_path("gpt2"), [tmp_path / "t.txt"], tmp_path / "o4", 16, workers=1, vocab_size=100)
    (tmp_path / "x.jsonl").write_text('{"body": "no text field"}\n')
    with pytest.raises(KScaleError, match="has no 'text' field"):
        prepare_data(tokenizer_path("gpt2"), [tmp_path / "x.jsonl"], tmp_path / "o5", 16, workers=1)
    assert not any((tmp_path / f"o{i}").exists() for i in range(1, 6))
