"""The figures: the report's accuracy plots (points the report prepares: `Point`, `Series`)
and a picture of dark knowledge, one sample's teacher distribution at several temperatures
beside its input, read from a cache (the classic "a 7 that looks like a 1" figure of Hinton
et al. 2015).

A higher T flattens softmax(t / T) and shows how the teacher ranks the wrong classes: the
information a student gets from soft targets and not from labels.

Every plot follows three rules: each point carries a label, no marker hides another
(coincident points are drawn a little apart, in shapes of their own), and accuracy is a
fraction everywhere, as in the metrics files.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.core.errors import PipelineError
from pipeline.student.losses import LOSSES

DEFAULT_TEMPERATURES = (1.0, 4.0, 8.0)
# Built-in losses take their place in LOSSES in both tuples; user losses a hash of the name,
# so a loss looks the same in every plot and every run.
MARKERS = ("o", "v", "P", "s", "^", "X", "D", "h", "<", ">")
USER_LOSS_COLORS = (
    "#393b79",
    "#637939",
    "#8c6d31",
    "#843c39",
    "#7b4173",
    "#5254a3",
    "#8ca252",
    "#bd9e39",
    "#ad494a",
    "#a55194",
)
# Points at one x are drawn this many decades apart on a log axis, at most SPREAD_SPAN in all.
SPREAD_DECADES, SPREAD_SPAN = 0.02, 0.15
LABEL_FONT = 7.5  # points
LABEL_GAP = 1.35  # labels of one column at least this many font heights apart
DPI = 120


@dataclass(frozen=True)
class Point:
    """One point of a plot: where it is drawn (`x` may be spread from its true `column`), its
    value (a fraction) and the label written beside it. Labels of points sharing a `column`
    are stacked in one column to the right of them, each joined to its point by a thin line."""

    x: float
    y: float
    label: str
    column: float
    color: str = "black"


@dataclass
class Series:
    """Points of one loss (colour and marker) under one legend entry; `line`: join them,
    in the line style `dashes` (one per student preset)."""

    name: str
    loss: str
    points: list[Point] = field(default_factory=list)
    line: bool = False
    dashes: int = 0


def loss_color(loss: str) -> str:
    """One colour per loss in every plot: built-in losses by their place in LOSSES, others
    (user losses) by a hash of the name, the same in every run."""
    if loss in LOSSES:
        return f"C{list(LOSSES).index(loss) % 10}"
    return USER_LOSS_COLORS[zlib.crc32(loss.encode()) % len(USER_LOSS_COLORS)]


def loss_marker(loss: str) -> str:
    """One marker shape per loss, so points of two losses stay apart even in grey."""
    if loss in LOSSES:
        return MARKERS[list(LOSSES).index(loss) % len(MARKERS)]
    return MARKERS[zlib.crc32(loss.encode()) % len(MARKERS)]


def spread_positions(
    xs: list[float], keys: list[Any], ys: list[float] | None = None, close: float = 0.0
) -> list[float]:
    """Where points are drawn on a log x axis: at their x, except that points sharing one
    are spread evenly around it in the order of `keys`, SPREAD_DECADES apart (closer when
    many share it, SPREAD_SPAN decades in all at most), so that none hides another. With
    `ys`, only points that would touch are spread: runs of points at one x whose heights are
    less than `close` apart (the others stay at their true x)."""
    drawn = [float(x) for x in xs]
    for members in _touching(drawn, ys, close):
        x = drawn[members[0]]
        if len(members) < 2 or x <= 0:
            continue
        members.sort(key=lambda i: keys[i])
        step = min(SPREAD_DECADES, SPREAD_SPAN / (len(members) - 1))
        middle = (len(members) - 1) / 2
        for k, i in enumerate(members):
            drawn[i] = x * 10 ** ((k - middle) * step)
    return drawn


def _touching(xs: list[float], ys: list[float] | None, close: float) -> list[list[int]]:
    """Indices of points sharing an x, split (when `ys` is given) where two heights in a
    row, in ascending order, are `close` or more apart."""
    shared: dict[float, list[int]] = {}
    for i, x in enumerate(xs):
        shared.setdefault(x, []).append(i)
    if ys is None:
        return list(shared.values())
    groups = []
    for members in shared.values():
        members = sorted(members, key=lambda i: ys[i])
        groups.append([members[0]])
        for prev, i in zip(members, members[1:], strict=False):
            if ys[i] - ys[prev] < close:
                groups[-1].append(i)
            else:
                groups.append([i])
    return groups


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


# The report's plots


def plot_temperature(
    series: list[Series], references: list[tuple[str, float]], title: str, path: Path
) -> Path:
    """Test accuracy against temperature: one line per series, `references` (name, accuracy:
    the CE baselines, the teacher) as horizontal lines, each point labelled with its value."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=_size([p for s in series for p in s.points]), dpi=DPI)
    _draw_series(ax, series)
    _reference_lines(ax, references)
    temps = sorted({p.column for s in series for p in s.points})
    if temps and min(temps) > 0 and max(temps) / min(temps) >= 4:
        ax.set_xscale("log", base=2)
    if temps:
        ax.set_xticks(temps, [f"{t:g}" for t in temps])
        ax.minorticks_off()
    ax.set_xlabel("temperature T (points of one T drawn side by side)")
    ax.set_ylabel("test top-1 accuracy (fraction)")
    ax.set_title(title)
    if series:
        ax.legend(title="loss", fontsize=8, loc="lower right")
    _finish(plt, fig, ax, [p for s in series for p in s.points], path)
    return path


