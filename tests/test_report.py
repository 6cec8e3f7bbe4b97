from __future__ import annotations

import json
import re
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from plotly.offline import get_plotlyjs

from clipq_search.analysis.pareto import load_run
from clipq_search.analysis.report import front_figure, write_report
from clipq_search.errors import ClipQError

from .test_pareto import BASELINE, LAYERS, brute_mask, make_run, trials_frame

FINAL = {
    "baseline_test_top1": 87.21,
    "control_test_top1": 87.63,
    "compressed_test_top1": 86.94,
    "rate": 31.57,
    "file_bytes": 33_784,
    "original_bytes": 1_066_560,
    "epochs": 20,
    "seconds": 412.0,
    "trial": 7,
    "plan": {
        "layers": {"conv1": {"p": 0.41, "bits": 6}, "features.0": {"p": 0.77, "bits": 4}, "fc": {"p": 0.5, "bits": 5}}
    },
}


def _front_numbers(df: pd.DataFrame) -> set[int]:
    done = df.loc[df["state"] == "COMPLETE"]
    return set(done["number"].to_numpy()[brute_mask(done["val_top1"].to_numpy(), done["rate"].to_numpy())].tolist())


def _missing(html: str, *needles: str) -> list[str]:
    # Compare on a list, not on the 5 MB page: pytest would try to diff the whole string.
    return [s for s in needles if s not in html]


def _no_external_resources(html: str) -> None:
    assert re.findall(r"<script[^>]*\bsrc\s*=", html) == []
    assert re.findall(r"<link[^>]*>", html) == []
    # Outside the embedded plotly.js bundle (whose code mentions URLs it never loads here), no URL at all.
    rest = html.replace(get_plotlyjs(), "")
    assert re.findall(r".{0,60}https?://.{0,40}", rest) == []


@pytest.fixture
def trials() -> pd.DataFrame:
    return trials_frame(60, seed=5, n_failed=3, n_running=2)


def test_report_is_self_contained_and_shows_the_run(tmp_path: Path, trials: pd.DataFrame) -> None:
    run = make_run(tmp_path / "run", trials, final=FINAL, name="lenet-demo")
    html_path, csv_path = write_report(run)
    assert (html_path, csv_path) == (run / "report.html", run / "pareto.csv")
    html = html_path.read_text(encoding="utf-8")

    # plotly.js inline exactly once, nothing fetched from the network.
    assert html.count(get_plotlyjs()[:400]) == 1
    _no_external_resources(html)
    assert not [p.name for p in run.iterdir() if p.name.endswith(".tmp")]

    data = load_run(run)
    assert data.info.knee is not None
    expected_text = [
        # Header and numbers a reader looks for.
        "CLIP-Q search report: lenet-demo",
        "lenet5",
        "fashion-mnist",
        "87.25%",
        "87.21%",
        "65 trials: 60 complete, 3 failed, 0 interrupted, 2 running or waiting",
        # Hypervolume reference point stated in words.
        "reference point val top-1 = 77.25% (baseline 87.25% - 10 points) and rate = 1x",
        # Figure data: hover text with each layer's p and bits, Pareto plan labels, the knee, the baseline line.
        *(f"{layer}: p " for layer in LAYERS),
        *(f"trial {n}" for n in data.info.front),
        *(f"#{n} (" for n in data.info.front),
        f"knee #{data.info.knee}",
        "dense baseline (val) 87.25%",
        # Failed trials listed with their error; running ones named.
        "CUDA out of memory in trial 61",
        "Still running or waiting: trials 63, 64",
        # Final section and the final point on the front.
        "6. Final fine-tune",
        "86.94%",
        "87.63%",
        "33,784",
        "final fine-tune (TEST top-1, not the trials",
    ]
    assert _missing(html, *expected_text) == []

    # pareto.csv holds exactly the Pareto set, by rate, with every layer's p and bits.
    table = pd.read_csv(csv_path)
    assert set(table["number"]) == _front_numbers(trials)
    assert table["rate"].is_monotonic_increasing
    assert {f"p:{layer}" for layer in LAYERS} | {f"bits:{layer}" for layer in LAYERS} <= set(table.columns)
    expected = trials.set_index("number").loc[table["number"]]
    np.testing.assert_allclose(table["val_top1"], expected["val_top1"])
    np.testing.assert_array_equal(table["bits:fc"], expected["bits:fc"])


def test_front_figure_draws_the_front_data(tmp_path: Path, trials: pd.DataFrame) -> None:
    data = load_run(make_run(tmp_path, trials))
    fig = front_figure(data)
    assert fig is not None and fig.layout.xaxis.type == "log"
    front = next(t for t in fig.data if t.name.startswith("Pareto front"))
    np.testing.assert_allclose(front.x, data.table["rate"])
    np.testing.assert_allclose(front.y, data.table["val_top1"])
    dominated = next(t for t in fig.data if t.name.startswith("dominated"))
    assert len(dominated.x) == data.info.n_complete - len(data.info.front)


@pytest.mark.parametrize("states", ["empty file", "running and failed only"])
def test_report_without_complete_trials(tmp_path: Path, states: str) -> None:
    df = None if states == "empty file" else trials_frame(0, n_failed=2, n_running=3)
    run = make_run(tmp_path / "run", df)
    html_path, csv_path = write_report(run)
    html = html_path.read_text(encoding="utf-8")
    assert _missing(html, "no complete trial yet") == []
    _no_external_resources(html)
    assert pd.read_csv(csv_path).empty
    if df is not None:
        assert _missing(html, "still running", "CUDA out of memory in trial 0") == []


