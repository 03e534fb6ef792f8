"""The GPT model: parameter accounting now; the megatron-core builder lands with the model issue."""
from .accounting import ARMS, GPTShape, input_side, model_params

__all__ = ["ARMS", "GPTShape", "input_side", "model_params"]
