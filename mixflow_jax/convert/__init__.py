"""PyTorch -> Flax weight conversion."""
