"""Weight files: the registry, the download cache, resolution, strict merging, the CLI.

Everything runs the real code paths: downloads come from the shared weights through
``file://`` URLs and a local HTTP server, the CLI runs in subprocesses, and the converted
checkpoint is restored and run.
"""

from __future__ import annotations

import hashlib
import http.server
import itertools
import os
import pathlib
import subprocess
import sys
import threading
import time
from typing import ClassVar

import h5py
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flaxcnn import checkpoints, models, pretrained
from flaxcnn.models.mobilenet_v2 import ALPHAS, MobileNetV2
from flaxcnn.weights import (
    CACHE_ENV,
    WEIGHTS_ENV,
    PretrainedSpec,
    WeightsError,
    fetch,
    load_keras_h5,
    merge_variables,
    read_keras_h5,
    registry,
    resolve,
)
from flaxcnn.weights.__main__ import infer_model_config, main

MOBILENET_V2 = models.get_backbone("mobilenet_v2")
SPECS = MOBILENET_V2.weights
find_spec = lambda alpha, size, include_top: MOBILENET_V2.find_weights(size, include_top,
                                                                        alpha=alpha)  # fmt: skip
SHARED_SPEC = find_spec(1.0, 224, include_top=False)
UNREACHABLE_URLS = ["file:///nonexistent/x.h5", "http://127.0.0.1:9/x.h5", "not-a-url"]


@pytest.fixture(autouse=True)
def _isolated_environment(monkeypatch, tmp_path):
    """Never read the developer's $FLAXCNN_WEIGHTS, never write to ~/.cache."""
    monkeypatch.delenv(WEIGHTS_ENV, raising=False)
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "default-cache"))


def _sha256(path: pathlib.Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _leftovers(folder: pathlib.Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".part"))


def _one_line(message: str) -> str:
    assert message.strip() and "\n" not in message.strip(), message
    return message


# --- registry -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("alpha", "size", "resolution"),
    [
        (1.0, 224, 224),
        (1.0, 150, 160),
        (1.0, 1000, 224),
        (1.0, 32, 96),
        (0.35, 112, 128),  # halfway between 96 and 128: the larger wins
        (0.5, (150, 170), 160),  # non-square: the mean side
        (1.3, 160, 224),  # 1.3 and 1.4 exist at 224 only
        (1.4, 96, 224),
        (1, 192, 192),  # an int alpha names the same file as 1.0
    ],
)
def test_find_spec_picks_nearest_published_resolution(alpha, size, resolution):
    spec = find_spec(alpha, size, include_top=True)
    assert (spec.options, spec.input_size, spec.include_top) == (
        (("alpha", float(alpha)),), resolution, True)  # fmt: skip


def test_filenames_and_urls_follow_keras():
    base = "https://storage.googleapis.com/tensorflow/keras-applications/mobilenet_v2/"
    assert SHARED_SPEC.url == (
        base + "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224_no_top.h5"
    )
    top = find_spec(0.35, 96, include_top=True)
    assert top.filename == "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_0.35_96.h5"
    assert top.url == base + top.filename
    assert top.name == "mobilenet_v2_alpha0.35_96.imagenet"
    # 4 alphas x 5 sizes + 2 alphas x 1 size, each with and without the top; no duplicates.
    assert len(SPECS) == len({s.filename for s in SPECS}) == 44
    assert {dict(s.options)["alpha"] for s in SPECS} == set(ALPHAS)
    assert all(s.license == "Apache-2.0" and s.file_hash is None for s in SPECS)
    assert MOBILENET_V2.preprocessing == "tf"


def test_unpublished_alpha_lists_valid_ones():
    with pytest.raises(ValueError, match=r"alpha=0\.6 is not supported by mobilenet_v2") as e:
        find_spec(0.6, 224, include_top=False)
    message = _one_line(str(e.value))
    assert "allowed: 1.0, 0.35, 0.5, 0.75, 1.3, 1.4" in message
    specs = [s for s in SPECS if s.input_size == 224]  # 1.3 exists at 224 only
    with pytest.raises(ValueError, match="no ImageNet weights are published") as e:
        registry.find_spec(specs, input_size=224, include_top=False, options={"alpha": 0.6})
    message = _one_line(str(e.value))
    for alpha in ALPHAS:
        assert f"alpha={alpha} at 224" in message


