"""Label Studio ML backend: FastAPI app (:func:`create_app`) around :class:`DefectModel`."""

from defect_assist.serving.app import create_app
from defect_assist.serving.model import DefectModel

__all__ = ["DefectModel", "create_app"]
