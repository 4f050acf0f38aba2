"""Shared pieces of the exporters.

- `load_checkpoint`: a trained model directory (`model_dir/model.keras`) to an
  `RNPModel`, with one-line errors for a missing directory, a missing or a
  corrupt file.
- `SlicedNetwork`: the network rebuilt from the model's public pieces (the
  stem, the prunable `GatedConv2D`s with BatchNorm folded by
  `folded_weights`, the pooling layers, the agent's weights and the head,
  all as constants) as plain TensorFlow functions that compute only the
  chosen channel prefixes, deciding as `RNPModel.rollout` does (penalty
  re-pricing, compute cap). Its graphs run the one loop,
  `rnp_tf.rollout.rollout`, with executors of their own. The penalty is a
  run-time input of every form (`penalty`, default: the model's penalty
  setting when the network was built), so one artifact serves every
  operating point; the compute cap is frozen in. Three forms, one per
  deployment target:

  * `batched(images, forced_actions, penalty)`: any batch size, per-sample
    actions by gather/scatter (`GatherScatterExecutor`: samples grouped by
    their (previous action, action) pair, one convolution per group on its
    weight slice, results scattered back). No control flow at all, so it converts to ONNX for onnxruntime
    and TensorRT and runs in a SavedModel.
  * `single(image, forced_actions, penalty)`: batch 1, the branch picked by
    a nested binary tree of `tf.cond` on the scalar action
    (`IfTreeExecutor`; ONNX `If` after freezing with lowered control flow).
  * `stem` / `segment` / `head`: one function per (segment, previous action,
    action) for the TFLite signatures driven by `rnp_tf.tflite_runner`.

  `forced_actions` is an int32 `[batch, num_prunable]` (or `[1, num_prunable]`,
  broadcast) tensor: 0 lets the agent choose greedily, 1..k forces that many
  groups. It is what lets the parity check run every action at every layer
  through the exported artifact itself.
- The parity check shared by every exporter: fixed inputs that drive
  different actions (`parity_images`), every action tuple or a set that
  covers every (previous action, action) pair at every layer
  (`action_tuples`), the reference `model.rollout` in inference mode
  (`reference`) and `compare`, which raises `ParityError` with the measured
  difference; the greedy check runs again at two penalties fed to the
  artifact (`knob_inputs`: the saved setting and a cheaper one at which the
  actions differ) against `model.set_penalty(p)` + `model.rollout`.
- The output folder: `open_checkpoint` checks everything the user gave
  before any work (`check_output`: the folder can be written;
  `prepare_target`: it holds no other model's export unless `--overwrite`),
  and `write_set` writes one export run's files as one set: produced and
  verified in a staging folder inside the output, committed by one rename,
  moved into place with `export_manifest.json` (the source checkpoint and
  its SHA-256, each exporter's files and parity results, each file's
  SHA-256); `recover` completes a set whose move was killed.
"""

import contextlib
import dataclasses
import itertools
import os
import shutil
import time

import numpy as np

# Exact parity for float32 artifacts: identical actions, logits within ATOL.
ATOL = 1e-4
# MACs are float32 sums of the same integers: equal up to float rounding.
MACS_RTOL = 1e-5
# Quantised artifacts (TFLite float16 / dynamic-range int8 weights): logits
# may differ by up to `rtol * max(1, max |reference logits|)` and the greedy
# actions may flip on near-ties; the agreement rate is reported and must
# reach `min_agreement`. Forced-action checks (no flips possible) use the
# same logit tolerance on every sample.
QUANTIZED_TOLERANCES = {
    "float16": {"rtol": 1e-2, "min_agreement": 0.75},
    "dynamic": {"rtol": 5e-2, "min_agreement": 0.5},
}
# Greedy parity inputs are chosen so that the best Q-value beats the second
# by at least this much at every layer: float32 rounding (about 1e-6) cannot
# flip them, so "identical actions" is a fair requirement.
MIN_Q_MARGIN = 1e-3


class ExportError(Exception):
    """An export that cannot be completed; the message is one line."""


class CheckpointError(ExportError):
    """A model directory that is missing or does not hold a loadable model."""


class ParityError(ExportError):
    """An exported artifact whose outputs differ from the Keras model's."""


def _first_line(error):
    text = str(error).strip().splitlines()
    line = text[0] if text else type(error).__name__
    return line if len(line) <= 600 else line[:597] + "..."


# --------------------------------------------------------------- checkpoint
def load_checkpoint(model_dir):
    """Loads `model_dir/model.keras` (written by `python -m rnp_tf.train`).

    Args:
        model_dir: a directory holding `model.keras`.

    Returns:
        The `rnp_tf.RNPModel`.

    Raises:
        CheckpointError: the directory or the file is missing, the file is
            not a loadable Keras model, or it is not an RNPModel. The
            message is one line naming the path.

    Example:

    >>> model = load_checkpoint("/tmp/rnp_quickstart")
    """
    path = checkpoint_file(model_dir)
    import keras

    import rnp_tf  # noqa: F401  (registers the custom classes)

    try:
        model = keras.models.load_model(path, compile=False)
    except Exception as error:  # zip, h5, config and weight errors alike
        raise CheckpointError(f"{path!r} is not a loadable Keras model ({_first_line(error)})") from None
    if not isinstance(model, rnp_tf.RNPModel):
        raise CheckpointError(f"{path!r} holds a {type(model).__name__}, not an rnp_tf.RNPModel")
    return model


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


# ------------------------------------------------------------------ parity
def reference(model, images, actions=None, batch_size=256):
    """`model.rollout` in inference mode, as numpy (`logits`, `actions`, `macs`, `q_values`)."""
    parts = {"logits": [], "actions": [], "macs": [], "q_values": []}
    for start in range(0, len(images), batch_size):
        x = images[start : start + batch_size]
        forced = None if actions is None else np.asarray(actions[start : start + batch_size], np.int32)
        out = model.rollout(x, actions=forced)
        for key in parts:
            if out.get(key) is not None:
                parts[key].append(out[key].numpy())
    return {k: np.concatenate(v) for k, v in parts.items() if v}


def candidate_images(image_shape, pool, seed=0):
    """A deterministic pool of images: Gaussian at several scales, the first one constant."""
    rng = np.random.default_rng(seed)
    scales = np.array([0.5, 1.0, 2.0, 3.0], np.float32)
    candidates = rng.normal(size=(pool, *tuple(image_shape))).astype(np.float32)
    candidates *= scales[np.arange(pool) % len(scales)].reshape(-1, 1, 1, 1)
    candidates[0] = 0.5
    return candidates


def parity_images(net, count=16, seed=0, pool=None, penalty=None):
    """A fixed set of images that drive different greedy actions.

    Draws a deterministic pool of candidates (`candidate_images`), keeps
    those whose best (re-priced) Q-value beats the second by
    `MIN_Q_MARGIN` at every layer, so float rounding cannot flip a greedy
    action, and picks one image per distinct action tuple first, then
    fills up by margin.

    Args:
        net: the `SlicedNetwork` of the model (for the knob settings of
            its greedy choice).
        count: how many images.
        seed: seed of the candidate pool.
        pool: pool size (default `4 * count`, at least 32).
        penalty: the run-time penalty the margins are measured at
            (default: `net.penalty_setting`, the artifact's default).

    Returns:
        float32 images `[count, H, W, C]`.
    """
    model = net.model
    pool = pool or max(32, 4 * count)
    candidates = candidate_images(model.image_shape, pool, seed)
    with penalty_scope(model, net.penalty_setting if penalty is None else penalty):
        ref = reference(model, candidates)
        q = np.sort(net.greedy_q_numpy(ref["q_values"], ref["actions"], penalty), axis=-1)
    margin = (q[..., -1] - q[..., -2]).min(axis=1)
    order = np.argsort(-margin, kind="stable")
    safe = [i for i in order if margin[i] >= MIN_Q_MARGIN]
    ranked = safe + [i for i in order if margin[i] < MIN_Q_MARGIN]
    chosen, seen = [], set()
    for i in ranked:
        key = tuple(ref["actions"][i])
        if key not in seen:
            seen.add(key)
            chosen.append(i)
    chosen += [i for i in ranked if i not in chosen]
    return candidates[np.asarray(chosen[:count])]