def plot_params(
    series: list[Series], teacher: Point | None, title: str, spread: bool, path: Path
) -> Path:
    """Test accuracy against parameter count (log axis), one colour and marker per loss and
    the teacher as a star; every point labelled with its run and accuracy."""
    plt = _pyplot()
    points = [p for s in series for p in s.points] + ([] if teacher is None else [teacher])
    fig, ax = plt.subplots(figsize=_size(points), dpi=DPI)
    _draw_series(ax, series)
    if teacher is not None:
        ax.scatter([teacher.x], [teacher.y], marker="*", s=180, c="black", label="teacher")
    ax.set_xscale("log")
    _plain_ticks(ax.xaxis)
    ax.set_xlabel("parameters" + (" (models of one size drawn side by side)" if spread else ""))
    ax.set_ylabel("test top-1 accuracy (fraction)")
    ax.set_title(title)
    if points:
        ax.legend(title="loss", fontsize=8, loc="lower right")
    _finish(plt, fig, ax, points, path)
    return path


def _size(points: list[Point]) -> tuple[float, float]:
    """Figure size (inches): tall enough for the longest column of labels to stack inside
    the axes (about 70% of the figure's height)."""
    longest = max((sum(q.column == p.column for q in points) for p in points), default=0)
    return 7.2, max(4.8, longest * LABEL_GAP * LABEL_FONT / 72 / 0.7 + 0.4)


def _plain_ticks(axis) -> None:
    """Tick labels as counts (20k, 1.2M) rather than powers of ten: a log axis spanning
    less than a decade labels its minor ticks, in a notation few read at a glance."""
    from matplotlib.ticker import FuncFormatter

    def count(v: float, _pos: int) -> str:
        for scale, unit in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
            if v >= scale:
                return f"{v / scale:.3g}{unit}"
        return f"{v:.3g}"

    def minor(v: float, pos: int) -> str:
        low, high = axis.get_view_interval()
        return count(v, pos) if high < 12 * low else ""  # over a decade: powers of ten do

    axis.set_major_formatter(FuncFormatter(count))
    axis.set_minor_formatter(FuncFormatter(minor))


