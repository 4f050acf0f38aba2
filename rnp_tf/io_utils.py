"""Atomic file writes: the single place where `rnp_tf` writes to disk.

Checkpoints, exported models, JSON summaries and figures are all written
through `atomic_write()`: the content is first produced under a hidden
temporary name in the same directory as the destination, flushed to disk,
and only then moved onto the destination with `os.replace()`. A crash or an
exception half-way through therefore never leaves a truncated file behind,
and any previous version of the file stays intact.

Nothing happens at import time; TensorFlow/Keras are never imported by this
module (`save_model_atomic()` only calls `model.save()`).
"""

import json
import math
import os
import pathlib
import shutil
import tempfile
import uuid

import numpy as np

_TMP_MARKER = ".tmp-"


def _current_umask():
    """Returns the process umask without (if possible) changing it."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    # Fallback (not thread-safe for a brief instant, but portable).
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _fsync_path(path):
    """Flushes one regular file to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path):
    """Best-effort fsync of a directory entry (POSIX only)."""
    if os.name != "posix":
        return
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _remove_path(path):
    """Removes a file or directory tree if it exists, ignoring errors."""
    try:
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
        elif os.path.lexists(path):
            os.remove(path)
    except OSError:
        pass


def atomic_write(path, write_fn, *, directory=None, keep_suffix=False):
    """Writes a file or directory atomically via a temporary sibling.

    `write_fn(tmp_path)` is called with the path of a freshly created,
    hidden temporary file (or empty directory) in the same directory as
    `path`. When it returns, the content is fsynced and moved onto `path`
    with `os.replace()`. If `write_fn` raises (or the process is
    interrupted), the temporary is removed, the exception is re-raised and
    any previous content at `path` is left untouched.

    In directory mode an existing directory at `path` is first renamed
    aside, the new one is renamed into place and the old one is then
    deleted. POSIX has no atomic swap of two directories, so there is a
    short window in which `path` does not exist, but a reader can never
    observe a half-written directory.

    Args:
        path: Destination path (str or path-like). A trailing path
            separator selects directory mode.
        write_fn: Callable taking a single argument, the temporary path
            (str), which must write the complete content there. For files
            the temporary file already exists (empty) and may be
            overwritten; for directories it is an existing empty directory.
        directory: If `True`, write a directory instead of a file. Defaults
            to `None`, meaning "directory iff `path` ends with a separator".
        keep_suffix: If `True`, the temporary name ends with the full file
            name of `path` (`.tmp-<random>.<name>`) so that writers that
            infer the format from the extension (Keras `.keras`,
            `numpy.save`, matplotlib) see the right one. Otherwise the
            temporary is named `.<name>.tmp-<random>`.

    Returns:
        The destination path as a `str` (without a trailing separator).

    Example:

    >>> def write(tmp_path):
    ...     with open(tmp_path, "w") as f:
    ...         f.write("hello")
    >>> atomic_write("/tmp/greeting.txt", write)
    '/tmp/greeting.txt'
    """
    if not callable(write_fn):
        raise ValueError(
            f"`write_fn` must be callable. Received: write_fn={write_fn!r}"
        )
    raw = os.fspath(path)
    if not isinstance(raw, str):
        raw = os.fsdecode(raw)
    seps = (os.sep,) + ((os.altsep,) if os.altsep else ())
    if directory is None:
        directory = raw.endswith(seps)
    final = raw.rstrip("".join(seps)) or raw
    name = os.path.basename(final)
    if not name or name in (".", ".."):
        raise ValueError(
            f"`path` must name a file or directory. Received: path={path!r}"
        )
    parent = os.path.dirname(final) or "."
    if not os.path.isdir(parent):
        raise FileNotFoundError(
            f"Cannot write {final!r}: parent directory {parent!r} does not "
            f"exist. Create it first (e.g. os.makedirs). Received: "
            f"path={path!r}"
        )
    if directory and os.path.exists(final) and not os.path.isdir(final):
        raise NotADirectoryError(
            f"Cannot write a directory at {final!r}: a non-directory already "
            f"exists there. Received: path={path!r}"
        )
    if not directory and os.path.isdir(final):
        raise IsADirectoryError(
            f"Cannot write a file at {final!r}: a directory already exists "
            f"there. Pass directory=True (or a trailing '/') to replace a "
            f"directory. Received: path={path!r}"
        )

    if keep_suffix:
        prefix, suffix = _TMP_MARKER, "." + name
    else:
        prefix, suffix = "." + name + _TMP_MARKER, ""
    umask = _current_umask()
    if directory:
        tmp = tempfile.mkdtemp(prefix=prefix, suffix=suffix, dir=parent)
        mode = 0o777 & ~umask
    else:
        fd, tmp = tempfile.mkstemp(prefix=prefix, suffix=suffix, dir=parent)
        os.close(fd)
        mode = 0o666 & ~umask
    old_aside = None
    try:
        # mkstemp/mkdtemp create private (0600/0700) entries; give the
        # result the permissions a plain open()/mkdir() would have had.
        os.chmod(tmp, mode)
        write_fn(tmp)
        if not os.path.lexists(tmp):
            raise RuntimeError(
                f"`write_fn` removed or renamed the temporary path {tmp!r} "
                f"instead of writing to it (a writer that appends its own "
                f"extension needs keep_suffix=True). Received: path={path!r}"
            )
        if directory:
            if not os.path.isdir(tmp):
                raise RuntimeError(
                    f"`write_fn` did not leave a directory at {tmp!r}. "
                    f"Received: path={path!r}"
                )
            for root, _, files in os.walk(tmp):
                for f in files:
                    p = os.path.join(root, f)
                    if os.path.isfile(p) and not os.path.islink(p):
                        _fsync_path(p)
                _fsync_dir(root)
            if os.path.lexists(final):
                old_aside = os.path.join(
                    parent, f".{name}.old-{uuid.uuid4().hex[:8]}"
                )
                os.rename(final, old_aside)
                try:
                    os.rename(tmp, final)
                except BaseException:
                    os.rename(old_aside, final)
                    old_aside = None
                    raise
            else:
                os.rename(tmp, final)
        else:
            if os.path.isfile(tmp):
                _fsync_path(tmp)
            os.replace(tmp, final)
    except BaseException:
        _remove_path(tmp)
        raise
    _fsync_dir(parent)
    if old_aside is not None:
        _remove_path(old_aside)
    return final


