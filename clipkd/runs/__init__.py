"""Experiments: a run (config -> data, teacher, student; fit, evaluate), sweeps, fused sweeps, transfer."""