def action_tuples(num_prunable, groups, limit=256):
    """Forced action tuples that run every action at every layer.

    All `groups ** num_prunable` tuples when there are at most `limit`;
    otherwise the `groups ** 2` alternating tuples `(i, j, i, j, ...)`, which
    still run every (previous action, action) pair at every layer (and so
    every branch of every exported graph), plus every constant tuple.

    Returns:
        int32 array `[n, num_prunable]`.
    """
    if groups**num_prunable <= limit:
        return np.asarray(list(itertools.product(range(1, groups + 1), repeat=num_prunable)), np.int32)
    rows = [[(i if t % 2 == 0 else j) for t in range(num_prunable)] for i in range(1, groups + 1) for j in range(1, groups + 1)]
    return np.asarray(rows, np.int32)


def forced_inputs(images, tuples, per_tuple=2):
    """Repeats parity images so that every tuple runs on `per_tuple` of them."""
    n = len(tuples) * per_tuple
    index = np.arange(n) % len(images)
    return images[index], np.repeat(tuples, per_tuple, axis=0)


def compare(label, ref, got, atol=ATOL, rtol=None, min_agreement=1.0, logits_only=False):
    """Compares an artifact's outputs with the Keras model's.

    Args:
        label: what was compared (shown in messages), e.g. "onnx rnp.onnx greedy".
        ref: `reference(...)` output.
        got: a dict with numpy `logits`, `actions` and `macs`.
        atol: logit tolerance (float32 artifacts: `ATOL`).
        rtol: if given, the logit tolerance is `rtol * max(1, max |ref logits|)`
            (quantised artifacts).
        min_agreement: share of samples whose whole action tuple must match
            (1.0: identical actions).
        logits_only: compare the logits only (the full network: no actions).

    Returns:
        A dict: `samples`, `action_agreement`, `max_abs_logit_diff` (over the
        samples whose actions agree), `tolerance`, `max_rel_macs_diff`.

    Raises:
        ParityError: with the measured numbers, when a limit is exceeded.
    """
    ref_actions = np.asarray(ref["actions"]).astype(np.int64)
    if logits_only:
        got = dict(got, actions=ref_actions, macs=ref["macs"])
    got_actions = np.asarray(got["actions"]).astype(np.int64).reshape(ref_actions.shape)
    same = np.all(ref_actions == got_actions, axis=1)
    agreement = float(same.mean()) if len(same) else 1.0
    ref_logits = np.asarray(ref["logits"], np.float64)
    got_logits = np.asarray(got["logits"], np.float64).reshape(ref_logits.shape)
    tolerance = atol if rtol is None else rtol * max(1.0, float(np.abs(ref_logits).max()))
    diff = float(np.abs(ref_logits[same] - got_logits[same]).max()) if same.any() else 0.0
    ref_macs = np.asarray(ref["macs"], np.float64)
    got_macs = np.asarray(got["macs"], np.float64).reshape(ref_macs.shape)
    macs_diff = float((np.abs(ref_macs - got_macs)[same] / np.maximum(ref_macs[same], 1.0)).max()) if same.any() else 0.0
    result = {
        "check": label,
        "samples": int(len(same)),
        "distinct_action_tuples": int(len({tuple(a) for a in ref_actions})),
        "action_agreement": agreement,
        "max_abs_logit_diff": diff,
        "tolerance": float(tolerance),
        "max_rel_macs_diff": macs_diff,
    }
    problems = []
    if agreement < min_agreement:
        first = int(np.argmin(same))
        problems.append(
            f"actions agree on {agreement:.1%} of {len(same)} samples (need {min_agreement:.0%}; "
            f"first mismatch: expected {ref_actions[first].tolist()}, got {got_actions[first].tolist()})"
        )
    if diff > tolerance or not np.isfinite(diff):
        problems.append(f"max |logits diff| = {diff:.3g} > {tolerance:.3g}")
    if macs_diff > MACS_RTOL:
        problems.append(f"max relative MACs diff = {macs_diff:.3g} > {MACS_RTOL:g}")
    if problems:
        raise ParityError(f"{label}: parity check failed: " + "; ".join(problems))
    return result


def tolerance_for(quantize):
    """`compare` keyword arguments for an artifact precision (None = float32)."""
    if quantize in (None, "none", "float32"):
        return {"atol": ATOL}
    if quantize not in QUANTIZED_TOLERANCES:
        raise ValueError(f"`quantize` must be one of None, {sorted(QUANTIZED_TOLERANCES)}. Received: {quantize!r}")
    return dict(QUANTIZED_TOLERANCES[quantize])


def check_artifact(label, model, run, images, tuples, per_tuple=2, quantize=None, knob=None):
    """Greedy and forced-action parity of one artifact, and greedy parity at run-time penalties.

    Args:
        label: artifact name for messages.
        model: the Keras RNPModel (the reference).
        run: `run(images, forced_actions_or_None, penalty=None) -> dict(logits,
            actions, macs)` running the artifact (`penalty`: a float fed to
            the artifact's penalty input; None: its default).
        images: `parity_images(...)`.
        tuples: `action_tuples(...)`.
        per_tuple: images per forced tuple.
        quantize: None for float32, else a key of `QUANTIZED_TOLERANCES`.
        knob: optional `knob_inputs(...)`: the greedy check again at each
            of its penalties, fed to the artifact, against the model after
            `set_penalty(penalty)`.

    Returns:
        `{"greedy": compare(...), "forced": compare(...)}`, and with `knob`
        `"knob"`: one `compare(...)` per penalty, with `penalty`,
        `mean_macs` and `actions_differ` (from the setting's actions).
    """
    tol = tolerance_for(quantize)
    forced_tol = {k: v for k, v in tol.items() if k != "min_agreement"}
    greedy = compare(f"{label} (greedy actions)", reference(model, images), run(images, None), **tol)
    x, a = forced_inputs(images, tuples, per_tuple)
    forced = compare(f"{label} (forced actions, {len(tuples)} tuples)", reference(model, x, a), run(x, a), **forced_tol)
    result = {"greedy": greedy, "forced": forced}
    if knob:
        result["knob"] = check_knob(label, model, lambda x, p: run(x, None, penalty=p), knob, quantize)
    return result


def check_knob(label, model, run, knob, quantize=None):
    """Greedy parity of an artifact with its penalty input fed, at every penalty of `knob`.

    Args:
        label: artifact name for messages.
        model: the Keras RNPModel; the reference is `model.rollout` after
            `model.set_penalty(penalty)` (the setting is restored).
        run: `run(images, penalty) -> dict(logits, actions, macs)`.
        knob: `knob_inputs(...)`.
        quantize: None for float32, else a key of `QUANTIZED_TOLERANCES`.

    Returns:
        A list: `compare(...)` per penalty, with `penalty`, `mean_macs` (of
        the reference) and `actions_differ`.

    Raises:
        ParityError: the artifact differs from the model at a penalty (an
            ignored penalty input fails at the second one).
    """
    results = []
    for point in knob:
        penalty = point["penalty"]
        with penalty_scope(model, penalty):
            ref = reference(model, point["images"])
        got = run(point["images"], penalty)
        checked = compare(f"{label} (greedy actions, penalty input {penalty:g})", ref, got, **tolerance_for(quantize))
        checked.update(penalty=penalty, mean_macs=float(np.mean(ref["macs"])), actions_differ=point["actions_differ"])
        results.append(checked)
    return results


# ------------------------------------------------------------ knob parity
@contextlib.contextmanager
def penalty_scope(model, penalty):
    """`model.set_penalty(penalty)` for the block; the model's setting is restored afterwards.

    Example:

    >>> with penalty_scope(model, -0.5):
    ...     ref = reference(model, images)
    """
    saved = model.penalty_setting  # a float32 value: set back exactly
    if np.float32(penalty) != np.float32(saved):
        model.set_penalty(float(penalty))
    try:
        yield model
    finally:
        model.set_penalty(saved)