def _keras_sources() -> str:
    import tf_keras

    root = pathlib.Path(tf_keras.__file__).parent / "src" / "applications"
    return "\n".join(p.read_text() for p in sorted(root.glob("*.py")))


def test_every_registered_file_is_one_keras_publishes_with_its_hash():
    """Each file name and hash appears verbatim in Keras's own application sources, and
    every family whose Keras module publishes hashes has one on every file."""
    sources = _keras_sources()
    specs = [spec for backbone in models.BACKBONES.values() for spec in backbone.weights]
    assert len({s.filename for s in specs}) == len(specs)  # one spec per file
    for spec in specs:
        # Keras builds file names from parts; its download folder and hashes are verbatim.
        folder = spec.url.rsplit("/", 1)[0]
        assert folder.startswith("https://storage.googleapis.com/"), spec.url
        assert folder in sources or folder + "/" in sources, spec.url
        assert spec.file_hash is None or spec.file_hash in sources, spec.name
    hashed = {s.model for s in specs if s.file_hash}
    for backbone in models.BACKBONES.values():
        if backbone.name in hashed:
            assert all(s.file_hash for s in backbone.weights), backbone.name


# --- cache.fetch ------------------------------------------------------------------------


class _WeightsServer(http.server.BaseHTTPRequestHandler):
    """Serves the shared file intact, cut short, slowly, as an HTML page, or not at all."""

    payload: ClassVar[bytes] = b""
    requests: ClassVar[list[str]] = []

    def do_GET(self) -> None:
        self.requests.append(self.path)
        body, declared, pause = self.payload, len(self.payload), 0.0
        if self.path == "/cut.h5":  # the connection drops halfway through
            body = self.payload[: declared // 2]
        elif self.path == "/slow.h5":  # long enough for a second process to arrive
            pause = 0.1
        elif self.path == "/page.h5":  # a captive portal or error page answering with 200
            body = b"<html><body>Please sign in</body></html>"
            declared = len(body)
        elif self.path != "/weights.h5":
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Length", str(declared))
        self.end_headers()
        for start in range(0, len(body), 1 << 20):
            self.wfile.write(body[start : start + (1 << 20)])
            time.sleep(pause)

    def log_message(self, *args) -> None:  # keep pytest's output clean
        pass


@pytest.fixture(scope="module")
def server(shared_weights):
    """Base URL of a local HTTP server for the shared weights; ``.requests`` logs the paths."""
    handler = type("Handler", (_WeightsServer,), {"payload": shared_weights.read_bytes()})
    handler.requests = []
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", handler.requests
    httpd.shutdown()
    httpd.server_close()


def test_fetch_downloads_once_then_reuses(tmp_path, shared_weights):
    cache = tmp_path / "cache"
    path = fetch(SHARED_SPEC, cache, url=shared_weights.as_uri())
    assert path == cache / SHARED_SPEC.filename
    assert _sha256(path) == _sha256(shared_weights)
    mtime = path.stat().st_mtime_ns
    # A valid cached file is used as-is: an unreachable URL proves nothing is downloaded.
    again = fetch(SHARED_SPEC, cache, url="file:///nonexistent/x.h5")
    assert again == path and path.stat().st_mtime_ns == mtime
    assert fetch(SHARED_SPEC, cache, download=False) == path
    assert _leftovers(cache) == []


def test_fetch_over_http(tmp_path, shared_weights, server):
    base, _ = server
    path = fetch(SHARED_SPEC, tmp_path, url=f"{base}/weights.h5")
    assert _sha256(path) == _sha256(shared_weights)
    assert path.stat().st_mode & 0o777 == 0o644  # a shared cache: readable by everyone


@pytest.mark.parametrize("algorithm", ["md5", "sha256"])
def test_published_hash_is_checked_on_download_and_in_the_cache(tmp_path, shared_weights,
                                                                server, algorithm):  # fmt: skip
    """A file whose digest differs from the published one never lands in the cache, and a
    cached file that stops matching is replaced (the check Keras's ``get_file`` does)."""
    base, _ = server
    digest = hashlib.new(algorithm, shared_weights.read_bytes()).hexdigest()
    spec = PretrainedSpec("mobilenet_v2", f"{base}/weights.h5", 224, False, file_hash=digest)
    assert spec.hash_algorithm == algorithm
    path = fetch(spec, tmp_path)
    assert _sha256(path) == _sha256(shared_weights)

    wrong = digest[::-1]
    bad = PretrainedSpec("mobilenet_v2", f"{base}/weights.h5", 224, False, file_hash=wrong)
    with pytest.raises(WeightsError) as error:
        fetch(bad, tmp_path / "other")
    message = _one_line(str(error.value))
    assert f"{algorithm} {digest} != the published {wrong}" in message
    assert not (tmp_path / "other" / bad.filename).exists() and _leftovers(tmp_path / "other") == []
    # The cached, valid-HDF5 file no longer matches what is published: fetched again.
    path.write_bytes(path.read_bytes()[:-1] + b"\0")
    assert _sha256(fetch(spec, tmp_path)) == _sha256(shared_weights)
    with pytest.raises(ValueError, match=r"32 \(MD5\) or 64 \(SHA-256\) digits"):
        PretrainedSpec("mobilenet_v2", f"{base}/weights.h5", 224, False, file_hash="abc")


@pytest.mark.parametrize("corruption", ["truncated", "last_byte_missing", "garbage", "empty"])
def test_corrupt_cached_file_is_replaced(tmp_path, shared_weights, corruption):
    data = shared_weights.read_bytes()
    corrupt = {
        "truncated": data[: len(data) // 3],
        "last_byte_missing": data[:-1],
        "garbage": b"<html>not found</html>",
        "empty": b"",
    }[corruption]
    target = tmp_path / SHARED_SPEC.filename
    target.write_bytes(corrupt)
    path = fetch(SHARED_SPEC, tmp_path, url=shared_weights.as_uri())
    assert path == target and _sha256(path) == _sha256(shared_weights)


def test_corrupt_cached_file_offline_is_removed_and_reported(tmp_path, shared_weights):
    target = tmp_path / SHARED_SPEC.filename
    target.write_bytes(shared_weights.read_bytes()[:1000])
    with pytest.raises(WeightsError, match="were corrupt and have been removed") as e:
        fetch(SHARED_SPEC, tmp_path, download=False)
    _one_line(str(e.value))
    assert not target.exists()


def test_offline_without_cache_names_url_cache_path_and_alternatives(tmp_path):
    with pytest.raises(WeightsError) as e:
        fetch(SHARED_SPEC, tmp_path / "cache", download=False)
    message = _one_line(str(e.value))
    assert "not cached and downloads are off (download=False, --no-download)" in message
    assert SHARED_SPEC.url in message
    assert str(tmp_path / "cache" / SHARED_SPEC.filename) in message
    assert "--weights" in message and WEIGHTS_ENV in message


@pytest.mark.parametrize("url", UNREACHABLE_URLS)
def test_unreachable_url_is_one_line_and_leaves_nothing(tmp_path, url):
    with pytest.raises(WeightsError, match=r"could not download") as e:
        fetch(SHARED_SPEC, tmp_path, url=url, timeout=5)
    message = _one_line(str(e.value))
    assert url in message and "--weights" in message
    assert e.value.__suppress_context__  # `from None`: no urllib traceback chained to it
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")) == []


@pytest.mark.parametrize(
    ("path", "reason"),
    [
        ("/cut.h5", r"unusable \(incomplete: [\d,]+ of [\d,]+ bytes\)"),
        ("/page.h5", r"unusable \(.*not a readable Keras HDF5 file"),
        ("/missing.h5", r"could not download .* \(Not Found\)"),
    ],
)
def test_bad_download_never_lands_under_the_final_name(tmp_path, server, path, reason):
    base, _ = server
    with pytest.raises(WeightsError, match=reason) as e:
        fetch(SHARED_SPEC, tmp_path, url=base + path)
    _one_line(str(e.value))
    assert not (tmp_path / SHARED_SPEC.filename).exists()
    assert _leftovers(tmp_path) == []


def test_concurrent_fetches_share_one_download(tmp_path, shared_weights, server):
    """Two processes, one cache: the lock makes the second wait and reuse the first's file."""
    base, requests = server
    before = requests.count("/slow.h5")
    script = (
        "import sys; from flaxcnn.models import get_backbone; from flaxcnn.weights import fetch; "
        "spec = get_backbone('mobilenet_v2').find_weights(224, False); "
        "print(fetch(spec, sys.argv[1], url=sys.argv[2]))"
    )
    command = [sys.executable, "-c", script, str(tmp_path), f"{base}/slow.h5"]
    processes = [subprocess.Popen(command, stdout=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [p.communicate(timeout=120)[0].strip() for p in processes]
    assert [p.returncode for p in processes] == [0, 0]
    assert outputs == [str(tmp_path / SHARED_SPEC.filename)] * 2
    assert _sha256(tmp_path / SHARED_SPEC.filename) == _sha256(shared_weights)
    assert _leftovers(tmp_path) == []
    assert requests.count("/slow.h5") - before == 1


# --- resolve ------------------------------------------------------------------------------


def test_env_weights_as_file(tmp_path, monkeypatch, shared_weights):
    monkeypatch.setenv(WEIGHTS_ENV, str(shared_weights))
    # The file is used for any request, whatever its Keras name; the cache is never touched.
    spec = find_spec(1.0, 96, include_top=False)
    assert resolve("imagenet", spec, cache=tmp_path, download=False) == shared_weights.resolve()
    assert list(tmp_path.iterdir()) == []


def test_env_weights_file_of_another_registered_file_is_not_used_for_this_one(
    tmp_path, monkeypatch, shared_weights
):
    """A Keras-named file in $FLAXCNN_WEIGHTS serves its own model, options and top (at any
    resolution), not another model's request, which falls through to the cache."""
    monkeypatch.setenv(WEIGHTS_ENV, str(shared_weights))
    registered = pretrained.REGISTERED_FILES
    at_160 = find_spec(1.0, 160, include_top=False)  # same model and options, another size
    assert resolve("imagenet", at_160, registered=registered) == shared_weights.resolve()
    for other in (find_spec(0.5, 224, include_top=False), find_spec(1.0, 224, True)):
        with pytest.raises(WeightsError, match="not cached"):
            resolve("imagenet", other, cache=tmp_path, download=False, registered=registered)


def test_env_weights_as_folder(tmp_path, monkeypatch, shared_weights):
    monkeypatch.setenv(WEIGHTS_ENV, str(shared_weights.parent))
    assert resolve("imagenet", SHARED_SPEC, cache=tmp_path) == shared_weights.resolve()
    other = find_spec(1.0, 160, include_top=False)
    with pytest.raises(WeightsError, match=f"{WEIGHTS_ENV}=.* but .*{other.filename} does not"):
        resolve("imagenet", other, cache=tmp_path)


def test_explicit_path(tmp_path, shared_weights):
    assert resolve(shared_weights, SHARED_SPEC) == shared_weights.resolve()
    with pytest.raises(WeightsError, match=r"weights file .*missing\.h5 does not exist"):
        resolve(tmp_path / "missing.h5", SHARED_SPEC)


def test_imagenet_without_env_falls_back_to_the_cache(tmp_path):
    with pytest.raises(WeightsError, match="not cached"):
        resolve("imagenet", SHARED_SPEC, cache=tmp_path, download=False)


def test_pretrained_imagenet_offline_with_env(tmp_path, monkeypatch, shared_weights):
    monkeypatch.setenv(WEIGHTS_ENV, str(shared_weights))
    model, variables = pretrained.mobilenet_v2(
        1.0, 224, include_top=False, weights="imagenet", cache_dir=tmp_path, download=False
    )
    _, expected = pretrained.mobilenet_v2(1.0, 224, include_top=False, weights=shared_weights)
    assert model == MobileNetV2(alpha=1.0, include_top=False)
    jax.tree.map(np.testing.assert_array_equal, variables, expected)
    raw = read_keras_h5(shared_weights)
    np.testing.assert_array_equal(variables["params"]["Conv1"]["kernel"], raw["Conv1"]["kernel"])
    assert list(tmp_path.iterdir()) == []


def test_library_messages_name_the_argument_and_the_command_line_flag(tmp_path):
    """``WeightsError`` reaches library callers and the CLI alike: it names both spellings."""
    with pytest.raises(WeightsError) as offline:
        fetch(SHARED_SPEC, tmp_path / "cache", download=False)
    with pytest.raises(WeightsError) as missing:
        resolve(tmp_path / "missing.h5", SHARED_SPEC)
    blocker = tmp_path / "file"
    blocker.write_text("a file: no cache folder below it")
    with pytest.raises(WeightsError) as no_cache:
        fetch(SHARED_SPEC, blocker / "cache", download=False)
    unpublished_options = next((
        (backbone.name, options) for backbone in models.BACKBONES.values()
        for options in (dict(zip(backbone.options, values, strict=True))
                        for values in itertools.product(*backbone.options.values()))
        if not any(spec.options == tuple(sorted(options.items())) for spec in backbone.weights)
    ), None)  # fmt: skip
    expected = [
        (offline, ["download=False, --no-download", "weights=PATH (--weights PATH on the command"]),
        (missing, ["pass weights= an existing Keras .h5 file", "--weights PATH, imagenet or none"]),
        (no_cache, ["pass cache_dir=DIR or set FLAXCNN_CACHE=DIR"]),
    ]
    if unpublished_options is not None:  # a registered option setting without ImageNet weights
        with pytest.raises(WeightsError) as unpublished:
            pretrained.create(unpublished_options[0], **unpublished_options[1],
                              cache_dir=tmp_path, download=False)  # fmt: skip
        expected.append((unpublished, ["pass weights=None or a Keras .h5 path (--weights none"]))
    for error, phrases in expected:
        message = _one_line(str(error.value))
        assert all(phrase in message for phrase in phrases), message


@pytest.mark.parametrize("passed_as", ["weights=PATH", WEIGHTS_ENV])
def test_corrupt_file_the_user_passed_is_reported_and_kept(tmp_path, monkeypatch, shared_weights,
                                                           passed_as):  # fmt: skip
    """Only a file flaxcnn downloaded into its cache is ever removed or downloaded again."""
    corrupt = tmp_path / SHARED_SPEC.filename
    corrupt.write_bytes(shared_weights.read_bytes()[:100_000])
    weights = corrupt
    if passed_as == WEIGHTS_ENV:
        monkeypatch.setenv(WEIGHTS_ENV, str(corrupt))
        weights = "imagenet"
    with pytest.raises(WeightsError) as error:
        pretrained.create("mobilenet_v2", weights=weights, cache_dir=tmp_path / "cache")
    message = _one_line(str(error.value))
    assert message.startswith(f"{corrupt} is not a readable Keras HDF5 file (")
    assert message.endswith("; it may be truncated or corrupt: pass a complete copy")
    assert "delete" not in message and "download" not in message and "removed" not in message
    assert corrupt.read_bytes() == shared_weights.read_bytes()[:100_000]
    assert not (tmp_path / "cache").exists()


# --- keras_h5 and merge_variables -------------------------------------------------------------


def test_keras_layout_transforms(shared_weights):
    raw = read_keras_h5(shared_weights)
    variables = load_keras_h5(shared_weights)
    depthwise = raw["block_1_depthwise"]["depthwise_kernel"]
    assert depthwise.shape == (3, 3, 96, 1)
    np.testing.assert_array_equal(
        variables["params"]["block_1_depthwise"]["kernel"], depthwise.transpose(0, 1, 3, 2)
    )
    bn = raw["bn_Conv1"]
    assert set(variables["params"]["bn_Conv1"]) == {"scale", "bias"}
    np.testing.assert_array_equal(variables["params"]["bn_Conv1"]["scale"], bn["gamma"])
    np.testing.assert_array_equal(
        variables["batch_stats"]["bn_Conv1"]["var"], bn["moving_variance"]
    )


def test_hdf5_without_keras_layout_is_rejected(tmp_path):
    path = tmp_path / "plain.h5"
    with h5py.File(path, "w") as f:
        f["x"] = np.zeros(3)
    with pytest.raises(WeightsError, match="not a Keras weights file"):
        read_keras_h5(path)


def _tree(**shapes):
    """``_tree(**{'params/a/kernel': (2, 3)})`` -> nested dict of float64 arrays."""
    tree: dict = {}
    for index, (path, shape) in enumerate(sorted(shapes.items())):
        *parents, leaf = path.split("/")
        node = tree
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = np.full(shape, float(index))
    return tree


INIT_SHAPES = {
    "params/a/kernel": (2, 3),
    "params/b/bias": (3,),
    "params/head/kernel": (3, 4),
    "batch_stats/a/mean": (3,),
}


def _init():
    return jax.tree.map(lambda x: np.zeros(x.shape, np.float32), _tree(**INIT_SHAPES))


def test_merge_exact_fit_takes_file_values_in_model_dtypes():
    loaded = _tree(**INIT_SHAPES)
    merged = merge_variables(_init(), loaded)
    assert jax.tree.structure(merged) == jax.tree.structure(_init())
    for got, want in zip(jax.tree.leaves(merged), jax.tree.leaves(loaded), strict=True):
        assert got.dtype == np.float32
        np.testing.assert_array_equal(got, want)


def _merge_error(loaded, **kwargs) -> str:
    with pytest.raises(WeightsError) as e:
        merge_variables(_init(), loaded, source="my.h5", **kwargs)
    message = _one_line(str(e.value))
    assert message.startswith("my.h5 does not fit the model: ")
    return message


def test_merge_reports_unexpected():
    message = _merge_error(_tree(**INIT_SHAPES, **{"params/extra/kernel": (1,)}))
    assert "the file has 'params/extra/kernel', which the model does not" in message
    assert "(0 wrong-shape, 0 missing, 1 unexpected)" in message


def test_merge_reports_missing():
    loaded = _tree(**{k: v for k, v in INIT_SHAPES.items() if not k.endswith(("bias", "mean"))})
    message = _merge_error(loaded)
    assert "layer 'params/b/bias' is missing from the file" in message  # params come first
    assert "(0 wrong-shape, 2 missing, 0 unexpected)" in message


def test_merge_reports_wrong_shape():
    message = _merge_error(_tree(**{**INIT_SHAPES, "params/a/kernel": (3, 2)}))
    assert "'params/a/kernel' has shape (3, 2) in the file but (2, 3) in the model" in message
    assert "(1 wrong-shape, 0 missing, 0 unexpected)" in message


def test_merge_reports_every_kind_at_once():
    shapes = {**INIT_SHAPES, "params/a/kernel": (9,), "params/new/bias": (1,)}
    del shapes["batch_stats/a/mean"]
    message = _merge_error(_tree(**shapes))
    assert "(1 wrong-shape, 1 missing, 1 unexpected)" in message


def test_dont_load_lets_a_path_differ_and_keeps_its_init_value():
    head = {"params/head/kernel": (3, 1000)}  # another class count
    init = _init()
    init["params"]["head"]["kernel"] = np.full((3, 4), 7.0, np.float32)
    merged = merge_variables(init, _tree(**{**INIT_SHAPES, **head}), dont_load=[r"params/head/.*"])
    np.testing.assert_array_equal(merged["params"]["head"]["kernel"], np.full((3, 4), 7.0))
    np.testing.assert_array_equal(merged["params"]["b"]["bias"], np.full(3, 2.0))  # loaded
    # Absent from the file is fine too; the rule is a full match, so a prefix covers nothing.
    without_head = {k: v for k, v in INIT_SHAPES.items() if "head" not in k}
    merge_variables(_init(), _tree(**without_head), dont_load=[r"params/head/.*"])
    with pytest.raises(WeightsError, match="1 missing"):
        merge_variables(_init(), _tree(**without_head), dont_load=["params/head"])


# --- python -m flaxcnn.weights ----------------------------------------------------------------


def _cli(*args: str | os.PathLike) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "flaxcnn.weights", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=300,
    )


def _main_error(capsys, *args: str | os.PathLike) -> str:
    """Runs the CLI in-process, expecting exit status 2; returns its one-line stderr."""
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in args])
    assert e.value.code == 2
    captured = capsys.readouterr()
    return _one_line(captured.err)


@pytest.fixture(scope="module")
def converted(tmp_path_factory, shared_weights) -> pathlib.Path:
    out = tmp_path_factory.mktemp("convert") / "mobilenet_v2_1.0_224_no_top"
    result = _cli("convert", shared_weights, out)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"wrote {out}: mobilenet_v2 alpha=1.0 include_top=False")
    return out


