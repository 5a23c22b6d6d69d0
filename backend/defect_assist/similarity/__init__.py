"""Similarity search: model embeddings in Qdrant (embedded or server), CLI commands and an HTTP router."""

from defect_assist.similarity.embedding import EMBEDDING_NAME, SimilarityEmbedder
from defect_assist.similarity.index import (
    IndexReport,
    Neighbour,
    SimilarityIndex,
    query_similar,
    update_index,
)
from defect_assist.similarity.mvtec import ImageRecord, walk_folder

__all__ = [
    "EMBEDDING_NAME",
    "ImageRecord",
    "IndexReport",
    "Neighbour",
    "SimilarityEmbedder",
    "SimilarityIndex",
    "query_similar",
    "update_index",
    "walk_folder",
]
