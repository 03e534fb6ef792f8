"""Launching: local processes behind `kscale train` (local.py) and Slurm jobs through submitit behind
`kscale launch` (slurm.py)."""
