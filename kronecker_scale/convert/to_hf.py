"""Export a checkpoint to Hugging Face `transformers` (GPT-2 or Llama architecture), loadable with no
custom code.

The Kronecker input layer is materialised exactly: every real id's embedding codec(id) @ W (fp64
closed form, stored fp32); padded vocabulary rows are dropped. Heads: untied -> lm_head; tied (BPE)
-> tie_word_embeddings; kronecker_tied -> an untied lm_head holding the codec-reconstructed table
times the head's logit scale 1/sqrt(d) (logits = h @ (s T)^T = s (h @ T^T), the same numbers).

Mapping (megatron-core local spec -> transformers):
- GPT-2: learned positions, LayerNorm, exact (erf) GELU -> activation_function="gelu" (not GPT-2's
  tanh "gelu_new"), biases (zeros when the model has none: the same function). Conv1D weights are
  [in, out], the transpose of megatron's Linear.
- Llama: RoPE (megatron's default is non-interleaved = HF's rotate_half, base 10,000), RMSNorm, SwiGLU
  (megatron's fc1 is [gate; up], activation on the first half), attention/MLP biases when present.
- megatron's fused QKV rows are grouped per query group: [q heads of the group, k, v] for each group;
  HF wants q, k, v separately (GPT-2: concatenated columns [q | k | v]).
- LayerNorm / RMSNorm eps = megatron's layernorm_epsilon (1e-5); attention scale 1/sqrt(head_dim) in
  both.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from ..errors import KScaleError
from ..inference import LoadedCheckpoint, load_checkpoint

ARCHITECTURES = {
    "gpt2": {"position": "learned_absolute", "norm": "layernorm", "activation": "gelu"},
    "llama": {"position": "rope", "norm": "rmsnorm", "activation": "swiglu"},
}
# real text for the parity check of `kscale convert to-hf` (Austen, Pride and Prejudice, public domain)
PARITY_TEXT = (
    "It is a truth universally acknowledged, that a single man in possession of a good fortune, must be "
    "in want of a wife. However little known the feelings or views of such a man may be on his first "
    "entering a neighbourhood, this truth is so well fixed in the minds of the surrounding families, that "
    "he is considered the rightful property of some one or other of their daughters."
)
LAYERNORM_EPS = 1e-5  # transformer_config leaves megatron's default
ROPE_BASE = 10000.0  # GPTModel's default rotary_base


def hf_architecture(model_cfg) -> str:
    """'gpt2' or 'llama': the architecture whose position/norm/activation the model has."""
    have = {k: getattr(model_cfg, k) for k in ("position", "norm", "activation")}
    for name, want in ARCHITECTURES.items():
        if have == want:
            return name
    wanted = "; ".join(f"{n}: " + ", ".join(f"{k}={v}" for k, v in w.items()) for n, w in ARCHITECTURES.items())
    raise KScaleError(
        "the model matches no transformers architecture: " + ", ".join(f"model.{k}={v}" for k, v in have.items()),
        where="config.yaml: model",
        fix=f"export needs one of {wanted}",
    )


def split_qkv(t: torch.Tensor, n_heads: int, n_groups: int, head_dim: int):
    """megatron fused QKV (weight [(nq + 2 ng) hd, d] or bias) -> q [nq hd, ...], k, v [ng hd, ...]."""
    per_group = n_heads // n_groups
    g = t.reshape(n_groups, (per_group + 2) * head_dim, *t.shape[1:])
    q = g[:, : per_group * head_dim].reshape(n_heads * head_dim, *t.shape[1:])
    k = g[:, per_group * head_dim : (per_group + 1) * head_dim].reshape(n_groups * head_dim, *t.shape[1:])
    v = g[:, (per_group + 1) * head_dim :].reshape(n_groups * head_dim, *t.shape[1:])
    return q, k, v


def _tables(ck: LoadedCheckpoint) -> tuple[torch.Tensor, torch.Tensor | None, bool]:
    """(input table [V, d], lm_head [V, d] or None when tied, tie_word_embeddings)."""
    sd = ck.model.state_dict()
    V = ck.vocab_size
    table = ck.input_table().float()
    head = ck.model_cfg.head
    if head == "tied":
        return table, None, True
    if head == "kronecker_tied":
        scale = ck.model.output_layer.logit_scale
        return table, (ck.input_table() * scale).float(), False
    return table, sd["output_layer.weight"][:V].float().clone(), False


def _gpt2(ck: LoadedCheckpoint):
    from transformers import GPT2Config

    c, sd = ck.model_cfg, ck.model.state_dict()
    d, h, hd = c.d_model, c.n_heads, c.d_model // c.n_heads
    ffn = c.ffn_hidden or 4 * d
    wte, lm_head, tie = _tables(ck)
    config = GPT2Config(
        vocab_size=ck.vocab_size,
        n_positions=c.seq_len,
        n_embd=d,
        n_layer=c.n_layers,
        n_head=h,
        n_inner=ffn,
        activation_function="gelu",
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        layer_norm_epsilon=LAYERNORM_EPS,
        scale_attn_weights=True,
        tie_word_embeddings=tie,
        **_special_ids(ck),
    )

    def bias(key, n):
        return sd[key].float() if key in sd else torch.zeros(n)

    out = {"transformer.wte.weight": wte, "transformer.wpe.weight": sd["embedding.position_embeddings.weight"]}
    for i in range(c.n_layers):
        m, o = f"decoder.layers.{i}.", f"transformer.h.{i}."
        q, k, v = split_qkv(sd[m + "self_attention.linear_qkv.weight"], h, h, hd)
        qb, kb, vb = split_qkv(bias(m + "self_attention.linear_qkv.bias", 3 * d), h, h, hd)
        out.update(
            {
                o + "ln_1.weight": sd[m + "input_layernorm.weight"],
                o + "ln_1.bias": sd[m + "input_layernorm.bias"],
                o + "attn.c_attn.weight": torch.cat([q, k, v]).t(),
                o + "attn.c_attn.bias": torch.cat([qb, kb, vb]),
                o + "attn.c_proj.weight": sd[m + "self_attention.linear_proj.weight"].t(),
                o + "attn.c_proj.bias": bias(m + "self_attention.linear_proj.bias", d),
                o + "ln_2.weight": sd[m + "pre_mlp_layernorm.weight"],
                o + "ln_2.bias": sd[m + "pre_mlp_layernorm.bias"],
                o + "mlp.c_fc.weight": sd[m + "mlp.linear_fc1.weight"].t(),
                o + "mlp.c_fc.bias": bias(m + "mlp.linear_fc1.bias", ffn),
                o + "mlp.c_proj.weight": sd[m + "mlp.linear_fc2.weight"].t(),
                o + "mlp.c_proj.bias": bias(m + "mlp.linear_fc2.bias", d),
            }
        )
    out["transformer.ln_f.weight"] = sd["decoder.final_layernorm.weight"]
    out["transformer.ln_f.bias"] = sd["decoder.final_layernorm.bias"]
    if lm_head is not None:
        out["lm_head.weight"] = lm_head
    return config, out


def _llama(ck: LoadedCheckpoint):
    from transformers import LlamaConfig

    c, sd = ck.model_cfg, ck.model.state_dict()
    d, h, hd = c.d_model, c.n_heads, c.d_model // c.n_heads
    ffn = c.ffn_hidden or 4 * d
    embed, lm_head, tie = _tables(ck)
    config = LlamaConfig(
        vocab_size=ck.vocab_size,
        hidden_size=d,
        intermediate_size=ffn,
        num_hidden_layers=c.n_layers,
        num_attention_heads=h,
        num_key_value_heads=h,
        head_dim=hd,
        hidden_act="silu",
        max_position_embeddings=c.seq_len,
        rms_norm_eps=LAYERNORM_EPS,
        rope_parameters={"rope_type": "default", "rope_theta": ROPE_BASE},
        attention_bias=c.bias,
        mlp_bias=c.bias,
        attention_dropout=0.0,
        tie_word_embeddings=tie,
        **_special_ids(ck),
    )
    out = {"model.embed_tokens.weight": embed}
    for i in range(c.n_layers):
        m, o = f"decoder.layers.{i}.", f"model.layers.{i}."
        q, k, v = split_qkv(sd[m + "self_attention.linear_qkv.weight"], h, h, hd)
        fc1 = sd[m + "mlp.linear_fc1.weight"]
        out.update(
            {
                o + "input_layernorm.weight": sd[m + "input_layernorm.weight"],
                o + "self_attn.q_proj.weight": q,
                o + "self_attn.k_proj.weight": k,
                o + "self_attn.v_proj.weight": v,
                o + "self_attn.o_proj.weight": sd[m + "self_attention.linear_proj.weight"],
                o + "post_attention_layernorm.weight": sd[m + "pre_mlp_layernorm.weight"],
                o + "mlp.gate_proj.weight": fc1[:ffn],
                o + "mlp.up_proj.weight": fc1[ffn:],
                o + "mlp.down_proj.weight": sd[m + "mlp.linear_fc2.weight"],
            }
        )
        if c.bias:
            qb, kb, vb = split_qkv(sd[m + "self_attention.linear_qkv.bias"], h, h, hd)
            fc1b = sd[m + "mlp.linear_fc1.bias"]
            out.update(
                {
                    o + "self_attn.q_proj.bias": qb,
                    o + "self_attn.k_proj.bias": kb,
                    o + "self_attn.v_proj.bias": vb,
                    o + "self_attn.o_proj.bias": sd[m + "self_attention.linear_proj.bias"],
                    o + "mlp.gate_proj.bias": fc1b[:ffn],
                    o + "mlp.up_proj.bias": fc1b[ffn:],
                    o + "mlp.down_proj.bias": sd[m + "mlp.linear_fc2.bias"],
                }
            )
    out["model.norm.weight"] = sd["decoder.final_layernorm.weight"]
    if lm_head is not None:
        out["lm_head.weight"] = lm_head
    return config, out


def _special_ids(ck: LoadedCheckpoint) -> dict:
    """bos/eos ids of the model config: the tokenizer's own roles (None where it has none)."""
    from .hf_tokenizer import special_token_ids

    return special_token_ids(ck.tokenizer)