def test_convert_writes_self_describing_metadata(converted, shared_weights):
    assert checkpoints.read_metadata(converted) == {
        "format": "flaxcnn/1",
        "model": {
            "arch": "mobilenet_v2",
            "alpha": 1.0,
            "include_top": False,
            "num_classes": 1000,
            "pooling": "avg",
        },
        "image_size": [224, 224],  # from the Keras file name
        "preprocessing": "tf",
        "class_names": None,
        "source": str(shared_weights.resolve()),
        "source_sha256": _sha256(shared_weights),
    }
    assert not [p for p in converted.parent.iterdir() if p.name.startswith(".")]  # no staging


def test_converted_checkpoint_restores_to_the_same_model(converted, shared_weights):
    model, variables, metadata = checkpoints.restore(converted)
    assert metadata["preprocessing"] == "tf"
    expected_model, expected = pretrained.mobilenet_v2(
        1.0, 224, include_top=False, pooling="avg", weights=shared_weights
    )
    assert model == expected_model
    jax.tree.map(np.testing.assert_array_equal, variables, expected)
    images = np.random.default_rng(0).uniform(-1, 1, (2, 64, 64, 3)).astype(np.float32)
    apply = jax.jit(model.apply)  # the modules are equal: one compilation serves both
    got, want = apply(variables, images), apply(expected, images)
    assert got.shape == (2, 1280)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_convert_bad_input_file_exits_2_with_one_line(tmp_path):
    bad = tmp_path / "broken.h5"
    bad.write_bytes(b"definitely not HDF5")
    result = _cli("convert", bad, tmp_path / "out")
    assert result.returncode == 2
    assert result.stdout == "" and "Traceback" not in result.stderr
    assert _one_line(result.stderr).startswith(f"error: {bad} is not a readable Keras HDF5 file")
    assert not (tmp_path / "out").exists()


