"""Static figures and a small HTML index for evaluation reports.

Every plotting function builds a :class:`matplotlib.figure.Figure` directly and
renders it through the Agg canvas, so the module never touches pyplot's global
state or an interactive backend. Each function writes one PNG and returns its
path; parent folders are created as needed.

Conventions follow :mod:`trainer.metrics`: label ``1`` is anomalous, higher
scores are more anomalous, and a threshold ``t`` flags a sample as anomalous
iff ``score > t``.
"""

from __future__ import annotations

import html
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib import cm, colors
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

__all__ = [
    "plot_score_distributions",
    "plot_heatmap_grid",
    "plot_roc_curves",
    "write_html_index",
]

DPI = 110
NORMAL_COLOR = "#2ca02c"  # green
ANOMALOUS_COLOR = "#d62728"  # red
THRESHOLD_COLOR = "black"
MIXED_ROW = "mixed"

# Vertical layout of one class row in the score-distribution plot (data units,
# rows are spaced 1 apart): normal points above the row centre, anomalous below.
_GROUP_OFFSET = 0.2
_JITTER = 0.09
_SEED = 0  # fixed jitter so repeated renders are identical

# Heat-map grid geometry, in inches.
_PANEL = 2.0  # width of one image panel
_BAR_WIDTH = 1.0  # colour bar with its ticks and label
_CELL_GAP = 0.08  # gap between samples, as a fraction of a sample's width


# ---------------------------------------------------------------------------
# Shared helpers
# ---------------------------------------------------------------------------


