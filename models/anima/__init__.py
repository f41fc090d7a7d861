"""Anima (Cosmos-Predict2 MiniTrainDIT) and its per-block context tokens (pure torch)."""
