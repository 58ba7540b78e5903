"""The backbone contract, checked for every registered model, and the engine's ignorance of
families: what a family declares is consistent with the module it defines, and only
``flaxcnn/models/``, the registry and the alias name a family."""

from __future__ import annotations

import pathlib
import re
import subprocess

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxcnn import checkpoints, config, data, models, pretrained
from flaxcnn.weights import registry

REPO = pathlib.Path(__file__).resolve().parent.parent
NAMES = models.list_models()

def _family(backbone) -> str:
    return getattr(backbone.module, "func", backbone.module).__module__


# One variant per family (the first registered) for the checks that trace a model.
ONE_PER_FAMILY = list({_family(b): b.name for b in reversed(models.BACKBONES.values())}.values())


def _abstract(backbone, include_top: bool, **options):
    module = backbone.build(include_top=include_top, **options)
    size = backbone.min_input_size
    return jax.eval_shape(module.init, jax.random.PRNGKey(0), jnp.zeros((1, size, size, 3)))


def test_names_are_snake_case_and_keras_names_resolve():
    assert NAMES[0] == "mobilenet_v2" and len(NAMES) == len(set(NAMES))
    for name, backbone in models.BACKBONES.items():
        assert re.fullmatch(r"[a-z][a-z0-9_]*", name), name
        assert models.get_backbone(backbone.keras_name) is backbone
        assert models.get_backbone(name.upper()) is backbone
    with pytest.raises(models.UnknownModelError) as error:
        models.get_backbone("resnet9000")
    message = str(error.value)
    assert "\n" not in message and all(name in message for name in NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_declared_data_is_consistent(name):
    backbone = models.get_backbone(name)
    layers = backbone.layers(False)
    with_top = backbone.layers(True)
    below_top = lambda entries: [e for e in entries if e.stage < backbone.num_stages - 1]
    assert below_top(with_top) == below_top(layers)  # the top stage differs (pooling, head)
    stages = [layer.stage for layer in with_top]
    assert stages == sorted(stages) and set(stages) <= set(range(backbone.num_stages))
    # Every stage has layers; without the top the last (pooling, head) may have none.
    assert {layer.stage for layer in with_top[1:]} == set(range(backbone.num_stages))
    assert {layer.stage for layer in layers[1:]} >= set(range(backbone.num_stages - 1))
    assert backbone.preprocessing in data.PREPROCESSING_MODES
    assert backbone.default_input_size >= backbone.min_input_size >= 32
    first = backbone.fine_tune_layer(backbone.default_fine_tune_at)
    assert first in backbone.layers_from(first)
    # Fine-tuning from the first weighted layer trains every weighted layer of the no-top
    # model, its own last layers included (some end in a layer the top does not have).
    weighted = [layer.name for layer in layers if layer.weighted]
    assert set(weighted) <= set(backbone.layers_from(weighted[0]))
    names = [layer.name for layer in layers]
    unique = [layer for layer in layers if names.count(layer.name) == 1]  # not auto-named
    assert [backbone.stage_of(layer.name) for layer in unique] == [e.stage for e in unique]
    weighted_top = {layer.name for layer in with_top if layer.weighted}
    assert set(backbone.classifier) <= weighted_top
    assert backbone.imagenet_top1 is None or 0.5 < backbone.imagenet_top1 < 0.95
    for spec in backbone.weights:
        assert spec.model == name and spec.options in {
            registry.option_items(backbone.check_options(dict(spec.options)))}
    assert backbone.find_weights(backbone.default_input_size, False).input_size == (
        backbone.default_input_size)  # the default size is the one the weights were trained at
    for key, allowed in backbone.options.items():
        assert len(set(allowed)) == len(allowed), key


@pytest.mark.parametrize("name", ONE_PER_FAMILY)
def test_weighted_layers_are_the_modules_variables(name):
    """The layer list's weighted names are exactly the module's variable groups, with and
    without the top, so ``--fine-tune-at`` and weight loading see the same layers."""
    backbone = models.get_backbone(name)
    for include_top in (False, True):
        variables = _abstract(backbone, include_top)
        groups = {group for collection in variables.values() for group in collection}
        weighted = {layer.name for layer in backbone.layers(include_top) if layer.weighted}
        assert groups == weighted, (include_top, sorted(groups ^ weighted)[:5])
        has_statistics = "batch_stats" in variables
        assert has_statistics == backbone.running_statistics


@pytest.mark.parametrize("name", ONE_PER_FAMILY)
def test_bfloat16_computes_in_bf16_and_keeps_float32_variables(name):
    backbone = models.get_backbone(name)
    module = backbone.build(include_top=False, pooling="avg", dtype=jnp.bfloat16)
    image = jnp.zeros((2, backbone.min_input_size, backbone.min_input_size, 3))
    variables = jax.eval_shape(module.init, jax.random.PRNGKey(0), image)
    assert {leaf.dtype for leaf in jax.tree.leaves(variables)} == {jnp.dtype("float32")}
    assert jax.eval_shape(module.apply, variables, image).dtype == jnp.bfloat16


def test_a_new_head_is_initialised_as_the_whole_models_init_would():
    """``create(name, num_classes=K)`` loads the backbone and initialises only the head; the
    head equals that of ``model.init`` on the whole classifier with the same key."""
    weights = None
    model, random = pretrained.create("mobilenet_v2", weights=weights, input_size=32,
                                      num_classes=3, alpha=0.35)  # fmt: skip
    shapes = jax.tree.map(lambda x: x.shape, random)
    fresh = pretrained.init_subset(model, jax.random.PRNGKey(0), (32, 32),
                                   lambda path: path.startswith("params/head/"))  # fmt: skip
    jax.tree.map(np.testing.assert_array_equal, fresh["params"]["head"],
                 random["params"]["head"])  # fmt: skip
    assert shapes["params"]["head"]["kernel"] == (1280, 3)


def test_checkpoints_written_before_the_contract_still_restore(tmp_path):
    """A best checkpoint as the MobileNetV2-only engine wrote it (its model config has no
    ``num_classes`` in the backbone, and an ``alpha`` of its own) restores and runs."""
    old_model = {"arch": "transfer", "backbone": {"arch": "mobilenet_v2", "alpha": 0.35,
                 "include_top": False, "pooling": "avg"}, "num_classes": 2,
                 "dropout_rate": 0.2, "freeze_backbone_batch_norm": True}  # fmt: skip
    module = models.build_model(old_model)
    variables = models.random_variables(module, (1, 32, 32, 3))
    metadata = {"format": "flaxcnn/1", "model": old_model, "image_size": [32, 32],
                "preprocessing": "tf", "class_names": ["cat", "dog"]}  # fmt: skip
    checkpoints.save_variables(tmp_path / "best" / "7", variables, metadata)
    restored, restored_vars, restored_meta = checkpoints.restore(tmp_path)
    images = np.random.default_rng(0).uniform(-1, 1, (2, 32, 32, 3)).astype(np.float32)
    np.testing.assert_array_equal(jax.jit(restored.apply)(restored_vars, images),
                                  jax.jit(module.apply)(variables, images))  # fmt: skip
    assert restored_meta["class_names"] == ["cat", "dog"]
    old_config = config.TrainConfig.from_json('{"alpha": 0.5, "model": "mobilenet_v2"}')
    assert old_config.model_options == {"alpha": 0.5}


def test_bad_model_options_and_layers_are_one_line_config_errors():
    cases = [
        ("model", "resnet9000", "--model: unknown model 'resnet9000'; registered: mobilenet_v2"),
        ("model_options", {"alpha": 0.3}, "--alpha 0.3 is invalid for mobilenet_v2; allowed:"),
        ("fine_tune_at", "conv5_block1", "--fine-tune-at 'conv5_block1' names no MobileNetV2 "
         "layer; give a Keras layer index 1..153"),
        ("fine_tune_at", "154", "--fine-tune-at 154 is out of range; MobileNetV2 has Keras "
         "layers 1..153"),
        ("image_size", 16, "--image-size 16 is invalid; allowed: an integer >= 32"),
    ]  # fmt: skip
    for field, value, expected in cases:
        with pytest.raises(config.ConfigError) as error:
            config.TrainConfig(**{field: value})
        assert "\n" not in str(error.value) and str(error.value).startswith(expected), error.value
    options = {b.name for b in models.BACKBONES.values() if not b.options}
    if options:  # a model without family options refuses one
        plain = sorted(options)[0]
        with pytest.raises(config.ConfigError, match=f"--alpha applies to .*not {plain}"):
            config.TrainConfig(model=plain, model_options={"alpha": 1.0})


def test_no_engine_module_names_a_family():
    """The engine asks the contract: only models/, the weights registry and the alias in
    pretrained.py may name a family (the check the project's house rules ask for)."""
    found = subprocess.run(
        ["grep", "-rlniE", "mobilenet|resnet|efficientnet|convnext", "flaxcnn", "--include=*.py"],
        cwd=REPO, capture_output=True, text=True, check=False,
    ).stdout.split()  # fmt: skip
    allowed = re.compile(r"flaxcnn/(models/.*|pretrained\.py|weights/registry\.py)$")
    assert [path for path in found if not allowed.match(path)] == []