def _save(fig: Figure, path: str | Path) -> Path:
    """Renders ``fig`` to a PNG at ``path`` with the Agg canvas and releases it."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.savefig(out, dpi=DPI, format="png")
    fig.clear()
    return out


def _as_1d(values, name: str, size: int | None = None) -> np.ndarray:
    """Returns ``values`` as a 1-D array, checking its length when given."""
    arr = np.asarray(values).ravel()
    if size is not None and arr.size != size:
        raise ValueError(f"{name} must have {size} entries, got {arr.size}")
    return arr


# ---------------------------------------------------------------------------
# Score distributions
# ---------------------------------------------------------------------------


def _row_groups(labels: np.ndarray, classes: np.ndarray) -> list[tuple[str, np.ndarray]]:
    """Lists (row name, sample mask) pairs: one per class, then a pooled row.

    The pooled row is only added when there is more than one class, since it
    would repeat the single class row otherwise.
    """
    names = [str(c) for c in np.unique(classes)]
    rows = [(name, classes == name) for name in names]
    if len(rows) > 1:
        rows.append((MIXED_ROW, np.ones(labels.size, dtype=bool)))
    return rows


def _marker_size(n_points: int) -> float:
    """Scatter marker area that stays readable from a handful to thousands of points."""
    return float(np.clip(2000.0 / max(n_points, 1), 3.0, 18.0))  # area in pt^2


def _draw_group(ax, scores: np.ndarray, y: float, color: str, rng) -> None:
    """Draws one jittered strip with its interquartile bar and median tick."""
    scores = scores[np.isfinite(scores)]
    if scores.size == 0:
        return
    jitter = rng.uniform(-_JITTER, _JITTER, scores.size)
    ax.scatter(scores, y + jitter, s=_marker_size(scores.size), color=color,
               alpha=0.55, linewidths=0, zorder=2)  # translucent: overlaps stay visible
    q1, median, q3 = np.percentile(scores, [25, 50, 75])  # quartiles
    # Pale thick bar behind the points for the IQR, bold tick on top for the median.
    ax.plot([q1, q3], [y, y], color=color, linewidth=7, alpha=0.3,
            solid_capstyle="butt", zorder=1)
    ax.plot([median], [y], marker="|", markersize=14, color=color,
            markeredgewidth=2, zorder=3)


def _error_text(scores: np.ndarray, is_anomalous: np.ndarray, threshold: float) -> str:
    """Summarises false rejects and escapes of ``score > threshold`` as counts."""
    normal, anomalous = scores[~is_anomalous], scores[is_anomalous]
    rejected = int(np.count_nonzero(normal > threshold))
    escaped = int(np.count_nonzero(anomalous <= threshold))
    return f"FR {rejected}/{normal.size}\nesc {escaped}/{anomalous.size}"


def _draw_mode(ax, scores, labels, rows, threshold, rng) -> None:
    """Fills one column: a normal and an anomalous strip per row on a shared x axis."""
    is_anomalous = labels == 1
    for index, (_, mask) in enumerate(rows):
        y = -index  # first row on top
        _draw_group(ax, scores[mask & ~is_anomalous], y + _GROUP_OFFSET, NORMAL_COLOR, rng)
        _draw_group(ax, scores[mask & is_anomalous], y - _GROUP_OFFSET, ANOMALOUS_COLOR, rng)
        if threshold is not None:
            ax.text(1.01, y, _error_text(scores[mask], is_anomalous[mask], threshold),
                    transform=ax.get_yaxis_transform(), fontsize=7, va="center",
                    ha="left", family="monospace")
    if len(rows) > 1 and rows[-1][0] == MIXED_ROW:
        ax.axhline(-(len(rows) - 1.5), color="0.6", linewidth=0.8)  # separates pooled row
    if threshold is not None:
        ax.axvline(threshold, color=THRESHOLD_COLOR, linestyle="--", linewidth=1.2, zorder=4)
    ax.grid(axis="x", color="0.9", linewidth=0.6)
    ax.set_axisbelow(True)


def _distribution_legend(fig: Figure, with_threshold: bool) -> None:
    """Adds one figure-level legend below the columns."""
    handles = [
        _legend_marker(NORMAL_COLOR, "normal (label 0)"),
        _legend_marker(ANOMALOUS_COLOR, "anomalous (label 1)"),
    ]
    if with_threshold:
        handles.append(_legend_line("threshold (anomalous iff score > t)"))
    fig.legend(handles=handles, loc="outside lower center", ncol=len(handles),
               fontsize=8, frameon=False)


def _legend_marker(color: str, label: str) -> Line2D:
    """Returns a round legend handle in ``color``."""
    return Line2D([], [], marker="o", linestyle="none", color=color, label=label)


def _legend_line(label: str) -> Line2D:
    """Returns a dashed black legend handle for a threshold line."""
    return Line2D([], [], linestyle="--", color=THRESHOLD_COLOR, label=label)


def plot_score_distributions(
    scores_by_mode: Mapping[str, np.ndarray],
    labels: np.ndarray,
    classes: np.ndarray,
    path: str | Path,
    threshold_by_mode: Mapping[str, float] | None = None,
    title: str | None = None,
) -> Path:
    """Plots per-class normal/anomalous image-score strips for each calibration mode.

    One column per mode (in dict order). Within a column every class gets a
    row with its normal scores (green, upper strip) and anomalous scores (red,
    lower strip) along the mode's shared x axis, and a final ``mixed`` row
    pools all classes. Each strip shows the jittered scores, the interquartile
    range as a pale bar and the median as a tick. When a threshold is given
    for a mode it is drawn as a dashed vertical line and every row is annotated
    with its false rejects (``FR``) and escapes (``esc``) at that threshold.
    Aligned normal strips across rows mean one threshold serves all classes.

    Args:
        scores_by_mode: Mode name -> ``(N,)`` image scores, e.g. ``"none"`` for
            raw scores and calibrated variants after it.
        labels: ``(N,)`` ints, 0 normal / 1 anomalous.
        classes: ``(N,)`` class names.
        path: Output PNG path.
        threshold_by_mode: Optional mode name -> threshold; modes missing from
            it are drawn without a threshold.
        title: Optional figure title.

    Returns:
        The path of the written PNG.

    Raises:
        ValueError: If no mode is given or array lengths disagree.
    """
    if not scores_by_mode:
        raise ValueError("scores_by_mode must contain at least one mode")
    labels = _as_1d(labels, "labels").astype(int)
    classes = _as_1d(classes, "classes", labels.size).astype(str)
    thresholds = dict(threshold_by_mode or {})
    rows = _row_groups(labels, classes)
    fig = _distribution_figure(len(scores_by_mode), len(rows))
    axes = fig.subplots(1, len(scores_by_mode), sharey=True, squeeze=False)[0]
    rng = np.random.default_rng(_SEED)
    for ax, (mode, scores) in zip(axes, scores_by_mode.items()):
        scores = _as_1d(scores, f"scores for mode {mode!r}", labels.size).astype(float)
        _draw_mode(ax, scores, labels, rows, thresholds.get(mode), rng)
        ax.set_title(str(mode))
        ax.set_xlabel("image score")
    _label_rows(axes[0], rows, labels)
    _distribution_legend(fig, any(m in thresholds for m in scores_by_mode))
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def _distribution_figure(n_modes: int, n_rows: int) -> Figure:
    """Creates a figure sized for ``n_modes`` columns of ``n_rows`` class rows."""
    width = 1.6 + 4.4 * n_modes  # inches: row labels + one column per mode
    height = 1.9 + 0.75 * n_rows  # inches: title/legend + one strip pair per row
    return Figure(figsize=(width, height), layout="constrained")


def _label_rows(ax, rows, labels: np.ndarray) -> None:
    """Names each row on the shared y axis with its normal/anomalous counts."""
    ticks = [-index for index in range(len(rows))]
    names = []
    for name, mask in rows:
        n_anomalous = int(np.count_nonzero(labels[mask] == 1))
        names.append(f"{name}\n{mask.sum() - n_anomalous} ok / {n_anomalous} ng")
    ax.set_yticks(ticks, names, fontsize=8)
    ax.set_ylim(-(len(rows) - 0.5), 0.5)  # half a row of margin at both ends


# ---------------------------------------------------------------------------
# Heat-map grid
# ---------------------------------------------------------------------------


def _check_heatmap_inputs(images, maps, masks, titles) -> tuple:
    """Validates and converts the inputs of :func:`plot_heatmap_grid`."""
    images, maps = np.asarray(images), np.asarray(maps, dtype=float)
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"images must have shape (N, H, W, 3), got {images.shape}")
    if maps.shape != images.shape[:3]:
        raise ValueError(
            f"maps must have shape (N, H, W) matching images {images.shape[:3]}, "
            f"got {maps.shape}"
        )
    if images.shape[0] == 0:
        raise ValueError("images must contain at least one sample")
    if masks is not None:
        masks = np.asarray(masks, dtype=bool)
        if masks.shape != maps.shape:
            raise ValueError(f"masks must have shape {maps.shape}, got {masks.shape}")
    if titles is not None and len(titles) != images.shape[0]:
        raise ValueError(f"titles must have {images.shape[0]} entries, got {len(titles)}")
    return images, maps, masks, titles


def _colour_limits(maps: np.ndarray, vmin: float, vmax: float | None) -> tuple[float, float]:
    """Returns a valid (vmin, vmax); vmax defaults to the 99th percentile of all maps."""
    if vmax is None:
        finite = maps[np.isfinite(maps)]
        # 99th percentile: a few extreme pixels must not wash out every other map.
        vmax = float(np.percentile(finite, 99)) if finite.size else vmin + 1.0
    if not vmax > vmin:
        vmax = vmin + 1e-6  # degenerate (constant) maps still need a non-empty range
    return float(vmin), float(vmax)


def _draw_mask(ax, mask: np.ndarray | None) -> None:
    """Outlines a ground-truth mask; an empty mask draws nothing."""
    if mask is not None and mask.any():
        ax.contour(mask.astype(float), levels=[0.5], colors="white", linewidths=1.2)


def _draw_sample(subfig, image, amap, mask, title, norm, alpha) -> None:
    """Draws one sample as an image panel and an overlay panel inside ``subfig``."""
    ax_image, ax_map = subfig.subplots(1, 2)
    ax_image.imshow(image)
    ax_map.imshow(image)
    ax_map.imshow(amap, cmap="jet", norm=norm, alpha=alpha)
    for ax in (ax_image, ax_map):
        _draw_mask(ax, mask)
        ax.set_xticks([])
        ax.set_yticks([])
    if title:
        subfig.suptitle(str(title), fontsize=9)


def plot_heatmap_grid(
    images: np.ndarray,
    maps: np.ndarray,
    path: str | Path,
    masks: np.ndarray | None = None,
    titles: Sequence[str] | None = None,
    vmin: float = 0.0,
    vmax: float | None = None,
    columns: int = 4,
    alpha: float = 0.5,
) -> Path:
    """Plots each sample next to its anomaly-map overlay on one shared colour scale.

    Samples fill a grid ``columns`` wide, row by row; each cell holds the
    image and the image overlaid with its map (jet colormap) under the
    sample's title. Ground-truth masks, when given, are outlined in white on
    both panels. A single colour bar on the right gives the common
    ``[vmin, vmax]`` scale, so maps are comparable across samples.

    Args:
        images: ``(N, H, W, 3)`` uint8 images.
        maps: ``(N, H, W)`` float anomaly maps.
        path: Output PNG path.
        masks: Optional ``(N, H, W)`` boolean ground-truth masks.
        titles: Optional ``N`` titles, e.g. ``"pcb defect score 1.83 FAIL"``.
        vmin: Lower end of the colour scale.
        vmax: Upper end of the colour scale; defaults to the 99th percentile
            of all map values.
        columns: Samples per grid row.
        alpha: Opacity of the map overlay.

    Returns:
        The path of the written PNG.

    Raises:
        ValueError: If shapes disagree, there are no samples, or ``columns``
            is not positive.
    """
    images, maps, masks, titles = _check_heatmap_inputs(images, maps, masks, titles)
    if columns < 1:
        raise ValueError(f"columns must be positive, got {columns}")
    count = images.shape[0]
    n_cols = min(columns, count)
    n_rows = -(-count // n_cols)  # ceiling division
    norm = colors.Normalize(*_colour_limits(maps, vmin, vmax))
    fig = _heatmap_figure(n_rows, n_cols, images.shape[1] / images.shape[2])
    grid_width = fig.get_figwidth() - _BAR_WIDTH
    grid_fig, bar_fig = fig.subfigures(1, 2, width_ratios=[grid_width, _BAR_WIDTH])
    cells = grid_fig.subfigures(n_rows, n_cols, squeeze=False, wspace=_CELL_GAP).ravel()
    for i in range(count):
        _draw_sample(cells[i], images[i], maps[i], None if masks is None else masks[i],
                     None if titles is None else titles[i], norm, alpha)
    _heatmap_colorbar(bar_fig, norm)
    return _save(fig, path)


def _heatmap_figure(n_rows: int, n_cols: int, aspect: float) -> Figure:
    """Creates a figure for ``n_rows`` x ``n_cols`` samples of height/width ``aspect``."""
    width = n_cols * 2 * _PANEL + _BAR_WIDTH  # two panels per sample
    height = n_rows * (_PANEL * aspect + 0.4) + 0.2  # inches: + sample title, + margin
    return Figure(figsize=(width, height), layout="constrained")


def _heatmap_colorbar(subfig, norm: colors.Normalize) -> None:
    """Adds the shared colour bar for the overlay scale."""
    mappable = cm.ScalarMappable(norm=norm, cmap="jet")
    cax = subfig.add_subplot()
    subfig.colorbar(mappable, cax=cax, label="anomaly score")


# ---------------------------------------------------------------------------
# ROC curves
# ---------------------------------------------------------------------------


def plot_roc_curves(
    curves: Mapping[str, tuple[np.ndarray, np.ndarray, float]],
    path: str | Path,
    title: str | None = None,
) -> Path:
    """Plots ROC curves with the chance diagonal and an AUROC legend.

    Args:
        curves: Label -> ``(fpr, tpr, auc)``; each curve is drawn as a step
            line and listed as ``"label (AUROC 0.93)"``.
        path: Output PNG path.
        title: Optional axes title.

    Returns:
        The path of the written PNG.

    Raises:
        ValueError: If a curve's fpr and tpr lengths differ.
    """
    fig = Figure(figsize=(5.2, 5.0), layout="constrained")
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 1], color="0.6", linestyle=":", linewidth=1, label="chance")
    for label, (fpr, tpr, auc) in curves.items():
        fpr = _as_1d(fpr, f"fpr of {label!r}").astype(float)
        tpr = _as_1d(tpr, f"tpr of {label!r}", fpr.size).astype(float)
        ax.plot(fpr, tpr, linewidth=1.6, label=f"{label} (AUROC {auc:.2f})")
    margin = 0.01  # keeps curves on the unit square's edges visible
    ax.set(xlim=(-margin, 1 + margin), ylim=(-margin, 1 + margin), xlabel="false positive rate",
           ylabel="true positive rate", aspect="equal")
    ax.grid(color="0.9", linewidth=0.6)
    ax.legend(loc="lower right", fontsize=8)
    if title:
        ax.set_title(title)
    return _save(fig, path)


def plot_stream_traces(traces: Mapping[str, Sequence[Mapping[str, float]]], path: str | Path,
                       frr_target: float | None = None, title: str | None = None) -> Path:
    """False-reject and escape rates on the test set against stream length, one line per class.

    Args:
        traces: class -> points ``{"frames", "frr", "escape"}`` (``trainer.line_eval.simulate_stream``).
        path: Output PNG path.
        frr_target: drawn as a dotted line on the false-reject panel.
        title: Optional figure title.
    """
    fig = Figure(figsize=(9.0, 3.6), layout="constrained")
    axes = fig.subplots(1, 2)
    for name, points in traces.items():
        frames = [p["frames"] for p in points]
        axes[0].step(frames, [p["frr"] for p in points], where="post", linewidth=1.6, label=name)
        axes[1].step(frames, [p["escape"] for p in points], where="post", linewidth=1.6, label=name)
    if frr_target is not None:
        axes[0].axhline(frr_target, color="0.4", linestyle=":", linewidth=1, label=f"target {frr_target:.0%}")
    for ax, what in zip(axes, ("false-reject rate", "escape rate")):
        ax.set(xlabel="stream frames of the product", ylabel=what, ylim=(-0.02, 1.02))
        ax.grid(color="0.9", linewidth=0.6)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    return _save(fig, path)


# ---------------------------------------------------------------------------
# HTML index
# ---------------------------------------------------------------------------

_STYLE = (
    "body{font-family:sans-serif;margin:2em;color:#222}"
    "figure{display:inline-block;margin:0 1.5em 1.5em 0;vertical-align:top}"
    "img{max-width:100%;border:1px solid #ccc}"
    "figcaption{font-size:0.9em;color:#444;max-width:60em}"
)


def _figure_html(src: str, caption: str) -> str:
    """Returns one escaped ``<figure>`` element."""
    src, caption = html.escape(str(src)), html.escape(str(caption))
    return (f'<figure><a href="{src}"><img src="{src}" alt="{caption}"></a>'
            f"<figcaption>{caption}</figcaption></figure>")


def write_html_index(
    path: str | Path,
    title: str,
    sections: Sequence[tuple[str, Sequence[tuple[str, str]]]],
) -> Path:
    """Writes a minimal self-contained HTML page listing report images.

    The page has inline CSS only and references images by the given relative
    paths. All text (title, headings, captions, paths) is HTML-escaped.

    Args:
        path: Output HTML path.
        title: Page title and top heading.
        sections: ``(heading, [(image relative path, caption), ...])`` pairs.

    Returns:
        The path of the written HTML file.
    """
    body = [f"<h1>{html.escape(title)}</h1>"]
    for heading, items in sections:
        body.append(f"<h2>{html.escape(str(heading))}</h2>")
        body.extend(_figure_html(src, caption) for src, caption in items)
    page = (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f"<title>{html.escape(title)}</title>\n<style>{_STYLE}</style>\n</head>\n"
        "<body>\n" + "\n".join(body) + "\n</body>\n</html>\n"
    )
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(page, encoding="utf-8")
    return out
