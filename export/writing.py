"""Writing an export: artifacts produced under temporary names and moved into place together."""

import contextlib
import dataclasses
import os
import shutil
import time

from export.exceptions import CheckpointError, ExportError


def checkpoint_file(model_dir):
    """The path of `model_dir/model.keras`; a CheckpointError naming the path when it is missing."""
    if not model_dir:
        raise CheckpointError("a model directory is required (the positional argument, holding model.keras)")
    model_dir = os.fspath(model_dir)
    if not os.path.isdir(model_dir):
        raise CheckpointError(f"model directory {model_dir!r} does not exist")
    path = os.path.join(model_dir, "model.keras")
    if not os.path.isfile(path):
        raise CheckpointError(f"no model.keras in {model_dir!r} (train one with python -m rnp_tf.train)")
    return path


def default_output(model_dir, output=None):
    """`output`, or `<model_dir>/export` when it is not given."""
    return os.fspath(output) if output else os.path.join(os.fspath(model_dir), "export")


def check_output(path, probe=True):
    """Checks before any work that the output directory can be written (`io_utils.check_writable_dir`).

    Args:
        path: the output directory.
        probe: also create it, write and remove a probe file (everything
            this creates is removed again).

    Returns:
        The absolute path.

    Raises:
        ExportError: one line naming `--output`: a missing parent, a file
            in the way, or a directory that cannot be written.
    """
    from rnp_tf import io_utils

    path = os.path.abspath(os.fspath(path))
    parent = os.path.dirname(path)
    if not os.path.isdir(parent):
        raise ExportError(f"--output: parent directory {parent!r} does not exist")
    if os.path.exists(path) and not os.path.isdir(path):
        raise ExportError(f"--output: {path!r} exists and is not a directory")
    if probe:
        try:
            io_utils.check_writable_dir(path, "--output")
        except ValueError as error:
            raise ExportError(str(error)) from None
    return path


@contextlib.contextmanager
def output_directory(path):
    """Creates the output directory; removes it again if it was new and the export failed.

    Raises:
        ExportError: the parent directory is missing or `path` is a file.
    """
    path = check_output(path, probe=False)
    created = not os.path.exists(path)
    os.makedirs(path, exist_ok=True)
    try:
        yield path
    except BaseException:
        if created:
            with contextlib.suppress(OSError):
                os.rmdir(path)  # only if still empty
        raise


# ----------------------------------------------------------------- writing
@dataclasses.dataclass
class Artifact:
    """One file (or directory) to write: `produce(tmp_path)` writes and verifies it."""

    path: str
    produce: object
    directory: bool = False


def write_json(tmp, obj):
    """Writes a report to `tmp` (numpy values converted; see `rnp_tf.io_utils.write_json`)."""
    from rnp_tf import io_utils

    io_utils.write_json(tmp, obj)


def json_artifact(path, obj):
    """An `Artifact` writing `obj` as JSON when its turn comes (so late additions to `obj` are kept)."""
    return Artifact(path, lambda tmp: write_json(tmp, obj))


# ------------------------------------------------------------- export sets
MANIFEST = "export_manifest.json"


STAGING = ".export-staging-"


COMMITTED = ".export-commit-"


_REMOVE = ".remove.json"


_TRASH = ".trash"


# What the exporters write, to recognise a folder written before manifests.
EXPORT_FILES = (
    "saved_model", "saved_model.json", "rnp.tflite", "rnp_float16.tflite", "rnp_dynamic.tflite", "tflite.json",
    "rnp.onnx", "rnp_b1.onnx", "full.onnx", "onnx.json", "rnp_trt.onnx", "trt.json",
    "rnp.engine", "full.engine", "rnp_fp16.engine", "full_fp16.engine",
)


@dataclasses.dataclass
class ExportTarget:
    """Where one export run writes its set of files.

    Attributes:
        directory: the absolute output directory.
        program: the exporter, e.g. `"export.onnx"`.
        source: `{"model_dir", "checkpoint", "sha256"}` of the model exported.
        overwrite: replace a set of another source (`--overwrite`).
    """

    directory: str
    program: str
    source: dict
    overwrite: bool = False


def sha256_file(path):
    """Hex SHA-256 of a file's content (`rnp_tf.io_utils.sha256_file`)."""
    from rnp_tf import io_utils

    return io_utils.sha256_file(path)


def _describe_files(path, name):
    """`{relative name: {size, sha256}}` of a file or of every file under a directory."""
    if not os.path.isdir(path):
        return {name: {"size": os.path.getsize(path), "sha256": sha256_file(path)}}
    out = {}
    for root, _, files in os.walk(path):
        for f in sorted(files):
            full = os.path.join(root, f)
            out[os.path.join(name, os.path.relpath(full, path))] = {
                "size": os.path.getsize(full), "sha256": sha256_file(full)
            }
    return dict(sorted(out.items()))