def penalty_candidates(setting):
    """Penalties cheaper than `setting` (more negative), nearest first: `setting - 0.05 * 2**i`."""
    return [setting - 0.05 * 2.0**i for i in range(14)]


def cheaper_penalty(model, images, setting=None, min_changed=0.25):
    """A second run-time penalty at which the greedy actions on `images` clearly differ.

    Tries `penalty_candidates` nearest first and returns the first at which
    at least `min_changed` of the images change their action tuple and the
    mean MACs drop; otherwise the candidate that changed the most images.

    Args:
        model: the RNPModel.
        images: float32 images.
        setting: the reference penalty (default: `model.penalty_setting`).
        min_changed: share of images whose action tuple must change.

    Returns:
        `(penalty, changed)`: a float and the share of images it changed.
    """
    setting = model.penalty_setting if setting is None else float(setting)
    with penalty_scope(model, setting):
        base = reference(model, images)
    best = None
    for penalty in penalty_candidates(setting):
        with penalty_scope(model, penalty):
            ref = reference(model, images)
        changed = float(np.mean(np.any(ref["actions"] != base["actions"], axis=1)))
        if changed >= min_changed and ref["macs"].mean() < base["macs"].mean():
            return float(penalty), changed
        if best is None or changed > best[1]:
            best = (float(penalty), changed)
    return best


def knob_inputs(net, count=16, seed=0):
    """The two run-time penalties every exporter checks, each with its own parity images.

    The artifact's default (`net.penalty_setting`) and `cheaper_penalty`;
    at each, `parity_images` measured at that penalty (so rounding cannot
    flip a greedy action there either).

    Args:
        net: the `SlicedNetwork` (its `penalty_setting` is the artifact's default).
        count: images per penalty.
        seed: seed of the candidate pools.

    Returns:
        A list of two dicts: `penalty`, `images`, `actions_differ` (whether
        the model's actions at this penalty differ from those at the
        setting on the candidate pool).
    """
    model, setting = net.model, net.penalty_setting
    pool = candidate_images(model.image_shape, max(32, 4 * count), seed)
    other, changed = cheaper_penalty(model, pool, setting)
    return [
        {"penalty": setting, "images": parity_images(net, count, seed, penalty=setting), "actions_differ": False},
        {"penalty": other, "images": parity_images(net, count, seed, penalty=other), "actions_differ": changed > 0},
    ]


def knob_subset(knob, count):
    """`knob_inputs` with the first `count` images of each penalty (the slower batch-1 checks)."""
    return [dict(point, images=point["images"][:count]) for point in knob]


def knob_summary(parity):
    """One phrase on the penalty-input checks of a `check_artifact` result (for the CLI summaries)."""
    points = parity.get("knob") or []
    return "penalty input: " + ", ".join(
        f"{p['penalty']:g} -> mean MACs {p['mean_macs']:.4g} (max |dlogits| {p['max_abs_logit_diff']:.2e})" for p in points
    )


# ------------------------------------------------------------ the network
def check_exportable(model):
    """Raises ExportError unless the model is a chain: stem, prunable convs and pools.

    Residual blocks (and zero-padding stages) run on the model's masked and
    reference sliced paths only; the exported graphs are chains like the
    CIFAR CNN and VGG.
    """
    from rnp_tf import plan as plan_lib

    plan = model.plan
    kinds = {type(step.layer if isinstance(step, plan_lib.MapStep) else step).__name__ for step in plan.steps}
    pools_only = all(
        not isinstance(step, plan_lib.MapStep) or "Pooling" in type(step.layer).__name__ for step in plan.steps
    )
    if not (plan.is_chain and pools_only):
        raise ExportError(
            f"only chain backbones (a stem, then prunable convs and pooling) can be exported; this model "
            f"has stages {sorted(kinds)} (residual blocks run on rollout / sliced_rollout only)"
        )


def pool_spec(layer):
    """A Keras pooling layer as `(mode, pool_size, strides, padding)`: `"max"` or `"avg"`, upper-case padding."""
    return (
        "avg" if "average" in type(layer).__name__.lower() else "max",
        tuple(layer.pool_size),
        tuple(layer.strides),
        layer.padding.upper(),
    )


