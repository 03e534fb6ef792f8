"""The one adapter between kronecker-scale and megatron-core 0.19.x: a GPTModel with a pluggable input
layer (Kronecker or BPE) and head (untied, tied, Kronecker-tied).

Everything else (transformer layers, TP/SP/PP, schedules, DDP, distributed optimizer, checkpoint
format) is megatron-core's, used as it is. The integration points:

- `LanguageModelEmbedding` is hard-coded in GPTModel.__init__: while the model is built it is
  swapped for `KroneckerLanguageModelEmbedding` (same constructor, same [s(/TP), b, h] output), so
  no V x d table is ever allocated.
- The Kronecker-tied head replaces `output_layer` inside `setup_embeddings_and_output_layer`, before
  megatron ties first and last pipeline stages: the last stage holds a copy of the projection, zeroed
  and all-reduced from the first stage, and `finalize_model_grads` all-reduces its gradient, exactly
  as for a tied BPE table.
- Tensor parallelism of the projection (docs/design.md §5): `shard_d` keeps W[:, d/TP] per rank (kernel on
  the column slice, then all-gather, or all-to-all to [s/TP, b, d] under SP); `replicated` keeps all
  of W on every rank and, under SP, embeds only the local sequence slice (W.sequence_parallel = True,
  so megatron sums its gradient over TP).
- megatron's local spec refuses sequence parallelism with torch norms; `SequenceParallelNorm`
  supplies torch LayerNorm/RMSNorm whose parameters carry `sequence_parallel`, as TE's norms do.
- Core attention (`model.attention_backend`): megatron's unfused `DotProductAttention` (`local`, the
  reference), `SDPAttention` (torch's scaled_dot_product_attention in the same slot: flash /
  memory-efficient kernels on GPU), or Transformer Engine's layer spec (`te`). Activation recompute
  (`model.recompute`) is megatron's (recompute_granularity / method / num_layers).
- Mixed precision: megatron's Float16Module (and DeepSpeed) cast the model with .bfloat16()/.half();
  the codec's alpha/beta tables stay fp64 (KroneckerEmbedding._apply, KroneckerTiedHead._apply).
"""

from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import replace

import torch
import torch.nn.functional as F
from megatron.core import parallel_state, tensor_parallel
from megatron.core.extensions.transformer_engine import HAVE_TE
from megatron.core.models.gpt import gpt_model as _gpt_model_module
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.models.gpt.gpt_model import GPTModel
from megatron.core.tensor_parallel.layers import (
    _initialize_affine_weight_cpu,
    _initialize_affine_weight_gpu,
    set_tensor_model_parallel_attributes,
)
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.utils import is_layer_window_attention, make_sharded_tensors_for_checkpoint
from megatron.core.utils import (
    get_tensor_model_parallel_group_if_none,
    make_sharded_tensor_for_checkpoint,
    make_tp_sharded_tensor_for_checkpoint,
)
from torch import nn

from ..embedding import ByteTable, KroneckerEmbedding, codec_dim, kronecker_embed_torch, scale_tables
from ..errors import KScaleError
from .config import GPTConfig, padded_vocab_size

# megatron logs "GPTModel IS DEPRECATED" on every build; HybridModel has no GPT-2-style layout we need
logging.getLogger("megatron.core.models.gpt.gpt_model").addFilter(lambda r: "DEPRECATED" not in r.getMessage())


def transformer_engine_problem() -> str | None:
    """Why Transformer Engine's layer spec cannot be used here (None when it can)."""
    if not HAVE_TE:
        return "transformer_engine is not importable"
    if not torch.cuda.is_available():
        return "Transformer Engine needs a CUDA device"
    return None


def resolve_attention_backend(name: str) -> str:
    """model.attention_backend -> local | sdpa | te. `auto` is te when Transformer Engine is usable, else
    sdpa; `te` asked for and unusable is an error (never a silent fallback)."""
    if name == "auto":
        return "te" if transformer_engine_problem() is None else "sdpa"
    if name == "te" and (problem := transformer_engine_problem()):
        raise KScaleError(
            f"model.attention_backend=te cannot run: {problem}",
            where="model.attention_backend",
            fix="install Transformer Engine on a CUDA node (megatron's TE extension must import), "
            "or use attention_backend=sdpa (torch's fused attention) or auto",
        )
    return name


