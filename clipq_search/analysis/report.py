"""``report.html`` and ``pareto.csv`` for a run directory: drawing only.

All numbers come from ``pareto.load_run``; this module formats them as one
self-contained HTML page (plotly.js embedded once, no network needed to open it).
"""

from __future__ import annotations

import html
import json
import math
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from clipq_search._io import write_text
from clipq_search.analysis import rundir
from clipq_search.analysis.pareto import COMPLETE, RunData, complete_trials, is_multi_fidelity, load_run
from clipq_search.errors import ClipQError

__all__ = ["front_figure", "history_figure", "layers_figure", "render_html", "write_report"]

_FRONT, _DOMINATED, _KNEE, _FINAL, _BASE = "#1f5fbf", "#b8b8b8", "#e07b00", "#c0392b", "#444444"
_NO_TRIAL = "no complete trial yet"
_MAX_ROWS = 200  # failed-trial rows shown in the HTML; trials.csv has them all

_CSS = """
body { font-family: system-ui, -apple-system, 'Segoe UI', sans-serif; margin: 24px auto; max-width: 1200px;
       color: #222; padding: 0 16px; line-height: 1.45; }
h1 { font-size: 1.6em; margin-bottom: 4px; } h2 { margin-top: 36px; border-bottom: 1px solid #ddd; }
.meta { color: #555; } .note { color: #666; font-size: 0.92em; } .empty { color: #a33; font-style: italic; }
.cards { display: flex; flex-wrap: wrap; gap: 12px; margin: 16px 0; }
.card { border: 1px solid #ddd; border-radius: 6px; padding: 8px 14px; min-width: 150px; background: #fafafa; }
.card b { display: block; font-size: 1.25em; } .card span { color: #666; font-size: 0.85em; }
table { border-collapse: collapse; font-size: 0.88em; margin: 8px 0; }
th, td { border: 1px solid #ddd; padding: 3px 8px; text-align: right; white-space: nowrap; }
th { background: #f0f0f0; } td.text { text-align: left; white-space: normal; max-width: 640px; }
tr.knee td { background: #fff3e0; } .scroll { overflow-x: auto; }
"""


# -- small formatting helpers --------------------------------------------------------------------


def _e(value: Any) -> str:
    return html.escape(str(value))


def _finite(value: Any) -> bool:
    try:
        return value is not None and math.isfinite(float(value))
    except (TypeError, ValueError):
        return False


def _num(value: Any, spec: str, suffix: str = "") -> str:
    return f"{float(value):{spec}}{suffix}" if _finite(value) else "-"


def _bytes(value: Any) -> str:
    return f"{int(value):,}" if _finite(value) else "-"


def _card(value: str, label: str) -> str:
    return f'<div class="card"><b>{_e(value)}</b><span>{_e(label)}</span></div>'


def _layer_lines(row: Mapping[str, Any], layers: Sequence[str]) -> str:
    parts = []
    for layer in layers:
        p, bits = row.get(f"p:{layer}"), row.get(f"bits:{layer}")
        kept = row.get(f"kept:{layer}")
        kept_txt = f", kept {float(kept):.1%}" if _finite(kept) else ""
        parts.append(f"{_e(layer)}: p {_num(p, '.3f')}, {_num(bits, '.0f')} bits{kept_txt}")
    return "<br>".join(parts)


def _hover(rows: pd.DataFrame, layers: Sequence[str], baseline: float) -> list[str]:
    out = []
    for row in rows.to_dict("records"):
        acc = float(row["val_top1"])
        head = (
            f"<b>trial {int(row['number'])}</b><br>val top-1 {acc:.2f}% (drop {baseline - acc:.2f})"
            f"<br>rate {float(row['rate']):.2f}x, {_bytes(row.get('size_bytes'))} bytes"
            f"<br>source {_e(row.get('source') or '-')}, node {_e(row.get('node') or '-')}, "
            f"{_num(row.get('trial_seconds'), '.1f', ' s')}"
        )
        out.append(f"{head}<br>{_layer_lines(row, layers)}")
    return out


class _Embedder:
    """Turns figures into HTML divs; only the first one carries plotly.js (inline, no CDN)."""

    def __init__(self) -> None:
        self.first = True

    def __call__(self, fig: go.Figure) -> str:
        div = fig.to_html(
            full_html=False,
            include_plotlyjs=self.first,
            include_mathjax=False,
            config={"displaylogo": False, "responsive": True},
        )
        self.first = False
        return div