def sha256_file(path):
    """The hex SHA-256 digest of a file's content, read in 4 MB blocks.

    Example:

    >>> sha256_file("/tmp/run/model.keras")  # doctest: +SKIP
    '9f86d08...'
    """
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def remove_leftovers(directory):
    """Removes what an interrupted `atomic_write` left in `directory`.

    A process killed (SIGKILL, power loss) inside `atomic_write` leaves its
    hidden temporary (`.name.tmp-*`, `.tmp-*.name`) or, in directory mode,
    the previous version renamed aside (`.name.old-*`); the destinations
    themselves are always whole. Only call this when no other process is
    writing into `directory`.

    Args:
        directory: the directory to clean (a missing one is ignored).

    Returns:
        The names removed, sorted.

    Example:

    >>> remove_leftovers("/tmp/run/state")
    ['.rnp-0002.tmp-k3j2h1']
    """
    directory = os.fspath(directory)
    if not os.path.isdir(directory):
        return []
    removed = []
    for name in sorted(os.listdir(directory)):
        if name.startswith(".") and (_TMP_MARKER in name or ".old-" in name):
            _remove_path(os.path.join(directory, name))
            removed.append(name)
    return removed


def check_writable_dir(path, name="path"):
    """Proves that directory `path` can be created and a file written in it.

    Run before any work whose output goes to `path`, so that an unwritable
    location (a read-only parent, `/proc`, a file in the way) costs nothing:
    the directory is created, a hidden probe file is written into it and
    removed, and the directories this call created are removed again, so
    the file system is left as it was (a later error writes nothing). The
    work creates the directory when it writes its first file.

    Args:
        path: the output directory (str or path-like).
        name: what the message calls it, e.g. the flag `"--model_dir"`.

    Returns:
        `path` as a `str`.

    Raises:
        ValueError: the directory cannot be created or written, naming
            `name`, the path and the system's reason.

    Example:

    >>> check_writable_dir("/tmp/rnp_run/checkpoints", "--model_dir")
    '/tmp/rnp_run/checkpoints'
    """
    path = os.fspath(path)
    if not path:
        raise ValueError(f"{name} must name a directory. Received: {name}={path!r}")
    created = []
    missing = os.path.abspath(path)
    while missing and not os.path.lexists(missing):
        created.append(missing)
        parent = os.path.dirname(missing)
        missing = parent if parent != missing else ""
    try:
        os.makedirs(path, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-probe-", dir=path)
        try:
            os.write(fd, b"probe")
        finally:
            os.close(fd)
            os.remove(probe)
    except OSError as error:
        reason = error.strerror or type(error).__name__
        raise ValueError(f"{name}: cannot write to {path!r} ({reason}).") from None
    finally:
        for directory in created:  # deepest first
            try:
                os.rmdir(directory)
            except OSError:
                pass
    return path


def _to_jsonable(obj):
    """Recursively converts numpy/path values; NaN and +-inf become None."""
    if isinstance(obj, (str, bool)) or obj is None:
        return obj
    if isinstance(obj, float):  # Includes np.float64.
        return float(obj) if math.isfinite(obj) else None
    if isinstance(obj, int):
        return int(obj)
    if isinstance(obj, np.generic):
        return _to_jsonable(obj.item())
    if isinstance(obj, np.ndarray):
        return _to_jsonable(obj.tolist())
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            if isinstance(k, np.generic):
                k = k.item()
            elif isinstance(k, pathlib.PurePath):
                k = str(k)
            out[k] = _to_jsonable(v)
        return out
    if isinstance(obj, (list, tuple)):
        return [_to_jsonable(v) for v in obj]
    if isinstance(obj, pathlib.PurePath):
        return str(obj)
    if hasattr(obj, "__array__"):  # e.g. eager tf.Tensor.
        return _to_jsonable(np.asarray(obj))
    return obj  # Left to json's error reporting.


def _json_default(obj):
    """`json.dumps` hook for objects `_to_jsonable` did not convert."""
    raise TypeError(
        f"Object of type {type(obj).__name__} is not JSON serializable. "
        f"Received: obj={obj!r}"
    )


def write_json(path, obj, *, indent=2):
    """Atomically writes `obj` as JSON (UTF-8, key order preserved).

    Numpy scalars and arrays (and anything exposing `__array__`, such as
    eager tensors) are converted to plain Python numbers and lists, and
    `pathlib` paths to strings. Because NaN and infinities are not valid
    JSON, every non-finite float (Python or numpy) is written as `null`;
    reading the file back gives `None` in those places. Keys are not
    sorted.

    Args:
        path: Destination `.json` path; its parent directory must exist.
        obj: JSON-serializable object (dicts, lists, str, numbers, bool,
            None, numpy values).
        indent: Indentation passed to `json.dumps`. Defaults to 2.

    Returns:
        The destination path as a `str`.

    Example:

    >>> write_json("/tmp/m.json", {"acc": np.float32(0.5), "x": float("nan")})
    '/tmp/m.json'
    >>> read_json("/tmp/m.json")
    {'acc': 0.5, 'x': None}
    """
    text = json.dumps(
        _to_jsonable(obj),
        indent=indent,
        ensure_ascii=False,
        allow_nan=False,
        default=_json_default,
    )

    def _write(tmp_path):
        with open(tmp_path, "w", encoding="utf-8") as f:
            f.write(text)
            f.write("\n")

    return atomic_write(path, _write)


def read_json(path):
    """Reads a JSON file written by `write_json()` (or any UTF-8 JSON).

    Args:
        path: Path of the JSON file.

    Returns:
        The decoded Python object.

    Raises:
        FileNotFoundError: If `path` does not exist.
        ValueError: If the file is not valid UTF-8 JSON (the message names
            the path).

    Example:

    >>> write_json("/tmp/cfg.json", {"k": 4})
    '/tmp/cfg.json'
    >>> read_json("/tmp/cfg.json")
    {'k': 4}
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"JSON file not found: {path!r}. Received: path={path!r}"
        )
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except ValueError as e:  # JSONDecodeError and UnicodeDecodeError.
        raise ValueError(
            f"Could not parse JSON file {path!r} (corrupt or truncated): "
            f"{e}. Received: path={path!r}"
        ) from e


def save_model_atomic(model, path):
    """Saves a Keras model to a `.keras` file atomically.

    The model is saved with `model.save()` under a hidden temporary name
    that also ends in `.keras` (Keras requires that extension), then moved
    onto `path`. An existing file at `path` is only replaced once the new
    one is completely written.

    Args:
        model: A Keras 3 model (anything with a `save(filepath)` method).
        path: Destination path; must end in `.keras` and its parent
            directory must exist.

    Returns:
        The destination path as a `str`.

    Example:

    >>> model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    >>> save_model_atomic(model, "/tmp/model.keras")
    '/tmp/model.keras'
    >>> restored = keras.saving.load_model("/tmp/model.keras")
    """
    raw = os.fspath(path)
    if not str(raw).endswith(".keras"):
        raise ValueError(
            f"`path` must end in '.keras' (the Keras 3 native format). "
            f"Received: path={path!r}"
        )
    if not hasattr(model, "save"):
        raise ValueError(
            f"`model` must be a Keras model with a `save()` method. "
            f"Received: model={model!r}"
        )
    return atomic_write(raw, lambda tmp: model.save(tmp), keep_suffix=True)
