"""Figures of a job, from its stored numbers: sensitivity curves, per-layer sparsity, accuracy.

Rendered with matplotlib's Agg backend (no display, thread-safe per figure through the object
API: no ``pyplot`` state is shared between requests).

Example::

    svg = render("sensitivity", sensitivity_data(curves, baseline), "svg")
"""

from __future__ import annotations

import io
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

FORMATS = {"svg": "image/svg+xml", "png": "image/png"}


@dataclass(frozen=True)
class Series:
    """One line or bar group: ``label`` and (x, y) points."""

    label: str
    x: tuple[float, ...]
    y: tuple[float, ...]


@dataclass(frozen=True)
class PlotData:
    """What one figure shows: a title, axis labels, series, and whether they are bars."""

    title: str
    xlabel: str
    ylabel: str
    series: tuple[Series, ...]
    bars: bool = False
    categories: tuple[str, ...] = ()
    hline: float | None = None


def sensitivity_data(
    curves: Mapping[str, Mapping[float, Mapping[str, float]]], baseline: Mapping[str, float]
) -> PlotData:
    """``curves``: unit -> ratio -> scores. Accuracy where the scan measured it, else perplexity
    (language models), else loss."""
    metric = next(m for m in ("accuracy", "perplexity", "loss") if m in baseline)
    series = tuple(
        Series(
            unit,
            (0.0, *sorted(points)),
            (baseline[metric], *(points[r][metric] for r in sorted(points))),
        )
        for unit, points in curves.items()
    )
    return PlotData(
        "Sensitivity: each layer pruned alone",
        "ratio removed",
        metric,
        series,
        hline=baseline[metric],
    )


def layer_sparsity_data(
    layers: Sequence[tuple[str, float]], chosen: Mapping[str, float] | None
) -> PlotData:
    """Measured sparsity per layer (``(name, sparsity)``), beside the search's choice if any."""
    names = tuple(name for name, _ in layers)
    series = [Series("measured", tuple(range(len(names))), tuple(s for _, s in layers))]
    if chosen:
        series.append(
            Series(
                "chosen ratio",
                tuple(range(len(names))),
                tuple(_chosen_for(name, chosen) for name in names),
            )
        )
    return PlotData("Sparsity per layer", "layer", "fraction removed", tuple(series), True, names)


def _chosen_for(name: str, chosen: Mapping[str, float]) -> float:
    """The ratio chosen for layer ``name``: its own, or its enclosing unit's (a language model's
    decoder layer ``model.layers.0`` holds ``model.layers.0.mlp.up_proj``)."""
    if name in chosen:
        return chosen[name]
    enclosing = [key for key in chosen if name.startswith(key + ".")]
    return chosen[max(enclosing, key=len)] if enclosing else 0.0


def accuracy_data(evals: Sequence[tuple[str, Mapping[str, Any] | None]]) -> PlotData | None:
    """Accuracy (else perplexity, else loss) before, after pruning and after fine-tuning; None
    without any."""
    measured = [(when, e) for when, e in evals if e]
    if not measured:
        return None
    metric = next(
        (m for m in ("accuracy", "perplexity") if all(m in e for _, e in measured)), "loss"
    )
    names = tuple(when for when, _ in measured)
    values = tuple(float(e[metric]) for _, e in measured)
    return PlotData(
        f"{metric.capitalize()} on the evaluation data",
        "",
        metric,
        (Series(metric, tuple(range(len(names))), values),),
        True,
        names,
    )


def render(data: PlotData, fmt: str) -> bytes:
    """The figure as ``svg`` or ``png`` bytes."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7, 4.2), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    draw: Callable[[Any, PlotData], None] = _bars if data.bars else _lines
    draw(axes, data)
    axes.set_title(data.title)
    axes.set_xlabel(data.xlabel)
    axes.set_ylabel(data.ylabel)
    if len(data.series) > 1 or not data.bars:
        axes.legend(fontsize="small", ncols=2 if len(data.series) > 8 else 1)
    out = io.BytesIO()
    figure.savefig(out, format=fmt, metadata=_METADATA[fmt])
    return out.getvalue()


# Fixed metadata: the same data renders to the same bytes (no creation date, no version string).
_METADATA: dict[str, dict[str, Any]] = {
    "svg": {"Date": None, "Creator": None},
    "png": {"Software": None},
}


def _lines(axes: Any, data: PlotData) -> None:
    for s in data.series:
        axes.plot(s.x, s.y, marker="o", markersize=3, label=s.label)
    if data.hline is not None:
        axes.axhline(data.hline, color="grey", linestyle=":", linewidth=1, label="dense")


def _bars(axes: Any, data: PlotData) -> None:
    width = 0.8 / max(len(data.series), 1)
    for i, s in enumerate(data.series):
        axes.bar([x + i * width for x in s.x], s.y, width=width, label=s.label)
    axes.set_xticks([x + width * (len(data.series) - 1) / 2 for x in range(len(data.categories))])
    axes.set_xticklabels(
        data.categories,
        rotation=45 if len(data.categories) > 6 else 0,
        ha="right" if len(data.categories) > 6 else "center",
    )