class SlicedNetwork:
    """An RNPModel rebuilt as TensorFlow functions that compute only the chosen prefixes.

    Built from the model's public pieces: `stem`, `prunable` (BatchNorm
    folded into the kernel with `GatedConv2D.folded_weights`, one folded
    kernel per input width since each width has its own BatchNorm set), the
    pooling layers of `model.plan`, the agent's weights
    (`DecisionAgent.weights_of`, run by `rnp_tf.agent.equations`) and
    `head_layers`. `batched`, `single` and `full` run
    `rnp_tf.rollout.rollout` on `model.plan` with this network's policy
    (`KnobPolicy`), agent (`ConstantAgent`) and an executor each
    (`GatherScatterExecutor`, `IfTreeExecutor`, `FullExecutor`). Greedy
    decisions go through `RNPModel.greedy_q` (the run-time knob: Q-values
    re-priced to the penalty, masked by the compute cap). The penalty is
    an input of the graphs (`penalty`: a float32 scalar, `[1]` or
    `[batch]` tensor); when it is not given, the model's
    `penalty_setting` when the network was built (`penalty_setting`) is
    used. The compute cap is read when the network is built and frozen in.
    Every weight is a float32 constant, so no exported graph holds a
    variable.

    Every prunable convolution `t` is a *segment*: the convolution on the
    weight prefix `W[:, :, :in_prefix, :out_prefix]`, its activation and the
    pooling layers that follow it up to the next prunable convolution (or
    the head).

    Graph-building methods run inside `with net.constants():` (the
    top-level functions `batched`, `single` and `full` do it themselves), so
    that each weight is one constant per graph, sliced where it is used.

    Args:
        model: a built `rnp_tf.RNPModel` with a chain backbone.
        action_tuples: optional int `[n, T]` action tuples: build only the
            (previous action, action) branches and heads they use (a
            benchmark of a few operating points on a large network, where
            all `k * k` weight slices per layer would weigh too much).
            Other actions then have no branch: force only these tuples.
            None (default): every branch.

    Example:

    >>> net = SlicedNetwork(model)
    >>> fn = tf.function(net.batched)
    >>> out = fn(images, tf.zeros([1, net.num_prunable], tf.int32))  # greedy
    >>> out = fn(images, tf.zeros([1, net.num_prunable], tf.int32), tf.constant([-0.5]))  # cheaper
    """

    def __init__(self, model, action_tuples=None):
        import tensorflow as tf

        check_exportable(model)
        self._tf = tf
        self.model = model
        self.groups = int(model.groups)
        self.num_prunable = int(model.num_prunable)
        self.image_shape = tuple(int(d) for d in model.image_shape)
        self.num_classes = int(model.num_classes)
        # Walk the plan: stem, pools before the first prunable conv, then
        # each prunable conv with the pools that follow it.
        self.pre_pools, self.post_pools = [], [[] for _ in range(self.num_prunable)]
        self.in_hw, self.out_hw = [], []
        shape = (None, *self.image_shape)
        t = -1
        for step in model.plan.steps:
            layer = step.layer
            pooling = not hasattr(step, "decision")
            if not pooling and step.decision is not None:
                t += 1
                self.in_hw.append(tuple(shape[1:3]))
            shape = tuple(layer.compute_output_shape(shape))
            if pooling:
                (self.pre_pools if t < 0 else self.post_pools[t]).append(pool_spec(layer))
            if t >= 0:
                if len(self.out_hw) <= t:
                    self.out_hw.append(None)
                self.out_hw[t] = tuple(shape[1:3])
        self.head_hw = tuple(shape[1:3])
        stem = model.stem
        self.stem_conv = (int(stem.strides), getattr(stem, "padding", "same").upper(), stem.activation)
        self.stem_channels = int(stem.filters)
        self.convs = [
            (int(c.strides), getattr(c, "padding", "same").upper(), c.activation) for c in model.prunable
        ]
        self.gated = [bool(c.gated_input) for c in model.prunable]
        self.full_in = [int(c.in_channels) for c in model.prunable]
        self.in_group = [int(c.in_group_size) if c.gated_input else None for c in model.prunable]
        self.out_group = [int(c.group_size) for c in model.prunable]
        self.out_channels = [int(c.filters) for c in model.prunable]
        self.flatten = model.backbone["head"]["pooling"] != "gap"
        self._pairs, self._heads = self._restriction(action_tuples)
        self._arrays = self._extract(model)
        self._decision_settings(model)
        # MACs: the plan's table (`NetworkPlan.conv_macs_table`, `head_macs_table`,
        # `fixed_macs`), the stem counted in the fixed part.
        self.fixed_macs = float(stem.full_macs) + float(model.plan.fixed_macs)
        self.head_macs = {a: float(m) for a, m in enumerate(model.plan.head_macs_table(), start=1)}
        self._consts = None
        self._kernel_mode = None  # see `kernels_as_inputs`

    def _restriction(self, action_tuples):
        """Per layer, the (previous action, action) pairs of `action_tuples`; the last actions."""
        if action_tuples is None:
            return None, None
        k, T = self.groups, self.num_prunable
        tuples = np.asarray(action_tuples)
        if tuples.ndim != 2 or tuples.shape[1] != T or len(tuples) == 0 or tuples.min() < 1 or tuples.max() > k:
            raise ValueError(
                f"`action_tuples` must be ints in 1..{k} of shape [n, {T}]. Received: action_tuples={action_tuples!r}"
            )
        previous = np.concatenate([np.full((len(tuples), 1), k), tuples[:, :-1]], axis=1)
        pairs = [
            sorted({(int(p) if self.varies(t) else k, int(a)) for p, a in zip(previous[:, t], tuples[:, t])})
            for t in range(T)
        ]
        return pairs, sorted({int(a) for a in tuples[:, -1]})

    def _decision_settings(self, model):
        """The run-time knob of `RNPModel.rollout`'s greedy choice: the default penalty, the frozen cap."""
        self.penalty_setting = float(model.penalty_setting)
        cap = getattr(model, "compute_cap_macs", None)
        self.cap = None if cap is None else float(cap)

    def _extract(self, model):
        """Every weight as a float32 numpy array (BatchNorm folded)."""
        k = self.groups
        arrays = {}
        kernel, bias = model.stem.folded_weights(k, k)
        arrays["stem"] = (np.asarray(kernel, np.float32), np.asarray(bias, np.float32))
        for t, conv in enumerate(model.prunable):
            # the full width's set always: `full` runs it
            for p in sorted({p for p, _ in self.branches(t)} | {k}):
                # Full kernel folded with the BatchNorm set of input width p;
                # (p, a) uses its prefix [:, :, :in_prefix(p), :a * group].
                kernel, bias = conv.folded_weights(p, k)
                arrays[("conv", t, p)] = (np.asarray(kernel, np.float32), np.asarray(bias, np.float32))
        first = model.head_layers[0]
        kernel = np.asarray(first.kernel, np.float32)
        hf, wf, c = model.plan.head.in_shape
        if self.flatten:
            # Channel-major rows, so that the first a groups are a row prefix.
            kernel = kernel.reshape(hf, wf, c, -1).transpose(2, 0, 1, 3).reshape(c * hf * wf, -1)
        arrays["head0"] = (np.ascontiguousarray(kernel), self._bias(first), first.activation)
        for i, dense in enumerate(model.head_layers[1:]):
            arrays[("head", i + 1)] = (np.asarray(dense.kernel, np.float32), self._bias(dense), dense.activation)
        agent = model.agent
        self.units = int(agent.units)
        self.agent_channels = [int(c) for c in agent.feature_channels]
        for t in range(self.num_prunable):
            weights = agent.weights_of(t)  # what `rnp_tf.agent.equations` reads
            for name in ("encoder", "decoder"):
                arrays[(name, t)] = tuple(np.asarray(w, np.float32) for w in weights[name])
        arrays["lstm"] = tuple(np.asarray(w, np.float32) for w in weights["lstm"])  # shared by every layer
        self.lstm_activation = weights["activation"]
        self.lstm_recurrent_activation = weights["recurrent_activation"]
        return arrays

    @staticmethod
    def _bias(layer):
        if getattr(layer, "use_bias", True) and getattr(layer, "bias", None) is not None:
            return np.asarray(layer.bias, np.float32)
        return np.zeros(int(layer.kernel.shape[-1]), np.float32)

    # ------------------------------------------------------------ helpers
    @contextlib.contextmanager
    def constants(self):
        """Scope of one graph: each weight becomes one constant, created on first use.

        A constant made in one `tf.cond` branch cannot be used in another,
        so `single` creates the shared ones up front; what one branch alone
        uses (its conv's weight slice, its head's row prefix) is created in
        that branch, so that it is a constant of the branch itself: a slice
        of an outer constant would be computed at run time (onnxruntime
        then slices, transposes and re-packs the weights at every call).
        """
        outer = self._consts
        self._consts = {}
        try:
            yield
        finally:
            self._consts = outer

    def _kernel(self, name, array):
        """A conv or dense kernel, made once per graph (see `constants`) under its unique `name`.

        A constant, or under `kernels_as_inputs` the input standing in for
        it, or under `recording_kernels` zeros of its shape.
        """
        tf = self._tf
        if ("kernel", name) not in self._graph_consts():
            mode = self._kernel_mode
            if mode is None:
                tensor = tf.constant(array)
            elif mode["tensors"] is None:  # recording: no weight in the graph
                mode["arrays"][name] = array
                tensor = tf.zeros(array.shape, tf.float32)
            else:
                tensor = mode["tensors"][name]
            self._consts[("kernel", name)] = tensor
        return self._consts[("kernel", name)]

    @contextlib.contextmanager
    def recording_kernels(self):
        """Within it, graphs built record their kernels and hold zeros (a `Fill` op) in their place.

        Yields:
            A dict, filled as graphs are built: kernel name -> float32
            array (a view of the network's weights).

        Example:

        >>> with net.recording_kernels() as kernels:
        ...     tf.function(net.full).get_concrete_function(tf.TensorSpec([1, 32, 32, 3]))
        >>> megabytes = sum(a.nbytes for a in kernels.values()) / 2**20
        """
        mode = {"arrays": {}, "tensors": None}
        self._kernel_mode = mode
        try:
            yield mode["arrays"]
        finally:
            self._kernel_mode = None

    def kernels_as_inputs(self, method, input_signature):
        """`method` traced with every conv and dense kernel as an extra input instead of a constant.

        For converters that copy every constant many times (tf2onnx held 20
        to 50 times the weights at its peak, so VGG-16 at 224x224 did not
        convert in 24 GB): the graph they convert holds no large weight,
        and `export.onnx.bind_kernels` puts the arrays back into the
        converted model as initializers. Inputs are named after the
        kernels (`kernel_conv<t>_p<previous>_in<ci>_out<co>`,
        `kernel_head0_rows<rows>`, ...). `method` is traced twice: once to
        find the kernels it uses, once with them as inputs.

        Args:
            method: a graph method, for example `net.batched`.
            input_signature: its `tf.TensorSpec`s.

        Returns:
            `(fn, signature, kernels)`: a `tf.function` taking the original
            inputs followed by the kernels, its full signature, and the
            kernels as `{name: float32 array}` in input order.

        Example:

        >>> fn, sig, kernels = net.kernels_as_inputs(net.full, [tf.TensorSpec([None, 32, 32, 3])])
        >>> out = fn(images, *kernels.values())  # the same as net.full(images)
        """
        tf = self._tf
        with self.recording_kernels() as kernels:
            tf.function(method, input_signature=input_signature, autograph=False).get_concrete_function()
        n = len(input_signature)
        signature = list(input_signature) + [
            tf.TensorSpec(array.shape, tf.float32, name=name) for name, array in kernels.items()
        ]

        def fn(*args):
            self._kernel_mode = {"arrays": {}, "tensors": dict(zip(kernels, args[n:]))}
            try:
                return method(*args[:n])
            finally:
                self._kernel_mode = None

        return tf.function(fn, input_signature=signature, autograph=False), signature, kernels

    def _graph_consts(self):
        """The constants of the graph being traced (see `constants`)."""
        if self._consts is None:
            raise RuntimeError("SlicedNetwork graph methods must run inside `with net.constants():`")
        return self._consts

    def _const(self, key, index=0):
        tf = self._tf
        if (key, index) not in self._graph_consts():
            self._consts[(key, index)] = tf.constant(self._arrays[key][index])
        return self._consts[(key, index)]

    def _all_constants(self):
        """Makes up front the constants that several of `single`'s branches share (see `constants`)."""
        for key, value in self._arrays.items():
            kind = key[0] if isinstance(key, tuple) else key
            for index, item in enumerate(value):
                if kind == "conv" or index == 0 and kind in ("head0", "stem", "encoder", "decoder"):
                    continue  # one branch each (`segment`, `_dense`), or used outside the branches only
                if kind == "head" and index == 0:
                    self._dense_kernel(key)  # shared by every head branch
                elif isinstance(item, np.ndarray):
                    self._const(key, index)

    def previous_actions(self, t):
        """The previous actions that can feed prunable conv `t` (the stem's output is always full)."""
        return list(range(1, self.groups + 1)) if self.varies(t) else [self.groups]

    def varies(self, t):
        """Whether the input width of prunable conv `t` follows the previous decision."""
        return t > 0 and self.gated[t]

    def branches(self, t):
        """The (previous action, action) pairs of prunable conv `t` (those built)."""
        if self._pairs is not None:
            return list(self._pairs[t])
        return [(p, a) for p in self.previous_actions(t) for a in range(1, self.groups + 1)]

    def heads(self):
        """The last actions whose head is built."""
        return list(self._heads) if self._heads is not None else list(range(1, self.groups + 1))

    def in_channels(self, t, p):
        """Input channels of prunable conv `t` after previous action `p`."""
        return p * self.in_group[t] if self.varies(t) else self.full_in[t]

    def macs_of(self, actions):
        """MACs per sample for an int array `[n, T]` (numpy float64; `spent` in numpy)."""
        actions = np.asarray(actions).reshape(-1, self.num_prunable)
        k = self.groups
        total = np.full(len(actions), self.fixed_macs)
        prev = np.full(len(actions), k)
        for t in range(self.num_prunable):
            total += self.macs_table(t)[(prev - 1) * k + actions[:, t] - 1]
            prev = actions[:, t]
        return total + self.head_macs_table()[prev - 1]

    def macs_constant(self, values):
        """MAC counts as an int64 constant.

        The graphs add MACs in int64 and cast the total to float32 at the
        end: exact, and out of reach of TFLite's float16 quantisation, which
        would store float constants as float16 (clipped at 65504).
        """
        tf = self._tf
        return tf.constant(np.rint(np.asarray(values, np.float64)).astype(np.int64))

    def head_macs_table(self):
        """`[k]` MACs of the head's first Dense for last action 1..k (`NetworkPlan.head_macs_table`)."""
        return self.model.plan.head_macs_table()

    def macs_table(self, t):
        """`[k * k]` MACs of conv `t`, indexed `(previous - 1) * k + action - 1` (`NetworkPlan.conv_macs_table`)."""
        return self.model.plan.conv_macs_table(t)

    def pool(self, h, pools):
        """`h` through pooling layers given as `pool_spec`s, in order."""
        tf = self._tf
        for mode, size, strides, padding in pools:
            pool = tf.nn.max_pool2d if mode == "max" else tf.nn.avg_pool2d
            h = pool(h, ksize=size, strides=strides, padding=padding)
        return h

    def _conv(self, h, kernel, bias, conv):
        tf = self._tf
        strides, padding, activation = conv
        y = tf.nn.conv2d(h, kernel, strides=strides, padding=padding)
        return activation(tf.nn.bias_add(y, bias))

    def _dense(self, x, key, rows=None):
        tf = self._tf
        return self._arrays[key][2](tf.matmul(x, self._dense_kernel(key, rows)) + self._const(key, 1))

    def _dense_kernel(self, key, rows=None):
        """The kernel of a head Dense layer, or its first `rows` rows, made once per graph.

        A row prefix is its own constant (see `constants`); a graph holding
        the whole kernel once per head (VGG-16: 411 MB) would also pass
        protobuf's 2 GB.
        """
        full = self._arrays[key][0]
        rows = full.shape[0] if rows is None else rows
        name = "kernel_" + (key if isinstance(key, str) else "_".join(map(str, key))) + f"_rows{rows}"
        return self._kernel(name, full[:rows])

    # ------------------------------------------------------------ decisions
    def initial_state(self, n):
        """Zero LSTM state `[h, c]` for `n` samples."""
        tf = self._tf
        zeros = tf.zeros(tf.stack([n, self.units]), tf.float32)
        return [zeros, zeros]

    def penalties(self, penalty, n):
        """The run-time penalty of each sample, float32 `[n]`.

        Args:
            penalty: None (the default, `penalty_setting`), a float, or a
                float tensor of shape `[]`, `[1]` or `[n]`.
            n: the batch size (an int or a scalar int32 tensor).
        """
        tf = self._tf
        if penalty is None:
            penalty = self.penalty_setting
        penalty = tf.reshape(tf.cast(penalty, tf.float32), [-1])
        return penalty + tf.zeros(tf.stack([n]), tf.float32)

    def agent_step(self, t, pooled, state):
        """`rnp_tf.agent.equations` on the agent's constants (a channel prefix is zero-padded).

        Args:
            t: decision index.
            pooled: `[n, c]` pooled features (`c` up to the agent's width).
            state: `[h, c]` LSTM state.

        Returns:
            `(q_values [n, k], [h, c])` (raw Q-values, before re-pricing).
        """
        from rnp_tf import agent as agent_lib
        from rnp_tf import rollout as rollout_lib

        def dense(key):  # the kernel as the head's (`kernels_as_inputs` makes it an input)
            return self._dense_kernel(key), self._const(key, 1)

        return agent_lib.equations(
            rollout_lib.pad_channels(pooled, self.agent_channels[t]),
            state,
            encoder=dense(("encoder", t)),
            lstm=tuple(self._const("lstm", i) for i in range(3)),
            decoder=dense(("decoder", t)),
            activation=self.lstm_activation,
            recurrent_activation=self.lstm_recurrent_activation,
        )

    def policy(self, penalties=None, forced=None):
        """The exported graphs' policy (`KnobPolicy`) at run-time `penalties`, with optional `forced` actions."""
        return KnobPolicy(self.model, self.penalty_setting if penalties is None else penalties, forced)

    def start_spent(self, n):
        """MACs before the first decision's conv (`[n]` int64): the fixed part."""
        tf = self._tf
        return tf.fill(tf.stack([n]), self.macs_constant(self.fixed_macs))

    def spent(self, actions, n):
        """Float32 `[n]` MACs of a rollout's actions, summed exactly in int64 (see `macs_constant`).

        Args:
            actions: the int32 `[n]` action of every decision, in order.
            n: the batch size (an int or a scalar int32 tensor).
        """
        tf = self._tf
        k = self.groups
        spent, prev = self.start_spent(n), None
        for t, action in enumerate(actions):
            prev = tf.fill(tf.shape(action), k) if prev is None else prev
            spent = spent + tf.gather(self.macs_constant(self.macs_table(t)), (prev - 1) * k + action - 1)
            prev = action
        return tf.cast(spent + tf.gather(self.macs_constant(self.head_macs_table()), prev - 1), tf.float32)

    def greedy_q_numpy(self, q, actions, penalty=None):
        """`RNPModel.greedy_q` of every decision, numpy `[n, T, k]` (for choosing parity images).

        Args:
            q: raw Q-values `[n, T, k]`.
            actions: the int actions `[n, T]` taken.
            penalty: the run-time penalty (default: `penalty_setting`).
        """
        import tensorflow as tf

        actions = tf.constant(np.asarray(actions, np.int32))
        penalty = self.penalty_setting if penalty is None else float(penalty)
        return np.stack(
            [
                self.model.greedy_q(t, tf.constant(q[:, t]), [actions[:, u] for u in range(t)], penalty).numpy()
                for t in range(self.num_prunable)
            ],
            axis=1,
        )

    def pooled(self, h, channels=None):
        """Global average of a (narrow) map, zero-padded to `channels`."""
        tf = self._tf
        from rnp_tf import rollout as rollout_lib

        return rollout_lib.pad_channels(tf.reduce_mean(h, axis=[1, 2]), channels or h.shape[-1])

    # ------------------------------------------------------------ segments
    def sliced_conv(self, t, h, previous=None, action=None):
        """One convolution on its weight slice, activated: the stem, or prunable conv `t`.

        Args:
            t: the decision index of a prunable conv, or None for the stem
                (full width).
            h: the input, holding exactly `previous` groups.
            previous: the previous action (unused when the input has full width).
            action: output groups to compute.

        Returns:
            A map with `action * out_group[t]` channels (the stem: all).
        """
        tf = self._tf
        if t is None:
            return self._conv(h, self._kernel("kernel_stem", self._arrays["stem"][0]), self._const("stem", 1),
                              self.stem_conv)
        ci, co = self.in_channels(t, previous), action * self.out_group[t]
        key = ("conv", t, previous if self.varies(t) else self.groups)
        kernel, bias = self._arrays[key]
        # the branch's own slice (see `constants`)
        kernel = self._kernel(f"kernel_conv{t}_p{key[2]}_in{ci}_out{co}", kernel[:, :, :ci, :co])
        if (key, ci, co) not in self._consts:
            self._consts[(key, ci, co)] = tf.constant(bias[:co])
        return self._conv(h, kernel, self._consts[(key, ci, co)], self.convs[t])

    def stem(self, images):
        """Stem conv (full width) and the pools before the first prunable conv."""
        return self.pool(self.sliced_conv(None, images), self.pre_pools)

    def segment(self, t, h, previous, action, pools=None):
        """Prunable conv `t` on `h` (holding exactly `previous` groups), then its pools.

        Args:
            t, h, previous, action: as `sliced_conv`.
            pools: the `pool_spec`s that follow (default: `post_pools[t]`).

        Returns:
            A map with `action * out_group` channels.
        """
        return self.pool(self.sliced_conv(t, h, previous, action), self.post_pools[t] if pools is None else pools)

    def head(self, h, action):
        """Logits from the last feature map, holding `action` groups."""
        tf = self._tf
        ch = action * self.out_group[-1]
        if self.flatten:
            hf, wf = self.head_hw
            h = tf.reshape(tf.transpose(h, [0, 3, 1, 2]), [-1, ch * hf * wf])
            rows = ch * hf * wf
        else:
            h = tf.reduce_mean(h, axis=[1, 2])
            rows = ch
        h = self._dense(h, "head0", rows)
        for i in range(1, len(self.model.head_layers)):
            h = self._dense(h, ("head", i))
        return h

    # -------------------------------------------------------------- graphs
    def run(self, images, executor, penalties=None, forced=None):
        """`rnp_tf.rollout.rollout` of the model's plan on the constants, with `policy(penalties, forced)`.

        Args:
            images: float32 `[n, H, W, C]`.
            executor: a `GatherScatterExecutor` or `IfTreeExecutor` of this network.
            penalties: float32 `[n]` run-time penalties (`penalties(...)`).
            forced: optional int32 `[n or 1, T]` forced actions (0: greedy).

        Returns:
            dict: `logits` `[n, classes]`, `actions` int32 `[n, T]`, `macs` float32 `[n]`.
        """
        from rnp_tf import rollout as rollout_lib

        out = rollout_lib.rollout(self.model.plan, ConstantAgent(self), images, self.policy(penalties, forced), executor)
        actions = self._tf.stack(out.actions, axis=1)
        return {"logits": out.logits, "actions": actions, "macs": self.spent(out.actions, executor.batch)}

    def batched(self, images, forced_actions=None, penalty=None):
        """Any batch size; per-sample actions by gather/scatter, no control flow (`GatherScatterExecutor`).

        Args:
            images: float32 `[n, H, W, C]`.
            forced_actions: optional int32 `[n or 1, T]`; 0 = the agent's greedy choice.
            penalty: optional float32 run-time penalty, `[]`, `[1]` or `[n]`
                (default: `penalty_setting`).

        Returns:
            dict: `logits` `[n, classes]`, `actions` int32 `[n, T]`, `macs` float32 `[n]`.
        """
        with self.constants():
            n = self._tf.shape(images)[0]
            return self.run(images, GatherScatterExecutor(self, n), self.penalties(penalty, n), forced_actions)

    def single(self, images, forced_actions=None, penalty=None):
        """Batch 1: the (previous action, action) branch chosen by nested `tf.cond` (`IfTreeExecutor`).

        Args:
            images: float32 `[1, H, W, C]`.
            forced_actions: optional int32 `[1, T]`; 0 = the agent's greedy choice.
            penalty: optional float32 run-time penalty, `[]` or `[1]`
                (default: `penalty_setting`).

        Returns:
            dict like `batched`, batch 1.
        """
        with self.constants():
            self._all_constants()
            return self.run(images, IfTreeExecutor(self), self.penalties(penalty, 1), forced_actions)

    def full(self, images):
        """The unpruned network (every action k, no agent) with plain convolutions: the baseline."""
        from rnp_tf import rollout as rollout_lib

        with self.constants():
            return {"logits": rollout_lib.rollout(self.model.plan, None, images, FullWidth(), FullExecutor(self)).logits}


