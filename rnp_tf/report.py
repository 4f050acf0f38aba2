"""Figures and summary tables for Runtime Neural Pruning experiments.

Every plotting function validates its inputs, draws a matplotlib figure
with the non-interactive Agg canvas (so it works headless and never touches
the global pyplot state or the user's interactive backend), writes the image
atomically via `rnp_tf.io_utils.atomic_write()` and returns the path. The
image format follows the file extension (PNG when there is none).

The "compute fraction" of an image is the number of multiply-accumulates
executed for it divided by the MACs of the full (unpruned) model, in (0, 1].

matplotlib is imported lazily inside the functions; importing this module
has no side effects.
"""

import math
import numbers
import os

import numpy as np

from rnp_tf import io_utils

COMPUTE_LABEL = "compute fraction (MACs / full model)"
_RANGE_TOL = 1e-6
_FRACTION_HINT = (
    " Pass accuracy as a fraction in [0, 1] (it is displayed in percent),"
    " not as a percentage."
)


# ---------------------------------------------------------------------------
# Helpers.
# ---------------------------------------------------------------------------


def _new_figure(figsize):
    """Creates a pyplot-free figure bound to an Agg canvas."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize)
    FigureCanvasAgg(fig)
    return fig


def _save_figure(fig, path, dpi=100):
    """Writes `fig` atomically to `path` and releases it."""
    path = os.fspath(path)
    fmt = os.path.splitext(path)[1].lstrip(".").lower() or "png"
    try:
        return io_utils.atomic_write(
            path,
            lambda tmp: fig.savefig(tmp, format=fmt, dpi=dpi),
        )
    finally:
        fig.clear()


def _finite_array(x, name, *, ndim=None, dtype=np.float64):
    """Converts `x` to a non-empty, finite array or raises ValueError."""
    try:
        arr = np.asarray(x, dtype=dtype)
    except (TypeError, ValueError) as e:
        raise ValueError(
            f"`{name}` must be numeric. Received: {name}={x!r}"
        ) from e
    if ndim is not None and arr.ndim != ndim:
        raise ValueError(
            f"`{name}` must be {ndim}-D. Received: {name} with shape "
            f"{arr.shape}"
        )
    if arr.size == 0:
        raise ValueError(
            f"`{name}` must not be empty. Received: {name} with shape "
            f"{arr.shape}"
        )
    if np.issubdtype(arr.dtype, np.floating) and not np.all(np.isfinite(arr)):
        bad = int(np.size(arr) - np.count_nonzero(np.isfinite(arr)))
        raise ValueError(
            f"`{name}` must contain only finite numbers, found {bad} NaN/inf "
            f"value(s). Received: {name}={_short(arr)}"
        )
    return arr


def _check_range(arr, name, lo=0.0, hi=1.0, hint=""):
    """Checks lo <= arr <= hi (small float tolerance) and clips."""
    if np.any(arr < lo - _RANGE_TOL) or np.any(arr > hi + _RANGE_TOL):
        raise ValueError(
            f"`{name}` must lie in [{lo:g}, {hi:g}]; found values in "
            f"[{float(np.min(arr)):g}, {float(np.max(arr)):g}].{hint} "
            f"Received: {name}={_short(arr)}"
        )
    return np.clip(arr, lo, hi)


def _short(arr):
    """Compact repr of an array for error messages."""
    return np.array2string(np.asarray(arr), threshold=8, edgeitems=3)


def _class_indices(x, name, n):
    """Returns integer class ids of shape (n,) from ids or one-hot/logits."""
    arr = np.asarray(x)
    if arr.ndim == 2:  # One-hot labels or per-class scores.
        if arr.shape[0] == 0 or arr.shape[1] == 0:
            raise ValueError(
                f"`{name}` must not be empty. Received: {name} with shape "
                f"{arr.shape}"
            )
        arr = np.argmax(arr, axis=-1)
    if arr.ndim != 1:
        raise ValueError(
            f"`{name}` must have shape (N,) (class ids) or (N, num_classes). "
            f"Received: {name} with shape {arr.shape}"
        )
    if arr.shape[0] != n:
        raise ValueError(
            f"`{name}` must have one entry per image ({n}). Received: "
            f"{name} with length {arr.shape[0]}"
        )
    if not (
        np.issubdtype(arr.dtype, np.integer)
        or (
            np.issubdtype(arr.dtype, np.floating)
            and np.all(np.isfinite(arr))
            and np.all(arr == np.round(arr))
        )
    ):
        raise ValueError(
            f"`{name}` must contain integer class ids. Received: "
            f"{name}={_short(arr)}"
        )
    return arr.astype(np.int64)


# ---------------------------------------------------------------------------
# Plots.
# ---------------------------------------------------------------------------


def plot_compute_histogram(compute_fraction, path, *, title=None, bins=20):
    """Plots the histogram of per-image compute fractions.

    Args:
        compute_fraction: 1-D array-like of per-image compute fractions in
            [0, 1] (executed MACs / full-model MACs).
        path: Output image path (e.g. `"hist.png"`); its parent directory
            must exist.
        title: Optional figure title. Defaults to a title giving the number
            of images.
        bins: Number of equal-width bins over [0, 1]. Defaults to 20.

    Returns:
        `path`, as a `str`.

    Example:

    >>> cf = np.random.uniform(0.2, 1.0, size=1000)
    >>> plot_compute_histogram(cf, "/tmp/compute_hist.png")
    '/tmp/compute_hist.png'
    """
    cf = _finite_array(compute_fraction, "compute_fraction", ndim=1)
    cf = _check_range(cf, "compute_fraction")
    if not isinstance(bins, numbers.Integral) or isinstance(bins, bool) or (
        bins < 1
    ):
        raise ValueError(
            f"`bins` must be a positive integer. Received: bins={bins!r}"
        )
    mean = float(np.mean(cf))

    fig = _new_figure((6.4, 4.2))
    ax = fig.add_subplot(1, 1, 1)
    ax.hist(
        cf,
        bins=np.linspace(0.0, 1.0, int(bins) + 1),
        color="tab:blue",
        edgecolor="white",
    )
    ax.axvline(mean, color="tab:red", linestyle="--", linewidth=2,
               label=f"mean {mean:.2f}")
    ax.set_xlim(0.0, 1.0)
    ax.set_xlabel(COMPUTE_LABEL)
    ax.set_ylabel("number of images")
    ax.set_title(title if title is not None
                 else f"Per-image compute (N={cf.size})")
    ax.legend(loc="upper left")
    ax.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    return _save_figure(fig, path)


def plot_extreme_images(
    images,
    labels,
    predictions,
    compute_fraction,
    path,
    *,
    class_names=None,
    n=16,
):
    """Plots the images that received the least and the most compute.

    The figure has two panels: the `n` images with the smallest compute
    fraction (ascending) and the `n` with the largest (descending). Each
    thumbnail is titled with its true label, the prediction and the compute
    fraction; the title is red when the prediction is wrong. With fewer than
    `n` images, `min(n, N)` are shown in each panel (the panels then
    overlap).

    Args:
        images: Array of shape (N, H, W, C) with C in {1, 3} (or (N, H, W)
            for greyscale), float values in [0, 1]. Greyscale images are
            shown with the `gray` colormap.
        labels: True class ids, shape (N,) (one-hot (N, K) also accepted).
        predictions: Predicted class ids, shape (N,) (per-class scores
            (N, K) also accepted; their argmax is used).
        compute_fraction: Per-image compute fractions, shape (N,), in [0, 1].
        path: Output image path; its parent directory must exist.
        class_names: Optional sequence mapping class ids to names.
        n: Number of images per panel. Defaults to 16.

    Returns:
        `path`, as a `str`.

    Example:

    >>> x = np.random.uniform(size=(100, 32, 32, 3))
    >>> y = np.random.randint(0, 10, size=100)
    >>> p = np.random.randint(0, 10, size=100)
    >>> cf = np.random.uniform(0.2, 1.0, size=100)
    >>> plot_extreme_images(x, y, p, cf, "/tmp/extremes.png", n=8)
    '/tmp/extremes.png'
    """
    imgs = _finite_array(images, "images", dtype=np.float32)
    if imgs.ndim == 3:
        imgs = imgs[..., None]
    if imgs.ndim != 4 or imgs.shape[-1] not in (1, 3):
        raise ValueError(
            "`images` must have shape (N, H, W, C) with C in {1, 3}. "
            f"Received: images with shape {imgs.shape}"
        )
    imgs = _check_range(imgs, "images")
    num = imgs.shape[0]
    cf = _finite_array(compute_fraction, "compute_fraction", ndim=1)
    if cf.shape[0] != num:
        raise ValueError(
            f"`compute_fraction` must have one entry per image ({num}). "
            f"Received: compute_fraction with length {cf.shape[0]}"
        )
    cf = _check_range(cf, "compute_fraction")
    y_true = _class_indices(labels, "labels", num)
    y_pred = _class_indices(predictions, "predictions", num)
    if not isinstance(n, numbers.Integral) or isinstance(n, bool) or n < 1:
        raise ValueError(f"`n` must be a positive integer. Received: n={n!r}")
    if class_names is not None:
        class_names = [str(c) for c in class_names]
        hi = int(max(y_true.max(), y_pred.max()))
        lo = int(min(y_true.min(), y_pred.min()))
        if lo < 0 or hi >= len(class_names):
            raise ValueError(
                f"Class ids must index `class_names` (0..."
                f"{len(class_names) - 1}); found ids in [{lo}, {hi}]. "
                f"Received: class_names={class_names!r}"
            )

    def name_of(c):
        return class_names[c] if class_names is not None else str(c)

    m = min(int(n), num)
    order = np.argsort(cf, kind="stable")
    panels = [
        (f"Least compute ({m} of {num} images)", order[:m]),
        (f"Most compute ({m} of {num} images)", order[::-1][:m]),
    ]
    cols = min(m, 8)
    rows = math.ceil(m / cols)
    cell_w, cell_h = 1.7, 2.2
    fig = _new_figure((max(cols * cell_w, 5.0), 2 * (rows * cell_h + 0.5)))
    subfigs = fig.subfigures(2, 1)
    grey = imgs.shape[-1] == 1
    for subfig, (heading, idx) in zip(subfigs, panels):
        subfig.suptitle(heading, fontsize=12, fontweight="bold")
        axes = np.atleast_1d(subfig.subplots(rows, cols, squeeze=False)).ravel()
        for ax in axes:
            ax.axis("off")
        for ax, i in zip(axes, idx):
            if grey:
                ax.imshow(imgs[i, ..., 0], cmap="gray", vmin=0.0, vmax=1.0)
            else:
                ax.imshow(imgs[i])
            wrong = y_true[i] != y_pred[i]
            ax.set_title(
                f"true: {name_of(y_true[i])}\n"
                f"pred: {name_of(y_pred[i])}\n"
                f"compute: {cf[i]:.2f}",
                fontsize=7,
                color="red" if wrong else "black",
            )
    return _save_figure(fig, path)


def plot_accuracy_vs_compute(curves, path, *, title=None, reference=None):
    """Plots accuracy against compute fraction for one or more methods.

    Args:
        curves: Dict mapping a curve name to a non-empty list of
            `(compute_fraction, accuracy)` points, both in [0, 1]. Points
            are sorted by compute fraction and drawn as a line with markers.
            Accuracy is displayed in percent.
        path: Output image path; its parent directory must exist.
        title: Optional figure title.
        reference: Optional dict mapping a name to a single
            `(compute_fraction, accuracy)` point (e.g. the full network),
            drawn as a star.

    Returns:
        `path`, as a `str`.

    Example:

    >>> curves = {"RNP": [(0.3, 0.86), (0.5, 0.90), (0.8, 0.92)]}
    >>> plot_accuracy_vs_compute(curves, "/tmp/acc.png",
    ...                          reference={"full network": (1.0, 0.93)})
    '/tmp/acc.png'
    """
    if not isinstance(curves, dict) or not curves:
        raise ValueError(
            "`curves` must be a non-empty dict name -> list of "
            f"(compute_fraction, accuracy). Received: curves={curves!r}"
        )
    parsed = []
    for name, points in curves.items():
        arg = f"curves[{name!r}]"
        pts = _finite_array(points, arg, ndim=2)
        if pts.shape[1] != 2:
            raise ValueError(
                f"`{arg}` must be a list of (compute_fraction, accuracy) "
                f"pairs. Received: {arg} with shape {pts.shape}"
            )
        pts = _check_range(pts, arg, hint=_FRACTION_HINT)
        pts = pts[np.argsort(pts[:, 0], kind="stable")]
        parsed.append((str(name), pts))
    refs = []
    if reference is not None:
        if not isinstance(reference, dict):
            raise ValueError(
                "`reference` must be a dict name -> (compute_fraction, "
                f"accuracy). Received: reference={reference!r}"
            )
        for name, point in reference.items():
            arg = f"reference[{name!r}]"
            pt = _finite_array(point, arg, ndim=1)
            if pt.shape[0] != 2:
                raise ValueError(
                    f"`{arg}` must be a single (compute_fraction, accuracy) "
                    f"pair. Received: {arg}={point!r}"
                )
            refs.append(
                (str(name), _check_range(pt, arg, hint=_FRACTION_HINT))
            )

    crowded = len(parsed) + len(refs) > 6  # then the legend goes beside the axes
    fig = _new_figure((9.6, 4.8) if crowded else (6.4, 4.6))
    ax = fig.add_subplot(1, 1, 1)
    markers = "osD^vP"  # 20 colours x 6 markers: no two curves look alike
    cycle = plt_colors(len(parsed) + len(refs))
    for i, (name, pts) in enumerate(parsed):
        ax.plot(pts[:, 0], 100.0 * pts[:, 1], marker=markers[i // 10 % len(markers)], color=cycle[i], label=name)
    for j, (name, pt) in enumerate(refs):
        ax.plot([pt[0]], [100.0 * pt[1]], marker="*", markersize=15, color=cycle[len(parsed) + j],
                linestyle="none", label=name)
    ax.set_xlabel(COMPUTE_LABEL)
    ax.set_ylabel("accuracy (%)")
    if title is not None:
        ax.set_title(title)
    ax.grid(True, alpha=0.3)
    if crowded:
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small")
    else:
        ax.legend(loc="best")
    fig.tight_layout()
    return _save_figure(fig, path)


def plot_differences(groups, path, *, title=None, ylabel="difference", threshold=None):
    """Plots per-seed differences by group, with each group's mean and standard error.

    One column per group: every value as a dot (spread sideways so equal
    values stay visible), the mean as a bar, and the mean's standard error
    as a whisker. Use it where a mean over few seeds hides how noisy they
    are, e.g. the gap between two methods at several settings.

    Args:
        groups: Dict mapping a group label to a non-empty list of finite
            numbers (one per seed), drawn left to right in dict order.
        path: Output image path; its parent directory must exist.
        title: Optional figure title.
        ylabel: Label of the value axis. Defaults to "difference".
        threshold: Optional finite number drawn as a dashed horizontal line
            (a target the means are held to).

    Returns:
        `path`, as a `str`.

    Example:

    >>> plot_differences({"p=-0.1": [1.2, -0.4, 2.0]}, "/tmp/gaps.png",
    ...                  ylabel="gap (points)", threshold=1.0)
    '/tmp/gaps.png'
    """
    if not isinstance(groups, dict) or not groups:
        raise ValueError(f"`groups` must be a non-empty dict label -> list of numbers. Received: groups={groups!r}")
    parsed = [(str(label), _finite_array(values, f"groups[{label!r}]", ndim=1)) for label, values in groups.items()]
    if threshold is not None and (
        isinstance(threshold, bool) or not isinstance(threshold, numbers.Real) or not math.isfinite(threshold)
    ):
        raise ValueError(f"`threshold` must be a finite number or None. Received: threshold={threshold!r}")

    fig = _new_figure((1.4 * len(parsed) + 2.4, 4.6))
    ax = fig.add_subplot(1, 1, 1)
    for i, (label, values) in enumerate(parsed):
        spread = np.linspace(-0.15, 0.15, values.size) if values.size > 1 else np.zeros(1)
        ax.plot(i + spread, values, "o", color="tab:blue", alpha=0.6, label="one seed" if i == 0 else None)
        mean = float(values.mean())
        error = float(values.std(ddof=1) / math.sqrt(values.size)) if values.size > 1 else 0.0
        ax.errorbar([i], [mean], yerr=[error], fmt="_", markersize=28, capsize=6, color="black",
                    label="mean ± standard error" if i == 0 else None)
    ax.axhline(0.0, color="grey", linewidth=0.8)
    if threshold is not None:
        ax.axhline(float(threshold), color="tab:red", linestyle="--", label=f"target {threshold:g}")
    ax.set_xticks(range(len(parsed)))
    ax.set_xticklabels([f"{label}\n(n={values.size})" for label, values in parsed])
    ax.set_xlim(-0.6, len(parsed) - 0.4)
    ax.set_ylabel(ylabel)
    if title is not None:
        ax.set_title(title)
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(loc="best", fontsize="small")
    fig.tight_layout()
    return _save_figure(fig, path)


def plt_colors(n):
    """`n` distinct colours: matplotlib's tab10, then tab20's lighter shades."""
    import matplotlib

    base = list(matplotlib.colormaps["tab10"].colors)
    light = list(matplotlib.colormaps["tab20"].colors)[1::2]
    colours = base + light
    return [colours[i % len(colours)] for i in range(n)]


def plot_action_histogram(shares, path, *, layer_names=None, title=None):
    """Plots, per prunable layer, the share of images taking each action.

    Action `a` (1..k) means that `a` of the layer's `k` channel groups are
    computed. Each layer is one bar, stacked by action.

    Args:
        shares: Array-like of shape (num_layers, k); row `l` holds the share
            of each action at layer `l` and must sum to 1.
        path: Output image path; its parent directory must exist.
        layer_names: Optional sequence of `num_layers` names for the x axis.
            Defaults to `"L1"`, `"L2"`, ...
        title: Optional figure title.

    Returns:
        `path`, as a `str`.

    Example:

    >>> shares = np.array([[0.1, 0.2, 0.3, 0.4], [0.4, 0.3, 0.2, 0.1]])
    >>> plot_action_histogram(shares, "/tmp/actions.png")
    '/tmp/actions.png'
    """
    s = _finite_array(shares, "shares", ndim=2)
    if np.any(s < -_RANGE_TOL):
        raise ValueError(
            f"`shares` must be non-negative. Received: shares={_short(s)}"
        )
    row_sums = s.sum(axis=1)
    if not np.allclose(row_sums, 1.0, atol=1e-3):
        raise ValueError(
            "Each row of `shares` (one per layer) must sum to 1. Received: "
            f"shares with row sums {_short(row_sums)}"
        )
    num_layers, k = s.shape
    if layer_names is None:
        layer_names = [f"L{i + 1}" for i in range(num_layers)]
    else:
        layer_names = [str(x) for x in layer_names]
        if len(layer_names) != num_layers:
            raise ValueError(
                f"`layer_names` must have one entry per layer ({num_layers})."
                f" Received: layer_names={layer_names!r}"
            )

    from matplotlib import colormaps

    cmap = colormaps["viridis"]
    fig = _new_figure((max(6.4, 0.5 * num_layers + 3.0), 4.4))
    ax = fig.add_subplot(1, 1, 1)
    x = np.arange(num_layers)
    bottom = np.zeros(num_layers)
    for a in range(k):
        color = cmap(a / max(k - 1, 1))
        ax.bar(x, s[:, a], bottom=bottom, color=color, width=0.8,
               label=f"{a + 1}/{k} groups")
        bottom += s[:, a]
    ax.set_xticks(x)
    ax.set_xticklabels(layer_names, rotation=45 if num_layers > 12 else 0,
                       ha="right" if num_layers > 12 else "center")
    ax.set_ylim(0.0, 1.0)
    ax.set_xlabel("prunable layer")
    ax.set_ylabel("share of images")
    ax.set_title(title if title is not None else "Actions per layer")
    ax.legend(title="action", loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.tight_layout()
    return _save_figure(fig, path)


# ---------------------------------------------------------------------------
# Tables.
# ---------------------------------------------------------------------------


def _is_number(v):
    return isinstance(v, numbers.Number) and not isinstance(v, (bool,
                                                                np.bool_))


def _format_cell(v):
    if v is None:
        return ""
    if isinstance(v, (bool, np.bool_)):
        return str(bool(v))
    if isinstance(v, numbers.Integral):
        return str(int(v))
    if isinstance(v, numbers.Real):
        return f"{float(v):.4g}"
    return str(v)


def _escape(text):
    return text.replace("|", "\\|").replace("\r\n", " ").replace("\n", " ")


def format_table(rows, columns):
    """Formats rows of dicts as a GitHub-Markdown table.

    Cells are padded so the table is also readable on a console. Floats are
    written with 4 significant digits (`"{:.4g}"`), integers as integers,
    missing keys and `None` as empty cells; `|` in text is escaped. Columns
    whose values are all numbers are right-aligned (`---:`), the others
    left-aligned. The result has no trailing newline.

    Args:
        rows: List of dicts (one per table row).
        columns: Ordered list of the keys to show (also the header).

    Returns:
        The table as a `str`.

    Example:

    >>> print(format_table([{"model": "rnp", "acc": 0.912345, "k": 4}],
    ...                    ["model", "acc", "k"]))
    | model |    acc |   k |
    | ----- | -----: | --: |
    | rnp   | 0.9123 |   4 |
    """
    if isinstance(columns, (str, bytes)) or not isinstance(
        columns, (list, tuple)
    ) or not columns:
        raise ValueError(
            "`columns` must be a non-empty list of keys. Received: "
            f"columns={columns!r}"
        )
    if isinstance(rows, dict) or not isinstance(rows, (list, tuple)):
        raise ValueError(
            f"`rows` must be a list of dicts. Received: rows={rows!r}"
        )
    for i, r in enumerate(rows):
        if not isinstance(r, dict):
            raise ValueError(
                f"`rows` must be a list of dicts; row {i} is a "
                f"{type(r).__name__}. Received: rows[{i}]={r!r}"
            )
    header = [_escape(str(c)) for c in columns]
    body = [[_escape(_format_cell(r.get(c))) for c in columns] for r in rows]
    numeric = []
    for c in columns:
        vals = [r[c] for r in rows if r.get(c) is not None]
        numeric.append(bool(vals) and all(_is_number(v) for v in vals))
    widths = [
        max([3, len(h)] + [len(line[j]) for line in body])
        for j, h in enumerate(header)
    ]

    def fmt_line(cells):
        out = []
        for j, cell in enumerate(cells):
            out.append(cell.rjust(widths[j]) if numeric[j]
                       else cell.ljust(widths[j]))
        return "| " + " | ".join(out) + " |"

    sep = [
        ("-" * (w - 1) + ":") if num else "-" * w
        for w, num in zip(widths, numeric)
    ]
    lines = [fmt_line(header), "| " + " | ".join(sep) + " |"]
    lines += [fmt_line(line) for line in body]
    return "\n".join(lines)
