"""defect-assist: unsupervised defect pre-annotation for Label Studio."""

__version__ = "0.1.0"
