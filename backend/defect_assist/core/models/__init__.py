"""Anomaly models behind one interface (``base.AnomalyModel``) and a registry of kinds (``registry``).

``prediction`` (what a model returns), ``config`` (typed options), ``metadata`` (what a saved model
records), ``batches`` (images as a model sees them); one subpackage per model kind.
"""