# -- figures ------------------------------------------------------------------------------------------


_TICK_STEPS = (1, 1.5, 2, 3, 4, 5, 6, 8)


def rate_ticks(rates: Sequence[float], *, at_least: int = 3) -> list[float]:
    """Tick values for a log rate axis covering ``rates``: 1-2-5 steps, finer when fewer than ``at_least`` fit.

    A front between 2.2x and 2.4x still gets numbers on its axis.
    """
    finite = [float(r) for r in rates if _finite(r) and float(r) > 0]
    if not finite:
        return [1.0, 2.0, 5.0, 10.0]
    lo, hi = min(finite), max(finite)
    # the axis plotly draws: the data's range with some margin on the log scale
    lo, hi = lo / 1.15, hi * 1.15
    decades = range(math.floor(math.log10(lo)) - 1, math.ceil(math.log10(hi)) + 1)
    for steps in ((1, 2, 5), _TICK_STEPS):
        ticks = [m * 10.0**e for e in decades for m in steps if lo <= m * 10.0**e <= hi]
        if len(ticks) >= at_least:
            return ticks
    # narrower than the finest steps: evenly spaced on the log scale
    return [float(f"{lo * (hi / lo) ** (i / (at_least + 1)):.3g}") for i in range(1, at_least + 1)]


def _tick_text(v: float) -> str:
    return f"{v:g}x"


def front_figure(data: RunData) -> go.Figure | None:
    """Val accuracy against compression rate (log axis): front, dominated trials, knee, baseline, final."""
    done = complete_trials(data.trials)
    final = data.final or {}
    has_final = _finite(final.get("rate")) and _finite(final.get("compressed_test_top1"))
    if done.empty and not has_final:
        return None
    base = data.info.baseline_val_top1
    fig = go.Figure()
    on_front = done["number"].isin(data.info.front).to_numpy()
    dominated = done.loc[~on_front]
    if not dominated.empty:
        fig.add_trace(
            go.Scatter(
                x=dominated["rate"],
                y=dominated["val_top1"],
                mode="markers",
                name=f"dominated ({len(dominated)})",
                marker={"color": _DOMINATED, "size": 6, "opacity": 0.7},
                text=_hover(dominated, data.layers, base),
                hoverinfo="text",
            )
        )
    # the front's rows by position, in its order (rate ascending); moving "number" into the index and back
    # would split the frame's integer columns into a block each, which pandas warns of
    row = {n: i for i, n in enumerate(done["number"])}
    front = done.iloc[[row[n] for n in data.info.front]]
    if not front.empty:
        fig.add_trace(
            go.Scatter(
                x=front["rate"],
                y=front["val_top1"],
                mode="lines+markers",
                name=f"Pareto front ({len(front)})",
                line={"color": _FRONT, "shape": "vh", "width": 1.5},
                marker={"color": _FRONT, "size": 9},
                text=_hover(front, data.layers, base),
                hoverinfo="text",
            )
        )
    if data.info.knee is not None:
        knee = front.loc[front["number"] == data.info.knee]
        fig.add_trace(
            go.Scatter(
                x=knee["rate"],
                y=knee["val_top1"],
                mode="markers+text",
                name=f"knee (trial {data.info.knee})",
                marker={"color": _KNEE, "size": 18, "symbol": "star", "line": {"color": "#333", "width": 1}},
                text=[f"knee #{data.info.knee}"],
                textposition="top center",
                hovertext=_hover(knee, data.layers, base),
                hoverinfo="text",
            )
        )
    if has_final:
        fig.add_trace(_final_trace(final))
    rates = [*done["rate"], *([final["rate"]] if has_final else [])]
    _front_layout(fig, base, rates)
    return fig