def _draw_series(ax, series: list[Series]) -> None:
    """Each series in its loss's colour and marker; a line through it when it is one."""
    for s in series:
        pts = sorted(s.points, key=lambda p: p.x)
        ax.plot(
            [p.x for p in pts],
            [p.y for p in pts],
            marker=loss_marker(s.loss),
            markersize=7,
            markeredgecolor="white",
            markeredgewidth=0.8,
            color=loss_color(s.loss),
            ls=["-", "--", "-.", ":"][s.dashes % 4] if s.line else "none",
            label=s.name,
            zorder=3,
        )


def _reference_lines(ax, references: list[tuple[str, float]]) -> None:
    """CE baselines (grey, dashed) and the teacher (black, dotted), named at the left."""
    for name, y in references:
        teacher = name == "teacher"
        ax.axhline(y, ls=":" if teacher else "--", c="black" if teacher else "grey", lw=1)
        ax.annotate(
            f"{name} {y:.3f}",
            (0.01, y),
            xycoords=("axes fraction", "data"),
            fontsize=8,
            va="bottom",
            color="black" if teacher else "grey",
        )


def _finish(plt, fig, ax, points: list[Point], path: Path) -> None:
    """Room for the labels, the layout fixed, then the labels (placed in pixels), saved."""
    ax.grid(alpha=0.3)
    if points:
        ax.margins(y=0.12)
        left, right = ax.get_xlim()
        # Labels go right of their column: widen the axis by a third of its span for them.
        if ax.get_xscale() == "log":
            ax.set_xlim(left, right * (right / left) ** 0.35)
        else:
            ax.set_xlim(left, right + 0.35 * (right - left))
    ax.set_ylim(ax.get_ylim())  # fixed now: labels are placed in pixels of these limits
    fig.tight_layout()
    _label_columns(ax, points)
    fig.savefig(path, dpi=DPI)
    plt.close(fig)


def _label_columns(ax, points: list[Point]) -> None:
    """Write each point's label to the right of its column of points, stacked at least
    LABEL_GAP font heights apart and as close to its point's height as that allows, joined
    to the point by a thin line: no label covers another, however close the points."""
    to_px, to_data = ax.transData.transform, ax.transData.inverted().transform
    gap = LABEL_GAP * LABEL_FONT * ax.figure.dpi / 72
    bottom, top = ax.transAxes.transform([(0, 0), (0, 1)])[:, 1]
    columns: dict[float, list[Point]] = {}
    for p in points:
        columns.setdefault(p.column, []).append(p)
    for members in columns.values():
        # Of points at one height, the leftmost gets the highest label: its line then passes
        # above the others' points, and no two lines cross.
        members.sort(key=lambda p: (p.y, -p.x, p.label))
        px = to_px([(p.x, p.y) for p in members])
        ys = _stack(list(px[:, 1]), gap, bottom + gap / 2, top - gap / 2)
        x = px[:, 0].max() + 14
        for p, (x0, y0), y in zip(members, px, ys, strict=True):
            ax.annotate(
                p.label,
                xy=to_data([(x0, y0)])[0],
                xytext=to_data([(x, y)])[0],
                fontsize=LABEL_FONT,
                va="center",
                color=p.color,
                # A light backing keeps a label readable where it lies over a line.
                bbox={"boxstyle": "square,pad=0.1", "fc": "white", "ec": "none", "alpha": 0.8},
                arrowprops={"arrowstyle": "-", "lw": 0.5, "color": "0.45", "shrinkB": 4},
            )


def _stack(wanted: list[float], gap: float, low: float, high: float) -> list[float]:
    """Heights for labels wanted at ascending `wanted`, at least `gap` apart and in
    [low, high]: labels that would overlap form a block centred on the mean of their wanted
    heights, and blocks that then overlap merge, until none do (each label stays as near
    its point as its neighbours allow)."""
    blocks = [[w] for w in wanted]  # each block: the wanted heights of its labels

    def place(block: list[float]) -> float:
        """The block's lowest label's height: centred on its points, inside the axes."""
        half = (len(block) - 1) * gap / 2
        centre = min(max(sum(block) / len(block), low + half), max(high - half, low + half))
        return centre - half

    merged = True
    while merged:
        merged = False
        for i in range(len(blocks) - 1):
            top = place(blocks[i]) + (len(blocks[i]) - 1) * gap
            if place(blocks[i + 1]) < top + gap:
                blocks[i : i + 2] = [blocks[i] + blocks[i + 1]]
                merged = True
                break
    return [place(block) + k * gap for block in blocks for k in range(len(block))]


