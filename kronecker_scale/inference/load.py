"""Load one checkpoint of the megatron engine into a single CPU process (TP = PP = 1), whatever layout
it was saved in: megatron dist_checkpointing reshards on load. Used by the exporter, the summary and
the probes.

`load_checkpoint(path)` accepts a step folder, a run's `checkpoints/` folder or a run folder (both
follow `latest`). The model it returns answers what the probes need: logits and the last hidden state
(after the final norm, before the head) at every position, optionally with some positions given
explicit bytes (out-of-vocabulary strings; Kronecker input layers only).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from omegaconf import DictConfig, OmegaConf

from ..errors import KScaleError

if TYPE_CHECKING:
    from ..embedding import ByteTable
    from ..model.config import GPTConfig
    from ..tokenizer import TokenizerFile


def resolve_checkpoint(path: str | Path) -> Path:
    """A step folder from a step folder, a checkpoints folder or a run folder (via `latest`)."""
    from ..train.checkpoint import latest_checkpoint

    path = Path(path)
    if (path / "trainer_state.pt").is_file():
        return path
    for root in (path, path / "checkpoints"):
        found = latest_checkpoint(root) if root.is_dir() else None
        if found is not None:
            return found
    raise KScaleError(
        "not a kscale checkpoint (no trainer_state.pt, no `latest` pointer)",
        where=str(path),
        fix="give a step_* folder, a run's checkpoints/ folder or the run folder",
    )


def read_config(step_dir: Path) -> DictConfig:
    from ..config import TrainConfig

    path = step_dir / "config.yaml"
    if not path.is_file():
        raise KScaleError("checkpoint has no config.yaml", where=str(step_dir))
    return OmegaConf.merge(OmegaConf.structured(TrainConfig), OmegaConf.load(path))


def init_single_process(on_cpu: bool | None = None) -> None:
    """A world of one with megatron's TP = PP = 1 state and its model-parallel RNG seeded (idempotent)."""
    from megatron.core import tensor_parallel

    from ..distributed import init_single_process as init_world

    init_world()
    with cpu_layer(on_cpu):
        tensor_parallel.model_parallel_cuda_manual_seed(0)


def tensor_shapes(step_dir: Path) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Global shape and dtype of every tensor in a checkpoint (model and optimizer), without loading it."""
    from megatron.core import dist_checkpointing

    try:
        meta = dist_checkpointing.load_tensors_metadata(str(step_dir))
    except Exception as e:
        raise KScaleError(
            f"could not read the checkpoint's tensor metadata ({type(e).__name__}: {e})", where=str(step_dir)
        ) from None
    return {k: (tuple(v.global_shape), v.dtype) for k, v in meta.items()}


@contextlib.contextmanager
def cpu_layer(active: bool | None = None):
    """megatron's CPU layer (model/megatron_cpu.py) while building, loading or running a model on the CPU
    (`active`; default: when no CUDA device is usable). It is global (a TorchFunctionMode, patched
    torch.cuda), so a library user's process (or the test process) gets back what it had."""
    from ..model import megatron_cpu

    if active is None:
        active = not torch.cuda.is_available()
    turn_on = active and not megatron_cpu.is_enabled()
    if turn_on:
        megatron_cpu.enable(force=True)
    try:
        yield
    finally:
        if turn_on:
            megatron_cpu.disable()


