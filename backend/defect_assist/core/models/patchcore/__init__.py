"""PatchCore: anomalib's model with an offline backbone, a coverage coreset and faiss search.

``anomaly_model`` (the served model), ``torch_model`` (no Lightning), ``lightning_model`` (for
anomalib's ``Engine``), ``anomaly_map`` (the map generator), ``coreset`` (memory-bank selection),
``config`` (:class:`~.config.PatchcoreConfig`). See README.md.
"""