def recompute_settings(recompute: str) -> dict:
    """model.recompute as megatron TransformerConfig keys: selective = the core attention of every layer
    (recompute_modules' default, core_attn); full = every transformer layer, one layer per checkpoint."""
    if recompute == "selective":
        return {"recompute_granularity": "selective"}
    if recompute == "full":
        return {"recompute_granularity": "full", "recompute_method": "uniform", "recompute_num_layers": 1}
    return {}


def transformer_config(
    cfg: GPTConfig,
    *,
    tensor_parallel: int = 1,
    pipeline_parallel: int = 1,
    sequence_parallel: bool = False,
    params_dtype=torch.float32,
    **overrides,
) -> TransformerConfig:
    cfg.validate()
    backend = resolve_attention_backend(cfg.attention_backend)
    if cfg.n_heads % tensor_parallel:
        raise KScaleError(
            f"model.n_heads={cfg.n_heads} is not divisible by tensor parallel size {tensor_parallel}",
            where="model.n_heads / parallel.tensor",
            fix="choose TP dividing the number of heads",
        )
    if cfg.n_layers % pipeline_parallel:
        raise KScaleError(
            f"model.n_layers={cfg.n_layers} is not divisible by pipeline parallel size {pipeline_parallel}",
            where="model.n_layers / parallel.pipeline",
        )
    kw = dict(
        num_layers=cfg.n_layers,
        hidden_size=cfg.d_model,
        num_attention_heads=cfg.n_heads,
        ffn_hidden_size=cfg.ffn_hidden or 4 * cfg.d_model,
        hidden_dropout=cfg.hidden_dropout,
        attention_dropout=cfg.attention_dropout,
        normalization="RMSNorm" if cfg.norm == "rmsnorm" else "LayerNorm",
        add_bias_linear=cfg.bias,
        init_method_std=cfg.init_std,
        gated_linear_unit=cfg.activation == "swiglu",
        activation_func=F.silu if cfg.activation == "swiglu" else F.gelu,
        bias_activation_fusion=False,
        masked_softmax_fusion=False,
        bias_dropout_fusion=False,
        apply_rope_fusion=False,
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
        tensor_model_parallel_size=tensor_parallel,
        pipeline_model_parallel_size=pipeline_parallel,
        sequence_parallel=sequence_parallel and tensor_parallel > 1,
        params_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
        fp16=params_dtype == torch.float16,
        use_cpu_initialization=not torch.cuda.is_available(),
        batch_p2p_comm=False,
        pipeline_dtype=params_dtype,
        transformer_impl="transformer_engine" if backend == "te" else "local",
        **recompute_settings(cfg.recompute),
    )
    kw.update(overrides)
    return TransformerConfig(**kw)


# ------------------------------------------------------------------------------------------
# norms that work under sequence parallelism
# ------------------------------------------------------------------------------------------
class SequenceParallelNorm:
    """torch LayerNorm / RMSNorm for megatron specs; params are tagged `sequence_parallel` so that
    `finalize_model_grads` sums their (per-sequence-slice) gradients over TP, as it does for TE norms."""

    def __new__(cls, config: TransformerConfig, hidden_size: int, eps: float = 1e-5, **_):
        if config.normalization == "RMSNorm":
            norm = nn.RMSNorm(hidden_size, eps=eps)
        else:
            norm = nn.LayerNorm(hidden_size, eps=eps)
        for p in norm.parameters():
            p.sequence_parallel = config.sequence_parallel
        return norm


