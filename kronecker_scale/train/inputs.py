"""What a run reads before it trains: the model's inputs (GPT config, tokenizer, byte table) and this
data-parallel rank's loaders, checked against the tokenizer and sequence length."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from omegaconf import DictConfig, OmegaConf

if TYPE_CHECKING:
    from ..embedding import ByteTable
    from ..model.config import GPTConfig
    from ..tokenizer import TokenizerFile


@dataclass
class ModelInputs:
    model_cfg: GPTConfig
    vocab_size: int  # the tokenizer's real ids (the model pads beyond them)
    byte_table: ByteTable | None  # for Kronecker input layers


def model_inputs(cfg: DictConfig) -> tuple[ModelInputs, TokenizerFile]:
    """(what building the model needs besides the layout, the tokenizer)."""
    from ..embedding import ByteTable
    from ..model.config import GPTConfig
    from ..tokenizer import load_tokenizer
    from ..tokenizer.assets import tokenizer_path

    model_cfg = GPTConfig(**OmegaConf.to_container(cfg.model))
    tok = load_tokenizer(tokenizer_path(cfg.tokenizer.path))
    byte_table = None
    if model_cfg.input_layer == "kronecker":
        byte_table = ByteTable.from_tokenizer(tok.path, model_cfg.pos_dim, cfg.tokenizer.byte_source)
    return ModelInputs(model_cfg, tok.vocab_size, byte_table), tok


def check_train_data(cfg: DictConfig, tok, seq_len: int) -> None:
    from ..data import check_manifest, read_manifest

    for src in cfg.data.train:
        check_manifest(
            read_manifest(src.path),
            tokenizer_fingerprint=tok.fingerprint,
            vocab_size=tok.vocab_size,
            seq_len=seq_len,
            where=f"data.train: {src.path}",
        )


def build_loaders(cfg: DictConfig, tok, seq_len: int, dp_rank: int, dp_size: int):
    """(train loader, validation loader or None) for this data-parallel rank. With eval.every > 0 a
    validation set too small to give every data-parallel rank one micro-batch is an error, checked first:
    evaluation is never skipped without a word."""
    from ..data import DataSource, build_loader, read_manifest
    from ..errors import KScaleError

    val_src = cfg.data.val or cfg.data.train[0].path
    val_split = read_manifest(val_src)["splits"].get("val", {})
    val_samples, need = val_split.get("samples", 0), cfg.data.micro_batch_size * dp_size
    eval_every = OmegaConf.select(cfg, "eval.every", default=0) or 0
    if eval_every > 0 and val_samples < need:
        where = f"data.val: {val_src}" if cfg.data.val else f"data.train[0] (data.val is not set): {val_src}"
        ranks = f" x {dp_size} data-parallel ranks = {need}" if dp_size > 1 else ""
        raise KScaleError(
            f"eval.every={eval_every} evaluates on the dataset's val split, which has {val_samples} sample(s) "
            f"({val_split.get('documents', '?')} document(s)); evaluation needs at least data.micro_batch_size="
            f"{cfg.data.micro_batch_size}{ranks} samples",
            where=where,
            fix="prepare the dataset with a validation split (`kscale prepare-data ... --val-fraction 0.01` or "
            "`--val-input FILES`), or set data.val to a prepared dataset that has one, or set eval.every=0 to "
            "train without evaluation",
        )

    common = dict(
        micro_batch_size=cfg.data.micro_batch_size,
        dp_rank=dp_rank,
        dp_size=dp_size,
        seed=cfg.data.seed,
        cache_dir=cfg.data.cache_dir,
        cache_limit=cfg.data.cache_limit,
        num_workers=cfg.data.num_workers,
        tokenizer_fingerprint=tok.fingerprint,
        seq_len=seq_len,
    )
    train = build_loader([DataSource(s.path, s.proportion) for s in cfg.data.train], "train", **common)
    val = None
    if val_samples >= cfg.data.micro_batch_size:
        val = build_loader([val_src], "val", **{**common, "seed": 0})
    return train, val


def endless(loader):
    while True:  # epochs: streaming tracks them in its own state
        yield from loader


def fixed_batches(loader, n: int) -> list:
    """The same held-out batches at every evaluation (each new streaming iteration is a new shuffled
    epoch), read once."""
    return [b for _, b in zip(range(n), loader)]
