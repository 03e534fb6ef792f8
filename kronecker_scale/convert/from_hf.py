"""Retrofit a trained model: `kscale convert from-hf HF_DIR OUT_DIR [--pos-dim P] [--byte-source exact|decode]`.

Reads a stock transformers GPT-2 or Llama checkpoint from disk, keeps every transformer weight (and the
output head), and replaces the input table E [V, d] by a Kronecker projection W [256·P, d] fitted by
least squares: W minimises ||C W - E||² + lam ||W||², where C [V, D] is the codec matrix of the
vocabulary (docs/design.md §2: row t is alpha(L_t) on the token's <= P cells plus beta(L_t) everywhere,
C = A + b 1ᵀ with A sparse). The normal equations are solved in fp64:

    (CᵀC + lam I) W = CᵀE,     CᵀC = AᵀA + (Aᵀb) 1ᵀ + 1 (Aᵀb)ᵀ + (bᵀb) 1 1ᵀ,     CᵀE = AᵀE + 1 (bᵀE)

AᵀA, Aᵀb and AᵀE are accumulated chunk by chunk over the vocabulary from the byte table (each token adds
alpha² to the <= P² cell pairs it touches): no [V, D] matrix is ever built. lam = ridge x mean(diag CᵀC)
(cells no token uses make CᵀC singular; the ridge gives them the smallest weights). Tokens with no bytes
(L = 0) embed to zero whatever W is and are left out of the fit.

Output, a run directory that `kscale train OUT_DIR/config.yaml` continues from:
- config.yaml: the model (Kronecker input, untied head holding the original output matrix, the
  transformer's shape), the tokenizer (copied into OUT_DIR/tokenizer/), run.dir = OUT_DIR, data.train
  from --data (or set it on the command line), a continued-training starting point (lr 1e-4 cosine to
  1e-5, no warmup, 100 steps: override any of it);
- checkpoints/step_00000000 (+ latest): a step-0 checkpoint written by the megatron engine itself
  (MegatronEngine, checkpoint.save: model, optimizer with zero moments, which updates exactly as a
  fresh AdamW, run state, the byte table), with a data-loader state that starts the first epoch;
- byte_table.safetensors; retrofit.json: the fit (R² over rows, relative Frobenius residual, mean row
  cosine) and the held-out loss on sample text of the original model, of the original model fed the
  fitted table (transformers, isolates the fit) and of the retrofitted checkpoint (our framework).

Mapping (the inverse of to_hf.py): GPT-2 Conv1D weights are transposed, c_attn's [q | k | v] become
megatron's fused QKV grouped per head; Llama's q/k/v become the fused QKV, gate/up become fc1. What our
model cannot express is refused (GQA, other RoPE bases or scalings, attention-scaling variants); what it
computes slightly differently is listed in the report's `approximations` (GPT-2's tanh GELU runs as
the exact erf GELU; a norm epsilon other than 1e-5).
"""

from __future__ import annotations

import json
import math
import shutil
import sys
import time
from pathlib import Path

import torch

from ..errors import KScaleError

NORM_EPS = 1e-5  # megatron's layernorm_epsilon, which transformer_config keeps
ROPE_BASE = 10000.0  # GPTModel's default rotary_base
# held-out sample text (public domain: Austen, Melville, Dickens, Twain)
SAMPLE_TEXT = (
    "It is a truth universally acknowledged, that a single man in possession of a good fortune, must be in "
    "want of a wife. However little known the feelings or views of such a man may be on his first entering a "
    "neighbourhood, this truth is so well fixed in the minds of the surrounding families, that he is "
    "considered the rightful property of some one or other of their daughters.\n\n"
    "Call me Ishmael. Some years ago, never mind how long precisely, having little or no money in my purse, "
    "and nothing particular to interest me on shore, I thought I would sail about a little and see the watery "
    "part of the world. It is a way I have of driving off the spleen, and regulating the circulation.\n\n"
    "It was the best of times, it was the worst of times, it was the age of wisdom, it was the age of "
    "foolishness, it was the epoch of belief, it was the epoch of incredulity, it was the season of Light, it "
    "was the season of Darkness, it was the spring of hope, it was the winter of despair, we had everything "
    "before us, we had nothing before us.\n\n"
    "You don't know about me without you have read a book by the name of The Adventures of Tom Sawyer; but "
    "that ain't no matter. That book was made by Mr. Mark Twain, and he told the truth, mainly. There was "
    "things which he stretched, but mainly he told the truth.\n"
)


