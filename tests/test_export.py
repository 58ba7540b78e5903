"""``python -m flaxcnn.export``: each format exported from a real tiny run and checked in its
real runtime (LiteRT's interpreter, ``tf.saved_model.load``, ``jax.export.deserialize`` in a
Python that has only jax) against ``restore()`` + apply on real photos; bad input; every
model family.

Cost: one tiny CLI run (MobileNetV2 with the shared ImageNet weights at 32 px, head phase
only, ~50 s on a loaded 2-core machine) shared by every test here; each export ~15-30 s.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from tolerances import assert_close

from flaxcnn import checkpoints, data, export, export_check, jax_to_tf, models, predict, tf_runtime

PROG = "python -m flaxcnn.export"
ARTIFACT = {"tflite": "model.tflite", "saved_model": "saved_model", "stablehlo": "model.stablehlo"}
# The exporter's own bound (flaxcnn.export_check.RTOL, where the reasoning is): a conversion
# is another float32 implementation of the same network; measured here <= 1e-5 of the largest
# logit with the ImageNet weights, while a wrong layer or constant moves logits by >= 1e-2.
RTOL = 1e-4


@pytest.fixture(scope="module")
def run(tiny_cats_vs_dogs, shared_weights, tmp_path_factory) -> pathlib.Path:
    """A real tiny training run through the CLI: ImageNet backbone, a trained 2-class head,
    flip test-time augmentation (which predict applies around an exported model too)."""
    workdir = tmp_path_factory.mktemp("export") / "run"
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "JAX_PLATFORMS": "cpu",
           "FLAXCNN_CACHE": str(workdir.parent / "cache")}  # fmt: skip
    command = [sys.executable, "-m", "flaxcnn.experiments.transfer", "--data",
               str(tiny_cats_vs_dogs), "--weights", str(shared_weights), "--no-download",
               "--image-size", "32", "--batch-size", "8", "--conv-impl", "lax",
               "--head-epochs", "5", "--head-learning-rate", "1e-2", "--weight-decay", "0.1",
               "--finetune-epochs", "0", "--tta", "flip", "--checkpoint-every-seconds", "0",
               "--workdir", str(workdir)]  # fmt: skip
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return workdir


@pytest.fixture(scope="module")
def exported(run, tmp_path_factory) -> dict[str, pathlib.Path]:
    """Each format exported once by the CLI (in this process: TF and XLA load once); what
    it printed is in ``printed[format]``."""
    root = tmp_path_factory.mktemp("artifacts")
    paths = {}
    for format, name in ARTIFACT.items():
        paths[format] = root / name
        with contextlib.redirect_stdout(io.StringIO()) as out:
            assert export.main([str(run), "--format", format, "--output",
                                str(paths[format])]) == 0  # fmt: skip
        PRINTED[format] = out.getvalue().splitlines()
    return paths


PRINTED: dict[str, list[str]] = {}


@pytest.fixture(scope="module")
def photos(tiny_cats_vs_dogs) -> list[str]:
    """Five real validation photos of both classes."""
    paths = sorted((tiny_cats_vs_dogs / "validation").glob("*/*.jpg"))
    return [str(p) for p in paths[:3] + paths[-2:]]


def _reference(run, photos) -> tuple[np.ndarray, np.ndarray, dict]:
    """Pixels in [0, 255] and the logits of ``restore()`` + apply for them."""
    model, variables, metadata = checkpoints.restore(run)
    pixels = export_check.load_pixels(photos, metadata["image_size"])
    scaled = data.load_images(photos, metadata["image_size"], metadata["preprocessing"])
    np.testing.assert_array_equal(data.scale_images(pixels, metadata["preprocessing"]), scaled)
    return pixels, np.asarray(jax.jit(model.apply)(variables, scaled)), metadata


def _files(folder: pathlib.Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


# ---------------------------------------------------------------------------- formats


def test_tflite_runs_in_litert_with_a_dynamic_batch_and_matches_the_checkpoint(
    run, exported, photos
):  # fmt: skip
    from ai_edge_litert.interpreter import Interpreter

    pixels, want, metadata = _reference(run, photos)
    interpreter = Interpreter(model_path=str(exported["tflite"]))  # XNNPACK: the default
    (source,), (target,) = interpreter.get_input_details(), interpreter.get_output_details()
    assert list(source["shape_signature"]) == [-1, 32, 32, 3] and source["dtype"] == np.float32
    assert list(target["shape_signature"]) == [-1, 2]
    got = []
    for batch in (pixels, pixels[:1]):  # a batch of 5, then 1
        interpreter.resize_tensor_input(source["index"], batch.shape, strict=True)
        interpreter.allocate_tensors()
        interpreter.set_tensor(source["index"], batch)
        interpreter.invoke()
        got.append(interpreter.get_tensor(target["index"]).copy())
    assert_close(got[0], want, RTOL, what="tflite batch of 5")
    assert_close(got[1], want[:1], RTOL, scale=np.abs(want).max(), what="tflite batch of 1")
    carried = export_check.tflite_metadata(exported["tflite"].read_bytes())
    assert carried["class_names"] == ["cat", "dog"] == metadata["class_names"]
    assert carried["image_size"] == [32, 32] and carried["preprocessing"] == "tf"


def test_saved_model_serving_default_matches_the_checkpoint(run, exported, photos):
    tf = tf_runtime.tensorflow()
    pixels, want, _ = _reference(run, photos)
    loaded = tf.saved_model.load(str(exported["saved_model"]))
    serve = loaded.signatures["serving_default"]
    (spec,) = serve.structured_input_signature[1].values()
    assert spec.shape.as_list() == [None, 32, 32, 3] and spec.dtype == tf.float32
    assert_close(serve(images=tf.constant(pixels))["logits"].numpy(), want, RTOL,
                 what="saved_model")  # fmt: skip
    asset = exported["saved_model"] / "assets" / export_check.SAVED_MODEL_METADATA
    assert json.loads(asset.read_text())["class_names"] == ["cat", "dog"]


STABLEHLO_ONLY_JAX = """
import json, sys
import numpy as np
from jax import export
exported = export.deserialize(bytearray(open(sys.argv[1], "rb").read()))
np.save(sys.argv[3], np.asarray(exported.call(np.load(sys.argv[2]))))
heavy = sorted({m.split(".")[0] for m in sys.modules} & {"flaxcnn", "flax", "tensorflow", "orbax",
               "keras", "tf_keras", "optax"})