# ------------------------------------------------- policy, agent, executors
class KnobPolicy:
    """The exported graphs' policy: greedy as `RNPModel.rollout` chooses, unless forced.

    Greedy on `RNPModel.greedy_q` (Q-values re-priced to the run-time
    penalties, actions the frozen compute cap forbids masked), through
    `rnp_tf.rollout.Greedy`; `forced[:, t] > 0` overrides (clipped to 1..k).
    A policy of `rnp_tf.rollout.rollout`.

    Args:
        model: the `RNPModel`.
        penalties: float32 `[n]` run-time penalties, or a float.
        forced: None or int32 `[n or 1, T]` forced actions (0: greedy).
    """

    uses_agent = True

    def __init__(self, model, penalties, forced=None):
        from rnp_tf import rollout as rollout_lib

        self.groups = int(model.groups)
        self.forced = forced
        self.greedy = rollout_lib.Greedy(lambda t, q, decided: model.greedy_q(t, q, decided, penalties))

    def choose(self, t, q, decided):
        """The int32 `[n]` action of decision `t` from raw Q-values `q` and the earlier actions `decided`."""
        import tensorflow as tf

        action = self.greedy.choose(t, q, decided)
        if self.forced is None:
            return action
        f = tf.clip_by_value(tf.cast(self.forced[:, t], tf.int32), 0, self.groups)
        return tf.where(f > 0, f, action)


