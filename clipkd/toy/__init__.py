"""The embedded offline benchmark: a generated colour x shape world, tiny CLIPs pretrained on it by clipkd,
and ``clipkd demo``, which runs the real distillation pipeline on a dataset from that world."""
