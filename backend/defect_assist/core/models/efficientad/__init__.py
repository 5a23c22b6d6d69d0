"""EfficientAd (anomalib's network and losses) trained offline, with a teacher distilled here.

``anomaly_model`` (the served model), ``torch_model`` (no Lightning), ``lightning_model`` (for
anomalib's ``Engine``), ``config`` (:class:`~.config.EfficientAdConfig`), ``teacher`` (the
distillation). See README.md.
"""
