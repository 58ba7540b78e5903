"""Data parallelism: 4 devices compute what 1 does, 2 processes what 1 does, checkpoints move.

JAX fixes the device count when it starts, so the multi-device checks run this file as a
script in fresh processes on CPU: ``XLA_FLAGS=--xla_force_host_platform_device_count=N``
simulates N devices, and two processes on 127.0.0.1 (gloo collectives) simulate two hosts.

  * ``parity`` (one process, 4 devices, started in the background when the module starts):
    the same global batches on a 4-device mesh and on a 1-device mesh (``jax.devices()[:1]``)
    give the same losses and TrainState for head training on cached features, fine-tuning,
    and a MobileNetV2 whose BatchNorm trains (global-batch statistics); a checkpoint saved
    on 4 devices restores on 1 and the reverse; bf16 keeps params, Adam state and BN
    statistics in float32.
  * ``multihost`` (two processes, 2 devices each): ``fit(resume=True)`` from a 1-device
    run's checkpoint reaches that run's parameters; each process reads only its share of
    every batch; only process 0 writes reports; the collective checkpoints restore in one
    process, and ``--resume`` continues them there on 1 device.

Model variables come from ``jax.eval_shape`` plus numpy, not ``model.init``: compiling the
initialiser costs more than every train step here together (and the two processes resume
for the same reason).
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import socket
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from tolerances import assert_within, max_abs, max_diff

from flaxcnn import checkpoints, data, metrics, optim, report, sharding, train
from flaxcnn.config import TrainConfig
from flaxcnn.models import build_model, get_backbone
from flaxcnn.models.mobilenet_v2 import MobileNetV2

SIZE = 32
LEARNING_RATE = 1e-3  # Adam(W) in _train
# Bounds (tests/tolerances.py). 4 devices run the same float32 program as 1 on per-device
# batches of 2 instead of 8: XLA picks other kernels and splits every batch sum into partial
# sums plus an all-reduce, so the results differ by rounding. [Measured on an AVX-512 EPYC,
# as a fraction of the scale; each bound is >= 10x that.] A bug that leaves any per-device
# quantity un-averaged (gradients, BN statistics, the loss) is off by O(1) of the scale.
# A forward pass (features, losses) whose every layer sums in another order: the Keras
# parity on random weights bounds that by 1e-5 of the magnitude [<= 9.2e-7].
FORWARD_RTOL = 1e-5
# Adam's moments (gradient EMAs: mu ~ g, nu ~ g^2), relative to their largest magnitude: a
# backward pass through the trainable layers, batch sums split over devices [<= 1.2e-6].
MOMENT_RTOL = 2e-5
# Parameters after Adam steps, relative to the update, learning rate x steps (not to the
# parameter). Adam divides by sqrt(nu), so an element's update carries its gradient's
# *relative* rounding error, which is large where the gradient nearly cancels over the
# batch. The head's gradients (dense features x residuals) cancel little [3.7e-6 after 2
# steps here; 2.5e-5 after 8 steps on features computed on 4 devices in the multi-host
# run]; fine-tuning's Conv_1 kernel at 1x1 resolution has near-cancelling sums [5.6e-3].
# Un-averaged gradients would move parameters by ~lr differently, and show in mu as well.
HEAD_UPDATE_RTOL = 3e-4
FINETUNE_UPDATE_RTOL = 0.1
# A plain MobileNetV2 with only its last block, last conv and classifier trainable.
TAIL_RULES = [(r"(block_16_\w+|Conv_1\w*|predictions)/\w+", optim.TRAINABLE), (r".*", optim.FROZEN)]
SCRIPT = pathlib.Path(__file__).resolve()
REPO_ROOT = SCRIPT.parent.parent


# ---------------------------------------------------------------------------- helpers


def _config(data_dir, **changes) -> TrainConfig:
    """Head phase only (cached features): the multi-process run stays a few seconds of work."""
    return TrainConfig(
        data=str(data_dir), download=False, model_options={"alpha": 0.35}, weights=None,
        image_size=SIZE,
        batch_size=8, head_epochs=3, finetune_epochs=0, fine_tune_at="block_16",
        head_learning_rate=1e-2, keep_checkpoints=5, conv_impl="lax", checkpoint_every_seconds=0,
    ).replace(**changes)  # fmt: skip


def _random_variables(model, seed: int = 0) -> dict:
    """He-scaled kernels, unit BN scale/variance, zero biases/means; no init compile."""
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, SIZE, SIZE, 3)))
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        name = path[-1].key
        if name == "kernel":
            std = np.sqrt(2.0 / np.prod(leaf.shape[:-1]))
            return rng.normal(0.0, std, leaf.shape).astype(leaf.dtype)
        if name in ("scale", "var"):
            return np.ones(leaf.shape, leaf.dtype)
        return np.zeros(leaf.shape, leaf.dtype)

    return jax.tree_util.tree_map_with_path(fill, shapes)


def _image_batches(count: int, n: int = 8) -> list[dict]:
    rng = np.random.default_rng(1)
    return [
        {
            "image": rng.uniform(-1, 1, (n, SIZE, SIZE, 3)).astype(np.float32),
            "label": rng.integers(0, 3, n).astype(np.int32),
        }
        for _ in range(count)
    ]


def _state_parts(state) -> dict:
    """The TrainState's arrays by kind: Adam's ``mu`` and ``nu`` apart from the rest."""
    parts = state.to_checkpoint()
    moments = {"mu": [], "nu": [], "count": []}
    for path, leaf in jax.tree_util.tree_leaves_with_path(parts.pop("opt_state")):
        kind = next(k.name for k in path if isinstance(k, jax.tree_util.GetAttrKey)
                    and k.name in moments)  # fmt: skip
        moments[kind].append(leaf)
    return {**parts, **moments}


def _within(difference: list[float], rtol: float, what: str) -> None:
    """A ``[max |got - want|, max |want|]`` pair within ``rtol`` of its scale."""
    assert_within(difference[0], rtol, difference[1], what)


def _differences(got, want) -> dict:
    """{kind: [max |got - want|, max |want|]} for two dicts of pytrees."""
    return {k: [max_diff(got[k], want[k]), max_abs(want[k])] for k in want}


def _train(apply_fn, variables, rules, mesh, batches, *, update_batch_stats, input_key="image",
           tx=None):  # fmt: skip
    """A few steps from fresh copies of ``variables`` (the state is donated); Adam(W) 1e-3."""
    variables = jax.tree.map(np.array, variables)
    labels = optim.path_labels(variables["params"], rules)
    tx = tx or optim.make_optimizer(1e-3, labels, weight_decay=1e-2)
    state = train.TrainState.create(variables, tx, jax.random.PRNGKey(1))
    state = sharding.replicate(state, mesh)  # else the second step compiles again
    frozen = train.frozen_tree(labels)
    steps = train.make_steps(apply_fn, frozen, mesh, update_batch_stats=update_batch_stats,
                             input_key=input_key)  # fmt: skip
    losses = []
    for batch in batches:
        state, sums = steps.train(state, sharding.to_global(batch, mesh))
        losses.append(metrics.finalize(sums)["loss"])
    return state, losses, steps


def _subprocess_env(devices: int, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["XLA_FLAGS"] = (
        env.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={devices}"
    ).strip()
    env["JAX_PLATFORMS"] = "cpu"  # simulated devices are CPU devices, even on a GPU host
    env["TF_CPP_MIN_LOG_LEVEL"] = "2"
    cache = jax.config.jax_compilation_cache_dir  # share conftest's compilation cache
    if cache:
        env["JAX_COMPILATION_CACHE_DIR"] = str(cache)
        env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0.5"
    env.update(extra)
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Processes:
    """Child processes started together, each logging to a file; ``wait`` kills them all
    on the first failure or at the timeout, then asserts every one exited cleanly."""

    def __init__(self, commands: list[tuple[list[str], dict]], logs: list[pathlib.Path]):
        self.commands, self.logs, self.procs = commands, logs, []
        try:
            for (argv, env), log_path in zip(commands, logs, strict=True):
                with open(log_path, "wb") as log:
                    proc = subprocess.Popen(argv, env=env, cwd=REPO_ROOT, stdout=log,
                                            stderr=subprocess.STDOUT)  # fmt: skip
                self.procs.append(proc)
        except BaseException:
            self.kill()
            raise

    def kill(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()

    def wait(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        try:
            while any(p.poll() is None for p in self.procs):
                if any(p.returncode not in (None, 0) for p in self.procs):
                    break
                if time.monotonic() > deadline:
                    break
                time.sleep(0.2)
        finally:
            self.kill()
        for proc, (argv, _), log_path in zip(self.procs, self.commands, self.logs, strict=True):
            assert proc.returncode == 0, (
                f"{' '.join(argv[1:])} exited with {proc.returncode} (-9: killed after "
                f"{timeout:.0f} s or after another process failed); its log "
                f"{log_path}:\n{log_path.read_text(errors='replace')[-4000:]}"
            )


# ---------------------------------------------------------------------------- workers


def _parity_worker(out_path: str) -> None:
    """One process, 4 devices: every comparison of a 4-device mesh against a 1-device mesh."""
    import tempfile

    import orbax.checkpoint as ocp


    assert jax.device_count() == 4, jax.devices()
    mesh4, mesh1 = sharding.make_mesh(), sharding.make_mesh(jax.devices()[:1])
    meshes = {"4": mesh4, "1": mesh1}
    start = time.perf_counter()
    result: dict = {}
    images = _image_batches(2)

    def compare(name, runs, initial):
        (state4, losses4, _), (state1, losses1, _) = runs["4"], runs["1"]
        result[name] = {
            **_differences(_state_parts(state4), _state_parts(state1)),
            "loss": [max_diff(losses4, losses1), max_abs(losses1)],
            "losses": losses4,
            "update": max_diff(state1.params, initial["params"]),  # the largest step taken
        }
        print(f"{name}: {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)

    # Transfer model: cached features, then the head; then fine-tuning (dropout on, BN frozen).
    transfer = build_model(_config("unused").model_config(3), conv_impl="lax")
    variables = _random_variables(transfer)
    val = {"image": images[0]["image"][:6], "label": images[0]["label"][:6]}
    val_batches = [  # 6 examples in global batches of 4: the last one padded and masked
        {"image": val["image"][i], "label": val["label"][i], "mask": np.array(m, bool)}
        for i, m in ((np.arange(4), [1, 1, 1, 1]), (np.array([4, 5, 0, 0]), [1, 1, 0, 0]))
    ]
    caches = {k: train.extract_features(transfer, variables, iter(val_batches), m)
              for k, m in meshes.items()}  # fmt: skip
    result["features"] = {
        "count": len(caches["4"]["label"]),
        "diff": max_diff(caches["4"]["features"], caches["1"]["features"]),
        "scale": max_abs(caches["1"]["features"]),
        "labels_equal": bool(np.array_equal(caches["4"]["label"], val["label"])),
    }
    rng, width = np.random.default_rng(2), caches["1"]["features"].shape[1]
    feature_batches = [
        {"features": rng.normal(size=(8, width)).astype(np.float32),
         "label": rng.integers(0, 3, 8).astype(np.int32)} for _ in range(2)
    ]  # fmt: skip
    head_apply = lambda v, x, **kw: transfer.apply(v, x, method=transfer.classify_features, **kw)
    compare("head", {k: _train(head_apply, variables, optim.transfer_rules(), m,
                               feature_batches, update_batch_stats=False, input_key="features")
                     for k, m in meshes.items()}, variables)  # fmt: skip
    backbone = get_backbone("mobilenet_v2")
    first = backbone.fine_tune_layer("block_16", alpha=0.35)
    rules = optim.transfer_rules(backbone.layers_from(first, alpha=0.35))
    finetune = {k: _train(transfer.apply, variables, rules, m, images, update_batch_stats=False)
                for k, m in meshes.items()}  # fmt: skip
    compare("finetune", finetune, variables)

    # Plain MobileNetV2 whose BatchNorm trains: all 52 BN layers normalise with (and update
    # their averages from) batch statistics; only the tail trains, to keep compiling cheap.
    # Plain SGD: Adam's g/|g| turns the f32 noise of near-zero gradients into lr-sized steps.
    net = MobileNetV2(alpha=0.35, include_top=True, num_classes=3, conv_impl="lax")
    net_vars = _random_variables(net, seed=3)
    runs = {k: _train(net.apply, net_vars, TAIL_RULES, m, images, update_batch_stats=True,
                      tx=optax.sgd(1e-2)) for k, m in meshes.items()}  # fmt: skip
    compare("batch_norm", runs, net_vars)
    result["batch_norm"]["stats_moved"] = max_diff(
        runs["1"][0].batch_stats, net_vars["batch_stats"]
    )

    # Checkpoints (Orbax, as run.py saves and resumes): the fine-tuned state saved on 4
    # devices restores on 1 and the reverse, onto the current mesh; then one more step each.
    runs = finetune
    result["checkpoint"] = {}
    checkpointer = ocp.StandardCheckpointer()
    with tempfile.TemporaryDirectory() as tmp:
        back = {}
        for saved, restored in (("4", "1"), ("1", "4")):
            path = pathlib.Path(tmp) / f"saved_on_{saved}"
            checkpointer.save(path, runs[saved][0].to_checkpoint())
            checkpointer.wait_until_finished()
            template = runs[restored][0]
            target = sharding.abstract_replicated(template.to_checkpoint(), meshes[restored])
            back[restored] = template.from_checkpoint(checkpointer.restore(path, target))
            leaves = jax.tree.leaves(back[restored].to_checkpoint())
            result["checkpoint"][f"{saved}->{restored}"] = {
                "diff": max_diff(leaves, jax.tree.leaves(runs[saved][0].to_checkpoint())),
                "on_current_mesh": all(
                    x.sharding.is_equivalent_to(sharding.replicated(meshes[restored]), x.ndim)
                    for x in leaves
                ),
            }
    extra = _image_batches(3)[2]  # states are donated: step the originals last
    after4, sums4 = runs["4"][2].train(runs["4"][0], sharding.to_global(extra, mesh4))
    after1, sums1 = runs["1"][2].train(back["1"], sharding.to_global(extra, mesh1))
    result["checkpoint"]["continue"] = {
        **_differences(_state_parts(after4), _state_parts(after1)),
        "loss": [abs(metrics.finalize(sums4)["loss"] - metrics.finalize(sums1)["loss"]),
                 abs(metrics.finalize(sums1)["loss"])],
    }  # fmt: skip

    # bf16: compute in bfloat16 on 4 devices; params, Adam state, BN statistics float32.
    net16 = MobileNetV2(alpha=0.35, include_top=True, num_classes=3, conv_impl="lax",
                        dtype=jnp.bfloat16)  # fmt: skip
    state16, losses16, _ = _train(net16.apply, net_vars, TAIL_RULES, mesh4, images[:1],
                                  update_batch_stats=True)  # fmt: skip
    logits = jax.eval_shape(net16.apply, net_vars, images[0]["image"])
    result["bf16"] = {
        "logits_dtype": str(logits.dtype),
        "state_dtypes": sorted(
            {str(x.dtype) for part in (state16.params, state16.opt_state, state16.batch_stats)
             for x in jax.tree.leaves(part) if jnp.issubdtype(x.dtype, jnp.floating)}
        ),
        "stats_moved": max_diff(state16.batch_stats, net_vars["batch_stats"]),
        "loss": losses16[0],
    }  # fmt: skip
    print(f"bf16: {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)
    pathlib.Path(out_path).write_text(json.dumps(result, indent=1))


def _multihost_worker(data_dir: str, workdir: str, out_path: str) -> None:
    """One of two processes: initialise from the environment, place a host value on the
    global mesh, then ``fit(resume=True)`` from the 1-device run's checkpoint."""
    # gloo is already jax 0.10's default for CPU collectives; explicit for clarity.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    sharding.initialize_distributed(initialization_timeout=120)
    from flaxcnn import run

    # What a fresh start adds to a resumed one: host values -> one replicated global array.
    mesh = sharding.make_mesh()
    placed = sharding.replicate(np.arange(6.0), mesh)
    total = jax.jit(jnp.sum, out_shardings=sharding.replicated(mesh))(placed)
    seen = {"replicated": [len(placed.sharding.device_set), float(total)],
            "batches": [], "reports": 0}  # fmt: skip

    def spy_batches(fn):
        def wrapped(*args, **kwargs):
            for batch in fn(*args, **kwargs):
                seen["batches"].append([kwargs["process_index"], kwargs["process_count"],
                                        len(batch["label"])])  # fmt: skip
                yield batch

        return wrapped

    def spy_reports(*args, **kwargs):
        seen["reports"] += 1
        return write_reports(*args, **kwargs)

    write_reports = report.write_reports
    data.eval_batches = spy_batches(data.eval_batches)
    data.train_batches = spy_batches(data.train_batches)
    report.write_reports = spy_reports
    run.fit(_config(data_dir), workdir, resume=True)
    pathlib.Path(out_path).write_text(json.dumps({
        "process_index": jax.process_index(), "process_count": jax.process_count(),
        "devices": jax.device_count(), "local_devices": jax.local_device_count(), **seen,
    }))  # fmt: skip


