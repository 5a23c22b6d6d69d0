"""Label Studio ML backend: FastAPI app (:func:`create_app`) around :class:`DefectModel`."""

from defect_assist.server.app import create_app
from defect_assist.server.model import DefectModel

__all__ = ["DefectModel", "create_app"]
