"""Shared fixtures: where the real weights and photos live (``../shared`` beside the repo).

The location can be overridden with ``FLAXCNN_SHARED_DIR``. Tests that need the shared
files skip with a reason when they are absent, except under CI (``CI=true``), where a
missing ``../shared`` is a set-up error and fails loudly.
"""

from __future__ import annotations

import os
import pathlib

import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
SHARED_DIR = pathlib.Path(os.environ.get("FLAXCNN_SHARED_DIR", REPO_ROOT.parent / "shared"))
SHARED_WEIGHTS = (
    SHARED_DIR / "weights" / "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224_no_top.h5"
)
SHARED_CATS_VS_DOGS = SHARED_DIR / "data" / "cats_vs_dogs"


def _require(path: pathlib.Path) -> pathlib.Path:
    if not path.exists():
        if os.environ.get("CI"):
            pytest.fail(f"{path} is missing: CI expects ../shared beside the checkout")
        pytest.skip(f"{path} not found (set FLAXCNN_SHARED_DIR)")
    return path


# The modules that take longest (measured; minutes of CPU each) go first, so that the two
# pytest-xdist workers of the README's command (``-n 2 --dist loadfile``: a module and its
# fixtures stay on one worker; ``--no-loadscope-reorder``: in this order, not by test count)
# finish together instead of one waiting on the last of them.
SLOWEST_FIRST = ("test_reliability.py", "test_families_e2e.py", "test_efficientnet_v2.py",
                 "test_export.py", "test_resnet.py", "test_convnext.py", "test_compare_keras.py",
                 "test_mobilenet_v3.py", "test_mobilenet_v2.py", "test_distributed.py")  # fmt: skip


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(SLOWEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: file order kept


@pytest.fixture(scope="session")
def shared_weights() -> pathlib.Path:
    """The real MobileNetV2 1.0/224 no-top ImageNet weights in the legacy Keras HDF5 layout."""
    return _require(SHARED_WEIGHTS)


@pytest.fixture(scope="session")
def cats_vs_dogs_dir() -> pathlib.Path:
    """The real cats-vs-dogs photos: ``train/{cat,dog}`` and ``validation/{cat,dog}``."""
    return _require(SHARED_CATS_VS_DOGS)


@pytest.fixture(scope="session", autouse=True)
def _compilation_cache(tmp_path_factory):
    """Tests build the same MobileNetV2 steps repeatedly: share compiled executables."""
    import jax

    jax.config.update("jax_compilation_cache_dir", str(tmp_path_factory.mktemp("jax-cache")))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


@pytest.fixture(scope="session")
def tiny_cats_vs_dogs(cats_vs_dogs_dir, tmp_path_factory) -> pathlib.Path:
    """A few dozen real photos in the class-per-folder layout (copied to a temp dir)."""
    import shutil

    root = tmp_path_factory.mktemp("tiny_cats_vs_dogs")
    for split, count in (("train", 16), ("validation", 8)):
        for label in ("cat", "dog"):
            (root / split / label).mkdir(parents=True)
            for f in sorted((cats_vs_dogs_dir / split / label).glob("*.jpg"))[:count]:
                shutil.copy(f, root / split / label / f.name)
    return root
