"""Configs: the typed schema (schema.py) and loading/overrides/validation (load.py)."""

from .load import load_config, to_yaml, validate
from .schema import TrainConfig

__all__ = ["TrainConfig", "load_config", "to_yaml", "validate"]