# Dark knowledge


def softmax_at(logits: np.ndarray, temperature: float) -> np.ndarray:
    """softmax(logits / T) over the last axis, in float64.  # (..., C)"""
    z = logits.astype(np.float64) / temperature
    z -= z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def ambiguous_ids(logits: np.ndarray, ids: np.ndarray, count: int) -> list[int]:
    """The `count` sample ids whose teacher is least sure at T = 1: smallest gap between its
    top two probabilities (ties broken by id, so the choice is stable).  logits (N, C)"""
    p = np.sort(softmax_at(logits, 1.0), axis=-1)
    gap = p[:, -1] - p[:, -2]  # (N,)
    order = np.lexsort((ids, gap))
    return [int(i) for i in ids[order[:count]]]


def read_targets(cache_path: Path, ids: list[int] | None, count: int = 4) -> dict[str, Any]:
    """View 0 of the teacher's logits for sample `ids` (default: the `count` most ambiguous),
    with their labels, the class names and, when the data the cache was built from is images
    and can be loaded, their inputs (`inputs`; else None, and `inputs_note` says why)."""
    from pipeline.cache import open_cache

    with open_cache(cache_path) as cache:
        cache.require_complete()
        all_ids = cache.sample_ids
        if ids is None:
            ids = ambiguous_ids(cache.logits()[:, 0], all_ids, count)
        rows = cache.rows_for(np.asarray(ids, dtype=np.int64))
        logits = cache.logits(np.sort(rows))[:, 0]  # (n, C) in row order
        logits = logits[np.argsort(np.argsort(rows))]  # back to the order of `ids`
        labels = cache.labels[rows]
        names = cache.attrs.get("class_names") or [str(c) for c in range(cache.num_classes)]
        spec = (cache.attrs.get("data") or {}).get("spec")
    inputs, note = read_inputs(spec, list(ids), labels)
    return {"ids": list(ids), "logits": logits, "labels": labels, "class_names": names,
            "inputs": inputs, "inputs_note": note}  # fmt: skip


def read_inputs(
    spec: str | None, ids: list[int], labels: np.ndarray
) -> tuple[np.ndarray | None, str | None]:
    """The inputs of sample `ids` from data `spec` (a cache's `data.spec`), joined by sample
    id, when they are images: (inputs (n, ...), None), else (None, why not; None when the
    data is not images). The figure is drawn either way, so a failure is a note, not an error.
    `labels`: the cache's, which the data's must match (else it is other data, not shown)."""
    if not spec:
        return None, "the cache does not name its data"
    from pipeline.data import load_transfer_set

    try:
        ts = load_transfer_set(spec, lazy=True)  # lazy: read only the rows shown
    except Exception as e:  # a user's source may raise anything: the bars stand without it
        return None, f"data {spec} could not be loaded ({str(e).splitlines()[0][:120]})"
    if not is_image_shape(ts.input_shape):
        return None, None
    order = np.argsort(ts.sample_ids)
    at = np.searchsorted(ts.sample_ids, ids, sorter=order).clip(0, len(order) - 1)
    rows = order[at]
    wanted = np.asarray(ids, dtype=np.int64)
    if not np.array_equal(ts.sample_ids[rows], wanted):
        return None, f"data {spec} lacks some of these sample ids"
    known = (labels >= 0) & (ts.labels[rows] >= 0)
    if np.any(ts.labels[rows][known] != labels[known]):
        return None, f"data {spec} now labels these samples otherwise than the cache"
    return np.asarray(ts.inputs[rows], dtype=np.float32), None