# --- reading the transformers checkpoint --------------------------------------------------------------
def _rope_theta(config) -> tuple[float | None, str]:
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    theta = getattr(config, "rope_theta", None)
    if theta is None and isinstance(params, dict):
        theta = params.get("rope_theta")
    kind = (params.get("rope_type") or params.get("type") or "default") if isinstance(params, dict) else "default"
    return theta, kind


def merge_qkv(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, n_heads: int, n_groups: int, head_dim: int
) -> torch.Tensor:
    """q [nq hd, ...], k, v [ng hd, ...] -> megatron's fused QKV, grouped per query group
    [q heads of the group, k, v] (the inverse of to_hf.split_qkv)."""
    per_group = n_heads // n_groups
    rest = q.shape[1:]
    g = torch.cat(
        [
            q.reshape(n_groups, per_group * head_dim, *rest),
            k.reshape(n_groups, head_dim, *rest),
            v.reshape(n_groups, head_dim, *rest),
        ],
        dim=1,
    )
    return g.reshape((n_heads + 2 * n_groups) * head_dim, *rest)


def read_hf(hf_dir: str | Path, seq_len: int | None = None):
    """(transformers model (fp32, eval), {model: GPTConfig fields}, {megatron name: tensor} without the
    input layer, input table E [V_hf, d], output matrix [V_hf, d], approximations)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    hf_dir = Path(hf_dir)
    if not (hf_dir / "config.json").is_file():
        raise KScaleError(
            "not a transformers model folder (no config.json)",
            where=str(hf_dir),
            fix="give the folder save_pretrained wrote (config.json + model.safetensors)",
        )
    from transformers.utils import logging as hf_logging

    config = AutoConfig.from_pretrained(str(hf_dir))
    kind = config.model_type
    if kind not in ("gpt2", "llama"):
        raise KScaleError(
            f"model_type {kind!r} is not supported",
            where=str(hf_dir / "config.json"),
            fix="retrofit a GPT-2 or Llama architecture model",
        )
    bar = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # no "Loading weights" bar in the command's output
    try:
        model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).eval()
    finally:
        if bar:
            hf_logging.enable_progress_bar()
    sd = {k: v.detach().float() for k, v in model.state_dict().items()}
    approx: list[str] = []
    if kind == "gpt2":
        fields, weights, table, head = _from_gpt2(config, sd, seq_len, approx)
    else:
        fields, weights, table, head = _from_llama(config, sd, seq_len, approx)
    return model, fields, weights, table, head, approx


def _refuse(what: str, hf_dir_key: str, fix: str):
    raise KScaleError(what, where=f"config.json: {hf_dir_key}", fix=fix)


def _from_gpt2(c, sd, seq_len, approx):
    d, h, n_layers = c.n_embd, c.n_head, c.n_layer
    hd, ffn = d // h, c.n_inner or 4 * c.n_embd
    if getattr(c, "scale_attn_by_inverse_layer_idx", False):
        _refuse(
            "scale_attn_by_inverse_layer_idx=true has no megatron equivalent",
            "scale_attn_by_inverse_layer_idx",
            "retrofit a model trained without it",
        )
    if not getattr(c, "scale_attn_weights", True):
        _refuse(
            "scale_attn_weights=false has no megatron equivalent",
            "scale_attn_weights",
            "retrofit a model with the usual 1/sqrt(head_dim) attention scale",
        )
    act = c.activation_function
    if act in ("gelu_new", "gelu_pytorch_tanh", "gelu_fast"):
        approx.append(f"activation_function={act} (tanh GELU) runs as megatron's exact erf GELU")
    elif act != "gelu":
        _refuse(f"activation_function={act!r} is not a GELU", "activation_function", "use a GELU model")
    if abs(c.layer_norm_epsilon - NORM_EPS) > 1e-12:
        approx.append(f"layer_norm_epsilon={c.layer_norm_epsilon:g} runs as {NORM_EPS:g}")
    T = seq_len or c.n_positions
    if T > c.n_positions:
        _refuse(
            f"--seq-len {T} exceeds the model's {c.n_positions} learned positions",
            "n_positions",
            "use a sequence length up to n_positions",
        )
    fields = {
        "n_layers": n_layers,
        "d_model": d,
        "n_heads": h,
        "ffn_hidden": ffn,
        "seq_len": T,
        "position": "learned_absolute",
        "norm": "layernorm",
        "activation": "gelu",
        "bias": True,
    }
    out = {"embedding.position_embeddings.weight": sd["transformer.wpe.weight"][:T]}
    for i in range(n_layers):
        o, m = f"transformer.h.{i}.", f"decoder.layers.{i}."
        q, k, v = sd[o + "attn.c_attn.weight"].t().split(d, 0)
        qb, kb, vb = sd[o + "attn.c_attn.bias"].split(d, 0)
        out.update(
            {
                m + "input_layernorm.weight": sd[o + "ln_1.weight"],
                m + "input_layernorm.bias": sd[o + "ln_1.bias"],
                m + "self_attention.linear_qkv.weight": merge_qkv(q, k, v, h, h, hd),
                m + "self_attention.linear_qkv.bias": merge_qkv(qb, kb, vb, h, h, hd),
                m + "self_attention.linear_proj.weight": sd[o + "attn.c_proj.weight"].t(),
                m + "self_attention.linear_proj.bias": sd[o + "attn.c_proj.bias"],
                m + "pre_mlp_layernorm.weight": sd[o + "ln_2.weight"],
                m + "pre_mlp_layernorm.bias": sd[o + "ln_2.bias"],
                m + "mlp.linear_fc1.weight": sd[o + "mlp.c_fc.weight"].t(),
                m + "mlp.linear_fc1.bias": sd[o + "mlp.c_fc.bias"],
                m + "mlp.linear_fc2.weight": sd[o + "mlp.c_proj.weight"].t(),
                m + "mlp.linear_fc2.bias": sd[o + "mlp.c_proj.bias"],
            }
        )
    out["decoder.final_layernorm.weight"] = sd["transformer.ln_f.weight"]
    out["decoder.final_layernorm.bias"] = sd["transformer.ln_f.bias"]
    table = sd["transformer.wte.weight"]
    head = sd.get("lm_head.weight", table)
    return fields, {k: v.contiguous() for k, v in out.items()}, table, head


def _from_llama(c, sd, seq_len, approx):
    d, h, n_layers = c.hidden_size, c.num_attention_heads, c.num_hidden_layers
    hd = getattr(c, "head_dim", None) or d // h
    groups = getattr(c, "num_key_value_heads", None) or h
    if groups != h:
        _refuse(
            f"grouped-query attention ({groups} key/value heads for {h} query heads) is not in the model config",
            "num_key_value_heads",
            "retrofit a model with num_key_value_heads = num_attention_heads",
        )
    if hd * h != d:
        _refuse(f"head_dim={hd} x {h} heads != hidden_size={d}", "head_dim", "use head_dim = hidden_size / heads")
    theta, rope_kind = _rope_theta(c)
    if rope_kind != "default" or theta is None or abs(float(theta) - ROPE_BASE) > 1e-6:
        _refuse(
            f"RoPE {rope_kind} with base {theta} (the model config has base {ROPE_BASE:g}, no scaling)",
            "rope_parameters",
            "retrofit a model with rope_theta=10000 and no RoPE scaling",
        )
    if c.hidden_act != "silu":
        _refuse(f"hidden_act={c.hidden_act!r} (the model config has SwiGLU: silu)", "hidden_act", "use silu")
    bias = bool(getattr(c, "attention_bias", False))
    if bool(getattr(c, "mlp_bias", False)) != bias:
        _refuse(
            "attention_bias and mlp_bias differ (the model config has one bias switch)",
            "mlp_bias",
            "retrofit a model with both or neither",
        )
    if abs(c.rms_norm_eps - NORM_EPS) > 1e-12:
        approx.append(f"rms_norm_eps={c.rms_norm_eps:g} runs as {NORM_EPS:g}")
    T = seq_len or c.max_position_embeddings
    ffn = c.intermediate_size
    fields = {
        "n_layers": n_layers,
        "d_model": d,
        "n_heads": h,
        "ffn_hidden": ffn,
        "seq_len": T,
        "position": "rope",
        "norm": "rmsnorm",
        "activation": "swiglu",
        "bias": bias,
    }
    out = {}
    for i in range(n_layers):
        o, m = f"model.layers.{i}.", f"decoder.layers.{i}."
        qkv = [sd[o + f"self_attn.{x}_proj.weight"] for x in "qkv"]
        out.update(
            {
                m + "input_layernorm.weight": sd[o + "input_layernorm.weight"],
                m + "self_attention.linear_qkv.weight": merge_qkv(*qkv, h, groups, hd),
                m + "self_attention.linear_proj.weight": sd[o + "self_attn.o_proj.weight"],
                m + "pre_mlp_layernorm.weight": sd[o + "post_attention_layernorm.weight"],
                m + "mlp.linear_fc1.weight": torch.cat([sd[o + "mlp.gate_proj.weight"], sd[o + "mlp.up_proj.weight"]]),
                m + "mlp.linear_fc2.weight": sd[o + "mlp.down_proj.weight"],
            }
        )
        if bias:
            qkvb = [sd[o + f"self_attn.{x}_proj.bias"] for x in "qkv"]
            out.update(
                {
                    m + "self_attention.linear_qkv.bias": merge_qkv(*qkvb, h, groups, hd),
                    m + "self_attention.linear_proj.bias": sd[o + "self_attn.o_proj.bias"],
                    m + "mlp.linear_fc1.bias": torch.cat([sd[o + "mlp.gate_proj.bias"], sd[o + "mlp.up_proj.bias"]]),
                    m + "mlp.linear_fc2.bias": sd[o + "mlp.down_proj.bias"],
                }
            )
    out["decoder.final_layernorm.weight"] = sd["model.norm.weight"]
    table = sd["model.embed_tokens.weight"]
    head = sd.get("lm_head.weight", table)
    return fields, {k: v.contiguous() for k, v in out.items()}, table, head


# --- the least-squares fit -------------------------------------------------------------------------
def normal_equations(
    token_bytes: torch.Tensor,
    lengths: torch.Tensor,
    E: torch.Tensor,
    alpha: torch.Tensor,
    beta: torch.Tensor,
    chunk: int = 4096,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(CᵀC [D, D], CᵀE [D, d]) in fp64 for the codec rows of these tokens (module docstring), accumulated
    over chunks of tokens: the largest temporary is one chunk's <= P² cell pairs."""
    N, P = token_bytes.shape
    D, d = 256 * P, E.shape[1]
    alpha, beta = alpha.double(), beta.double()
    gram = torch.zeros(D * D, dtype=torch.float64)
    AtE = torch.zeros(D, d, dtype=torch.float64)
    Atb = torch.zeros(D, dtype=torch.float64)
    btb, btE = torch.zeros((), dtype=torch.float64), torch.zeros(d, dtype=torch.float64)
    pos = torch.arange(P)
    for s in range(0, N, chunk):
        tb, L, e = token_bytes[s : s + chunk], lengths[s : s + chunk].long(), E[s : s + chunk].double()
        a, b = alpha[L], beta[L]
        cells = tb.long() * P + pos  # [n, P] flat cell index byte*P + pos
        valid = pos[None, :] < L[:, None]
        pair = valid[:, :, None] & valid[:, None, :]  # [n, P, P]
        flat = (cells[:, :, None] * D + cells[:, None, :])[pair]
        gram.index_add_(0, flat, (a * a)[:, None, None].expand(-1, P, P)[pair])
        rows = cells[valid]  # token-major, L_t rows per token
        AtE.index_add_(0, rows, (e * a[:, None]).repeat_interleave(L, 0))
        Atb.index_add_(0, rows, (a * b).repeat_interleave(L))
        btb += (b * b).sum()
        btE += (b[:, None] * e).sum(0)
    G = gram.view(D, D)
    G += Atb[:, None] + Atb[None, :] + btb
    return G, AtE + btE[None, :]