class FullWidth:
    """The policy of the unpruned network: no agent, every action `None` (the full width)."""

    uses_agent = False

    def choose(self, t, q, decided):
        return None


class ConstantAgent:
    """The decision agent on a `SlicedNetwork`'s constants, as `rnp_tf.rollout.rollout` calls it.

    Args:
        net: the `SlicedNetwork`.
    """

    def __init__(self, net):
        self.net = net

    def initial_state(self, n):
        """Zero LSTM state for `n` samples."""
        return self.net.initial_state(n)

    def decide(self, t, pooled, state):
        """`(q_values, state)` of decision `t` (`SlicedNetwork.agent_step`)."""
        return self.net.agent_step(t, pooled, state)


class ChainExecutor:
    """Base of the executors of `rnp_tf.rollout.rollout` on a `SlicedNetwork`'s constants (chains only).

    Args:
        net: the `SlicedNetwork`.
        batch: the batch size (an int or a scalar int32 tensor; None when no agent runs).
    """

    def __init__(self, net, batch=None):
        self.net = net
        self.batch = batch
        self.tf = net._tf

    def begin(self, images):
        return images

    def batch_size(self, images):
        return self.batch

    def map(self, step, h):
        return self.net.pool(h, [pool_spec(step.layer)])

    def residual(self, h, shortcut):
        raise ValueError("The exported graphs run chain backbones only (no residual blocks).")


