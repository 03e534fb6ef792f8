"""The embedding benchmark (benchmarks/embedding.py, installed as kronecker_scale.benchmarks) runs end to
end at toy size, and its rows hold what they claim: every provider x mode at the grid's shape, positive
times, ratios that are the quotient of two of its own times, and "saved" bytes equal to what the shapes
say each implementation must keep for backward."""
import csv
import itertools
import math

import pytest
import torch

from kronecker_scale.benchmarks import embedding as bench
from kronecker_scale.embedding import ByteTable

CPU = torch.device("cpu")


def expected_saved(provider: str, n: int, sum_len: int, pos_dim: int, elem: int) -> tuple[int, int]:
    """(low, high) bytes kept for backward, from the shapes alone.

    nn_embedding keeps its int64 ids; kron_dense its [N, 256 P] code in the weight dtype (the matmul's
    input); kron_torch, per code row used, an int64 row index and its fp32 weight alpha(L), and per token
    a few int64/fp32 vectors (bag offsets and sizes, beta(L)), at most 32 bytes a token."""
    if provider == "nn_embedding":
        return n * 8, n * 8
    if provider == "kron_dense":
        return n * 256 * pos_dim * elem, n * 256 * pos_dim * elem
    return sum_len * (8 + 4), sum_len * (8 + 4) + n * 32


@pytest.mark.parametrize("dtype,elem", [(torch.float32, 4), (torch.bfloat16, 2)])
def test_saved_bytes_are_the_activations_the_shapes_say(dtype, elem):
    table = ByteTable.from_token_bytes([b"abc", b"de", b"", b"x" * 20] * 10, pos_dim=16)
    ids = torch.randint(0, table.vocab_size, (100,))
    sum_len = int(table.lengths[ids].sum())
    for provider in ("nn_embedding", "kron_dense", "kron_torch"):
        saved = bench._saved_bytes(bench.build(provider, table, 8, dtype, CPU), ids)
        low, high = expected_saved(provider, 100, sum_len, 16, elem)
        assert low <= saved <= high, (provider, saved, low, high)
    # the closed form keeps index-sized tensors: far below the dense path's [N, D] code
    assert bench._saved_bytes(bench.build("kron_torch", table, 8, dtype, CPU), ids) * 50 < 100 * 4096 * elem


@pytest.mark.slow
def test_smoke_grid_rows_csv_markdown_and_plot(tmp_path):
    providers = ["nn_embedding", "kron_torch", "kron_dense"]
    results = bench.run("smoke", providers, reps=1, device="cpu", progress=lambda *_: None)
    grid = bench.GRIDS["smoke"]
    (n,), (d,), (pos_dim,), (dt,) = grid["tokens"], grid["d_model"], grid["pos_dim"], grid["dtype"]
    # one row per provider x mode, at the grid's shape, on this device
    assert sorted((r.provider, r.mode) for r in results) == sorted(itertools.product(providers, bench.MODES))
    assert {(r.tokens, r.d_model, r.pos_dim, r.dtype, r.device, r.peak_bytes) for r in results} == \
        {(n, d, pos_dim, dt, "cpu", 0)}                       # peak memory is measured on CUDA only
    assert all(math.isfinite(r.ms) and r.ms > 0 for r in results)
    # ratio = this row's time / nn.Embedding's time in the same mode
    base = {r.mode: r.ms for r in results if r.provider == "nn_embedding"}
    for r in results:
        assert r.ratio_vs_nn_embedding == pytest.approx(r.ms / base[r.mode], rel=1e-12)
    # saved bytes from the shapes, with the real ids the benchmark ran on
    from kronecker_scale.tokenizer.assets import tokenizer_path
    tok = tokenizer_path("tekken")
    ids = bench.real_ids(tok, n, CPU)
    assert ids.numel() == n and int(ids.max()) < bench.VOCAB
    sum_len = int(ByteTable.from_tokenizer(tok, pos_dim=pos_dim).lengths[ids].sum())
    for r in results:
        low, high = expected_saved(r.provider, n, sum_len, pos_dim, 4)
        assert low <= r.saved_bytes <= high, (r.provider, r.saved_bytes, low, high)
    # the CSV holds the rows, value for value; the markdown their fwd/bwd/full times and saved KiB
    paths = bench.write_outputs(results, tmp_path, "kscale bench embedding --grid smoke")
    rows = list(csv.DictReader(open(paths["csv"])))
    assert [(row["provider"], row["mode"], float(row["ms"]), int(row["saved_bytes"])) for row in rows] == \
        [(r.provider, r.mode, r.ms, r.saved_bytes) for r in results]
    md = paths["md"].read_text()
    for p in providers:
        m = {r.mode: r for r in results if r.provider == p}
        assert (f"| {n} | {d} | {pos_dim} | {dt} | {p} | {m['forward'].ms:.3f} | {m['backward'].ms:.3f} | "
                f"{m['full'].ms:.3f} | {m['full'].ratio_vs_nn_embedding:.2f}x | "
                f"{m['full'].saved_bytes / 2**10:.1f} |") in md
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and paths["png"].stat().st_size > 10_000


def test_no_runtime_module_imports_the_benchmarks():
    # benchmarks are tools: only the CLI's `bench` command reaches them
    import re
    from pathlib import Path

    import kronecker_scale
    root = Path(kronecker_scale.__file__).parent
    uses = re.compile(r"(kronecker_scale|from \.+)\.?benchmarks\b")
    assert [str(p.relative_to(root)) for p in root.rglob("*.py") if uses.search(p.read_text())] == ["cli.py"]