def fit_projection(
    byte_table,
    E: torch.Tensor,
    *,
    length_normalize: bool = True,
    z_normalize: bool = True,
    eps: float = 1e-6,
    ridge: float = 1e-6,
    chunk: int = 4096,
) -> tuple[torch.Tensor, dict]:
    """W [D, d] fp64 minimising ||C W - E||² + lam ||W||² over the tokens with bytes, and the fit's figures."""
    from ..embedding.codec import scale_tables

    t0 = time.perf_counter()
    n = E.shape[0]
    tb, L = byte_table.bytes[:n], byte_table.lengths[:n]
    used = L > 0
    alpha, beta = scale_tables(byte_table.pos_dim, length_normalize=length_normalize, z_normalize=z_normalize, eps=eps)
    G, R = normal_equations(tb[used], L[used], E[used], alpha, beta, chunk)
    lam = ridge * float(G.diagonal().mean())
    G.diagonal().add_(lam)
    try:
        chol = torch.linalg.cholesky(G)
        W = torch.cholesky_solve(R, chol)
        del chol
    except RuntimeError:  # not positive definite in floating point: a general solve
        W = torch.linalg.solve(G, R)
    del G
    report = fit_quality(byte_table, E, W, alpha, beta, chunk)
    report.update(
        ridge=ridge,
        lam=lam,
        tokens_fitted=int(used.sum()),
        tokens_without_bytes=int((~used).sum()),
        cells=256 * byte_table.pos_dim,
        cells_used=_cells_used(tb[used], L[used]),
        seconds=time.perf_counter() - t0,
    )
    return W, report


