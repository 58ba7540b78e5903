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
from collections.abc import Iterable

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


def file_digest(path: str | os.PathLike, algorithm: str = "sha256") -> str:
    """The hex digest of a file (``'sha256'`` or ``'md5'``, the two Keras publishes)."""
    digest = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _problem_with(path: pathlib.Path, spec: PretrainedSpec) -> str | None:
    """Why a cached or downloaded file cannot be used (``None`` if it can): a hash that
    differs from the one Keras publishes, else (no published hash) an unreadable file."""
    if spec.file_hash is not None:
        actual = file_digest(path, spec.hash_algorithm)
        if actual != spec.file_hash:
            return f"{spec.hash_algorithm} {actual} != the published {spec.file_hash}"
        return None
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
            os.chmod(tmp_name, 0o644)  # mkstemp makes it private; a cache is shared
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
    # Library callers pass arguments, CLI users flags: the messages name both.
    offline_hint = (
        f"download {url} yourself and put it at {target}, or pass weights=PATH (--weights PATH "
        f"on the command line), or set {WEIGHTS_ENV}=PATH"
    )
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise WeightsError(
            f"cannot create the weights cache {folder} ({e.strerror}); pass cache_dir=DIR or "
            f"set {CACHE_ENV}=DIR, a writable folder"
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
            raise WeightsError(
                f"weights {spec.filename} are not cached and downloads are off (download=False, "
                "--no-download); allow them, or " + offline_hint
            )
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


def env_file_for(
    spec: PretrainedSpec, registered: Iterable[PretrainedSpec] = ()
) -> pathlib.Path | None:
    """The file ``$FLAXCNN_WEIGHTS`` provides for ``spec``, if any.

    The variable names a folder of Keras-named files, or one file. A file whose name is
    another registered file's (another model, options or top) is not used for ``spec``,
    whatever its resolution; a file of any other name is used for every request (a renamed
    copy), and the strict load then tells if it does not fit.
    """
    env = os.environ.get(WEIGHTS_ENV)
    if not env:
        return None
    path = pathlib.Path(env).expanduser()
    if path.is_dir():
        return path / spec.filename
    key = lambda s: (s.model, s.options, s.include_top)
    owner = next((s for s in registered if s.filename == path.name), None)
    if owner is not None and key(owner) != key(spec):
        return None
    return path


def resolve(
    weights: str | os.PathLike,
    spec: PretrainedSpec | None,
    *,
    cache: str | os.PathLike | None = None,
    download: bool = True,
    registered: Iterable[PretrainedSpec] = (),
) -> pathlib.Path:
    """Turns a ``weights`` argument into a local file.

    Args:
      weights: ``'imagenet'`` (``$FLAXCNN_WEIGHTS`` if it provides the file, see
        :func:`env_file_for`, else the cache, else the official URL) or a path to a file.
      spec: the published file that ``'imagenet'`` means for this model (unused for a path).
      cache: cache folder override.
      download: allow network access.
      registered: every registered file, to tell which one a ``$FLAXCNN_WEIGHTS`` file is.

    Returns:
      Path of an existing file (its contents are checked when loaded).
    """
    if os.fspath(weights) != "imagenet":
        path = pathlib.Path(weights).expanduser()
        if not path.is_file():
            raise WeightsError(
                f"weights file {path} does not exist; pass weights= an existing Keras .h5 file, "
                "'imagenet' or None (--weights PATH, imagenet or none on the command line)"
            )
        return path.resolve()
    if spec is None:
        raise ValueError("weights='imagenet' needs the published file's spec")
    path = env_file_for(spec, registered)
    if path is not None:
        if not path.is_file():
            raise WeightsError(
                f"{WEIGHTS_ENV}={os.environ[WEIGHTS_ENV]} but {path} does not exist; "
                f"point it at {spec.filename} or a folder holding it"
            )
        return path.resolve()
    return fetch(spec, cache, download=download)