def read_tensors(step_dir: Path, keys: list[str]) -> dict[str, torch.Tensor]:
    """Whole (unsharded) tensors by checkpoint key, read in this process: no model is built."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing import ShardedTensor

    shapes = tensor_shapes(step_dir)
    missing = [k for k in keys if k not in shapes]
    if missing:
        raise KScaleError(f"checkpoint has no tensor {missing[0]!r}", where=str(step_dir))
    init_single_process()
    request = {
        k: ShardedTensor.from_rank_offsets(k, torch.empty(shapes[k][0], dtype=shapes[k][1]), replica_id=0) for k in keys
    }
    with cpu_layer():
        return dist_checkpointing.load(request, str(step_dir))


@dataclass
class LoadedCheckpoint:
    path: Path
    cfg: DictConfig  # the run's resolved config
    model_cfg: GPTConfig
    model: torch.nn.Module  # KroneckerGPTModel, eval mode, fp32, TP = PP = 1
    byte_table: ByteTable | None  # of the real ids (Kronecker), unpadded
    tokenizer: TokenizerFile
    vocab_size: int  # real ids (the tokenizer's); the model's rows beyond are padding
    step: int
    tokens: int
    device: str = "cpu"  # where the model and its inputs are: "cpu" or "cuda"

    # --- forward passes for probes and parity ----------------------------------------------------------
    def _embed(self, ids: torch.Tensor, overrides: dict | None) -> torch.Tensor:
        """[b, s] -> [s, b, d] as the model's input layer computes it, with byte overrides."""
        emb_layer = self.model.embedding
        if self.model_cfg.input_layer != "kronecker":
            raise KScaleError(
                "byte overrides need a Kronecker input layer (a BPE table has no row for new bytes)",
                where=str(self.path),
            )
        words = emb_layer.word_embeddings.forward_with_byte_override(ids, overrides)  # [b, s, d]
        emb = words.transpose(0, 1).contiguous()
        if emb_layer.add_position_embedding:
            pos = torch.arange(ids.shape[1], device=ids.device).expand_as(ids)
            emb = emb + emb_layer.position_embeddings(pos.t())
        return emb

    @torch.no_grad()
    def forward(self, ids, overrides: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """ids [b, s] (or [s]) -> (logits [b, s, V real ids] fp32, last hidden state [b, s, d] fp32).

        overrides: {(batch, position) or position: bytes} gives those positions explicit bytes.
        """
        ids = torch.as_tensor(ids, dtype=torch.long).to(self.device)
        if ids.dim() == 1:
            ids = ids[None]
            if overrides:
                overrides = {(0, k) if isinstance(k, int) else k: v for k, v in overrides.items()}
        if ids.shape[1] > self.model_cfg.seq_len and self.model_cfg.position == "learned_absolute":
            raise KScaleError(
                f"{ids.shape[1]} tokens exceed the model's {self.model_cfg.seq_len} positions",
                fix="use a shorter prompt",
            )
        captured: dict = {}
        hook = self.model.decoder.register_forward_hook(lambda m, a, out: captured.__setitem__("h", out))
        try:
            positions = torch.arange(ids.shape[1], device=ids.device).expand_as(ids)
            with cpu_layer(self.device == "cpu"):  # megatron asks torch.cuda for the device inside attention
                decoder_input = self._embed(ids, overrides) if overrides else None
                logits = self.model(ids, positions, None, decoder_input=decoder_input)
        finally:
            hook.remove()
        hidden = captured["h"]
        hidden = hidden[0] if isinstance(hidden, tuple) else hidden
        return logits[..., : self.vocab_size].float().cpu(), hidden.transpose(0, 1).float().cpu()

    @torch.no_grad()
    def greedy(self, ids: list[int], n: int, overrides: dict | None = None) -> list[int]:
        """n greedy continuation ids (overrides stay on their prompt positions)."""
        ids = list(ids)
        out = []
        for _ in range(n):
            window = ids[-self.model_cfg.seq_len :]
            shift = len(ids) - len(window)
            ov = {p - shift: b for p, b in (overrides or {}).items() if p >= shift} or None
            logits, _ = self.forward(torch.tensor(window), ov)
            nxt = int(logits[0, -1].argmax())
            ids.append(nxt)
            out.append(nxt)
        return out

    def input_table(self) -> torch.Tensor:
        """The input embedding of every real id [V, d] in fp64: the codec + projection materialised
        (Kronecker), or the BPE table's rows."""
        emb = self.model.embedding.word_embeddings
        if self.model_cfg.input_layer == "kronecker":
            return materialise_table(emb, self.vocab_size)
        return emb.weight.detach()[: self.vocab_size].double().cpu()


def materialise_table(word_embeddings, n: int) -> torch.Tensor:
    """codec(ids) @ W for ids 0..n-1 in fp64 (closed form; every id's row exactly as the layer embeds it)."""
    from ..embedding import kronecker_embed_torch

    W = word_embeddings.weight.detach().double().cpu()
    return kronecker_embed_torch(
        word_embeddings.token_bytes[:n].cpu(),
        word_embeddings.token_lengths[:n].cpu(),
        W,
        word_embeddings.alpha.cpu(),
        word_embeddings.beta.cpu(),
    )


def load_checkpoint(path: str | Path, device: str = "cpu") -> LoadedCheckpoint:
    """The model of a checkpoint in this process, TP = PP = 1, fp32, eval mode, on `device` ("cpu", the
    default whatever GPUs are visible, or "cuda"); `forward` takes inputs anywhere and returns CPU tensors."""
    from megatron.core import dist_checkpointing

    from ..distributed import resolve_device
    from ..embedding import ByteTable
    from ..model.config import GPTConfig
    from ..model.megatron_gpt import build_model, transformer_config
    from ..tokenizer import load_tokenizer
    from ..tokenizer.assets import tokenizer_path

    if device not in ("cpu", "cuda"):
        raise KScaleError(f"unknown device {device!r}", where="--device", fix="use cpu or cuda")
    resolve_device(device, where="--device")  # cuda that is not usable: an error, not the CPU
    step_dir = resolve_checkpoint(path)
    cfg = read_config(step_dir)
    model_cfg = GPTConfig(**OmegaConf.to_container(cfg.model))
    model_cfg.embedding_impl = "torch" if model_cfg.embedding_impl == "triton" else model_cfg.embedding_impl
    tok = load_tokenizer(tokenizer_path(cfg.tokenizer.path))
    byte_table = None
    if model_cfg.input_layer == "kronecker":
        byte_table = ByteTable.load(step_dir / "byte_table.safetensors")
        if byte_table.tokenizer_fingerprint and byte_table.tokenizer_fingerprint != tok.fingerprint:
            raise KScaleError(
                "the tokenizer named in the checkpoint's config is not the one it was trained with",
                where=f"{step_dir / 'config.yaml'}: tokenizer.path={cfg.tokenizer.path}",
                fix="make tokenizer.path point at the training tokenizer",
            )
    on_cpu = device == "cpu"
    init_single_process(on_cpu)
    with cpu_layer(on_cpu):
        torch.manual_seed(0)
        tcfg = transformer_config(model_cfg, params_dtype=torch.float32, use_cpu_initialization=on_cpu)
        model = build_model(
            model_cfg, tcfg, byte_table=byte_table, vocab_size=tok.vocab_size, pre_process=True, post_process=True
        )
        model.to(device)
        try:
            state = dist_checkpointing.load({"model": model.sharded_state_dict()}, str(step_dir))
        except Exception as e:  # megatron raises many types; name the checkpoint and the cause
            raise KScaleError(
                f"could not read the model from the checkpoint ({type(e).__name__}: {e})", where=str(step_dir)
            ) from None
        model.load_state_dict(state["model"])
    model.eval()
    trainer_state = torch.load(step_dir / "trainer_state.pt", weights_only=False)
    return LoadedCheckpoint(
        step_dir,
        cfg,
        model_cfg,
        model,
        byte_table,
        tok,
        tok.vocab_size,
        int(trainer_state.get("step", 0)),
        int(trainer_state.get("tokens", 0)),
        device,
    )
