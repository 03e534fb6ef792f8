"""What the model is: a plain dataclass (no megatron import), the `model` section of the config."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import KScaleError

INPUT_LAYERS = ("kronecker", "bpe")
HEADS = ("untied", "tied", "kronecker_tied")
KRONECKER_TP = ("shard_d", "replicated")
ATTENTION_BACKENDS = ("auto", "local", "sdpa", "te")
RECOMPUTE = ("none", "selective", "full")


@dataclass
class GPTConfig:
    """What the model is (parallel layout and precision live in the TransformerConfig)."""

    n_layers: int = 2
    d_model: int = 64
    n_heads: int = 4
    ffn_hidden: int | None = None  # default 4 * d_model
    seq_len: int = 64
    input_layer: str = "kronecker"  # kronecker | bpe
    head: str = "untied"  # untied | tied (BPE only) | kronecker_tied (Kronecker only)
    pos_dim: int = 32
    length_normalize: bool = True
    z_normalize: bool = True
    codec_eps: float = 1e-6
    embedding_impl: str = "auto"  # auto | torch | triton | dense
    deterministic_embedding: bool | None = None
    kronecker_tp: str = "shard_d"  # shard_d | replicated
    position: str = "learned_absolute"  # learned_absolute | rope
    norm: str = "layernorm"  # layernorm | rmsnorm
    activation: str = "gelu"  # gelu | swiglu
    bias: bool = True
    hidden_dropout: float = 0.0
    attention_dropout: float = 0.0
    init_std: float = 0.02
    vocab_divisible_by: int = 128
    # core attention: local (megatron's unfused reference, memory ~ s^2) | sdpa (torch's
    # scaled_dot_product_attention: flash / memory-efficient kernels on GPU) | te (Transformer Engine's
    # layer spec) | auto (te when importable, else sdpa)
    attention_backend: str = "auto"
    # activation recompute (megatron's recompute_granularity): none | selective (core attention) | full
    # (every transformer layer's input is kept, the layer is recomputed in backward)
    recompute: str = "none"

    def validate(self) -> GPTConfig:
        def bad(key, value, fix):
            raise KScaleError(f"model.{key}={value!r} is not allowed", where=f"model.{key}", fix=fix)

        if self.input_layer not in INPUT_LAYERS:
            bad("input_layer", self.input_layer, f"use one of {INPUT_LAYERS}")
        if self.head not in HEADS:
            bad("head", self.head, f"use one of {HEADS}")
        if self.head == "tied" and self.input_layer != "bpe":
            bad("head", self.head, "a Kronecker input layer has no V x d table to tie: use untied or kronecker_tied")
        if self.head == "kronecker_tied" and self.input_layer != "kronecker":
            bad("head", self.head, "kronecker_tied needs input_layer=kronecker")
        if self.kronecker_tp not in KRONECKER_TP:
            bad("kronecker_tp", self.kronecker_tp, f"use one of {KRONECKER_TP}")
        if self.position not in ("learned_absolute", "rope"):
            bad("position", self.position, "use learned_absolute or rope")
        if self.norm not in ("layernorm", "rmsnorm"):
            bad("norm", self.norm, "use layernorm or rmsnorm")
        if self.activation not in ("gelu", "swiglu"):
            bad("activation", self.activation, "use gelu or swiglu")
        if self.attention_backend not in ATTENTION_BACKENDS:
            bad("attention_backend", self.attention_backend, f"use one of {ATTENTION_BACKENDS}")
        if self.recompute not in RECOMPUTE:
            bad("recompute", self.recompute, f"use one of {RECOMPUTE}")
        if self.d_model % self.n_heads:
            bad("n_heads", self.n_heads, f"d_model={self.d_model} must be divisible by n_heads")
        return self


def padded_vocab_size(vocab_size: int, divisible_by: int, tensor_parallel_size: int) -> int:
    """The one padding rule (megatron's): a multiple of divisible_by x TP. Padded ids embed to zero."""
    multiple = divisible_by * tensor_parallel_size
    return -(-vocab_size // multiple) * multiple