# ---------------------------------------------------------------------------- tests


def test_batch_size_must_divide_device_count(tmp_path):
    """One clear line from the CLI, before any data is read."""
    argv = [sys.executable, "-m", "flaxcnn.experiments.transfer", "--data", str(tmp_path / "none"),
            "--no-download", "--weights", "none", "--batch-size", "6",
            "--workdir", str(tmp_path / "run"), "--no-compilation-cache"]  # fmt: skip
    done = subprocess.run(argv, env=_subprocess_env(4), cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=120)  # fmt: skip
    lines = [line for line in done.stderr.splitlines() if "error" in line]
    assert done.returncode == 2, done.stderr[-3000:]
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr[-3000:]
    assert "--batch-size 6 does not divide over 4 devices" in lines[0]
    assert "4 or 8" in lines[0]


def test_initialize_distributed_reads_process_count_and_id(monkeypatch):
    calls = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: calls.append(kw))
    monkeypatch.setenv("JAX_NUM_PROCESSES", "4")
    monkeypatch.setenv("JAX_PROCESS_ID", "3")
    sharding.initialize_distributed()
    sharding.initialize_distributed(process_id=1)
    assert calls == [{"num_processes": 4, "process_id": 3}, {"num_processes": 4, "process_id": 1}]
    monkeypatch.setenv("JAX_PROCESS_ID", "x")
    with pytest.raises(ValueError, match="JAX_PROCESS_ID"):
        sharding.initialize_distributed()