def _final_trace(final: dict[str, Any]) -> go.Scatter:
    """The final run's point: on the trials' scale, its validation accuracy; its test accuracy is in the hover."""
    on_val = _finite(final.get("compressed_val_top1"))
    return go.Scatter(
        x=[float(final["rate"])],
        y=[float(final["compressed_val_top1"] if on_val else final["compressed_test_top1"])],
        mode="markers+text",
        name="final fine-tune (val top-1)"
        if on_val
        else "final fine-tune (TEST top-1, not the trials' validation scale)",
        textposition="bottom center",
        text=[f"final{'' if final.get('trial') is None else ' #' + str(final['trial'])}"],
        marker={"color": _FINAL, "size": 14, "symbol": "diamond", "line": {"color": "#333", "width": 1}},
        hovertext=[
            f"<b>final fine-tune</b> of trial {_e(final.get('trial', '-'))}"
            f"<br>val top-1 {_num(final.get('compressed_val_top1'), '.2f', '%')}"
            f"<br>test top-1 {float(final['compressed_test_top1']):.2f}% (dense test "
            f"{_num(final.get('baseline_test_top1'), '.2f', '%')})<br>rate {float(final['rate']):.2f}x, "
            f"{_bytes(final.get('file_bytes'))} bytes"
        ],
        hoverinfo="text",
    )


def _front_layout(fig: go.Figure, base: float, rates: list[float]) -> None:
    """The dense baseline's lines, the 1-2-5 log axis of the rates, the titles."""
    fig.add_hline(
        y=base,
        line={"dash": "dash", "color": _BASE, "width": 1},
        annotation_text=f"dense baseline (val) {base:.2f}%",
        annotation_position="top left",
    )
    fig.add_hline(
        y=base - 1.0,
        line={"dash": "dot", "color": "#999", "width": 1},
        annotation_text="baseline - 1 point",
        annotation_position="bottom left",
    )
    ticks = rate_ticks(rates)
    fig.update_layout(
        title="Pareto front: validation accuracy vs compression rate",
        xaxis={
            "title": "compression rate (x, log scale)",
            "type": "log",
            # Plain labels at 1-2-5 steps: plotly's default log ticks abbreviate 20 as "2".
            "tickvals": ticks,
            "ticktext": [_tick_text(v) for v in ticks],
        },
        yaxis={"title": "validation top-1 (%)"},
        height=560,
        template="plotly_white",
        hovermode="closest",
        legend={"orientation": "h", "y": -0.15},
        margin={"t": 60, "r": 20},
    )


def layers_figure(data: RunData) -> go.Figure | None:
    """Heatmaps of p and bits per searched unit (a group, or a layer) for the Pareto plans, in model order.

    Units down (a group shows once, by its name), plans across by rate.
    """
    table = data.table
    units = dict(data.units) or {layer: (layer,) for layer in data.layers}
    if table.empty or not units:
        return None
    labels = [f"#{n} ({r:.1f}x)" for n, r in zip(table["number"], table["rate"], strict=True)]
    layers = [key if len(members) == 1 and key == members[0] else f"{key} ({len(members)} layers)"
              for key, members in units.items()]
    first = [members[0] for members in units.values()]  # a group's layers share its (p, bits)
    p = np.array([table[f"p:{layer}"].to_numpy(dtype=float) for layer in first])
    bits = np.array([table[f"bits:{layer}"].to_numpy(dtype=float, na_value=np.nan) for layer in first])
    show_text = len(labels) <= 40  # cell labels stay legible up to about 40 plans
    fig = make_subplots(
        rows=1,
        cols=2,
        shared_yaxes=True,
        horizontal_spacing=0.08,
        subplot_titles=("p (clipped fraction per sign)", "bits"),
    )
    hover = "layer %{y}<br>plan %{x}<br>%{z}<extra></extra>"
    fig.add_trace(
        go.Heatmap(
            z=p,
            x=labels,
            y=layers,
            zmin=0.0,
            zmax=1.0,
            colorscale="Blues",
            hovertemplate=hover.replace("%{z}", "p %{z:.3f}"),
            colorbar={"x": 0.45, "len": 0.9, "title": "p"},
            texttemplate="%{z:.2f}" if show_text else None,
        ),
        row=1,
        col=1,
    )
    fig.add_trace(
        go.Heatmap(
            z=bits,
            x=labels,
            y=layers,
            zmin=2,
            zmax=8,
            colorscale="Viridis",
            hovertemplate=hover.replace("%{z}", "%{z:.0f} bits"),
            colorbar={"x": 1.0, "len": 0.9, "title": "bits"},
            texttemplate="%{z:.0f}" if show_text else None,
        ),
        row=1,
        col=2,
    )
    fig.update_yaxes(autorange="reversed", type="category")
    fig.update_xaxes(type="category", tickangle=-45, title_text="Pareto plan (trial, rate)")
    fig.update_layout(
        title="Per-layer plans on the Pareto front",
        height=max(320, 140 + 26 * len(layers)),
        template="plotly_white",
        margin={"t": 80},
    )
    return fig


