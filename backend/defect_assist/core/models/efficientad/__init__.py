"""EfficientAd (anomalib's network and losses) trained offline, with a teacher distilled here.

``anomaly_model`` (the served model) trains with ``trainer``; ``torch_model`` (the network, no
Lightning), ``anomaly_map`` (the map border), ``loss`` (the validation loss), ``penalty`` (local
penalty images); ``lightning_model`` (for anomalib's ``Engine``); ``config``
(:class:`~.config.EfficientAdConfig`); ``teacher`` (the distillation subpackage). See README.md.
"""