def read_manifest(directory):
    """The export manifest of `directory`, or None when there is none.

    Raises:
        ExportError: the manifest is unreadable.
    """
    from rnp_tf import io_utils

    path = os.path.join(directory, MANIFEST)
    if not os.path.exists(path):
        return None
    try:
        manifest = io_utils.read_json(path)
    except ValueError:
        manifest = None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("exports"), dict):
        raise ExportError(f"--output: {path!r} is corrupt; pass --overwrite to replace the export in {directory!r}")
    return manifest


def foreign_set(directory, source):
    """What in `directory` comes from another source than `source`: a description, or None.

    Export files without a manifest (an older release, copied by hand) are
    of an unknown source, so foreign too.
    """
    manifest = read_manifest(directory)
    if manifest is None:
        found = [n for n in EXPORT_FILES if os.path.lexists(os.path.join(directory, n))]
        return f"{', '.join(found)} without {MANIFEST} (source unknown)" if found else None
    theirs = manifest.get("source") or {}
    if theirs.get("sha256") == source["sha256"]:
        return None
    files = sorted({f for entry in manifest["exports"].values() for f in entry.get("files", [])})
    return (f"{', '.join(files)} exported from {theirs.get('checkpoint')!r} "
            f"(SHA-256 {str(theirs.get('sha256'))[:12]}..., not {source['sha256'][:12]}...)")


def prepare_target(program, model_dir, output=None, overwrite=False, log=None):
    """Everything about the output checked before the work starts.

    Finishes an export into the folder that was killed during its final
    move (`recover`), proves the folder writable (`check_output`) and
    refuses a folder holding an export of another model unless
    `overwrite`.

    Args:
        program: the exporter, e.g. `"export.onnx"`.
        model_dir: the directory holding `model.keras`.
        output: the output directory (default: `model_dir/export`).
        overwrite: replace a set exported from another source.
        log: optional `log(message)`.

    Returns:
        An `ExportTarget`.

    Raises:
        ExportError: a missing checkpoint, an unwritable output, or a folder
            holding another model's export (without `overwrite`). One line.
    """
    checkpoint = checkpoint_file(model_dir)
    directory = check_output(default_output(model_dir, output))
    for message in recover(directory):
        if log:
            log(message)
    source = {"model_dir": os.path.abspath(model_dir), "checkpoint": os.path.abspath(checkpoint),
              "sha256": sha256_file(checkpoint)}
    if not overwrite:
        foreign = foreign_set(directory, source) if os.path.isdir(directory) else None
        if foreign:
            raise ExportError(
                f"--output {directory!r} holds an export of another model ({foreign}); nothing was written: "
                "pass --overwrite to replace that whole set, or choose another --output"
            )
    return ExportTarget(directory, program, source, bool(overwrite))


def write_set(target, artifacts, report=None, keep=()):
    """Writes one export run's files as one set, with the folder's manifest.

    Every artifact is produced and verified in a staging folder inside the
    output directory (`produce(tmp)` as for `write_artifacts`). Only when
    all of them passed is the staging folder renamed to a committed one
    (the commit point) and its files moved into place, the manifest last.
    A crash before the commit leaves the previous set; a crash during the
    move is completed by the next export into the folder (`recover`).

    The new set replaces the files this exporter wrote before (those it
    no longer writes are removed); other exporters' files of the same
    source stay. When `target.overwrite` replaces another source's set,
    every file of that set goes.

    Args:
        target: the `ExportTarget` of `prepare_target`.
        artifacts: `Artifact`s whose paths lie in `target.directory`.
        report: the run's report; its parity results go into the manifest.
        keep: names already in the folder that belong to this run's set
            (a second write of the same run).

    Returns:
        The list of destination paths.
    """
    import tempfile
    import uuid

    from rnp_tf import io_utils

    directory = target.directory
    names = [os.path.basename(a.path) for a in artifacts]
    for artifact in artifacts:
        if os.path.dirname(os.path.abspath(artifact.path)) != directory:
            raise ValueError(f"an artifact must lie in {directory!r}. Received: path={artifact.path!r}")
    staging = tempfile.mkdtemp(prefix=f"{STAGING}{os.getpid()}-", dir=directory)
    try:
        for artifact, name in zip(artifacts, names):
            tmp = os.path.join(staging, name)
            if artifact.directory:
                os.mkdir(tmp)
            else:
                open(tmp, "wb").close()
            artifact.produce(tmp)
        manifest, remove = _next_manifest(target, staging, names, keep, report)
        io_utils.write_json(os.path.join(staging, _REMOVE), remove)
        io_utils.write_json(os.path.join(staging, MANIFEST), manifest)
        for root, _, files in os.walk(staging):
            for f in files:
                io_utils._fsync_path(os.path.join(root, f))
        committed = os.path.join(directory, f"{COMMITTED}{os.getpid()}-{uuid.uuid4().hex[:8]}")
        os.rename(staging, committed)  # the commit point
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    io_utils._fsync_dir(directory)
    _move_into_place(committed, directory)
    return [os.path.join(directory, n) for n in names]