def test_convert_refuses_non_empty_out_unless_overwrite(tmp_path, shared_weights, capsys):
    out = tmp_path / "ckpt"
    assert main(["convert", str(shared_weights), str(out), "--input-size", "96"]) == 0
    capsys.readouterr()
    message = _main_error(capsys, "convert", shared_weights, out)
    assert "exists and is not empty; pass --overwrite" in message
    assert main(["convert", str(shared_weights), str(out), "--overwrite", "--pooling", "max"]) == 0
    metadata = checkpoints.read_metadata(out)
    assert metadata["image_size"] == [224, 224] and metadata["model"]["pooling"] == "max"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # nothing staged or retired


def test_convert_overwrite_never_deletes_a_non_checkpoint(tmp_path, shared_weights, capsys):
    precious = tmp_path / "notes"
    precious.mkdir()
    (precious / "thesis.tex").write_text("years of work")
    message = _main_error(capsys, "convert", shared_weights, precious, "--overwrite")
    assert "is not a flaxcnn checkpoint, so --overwrite will not delete it" in message
    assert (precious / "thesis.tex").read_text() == "years of work"


def test_convert_wrong_alpha_names_the_mismatch(tmp_path, shared_weights, capsys):
    message = _main_error(capsys, "convert", shared_weights, tmp_path / "o", "--alpha", "0.5")
    assert message.startswith("error: no MobileNetV2 with include_top=False fits ")
    assert "with MobileNetV2 (alpha=0.5): " in message
    assert "'params/Conv1/kernel' has shape (3, 3, 3, 32) in the file but (3, 3, 3, 16)" in message


