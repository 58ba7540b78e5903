"""The backbone contract: everything the engine may know about a pretrained model, as data.

Each family module (``flaxcnn/models/<family>.py``) defines its ``nn.Module`` and, next to it,
one :class:`Backbone` per registered variant. Optimiser masks, the phase machinery, feature
and activation caching, bench, checkpoints, predict and the weights CLI ask the contract;
none of them knows a family by name (timm's ``pretrained_cfg`` as data, Keras's "names are
the contract").

A family's module must:
  * take the fields ``include_top``, ``num_classes``, ``pooling`` (``None``/``'avg'``/
    ``'max'``), ``dtype`` and ``conv_impl``, plus its options (``alpha``, ...);
  * name every weighted submodule after its Keras layer, so that weights load by name and
    freeze rules select layers by name;
  * cut into stages: ``module(x, train, stop=k)`` returns the activation entering stage
    ``k`` and ``module(a, train, start=k)`` continues from it (``len(stage_names)`` stages;
    the last one is the top: head conv, pooling, classifier);
  * return logits with the top and never normalise its input (see ``preprocessing``).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

from flax import linen as nn

from flaxcnn.weights.registry import PretrainedSpec, describe_options, find_spec


class KerasLayer(NamedTuple):
    """One entry of Keras's ``model.layers``.

    Attributes:
      name: Keras's layer name. Keras numbers the layers it names itself (``re_lu_7``,
        ``tf.__operators__.add_3``) by a per-session counter; those are listed without the
        number and carry no weights.
      stage: the stage that computes the layer (see the module docstring).
      weighted: whether the layer has weights (a submodule of that name in the model).
    """

    name: str
    stage: int
    weighted: bool


@dataclasses.dataclass(frozen=True)
class Backbone:
    """One registered model: its definition, its Keras layer list, stages and weight files.

    Attributes:
      name: the registered snake_case name (``'resnet50_v2'``).
      keras_name: Keras's application name (``'ResNet50V2'``); accepted wherever a name is.
      module: builds the ``nn.Module`` (a class, or a ``functools.partial`` fixing the
        variant's fields); called with the fields listed in the module docstring.
      layers: ``layers(include_top, **options)`` gives Keras's layer list in order, input
        layer first, so that index ``i`` is Keras layer index ``i`` (``--fine-tune-at``).
      stage_names: a name per stage, in order (the block prefix a stage's layers share).
      preprocessing: the input mode the weights expect (``flaxcnn.data.PREPROCESSING_MODES``).
      default_input_size: the resolution the ImageNet weights were trained at.
      default_fine_tune_at: the Keras layer index or name fine-tuning starts from by default.
      running_statistics: whether the norms keep running statistics (BatchNorm) and so
        have ``batch_stats`` and a train/inference difference; LayerNorm has neither.
      weights: the published files of all options.
      options: family options -> allowed values, the default first (``{'alpha': (1.0, ...)}``).
      min_input_size: the smallest input side the network accepts.
      classifier: the layers of the top that map to the 1000 ImageNet classes; a new head
        replaces exactly these.
      imagenet_top1: ImageNet top-1 accuracy as Keras publishes it (default options, at the
        default size), or ``None``.
    """

    name: str
    keras_name: str
    module: Callable[..., nn.Module]
    layers: Callable[..., tuple[KerasLayer, ...]]
    stage_names: tuple[str, ...]
    preprocessing: str
    default_input_size: int
    default_fine_tune_at: str
    running_statistics: bool
    weights: tuple[PretrainedSpec, ...] = ()
    options: Mapping[str, tuple[Any, ...]] = dataclasses.field(default_factory=dict)
    min_input_size: int = 32
    classifier: tuple[str, ...] = ("predictions",)
    imagenet_top1: float | None = None

    @property
    def num_stages(self) -> int:
        return len(self.stage_names)

    def check_options(self, options: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """The options completed with their defaults; unknown or unsupported ones raise.

        Raises:
          ValueError: one line naming the option and what is allowed.
        """
        options = dict(options or {})
        unknown = sorted(set(options) - set(self.options))
        if unknown:
            known = ", ".join(self.options) or "none"
            raise ValueError(f"{self.name} has no option {unknown[0]!r} (its options: {known})")
        resolved = {}
        for key, allowed in self.options.items():
            value = options.get(key, allowed[0])
            if value not in allowed:
                raise ValueError(
                    f"{key}={value!r} is not supported by {self.name}; allowed: "
                    + ", ".join(map(str, allowed))
                )
            resolved[key] = type(allowed[0])(value)
        return resolved

    def build(
        self,
        *,
        include_top: bool = False,
        num_classes: int = 1000,
        pooling: str | None = None,
        dtype: Any = None,
        conv_impl: str = "auto",
        **options: Any,
    ) -> nn.Module:
        """The unbound module (see the module docstring for what the fields mean)."""
        import jax.numpy as jnp

        return self.module(
            include_top=include_top, num_classes=num_classes, pooling=pooling,
            dtype=dtype or jnp.float32, conv_impl=conv_impl, **self.check_options(options),
        )  # fmt: skip

    def model_config(
        self, *, include_top: bool, num_classes: int = 1000, pooling: str | None = None,
        **options: Any,
    ) -> dict[str, Any]:  # fmt: skip
        """The JSON-able config ``flaxcnn.models.build_model`` rebuilds this model from."""
        return {"arch": self.name, **self.check_options(options), "include_top": include_top,
                "num_classes": num_classes, "pooling": pooling}  # fmt: skip

    def layer_names(self, include_top: bool = False, **options: Any) -> tuple[str, ...]:
        return tuple(layer.name for layer in self.layers(include_top, **options))

    def all_layers(self, **options: Any) -> tuple[KerasLayer, ...]:
        """The no-top model's layers, then those only the top adds (a model without the top
        may end in layers the one with the top does not have, e.g. a final norm)."""
        no_top = self.layers(False, **options)
        names = {layer.name for layer in no_top}
        return no_top + tuple(e for e in self.layers(True, **options) if e.name not in names)

    def stage_of(self, layer: str, **options: Any) -> int:
        """The stage that computes a Keras layer (``ValueError`` for another model's layer)."""
        for entry in self.all_layers(**options):
            if entry.name == layer:
                return entry.stage
        raise ValueError(f"{layer!r} is not a {self.keras_name} layer")

    def fine_tune_layer(self, fine_tune_at: str | int, **options: Any) -> str:
        """Resolves ``--fine-tune-at`` to the first weighted Keras layer that trains.

        Args:
          fine_tune_at: a Keras layer index (the TensorFlow tutorial's ``fine_tune_at = 100``:
            layers ``[100:]`` train), a layer name, or a name prefix that ends at ``_`` or
            ``/`` (``'block_11'``, ``'conv5_block1'``), as in Keras's own layer names.
          **options: the family options.

        Returns:
          The first weighted layer at or after that point (``block_11_depthwise`` for
          MobileNetV2's 100, since layer 100 itself is a ReLU).

        Raises:
          ValueError: out of range, or a name of no layer of this model; the message gives
            the valid range and example names.
        """
        layers = self.layers(False, **options)
        text = str(fine_tune_at).strip()
        examples = ", ".join(self.stage_names[:2] + self.stage_names[-2:])
        if re.fullmatch(r"-?\d+", text):
            index = int(text)
            if not 1 <= index < len(layers):
                raise ValueError(
                    f"--fine-tune-at {index} is out of range; {self.keras_name} has Keras layers "
                    f"1..{len(layers) - 1} (or give a name such as {examples})"
                )
        else:
            prefix = lambda name: name == text or name.startswith((text + "_", text + "/"))
            index = next((i for i, layer in enumerate(layers) if prefix(layer.name)), None)
            if index is None:
                raise ValueError(
                    f"--fine-tune-at {text!r} names no {self.keras_name} layer; give a Keras "
                    f"layer index 1..{len(layers) - 1} or a layer or block name such as "
                    f"{examples}"
                )
        weighted = [layer.name for layer in layers[index:] if layer.weighted]
        if not weighted:
            raise ValueError(f"--fine-tune-at {text}: no {self.keras_name} layer from there on "
                             "has weights; pick an earlier layer")  # fmt: skip
        return weighted[0]

    def layers_from(self, first: str, **options: Any) -> tuple[str, ...]:
        """The weighted layers from ``first`` on (the top's included): those that train."""
        names = [layer.name for layer in self.all_layers(**options) if layer.weighted]
        return tuple(names[names.index(first) :])

    def find_weights(
        self, input_size: int | tuple[int, int], include_top: bool, **options: Any
    ) -> PretrainedSpec:
        """The published file nearest to ``input_size`` for these options."""
        return find_spec(self.weights, input_size=input_size, include_top=include_top,
                         options=self.check_options(options))  # fmt: skip

    def describe(self, options: Mapping[str, Any] | None = None) -> str:
        """``'MobileNetV2 (alpha=1.0)'``: how messages name the model."""
        options = self.check_options(options)
        return f"{self.keras_name} ({describe_options(options)})" if options else self.keras_name


def check_stage_call(name: str, x: Any, start: int, stop: int, num_stages: int,
                     min_size: int) -> None:  # fmt: skip
    """What every backbone's ``__call__(x, start=, stop=)`` checks before it runs: the stage
    range, and for images (``start == 0``) NHWC with 3 channels and the minimum side."""
    if not 0 <= start <= stop <= num_stages:
        raise ValueError(f"stages [{start}, {stop}) are not within [0, {num_stages}]")
    if start == 0 and (x.ndim != 4 or x.shape[-1] != 3):
        raise ValueError(f"{name} expects NHWC images with 3 channels, got {x.shape}")
    if start == 0 and min(x.shape[1:3]) < min_size:
        raise ValueError(f"{name} needs inputs of at least {min_size}x{min_size}, "
                         f"got {x.shape[1]}x{x.shape[2]}")  # fmt: skip
