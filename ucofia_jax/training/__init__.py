"""Training: the sharded train step, the loop, the optimizer and checkpoints."""
