"""What a checkpoint is (`kscale convert summary`) and its input layer alone (`kscale convert extract`).

Both read the checkpoint's tensor metadata / single tensors, so they build no model and need no
parallel layout.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from omegaconf import OmegaConf

from ..errors import KScaleError
from ..inference import read_config, read_tensors, resolve_checkpoint, tensor_shapes

INPUT_KEY = "embedding.word_embeddings.weight"
HEAD_KEY = "output_layer.weight"
BUFFERS = ("embedding.word_embeddings.token_bytes", "embedding.word_embeddings.token_lengths")


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def arm(model_cfg) -> str:
    """The accounting arm (model/accounting.py) of a model config."""
    if model_cfg.input_layer == "bpe":
        return "bpe_tied" if model_cfg.head == "tied" else "bpe_untied"
    return "kronecker_tied" if model_cfg.head == "kronecker_tied" else "kronecker"


def checkpoint_summary(path: str | Path) -> dict:
    """Config, step, tokens and parameter counts (as stored, and as model/accounting.py counts them)."""
    from ..model.accounting import GPTShape, model_params
    from ..model.config import GPTConfig

    step_dir = resolve_checkpoint(path)
    cfg = read_config(step_dir)
    model_cfg = GPTConfig(**OmegaConf.to_container(cfg.model))
    state = torch.load(step_dir / "trainer_state.pt", weights_only=False)
    shapes = tensor_shapes(step_dir)
    model_keys = [k for k in shapes if not k.startswith("optimizer.") and k not in BUFFERS]
    stored = {
        "input": _numel(shapes[INPUT_KEY][0]) if INPUT_KEY in shapes else 0,
        "head": _numel(shapes[HEAD_KEY][0]) if HEAD_KEY in shapes else 0,
    }
    stored["transformer"] = sum(_numel(shapes[k][0]) for k in model_keys if k not in (INPUT_KEY, HEAD_KEY))
    stored["total"] = sum(stored.values())
    padded = (
        shapes[BUFFERS[0]][0][0]
        if BUFFERS[0] in shapes
        else (shapes[INPUT_KEY][0][0] if model_cfg.input_layer == "bpe" else shapes.get(HEAD_KEY, ((0,),))[0][0])
    )
    shape = GPTShape(
        vocab_size=padded,
        d_model=model_cfg.d_model,
        n_layers=model_cfg.n_layers,
        seq_len=model_cfg.seq_len,
        ffn_hidden=model_cfg.ffn_hidden,
        position=model_cfg.position,
        norm=model_cfg.norm,
        activation=model_cfg.activation,
        bias=model_cfg.bias,
        n_heads=model_cfg.n_heads,
    )
    expected = model_params(shape, arm(model_cfg), model_cfg.pos_dim)
    files = [p for p in step_dir.rglob("*") if p.is_file()]
    return {
        "checkpoint": str(step_dir),
        "step": int(state.get("step", 0)),
        "tokens": int(state.get("tokens", 0)),
        "skipped_steps": int(state.get("skipped_steps", 0)),
        "saved_world_size": state.get("world_size"),
        "arm": arm(model_cfg),
        "padded_vocab_size": int(padded),
        "model": OmegaConf.to_container(cfg.model),
        "tokenizer": OmegaConf.to_container(cfg.tokenizer),
        "parallel": OmegaConf.to_container(cfg.parallel),
        "precision": cfg.run.precision,
        "parameters": stored,
        "parameters_by_accounting": expected,
        "optimizer_tensors": sum(1 for k in shapes if k.startswith("optimizer.")),
        "bytes_on_disk": sum(p.stat().st_size for p in files),
    }


def extract_input_layer(path: str | Path, out_file: str | Path) -> dict:
    """The Kronecker input layer alone: projection [256 P, d] (fp32) + the byte table of the real ids in
    one safetensors file, its settings in the file's metadata and in a .json beside it."""
    from safetensors.torch import save_file

    from ..embedding import ByteTable

    step_dir = resolve_checkpoint(path)
    cfg = read_config(step_dir)
    if cfg.model.input_layer != "kronecker":
        raise KScaleError(
            f"model.input_layer={cfg.model.input_layer}: there is no Kronecker projection to extract",
            where=str(step_dir),
        )
    table = ByteTable.load(step_dir / "byte_table.safetensors")
    weight = read_tensors(step_dir, [INPUT_KEY])[INPUT_KEY].float()
    if weight.shape[0] != 256 * table.pos_dim:
        raise KScaleError(
            f"projection has {weight.shape[0]} rows, expected 256 x pos_dim = {256 * table.pos_dim}",
            where=str(step_dir),
        )
    n = table.num_token_ids
    meta = {
        "format": "kscale-kronecker-input-layer/1",
        "pos_dim": table.pos_dim,
        "d_model": int(weight.shape[1]),
        "vocab_size": n,
        "fingerprint": table.fingerprint,
        "tokenizer_fingerprint": table.tokenizer_fingerprint,
        "byte_source": table.byte_source,
        "length_normalize": bool(cfg.model.length_normalize),
        "z_normalize": bool(cfg.model.z_normalize),
        "codec_eps": float(cfg.model.codec_eps),
        "row_index": "byte * pos_dim + position",
        "tokenizer": cfg.tokenizer.path,
        "checkpoint": str(step_dir),
    }
    out = Path(out_file)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(
        {
            "projection": weight.contiguous(),
            "token_bytes": table.bytes[:n].contiguous(),
            "token_lengths": table.lengths[:n].contiguous(),
        },
        str(out),
        metadata={k: str(v) for k, v in meta.items()},
    )
    out.with_suffix(".json").write_text(json.dumps(meta, indent=2) + "\n")
    return {**meta, "file": str(out)}


def load_extracted(path: str | Path):
    """(KroneckerEmbedding with the extracted weights, metadata): the input layer without the model."""
    from safetensors import safe_open

    from ..embedding import ByteTable, KroneckerEmbedding

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        W, tb, tl = f.get_tensor("projection"), f.get_tensor("token_bytes"), f.get_tensor("token_lengths")
    table = ByteTable(tb, tl, int(meta["pos_dim"]), byte_source=meta["byte_source"])
    table.check_fingerprint(meta["fingerprint"], where=str(path))
    emb = KroneckerEmbedding(
        table,
        int(meta["d_model"]),
        length_normalize=meta["length_normalize"] == "True",
        z_normalize=meta["z_normalize"] == "True",
        eps=float(meta["codec_eps"]),
        impl="torch",
    )
    with torch.no_grad():
        emb.weight.copy_(W)
    return emb, meta