def hf_model(ck: LoadedCheckpoint):
    """A transformers model (eval, fp32) holding the checkpoint's weights."""
    from transformers import GPT2LMHeadModel, LlamaForCausalLM

    arch = hf_architecture(ck.model_cfg)
    config, weights = (_gpt2 if arch == "gpt2" else _llama)(ck)
    model = (GPT2LMHeadModel if arch == "gpt2" else LlamaForCausalLM)(config)
    expected = set(model.state_dict())
    if config.tie_word_embeddings:
        expected.discard("lm_head.weight")
    missing, extra = expected - set(weights), set(weights) - expected
    if missing or extra:  # a mapping bug, not bad input: say exactly which names
        raise RuntimeError(f"HF state dict mismatch: missing {sorted(missing)}, unexpected {sorted(extra)}")
    model.load_state_dict({k: v.float().contiguous() for k, v in weights.items()}, strict=False)
    if config.tie_word_embeddings:
        model.tie_weights()
    return model.eval()


def save_tokenizer(ck: LoadedCheckpoint, out: Path) -> dict:
    """The tokenizer as transformers files in `out` (tokenizer.json, tokenizer_config.json,
    special_tokens_map.json), whatever the source format (hf_tokenizer.py); checked against ours on the
    multilingual samples first. A format that cannot be converted raises KScaleError: nothing is copied."""
    from .hf_tokenizer import export_tokenizer

    return export_tokenizer(ck.tokenizer, out, ck.model_cfg.seq_len)


