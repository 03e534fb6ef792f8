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
    assert {(r.tokens, r.d_model, r.pos_dim, r.dtype, r.device, r.peak_bytes) for r in results} == {
        (n, d, pos_dim, dt, "cpu", 0)
    }  # peak memory is measured on CUDA only
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
    assert [(row["provider"], row["mode"], float(row["ms"]), int(row["saved_bytes"])) for row in rows] == [
        (r.provider, r.mode, r.ms, r.saved_bytes) for r in results
    ]
    md = paths["md"].read_text()
    for p in providers:
        m = {r.mode: r for r in results if r.provider == p}
        assert (
            f"| {n} | {d} | {pos_dim} | {dt} | {p} | {m['forward'].ms:.3f} | {m['backward'].ms:.3f} | "
            f"{m['full'].ms:.3f} | {m['full'].ratio_vs_nn_embedding:.2f}x | "
            f"{m['full'].saved_bytes / 2**10:.1f} | {m['full'].bytes_per_token:,.0f} | - | - |"
        ) in md
    # bytes per token from the model with the ids' own statistics; GB/s and fraction of peak on a GPU only
    stats = bench.IdStats.of(ByteTable.from_tokenizer(tok, pos_dim=pos_dim), ids)
    for r in results:
        assert r.bytes_per_token == bench.bytes_per_token(r.provider, r.mode, n, d, pos_dim, bench.VOCAB, 4, stats)
        assert math.isnan(r.gbps) and math.isnan(r.frac_peak)
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and paths["png"].stat().st_size > 10_000


GOAL = bench.GOAL


def test_bytes_model_kronecker_is_at_or_below_nn_embedding_at_the_goal_shape():
    # forward + backward (+ colsum at one micro-batch per optimizer step, the worst case), at the bound
    # that favours nn.Embedding (Kronecker: L = P, every row touched; nn.Embedding: no distinct-row terms)
    nn_bytes = bench.bytes_per_token("nn_embedding", "full", **GOAL)
    colsum = sum(b for _, b in bench.traffic("kron_triton", **GOAL)["per_step"]) / GOAL["N"]
    for provider, main_grad in (("kron_triton", False), ("kron_triton", True), ("kron_triton_det", False)):
        kron = bench.bytes_per_token(provider, "full", main_grad=main_grad, **GOAL) + colsum
        assert kron <= nn_bytes, (provider, main_grad, kron, nn_bytes)
    assert bench.bytes_per_token("kron_torch", "full", **GOAL) > nn_bytes  # what the kernels are for


def test_bytes_model_terms_are_the_shapes_arithmetic():
    N, d, P, V, e = 1000, 256, 8, 5000, 2
    D = 256 * P
    kw = dict(N=N, d=d, P=P, V=V, elem=e)
    # nn.Embedding at the bound: ids twice, out written, g read, the dense V x d gradient written
    assert bench.bytes_per_token("nn_embedding", "full", **kw) * N == pytest.approx(
        2 * N * 8 + 2 * N * d * e + V * d * e, rel=1e-12
    )
    # kron_triton: forward gathers W once (L2-resident column slices); backward reads g once, zeroes an fp32
    # accumulator, reads + writes the touched rows, reads it back and writes dW in bf16
    fwd = N * 10 + N * P + D * d * e + d * 4 + N * d * e
    bwd = N * 10 + N * P + N * d * e + 2 * d * 4 + D * d * 4 + 2 * min(D, N * P) * d * 4 + D * d * 4 + D * d * e
    assert bench.bytes_per_token("kron_triton", "forward", **kw) * N == pytest.approx(fwd, rel=1e-12)
    assert bench.bytes_per_token("kron_triton", "backward", **kw) * N == pytest.approx(bwd, rel=1e-12)
    # into an fp32 main_grad: no scratch, no cast; b added to every row in place
    mg = N * 10 + N * P + N * d * e + 2 * d * 4 + 2 * min(D, N * P) * d * 4 + 2 * D * d * 4
    assert bench.bytes_per_token("kron_triton", "backward", main_grad=True, **kw) * N == pytest.approx(mg, rel=1e-12)
    # the ids' statistics enter where they should: fewer touched rows, fewer bytes
    few = bench.IdStats(mean_len=3.0, distinct_ids=100, touched_rows=50)
    assert bench.bytes_per_token("kron_triton", "backward", stats=few, **kw) * N == pytest.approx(
        bwd - 2 * (min(D, N * P) - 50) * d * 4 - N * (P - 3), rel=1e-12
    )
    assert bench.bytes_per_token("nn_embedding", "full", stats=few, **kw) * N == pytest.approx(
        2 * N * 8 + 2 * N * d * e + V * d * e + 100 * d * e + 100 * d * (2 * 4 + e), rel=1e-12
    )
    assert bench.peak_bandwidth("cpu") is None


def test_the_goal_table_in_docs_is_the_models():
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md").read_text()
    for line in bench.goal_table().splitlines():
        assert line in doc, line
    assert doc.count("not yet measured on GPU") >= 4


def test_id_statistics():
    table = ByteTable.from_token_bytes([b"ab", b"b", b"", b"abc"], pos_dim=4)
    stats = bench.IdStats.of(table, torch.tensor([0, 0, 1, 3, 2]))
    # lengths 2, 2, 1, 3, 0; rows (a,0) (b,1) (b,0) (c,2)
    assert stats == bench.IdStats(mean_len=8 / 5, distinct_ids=4, touched_rows=4)


def test_no_runtime_module_imports_the_benchmarks():
    # benchmarks are tools: only the CLI's `bench` command reaches them
    import re
    from pathlib import Path

    import kronecker_scale

    root = Path(kronecker_scale.__file__).parent
    uses = re.compile(r"(kronecker_scale|from \.+)\.?benchmarks\b")
    assert [str(p.relative_to(root)) for p in root.rglob("*.py") if uses.search(p.read_text())] == ["cli.py"]