def _next_manifest(target, staging, names, keep, report):
    """The folder's manifest after this set and the names it removes."""
    directory, program = target.directory, target.program
    old = read_manifest(directory) if not target.overwrite else _manifest_or_none(directory)
    same = old is not None and (old.get("source") or {}).get("sha256") == target.source["sha256"]
    new_set = set(names) | set(keep)
    if same:
        exports = {k: v for k, v in old["exports"].items() if k != program}
        files = dict(old.get("files", {}))
        previous = set(old["exports"].get(program, {}).get("files", []))
    else:
        exports, files = {}, {}
        previous = {f for entry in (old or {}).get("exports", {}).values() for f in entry.get("files", [])}
        previous |= {n for n in EXPORT_FILES if os.path.lexists(os.path.join(directory, n))}
    still_listed = {f for entry in exports.values() for f in entry.get("files", [])}
    remove = sorted(previous - new_set - still_listed)
    files = {k: v for k, v in files.items() if k.split(os.sep)[0] not in set(remove) | set(names)}
    for name in names:
        for key, record in _describe_files(os.path.join(staging, name), name).items():
            files[key] = {**record, "exporter": program}
    for name in keep:
        if not any(k.split(os.sep)[0] == name for k in files):
            for key, record in _describe_files(os.path.join(directory, name), name).items():
                files[key] = {**record, "exporter": program}
    exports[program] = {
        "files": sorted(new_set),
        "written": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "parity": {k: v for k, v in (report or {}).items() if "parity" in k},
    }
    manifest = {"format": 1, "source": target.source, "exports": dict(sorted(exports.items())),
                "files": dict(sorted(files.items()))}
    return manifest, remove


def _manifest_or_none(directory):
    try:
        return read_manifest(directory)
    except ExportError:
        return None


def _move_into_place(committed, directory):
    """Moves a committed set into `directory` (idempotent: a re-run after a crash completes it)."""
    from rnp_tf import io_utils

    trash = os.path.join(committed, _TRASH)
    os.makedirs(trash, exist_ok=True)

    def aside(name):
        dest = os.path.join(directory, name)
        if os.path.lexists(dest):
            io_utils._remove_path(os.path.join(trash, name))
            os.rename(dest, os.path.join(trash, name))

    special = {MANIFEST, _REMOVE, _TRASH}
    for name in sorted(os.listdir(committed)):
        if name in special:
            continue
        src = os.path.join(committed, name)
        if os.path.isdir(src) or os.path.isdir(os.path.join(directory, name)):
            aside(name)
        os.replace(src, os.path.join(directory, name))
    remove_path = os.path.join(committed, _REMOVE)
    if os.path.exists(remove_path):
        for name in io_utils.read_json(remove_path):
            aside(name)
    if os.path.exists(os.path.join(committed, MANIFEST)):
        os.replace(os.path.join(committed, MANIFEST), os.path.join(directory, MANIFEST))
    io_utils._fsync_dir(directory)
    shutil.rmtree(committed, ignore_errors=True)


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def recover(directory):
    """Completes or discards what an export killed in `directory` left behind.

    A committed set (`.export-commit-*`) is moved into place; an
    uncommitted staging folder (`.export-staging-*`) is removed, leaving the
    previous set. Folders of a process still running are left alone.

    Args:
        directory: an output directory (a missing one is ignored).

    Returns:
        One message per folder handled.
    """
    if not os.path.isdir(directory):
        return []
    messages = []
    for name in sorted(os.listdir(directory)):
        kind = COMMITTED if name.startswith(COMMITTED) else STAGING if name.startswith(STAGING) else None
        if kind is None:
            continue
        pid = name[len(kind):].split("-")[0]
        if pid.isdigit() and int(pid) != os.getpid() and _alive(int(pid)):
            continue
        path = os.path.join(directory, name)
        if kind == COMMITTED:
            _move_into_place(path, directory)
            messages.append(f"completed an export into {directory} that was interrupted while moving its files")
        else:
            shutil.rmtree(path, ignore_errors=True)
            messages.append(f"removed the files of an export into {directory} that was interrupted before it finished")
    return messages
