"""One normal/defect vocabulary for every place that reads or writes Label Studio verdicts."""

from __future__ import annotations

# Choice values (compared lower-cased and stripped) that mean "no defect" and "defect".
NORMAL_CHOICES = ("normal", "good", "ok", "no defect", "no_defect", "nodefect", "pass")
ANOMALOUS_CHOICES = ("anomalous", "anomaly", "defect", "defective", "ng", "bad", "fail", "abnormal")
# Substrings that mark a region label (BrushLabels, PolygonLabels …) as the defect label.
DEFECT_LABEL_HINTS = ("defect", "anomal", "ng", "damage")


def is_normal_choice(value: str) -> bool:
    """Whether a Choices value says "no defect"."""
    return str(value).strip().lower() in NORMAL_CHOICES


def match_choice(labels: list[str], words: tuple[str, ...]) -> str | None:
    """The first of ``labels`` equal (case-insensitively) to one of ``words``, in ``words`` order."""
    for word in words:
        for label in labels:
            if label.strip().lower() == word:
                return label
    return None


def pick_defect_label(labels: list[str] | None) -> str | None:
    """The region label that names a defect, else the first label."""
    labels = list(labels or [])
    for label in labels:
        if any(hint in label.lower() for hint in DEFECT_LABEL_HINTS):
            return label
    return labels[0] if labels else None
