"""EfficientAd teacher: distil a PDN from an offline ImageNet backbone, or use anomalib's official file.

EfficientAd's teacher is a patch description network (PDN, anomalib's ``Small``/``Medium
PatchDescriptionNetwork``) pretrained to regress the features of an ImageNet CNN on natural images.
anomalib downloads that teacher; offline we distil our own:

* **Targets** (:mod:`.targets`). The offline EfficientNet-Lite weights (``tf_efficientnet_lite0`` by
  default), run on the crop upsampled 2x (as the paper feeds 512 px to WideResNet-101 for a 256 px
  PDN input), so the backbone's stride-8 grid equals the PDN's stride-4 output grid. By default the
  stride-8 block (40 ch for Lite0; its receptive field matches the small PDN's) is regressed;
  ``target_strides="8+16"`` adds the stride-16 block (112 ch, bilinearly upsampled). Features are
  locally averaged (3x3, PatchCore's aggregation) and standardised per channel (statistics from the
  distillation images).
* **Context.** The backbone sees the crop plus ``context`` pixels of image on every side and the
  targets are the centre cells, so small crops get the targets of the same region inside a whole
  image rather than features dominated by the backbone's zero padding.
* **Channel matching** (:mod:`.network`). The PDN keeps anomalib's 384 output channels (so the weights
  load into anomalib unchanged); a learned 1x1 convolution (384 -> targets) maps its output onto the
  targets. After distillation it is folded into the PDN's last linear convolution
  (:func:`~.network.folded_teacher_state`), so all 384 outputs span the regressed target space.
* **Training** (:mod:`.distill`, data in :mod:`.data`). Padded PDN (``padding=True``, as in the
  reference pretraining), random resized crops, flips, colour jitter and random grayscale (of the
  whole window); Adam with cosine decay; MSE. Seeded; a checkpoint every ``checkpoint_every`` steps
  makes an interrupted run resume where it stopped.
* **Quality.** Normalised regression error (MSE of standardised targets, 1.0 = predicting the mean)
  on held-out natural images (a fixed 10 % of the folder, chosen by file-name hash).

The result is cached under ``<MODEL_DIR>/_teachers/<name>/`` (``teacher.pth`` with anomalib's keys,
``provenance.json``, ``checkpoint.pt``; :mod:`.paths`). :mod:`.resolve` picks the teacher a model uses.
"""

from defect_assist.core.models.efficientad.teacher.distill import distill_teacher, regression_error
from defect_assist.core.models.efficientad.teacher.network import (
    TEACHER_OUT_CHANNELS,
    DistillationNet,
    build_pdn,
    folded_teacher_state,
)
from defect_assist.core.models.efficientad.teacher.paths import (
    TeacherInfo,
    anomalib_teacher_path,
    install_for_anomalib,
    official_teacher,
    teacher_root,
)
from defect_assist.core.models.efficientad.teacher.resolve import (
    configured_teacher,
    load_teacher_weights,
    resolve_teacher,
)
from defect_assist.core.models.efficientad.teacher.targets import BackboneTargets

__all__ = [
    "TEACHER_OUT_CHANNELS",
    "BackboneTargets",
    "DistillationNet",
    "TeacherInfo",
    "anomalib_teacher_path",
    "build_pdn",
    "configured_teacher",
    "distill_teacher",
    "folded_teacher_state",
    "install_for_anomalib",
    "load_teacher_weights",
    "official_teacher",
    "regression_error",
    "resolve_teacher",
    "teacher_root",
]