def test_two_processes_match_one_and_checkpoints_move(tiny_cats_vs_dogs, tmp_path):
    """1 process x 1 device trains 3 epochs. Two processes x 2 devices resume its epoch-1
    checkpoint and train epochs 2-3 to the same parameters; their collective checkpoints
    restore in this process, and ``--resume`` from their epoch-2 one continues here on 1
    device to the same end. (Resuming spares both processes compiling the initialiser.)"""
    from flaxcnn.run import fit

    config = _config(tiny_cats_vs_dogs)
    reference = fit(config, tmp_path / "reference")
    expected = _strip_timing(reference.summary["epochs"])
    assert [e["epoch"] for e in expected] == [1, 2, 3]
    first = checkpoints.complete_steps(tmp_path / "reference" / checkpoints.LATEST_DIR)[0]
    workdir = tmp_path / "two_processes"
    shutil.copytree(tmp_path / "reference" / checkpoints.LATEST_DIR / str(first),
                    workdir / checkpoints.LATEST_DIR / str(first))  # fmt: skip

    port = _free_port()
    commands, logs, outs = [], [], []
    for index in range(2):
        outs.append(tmp_path / f"process{index}.json")
        logs.append(tmp_path / f"process{index}.log")
        env = _subprocess_env(2, JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
                              JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(index))  # fmt: skip
        argv = [sys.executable, str(SCRIPT), "multihost", str(tiny_cats_vs_dogs), str(workdir),
                str(outs[-1])]  # fmt: skip
        commands.append((argv, env))
    _Processes(commands, logs).wait(timeout=600)
    seen = [json.loads(out.read_text()) for out in outs]

    for index, process in enumerate(seen):
        assert (process["process_index"], process["process_count"]) == (index, 2)
        assert (process["devices"], process["local_devices"]) == (4, 2)
        assert process["replicated"] == [4, 15.0]
        # Each process read only its own half of every global batch of 8.
        assert process["batches"] and all(b == [index, 2, 4] for b in process["batches"])
    assert seen[0]["reports"] > 0 and seen[1]["reports"] == 0  # only process 0 writes

    history = json.loads((workdir / "metrics.json").read_text())["epochs"]
    assert history[0] == reference.summary["epochs"][0]  # epoch 1: from the checkpoint
    _assert_same_history(_strip_timing(history), expected)

    # The two processes' collective checkpoints, restored by this 1-device process.
    _, variables, metadata = checkpoints.restore(workdir / checkpoints.LATEST_DIR)
    assert metadata["epoch"] == 3
    _assert_same_variables(variables, reference.state.variables, "2 processes")
    _, best, _ = checkpoints.restore(workdir)
    assert jax.tree.structure(best) == jax.tree.structure(variables)

    # --resume on 1 device from the 2-process, 4-device checkpoint written after epoch 2.
    resumed_dir = tmp_path / "resumed"
    shutil.copytree(workdir / checkpoints.LATEST_DIR, resumed_dir / checkpoints.LATEST_DIR)
    steps = checkpoints.complete_steps(resumed_dir / checkpoints.LATEST_DIR)
    assert len(steps) == 3
    shutil.rmtree(resumed_dir / checkpoints.LATEST_DIR / str(steps[-1]))
    resumed = fit(config, resumed_dir, resume=True)
    assert resumed.summary["epochs"][:2] == history[:2]  # epochs 1-2: from the checkpoint
    _assert_same_history(_strip_timing(resumed.summary["epochs"]), expected)
    _assert_same_variables(resumed.state.variables, reference.state.variables, "resumed on 1")