def history_figure(data: RunData) -> go.Figure | None:
    """Hypervolume and best rate within 1 point of the baseline, after each finished trial."""
    hist = data.history
    if hist.empty or data.info.n_complete == 0:
        return None
    fig = make_subplots(
        rows=2,
        cols=1,
        shared_xaxes=True,
        vertical_spacing=0.08,
        subplot_titles=("hypervolume", "best rate within 1 point of the baseline"),
    )
    custom = hist["number"].to_numpy()
    fig.add_trace(
        go.Scatter(
            x=hist["n_finished"],
            y=hist["hypervolume"],
            mode="lines",
            name="hypervolume",
            customdata=custom,
            line={"color": _FRONT, "shape": "hv"},
            hovertemplate="after %{x} finished trials (latest #%{customdata})<br>hypervolume %{y:.4f}<extra></extra>",
        ),
        row=1,
        col=1,
    )
    fig.add_trace(
        go.Scatter(
            x=hist["n_finished"],
            y=hist["best_rate_within_1pt"],
            mode="lines",
            name="best rate within 1 pt",
            customdata=custom,
            line={"color": _KNEE, "shape": "hv"},
            hovertemplate="after %{x} finished trials (latest #%{customdata})<br>best rate %{y:.2f}x<extra></extra>",
        ),
        row=2,
        col=1,
    )
    fig.update_xaxes(title_text="finished trials (in completion order)", row=2, col=1)
    fig.update_yaxes(title_text="acc points x log10 rate", row=1, col=1)
    fig.update_yaxes(title_text="rate (x)", row=2, col=1)
    fig.update_layout(title="Search progress", height=560, template="plotly_white", showlegend=False, margin={"t": 80})
    return fig


def rungs_figure(data: RunData) -> go.Figure | None:
    """Multi-fidelity: each plan's validation accuracy at each budget it reached (its learning curve)."""
    df = data.trials
    if "rung_results" not in df.columns:
        return None
    curves = [(int(n), json.loads(r)) for n, r in zip(df["number"], df["rung_results"], strict=True) if _is_text(r)]
    if not curves:
        return None
    fig = go.Figure()
    for number, points in curves:
        fig.add_trace(
            go.Scatter(
                x=[pt[0] for pt in points],
                y=[pt[1] for pt in points],
                customdata=[pt[2] for pt in points],
                mode="lines+markers",
                name=f"#{number}",
                hovertemplate=f"trial #{number}<br>%{{x:.3g}} epochs: val %{{y:.2f}}%, rate %{{customdata:.1f}}x"
                "<extra></extra>",
            )
        )
    fig.update_xaxes(title_text="budget (epochs of CLIP-Q fine-tuning)", type="log")
    fig.update_yaxes(title_text="validation top-1 (%)")
    fig.update_layout(title="Plans promoted past the first rung", height=440, template="plotly_white")
    return fig


def _is_text(value: Any) -> bool:
    return isinstance(value, str) and value.startswith("[")


def _rungs_section(data: RunData) -> str:
    """Multi-fidelity: per rung, the plans recorded there, promoted from it and stopped at it."""
    df = data.trials
    done = df[df["state"] == COMPLETE]
    rung = pd.to_numeric(done["rung"], errors="coerce")
    every = pd.to_numeric(df["rung"], errors="coerce")  # running and interrupted trials too: a run in progress
    budget = pd.to_numeric(df["budget"], errors="coerce")
    # the last rung the space has (run.json of a run from an older version: the highest any trial reached)
    configured = data.run.get("rungs")
    last = len(configured) - 1 if isinstance(configured, list) and configured else int(every.max())
    rows = []
    for k in range(last + 1):
        reached = done[rung >= k]
        stopped = done[rung == k]["number"].tolist()
        level = budget[every == k]
        rows.append({
            "rung": k,
            "budget": float(level.iloc[0]) if len(level) else float("nan"),
            "recorded": len(reached),
            "promoted": int((rung > k).sum()) if k < last else 0,
            "stopped here" if k < last else "full budget": _number_text(stopped),
        })
    table = pd.DataFrame(rows).fillna("")
    return (
        '<p class="note">MO-ASHA (trial.rungs): a plan goes on from a rung when it is among the best '
        "1 / reduction_factor recorded there by non-dominated rank and hypervolume contribution. Every result "
        "elsewhere in this report is a plan's result at the highest budget it reached.</p>\n"
        + _table(table, {"budget": lambda v: f"{v:.3g}" if _finite(v) else ""}, text_cols=tuple(table.columns[4:]))
    )


