"""Training: the megatron-engine loop (trainer.py), checkpoints (checkpoint.py), metrics (metrics.py),
preemption handling (preemption.py) and run reports (report.py)."""