# ------------------------------------------------------------------------------------------
# core attention: torch's scaled_dot_product_attention in megatron's slot
# ------------------------------------------------------------------------------------------
class SDPAttention(MegatronModule):
    """megatron's core attention (DotProductAttention's constructor and forward) computed by
    `F.scaled_dot_product_attention`: flash / memory-efficient kernels on GPU (no [b, h, s, s] scores kept),
    torch's fused CPU kernel on the CPU. query [sq, b, h/TP, dh], key/value [sk, b, g/TP, dh] (g < h: grouped-query
    attention) -> context [sq, b, h/TP * dh]. Attention dropout draws from megatron's CUDA RNG tracker,
    as DotProductAttention does."""

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: float | None = None,
        softmax_scale: float | None = None,
        cp_comm_type: str | None = None,
        pg_collection=None,
    ):
        super().__init__(config=config)
        if config.context_parallel_size != 1:
            raise KScaleError(
                "attention_backend=sdpa does not support context parallelism", fix="use attention_backend=te"
            )
        if config.softmax_type != "vanilla" or is_layer_window_attention(
            config.window_size, config.window_attn_skip_freq, layer_number
        ):
            raise KScaleError(
                "attention_backend=sdpa supports vanilla softmax over the full causal window only",
                fix="use attention_backend=local or te",
            )
        if pg_collection is None:
            from megatron.core.process_groups_config import ProcessGroupCollection

            pg_collection = ProcessGroupCollection.use_mpu_process_groups(required_pgs=["tp"])
        self.pg_collection = pg_collection
        self.tp_group = pg_collection.tp
        tp = self.tp_group.size()
        self.layer_number = max(1, layer_number)
        self.attn_mask_type = attn_mask_type
        self.attention_type = attention_type
        self.heads = config.num_attention_heads // tp
        self.groups = config.num_query_groups // tp
        head_dim = config.kv_channels
        # apply_query_key_layer_scaling divides and multiplies by the same coefficient in megatron: no-op here
        self.softmax_scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(head_dim)
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask,
        attn_mask_type: AttnMaskType | None = None,
        attention_bias=None,
        packed_seq_params=None,
    ):
        if packed_seq_params is not None or attention_bias is not None:
            raise KScaleError(
                "attention_backend=sdpa has no packed sequences or attention bias", fix="use attention_backend=te"
            )
        mask_type = attn_mask_type if attn_mask_type is not None else self.attn_mask_type
        sq, b = query.shape[0], query.shape[1]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, heads, s, dh]
        # as megatron's softmax: a given mask wins; else causal (nothing to mask for a single query)
        mask = None if attention_mask is None else ~attention_mask  # megatron: True = masked; torch: True = keep
        causal = mask is None and mask_type == AttnMaskType.causal and sq > 1
        dropout = self.dropout_p if self.training else 0.0
        kwargs = {"enable_gqa": True} if self.heads != self.groups else {}
        rng = (
            tensor_parallel.get_cuda_rng_tracker().fork()
            if not self.config.sequence_parallel
            else contextlib.nullcontext()
        )
        with rng:
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=causal, scale=self.softmax_scale, **kwargs
            )
        return out.permute(2, 0, 1, 3).reshape(sq, b, -1)  # [sq, b, heads * dh]

    def sharded_state_dict(self, prefix: str = "", sharded_offsets=(), metadata=None):
        return {}  # no parameters (as DotProductAttention with vanilla softmax)


def layer_spec(
    config: TransformerConfig, vp_stage: int | None = None, attention_backend: str = "local"
) -> TransformerBlockSubmodules:
    """The GPT layer spec for this PP stage. local / sdpa: megatron's local spec with
    sequence-parallel-capable norms (sdpa: SDPAttention as core attention); te: Transformer Engine's spec
    (fused norm + linear, TE's fused attention, TE norms)."""
    n = get_num_layers_to_build(config, vp_stage=vp_stage)
    if attention_backend == "te":
        from megatron.core.extensions.transformer_engine import TENorm
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

        return TransformerBlockSubmodules(
            layer_specs=[get_gpt_layer_with_transformer_engine_spec()] * n, layer_norm=TENorm
        )
    spec = get_gpt_layer_local_spec(normalization=config.normalization)
    attention = spec.submodules.self_attention
    if attention_backend == "sdpa":
        attention = replace(attention, submodules=replace(attention.submodules, core_attention=SDPAttention))
    spec = replace(
        spec,
        submodules=replace(
            spec.submodules,
            input_layernorm=SequenceParallelNorm,
            pre_mlp_layernorm=SequenceParallelNorm,
            self_attention=attention,
        ),
    )
    return TransformerBlockSubmodules(layer_specs=[spec] * n, layer_norm=SequenceParallelNorm)