def export_to_hf(
    checkpoint: str | Path, out_dir: str | Path, *, check_text: str | None = None, device: str = "cpu"
) -> dict:
    """Write config.json, model.safetensors, the tokenizer and kscale_export.json into out_dir.

    check_text: when given, reload the export with stock transformers and compare logits on it.
    """
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise KScaleError("output folder is not empty", where=str(out), fix="choose a new folder or empty it")
    ck = load_checkpoint(checkpoint, device)
    model = hf_model(ck)
    tokenizer = save_tokenizer(ck, out)  # converted and checked first: a refusal writes nothing
    model.save_pretrained(str(out), safe_serialization=True)
    info = {
        "checkpoint": str(ck.path),
        "step": ck.step,
        "tokens": ck.tokens,
        "architecture": type(model).__name__,
        "model_type": model.config.model_type,
        "input_layer": ck.model_cfg.input_layer,
        "head": ck.model_cfg.head,
        "vocab_size": ck.vocab_size,
        "padded_rows_dropped": int(ck.model.vocab_size - ck.vocab_size),
        "tokenizer": f"{tokenizer['description']} ({', '.join(tokenizer['files'])}; AutoTokenizer-readable, "
        f"same ids as ours on {tokenizer['self_check']['samples']} multilingual samples)",
        "tokenizer_export": tokenizer,
    }
    if ck.byte_table is not None:
        info.update(pos_dim=ck.byte_table.pos_dim, byte_table_fingerprint=ck.byte_table.fingerprint)
    if check_text is not None:
        info["parity"] = parity(ck, out, check_text)
    (out / "kscale_export.json").write_text(json.dumps(info, indent=2) + "\n")
    return info