def test_convert_names_the_model_a_file_holds_when_another_is_asked_for(
    tmp_path, shared_weights, capsys
):
    message = _main_error(capsys, "convert", shared_weights, tmp_path / "o", "--model", "nope")
    assert "unknown model 'nope'; registered: mobilenet_v2" in message
    with pytest.raises(WeightsError) as error:
        pretrained.create("mobilenet_v2", alpha=0.5, weights=shared_weights)
    assert _one_line(str(error.value)).endswith(
        "holds MobileNetV2 (alpha=1.0) weights, not MobileNetV2 (alpha=0.5); pass the matching "
        "options (alpha=1.0; --alpha 1.0 on the command line) or another file")  # fmt: skip


def _with_top(source: pathlib.Path, path: pathlib.Path, num_classes: int) -> pathlib.Path:
    """A copy of ``source`` with a ``predictions`` layer appended, as Keras would save it."""
    path.write_bytes(source.read_bytes())
    rng = np.random.default_rng(0)
    with h5py.File(path, "r+") as f:
        group = f.create_group("predictions")
        group["predictions/kernel:0"] = rng.normal(size=(1280, num_classes)).astype(np.float32)
        group["predictions/bias:0"] = rng.normal(size=(num_classes,)).astype(np.float32)
        group.attrs["weight_names"] = [b"predictions/kernel:0", b"predictions/bias:0"]
        # Keras stores names as fixed-length byte strings; h5py needs the dtype spelled out.
        f.attrs["layer_names"] = np.array([*f.attrs["layer_names"], b"predictions"], dtype="S")
    return path


