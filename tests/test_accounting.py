"""Parameter accounting against the paper and against real torch modules counted by numel()."""

import pytest
from torch import nn

from kronecker_scale.embedding import ByteTable, KroneckerEmbedding
from kronecker_scale.model.accounting import ARMS, GPTShape, input_side, model_params


def test_paper_input_side_figures():
    r = input_side(50257, 768, 16)
    assert (r.bpe, r.kronecker) == (38_597_376, 3_145_728) and f"{100 * r.saving:.2f}" == "91.85"
    r = input_side(131072, 4096, 32)
    assert (r.bpe, r.kronecker) == (536_870_912, 33_554_432) and f"{100 * r.saving:.2f}" == "93.75"


def test_gpt2_124m_totals():
    s = GPTShape(vocab_size=50257, d_model=768, n_layers=12, seq_len=1024, n_heads=12)
    assert model_params(s, "bpe_tied")["total"] == 124_439_808  # GPT-2 small, tied
    # the paper: the Kronecker arm (projection + untied head) is net +3.1M over BPE-tied
    assert model_params(s, "kronecker", 16)["total"] - model_params(s, "bpe_tied")["total"] == 3_145_728


class Block(nn.Module):  # nanoGPT's block, written out: the independent count
    def __init__(self, d, f, swiglu, norm):
        super().__init__()
        N = (lambda: nn.LayerNorm(d)) if norm == "layernorm" else (lambda: nn.RMSNorm(d))
        self.ln1, self.ln2 = N(), N()
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc1 = nn.Linear(d, 2 * f if swiglu else f)
        self.fc2 = nn.Linear(f, d)


@pytest.mark.parametrize(
    "activation,norm,position", [("gelu", "layernorm", "learned_absolute"), ("swiglu", "rmsnorm", "rope")]
)
@pytest.mark.parametrize("arm", ARMS)
def test_counts_equal_numel_of_real_modules(arm, activation, norm, position):
    V, d, layers, T, P = 1000, 64, 3, 32, 16
    shape = GPTShape(
        vocab_size=V,
        d_model=d,
        n_layers=layers,
        seq_len=T,
        n_heads=4,
        activation=activation,
        norm=norm,
        position=position,
        ffn_hidden=96,
    )
    mods = [Block(d, 96, activation == "swiglu", norm) for _ in range(layers)]
    mods.append(nn.LayerNorm(d) if norm == "layernorm" else nn.RMSNorm(d))
    if position == "learned_absolute":
        mods.append(nn.Embedding(T, d))
    if arm.startswith("bpe"):
        mods.append(nn.Embedding(V, d))
    else:
        mods.append(KroneckerEmbedding(ByteTable.from_token_bytes([b"a"] * V, pos_dim=P), d))
    if arm in ("bpe_untied", "kronecker"):
        mods.append(nn.Linear(d, V, bias=False))
    expected = sum(p.numel() for m in mods for p in m.parameters())
    assert model_params(shape, arm, P)["total"] == expected
