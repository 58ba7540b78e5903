"""Published weight files as data: one :class:`PretrainedSpec` per file, and the lookup.

Each family module (``flaxcnn/models/<family>.py``) lists the files Keras publishes for its
variants, with the hash Keras's own ``get_file`` checks them against; this module knows no
family. Keras would build a URL for combinations that were never published and fail with an
HTTP 404; we list only real files, and say which exist when asked for another.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from typing import Any

OptionItems = tuple[tuple[str, Any], ...]


def option_items(options: Mapping[str, Any]) -> OptionItems:
    """Family options as a sorted, hashable tuple (``{'alpha': 1.0}`` -> ``(('alpha', 1.0),)``)."""
    return tuple(sorted(options.items()))


@dataclasses.dataclass(frozen=True)
class PretrainedSpec:
    """Everything known about one published weight file.

    Attributes:
      model: the registered model name the file belongs to (``'resnet50'``).
      url: where Keras downloads it from; the file name is the URL's last part, so a Keras
        cache (``~/.keras/models``) can be reused as-is.
      input_size: the square resolution the weights were trained at.
      include_top: whether the file holds the ImageNet classifier.
      file_hash: the digest Keras publishes for the file (32 hex digits: MD5, 64: SHA-256,
        as ``keras.utils.get_file`` tells them apart), or ``None`` where Keras gives none;
        then a cached file is checked by reading it instead.
      options: the family options the file was trained with (``(('alpha', 1.0),)``).
      num_classes: classes of the top (ImageNet-1k), also recorded for no-top files.
      license: licence of the weights.
    """

    model: str
    url: str
    input_size: int
    include_top: bool
    file_hash: str | None = None
    options: OptionItems = ()
    num_classes: int = 1000
    license: str = "Apache-2.0"

    def __post_init__(self) -> None:
        if self.file_hash is not None and len(self.file_hash) not in (32, 64):
            raise ValueError(f"{self.filename}: a file hash has 32 (MD5) or 64 (SHA-256) digits")

    @property
    def filename(self) -> str:
        return self.url.rsplit("/", 1)[-1]

    @property
    def hash_algorithm(self) -> str | None:
        """``'md5'`` or ``'sha256'`` (Keras's rule: by the digest's length)."""
        if self.file_hash is None:
            return None
        return "sha256" if len(self.file_hash) == 64 else "md5"

    @property
    def name(self) -> str:
        """A readable id: ``mobilenet_v2_alpha1.0_224_no_top.imagenet``."""
        options = "".join(f"_{key}{value}" for key, value in self.options)
        top = "" if self.include_top else "_no_top"
        return f"{self.model}{options}_{self.input_size}{top}.imagenet"


def describe_options(options: OptionItems | Mapping[str, Any]) -> str:
    items = options.items() if isinstance(options, Mapping) else options
    return ", ".join(f"{key}={value}" for key, value in items) or "the default options"


def find_spec(
    specs: Iterable[PretrainedSpec],
    *,
    input_size: int | tuple[int, int],
    include_top: bool,
    options: Mapping[str, Any] | None = None,
) -> PretrainedSpec:
    """The published file for a model, picking the nearest published resolution.

    Weights do not depend on the input size (the networks are fully convolutional), so any
    size loads; the file trained at the nearest resolution is the best starting point.

    Args:
      specs: one model's published files.
      input_size: the model's input size (int or ``(height, width)``).
      include_top: whether the ImageNet top is wanted.
      options: the family options (``{'alpha': 0.5}``).

    Returns:
      The matching spec.

    Raises:
      ValueError: no file is published for these options; the message lists what exists.
    """
    specs = tuple(specs)
    wanted = option_items(options or {})
    matching = [s for s in specs if s.options == wanted and s.include_top == include_top]
    if not matching:
        model = specs[0].model if specs else "this model"
        published = sorted({s.options for s in specs})
        valid = "; ".join(
            describe_options(o) + " at " + "/".join(
                str(r) for r in sorted({s.input_size for s in specs if s.options == o}))
            for o in published
        )  # fmt: skip
        raise ValueError(
            f"no ImageNet weights are published for {model} with {describe_options(wanted)}"
            + (f"; published: {valid}" if valid else "; pass weights=None or a file")
        )
    size = input_size if isinstance(input_size, int) else round(sum(input_size) / 2)
    return min(matching, key=lambda s: (abs(s.input_size - size), -s.input_size))