def load_hf(out_dir: str | Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(out_dir), dtype=torch.float32).eval()


@torch.no_grad()
def parity(ck: LoadedCheckpoint, out_dir: str | Path, text: str, greedy_tokens: int = 20) -> dict:
    """KL(ours || exported) per position on `text` (the model's context length), greedy continuations, and
    the exported tokenizer (stock AutoTokenizer) against ours: ids on the multilingual samples and on `text`,
    decode(encode(text)) == text."""
    from .hf_tokenizer import PARITY_SAMPLES, tokenizer_parity

    tokenizer = tokenizer_parity(ck.tokenizer, out_dir, [*PARITY_SAMPLES, text])
    hf = load_hf(out_dir)
    ids = ck.tokenizer.encode(text)[: ck.model_cfg.seq_len]
    if len(ids) < 2:
        raise KScaleError("parity text is too short", fix="give a text of a few sentences")
    ours, _ = ck.forward(torch.tensor(ids))
    theirs = hf(torch.tensor([ids])).logits.float()
    p, q = torch.log_softmax(ours.double(), -1), torch.log_softmax(theirs.double(), -1)
    kl = (p.exp() * (p - q)).sum(-1)[0]
    prompt = ids[: max(1, min(len(ids), ck.model_cfg.seq_len - greedy_tokens) // 2)]
    ours_greedy = ck.greedy(prompt, greedy_tokens)
    hf_greedy = hf.generate(
        torch.tensor([prompt]),
        max_new_tokens=greedy_tokens,
        do_sample=False,
        attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
        pad_token_id=hf.config.eos_token_id or 0,
    )[0, len(prompt) :].tolist()
    # transformers stops at an end-of-text id; ours does not: compare up to and including the first one
    eos = hf.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
    stop = next((i + 1 for i, t in enumerate(ours_greedy) if t in eos), len(ours_greedy))
    return {
        "positions": len(ids),
        "max_kl": float(kl.max()),
        "mean_kl": float(kl.mean()),
        "max_abs_logit_diff": float((ours - theirs).abs().max()),
        "greedy_ours": ours_greedy,
        "greedy_hf": hf_greedy,
        "greedy_match": ours_greedy[:stop] == hf_greedy,
        "top1_match": float((ours.argmax(-1) == theirs.argmax(-1)).float().mean()),
        "tokenizer": tokenizer,
    }


def kl_ok(report: dict, limit: float = 1e-6) -> bool:
    """The parity report passes: KL within `limit`, the same greedy continuation, and (when the report has
    it) the exported tokenizer giving our ids."""
    return (
        report["max_kl"] <= limit
        and report["greedy_match"]
        and math.isfinite(report["max_kl"])
        and report.get("tokenizer", {}).get("ok", True)
    )