# The multi-host run's update: epochs 2-3 of the head phase, 8 steps of AdamW at <= 1e-2.
MULTIHOST_UPDATE = 1e-2 * 8


def _assert_same_variables(got, want, what: str) -> None:
    """The head within HEAD_UPDATE_RTOL of its update; the frozen backbone bit-identical."""
    assert_within(max_diff(got["params"]["head"], want["params"]["head"]), HEAD_UPDATE_RTOL,
                  MULTIHOST_UPDATE, f"{what}: head params")  # fmt: skip
    for collection in ("params", "batch_stats"):  # frozen: never touched
        backbone = zip(jax.tree.leaves(got[collection]["backbone"]),
                       jax.tree.leaves(want[collection]["backbone"]), strict=True)  # fmt: skip
        assert all(np.array_equal(a, b) for a, b in backbone), f"{what}: frozen {collection}"


def _strip_timing(history: list[dict]) -> list[dict]:
    timing = ("epoch_seconds", "wall_seconds", "images_per_second")
    return [{k: v for k, v in epoch.items() if k not in timing} for epoch in history]


def _assert_same_history(got: list[dict], want: list[dict]) -> None:
    """Losses within FORWARD_RTOL of the loss [<= 8.6e-8 measured]; the rest equal:
    accuracies count correct predictions (a flip needs a logit tie within ~1e-6), learning
    rates come from the schedule."""
    assert len(got) == len(want)
    for got_epoch, want_epoch in zip(got, want, strict=True):
        assert got_epoch.keys() == want_epoch.keys()
        for key, value in want_epoch.items():
            if key.endswith("loss"):
                assert_within(abs(got_epoch[key] - value), FORWARD_RTOL, abs(value), key)
            else:
                assert got_epoch[key] == value, key