def _cells_used(tb: torch.Tensor, L: torch.Tensor) -> int:
    P = tb.shape[1]
    valid = torch.arange(P)[None, :] < L[:, None].long()
    return int(torch.unique((tb.long() * P + torch.arange(P))[valid]).numel())


def fit_quality(byte_table, E: torch.Tensor, W: torch.Tensor, alpha, beta, chunk: int = 4096) -> dict:
    """R² over rows (1 - sum |E_t - Ê_t|² / sum |E_t - mean E|²), the relative Frobenius residual
    |E - Ê|_F / |E|_F and the mean cosine of E_t and Ê_t, over the tokens with bytes (Ê = C W)."""
    from ..embedding import kronecker_embed_torch

    n = E.shape[0]
    used = byte_table.lengths[:n] > 0
    Eu = E[used].double()
    mean = Eu.mean(0)
    ss_res = ss_tot = ss_all = 0.0
    cos_sum = 0.0
    idx = used.nonzero().squeeze(1)
    for s in range(0, idx.numel(), chunk):
        i = idx[s : s + chunk]
        pred = kronecker_embed_torch(byte_table.bytes[i], byte_table.lengths[i], W, alpha, beta)
        e = E[i].double()
        ss_res += float((e - pred).pow(2).sum())
        ss_tot += float((e - mean).pow(2).sum())
        ss_all += float(e.pow(2).sum())
        cos_sum += float(torch.nn.functional.cosine_similarity(e, pred, dim=1).sum())
    return {
        "r2": 1.0 - ss_res / ss_tot if ss_tot else float("nan"),
        "relative_frobenius_residual": math.sqrt(ss_res / ss_all) if ss_all else float("nan"),
        "mean_row_cosine": cos_sum / max(idx.numel(), 1),
    }