def test_convert_infers_the_top_and_its_class_count(tmp_path, shared_weights, capsys):
    with_top = _with_top(shared_weights, tmp_path / "custom.h5", num_classes=7)
    assert main(["convert", str(with_top), str(tmp_path / "top")]) == 0
    metadata = checkpoints.read_metadata(tmp_path / "top")
    assert metadata["model"] | {"alpha": None} == {
        "arch": "mobilenet_v2",
        "alpha": None,
        "include_top": True,
        "num_classes": 7,
        "pooling": None,
    }
    assert metadata["image_size"] == [224, 224]  # not a Keras file name: the default
    _, variables, _ = checkpoints.restore(tmp_path / "top")
    with h5py.File(with_top) as f:
        kernel = f["predictions/predictions/kernel:0"][()]
    np.testing.assert_array_equal(variables["params"]["predictions"]["kernel"], kernel)

    # --no-include-top drops the classifier on purpose; the rest must still fit exactly.
    assert main(["convert", str(with_top), str(tmp_path / "backbone"), "--no-top"]) == 0
    metadata = checkpoints.read_metadata(tmp_path / "backbone")
    assert metadata["model"]["include_top"] is False
    assert metadata["model"]["pooling"] == "avg"


def test_alpha_inference_resolves_an_ambiguous_conv1():
    """Alpha 0.35 and 0.5 both give Conv1 16 channels; the later blocks rule out 0.5."""
    for alpha in (0.35,):  # one case: each candidate costs a model trace
        model = MobileNetV2(alpha=alpha, include_top=False)
        abstract = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)))
        loaded = jax.tree.map(lambda x: np.zeros(x.shape, np.float32), abstract)
        config, variables = infer_model_config(loaded)
        assert config["alpha"] == alpha and config["include_top"] is False
        assert jax.tree.structure(variables) == jax.tree.structure(abstract)


