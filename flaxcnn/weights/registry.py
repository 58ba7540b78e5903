"""The published MobileNetV2 ImageNet weight files, described as data.

One :class:`PretrainedSpec` per file Keras publishes (TF-slim ``mobilenet_v2_{alpha}_{rows}``
checkpoints converted by the Keras team): width multipliers 0.35-1.0 at 96-224 pixels, and
1.3 / 1.4 at 224 only, each with and without the 1000-class top. Keras would build a URL for
combinations that were never published and fail with an HTTP 404; we list only real files.
"""

from __future__ import annotations

import dataclasses

BASE_URL = "https://storage.googleapis.com/tensorflow/keras-applications/mobilenet_v2/"
RESOLUTIONS = (96, 128, 160, 192, 224)
_ALPHA_RESOLUTIONS = {
    0.35: RESOLUTIONS,
    0.5: RESOLUTIONS,
    0.75: RESOLUTIONS,
    1.0: RESOLUTIONS,
    1.3: (224,),
    1.4: (224,),
}


@dataclasses.dataclass(frozen=True)
class PretrainedSpec:
    """Everything known about one published weight file.

    Attributes:
      arch: model family (``'mobilenet_v2'``).
      alpha: width multiplier the file was trained with.
      resolution: square input size it was trained at.
      include_top: whether it holds the 1000-class ``predictions`` layer.
      sha256: expected digest, or ``None`` where the publisher gives none (Keras gives none
        for MobileNetV2; then a cached file is checked by reading it instead).
      preprocessing: how inputs were scaled in training: ``'tf'`` = RGB in [-1, 1].
      num_classes: classes of the top (ImageNet-1k), also recorded for no-top files.
      classifier: the top's layer name, dropped when a new head is requested.
      license: licence of the weights.
    """

    arch: str
    alpha: float
    resolution: int
    include_top: bool
    sha256: str | None = None
    preprocessing: str = "tf"
    num_classes: int = 1000
    classifier: str = "predictions"
    license: str = "Apache-2.0"

    @property
    def filename(self) -> str:
        """Keras's file name, so a Keras cache (``~/.keras/models``) can be reused as-is."""
        suffix = "" if self.include_top else "_no_top"
        return (
            f"mobilenet_v2_weights_tf_dim_ordering_tf_kernels_{float(self.alpha)}"
            f"_{self.resolution}{suffix}.h5"
        )

    @property
    def url(self) -> str:
        return BASE_URL + self.filename

    @property
    def name(self) -> str:
        top = "" if self.include_top else "_no_top"
        return f"{self.arch}_{self.alpha}_{self.resolution}{top}.imagenet"


SPECS: tuple[PretrainedSpec, ...] = tuple(
    PretrainedSpec("mobilenet_v2", alpha, rows, include_top)
    for alpha, rows_options in _ALPHA_RESOLUTIONS.items()
    for rows in rows_options
    for include_top in (True, False)
)


def find_spec(alpha: float, input_size: int | tuple[int, int], include_top: bool) -> PretrainedSpec:
    """The published file for a model, picking the nearest published resolution.

    Weights do not depend on the input size (the network is fully convolutional), so any
    size loads; the file trained at the nearest resolution is the best starting point.

    Args:
      alpha: width multiplier.
      input_size: the model's input size (int or ``(height, width)``).
      include_top: whether the 1000-class top is wanted.

    Returns:
      The matching spec.

    Raises:
      ValueError: no weights are published for ``alpha``; the message lists what exists.
    """
    alpha = float(alpha)
    if alpha not in _ALPHA_RESOLUTIONS:
        valid = ", ".join(
            f"alpha={a} at {'/'.join(map(str, r))}" for a, r in _ALPHA_RESOLUTIONS.items()
        )
        raise ValueError(f"no ImageNet weights are published for alpha={alpha}; valid: {valid}")
    size = input_size if isinstance(input_size, int) else round(sum(input_size) / 2)
    rows = min(_ALPHA_RESOLUTIONS[alpha], key=lambda r: (abs(r - size), -r))
    return next(
        s
        for s in SPECS
        if s.alpha == alpha and s.resolution == rows and s.include_top == include_top
    )