def fitted_table(byte_table, W: torch.Tensor, n: int, *, length_normalize=True, z_normalize=True, eps=1e-6):
    """codec(ids 0..n-1) @ W [n, d] fp64: the input table the retrofitted model embeds with."""
    from ..embedding import kronecker_embed_torch
    from ..embedding.codec import scale_tables

    alpha, beta = scale_tables(byte_table.pos_dim, length_normalize=length_normalize, z_normalize=z_normalize, eps=eps)
    return kronecker_embed_torch(byte_table.bytes[:n], byte_table.lengths[:n], W.double(), alpha, beta)


# --- held-out loss ---------------------------------------------------------------------------------------
def _windows(ids: list[int], seq_len: int) -> list[list[int]]:
    """Non-overlapping windows of up to seq_len + 1 tokens (inputs + next-token targets)."""
    out = [ids[s : s + seq_len + 1] for s in range(0, max(len(ids) - 1, 1), seq_len)]
    return [w for w in out if len(w) >= 2]


@torch.no_grad()
def heldout_loss(logits_fn, ids: list[int], seq_len: int, vocab: int) -> float:
    """Mean next-token cross-entropy (nats) over the text's windows; logits_fn(ids [1, s]) -> [1, s, >= vocab]."""
    total, count = 0.0, 0
    for w in _windows(ids, seq_len):
        x = torch.tensor([w[:-1]])
        logits = logits_fn(x)[0, :, :vocab].double()
        total += float(torch.nn.functional.cross_entropy(logits, torch.tensor(w[1:]), reduction="sum"))
        count += len(w) - 1
    if not count:
        raise KScaleError("the sample text is too short for a held-out loss", fix="give a longer --text file")
    return total / count


