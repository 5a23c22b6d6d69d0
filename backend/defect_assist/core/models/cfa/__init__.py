"""CFA (coupled-hypersphere-based feature adaptation): anomalib's model on an offline backbone.

``anomaly_model`` (the served model, ``kind="cfa"``) trains with ``trainer`` on cached backbone
features; ``torch_model`` (anomalib's ``CfaModel`` with an offline EfficientNet-Lite, no Lightning),
``anomaly_map`` (anomalib's scores, blur built once), ``loss`` (anomalib's ``CfaLoss`` and the
validation loss), ``lightning_model`` (for anomalib's ``Engine``), ``config`` (:class:`~.config.CfaConfig`).
See README.md.
"""