def test_bfloat16_fit_runs_on_cpu(tiny_cats_vs_dogs, tmp_path):
    """A tiny SimpleCNN run end to end in bf16 (its initialiser compiles in a second)."""
    from flaxcnn.run import fit

    config = TrainConfig(
        data=str(tiny_cats_vs_dogs), download=False, model="simple_cnn", weights=None,
        image_size=SIZE, batch_size=8, head_epochs=1, finetune_epochs=0, augment=False,
        dtype="bfloat16",
    )  # fmt: skip
    result = fit(config, tmp_path / "run")
    assert np.isfinite(result.summary["epochs"][0]["train_loss"])
    floats = [x for x in jax.tree.leaves(result.state.to_checkpoint())
              if jnp.issubdtype(x.dtype, jnp.floating)]  # fmt: skip
    assert floats and {str(x.dtype) for x in floats} == {"float32"}
    images = jnp.zeros((1, SIZE, SIZE, 3))
    assert jax.eval_shape(result.model.apply, result.state.variables, images).dtype == jnp.bfloat16


# Last: these wait for the 4-device process started at the top of the module.


@pytest.fixture(scope="module", autouse=True)
def _four_device_process(tmp_path_factory):
    """Starts the 4-device comparisons in the background when this module starts: XLA
    compiles on one core, so they overlap with the in-process tests on the other."""
    out = tmp_path_factory.mktemp("four_devices") / "result.json"
    argv = [sys.executable, str(SCRIPT), "parity", str(out)]
    processes = _Processes([(argv, _subprocess_env(4))], [out.with_suffix(".log")])
    yield processes, out
    processes.kill()


