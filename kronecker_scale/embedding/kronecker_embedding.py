"""KroneckerEmbedding: nn.Embedding's contract, one [256 * pos_dim, d] projection, no V x d table.

The single-device module. Implementations (all compute docs/design.md §2):
- `torch`: the closed form, codec.kronecker_embed_torch (embedding_bag over the <= P valid rows of
  each token weighted by alpha(L), plus beta(L) * colsum(W)); `auto` picks it off CUDA.
- `triton`: the fused kernels in `kronecker_scale.kernels` (CUDA; chosen by `auto` there). They cache
  colsum(W) until the optimizer steps (kernels/kronecker_embedding.py: cached_colsum) and, with
  `gradient_accumulation_fusion=True`, add dW straight into `weight.main_grad` when the weight has one
  (megatron's DDP buffers), giving the weight no separate gradient.
- `dense`: the materialised reference, reference.kronecker_embed_dense ([N, D] code, then a matmul).
"""

from __future__ import annotations

import math
import os

import torch
from torch import nn

from ..errors import KScaleError
from .byte_table import ByteTable, utf8_safe_truncate
from .codec import codec_dim, kronecker_embed_torch, scale_tables
from .reference import kronecker_embed_dense

IMPLS = ("auto", "dense", "torch", "triton")


def check_token_ids(ids: torch.Tensor, vocab_size: int) -> None:
    """Raise a KScaleError naming the first id outside [0, vocab_size) and where it sits."""
    if ids.dtype.is_floating_point or ids.dtype == torch.bool:
        raise KScaleError(f"token ids must be an integer tensor, got {ids.dtype}")
    if ids.numel() == 0:
        return
    lo, hi = torch.aminmax(ids)
    if int(lo) < 0 or int(hi) >= vocab_size:
        bad = ((ids < 0) | (ids >= vocab_size)).nonzero()[0].tolist()
        value = int(ids[tuple(bad)])
        raise KScaleError(
            f"token id {value} is out of range for vocabulary size V={vocab_size} (valid ids 0..{vocab_size - 1})",
            where=f"input position {tuple(bad)}",
            fix="check that the data was tokenized with this model's tokenizer",
        )