# --- the run directory -------------------------------------------------------------------------------------
# the written config's starting point for continued training (a trained model: a fine-tuning learning rate,
# no warmup); every key can be overridden on the `kscale train` command line
CONTINUE_OPTIM = {"lr": 1e-4, "min_lr": 1e-5}
CONTINUE_SCHEDULE = {"train_steps": 100, "warmup_steps": 0}
FRESH_LOADER_STATE_EPOCH = -1
FRESH_ADAM_STEP = 1e-30  # 1 + 1e-30 == 1.0 in fp32 and fp64


def fresh_loader_state(seed: int) -> dict:
    """A streaming data-loader state that resumes as a fresh start: its epoch (-1) is older than the first
    epoch (0), and streaming treats an older saved epoch as nothing to resume (first epoch, first sample)."""
    return {
        "epoch": FRESH_LOADER_STATE_EPOCH,
        "sample_in_epoch": 0,
        "num_canonical_nodes": None,
        "shuffle_seed": seed,
        "initial_physical_nodes": None,
    }


def _copy_tokenizer(src: Path, out_dir: Path) -> Path:
    from ..tokenizer import load_tokenizer

    tok = load_tokenizer(src)  # a folder resolves to its tokenizer file
    dest = out_dir / "tokenizer" / Path(tok.path).name
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(tok.path, dest)
    return dest


def retrofit(
    hf_dir: str | Path,
    out_dir: str | Path,
    *,
    pos_dim: int = 32,
    byte_source: str = "exact",
    ridge: float = 1e-6,
    data: str | Path | None = None,
    tokenizer: str | Path | None = None,
    seq_len: int | None = None,
    text: str | None = None,
    console=print,
    timeout: float = 1800,
) -> dict:
    """The whole conversion (module docstring); returns the report also written to OUT_DIR/retrofit.json."""
    from ..embedding.byte_table import check_pos_dim
    from ..tokenizer import load_tokenizer

    t0 = time.perf_counter()
    hf_dir, out_dir = Path(hf_dir), Path(out_dir).resolve()
    check_pos_dim(pos_dim)
    if byte_source not in ("exact", "decode"):
        raise KScaleError(f"unknown byte source {byte_source!r}", where="--byte-source", fix="use exact or decode")
    if out_dir.exists() and any(out_dir.iterdir()):
        raise KScaleError("output folder is not empty", where=str(out_dir), fix="choose a new folder or empty it")
    hf, fields, weights, table, head, approx = read_hf(hf_dir, seq_len)
    tok_src = Path(tokenizer) if tokenizer else hf_dir
    try:
        tok = load_tokenizer(tok_src)
    except KScaleError as e:
        raise KScaleError(
            f"no tokenizer for the model ({e.what})",
            where=str(tok_src),
            fix="save a fast tokenizer (tokenizer.json) with the model, or pass --tokenizer FILE",
        ) from None
    V = tok.vocab_size
    if table.shape[0] < V:
        raise KScaleError(
            f"the model's input table has {table.shape[0]} rows for a tokenizer of {V} ids",
            where=str(hf_dir),
            fix="give the tokenizer the model was trained with (--tokenizer)",
        )
    console(
        f"read {hf_dir}: {hf.config.model_type}, {fields['n_layers']} layers, d={fields['d_model']}, "
        f"{V:,} ids (input table {tuple(table.shape)})"
    )

    created = not out_dir.exists()
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        return _retrofit_into(
            out_dir,
            hf_dir,
            hf,
            fields,
            weights,
            table,
            head,
            approx,
            tok,
            pos_dim=pos_dim,
            byte_source=byte_source,
            ridge=ridge,
            data=data,
            text=text,
            console=console,
            timeout=timeout,
            t0=t0,
        )
    except BaseException:  # nothing half-written is left behind (the folder was new or empty)
        if created:
            shutil.rmtree(out_dir, ignore_errors=True)
        else:
            for child in out_dir.iterdir():
                shutil.rmtree(child, ignore_errors=True) if child.is_dir() and not child.is_symlink() else child.unlink(
                    missing_ok=True
                )
        raise