def test_alpha_inference_failure_is_one_line():
    loaded = {"params": {"Conv1": {"kernel": np.zeros((3, 3, 3, 32), np.float32)}}}
    with pytest.raises(WeightsError) as e:
        infer_model_config(loaded, source="odd.h5")
    assert _one_line(str(e.value)).startswith("odd.h5 holds no registered model's Keras layers")
    with pytest.raises(WeightsError) as e:
        infer_model_config(loaded, model="MobileNetV2", source="odd.h5")
    message = _one_line(str(e.value))
    assert message.startswith("no MobileNetV2 with include_top=False fits odd.h5; tried ")
    assert "with MobileNetV2 (alpha=1.0): odd.h5 does not fit the model: " in message
    assert "missing from the file" in message


def test_list_shows_every_file_and_what_is_cached(tmp_path, shared_weights, capsys):
    assert (
        main(["fetch", "--no-top", "--cache", str(tmp_path), "--url", shared_weights.as_uri()]) == 0
    )
    assert capsys.readouterr().out.strip() == str(tmp_path / SHARED_SPEC.filename)
    assert main(["list", "--cache", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = [line.split() for line in lines if line.startswith("mobilenet_v2 ")]
    assert len(rows) == len(SPECS)
    cached = [row for row in rows if row[4] != "no"]
    assert cached == [["mobilenet_v2", "alpha=1.0", "224", "no", "cached", "none", "Apache-2.0",
                       SHARED_SPEC.url]]  # fmt: skip
    # $FLAXCNN_WEIGHTS counts as available, for the files it provides.
    os.environ[WEIGHTS_ENV] = str(shared_weights)
    try:
        assert main(["list", "--model", "MobileNetV2", "--cache", str(tmp_path / "empty")]) == 0
    finally:
        del os.environ[WEIGHTS_ENV]
    rows = [line.split() for line in capsys.readouterr().out.splitlines()
            if line.startswith("mobilenet_v2 ")]  # fmt: skip
    available = {(row[1], row[2], row[3]) for row in rows if row[4] == f"${WEIGHTS_ENV}"}
    assert available == {("alpha=1.0", str(size), "no") for size in (96, 128, 160, 192, 224)}


def test_fetch_cli_errors_are_one_line(tmp_path, capsys):
    message = _main_error(capsys, "fetch", "--alpha", "0.6", "--cache", tmp_path)
    assert "alpha=0.6 is not supported by mobilenet_v2; allowed: 1.0, 0.35" in message
    message = _main_error(capsys, "fetch", "--cache", tmp_path, "--url", "file:///nonexistent/x.h5")
    assert message.startswith("error: could not download file:///nonexistent/x.h5")
    message = _main_error(capsys, "fetch", "--size", "big")
    assert "invalid int value: 'big'" in message and "--help" in message
    assert "convert" in _main_error(capsys)  # no command: says which exist
