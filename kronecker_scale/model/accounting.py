"""Parameter accounting: input side (BPE table vs Kronecker projection) and whole GPT models.

Input side: a BPE table has V * d parameters; the Kronecker projection 256 * P * d, whatever V is.
Whole model: a GPT of megatron-core's (and nanoGPT's) shape, counted layer by layer, with the input
layer and head of each arm:

    arm            input            head
    bpe_tied       V x d table      (shares the table)
    bpe_untied     V x d table      V x d
    kronecker      256P x d proj.   V x d
    kronecker_tied 256P x d proj.   (reconstructed from codec + projection: no parameters)
"""

from __future__ import annotations

from dataclasses import dataclass

from ..embedding.codec import codec_dim

ARMS = ("bpe_tied", "bpe_untied", "kronecker", "kronecker_tied")


def bpe_input_params(vocab_size: int, d_model: int) -> int:
    return vocab_size * d_model


def kronecker_input_params(pos_dim: int, d_model: int) -> int:
    return codec_dim(pos_dim) * d_model


@dataclass(frozen=True)
class InputSideRow:
    vocab_size: int
    d_model: int
    pos_dim: int
    bpe: int
    kronecker: int

    @property
    def saving(self) -> float:
        """Share of input-side parameters removed (0.9185 = 91.85 %)."""
        return 1.0 - self.kronecker / self.bpe

    @property
    def ratio(self) -> float:
        return self.bpe / self.kronecker


def input_side(vocab_size: int, d_model: int, pos_dim: int) -> InputSideRow:
    return InputSideRow(
        vocab_size, d_model, pos_dim, bpe_input_params(vocab_size, d_model), kronecker_input_params(pos_dim, d_model)
    )


@dataclass(frozen=True)
class GPTShape:
    """What decides a GPT's parameter count (megatron-core local spec / nanoGPT layout)."""

    vocab_size: int
    d_model: int
    n_layers: int
    seq_len: int
    ffn_hidden: int | None = None  # default 4 * d_model
    position: str = "learned_absolute"  # or "rope" (no parameters)
    norm: str = "layernorm"  # layernorm (weight + bias) or rmsnorm (weight)
    activation: str = "gelu"  # gelu (fc1, fc2) or swiglu (gate+up, down)
    bias: bool = True  # biases on the linear layers
    num_query_groups: int | None = None  # GQA; default = heads (plain MHA)
    n_heads: int = 12

    def ffn(self) -> int:
        return self.ffn_hidden or 4 * self.d_model


def transformer_params(s: GPTShape) -> int:
    """Everything but the input layer and the head: position table, blocks, final norm."""
    d, f = s.d_model, s.ffn()
    norm = 2 * d if s.norm == "layernorm" else d
    kv = d if s.num_query_groups is None else d * s.num_query_groups // s.n_heads
    qkv = d * (d + 2 * kv) + (d + 2 * kv if s.bias else 0)
    proj = d * d + (d if s.bias else 0)
    if s.activation == "swiglu":
        mlp = d * 2 * f + f * d + ((2 * f + d) if s.bias else 0)
    else:
        mlp = d * f + f * d + ((f + d) if s.bias else 0)
    block = 2 * norm + qkv + proj + mlp
    pos = s.seq_len * d if s.position == "learned_absolute" else 0
    return pos + s.n_layers * block + norm


def model_params(s: GPTShape, arm: str, pos_dim: int = 32) -> dict[str, int]:
    """{'input': ..., 'head': ..., 'transformer': ..., 'total': ...} for one arm."""
    if arm not in ARMS:
        raise ValueError(f"unknown arm {arm!r}; expected one of {ARMS}")
    V, d = s.vocab_size, s.d_model
    if arm.startswith("bpe"):
        inp = bpe_input_params(V, d)
        head = 0 if arm == "bpe_tied" else V * d
    else:
        inp = kronecker_input_params(pos_dim, d)
        head = 0 if arm == "kronecker_tied" else V * d
    body = transformer_params(s)
    return {"input": inp, "head": head, "transformer": body, "total": inp + head + body}
