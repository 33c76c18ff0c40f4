"""What a training step computes: the Distiller and the objectives it runs (DISTILL.OBJECTIVE)."""