# ------------------------------------------------------------------------------------------
# the Kronecker input layer
# ------------------------------------------------------------------------------------------
def _init_projection(
    weight: torch.Tensor, config: TransformerConfig, sharded: bool, tp_rank: int, tp_size: int, d_model: int
) -> None:
    """N(0, 1/D) init, identical for every TP layout given the seed (full master weight, then split)."""
    D = weight.shape[0]
    init = lambda w: nn.init.normal_(w, 0.0, 1.0 / math.sqrt(D))  # noqa: E731
    if not config.perform_initialization:
        return
    if sharded:
        if config.use_cpu_initialization:
            _initialize_affine_weight_cpu(
                weight,
                D,
                d_model,
                weight.shape[1],
                1,
                init,
                params_dtype=config.params_dtype,
                rank=tp_rank,
                world_size=tp_size,
            )
        else:
            _initialize_affine_weight_gpu(weight, init, partition_dim=1)
    else:
        with torch.no_grad():
            master = torch.empty(D, d_model, dtype=torch.float32, device=weight.device)
            init(master)  # default generator: the same on every TP rank for one seed
            weight.copy_(master.to(weight.dtype))


class KroneckerLanguageModelEmbedding(MegatronModule):
    """Drop-in for megatron's LanguageModelEmbedding: ids [b, s] -> embeddings [s(/TP), b, h]."""

    def __init__(
        self,
        config: TransformerConfig,
        vocab_size: int,
        max_sequence_length: int,
        position_embedding_type: str = "learned_absolute",
        num_tokentypes: int = 0,
        scatter_to_sequence_parallel: bool = True,
        tp_group=None,
        *,
        byte_table: ByteTable,
        model_cfg: GPTConfig,
    ):
        super().__init__(config=config)
        if num_tokentypes:
            raise KScaleError("token types are not supported by the Kronecker input layer")
        if not scatter_to_sequence_parallel and config.sequence_parallel:
            raise KScaleError("the Kronecker input layer always produces the sequence-parallel slice itself")
        if byte_table.vocab_size != vocab_size:
            raise KScaleError(
                f"byte table has {byte_table.vocab_size} rows but the model's padded vocabulary is {vocab_size}",
                fix="pad the byte table with the model's rule (padded_vocab_size)",
            )
        self.tp_group = get_tensor_model_parallel_group_if_none(tp_group)
        self.tp_size, self.tp_rank = self.tp_group.size(), self.tp_group.rank()
        self.mode = model_cfg.kronecker_tp
        self.scatter_to_sequence_parallel = True
        d = config.hidden_size
        d_local = d // self.tp_size if self.mode == "shard_d" else d
        device = "cpu" if config.use_cpu_initialization else torch.cuda.current_device()
        self.word_embeddings = KroneckerEmbedding(
            byte_table,
            d_local,
            length_normalize=model_cfg.length_normalize,
            z_normalize=model_cfg.z_normalize,
            eps=model_cfg.codec_eps,
            impl=model_cfg.embedding_impl,
            deterministic=model_cfg.deterministic_embedding,
            device=device,
            dtype=config.params_dtype,
        )
        weight = self.word_embeddings.weight
        _init_projection(weight, config, self.mode == "shard_d", self.tp_rank, self.tp_size, d)
        if self.mode == "shard_d":
            if not hasattr(weight, "tensor_model_parallel"):  # the CPU initializer sets them already
                set_tensor_model_parallel_attributes(weight, True, 1, 1)
        else:
            weight.sequence_parallel = config.sequence_parallel
        self.add_position_embedding = position_embedding_type == "learned_absolute"
        if self.add_position_embedding:
            self.position_embeddings = nn.Embedding(max_sequence_length, d, device=device, dtype=config.params_dtype)
            if config.perform_initialization:
                config.embedding_init_method(self.position_embeddings.weight)
            # under SP each rank adds positions for its own slice only: sum the gradient over TP
            self.position_embeddings.weight.sequence_parallel = config.sequence_parallel
        self.embedding_dropout = nn.Dropout(config.hidden_dropout)

    def _local_slice(self, t: torch.Tensor) -> torch.Tensor:
        chunk = t.shape[0] // self.tp_size
        return t[self.tp_rank * chunk : (self.tp_rank + 1) * chunk]

    def forward(
        self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None, tokentype_ids=None
    ) -> torch.Tensor:
        sp = self.config.sequence_parallel
        ids = input_ids.t().contiguous()  # [s, b]: megatron's activation layout
        s, b = ids.shape
        if sp and s % self.tp_size:
            raise KScaleError(f"sequence length {s} is not divisible by TP={self.tp_size} (sequence parallel)")
        if self.mode == "replicated":
            emb = self.word_embeddings(self._local_slice(ids) if sp else ids)
        else:
            local = self.word_embeddings(ids)  # [s, b, d/TP]: this rank's columns, all tokens
            if self.tp_size == 1:
                emb = local
            elif sp:  # -> [s/TP, b, d]
                emb = tensor_parallel.all_to_all_hp2sp(local.reshape(s * b, -1), group=self.tp_group)
                emb = emb.reshape(s // self.tp_size, b, -1)
            else:  # -> [s, b, d]; backward keeps own columns
                emb = tensor_parallel.gather_from_tensor_model_parallel_region(local, group=self.tp_group)
        if self.add_position_embedding:
            pos = position_ids.t()  # type: ignore[union-attr]  # megatron passes them to position embeddings
            emb = emb + self.position_embeddings(self._local_slice(pos) if sp else pos)
        if self.config.use_mup and self.config.mup_embedding_mult != 1.0:
            emb = emb * self.config.mup_embedding_mult
        if self.config.fp32_residual_connection:
            emb = emb.float()
        if sp:
            if self.config.clone_scatter_output_in_embedding:
                emb = emb.clone()
            with tensor_parallel.get_cuda_rng_tracker().fork():
                return self.embedding_dropout(emb)
        return self.embedding_dropout(emb)

    def sharded_state_dict(self, prefix: str = "", sharded_offsets=(), metadata=None):
        state = self.state_dict(prefix="", keep_vars=True)
        axis = {"word_embeddings.weight": 1} if self.mode == "shard_d" else {}
        # both groups: TP decides the shard / replica along d, DP(+CP) which copy is the main one
        dp_cp = parallel_state.get_data_parallel_group(with_context_parallel=True)
        sharded = make_sharded_tensors_for_checkpoint(
            state, prefix, axis, sharded_offsets, tp_group=self.tp_group, dp_cp_group=dp_cp
        )
        # the padded vocabulary is a multiple of divisible_by x TP, so the byte table's row count follows the
        # layout; like megatron's vocab-sized weights it may differ on load (the fingerprint must not)
        for key in ("word_embeddings.token_bytes", "word_embeddings.token_lengths"):
            sharded[prefix + key].allow_shape_mismatch = True
        return sharded


# ------------------------------------------------------------------------------------------
# the Kronecker-tied head: logits against the table rebuilt from codec + projection
# ------------------------------------------------------------------------------------------
class KroneckerTiedHead(MegatronModule):
    """Logits for this rank's vocab shard against E = codec(ids) @ W, rebuilt every step.

    Called like megatron's output ColumnParallelLinear: (hidden, weight=W, runtime_gather_output)
    -> (logits [s, b, V/TP], None). W is the shared projection (the embedding's on the first stage,
    this module's copy on a last-only pipeline stage).
    """

    def __init__(
        self,
        config: TransformerConfig,
        byte_table: ByteTable,
        model_cfg: GPTConfig,
        allocate_weight: bool,
        parallel_output: bool = True,
        tp_group=None,
    ):
        super().__init__(config=config)
        self.tp_group = get_tensor_model_parallel_group_if_none(tp_group)
        self.tp_size, self.tp_rank = self.tp_group.size(), self.tp_group.rank()
        self.mode = model_cfg.kronecker_tp
        self.parallel_output = parallel_output
        self.embedding_impl, self.deterministic = model_cfg.embedding_impl, model_cfg.deterministic_embedding
        self.logit_scale = 1.0 / math.sqrt(config.hidden_size)
        V = byte_table.vocab_size
        shard = V // self.tp_size
        device = "cpu" if config.use_cpu_initialization else torch.cuda.current_device()
        ids = torch.arange(self.tp_rank * shard, (self.tp_rank + 1) * shard, device=device)
        self.register_buffer("token_bytes", byte_table.bytes[ids.cpu()].to(device), persistent=False)
        self.register_buffer("token_lengths", byte_table.lengths[ids.cpu()].to(device), persistent=False)
        alpha, beta = scale_tables(
            byte_table.pos_dim,
            length_normalize=model_cfg.length_normalize,
            z_normalize=model_cfg.z_normalize,
            eps=model_cfg.codec_eps,
        )
        self.register_buffer("alpha", alpha.to(device), persistent=False)
        self.register_buffer("beta", beta.to(device), persistent=False)
        if allocate_weight:
            d_local = config.hidden_size // self.tp_size if self.mode == "shard_d" else config.hidden_size
            self.weight = nn.Parameter(
                torch.zeros(codec_dim(byte_table.pos_dim), d_local, device=device, dtype=config.params_dtype)
            )
            if self.mode == "shard_d":
                set_tensor_model_parallel_attributes(self.weight, True, 1, 1)
            else:
                self.weight.sequence_parallel = config.sequence_parallel
        else:
            self.weight = None

    def _apply(self, fn, recurse=True):
        """Casts of the module (Float16Module's .bfloat16(), DeepSpeed's .half()) leave alpha/beta in fp64:
        they are cast where used (docs/design.md §2); in bf16 they would be ~0.2 % off per length."""
        tables = {name: getattr(self, name) for name in ("alpha", "beta")}
        super()._apply(fn, recurse)
        for name, fp64 in tables.items():
            now = getattr(self, name)
            if now.dtype != torch.float64:
                setattr(self, name, fp64.to(now.device))
        return self

    def forward(self, hidden: torch.Tensor, weight: torch.Tensor | None = None, runtime_gather_output=None):
        W = weight if weight is not None else self.weight
        sp = self.config.sequence_parallel
        if self.tp_size > 1 and self.mode == "shard_d":
            # all columns for the logits; backward reduce-scatters each rank's partial dW to its shard
            W = tensor_parallel.all_gather_last_dim_from_tensor_parallel_region(W, group=self.tp_group)
        elif self.tp_size > 1 and not sp:
            # replicated W without SP: each rank's head gradient is partial (its vocab shard): all-reduce it
            W = tensor_parallel.copy_to_tensor_model_parallel_region(W, group=self.tp_group)
        if W.is_cuda and self.embedding_impl in ("auto", "triton"):  # the fused kernels, as the input layer
            from kronecker_scale.kernels import kronecker_embedding_triton

            local_ids = torch.arange(self.token_lengths.numel(), device=W.device)  # this shard's rows of the table
            table = kronecker_embedding_triton(
                local_ids,
                self.token_bytes,
                self.token_lengths,
                W,
                self.alpha,
                self.beta,
                deterministic=self.deterministic,
            )  # [V/TP, d]
        else:
            table = kronecker_embed_torch(self.token_bytes, self.token_lengths, W, self.alpha, self.beta)  # [V/TP, d]
        if sp:
            hidden = tensor_parallel.gather_from_sequence_parallel_region(hidden, group=self.tp_group)
        elif self.tp_size > 1:
            hidden = tensor_parallel.copy_to_tensor_model_parallel_region(hidden, group=self.tp_group)
        # rows of the rebuilt table have norm ~sqrt(d) (unit-variance entries), so logits are scaled by
        # 1/sqrt(d) as T5 does for tied embeddings; otherwise they start with std ~sqrt(d)
        logits = torch.matmul(hidden, table.t()) * self.logit_scale
        gather = not self.parallel_output if runtime_gather_output is None else runtime_gather_output
        if gather and self.tp_size > 1:
            logits = tensor_parallel.gather_from_tensor_model_parallel_region(logits, group=self.tp_group)
        return logits, None


# ------------------------------------------------------------------------------------------
# the model
# ------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _kronecker_input_layer(byte_table: ByteTable, model_cfg: GPTConfig):
    """While GPTModel.__init__ runs, build our input layer where it builds LanguageModelEmbedding."""
    original = _gpt_model_module.LanguageModelEmbedding

    def factory(**kwargs):
        return KroneckerLanguageModelEmbedding(**kwargs, byte_table=byte_table, model_cfg=model_cfg)

    _gpt_model_module.LanguageModelEmbedding = factory
    try:
        yield
    finally:
        _gpt_model_module.LanguageModelEmbedding = original


class KroneckerGPTModel(GPTModel):
    """megatron-core's GPTModel with this project's input layers and heads."""

    def __init__(
        self,
        config: TransformerConfig,
        model_cfg: GPTConfig,
        vocab_size: int,
        byte_table: ByteTable | None = None,
        pre_process: bool = True,
        post_process: bool = True,
        real_vocab_size: int | None = None,
        vp_stage: int | None = None,
        parallel_output: bool = True,
    ):
        model_cfg.validate()
        object.__setattr__(self, "_kscale", (model_cfg, byte_table))  # read by setup_embeddings_and_output_layer
        share = model_cfg.head in ("tied", "kronecker_tied")
        ctx = (
            _kronecker_input_layer(byte_table, model_cfg)  # type: ignore[arg-type]  # build_model checks it is set
            if model_cfg.input_layer == "kronecker"
            else contextlib.nullcontext()
        )
        spec = layer_spec(config, vp_stage, resolve_attention_backend(model_cfg.attention_backend))
        with ctx:
            super().__init__(
                config,
                spec,
                vocab_size,
                model_cfg.seq_len,
                pre_process=pre_process,
                post_process=post_process,
                parallel_output=parallel_output,
                share_embeddings_and_output_weights=share,
                position_embedding_type=model_cfg.position,
                vp_stage=vp_stage,
            )
        self.model_cfg = model_cfg
        # the tokenizer's ids; the padded ones beyond take no probability mass (`_scale_logits`)
        self.real_vocab_size = real_vocab_size if real_vocab_size is not None else vocab_size
        if model_cfg.input_layer == "bpe" and real_vocab_size is not None and pre_process:
            self._zero_padded_rows(real_vocab_size)

    def _scale_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """megatron's hook on the output layer's logits (MuP scaling), called on every path that makes
        logits (training loss, evaluation, inference) before the cross-entropy: here it also masks the
        padded ids, so that losses are over the real vocabulary (docs/design.md §5), whatever the padding
        (divisible_by x TP) and the head (untied padded rows are initialised and would learn; zero rows
        would give logit 0). Logits are this rank's vocab shard [.., V/TP] (or all of them when gathered):
        the columns whose global id >= real_vocab_size get the dtype's most negative finite value, not
        -inf: exp() of it is exactly 0 all the same, and it cannot make NaN (-inf - -inf) in a
        cross-entropy whose running max starts on a block (or a TP shard) that is all padding, as the
        fused / online-softmax kernels may. Their gradient is zero (masked_fill)."""
        logits = super()._scale_logits(logits)
        real, padded, n = self.real_vocab_size, self.vocab_size, logits.shape[-1]
        if real >= padded:
            return logits
        start = 0 if n == padded else self.pg_collection.tp.rank() * n
        if start + n <= real:  # this shard is all real ids
            return logits
        ids = torch.arange(start, start + n, device=logits.device)
        return logits.masked_fill(ids >= real, torch.finfo(logits.dtype).min)

    def setup_embeddings_and_output_layer(self) -> None:
        model_cfg, byte_table = self._kscale
        if model_cfg.head == "kronecker_tied" and self.post_process:
            self.output_layer = KroneckerTiedHead(
                self.config,
                byte_table,
                model_cfg,
                allocate_weight=not self.pre_process,
                parallel_output=self.parallel_output,
                tp_group=self.pg_collection.tp,
            )
        super().setup_embeddings_and_output_layer()

    def _zero_padded_rows(self, real_vocab_size: int) -> None:
        """BPE: padded ids embed to zero (their rows of this rank's vocab shard)."""
        emb = self.embedding.word_embeddings
        start = emb.vocab_start_index
        with torch.no_grad():
            local = torch.arange(start, start + emb.weight.shape[0])
            emb.weight[local >= real_vocab_size] = 0

    def tie_embeddings_and_output_weights_state_dict(
        self,
        sharded_state_dict,
        output_layer_weight_key,
        first_stage_word_emb_key,
        metadata={},  # noqa: B006 (megatron's signature)
    ):
        model_cfg, _ = self._kscale
        if model_cfg.head != "kronecker_tied" or not self.post_process or self.pre_process:
            return super().tie_embeddings_and_output_weights_state_dict(
                sharded_state_dict, output_layer_weight_key, first_stage_word_emb_key, metadata
            )
        # the last stage's copy of the projection is a replica of the first stage's, sharded the same way
        del sharded_state_dict[output_layer_weight_key]
        dp = parallel_state.get_data_parallel_rank(with_context_parallel=True)
        tensor = self.shared_embedding_or_output_weight()
        if model_cfg.kronecker_tp == "shard_d":
            sharded_state_dict[output_layer_weight_key] = make_tp_sharded_tensor_for_checkpoint(
                tensor=tensor, key=first_stage_word_emb_key, tp_axis=1, replica_id=(1, 0, dp)
            )
        else:
            tp = parallel_state.get_tensor_model_parallel_rank()
            sharded_state_dict[output_layer_weight_key] = make_sharded_tensor_for_checkpoint(
                tensor=tensor, key=first_stage_word_emb_key, replica_id=(1, tp, dp)
            )


def build_model(
    model_cfg: GPTConfig,
    config: TransformerConfig,
    *,
    byte_table: ByteTable | None = None,
    vocab_size: int | None = None,
    pre_process: bool | None = None,
    post_process: bool | None = None,
    vp_stage: int | None = None,
) -> KroneckerGPTModel:
    """The GPT for this rank's pipeline stage. Kronecker needs the byte table; BPE a vocab size.

    The vocabulary is padded with `padded_vocab_size` (divisible_by x TP) for both input layers.
    """
    tp = config.tensor_model_parallel_size
    if pre_process is None:
        pre_process = parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage)
    if post_process is None:
        post_process = parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage)
    if model_cfg.input_layer == "kronecker" or model_cfg.head == "kronecker_tied":
        if byte_table is None:
            raise KScaleError("the Kronecker input layer needs a byte table", fix="pass byte_table=ByteTable(...)")
        real = byte_table.num_token_ids  # the tokenizer's ids (a table may come padded already)
        byte_table = byte_table.pad_to(model_cfg.vocab_divisible_by * tp)
        padded = byte_table.vocab_size
    else:
        if vocab_size is None:
            raise KScaleError("the BPE input layer needs vocab_size")
        real, padded = vocab_size, padded_vocab_size(vocab_size, model_cfg.vocab_divisible_by, tp)
    return KroneckerGPTModel(
        config,
        model_cfg,
        padded,
        byte_table,
        pre_process=pre_process,
        post_process=post_process,
        real_vocab_size=real,
        vp_stage=vp_stage,
    )