@pytest.mark.parametrize("rungs", [[1, 3, 9], None])
def test_a_multi_fidelity_run_in_progress_without_complete_trials(tmp_path: Path, rungs: list[int] | None) -> None:
    # a trial promoted to rung 1 is running, the others failed or were interrupted: nothing complete yet
    df = trials_frame(0, n_failed=2, n_running=2).assign(rung=[None, None, 1, 0], budget=[None, None, 3.0, 1.0])
    run = make_run(tmp_path / "run", df)
    info = json.loads((run / "run.json").read_text())
    (run / "run.json").write_text(json.dumps({**info, "rungs": rungs}))  # None: a run.json of an older version
    html = write_report(run)[0].read_text(encoding="utf-8")
    assert _missing(html, "no complete trial yet", "Rungs", "full budget") == []
    # (rung, budget) rows: the space's rungs 0-2 (2, the full budget, not reached yet); from an older
    # run.json, the rungs up to the highest one reached
    table = html[html.index("MO-ASHA (trial.rungs)"):]
    rows = re.findall(r"<tr><td>(\d)</td><td>([^<]*)</td>", table)
    assert rows == [("0", "1"), ("1", "3"), ("2", "")][: 3 if rungs else 2]


def test_report_where_a_folder_blocks_its_file_writes_neither(tmp_path: Path, trials: pd.DataFrame) -> None:
    run = make_run(tmp_path / "run", trials, final=FINAL, name="lenet-demo")
    (run / "report.html").mkdir()
    with pytest.raises(ClipQError, match=r"report\.html is a folder; move it away"):
        write_report(run)
    assert not (run / "pareto.csv").exists()


def test_report_on_a_directory_that_is_not_a_run(tmp_path: Path) -> None:
    with pytest.raises(ClipQError, match="is not a run directory"):
        write_report(tmp_path)
    assert not (tmp_path / "report.html").exists()


@pytest.mark.slow
def test_report_on_2000_trials_is_quick(tmp_path: Path) -> None:
    df = trials_frame(1900, seed=7, n_failed=80, n_running=20)
    run = make_run(tmp_path / "run", df, final=FINAL)
    t0 = time.perf_counter()
    html_path, csv_path = write_report(run)
    took = time.perf_counter() - t0
    assert took < 30.0, f"report took {took:.1f}s"
    assert set(pd.read_csv(csv_path)["number"]) == _front_numbers(df)
    assert html_path.read_text(encoding="utf-8").count(get_plotlyjs()[:400]) == 1


def test_report_reads_baseline_from_the_run(tmp_path: Path, trials: pd.DataFrame) -> None:
    run = make_run(tmp_path, trials)
    html = write_report(run)[0].read_text(encoding="utf-8")
    assert _missing(html, f"{BASELINE:.2f}%") == []
    assert _missing(html, "6. Final fine-tune") == ["6. Final fine-tune"]


def test_the_final_run_is_drawn_on_the_trials_validation_scale(tmp_path: Path, trials: pd.DataFrame) -> None:
    from clipq_search.analysis.pareto import load_run
    from clipq_search.analysis.report import front_figure

    run = make_run(tmp_path / "run", trials, final={**FINAL, "compressed_val_top1": 87.5})
    fig = front_figure(load_run(run))
    (final,) = [tr for tr in fig.data if tr.name.startswith("final")]
    assert final.name == "final fine-tune (val top-1)" and list(final.y) == [87.5]
    assert "test top-1 86.94%" in final.hovertext[0]


@pytest.mark.parametrize("rates", [(2.2, 2.4), (5.6, 8.6), (31.0, 33.0), (1.5, 60.0), (0.9, 400.0)])
def test_the_rate_axis_has_numbers_however_narrow_the_rates(rates: tuple[float, float]) -> None:
    from clipq_search.analysis.report import rate_ticks

    ticks = rate_ticks(list(rates))
    shown = [v for v in ticks if rates[0] / 1.15 <= v <= rates[1] * 1.15]
    assert len(shown) >= 3, ticks
    assert ticks == sorted(ticks)


def test_a_grouped_run_shows_its_groups_in_model_order(tmp_path: Path) -> None:
    from clipq_search.analysis.pareto import load_run
    from clipq_search.analysis.report import layers_figure

    layers = ("stem.conv", "block1.a", "block1.b", "head.fc")
    df = trials_frame(30, seed=3, layers=layers)
    for col in ("p", "bits"):  # a group's layers share their values
        df[f"{col}:block1.b"] = df[f"{col}:block1.a"]
    units = {"stem.conv": ["stem.conv"], "block1": ["block1.a", "block1.b"], "head.fc": ["head.fc"]}
    run = make_run(tmp_path / "run", df, layers=layers, units=units)
    fig = layers_figure(load_run(run))
    assert list(fig.data[0].y) == ["stem.conv", "block1 (2 layers)", "head.fc"]


def test_a_run_of_many_layers_is_read_and_reported_without_pandas_warnings(tmp_path: Path) -> None:
    """A network of many layers has hundreds of columns (p:/bits:/kept: floats, the sampler's integer bits): the
    frame read is not fragmented and the front figure does not fragment it (pandas warns on each later insert)."""
    import warnings

    df = trials_frame(6, seed=1)
    n = len(df)
    layers: dict[str, object] = {}
    for i in range(80):
        layers.update({f"p:block{i}.conv": np.linspace(0.1, 0.9, n), f"bits:block{i}.conv": np.full(n, 4.0),
                       f"kept:block{i}.conv": np.full(n, 0.5), f"param:bits:block{i}.conv": np.arange(n) % 6 + 2})
    run = make_run(tmp_path / "run", pd.concat([df, pd.DataFrame(layers, index=df.index)], axis=1))
    with warnings.catch_warnings():
        warnings.simplefilter("error", pd.errors.PerformanceWarning)
        data = load_run(run)
        assert front_figure(data) is not None
