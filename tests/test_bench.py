"""Performance properties that hold by construction: frozen layers run forward only, the
cached-feature head step equals the head step on images, and the benchmark entry point runs."""

from __future__ import annotations

import re
import subprocess
import sys

import jax
import numpy as np
import pytest
from tolerances import assert_close

from flaxcnn import bench, data, optim, sharding, train
from flaxcnn.config import TrainConfig
from flaxcnn.models import build_model, get_backbone, random_variables

MOBILENET_V2 = get_backbone("mobilenet_v2")
KERAS_LAYERS = list(MOBILENET_V2.layer_names())


def _backward_layers(row: str) -> set[str]:
    step = bench.build_step(row, 2, 32, conv_impl="auto")
    counts, layers = bench.backward_ops_by_layer(step.compiled.as_text(), KERAS_LAYERS)
    assert counts["forward", "dot"] + counts["forward", "convolution"] > 0  # the parser sees ops
    return layers


def test_head_step_differentiates_only_the_head():
    assert _backward_layers("head") == {"head"}


def test_fine_tune_step_differentiates_only_layers_from_fine_tune_at():
    layers = _backward_layers("finetune")
    first = KERAS_LAYERS.index(MOBILENET_V2.fine_tune_layer("100"))  # block_11_depthwise
    known = {n for n in layers if n in KERAS_LAYERS}
    assert {"head", "block_16_project", "block_11_depthwise"} <= layers
    assert min(KERAS_LAYERS.index(n) for n in known) == first, sorted(known)


def test_full_step_differentiates_the_stem():
    # The check above can fail: with everything trainable the first layers do have a backward.
    assert {"Conv1", "expanded_conv_depthwise"} <= _backward_layers("full")


def test_head_on_cached_features_equals_head_on_images(tiny_cats_vs_dogs):
    """Feature caching changes where the backbone runs, not the result (float rounding)."""
    config = TrainConfig(model_options={"alpha": 0.35}, weights=None, image_size=32, batch_size=4)
    model = build_model(config.model_config(2), conv_impl="lax")
    variables = random_variables(model, (1, 32, 32, 3))  # host copies: each run donates
    labels = optim.path_labels(variables["params"], optim.transfer_rules())
    mesh = sharding.make_mesh()
    dataset = data.open_dataset(str(tiny_cats_vs_dogs))
    common = dict(batch_size=4, image_size=(32, 32), preprocessing="tf", seed=0, epoch=0)
    batches = list(data.train_batches(dataset, augment=False, **common))[:3]
    cache = train.extract_features(model, variables, iter(batches), mesh)

    def run(apply_fn, input_key, inputs):
        tx = optim.make_optimizer(1e-2, labels, weight_decay=0.1)
        state = train.TrainState.create(variables, tx, jax.random.PRNGKey(1))
        steps = train.make_steps(apply_fn, train.frozen_tree(labels), mesh,
                                 update_batch_stats=False, input_key=input_key)  # fmt: skip
        losses = []
        for batch in inputs:
            state, sums = steps.train(state, sharding.to_global(batch, mesh))
            losses.append(float(sums["loss_sum"]))
        return np.asarray(losses), jax.tree.map(np.asarray, state.params["head"])

    on_images = run(model.apply, "image", batches)
    features = [{"features": cache["features"][i * 4 : (i + 1) * 4], "label": b["label"]}
                for i, b in enumerate(batches)]  # fmt: skip
    classify = lambda v, x, **kw: model.apply(v, x, method=model.classify_features, **kw)
    on_features = run(classify, "features", features)
    # The backbone ran in another program (extract_features) than inside the step: the same
    # forward pass up to rounding, relative to the loss [measured: bit-equal].
    assert_close(on_features[0], on_images[0], 1e-5, what="loss sums")
    assert not np.allclose(on_images[0][0], on_images[0][-1])  # the head did train
    # 3 AdamW steps at 1e-2: relative to the update, lr x steps, as for the head on 4 devices
    # in test_distributed.py (HEAD_UPDATE_RTOL) [measured: bit-equal].
    assert_close(on_features[1], on_images[1], 3e-4, scale=1e-2 * 3, what="head params")