class KroneckerEmbedding(nn.Module):
    """Kronecker input embedding with one parameter `weight` [256 * pos_dim, d_model].

    Row `byte * pos_dim + pos` of `weight` is the code cell (byte, pos); init N(0, 1/D). The byte
    table is a persistent buffer (it travels in the state dict with its fingerprint, checked on load).
    """

    def __init__(
        self,
        byte_table: ByteTable,
        d_model: int,
        length_normalize: bool = True,
        z_normalize: bool = True,
        eps: float = 1e-6,
        impl: str = "auto",
        deterministic: bool | None = None,
        gradient_accumulation_fusion: bool = False,
        device=None,
        dtype=None,
    ):
        super().__init__()
        if impl not in IMPLS:
            raise KScaleError(
                f"unknown embedding impl {impl!r}", where="embedding.impl", fix=f"use one of {', '.join(IMPLS)}"
            )
        if d_model < 1:
            raise KScaleError(f"d_model must be >= 1, got {d_model}", where="model.d_model")
        self.pos_dim = byte_table.pos_dim
        self.codec_dim = codec_dim(self.pos_dim)
        self.num_embeddings = byte_table.vocab_size
        self.embedding_dim = d_model
        self.length_normalize, self.z_normalize, self.eps = length_normalize, z_normalize, eps
        self.impl = impl
        self._resolved: tuple[str, str] | None = None  # (weight's device type, implementation)
        self.deterministic = deterministic
        self.gradient_accumulation_fusion = gradient_accumulation_fusion
        self.byte_table_fingerprint = byte_table.fingerprint
        self.weight = nn.Parameter(torch.empty(self.codec_dim, d_model, device=device, dtype=dtype))
        self.register_buffer("token_bytes", byte_table.bytes.clone().to(device), persistent=True)
        self.register_buffer("token_lengths", byte_table.lengths.clone().to(device), persistent=True)
        alpha, beta = scale_tables(
            self.pos_dim, length_normalize=length_normalize, z_normalize=z_normalize, eps=eps, dtype=torch.float64
        )
        self.register_buffer("alpha", alpha.to(device), persistent=False)
        self.register_buffer("beta", beta.to(device), persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, mean=0.0, std=1.0 / math.sqrt(self.codec_dim))

    def _apply(self, fn, recurse=True):
        """Module casts (.bfloat16(), .half(), .float(): megatron's Float16Module, DeepSpeed) leave the scale
        tables in fp64 (docs/design.md §2: computed once in fp64, cast where used); a bf16 alpha would be
        ~0.2 % off per length. Device moves apply to them as to any buffer."""
        super()._apply(fn, recurse)
        if self.alpha.dtype != torch.float64 or self.beta.dtype != torch.float64:
            alpha, beta = scale_tables(
                self.pos_dim,
                length_normalize=self.length_normalize,
                z_normalize=self.z_normalize,
                eps=self.eps,
                dtype=torch.float64,
            )
            self.alpha, self.beta = alpha.to(self.alpha.device), beta.to(self.beta.device)
        return self

    # --- implementation choice ------------------------------------------------------------
    def resolved_impl(self) -> str:
        """The implementation the next forward runs: `triton` asked for and unusable is an error; `auto`
        is triton on CUDA, and says so (with the reason) when it has to use the torch path instead.
        Decided once per device the weight lives on (not on every forward)."""
        device = self.weight.device.type
        if self._resolved is None or self._resolved[0] != device:
            self._resolved = (device, self._resolve(device == "cuda"))
        return self._resolved[1]

    def _resolve(self, on_cuda: bool) -> str:
        if self.impl == "triton":
            problem = triton_problem(on_cuda)
            if problem:
                raise KScaleError(
                    f"embedding impl 'triton' cannot run: {problem}",
                    where="model.embedding_impl",
                    fix="install the CUDA build (docs/setup.md), or set model.embedding_impl=auto",
                )
            return "triton"
        if self.impl != "auto":
            return self.impl
        problem = triton_problem(on_cuda) if on_cuda else "no CUDA device"
        if problem is None:
            backward = {
                True: "deterministic",
                False: "atomic",
                None: "deterministic" if torch.are_deterministic_algorithms_enabled() else "atomic",
            }[self.deterministic]
            _announce(f"embedding: impl=auto chose the Triton kernels on CUDA ({backward} backward)")
            return "triton"
        _announce(f"embedding: impl=auto chose the torch closed form on {self.weight.device.type} ({problem})")
        return "torch"

    def _embed_bytes(self, token_bytes: torch.Tensor, lengths: torch.Tensor, impl: str) -> torch.Tensor:
        if impl == "dense":
            return kronecker_embed_dense(
                token_bytes,
                lengths,
                self.weight,
                length_normalize=self.length_normalize,
                z_normalize=self.z_normalize,
                eps=self.eps,
            )
        return kronecker_embed_torch(token_bytes, lengths, self.weight, self.alpha, self.beta)

    # --- forward --------------------------------------------------------------------------
    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        check_token_ids(ids, self.num_embeddings)
        flat = ids.reshape(-1)
        impl = self.resolved_impl()
        if impl == "triton":
            from kronecker_scale.kernels import kronecker_embedding_triton

            main_grad = getattr(self.weight, "main_grad", None) if self.gradient_accumulation_fusion else None
            out = kronecker_embedding_triton(
                flat,
                self.token_bytes,
                self.token_lengths,
                self.weight,
                self.alpha,
                self.beta,
                deterministic=self.deterministic,
                main_grad=main_grad,
            )
        else:
            out = self._embed_bytes(self.token_bytes[flat], self.token_lengths[flat], impl)
        return out.reshape(*ids.shape, self.embedding_dim)

    def forward_with_byte_override(self, ids: torch.Tensor, overrides: dict) -> torch.Tensor:
        """Embed `ids`, but give the positions in `overrides` ({index: bytes}) arbitrary bytes.

        Keys are indices into `ids` (an int for 1-D ids, else a tuple); values are any byte string
        (UTF-8-safe truncated to pos_dim), so out-of-vocabulary strings get an embedding.
        """
        check_token_ids(ids, self.num_embeddings)
        tb = self.token_bytes[ids].clone()  # [..., P]
        L = self.token_lengths[ids].clone()
        for index, raw in overrides.items():
            if isinstance(raw, str):
                raw = raw.encode("utf-8")
            raw = utf8_safe_truncate(bytes(raw), self.pos_dim)
            row = torch.zeros(self.pos_dim, dtype=torch.uint8, device=tb.device)
            row[: len(raw)] = torch.tensor(list(raw), dtype=torch.uint8)
            try:
                tb[index] = row
                L[index] = len(raw)
            except IndexError:
                raise KScaleError(f"byte override index {index} is outside ids of shape {tuple(ids.shape)}") from None
        impl = "dense" if self.impl == "dense" else "torch"
        out = self._embed_bytes(tb.reshape(-1, self.pos_dim), L.reshape(-1), impl)
        return out.reshape(*ids.shape, self.embedding_dim)

    # --- state dict: the fingerprint is checked before any buffer is overwritten -----------
    def get_extra_state(self):
        return {
            "byte_table_fingerprint": self.byte_table_fingerprint,
            "pos_dim": self.pos_dim,
            "length_normalize": self.length_normalize,
            "z_normalize": self.z_normalize,
            "eps": self.eps,
        }

    def set_extra_state(self, state) -> None:
        pass  # checked in _load_from_state_dict, before the buffers are copied

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        extra = state_dict.get(prefix + "_extra_state")
        if isinstance(extra, dict):
            mine = self.get_extra_state()
            if extra.get("byte_table_fingerprint") != self.byte_table_fingerprint:
                raise KScaleError(
                    f"byte table fingerprint mismatch: checkpoint has {extra.get('byte_table_fingerprint')}, "
                    f"this model has {self.byte_table_fingerprint}",
                    where=f"state dict key {prefix}_extra_state",
                    fix="build the model from the tokenizer and pos_dim/byte_source the checkpoint was trained with",
                )
            for key in ("pos_dim", "length_normalize", "z_normalize", "eps"):
                if extra.get(key) != mine[key]:
                    raise KScaleError(
                        f"embedding setting {key} differs: checkpoint {extra.get(key)!r}, model {mine[key]!r}",
                        where=f"state dict key {prefix}_extra_state",
                    )
            self._accept_other_padding(state_dict, prefix)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def _accept_other_padding(self, state_dict, prefix) -> None:
        """A checkpoint saved with another vocabulary padding (another TP size) has the same real rows
        (the fingerprints matched) and only empty rows beyond them: keep this model's padded table."""
        theirs_b, theirs_l = state_dict.get(prefix + "token_bytes"), state_dict.get(prefix + "token_lengths")
        if theirs_b is None or theirs_l is None or theirs_b.shape == self.token_bytes.shape:
            return
        n = min(len(theirs_l), len(self.token_lengths))
        same = torch.equal(theirs_b[:n].cpu(), self.token_bytes[:n].cpu()) and torch.equal(
            theirs_l[:n].cpu(), self.token_lengths[:n].cpu()
        )
        if not same or bool(theirs_l[n:].any()) or bool(self.token_lengths[n:].any()):
            raise KScaleError(
                "byte table rows differ from the checkpoint's", where=f"state dict key {prefix}token_bytes"
            )
        state_dict[prefix + "token_bytes"], state_dict[prefix + "token_lengths"] = self.token_bytes, self.token_lengths

    def extra_repr(self) -> str:
        return (
            f"num_embeddings={self.num_embeddings}, embedding_dim={self.embedding_dim}, pos_dim={self.pos_dim}, "
            f"length_normalize={self.length_normalize}, z_normalize={self.z_normalize}, impl={self.impl!r}"
        )


def triton_problem(on_cuda: bool) -> str | None:
    """Why the Triton kernels cannot run here (None when they can): not importable, or neither a CUDA
    device nor Triton's interpreter (TRITON_INTERPRET=1, the CPU test path)."""
    try:
        from kronecker_scale.kernels import kronecker_embedding_triton  # noqa: F401
    except Exception as e:  # triton missing, or a broken install: say which
        return f"the Triton kernels do not import ({type(e).__name__}: {e})"
    if not on_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        return "the Triton kernels need a CUDA device (or TRITON_INTERPRET=1 for the slow interpreter)"
    return None


_announced: set[str] = set()


def _announce(line: str) -> None:
    """Say once per process (on rank 0 of a job) which implementation the first forward chose."""
    if line in _announced:
        return
    _announced.add(line)
    dist = torch.distributed
    if not dist.is_available() or not dist.is_initialized() or dist.get_rank() == 0:
        print(line, flush=True)
