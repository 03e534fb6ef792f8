"""Checkpoint conversion: to Hugging Face transformers, between engines (megatron <-> deepspeed),
between parallel layouts, and checkpoint summaries."""
