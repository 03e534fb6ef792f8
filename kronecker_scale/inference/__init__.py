"""Running a trained model outside training: load a checkpoint of the megatron engine into one process
(any saved TP/PP layout), forward passes with byte overrides, the materialised input table. Used by
convert/ (export, summaries) and probes/."""

from .load import (
    LoadedCheckpoint,
    cpu_layer,
    load_checkpoint,
    materialise_table,
    read_config,
    read_tensors,
    resolve_checkpoint,
    tensor_shapes,
)

__all__ = [
    "LoadedCheckpoint",
    "cpu_layer",
    "load_checkpoint",
    "materialise_table",
    "read_config",
    "read_tensors",
    "resolve_checkpoint",
    "tensor_shapes",
]