class FullExecutor(ChainExecutor):
    """The unpruned network: every conv at full width, no branches (with the `FullWidth` policy).

    Args:
        net: the `SlicedNetwork`.
    """

    def pooled(self, h, t):
        raise ValueError("FullExecutor runs no agent.")

    def conv(self, step, h, in_action, out_action):
        k = self.net.groups
        return self.net.sliced_conv(step.decision, h, k, k)

    def head(self, h, last_action):
        return self.net.head(h, self.net.groups)


class Segment:
    """A prunable conv not built yet, with the pools that follow it: the lazy executors' `h`.

    Attributes:
        t: the decision index.
        h: the input map (built).
        previous: the previous action (int32 `[n]`), or None when the input has full width.
        action: the action (int32 `[n]`).
        pools: the `pool_spec`s appended by `map`.
        built: None until built, then the executor's `(map, pooled or None)`.
    """

    def __init__(self, t, h, previous, action):
        self.t, self.h, self.previous, self.action = t, h, previous, action
        self.pools = []
        self.built = None


class SegmentExecutor(ChainExecutor):
    """Base of the branching executors: a prunable conv and the pools after it are built as one segment.

    The exported graphs compute each segment (prunable conv `t` and its
    pools) inside each of its branches, while `rnp_tf.rollout.rollout`
    passes the pools as separate `map` steps. So `conv` records a
    `Segment`, `map` appends its pool, and the segment is built (`build`,
    by the subclass) when its output is first needed: by `pooled`, the next
    `conv` or `head`. The stem and the pools before the first prunable conv
    run at once. Subclasses define `build(segment) -> (map, pooled or None)`
    (pooled features computed in the branches, or None: pool the map) and
    `classify(map, last_action) -> logits`.

    Args:
        net: the `SlicedNetwork`.
        batch: the batch size (an int or a scalar int32 tensor).
    """

    def pooled(self, h, t):
        h, pooled = self._built(h)
        return self.net.pooled(h) if pooled is None else pooled

    def conv(self, step, h, in_action, out_action):
        h, _ = self._built(h)
        if step.decision is None:
            return self.net.sliced_conv(None, h)
        return Segment(step.decision, h, in_action, out_action)

    def map(self, step, h):
        if not isinstance(h, Segment):
            return super().map(step, h)
        if h.built is not None:
            raise ValueError(f"A pool after segment {h.t} was already built.")
        h.pools.append(pool_spec(step.layer))
        return h

    def head(self, h, last_action):
        return self.classify(self._built(h)[0], last_action)

    def _built(self, h):
        if not isinstance(h, Segment):
            return h, None
        if h.built is None:
            h.built = self.build(h)
        return h.built


class GatherScatterExecutor(SegmentExecutor):
    """Any batch size: per-sample actions by gather/scatter, no control flow.

    At each prunable conv the samples are grouped by their (previous
    action, action) pair; each group is gathered, narrowed to its input
    prefix, run through its segment on its weight slice (pooled while
    narrow), zero-padded back to full width and scattered to its rows.
    The head is chosen the same way by the last action.

    Args:
        net: the `SlicedNetwork`.
        batch: the batch size, a scalar int32 tensor.
    """

    def build(self, segment):
        tf, net, t = self.tf, self.net, segment.t
        outs, index = [], []
        for p, b in net.branches(t):
            chosen = tf.equal(segment.action, b)
            if net.varies(t):
                chosen = tf.logical_and(tf.equal(segment.previous, p), chosen)
            idx = self._indices(chosen)
            ci = net.in_channels(t, p)
            x = tf.gather(segment.h, idx)
            if ci != net.full_in[t]:
                x = x[..., :ci]
            y = self._run_group(x, lambda z, p=p, b=b: net.segment(t, z, p, b, segment.pools), net.in_hw[t], ci)
            pad = net.out_channels[t] - b * net.out_group[t]
            outs.append(tf.pad(y, [[0, 0], [0, 0], [0, 0], [0, pad]]) if pad else y)
            index.append(idx)
        hw = net.out_hw[t]
        shape = tf.stack([self.batch, hw[0], hw[1], net.out_channels[t]])
        return tf.scatter_nd(tf.concat(index, 0)[:, None], tf.concat(outs, 0), shape), None

    def classify(self, h, last_action):
        tf, net = self.tf, self.net
        logits, index = [], []
        g = net.out_group[-1]
        for b in net.heads():
            idx = self._indices(tf.equal(last_action, b))
            x = tf.gather(h, idx)[..., : b * g]
            logits.append(self._run_group(x, lambda z, b=b: net.head(z, b), net.head_hw, b * g))
            index.append(idx)
        shape = tf.stack([self.batch, net.num_classes])
        return tf.scatter_nd(tf.concat(index, 0)[:, None], tf.concat(logits, 0), shape)

    def _run_group(self, x, fn, hw, channels):
        """`fn` on a group of samples; an empty group runs on one zero sample that is dropped.

        Works around oneDNN's empty-batch convolution bug (FINDINGS.md) and
        keeps every runtime away from zero-sized convolutions; the reshape
        restores the static inner dims.
        """
        tf = self.tf
        m = tf.shape(x)[0]
        pad = tf.maximum(1 - m, 0)
        x = tf.concat([x, tf.zeros(tf.stack([pad, hw[0], hw[1], channels]), x.dtype)], axis=0)
        x = tf.reshape(x, [-1, hw[0], hw[1], channels])
        return fn(x)[:m]

    def _indices(self, mask):
        """int32 indices of the True entries of a `[n]` mask (NonZero on float32, as TensorRT wants)."""
        tf = self.tf
        return tf.cast(tf.reshape(tf.where(tf.cast(mask, tf.float32)), [-1]), tf.int32)


