"""Training: the one loop (loop.py) over the engine contract (engine.py) and its two engines
(megatron_engine.py, deepspeed_engine.py + deepspeed_adapter.py); what a run reads (inputs.py), the
schedule, NaN policy and step records; checkpoints, metrics, preemption, fault hooks and run reports."""