@pytest.fixture(scope="module")
def four_devices(_four_device_process) -> dict:
    processes, out = _four_device_process
    processes.wait(timeout=900)
    return json.loads(out.read_text())


def test_feature_cache_is_the_same_on_4_devices(four_devices):
    features = four_devices["features"]
    assert features["count"] == 6 and features["labels_equal"]  # padding dropped, order kept
    assert_within(features["diff"], FORWARD_RTOL, features["scale"], "features")


def _assert_same_adam_state(result: dict, update_rtol: float, steps: int) -> None:
    """Losses, Adam's moments and the parameters within their bounds; the rest bit-equal."""
    _within(result["loss"], FORWARD_RTOL, "loss")
    for moment in ("mu", "nu"):
        _within(result[moment], MOMENT_RTOL, moment)
    assert_within(result["params"][0], update_rtol, LEARNING_RATE * steps, "params")
    for kind in ("step", "count", "rng", "batch_stats"):  # frozen BN statistics too
        assert result[kind][0] == 0.0, kind


@pytest.mark.parametrize("phase", ["head", "finetune"])
def test_4_devices_match_1_device(four_devices, phase):
    """Same global batches: same losses and the same TrainState (params, Adam state, ...)."""
    result = four_devices[phase]
    assert all(np.isfinite(result["losses"]))
    rtol = {"head": HEAD_UPDATE_RTOL, "finetune": FINETUNE_UPDATE_RTOL}[phase]
    assert result["update"] > 0.5 * LEARNING_RATE * 2  # Adam's step: ~lr per step
    _assert_same_adam_state(result, rtol, steps=2)


