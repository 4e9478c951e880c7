"""Reading checkpoints, writing models and torch.save streams, outputs that never destroy anything."""