def is_image_shape(shape: tuple[int, ...]) -> bool:
    """Whether inputs of this per-sample shape are pictures: (H, W), or (C, H, W) with 1 or
    3 channels, each side at least 4 pixels."""
    if len(shape) == 3 and shape[0] in (1, 3):
        shape = shape[1:]
    return len(shape) == 2 and min(shape) >= 4


# Figure files by extension: what matplotlib writes for each.
IMAGE_FORMATS = {".png": "png", ".pdf": "pdf", ".svg": "svg", ".jpg": "jpg", ".jpeg": "jpg"}


def image_format(out: Path) -> str:
    """The image format `out`'s extension names; any other extension is refused, never
    filled with PNG bytes under a name that promises something else."""
    fmt = IMAGE_FORMATS.get(Path(out).suffix.lower())
    if fmt is None:
        raise PipelineError(f"--out {out}: expected one of {', '.join(IMAGE_FORMATS)}")
    return fmt


def plot_targets(
    targets: dict[str, Any], temperatures: tuple[float, ...], out: Path, fmt: str = "png"
) -> Path:
    """One row per sample: its input (when `targets` has them) beside its class
    probabilities at each temperature, as grouped bars, written to `out` as `fmt`."""
    if not temperatures or any(not np.isfinite(t) or t <= 0 for t in temperatures):
        raise PipelineError(f"--temperatures {list(temperatures)}: each must be > 0")
    plt = _pyplot()
    n, names = len(targets["ids"]), targets["class_names"]
    inputs = targets.get("inputs")
    cols = 1 if inputs is None else 2
    fig, axes = plt.subplots(
        n, cols, figsize=(max(6.4, 0.5 * len(names)) + 1.6 * (cols - 1), 2.4 * n),
        squeeze=False, width_ratios=[1, 5][-cols:],
    )  # fmt: skip
    for i, (sid, z, y) in enumerate(
        zip(targets["ids"], targets["logits"], targets["labels"], strict=True)
    ):
        if inputs is not None:
            _draw_input(axes[i, 0], inputs[i], sid)
        label = names[y] if y >= 0 else "unknown"
        title = f"sample id {sid}: label {label}, teacher's top class {names[int(z.argmax())]}"
        _draw_bars(axes[i, -1], z, names, temperatures, title)
    axes[0, -1].legend(fontsize=8)
    axes[-1, -1].set_xlabel("class")
    if targets.get("inputs_note"):
        fig.text(0.01, 0.002, f"Inputs not shown: {targets['inputs_note']}.", fontsize=7,
                 va="bottom", color="0.35")  # fmt: skip
    fig.tight_layout(rect=(0, 0.02 if targets.get("inputs_note") else 0, 1, 1))
    fig.savefig(out, dpi=110, format=fmt)
    plt.close(fig)
    return out


def _draw_bars(ax, z: np.ndarray, names: list[str], temperatures, title: str) -> None:
    """One bar per class and temperature: softmax(z / T), a probability (a fraction)."""
    width = 0.8 / len(temperatures)
    x = np.arange(len(names))
    for i, t in enumerate(temperatures):
        ax.bar(x + (i - (len(temperatures) - 1) / 2) * width, softmax_at(z, t), width,
               label=f"T = {t:g}")  # fmt: skip
    ax.set_title(title, fontsize=9)
    ax.set_xticks(x, [str(c) for c in names], fontsize=8)
    ax.set_ylim(0, 1)
    ax.set_ylabel("probability")


def _draw_input(ax, x: np.ndarray, sid: int) -> None:
    """A sample's input as the picture it is: grey for one channel, colour for three (each
    scaled to its own range, since inputs may be normalised)."""
    img = x[0] if x.ndim == 3 and x.shape[0] == 1 else x
    if img.ndim == 3:
        img = np.moveaxis(img, 0, -1)
        img = (img - img.min()) / max(float(img.max() - img.min()), 1e-12)
        ax.imshow(img, interpolation="nearest")
    else:
        ax.imshow(img, cmap="gray", interpolation="nearest")
    ax.set_title(f"input {sid}", fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])
