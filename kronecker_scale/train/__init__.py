"""Training: the megatron-engine loop (trainer.py), checkpoints (checkpoint.py), metrics (metrics.py) and
the local launcher behind `kscale train` (launch_local.py)."""
