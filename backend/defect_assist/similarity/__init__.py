"""Similarity search: model embeddings in Qdrant (embedded or server); ``embedding``, ``index``, ``mvtec``."""
