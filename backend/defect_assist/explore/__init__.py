"""Exploration: FiftyOne datasets of predictions, heatmaps and embeddings (``explore`` extra)."""
