"""The paper's probes: spelling robustness, embedding geometry, generation echo, norm drift."""
