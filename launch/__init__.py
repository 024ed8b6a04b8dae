"""Launchers above the dist_bot package: `python -m launch.submit` (submitit; Slurm or local processes)."""
