"""Attention weights are compressed: a small nn.TransformerEncoder model, in the library and through the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from clipq_search import (
    attach_clipq,
    compressible_tensors,
    estimate_size,
    load_compressed,
    read_compressed,
    save_compressed,
)
from clipq_search.errors import ConfigError

from .conftest import cli, needs_fashion
from .tiny_vit import tiny_vit

ATTENTION = ["encoder.layers.0.self_attn.in_proj_weight", "encoder.layers.1.self_attn.in_proj_weight"]


def test_attention_projections_are_compressible_by_name() -> None:
    names = list(compressible_tensors(tiny_vit()))
    assert names[:3] == ["patch", ATTENTION[0], "encoder.layers.0.self_attn.out_proj"]
    assert set(ATTENTION) <= set(names) and names[-1] == "head"
    with pytest.raises(ConfigError, match="unknown layer 'encoder.layers.0.self_attn.in_proj'"):
        attach_clipq(tiny_vit(), {"layers": {"encoder.layers.0.self_attn.in_proj": {"p": 0.5, "bits": 3}}})


def test_a_transformer_trains_and_round_trips_with_its_attention_compressed(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = tiny_vit()
    attached = attach_clipq(model, {"default": {"p": 0.7, "bits": 3}})
    assert set(ATTENTION) <= set(attached)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    x, y = torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,))
    for _ in range(3):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    in_proj = model.encoder.layers[0].self_attn.in_proj_weight
    assert torch.unique(in_proj[in_proj != 0]).numel() <= 7  # the forward pass sees it quantized
    model.eval()
    with torch.no_grad():
        expected = model(x)
    written = save_compressed(model, tmp_path / "vit.clipq")
    fresh = tiny_vit().eval()
    fresh.load_state_dict(load_compressed(tmp_path / "vit.clipq"), strict=True)
    with torch.no_grad():
        assert torch.equal(fresh(x), expected)
    sizes = {s.name: s for s in written.layers}
    assert all(sizes[name].compressed and sizes[name].bits == 3 for name in ATTENTION)
    # the in_proj weights are most of the attention bytes: dense, the rate is far lower
    attention_dense = {"default": {"p": 0.7, "bits": 3}, "dense": ATTENTION}
    assert estimate_size(tiny_vit(), attention_dense).rate < 0.8 * written.rate


@needs_fashion
@pytest.mark.slow
def test_search_export_and_final_compress_a_transformer_through_the_command_line(tmp_path: Path) -> None:
    space = tmp_path / "vit.yaml"
    space.write_text(
        "name: vit\nmodel: tests.tiny_vit:tiny_vit\ndataset: {name: fashion-mnist, val_size: 1000}\n"
        "baseline: {train: {epochs: 1, max_steps: 40, lr: 0.05}}\n"
        "trial: {train: {epochs: 1, max_steps: 10, lr: 0.01}, eval_batch_size: 500}\n"
        "final: {train: {epochs: 1, max_steps: 20, lr: 0.01}}\nlayers: {default: {p: [0.5, 0.9], bits: [3, 5]}}\n"
        "search: {sampler: random, trials: 2, concurrency: 1}\nresources: {cpus_per_trial: 1}\n"
    )
    results = tmp_path / "results"

    r = cli("search", str(space), "--results", str(results))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "stays dense: " in r.stdout and "[2/2]" in r.stdout
    run = results / "vit"
    trials = __import__("pandas").read_csv(run / "trials.csv")
    assert {f"p:{name}" for name in ATTENTION} <= set(trials.columns)
    number = int(trials.loc[trials["state"] == "COMPLETE", "number"].iloc[0])
    r = cli("final", str(run), "--trial", str(number))
    assert r.returncode == 0, r.stderr[-3000:]
    path = run / "final" / "model.clipq"
    state, sizes = read_compressed(path)
    by_name = {s.name: s for s in sizes.layers}
    assert all(by_name[name].compressed for name in ATTENTION)
    metrics = json.loads((run / "final" / "metrics.json").read_text())
    assert metrics["file_bytes"] == path.stat().st_size
    fresh = tiny_vit()
    fresh.load_state_dict(state, strict=True)  # the file round-trips into a plain model
    assert cli("report", str(run)).returncode == 0
    assert "left dense (not compressed)" in (run / "report.html").read_text()