def _number_text(numbers: list[int], limit: int = 40) -> str:
    shown_numbers = ", ".join(f"#{n}" for n in numbers[:limit])
    return shown_numbers + (f" and {len(numbers) - limit} more" if len(numbers) > limit else "")


# -- HTML sections --------------------------------------------------------------------------------------


def _header(data: RunData) -> str:
    b, run, info = data.baseline, data.run, data.info
    name = run.get("name", data.run_dir.name)
    top5 = f", top-5 {_num(b.get('test_top5'), '.2f', '%')}" if _finite(b.get("test_top5")) else ""
    counts = (
        f"{info.n_total} trials: {info.n_complete} complete, {info.n_failed} failed, "
        f"{info.n_interrupted} interrupted, {info.n_pending} running or waiting"
    )
    meta = [
        f"model <b>{_e(b.get('model', '-'))}</b> on <b>{_e(b.get('dataset', '-'))}</b>",
        f"dense baseline: val top-1 <b>{_num(b.get('val_top1'), '.2f', '%')}</b>, "
        f"test top-1 <b>{_num(b.get('test_top1'), '.2f', '%')}</b>{top5}",
        _e(counts),
        f"search space {_e(run.get('space_source', '-'))}; storage {_e(run.get('storage', '-'))}; "
        f"generated {_e(datetime.now().strftime('%Y-%m-%d %H:%M:%S'))}",
    ]
    dense = run.get("dense")
    if isinstance(dense, Mapping) and _finite(dense.get("share")):
        largest = ", ".join(f"{_e(k)} {_bytes(v)} B" for k, v in dense.get("largest") or [])
        meta.append(
            f"left dense (not compressed): {_e(dense.get('tensors', '-'))} parameter tensors, "
            f"<b>{100 * float(dense['share']):.1f}%</b> of the fp32 bytes"
            + (f"; largest: {largest}" if largest else "")
        )
    return f"<h1>CLIP-Q search report: {_e(name)}</h1>\n" + "".join(f'<div class="meta">{m}</div>\n' for m in meta)


def _summary(data: RunData) -> str:
    info, trials = data.info, data.trials.set_index("number")
    if info.n_complete == 0:
        state = " (the search is still running)" if info.n_pending else ""
        return f'<p class="empty">{_NO_TRIAL}{_e(state)}.</p>'
    cards = [_card(str(len(info.front)), "Pareto-optimal trials")]
    if info.knee is not None:
        k = trials.loc[info.knee]
        cards.append(_card(f"#{info.knee}: {k['rate']:.1f}x @ {k['val_top1']:.2f}%", "knee of the front"))
    else:
        cards.append(_card("none", "knee of the front (needs 3+ front points)"))
    sel = data.within_1pt
    if sel.trial is not None:
        s = trials.loc[sel.trial]
        cards.append(_card(f"#{sel.trial}: {s['rate']:.1f}x @ {s['val_top1']:.2f}%", "highest rate within 1 point"))
    else:
        cards.append(_card("none", "highest rate within 1 point"))
    cards.append(_card(f"{info.hypervolume:.4f}", "hypervolume"))
    return f'<div class="cards">{"".join(cards)}</div>\n<p>{_e(sel.message)}.</p>'


def _hv_text(data: RunData) -> str:
    info = data.info
    return _e(
        f"Hypervolume {info.hypervolume:.4f}: the area dominated by the front in (val top-1 points) x (log10 rate), "
        f"above the reference point val top-1 = {info.ref_acc:.2f}% (baseline {info.baseline_val_top1:.2f}% - "
        f"{info.ref_drop:g} points) and rate = {info.ref_rate:g}x (log10 rate {info.ref_log_rate:g}); "
        "only trials better than the reference on both counts add to it."
    )


def _table(
    df: pd.DataFrame, formats: Mapping[str, Any], row_class: Sequence[str] | None = None, text_cols: Sequence[str] = ()
) -> str:
    head = "".join(f"<th>{_e(c)}</th>" for c in df.columns)
    body = []
    for i, row in enumerate(df.itertuples(index=False, name=None)):
        cells = []
        for col, value in zip(df.columns, row, strict=True):
            fmt = formats.get(col)
            missing = value is None or (isinstance(value, float) and math.isnan(value)) or value is pd.NA
            txt = "-" if missing else (fmt(value) if fmt else str(value))
            cls = ' class="text"' if col in text_cols else ""
            cells.append(f"<td{cls}>{_e(txt)}</td>")
        cls = f' class="{row_class[i]}"' if row_class and row_class[i] else ""
        body.append(f"<tr{cls}>{''.join(cells)}</tr>")
    return f'<div class="scroll"><table><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table></div>'


