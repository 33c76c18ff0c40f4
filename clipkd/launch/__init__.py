"""Launching many runs on a job engine: the cells of the paper's grids and of sweeps as jobs, run in this process
(``inline``), on this machine's GPUs or CPUs (``local``) or on a SLURM cluster (``slurm``), both through submitit.

Layers: :mod:`.cells` (what to run: one command line per cell, the scripts' own), :mod:`.jobs` (the job callable a
worker runs: the cell's commands, resumable, requeued on timeout), :mod:`.state` (``launch.jsonl``, the root's lock,
status), :mod:`.launchers` (the engines). A launch never builds a model: torch is imported only to count this
machine's GPUs (local, without --gpus or CUDA_VISIBLE_DEVICES) and to group fused sweep cells.
"""