print(json.dumps({"imported": heavy, "platforms": list(exported.platforms),
                  "input": str(exported.in_avals[0])}))
"""


def test_stablehlo_runs_in_a_python_that_has_only_jax(run, exported, photos, tmp_path):
    pixels, want, _ = _reference(run, photos)
    np.save(tmp_path / "pixels.npy", pixels)
    # -I: isolated mode (no script folder, PYTHON* variables or user site on the path).
    done = subprocess.run([sys.executable, "-I", "-c", STABLEHLO_ONLY_JAX,
                           str(exported["stablehlo"]), str(tmp_path / "pixels.npy"),
                           str(tmp_path / "logits.npy")], capture_output=True, text=True,
                          cwd=tmp_path, env={**os.environ, "JAX_PLATFORMS": "cpu"},
                          timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.splitlines()[-1])
    assert report["imported"] == []
    assert report["platforms"] == ["cpu", "cuda"] and report["input"] == "float32[n,32,32,3]"
    assert_close(np.load(tmp_path / "logits.npy"), want, RTOL, what="stablehlo")
    sidecar = json.loads(export_check.sidecar(exported["stablehlo"]).read_text())
    assert sidecar["class_names"] == ["cat", "dog"] and sidecar["platforms"] == ["cpu", "cuda"]


@pytest.mark.parametrize("format", list(ARTIFACT))
def test_the_cli_reports_the_self_check_on_the_runs_own_validation_photos(
    exported, tiny_cats_vs_dogs, format
):  # fmt: skip
    out = PRINTED[format]
    assert len(out) == 2 and out[0].startswith(f"exported {format} to {exported[format]} (")
    assert "MobileNetV2 (alpha=1.0) with a 2-class head" in out[0]
    assert "[N, 32, 32, 3] -> logits [N, 2] (cat, dog); preprocessing 'tf' inside" in out[0]
    # The run's data folder still exists: its validation photos (8 by default) are used.
    assert out[1].startswith(f"self-check against the checkpoint: 8 validation images of "
                             f"{tiny_cats_vs_dogs}, as one batch and the first alone: max "
                             "|logit difference| ")  # fmt: skip
    assert "<=" in out[1] and "(1e-4 x max |logit|" in out[1]
    # The artifacts and the StableHLO sidecar, no temporaries left beside them.
    assert sorted(p.name for p in exported[format].parent.iterdir()) == [
        "model.stablehlo", "model.stablehlo.json", "model.tflite", "saved_model"]  # fmt: skip


@pytest.mark.parametrize("quantize", ["dynamic", "float16"])
def test_quantized_tflite_prints_its_validation_accuracy_change(
    run, exported, tiny_cats_vs_dogs, photos, quantize, tmp_path, capsys
):  # fmt: skip
    output = tmp_path / "model.tflite"
    output.write_bytes(exported["tflite"].read_bytes())  # replaced: --overwrite on a file
    assert export.main([str(run), "--format", "tflite", "--quantize", quantize, "--output",
                        str(output), "--overwrite"]) == 0  # fmt: skip
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith(f"exported tflite ({quantize} quantization) to {output}")
    assert lines[1].startswith("self-check of the float32 conversion against the checkpoint")
    (line,) = [x for x in lines if x.startswith(f"quantized ({quantize}): validation accuracy")]
    # The checkpoint's accuracy on the 16 validation photos, computed here independently.
    validation = sorted((tiny_cats_vs_dogs / "validation").glob("*/*.jpg"))
    _, want, metadata = _reference(run, [str(p) for p in validation])
    labels = [metadata["class_names"].index(p.parent.name) for p in validation]
    accuracy = float(np.mean(want.argmax(-1) == labels))
    assert f"validation accuracy {100 * accuracy:.2f}% (checkpoint) -> " in line
    assert f"on 16 validation images of {tiny_cats_vs_dogs}; top-1 agrees on " in line
    # Quantized for real: int8 weights take ~1/4 of the float32 file, float16 ~1/2.
    ratio = output.stat().st_size / exported["tflite"].stat().st_size
    assert ratio < (0.35 if quantize == "dynamic" else 0.6), ratio
    assert export_check.tflite_metadata(output.read_bytes())["quantize"] == quantize
    assert _files(tmp_path) == ["model.tflite"]


@pytest.mark.parametrize("format", ["tflite", "saved_model"])
def test_predict_model_file_gives_the_checkpoints_output(run, exported, photos, format,
                                                         tmp_path, capsys):  # fmt: skip
    broken = tmp_path / "broken.jpg"
    broken.write_text("not an image")
    inputs = [*photos, broken]
    outputs = {}
    for source in ("--checkpoint", "--model-file"):
        path = run if source == "--checkpoint" else exported[format]
        rc = predict.main([source, str(path), "--json", "--top-k", "2", *map(str, inputs)])
        out, err = capsys.readouterr()
        outputs[source] = rc, [json.loads(line) for line in out.splitlines()], err
    (rc, rows, err), (want_rc, want_rows, want_err) = outputs["--model-file"], outputs[
        "--checkpoint"]  # fmt: skip
    assert rc == want_rc == 2 and err == want_err and str(broken) in err  # the broken file
    assert [r["image"] for r in rows] == [r["image"] for r in want_rows] == photos
    assert [r["label"] for r in rows] == [r["label"] for r in want_rows]
    # The run's test-time augmentation travels with the export; predict applies it around it.
    assert export_check.load(exported[format]).metadata["tta"] == "flip"
    # A softmax moves by at most half the largest logit change; the logits agree to RTOL of
    # their magnitude (the flip views included: each is one call of the same artifact).
    _, logits, _ = _reference(run, photos)
    got = [[r["probabilities"][c] for c in ("cat", "dog")] for r in rows]
    want = [[r["probabilities"][c] for c in ("cat", "dog")] for r in want_rows]
    assert_close(got, want, RTOL / 2, scale=float(np.abs(logits).max()), what=format)


def test_predict_model_file_that_is_no_export_is_one_line_exit_2(tmp_path, photos, capsys):
    (tmp_path / "model.tflite").write_bytes(b"not a flatbuffer")
    assert predict.main(["--model-file", str(tmp_path / "model.tflite"), *photos]) == 2
    out, err = capsys.readouterr()
    assert out == "" and len(err.splitlines()) == 1
    assert err.startswith(f"python -m flaxcnn.predict: error: {tmp_path / 'model.tflite'} is not "
                          "a model exported by python -m flaxcnn.export")  # fmt: skip


# ---------------------------------------------------------------------------- failures


def _error(capsys, argv) -> str:
    """Runs the CLI expecting exit 2 with exactly one line on stderr; returns that line."""
    try:
        rc = export.main([str(a) for a in argv])
    except SystemExit as e:  # argparse
        rc = e.code
    out, err = capsys.readouterr()
    assert rc == 2 and out == "", (rc, out, err)
    (line,) = err.splitlines()
    assert line.startswith(f"{PROG}: error: "), line
    return line


def test_bad_input_is_one_line_exit_2_and_writes_nothing(run, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "a_file").write_text("x")
    kept = tmp_path / "kept"
    kept.mkdir()
    (kept / "notes.txt").write_text("not a SavedModel")
    existing = tmp_path / "existing.tflite"
    existing.write_bytes(b"an earlier export")
    before = _files(tmp_path)
    cases = {
        "no checkpoint found at": [tmp_path / "empty", "--format", "tflite", "--output",
                                   tmp_path / "m.tflite"],
        "--format 'onnx' is unknown; allowed: tflite, saved_model, stablehlo": [
            run, "--format", "onnx", "--output", tmp_path / "m.onnx"],
        "--quantize 'dynamic' is invalid; allowed with --format tflite": [
            run, "--format", "saved_model", "--quantize", "dynamic", "--output", tmp_path / "s"],
        f"--output {existing} exists; pass --overwrite to replace it": [
            run, "--format", "tflite", "--output", existing],
        f"--output {kept} is a folder that holds no SavedModel; it is never replaced": [
            run, "--format", "saved_model", "--output", kept, "--overwrite"],
        f"--output {tmp_path / 'missing' / 'm.tflite'} cannot be written": [
            run, "--format", "tflite", "--output", tmp_path / "missing" / "m.tflite"],
        f"--output {tmp_path / 'a_file' / 'm.tflite'} cannot be written": [
            run, "--format", "tflite", "--output", tmp_path / "a_file" / "m.tflite"],
        "--output /proc/flaxcnn-export.tflite cannot be written": [
            run, "--format", "tflite", "--output", "/proc/flaxcnn-export.tflite"],
        "--check-images 0 is invalid; allowed: a positive integer": [
            run, "--format", "tflite", "--output", tmp_path / "m.tflite", "--check-images", "0"],
    }  # fmt: skip
    for expected, argv in cases.items():
        assert expected in _error(capsys, argv), argv
    assert _files(tmp_path) == before
    assert existing.read_bytes() == b"an earlier export"


class _Sorting(nn.Module):
    """A classifier with an operation TF graphs have no translation for here (sort)."""

    conv_impl: str = "auto"

    @nn.compact
    def __call__(self, x, train: bool = False):
        return nn.Dense(2)(jnp.sort(x.mean((1, 2)), axis=-1))


class _Formulations(nn.Module):
    """Its 'lax' formulation computes something else: what a wrong conversion would do."""

    conv_impl: str = "auto"

    @nn.compact
    def __call__(self, x, train: bool = False):
        return nn.Dense(2)(x.mean((1, 2))) + (0.5 if self.conv_impl == "lax" else 0.0)


def _toy(module: type[nn.Module]):
    variables = module().init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)))
    metadata = {"model": {"arch": "toy_" + module.__name__.strip("_").lower(), "num_classes": 2},
                "image_size": [32, 32], "preprocessing": "unit",
                "class_names": ["a", "b"]}  # fmt: skip
    return (lambda impl: module(conv_impl=impl)), variables, metadata


@pytest.mark.parametrize("format", ["tflite", "saved_model"])
def test_a_model_without_an_export_path_is_refused_naming_the_model_and_the_format(
    format, tmp_path
):  # fmt: skip
    build, variables, metadata = _toy(_Sorting)
    with pytest.raises(export.ExportError) as caught:
        export.export_variables(build, variables, metadata, format, tmp_path / ARTIFACT[format])
    message = str(caught.value)
    assert message.startswith(f"toy_sorting has no {format} export path yet (no TensorFlow "
                              "translation for the JAX primitive 'sort')")  # fmt: skip
    assert "\n" not in message and _files(tmp_path) == []
    # jax.export serialises any JAX program: the message's advice works.
    result = export.export_variables(build, variables, metadata, "stablehlo",
                                     tmp_path / "m.stablehlo")  # fmt: skip
    assert result.check.ok


@pytest.mark.parametrize("format", ["tflite", "saved_model"])
def test_a_failed_self_check_is_one_line_and_leaves_nothing_under_the_output(format, tmp_path):
    build, variables, metadata = _toy(_Formulations)
    with pytest.raises(export.ExportError) as caught:
        export.export_variables(build, variables, metadata, format, tmp_path / ARTIFACT[format])
    message = str(caught.value)
    assert message.startswith(f"self-check failed: the {format} export of toy_formulations "
                              "differs from the checkpoint on 8 generated images")  # fmt: skip
    assert "> " in message and "\n" not in message
    assert _files(tmp_path) == []  # neither the output nor its temporary
    # An earlier export under that name survives a failed --overwrite: the new one was
    # written under a temporary name, and only a checked artifact replaces the old.
    output = tmp_path / ARTIFACT[format]
    earlier = output / "saved_model.pb" if format == "saved_model" else output
    earlier.parent.mkdir(exist_ok=True)
    earlier.write_bytes(b"an earlier export")
    with pytest.raises(export.ExportError, match="self-check failed"):
        export.export_variables(build, variables, metadata, format, output, overwrite=True)
    assert earlier.read_bytes() == b"an earlier export"
    assert [p.name for p in tmp_path.iterdir()] == [output.name]  # no temporaries either


# ---------------------------------------------------------------------------- every model


def _family(backbone) -> str:
    return getattr(backbone.module, "func", backbone.module).__module__


# The first registered variant of each family module (variants share their family's code;
# ResNet50V2 and EfficientNetV2S, whose blocks differ within their families, passed too but
# cost 60 s more). The default model is exported from a real run above.
REPRESENTATIVES = sorted({_family(b): b.name for b in reversed(models.BACKBONES.values())
                          if b.name != models.DEFAULT_MODEL}.values())  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("name", REPRESENTATIVES)
def test_every_family_exports_to_tflite_and_runs_in_litert(name, tiny_cats_vs_dogs, tmp_path):
    backbone = models.get_backbone(name)
    config = {"arch": "transfer", "num_classes": 2, "dropout_rate": 0.2,
              "freeze_backbone_batch_norm": True,
              "backbone": backbone.model_config(include_top=False, pooling="avg")}  # fmt: skip
    variables = models.random_variables(models.build_model(config), (1, 32, 32, 3))
    metadata = {"model": config, "image_size": [32, 32], "preprocessing": backbone.preprocessing,
                "class_names": ["cat", "dog"]}  # fmt: skip
    build = lambda impl: models.build_model(config, conv_impl=impl)
    output = tmp_path / f"{name}.tflite"
    result = export.export_variables(build, variables, metadata, "tflite", output,
                                     validation_data=tiny_cats_vs_dogs, check_images=4)  # fmt: skip
    # The exporter's self-check (LiteRT, against build('auto').apply: restore()'s model) ran
    # on 4 real photos as a batch and on 1 alone; the MobileNetV2 tests above check that
    # self-check itself independently.
    assert result.check.ok and result.check.images == 4
    assert result.check.source.startswith(f"validation images of {tiny_cats_vs_dogs}")
    from ai_edge_litert.interpreter import Interpreter

    (source,) = Interpreter(model_path=str(output)).get_input_details()
    assert list(source["shape_signature"]) == [-1, 32, 32, 3]


def test_a_function_that_merges_the_batch_into_another_axis_is_refused():
    """The batch is found by its traced size; folded into another axis it could not stay
    dynamic, so the translation refuses instead of baking the traced size in."""
    with pytest.raises(jax_to_tf.UnsupportedPrimitiveError, match="merges the batch axis"):
        jax_to_tf.to_tf_module(lambda x: x.reshape(-1)[None, :4], (4, 4, 3),
                               tf=tf_runtime.tensorflow())