def _pareto_section(data: RunData) -> str:
    if data.table.empty:
        return f'<p class="empty">{_NO_TRIAL}.</p>'
    t = data.table
    formats: dict[str, Any] = {
        "val_top1": lambda v: f"{v:.2f}",
        "drop": lambda v: f"{v:+.2f}",
        "rate": lambda v: f"{v:.2f}",
        "size_bytes": lambda v: f"{int(v):,}",
        "knee": lambda v: "knee" if v else "",
    }
    formats.update({c: (lambda v: f"{v:.3f}") for c in t.columns if c.startswith("p:")})
    formats.update({c: (lambda v: f"{int(v)}") for c in t.columns if c.startswith("bits:")})
    classes = ["knee" if k else "" for k in t["knee"]]
    return (
        f'<p class="note">{len(t)} Pareto-optimal trials by rate; drop = baseline val top-1 minus the trial\'s; '
        "rank = the trial's non-dominated sorting rank (0: on the front, as every row here is; pareto.csv "
        "keeps the column for other tools). The same rows are in pareto.csv.</p>\n"
        f'{_table(t, formats, classes)}\n<p class="note">{_hv_text(data)}</p>'
    )


def _failed_section(data: RunData) -> str:
    df = data.trials
    bad = df.loc[~df["state"].isin((COMPLETE, "RUNNING", "WAITING"))]
    pending = df.loc[df["state"].isin(("RUNNING", "WAITING")), "number"].tolist()
    parts = []
    if pending:
        parts.append(
            f"<p>Still running or waiting: trials {_e(', '.join(map(str, pending[:50])))}"
            f"{' ...' if len(pending) > 50 else ''}.</p>"
        )
    if bad.empty:
        parts.append("<p>No failed or interrupted trial.</p>")
    else:
        rows = bad[["number", "state", "node", "source", "error"]].head(_MAX_ROWS).copy()
        rows["error"] = [(" ".join(str(e).split())[:400] if e else "") for e in rows["error"]]
        parts.append(_table(rows, {}, text_cols=("error",)))
        if len(bad) > _MAX_ROWS:
            parts.append(f'<p class="note">{len(bad) - _MAX_ROWS} more in trials.csv.</p>')
    return "\n".join(parts)


def _final_section(final: Mapping[str, Any]) -> str:
    base, ctrl, comp = (final.get(k) for k in ("baseline_test_top1", "control_test_top1", "compressed_test_top1"))
    delta = f" ({float(comp) - float(base):+.2f} vs dense)" if _finite(comp) and _finite(base) else ""
    trial = final.get("trial")
    cards = [
        _card(_num(base, ".2f", "%"), "dense baseline, test top-1"),
        _card(_num(ctrl, ".2f", "%"), "dense control fine-tune, test top-1"),
        _card(_num(comp, ".2f", "%") + delta, "CLIP-Q compressed, test top-1"),
        _card(_num(final.get("rate"), ".2f", "x"), "compression rate"),
        _card(
            f"{_bytes(final.get('file_bytes'))} / {_bytes(final.get('original_bytes'))}",
            "file bytes / original fp32 bytes",
        ),
    ]
    plan = ((final.get("plan") or {}).get("layers") or {}) if isinstance(final.get("plan"), dict) else {}
    plan_df = pd.DataFrame(
        [{"layer": k, "p": v.get("p"), "bits": v.get("bits")} for k, v in plan.items() if isinstance(v, dict)]
    )
    plan_html = (
        _table(plan_df, {"p": lambda v: f"{float(v):.3f}", "bits": lambda v: f"{int(v)}"}, text_cols=("layer",))
        if not plan_df.empty
        else "<p>(no plan recorded)</p>"
    )
    origin = "a hand-written plan" if trial is None else f"trial {trial}"
    candidates = _candidates_html(final)
    if candidates:
        origin += f", kept among {len(final['candidates'])} candidates by {final.get('rule', '-')} on full-length val"
    return (
        f"<p>Full-length fine-tune of {_e(origin)}: {_e(final.get('epochs', '-'))} epochs in "
        f"{_num(final.get('seconds'), '.0f', ' s')}. Test accuracy (the search ranks trials by val accuracy).</p>"
        f'<div class="cards">{"".join(cards)}</div>\n{plan_html}{candidates}'
    )


