"""The embedding benchmark runs end to end at toy size and measures what it claims."""
import csv

import torch

from kronecker_scale.bench import embedding as bench
from kronecker_scale.embedding import ByteTable


def test_saved_bytes_measure_activations_not_parameters():
    table = ByteTable.from_token_bytes([b"abc", b"de", b""] * 10, pos_dim=16)
    ids = torch.randint(0, table.vocab_size, (100,))
    dense = bench.build("kron_dense", table, 8, torch.float32, torch.device("cpu"))
    fused = bench.build("kron_torch", table, 8, torch.float32, torch.device("cpu"))
    # the dense path keeps its [N, D] fp32 codec for backward; the closed form only index-sized tensors
    assert bench._saved_bytes(dense, ids) >= 100 * 256 * 16 * 4
    assert bench._saved_bytes(fused, ids) < 100 * 16 * 8 * 4


def test_smoke_grid_writes_csv_markdown_and_plot(tmp_path):
    results = bench.run("smoke", ["nn_embedding", "kron_torch", "kron_dense"], reps=1, device="cpu",
                        progress=lambda *_: None)
    assert len(results) == 3 * 3                     # providers x modes
    assert all(r.ratio_vs_nn_embedding == 1.0 for r in results if r.provider == "nn_embedding")
    assert all(r.ms > 0 and r.ratio_vs_nn_embedding > 0 for r in results)
    paths = bench.write_outputs(results, tmp_path, "kscale bench embedding --grid smoke")
    rows = list(csv.DictReader(open(paths["csv"])))
    assert {r["provider"] for r in rows} == {"nn_embedding", "kron_torch", "kron_dense"}
    assert "| 512 | 64 | 16 | fp32 | kron_torch |" in paths["md"].read_text()
    assert paths["png"].stat().st_size > 10_000
