"""The GPT model. `config` (GPTConfig, no megatron import), `accounting` (parameter counts),
`megatron_gpt` (the megatron-core adapter) and `megatron_cpu` (the CPU/gloo compatibility layer)."""

from .accounting import ARMS, GPTShape, input_side, model_params
from .config import GPTConfig, padded_vocab_size

__all__ = ["ARMS", "GPTConfig", "GPTShape", "input_side", "model_params", "padded_vocab_size"]