def _candidates_html(final: Mapping[str, Any]) -> str:
    """``final --top K``'s candidates (metrics.json's ``candidates``) as a table; empty without them."""
    rows = final.get("candidates")
    if not isinstance(rows, list) or not rows or not all(isinstance(r, dict) for r in rows):
        return ""
    table = pd.DataFrame(
        [
            {
                "trial": str(r.get("trial", "-")),
                "short val top-1": _num(r.get("short_val_top1"), ".2f", "%"),
                "short rate": _num(r.get("short_rate"), ".2f", "x"),
                "full val top-1": _num(r.get("val_top1"), ".2f", "%"),
                "test top-1": _num(r.get("test_top1"), ".2f", "%"),
                "file rate": _num(r.get("rate"), ".2f", "x"),
                "file bytes": _bytes(r.get("file_bytes")),
                "meets rule": "yes" if r.get("meets_rule") is True else "no",
                "kept": "kept" if r.get("chosen") is True else "",
            }
            for r in rows
        ]
    )
    missed = " No candidate met it at full length: the closest was kept." if final.get("rule_met") is False else ""
    return (
        f"<h3>Candidates of final --top: {len(rows)} plans</h3>"
        f'<p class="note">Each trial fine-tuned at full length; the rule {_e(final.get("rule", "-"))} picks on '
        "the full-length val accuracy and file rate. Each test accuracy is that of the model decoded from the "
        f"candidate's file (final/candidates/).{missed}</p>\n" + _table(table, {})
    )


def render_html(data: RunData) -> str:
    """The whole report as one HTML string (plotly.js inline once, no external resources)."""
    embed = _Embedder()
    sections = [_header(data), "<h2>Summary</h2>", _summary(data)]

    def figure(fig: go.Figure | None, empty: str) -> str:
        return embed(fig) if fig is not None else f'<p class="empty">{_e(empty)}.</p>'

    sections += [
        "<h2>1. Pareto front</h2>",
        '<p class="note">Each point is a complete trial; hover for its metrics and every layer\'s p and bits. '
        "Blue: Pareto-optimal (no other trial is at least as accurate and as compressed). Grey: dominated. "
        "Failed trials have no accuracy or rate; they are listed in section 5.</p>",
        figure(front_figure(data), _NO_TRIAL),
        "<h2>2. Per-layer plans on the front</h2>",
        figure(layers_figure(data), _NO_TRIAL),
        "<h2>3. Search progress</h2>",
        figure(history_figure(data), _NO_TRIAL),
        "<h2>4. Pareto-optimal trials</h2>",
        _pareto_section(data),
        "<h2>5. Failed, interrupted and running trials</h2>",
        _failed_section(data),
    ]
    number = 6
    if is_multi_fidelity(data.trials):
        sections += [
            f"<h2>{number}. Rungs</h2>", _rungs_section(data), figure(rungs_figure(data), "no plan went past rung 0")
        ]
        number += 1
    if data.final is not None:
        sections += [f"<h2>{number}. Final fine-tune</h2>", _final_section(data.final)]
    title = f"CLIP-Q report: {data.run.get('name', data.run_dir.name)}"
    body = "\n".join(sections)
    return (
        f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n<title>{_e(title)}</title>\n'
        f"<style>{_CSS}</style>\n</head>\n<body>\n{body}\n</body>\n</html>\n"
    )


def write_report(run_dir: Path) -> tuple[Path, Path]:
    """Write ``RUN_DIR/report.html`` and ``RUN_DIR/pareto.csv`` atomically; return their paths."""
    run_dir = Path(run_dir)
    data = load_run(run_dir)
    html_path, csv_path = run_dir / rundir.REPORT_HTML, run_dir / rundir.PARETO_CSV
    for path in (html_path, csv_path):  # both or neither: nothing written when one cannot be
        if path.is_dir():
            raise ClipQError(f"{path} is a folder; move it away so that the report can be written there")
    page = render_html(data)
    write_text(csv_path, data.table.to_csv(index=False))
    write_text(html_path, page)
    return html_path, csv_path