def _retrofit_into(
    out_dir: Path,
    hf_dir: Path,
    hf,
    fields,
    weights,
    table,
    head,
    approx,
    tok,
    *,
    pos_dim,
    byte_source,
    ridge,
    data,
    text,
    console,
    timeout,
    t0,
) -> dict:
    from omegaconf import OmegaConf

    from ..config import TrainConfig
    from ..config.load import validate
    from ..embedding import ByteTable
    from ..launch.offline import run_offline_ranks

    V = tok.vocab_size
    tok_path = _copy_tokenizer(Path(tok.path), out_dir)
    byte_table = ByteTable.from_tokenizer(tok_path, pos_dim, byte_source)
    byte_table.save(out_dir / "byte_table.safetensors")
    E = table[:V].double()
    console(
        f"fitting W [{256 * pos_dim}, {E.shape[1]}] to the input table [{V}, {E.shape[1]}] "
        f"(pos_dim {pos_dim}, {byte_source} bytes, ridge {ridge:g}) ..."
    )
    W, fit = fit_projection(byte_table, E, ridge=ridge)
    console(
        f"fit: R² over rows {fit['r2']:.6f}, relative Frobenius residual "
        f"{fit['relative_frobenius_residual']:.4e}, mean row cosine {fit['mean_row_cosine']:.4f} "
        f"({fit['seconds']:.1f} s)"
    )

    # config: the model as the transformers checkpoint has it, with the Kronecker input layer
    model = {
        **fields,
        "input_layer": "kronecker",
        "head": "untied",
        "pos_dim": pos_dim,
        "hidden_dropout": 0.0,
        "attention_dropout": 0.0,
    }
    cfg = OmegaConf.merge(
        OmegaConf.structured(TrainConfig),
        {
            "model": model,
            "tokenizer": {"path": str(tok_path), "byte_source": byte_source},
            "data": {"train": [{"path": str(Path(data).resolve())}] if data else []},
            "optim": CONTINUE_OPTIM,
            "schedule": CONTINUE_SCHEDULE,
            "run": {"dir": str(out_dir), "name": out_dir.name},
        },
    )
    # everything but the data is checked now; without --data, `kscale train` asks for data.train itself
    validate(cfg if data else OmegaConf.merge(cfg, {"data": {"train": [{"path": "<data.train>"}]}}))
    from ..model.config import padded_vocab_size

    padded = padded_vocab_size(V, cfg.model.vocab_divisible_by, 1)
    head_rows = torch.zeros(padded, head.shape[1])
    head_rows[:V] = head[:V]
    weights = {**weights, "embedding.word_embeddings.weight": W.float(), "output_layer.weight": head_rows}
    weights_file = out_dir / ".from_hf-weights.pt"
    torch.save(weights, weights_file)
    (out_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
    try:
        step_dir = run_offline_ranks(
            "kronecker_scale.convert.from_hf",
            [str(weights_file)],
            hf_dir,
            out_dir / "checkpoints",
            cfg,
            timeout,
            "from_hf",
        )
    finally:
        weights_file.unlink(missing_ok=True)
    console(f"wrote {step_dir} (step 0, megatron engine)")

    # held-out loss: original, original fed the fitted table, retrofitted checkpoint
    ids = tok.encode(text if text is not None else SAMPLE_TEXT)
    T = fields["seq_len"]
    E_fit = fitted_table(byte_table, W, V).float()
    with torch.no_grad():
        original = heldout_loss(lambda x: hf(x).logits, ids, T, V)
        hf_fitted = heldout_loss(lambda x: hf(inputs_embeds=E_fit[x]).logits, ids, T, V)
    from ..inference import load_checkpoint

    ck = load_checkpoint(out_dir)
    retrofitted = heldout_loss(lambda x: ck.forward(x)[0], ids, T, V)
    losses = {
        "tokens": len(ids),
        "original": original,
        "original_with_fitted_table": hf_fitted,
        "retrofitted": retrofitted,
        "delta": retrofitted - original,
    }
    console(
        f"held-out loss on {len(ids)} tokens of sample text: original {original:.4f}, retrofitted "
        f"{retrofitted:.4f} (delta {retrofitted - original:+.4f}; the original fed the fitted table: "
        f"{hf_fitted:.4f})"
    )
    for line in approx:
        console(f"note: {line}")
    report = {
        "source": str(hf_dir),
        "model_type": hf.config.model_type,
        "out_dir": str(out_dir),
        "checkpoint": str(step_dir),
        "config": str(out_dir / "config.yaml"),
        "tokenizer": str(tok_path),
        "vocab_size": V,
        "input_rows_dropped": int(table.shape[0] - V),
        "pos_dim": pos_dim,
        "byte_source": byte_source,
        "byte_table_fingerprint": byte_table.fingerprint,
        "parameters": {"input_table": int(V * E.shape[1]), "projection": int(W.numel())},
        "fit": fit,
        "heldout_loss": losses,
        "approximations": approx,
        "seconds": time.perf_counter() - t0,
    }
    (out_dir / "retrofit.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


# --- the offline rank that writes the checkpoint --------------------------------------------------------
def _write_rank(weights_file: Path, out_root: Path, cfg) -> None:
    """Build the megatron engine as `kscale train` does, put the mapped weights in, save step 0."""
    from ..train import run_dir
    from ..train.inputs import model_inputs
    from ..train.loop import save_checkpoint
    from ..train.megatron_engine import MegatronEngine

    inputs, _ = model_inputs(cfg)
    engine = MegatronEngine(cfg, inputs)
    weights = torch.load(weights_file, weights_only=True)
    names = {n for n, _ in engine.core_model.named_parameters()}
    missing, extra = sorted(names - set(weights)), sorted(set(weights) - names)
    if missing or extra:  # a mapping bug, not bad input: name the tensors
        raise RuntimeError(f"retrofit weights do not match the model: missing {missing}, unexpected {extra}")
    shapes = [
        (n, tuple(p.shape), tuple(weights[n].shape))
        for n, p in engine.core_model.named_parameters()
        if tuple(p.shape) != tuple(weights[n].shape)
    ]
    if shapes:
        raise RuntimeError(f"retrofit weight shapes differ (name, model, mapped): {shapes}")
    # Adam's state as a fresh optimizer has it (zero moments), written so that the checkpoint holds the
    # optimizer state a resume reads. megatron stores the shared step only when it is non-zero (`if step:`
    # in its sharded_state_dict), so the step is FRESH_ADAM_STEP: the first update adds 1 and gets exactly
    # 1.0, the same bias corrections, hence the same update, as a fresh AdamW.
    engine.set_full_state(
        {
            "tensors": {
                n: {
                    "param": weights[n],
                    "exp_avg": torch.zeros_like(weights[n]),
                    "exp_avg_sq": torch.zeros_like(weights[n]),
                }
                for n in names
            },
            "adam_step": FRESH_ADAM_STEP,
        }
    )
    state = {
        "step": 0,
        "tokens": 0,
        "skipped_steps": 0,
        "train_loader": fresh_loader_state(cfg.data.seed),
        "world_size": torch.distributed.get_world_size(),
        "lineage": run_dir.new_lineage(),
        **engine.run_state(),
    }
    save_checkpoint(engine, cfg, inputs, out_root, state, keep_last=0)


if __name__ == "__main__":
    from ..launch.offline import offline_rank

    weights_path, out, resolved = map(Path, sys.argv[1:4])
    sys.exit(offline_rank(lambda cfg: _write_rank(weights_path, out, cfg), resolved))