class IfTreeExecutor(SegmentExecutor):
    """Batch 1: each segment's (previous action, action) branch picked by a nested binary `tf.cond` tree.

    Each branch returns its narrow map and the map's pooled features, so
    only the chosen branch runs (nested ONNX `If` once frozen and lowered);
    the head is picked the same way by the last action.

    Args:
        net: the `SlicedNetwork`.
    """

    def __init__(self, net):
        super().__init__(net, 1)

    def build(self, segment):
        tf, net, t = self.tf, self.net, segment.t
        hw, nxt = net.in_hw[t], net.out_channels[t]

        def branch(p, b):
            x = tf.reshape(segment.h, [1, hw[0], hw[1], net.in_channels(t, p)])
            y = net.segment(t, x, p, b, segment.pools)
            return y, net.pooled(y, nxt)

        fns = [lambda p=p, b=b: branch(p, b) for p, b in net.branches(t)]
        previous = None if segment.previous is None else segment.previous[0]
        h, pooled = self._tree(self._branch_index(t, previous, segment.action[0]), fns)
        return h, tf.reshape(pooled, [1, nxt])

    def classify(self, h, last_action):
        tf, net = self.tf, self.net
        k, g = net.groups, net.out_group[-1]
        hf, wf = net.head_hw
        built = net.heads()
        heads = [(lambda b=b: net.head(tf.reshape(h, [1, hf, wf, b * g]), b)) for b in built]
        index = last_action[0] - 1
        if built != list(range(1, k + 1)):
            lookup = np.zeros(k, np.int32)
            lookup[np.asarray(built) - 1] = np.arange(len(built))
            index = tf.gather(tf.constant(lookup), index)
        return tf.reshape(self._tree(index, heads), [1, net.num_classes])

    def _tree(self, index, fns, lo=0, hi=None):
        """Nested binary `tf.cond` over `fns[index]` (nested ONNX If once frozen and lowered)."""
        tf = self.tf
        hi = len(fns) if hi is None else hi
        if hi - lo == 1:
            return fns[lo]()
        mid = (lo + hi) // 2
        return tf.cond(index < mid, lambda: self._tree(index, fns, lo, mid), lambda: self._tree(index, fns, mid, hi))

    def _branch_index(self, t, previous, action):
        """int32 scalar: position of `(previous, action)` in `branches(t)` (`previous` None: full input)."""
        tf, net = self.tf, self.net
        k = net.groups
        varies = net.varies(t)
        every = [(p, a) for p in net.previous_actions(t) for a in range(1, k + 1)]
        branches = net.branches(t)
        if branches == every:
            return (previous - 1) * k + action - 1 if varies else action - 1
        key = (previous - 1) * k + action - 1 if varies else (k - 1) * k + action - 1
        lookup = np.zeros(k * k, np.int32)
        for i, (p, a) in enumerate(branches):
            lookup[(p - 1) * k + a - 1] = i
        return tf.gather(tf.constant(lookup), key)


# ------------------------------------------------------------------ flags
OUTPUT_FLAGS = ("output", "overwrite")
OUTPUT_HELP = (
    "Output directory (default: <model_dir>/export). One export run writes its files as one set, "
    f"recorded with the source checkpoint's SHA-256, every file's SHA-256 and the parity results in "
    f"{MANIFEST}; exporters of the same model share the folder, and a run replaces the files its "
    "exporter wrote before. A folder holding another model's export (or export files without a "
    "manifest) is refused with exit status 2 before any work, unless --overwrite."
)


def define_output_flags(flag_values):
    """`--output` and `--overwrite`, listed in the exporter's `--help`."""
    from absl import flags

    if "overwrite" in flag_values:
        return
    fv = {"flag_values": flag_values}
    flags.DEFINE_string("output", None, OUTPUT_HELP, **fv)
    flags.DEFINE_boolean(
        "overwrite", False,
        "Replace an export of another model in --output: every file of that set is removed when the "
        "new set is moved into place (files that are not exports stay).", **fv,
    )
    for name in OUTPUT_FLAGS:
        flags.declare_key_flag(name, flag_values=flag_values)


# ---------------------------------------------------------- run-time knob
KNOB_FLAGS = ("penalty", "compute_cap")


def define_knob_flags(flag_values):
    """`--penalty` (the artifacts' default penalty input) and `--compute_cap` (frozen into the export)."""
    from absl import flags

    if "compute_cap" in flag_values:
        return
    fv = {"flag_values": flag_values}
    flags.DEFINE_float(
        "penalty", None,
        "Default of the exported artifacts' run-time penalty input (RNPModel.set_penalty; default: "
        "the penalty setting saved with the model). Every artifact takes the penalty as an input, so "
        "a deployed model can be switched at run time; this is the value used when it is not fed.", **fv,
    )
    flags.DEFINE_float(
        "compute_cap", None,
        "Hard per-image MAC cap as a fraction of the full model (RNPModel.set_compute_cap), frozen "
        "into the export (not a run-time input); default: the cap saved with the model, if any.", **fv,
    )


def check_knob_values(penalty=None, compute_cap=None):
    """`--penalty` finite, `--compute_cap` in (0, 1]: an ExportError naming the flag."""
    from rnp_tf import validation

    try:
        if penalty is not None:
            validation.check_float("--penalty", penalty)
        if compute_cap is not None:
            validation.check_float("--compute_cap", compute_cap, 0.0, 1.0, low_open=True)
    except ValueError as error:
        raise ExportError(str(error)) from None


def apply_knob(model, penalty=None, compute_cap=None):
    """Sets the model's run-time knob before export; a bad value is an ExportError naming the flag."""
    check_knob_values(penalty, compute_cap)
    if penalty is not None:
        if not hasattr(model, "set_penalty"):
            raise ExportError("--penalty: this model has no run-time penalty (RNPModel.set_penalty)")
        model.set_penalty(float(penalty))
    if compute_cap is not None:
        if not hasattr(model, "set_compute_cap"):
            raise ExportError("--compute_cap: this model has no compute cap (RNPModel.set_compute_cap)")
        floor = model.min_macs / model.full_macs
        if compute_cap < floor - 1e-9:
            raise ExportError(
                f"--compute_cap must lie in [{floor:.4f}, 1] (the narrowest network costs {floor:.4f}). "
                f"Received: --compute_cap={compute_cap}"
            )
        model.set_compute_cap(float(compute_cap))
    return model


def knob_report(net):
    """The decision settings of an export (for the reports): the default penalty input, the frozen cap."""
    return {
        "penalty_setting": net.penalty_setting,
        "penalty_input": "run-time input 'penalty' (float32); penalty_setting is its default",
        "compute_cap_macs": net.cap,
    }


# -------------------------------------------------------------------- CLI
def positional_model_dir(program, argv):
    """The single positional argument of a CLI (the model directory), or exit 2."""
    from rnp_tf import validation

    args = argv[1:]
    if len(args) != 1:
        validation.exit_with_error(
            program, f"expected exactly one positional argument, the model directory holding model.keras; got {args}"
        )
    return args[0]


def run_cli(program, argv, export):
    """The body of an exporter's `main`: `export(model_dir)`, errors as one line and exit 2.

    Args:
        program: the command's name, e.g. `"export.onnx"`.
        argv: the arguments absl left (the program and one model directory).
        export: function `model_dir -> report`.

    Returns:
        The report.
    """
    model_dir = positional_model_dir(program, argv)
    try:
        return export(model_dir)
    except ExportError as error:
        fail(program, error)


def open_checkpoint(program, model_dir, output=None, penalty=None, compute_cap=None, log=None, overwrite=False):
    """What every exporter starts with: the checks, the model with its knob set, the output, a logger.

    Everything the user gave is checked before the model is loaded and
    before any conversion: the model directory, the knob values, the
    output folder (writable, no other model's export unless `overwrite`;
    `prepare_target`).

    Args:
        program: the command's name (prefix of the progress lines).
        model_dir: the directory holding `model.keras`.
        output: the output directory (default: `model_dir/export`).
        penalty, compute_cap: optional run-time knob settings (`apply_knob`).
        log: optional `log(message)`; default: a progress line on stdout.
        overwrite: replace a set exported from another model.

    Returns:
        `(model, target, log)`: `target` is the `ExportTarget` to give
        `write_set`.

    Raises:
        ExportError: a missing or corrupt checkpoint, a bad knob setting, an
            unwritable output or one holding another model's export.
    """
    log = log or (lambda m: say(program, m))
    checkpoint_file(model_dir)
    check_knob_values(penalty, compute_cap)
    target = prepare_target(program, model_dir, output, overwrite, log)
    model = load_checkpoint(model_dir)
    apply_knob(model, penalty, compute_cap)
    return model, target, log


def fail(program, error):
    """One line on stderr and exit status 2 (`rnp_tf.validation.exit_with_error`)."""
    from rnp_tf import validation

    validation.exit_with_error(program, _first_line(error))


def timed(fn, *args, repeats=20, warmup=3):
    """Median wall time of `fn(*args)` in milliseconds."""
    for _ in range(warmup):
        fn(*args)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn(*args)
        times.append((time.perf_counter() - start) * 1e3)
    return float(np.median(times))


def say(program, message):
    """A progress line on stdout."""
    print(f"{program}: {message}", flush=True)
