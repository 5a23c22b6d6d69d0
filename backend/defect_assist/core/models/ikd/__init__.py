"""IKD (informative knowledge distillation): a frozen pretrained teacher, a student trained to match it.

``anomaly_model`` (the served model, ``kind="ikd"``) trains with ``trainer``; ``torch_model`` (teacher,
student and maps, no Lightning), ``loss`` (CSL and AHSM), ``anomaly_map`` (discrepancy maps, blur),
``lightning_model`` (for anomalib's ``Engine``), ``config`` (:class:`~.config.IkdConfig`). See README.md.
"""