def test_bench_cli_prints_backend_and_table():
    done = subprocess.run(
        [sys.executable, "-m", "flaxcnn.bench", "--rows", "head_cached,simple_cnn",
         "--batch-sizes", "4", "--image-sizes", "32", "--steps", "1", "--warmup", "0"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"({jax.default_backend()} backend)" in done.stdout
    lines = done.stdout.splitlines()
    rows = [line for line in lines if line.startswith("| mobilenet_v2 | head_cached | 4 |")]
    assert len(rows) == 1 and float(rows[0].split("|")[5]) > 0  # img/s, printed once
    assert sum(line.startswith("| model | row |") for line in lines) == 1  # one table
    assert any(line.startswith("| simple_cnn | simple_cnn | 4 | 32 |") for line in lines)


def test_bench_rejects_unknown_rows():
    with pytest.raises(SystemExit):
        bench.parse_args(["--rows", "inference,warp_drive"])


def test_bfloat16_step_computes_in_bfloat16_on_a_placed_batch():
    step = bench.build_step("inference", 2, 32, conv_impl="lax", dtype="bfloat16",
                            batch_on_device=True)  # fmt: skip
    hlo = step.compiled.as_text()
    # Activations travel between kernels in bf16 (XLA:CPU widens each conv's inputs to f32
    # inside the kernel; GPUs run the convolutions in bf16 itself).
    assert len(re.findall(r"= bf16\[", hlo)) > 50
    first, second = step.run(), step.run()  # the placed batch is reused
    for sums in (first, second):
        assert float(sums["count"]) == 2 and np.isfinite(float(sums["loss_sum"]))


def test_back_to_back_timing_waits_once_after_all_calls():
    events = []
    run = lambda: events.append("run") or len(events)
    per_call = bench.time_back_to_back(run, 5, wait=lambda r: events.append(("wait", r)))
    # One warm-up call waited for, then five calls and a single wait on the last result.
    assert events == ["run", ("wait", 1), *["run"] * 5, ("wait", 7)]
    assert per_call > 0


def test_compare_torch_table_gives_both_speed_ups_against_the_default_row():
    sys.path.insert(0, "experiments/benchmarks")
    try:
        import compare_torch
    finally:
        sys.path.remove("experiments/benchmarks")
    common = {"batch": 256, "size": 224, "compile_s": 1.0}
    rows = [
        {"side": "flaxcnn", "ms": 20.0, "ms_min": 19.0, "ms_back_to_back": 16.0,
         "bytes": 16e9, **common},
        {"side": "torch.compile", "ms": 22.0, "ms_min": 21.0, "ms_back_to_back": 20.0, **common},
        {"side": "torch eager", "ms": 40.0, "ms_min": 39.0, **common},  # an older row: no column
        {"side": "torch.compile", "batch": 128, "size": 160, "skipped": "deadline"},
    ]  # fmt: skip
    lines = compare_torch.table(rows, peak=4000.0, copy=2000.0).splitlines()
    torch_rows = [line for line in lines if line.startswith("| torch")]
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in torch_rows]
    assert cells[0][7:12] == ["1.10x", "1.25x", "800", "20", "40"]  # synced, back-to-back, GB/s
    assert cells[1][3:12] == ["-", "40.00 (39.00)", "-", "1.0", "2.00x", "-", "-", "-", "-"]
    assert lines[-1] == "Not run (past --deadline): torch.compile 128x160"


def _bench_error(capsys, *argv: str) -> str:
    """``bench``'s flag parsing must refuse ``argv`` with exit 2 and one line on stderr."""
    with pytest.raises(SystemExit) as exit_info:
        bench.parse_args(list(argv))
    lines = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(lines) == 1, lines
    assert lines[0].startswith("python -m flaxcnn.bench: error: ")
    return lines[0]


def test_bench_bad_batch_sizes_exit_2_with_one_line(capsys):
    for bad in ("0", "-4", "32,0", "x"):
        assert "give positive integers" in _bench_error(capsys, "--batch-sizes", bad)


def test_bench_input_row_needs_a_data_folder_given_as_an_absolute_path(
    capsys, tmp_path, monkeypatch
):
    assert "pass --data DIR" in _bench_error(capsys, "--rows", "input")
    monkeypatch.chdir(tmp_path)
    line = _bench_error(capsys, "--rows", "input", "--data", "no_such_folder")
    assert f"--data {tmp_path / 'no_such_folder'} is not a folder" in line
    (tmp_path / "photos").mkdir()
    args = bench.parse_args(["--rows", "input", "--data", "photos"])
    assert args.data == str(tmp_path / "photos") and args.rows == ["input"]