def test_trainable_batch_norm_uses_global_batch_statistics(four_devices):
    """BatchNorm statistics over the global batch of 8, not per device (2 examples each)."""
    result = four_devices["batch_norm"]
    # 52 train-mode BN layers of a random net at 1x1 resolution normalise over 8 values each
    # and amplify rounding: the loss differs by 1.3e-5 of itself, SGD's parameter steps by
    # 5.1e-5 of the largest step (lr x gradient), the statistics (EMAs of values around 1)
    # by 2 ulps [2.3e-7]; bounds 15-40x above. Statistics over 2 examples per device would
    # be O(1) off: in the loss, in every gradient, and in the averages, which moved by 0.049.
    _within(result["loss"], 2e-4, "loss")
    assert_within(result["params"][0], 1e-3, result["update"], "params (SGD)")
    _within(result["batch_stats"], 1e-5, "batch_stats")
    assert result["stats_moved"] > 1e-2


def test_checkpoint_moves_between_device_counts(four_devices):
    result = four_devices["checkpoint"]
    for direction in ("4->1", "1->4"):
        assert result[direction]["on_current_mesh"], direction
        assert result[direction]["diff"] == 0.0, direction
    # One more step from the same restored state, on 4 devices and on 1.
    _assert_same_adam_state(result["continue"], FINETUNE_UPDATE_RTOL, steps=1)


def test_bfloat16_computes_in_bf16_and_keeps_float32_state(four_devices):
    result = four_devices["bf16"]
    assert result["logits_dtype"] == "bfloat16"
    assert result["state_dtypes"] == ["float32"]  # params, Adam moments, BN statistics
    assert result["stats_moved"] > 1e-3  # the float32 statistics were updated
    assert np.isfinite(result["loss"])


if __name__ == "__main__":
    workers = {"parity": _parity_worker, "multihost": _multihost_worker}
    workers[sys.argv[1]](*sys.argv[2:])
