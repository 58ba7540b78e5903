"""Where weight files come from: a local path, ``$FLAXCNN_WEIGHTS``, the cache, or the URL.

Downloading is an explicit call, never a side effect of building a model. Files are written
to a temporary name in the cache folder and renamed into place only once complete and
readable, under an advisory lock, so an interrupted or concurrent download never leaves a
half file under the final name.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import http.client
import os
import pathlib
import shutil
import tempfile
import urllib.error
import urllib.request

from flaxcnn.weights.errors import WeightsError
from flaxcnn.weights.keras_h5 import read_keras_h5
from flaxcnn.weights.registry import PretrainedSpec

CACHE_ENV = "FLAXCNN_CACHE"
WEIGHTS_ENV = "FLAXCNN_WEIGHTS"


def cache_dir(explicit: str | os.PathLike | None = None) -> pathlib.Path:
    """``explicit``, else ``$FLAXCNN_CACHE``, else ``~/.cache/flaxcnn``."""
    if explicit is not None:
        return pathlib.Path(explicit).expanduser()
    return pathlib.Path(os.environ.get(CACHE_ENV, "~/.cache/flaxcnn")).expanduser()


def sha256_of(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _problem_with(path: pathlib.Path, spec: PretrainedSpec) -> str | None:
    """Why a cached file cannot be used (``None`` if it can)."""
    if spec.sha256 is not None:
        actual = sha256_of(path)
        return None if actual == spec.sha256 else f"sha256 {actual} != expected {spec.sha256}"
    try:
        read_keras_h5(path)
    except WeightsError as e:
        return str(e)
    return None


@contextlib.contextmanager
def _locked(lock_path: pathlib.Path):
    with open(lock_path, "a") as lock_file:
        fcntl.flock(lock_file, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock_file, fcntl.LOCK_UN)


def _download(url: str, target: pathlib.Path, spec: PretrainedSpec, timeout: float) -> str | None:
    """Downloads ``url`` to ``target`` via a ``.part`` file; returns why it is unusable, if so.

    The file is renamed into place only once it is complete and verified, so no reader (and
    no crash) ever sees a half file under the final name.
    """
    fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as response:
            shutil.copyfileobj(response, out, length=1 << 20)
            out.flush()
            os.fsync(out.fileno())
            size = out.tell()
        # urllib returns a short body without any error when a server closes the connection
        # early, so the length is checked here rather than left to the HDF5 reader.
        length = response.headers.get("Content-Length", "")
        if length.isdigit() and int(length) != size:
            return f"incomplete: {size:,} of {int(length):,} bytes"
        problem = _problem_with(pathlib.Path(tmp_name), spec)
        if problem is None:
            os.replace(tmp_name, target)
        return problem
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)


def fetch(
    spec: PretrainedSpec,
    cache: str | os.PathLike | None = None,
    *,
    download: bool = True,
    url: str | None = None,
    timeout: float = 60.0,
) -> pathlib.Path:
    """Returns a verified local copy of ``spec``'s file, downloading it if needed.

    A cached file that fails verification (truncated, corrupt, wrong hash) is removed and
    fetched again.

    Args:
      spec: the file to fetch.
      cache: cache folder (see :func:`cache_dir`).
      download: ``False`` never touches the network (offline machines).
      url: override the download address (a mirror).
      timeout: socket timeout in seconds.

    Returns:
      Path of the cached file.

    Raises:
      WeightsError: one line naming the URL, the cache path and the offline alternatives.
    """
    folder = cache_dir(cache)
    target = folder / spec.filename
    url = url or spec.url
    offline_hint = (
        f"download {url} yourself and put it at {target}, or pass --weights PATH "
        f"(or set {WEIGHTS_ENV}=PATH)"
    )
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise WeightsError(
            f"cannot create the weights cache {folder} ({e.strerror}); "
            f"set {CACHE_ENV} to a writable folder"
        ) from None
    with _locked(folder / f".{spec.filename}.lock"):
        if target.exists():
            problem = _problem_with(target, spec)
            if problem is None:
                return target
            target.unlink()
            if not download:
                raise WeightsError(
                    f"cached weights {target} were corrupt and have been removed ({problem}); "
                    + offline_hint
                )
        elif not download:
            raise WeightsError(f"weights {spec.filename} are not cached (offline); " + offline_hint)
        try:
            problem = _download(url, target, spec, timeout)
        # HTTPException: a connection cut mid-body (IncompleteRead) is not an OSError;
        # ValueError: a malformed --url ("unknown url type").
        except (urllib.error.URLError, OSError, http.client.HTTPException, ValueError) as e:
            reason = getattr(e, "reason", None) or getattr(e, "strerror", None)
            reason = reason or str(e) or type(e).__name__
            raise WeightsError(f"could not download {url} ({reason}); " + offline_hint) from None
        if problem is not None:
            raise WeightsError(f"downloaded {url} but it is unusable ({problem}); " + offline_hint)
        return target


def resolve(
    weights: str | os.PathLike,
    spec: PretrainedSpec,
    *,
    cache: str | os.PathLike | None = None,
    download: bool = True,
) -> pathlib.Path:
    """Turns a ``weights`` argument into a local file.

    Args:
      weights: ``'imagenet'`` (``$FLAXCNN_WEIGHTS`` if set - a file, or a folder holding
        Keras-named files - else the cache, else the official URL) or a path to a file.
      spec: the published file that ``'imagenet'`` means for this model.
      cache: cache folder override.
      download: allow network access.

    Returns:
      Path of an existing file (its contents are checked when loaded).
    """
    if os.fspath(weights) != "imagenet":
        path = pathlib.Path(weights).expanduser()
        if not path.is_file():
            raise WeightsError(
                f"weights file {path} does not exist; pass an existing .h5 file or 'imagenet'"
            )
        return path.resolve()
    env = os.environ.get(WEIGHTS_ENV)
    if env:
        path = pathlib.Path(env).expanduser()
        if path.is_dir():
            path = path / spec.filename
        if not path.is_file():
            raise WeightsError(
                f"{WEIGHTS_ENV}={env} but {path} does not exist; "
                f"point it at {spec.filename} or a folder holding it"
            )
        return path.resolve()
    return fetch(spec, cache, download=download)
