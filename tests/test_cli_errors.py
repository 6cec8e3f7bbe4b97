"""Bad input gets a clear answer: every case runs the real command line.

Each case asserts a non-zero exit, exactly one line on stderr (no traceback)
that names the problem and the fix, and that nothing was written: no run
directory, no cached baseline, no temporary file. Bad input is rejected before
any training or Ray start, so no case needs a trained baseline.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import struct
import subprocess
import sys
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml

from .conftest import REPO, SMOKE, needs_fashion

# About 60 command-line runs at ~2 s of interpreter and torch start-up each.
pytestmark = [needs_fashion, pytest.mark.slow]

# -- running the command line --------------------------------------------------------------


def _run(args: list[str], timeout: float = 120) -> tuple[subprocess.CompletedProcess[str], float]:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    t0 = time.perf_counter()
    res = subprocess.run(
        [sys.executable, "run_search.py", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout
    )
    return res, time.perf_counter() - t0


def _tree(*roots: Path) -> dict[str, tuple[int, int] | None]:
    """Every path under ``roots`` with (size, mtime) for files: a before/after fingerprint."""
    out: dict[str, tuple[int, int] | None] = {}
    for root in roots:
        for p in root.rglob("*"):
            st = p.stat()
            out[str(p)] = (st.st_size, st.st_mtime_ns) if p.is_file() else None
    return out


def _check_rejected(res: subprocess.CompletedProcess[str], needles: tuple[str, ...]) -> str:
    """Non-zero exit and exactly one stderr line (no traceback) containing every needle."""
    lines = res.stderr.splitlines()
    assert res.returncode != 0, f"exit 0; stdout={res.stdout!r}"
    assert len(lines) == 1, f"expected one stderr line, got {len(lines)}:\n{res.stderr}"
    line = lines[0]
    assert "Traceback" not in line
    assert line.startswith(("error: ", "run_search.py")), line
    for needle in needles:
        assert needle in line, f"{needle!r} not in {line!r}"
    # nothing started: no training, no Ray
    assert "pretraining" not in res.stdout and "Ray" not in res.stdout, res.stdout
    return line


# -- inputs -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Assets:
    root: Path
    lenet300_ckpt: Path
    lenet5_ckpt: Path
    random_bytes: Path
    bad_idx_dir: Path
    clipq: dict[str, Path]
    run_dir: Path
    plans: dict[str, Path]
    not_a_run: Path


def _write_idx(path: Path, magic: bytes, dims: tuple[int, ...], fill: int = 0) -> None:
    n = 1
    for d in dims:
        n *= d
    path.write_bytes(magic + struct.pack(f">{len(dims)}I", *dims) + bytes([fill]) * n)


@pytest.fixture(scope="session")
def assets(tmp_path_factory: pytest.TempPathFactory) -> Assets:
    """Bad and good inputs, made once and cheaply (random-init weights, no training)."""
    import torch

    from clipq_search.core.encoding import save_compressed
    from clipq_search.core.plan import Plan
    from clipq_search.search.space import load_space
    from clipq_search.training.loop import save_state_dict
    from clipq_search.training.models import build_model

    root = tmp_path_factory.mktemp("cli_assets")
    torch.manual_seed(0)
    lenet300 = build_model("lenet300")
    save_state_dict(lenet300, root / "lenet300.pt")
    save_state_dict(build_model("lenet5"), root / "lenet5.pt")
    (root / "random.pt").write_bytes(random.Random(0).randbytes(4096))

    # Four IDX files in the right places; the training images have a bad magic number.
    idx = root / "bad_idx"
    idx.mkdir()
    _write_idx(idx / "train-images-idx3-ubyte", b"\x08\x03\x00\x00", (4, 28, 28))
    _write_idx(idx / "train-labels-idx1-ubyte", b"\x00\x00\x08\x01", (4,))
    _write_idx(idx / "t10k-images-idx3-ubyte", b"\x00\x00\x08\x03", (4, 28, 28))
    _write_idx(idx / "t10k-labels-idx1-ubyte", b"\x00\x00\x08\x01", (4,))

    good = root / "good.clipq"
    save_compressed(lenet300, good, Plan.uniform(0.8, 3))
    data = good.read_bytes()
    clipq = {"good": good}
    clipq["truncated"] = root / "truncated.clipq"
    clipq["truncated"].write_bytes(data[: len(data) // 2])
    clipq["magic"] = root / "magic.clipq"
    clipq["magic"].write_bytes(b"NOTCQ\0" + data[6:])
    body = bytearray(data[:-4])
    body[6:8] = struct.pack("<H", 99)
    clipq["version"] = root / "version.clipq"
    clipq["version"].write_bytes(bytes(body) + struct.pack("<I", zlib.crc32(bytes(body))))
    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 0xFF
    clipq["checksum"] = root / "checksum.clipq"
    clipq["checksum"].write_bytes(bytes(flipped))

    # A run directory as `search` leaves it (space, baseline, run.json), with a random-init baseline.
    run = root / "run"
    run.mkdir()
    space = load_space(SMOKE)
    (run / "space.yaml").write_text(space.to_yaml())
    baseline = {
        "checkpoint": str(root / "lenet300.pt"),
        "val_top1": 10.0,
        "test_top1": 10.0,
        "test_top5": 50.0,
        "seconds": 0.0,
        "model": "lenet300",
        "dataset": "fashion-mnist",
        "fingerprint": "0",
    }
    (run / "baseline.json").write_text(json.dumps(baseline))
    (run / "run.json").write_text(json.dumps({"storage": f"sqlite:///{run / 'study.db'}", "name": "run"}))
    plans = {name: root / f"plan_{name}.json" for name in ("good", "not_json", "unknown_layer", "bad_bits")}
    plans["good"].write_text(json.dumps({"layers": {"fc1": {"p": 0.9, "bits": 3}}, "default": {"p": 0.5, "bits": 4}}))
    plans["not_json"].write_text("{layers: fc1")
    plans["unknown_layer"].write_text(json.dumps({"layers": {"fc9": {"p": 0.5, "bits": 3}}}))
    plans["bad_bits"].write_text(json.dumps({"layers": {"fc1": {"p": 0.5, "bits": 12}}}))
    plans["not_a_plan"] = root / "plan_list.json"
    plans["not_a_plan"].write_text("[1, 2]")
    for name, text in (("run_base_list", "[]"), ("run_base_broken", "{oops"), ("run_base_short", '{"val_top1": 10}')):
        shutil.copytree(run, root / name)
        (root / name / "baseline.json").write_text(text)
    not_a_run = root / "not_a_run"
    not_a_run.mkdir()
    (not_a_run / "notes.txt").write_text("hello\n")
    return Assets(root, root / "lenet300.pt", root / "lenet5.pt", root / "random.pt", idx, clipq, run, plans, not_a_run)


# -- the cases --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Ctx:
    tmp: Path
    results: Path
    a: Assets

    def space(self, text: str | None = None, edit: Callable[[dict], None] | None = None) -> str:
        """``tmp/space.yaml``: raw ``text``, or smoke.yaml after ``edit`` of its mapping."""
        path = self.tmp / "space.yaml"
        if text is None:
            data = yaml.safe_load(SMOKE.read_text())
            if edit is not None:
                edit(data)
            text = yaml.safe_dump(data, sort_keys=False)
        path.write_text(text)
        return str(path)


def _layers(**kw: object) -> Callable[[dict], None]:
    return lambda d: d["layers"].update(kw)


def _default(**kw: object) -> Callable[[dict], None]:
    return lambda d: d["layers"]["default"].update(kw)


def _set(key: str, value: object) -> Callable[[dict], None]:
    def edit(d: dict) -> None:
        *parts, last = key.split(".")
        for part in parts:
            d = d.setdefault(part, {})
        d[last] = value

    return edit


Argv = Callable[[Ctx], list[str]]
Case = tuple[str, Argv, tuple[str, ...]]


def search(*extra: str) -> Argv:
    """``search smoke.yaml --results DIR EXTRA...`` (``{tmp}`` and ``{a.x}`` in EXTRA are filled in)."""
    return lambda c: ["search", str(SMOKE), "--results", str(c.results), *(e.format(tmp=c.tmp, a=c.a) for e in extra)]


def search_edited(edit: Callable[[dict], None]) -> Argv:
    """``search`` on a copy of smoke.yaml changed by ``edit``."""
    return lambda c: ["search", c.space(edit=edit), "--results", str(c.results)]


def pretrain_text(text: str) -> Argv:
    """``pretrain`` on a space file holding ``text``."""
    return lambda c: ["pretrain", c.space(text), "--results", str(c.results)]


def pretrain_edited(edit: Callable[[dict], None], *extra: str) -> Argv:
    return lambda c: ["pretrain", c.space(edit=edit), "--results", str(c.results), *(e.format(a=c.a) for e in extra)]


def cmd(*argv: str) -> Argv:
    """Any command; ``{tmp}``, ``{a.x}`` and ``{run}`` (the fake run directory) are filled in."""
    return lambda c: [a.format(tmp=c.tmp, a=c.a, run=c.a.run_dir) for a in argv]


ALL_LAYERS = "fc1, fc2, fc3"
TRIPLE_FC = ["fc1", "fc2", "fc3"]

CASES: list[Case] = [
    # the space file
    (
        "space-missing",
        cmd("pretrain", "{tmp}/nope.yaml", "--results", "{tmp}/results"),
        ("nope.yaml", "does not exist", "clipq-search spaces"),
    ),
    ("space-not-yaml", pretrain_text("model: [lenet300\nlayers: {\n"), ("not valid YAML", "line", "fix the syntax")),
    ("space-not-mapping", pretrain_text("- lenet300\n- fashion-mnist\n"), ("must be a YAML mapping", "list")),
    ("space-empty", pretrain_text(""), ("space.yaml", "is empty", "smoke.yaml")),
    (
        "space-unknown-key",
        pretrain_text(SMOKE.read_text().replace("\nmodel:", "\nmodle:")),
        ("'modle'", "did you mean 'model'"),
    ),
    (
        "space-unknown-nested-key",
        pretrain_edited(_set("trial.train.epoch", 1)),
        ("'trial.train.epoch'", "did you mean 'epochs'"),
    ),
    # p, bits and ranges
    ("p-is-1", search_edited(_default(p=[0.3, 1.0])), ("space.yaml: layers.default.p", "[0.0, 1.0)")),
    ("p-negative", search_edited(_default(p=-0.1)), ("layers.default.p=-0.1", "[0.0, 1.0)")),
    ("p-not-number", search_edited(_default(p="high")), ("layers.default.p='high'", "numbers")),
    ("bits-9", search_edited(_default(bits=[2, 9])), ("layers.default.bits", "[2, 8]")),
    ("bits-1", search_edited(_default(bits=1)), ("layers.default.bits=1", "[2, 8]")),
    ("bits-not-int", search_edited(_default(bits=3.5)), ("bits=3.5", "integers")),
    (
        "override-bits",
        search_edited(_layers(overrides={"fc1": {"bits": [3, 12]}})),
        ("layers.overrides.fc1.bits", "[2, 8]"),
    ),
    ("override-not-mapping", search_edited(_layers(overrides={"fc1": 0.5})), ("layers.overrides.fc1", "p and/or bits")),
    ("p-low-above-high", search_edited(_default(p=[0.9, 0.3])), ("low > high", "low <= high")),
    ("bits-low-above-high", search_edited(_default(bits=[6, 2])), ("bits=[6, 2]", "low > high")),
    ("set-p-out-of-range", search("--set", "layers.default.p=1.5"), ("layers.default.p=1.5", "[0.0, 1.0)")),
    # layer names
    ("override-unknown-layer", search_edited(_layers(overrides={"fc9": {"p": 0.5}})), ("'fc9'", ALL_LAYERS)),
    ("dense-pattern-no-match", search_edited(_layers(dense=["conv*"])), ("'conv*'", ALL_LAYERS)),
    (
        "group-unknown-member",
        search_edited(_layers(groups={"g": ["fc1", "re:features\\..*"]})),
        ("features", ALL_LAYERS),
    ),
    ("all-dense", search_edited(_layers(dense=["fc*"])), ("every layer", "layers.dense", ALL_LAYERS)),
    ("all-dense-pretrain", pretrain_edited(_layers(dense=TRIPLE_FC)), ("every layer", "layers.dense")),
    ("nothing-to-search", search_edited(_default(p=0.5, bits=3)), ("nothing to search", "range")),
    (
        "override-bad-regex",
        search_edited(_layers(overrides={"re:fc[": {"p": 0.5}})),
        ("'re:fc['", "regular expression"),
    ),
    ("epochs-zero", search_edited(_set("trial.train.epochs", 0)), ("trial.train.epochs", "(0, inf]")),
    ("set-into-a-value", search("--set", "trial.train.epochs.x=1"), ("'trial.train.epochs' is a value", "=VALUE")),
    ("set-group-not-list", search("--set", "layers.groups.g=fc1"), ("layers.groups must be", "list")),
    ("results-is-a-file", cmd("pretrain", str(SMOKE), "--results", str(SMOKE)), ("is a file, not a folder",)),
    # model, dataset, sampler
    ("unknown-model", search("--set", "model=lenet301"), ("model=lenet301", "lenet300")),
    ("unknown-model-yaml", pretrain_edited(_set("model", "resnet21")), ("'resnet21'", "resnet20")),
    ("unknown-dataset", search("--set", "dataset.name=fashion"), ("dataset.name=fashion", "fashion-mnist")),
    ("unknown-sampler-yaml", search_edited(_set("search.sampler", "bayes")), ("'bayes'", "tpe")),
    ("unknown-sampler-flag", search("--sampler", "bayes"), ("'bayes'", "tpe")),
    ("unknown-device", search("--set", "resources.device=tpu"), ("'tpu'", "cpu")),
    ("dataset-dir-missing", search("--set", "dataset.root={tmp}/no_data"), ("no_data", "does not exist")),
    ("dataset-root-needed", search("--set", "dataset.name=cifar10"), ("dataset.root is required", "dataset.root=")),
    (
        "dataset-bad-idx",
        search("--set", "dataset.root={a.bad_idx_dir}"),
        ("train-images-idx3-ubyte", "bad IDX magic", "replace it"),
    ),
    ("dataset-incomplete", search("--set", "dataset.root={a.root}"), ("incomplete", "IDX files")),
    ("val-size-too-big", search("--set", "dataset.val_size=60000"), ("val_size=60000", "fewer")),
    # the baseline checkpoint
    (
        "checkpoint-missing",
        search("--set", "baseline.checkpoint={tmp}/none.pt"),
        ("none.pt", "does not exist", "baseline.checkpoint"),
    ),
    (
        "checkpoint-random-bytes",
        search("--set", "baseline.checkpoint={a.random_bytes}"),
        ("random.pt", "not written by torch.save", "baseline.checkpoint"),
    ),
    (
        "checkpoint-other-architecture",
        search("--set", "baseline.checkpoint={a.lenet5_ckpt}"),
        ("lenet5.pt", "does not match", "lenet300", "baseline.checkpoint"),
    ),
    (
        "checkpoint-other-architecture-pretrain",
        pretrain_edited(_set("model", "lenet300"), "--set", "baseline.checkpoint={a.lenet5_ckpt}"),
        ("lenet5.pt", "does not match", "lenet300"),
    ),
    # flags and --set
    *[
        (f"{flag[2:]}-{bad}", search(flag, bad), (flag, repr(bad), "positive integer"))
        for flag in ("--trials", "--concurrency")
        for bad in ("0", "-1", "abc")
    ],
    ("seed-not-int", search("--seed", "x"), ("--seed", "'x'")),
    ("set-unknown-key", search("--set", "serach.trials=3"), ("'serach'", "did you mean 'search'")),
    ("set-unknown-leaf", search("--set", "search.trails=3"), ("'search.trails'", "did you mean 'trials'")),
    ("set-wrong-type", search("--set", "search.trials=abc"), ("search.trials=abc", "integer")),
    ("set-wrong-type-float", search("--set", "dataset.val_size=0.5"), ("dataset.val_size", "integer")),
    ("set-section", search("--set", "search=3"), ("'search' is a section", "trials")),
    ("set-no-equals", search("--set", "search.trials"), ("KEY.PATH=VALUE",)),
    # where the search runs and stores its study
    ("address-not-host-port", search("--address", "nowhere"), ("nowhere", "HOST:PORT")),
    ("storage-missing-dir", search("--storage", "sqlite:////nonexistent/dir/x.db"), ("/nonexistent/dir", "sqlite:///")),
    ("storage-unknown-scheme", search("--storage", "foo://bar"), ("foo://bar", "'foo'", "sqlite:///")),
    ("storage-not-url", search("--storage", "study.db"), ("study.db", "not a database URL", "sqlite:///")),
    # run directories
    *[
        (f"{c}-not-a-run", cmd(c, "{a.not_a_run}"), ("not_a_run", "not a run directory", "search"))
        for c in ("report", "export", "final")
    ],
    *[
        (f"{c}-missing-path", cmd(c, "{tmp}/no_run"), ("no_run", "does not exist", "search"))
        for c in ("report", "export", "final")
    ],
    *[
        (f"{c}-file-not-run", cmd(c, str(SMOKE)), ("smoke.yaml", "is a file, not a folder", "search"))
        for c in ("report", "export", "final")
    ],
    ("export-bad-trial", cmd("export", "{run}", "--trial", "x"), ("--trial", "'x'")),
    ("export-baseline-not-object", cmd("export", "{a.root}/run_base_list"), ("baseline.json", "JSON object", "rerun")),
    ("export-baseline-broken", cmd("export", "{a.root}/run_base_broken"), ("baseline.json", "unreadable", "rerun")),
    (
        "final-baseline-incomplete",
        cmd("final", "{a.root}/run_base_short", "--config", "{a.plans[good]}"),
        ("baseline.json", "lacks", "checkpoint", "rerun"),
    ),
    # .clipq files
    ("inspect-missing", cmd("inspect", "{tmp}/none.clipq"), ("none.clipq", "does not exist")),
    ("inspect-directory", cmd("inspect", "{tmp}"), ("is a directory", ".clipq")),
    ("inspect-truncated", cmd("inspect", "{a.clipq[truncated]}"), ("truncated.clipq", "truncated", "re-create")),
    ("inspect-wrong-magic", cmd("inspect", "{a.clipq[magic]}"), ("magic.clipq", "not a .clipq file")),
    ("inspect-wrong-version", cmd("inspect", "{a.clipq[version]}"), ("version.clipq", "version 99", "version 1")),
    ("inspect-checksum", cmd("inspect", "{a.clipq[checksum]}"), ("checksum.clipq", "checksum", "re-create")),
    ("inspect-not-clipq", cmd("inspect", "{a.lenet300_ckpt}"), ("lenet300.pt", "not a .clipq file")),
    # plans for `final --config`, and other bad input to `final`
    (
        "final-config-missing",
        cmd("final", "{run}", "--config", "{tmp}/plan.json"),
        ("plan.json", "does not exist", "export"),
    ),
    ("final-config-directory", cmd("final", "{run}", "--config", "{tmp}"), ("is a directory", "plan JSON")),
    (
        "final-config-not-json",
        cmd("final", "{run}", "--config", "{a.plans[not_json]}"),
        ("plan_not_json.json", "not valid JSON"),
    ),
    (
        "final-config-not-a-plan",
        cmd("final", "{run}", "--config", "{a.plans[not_a_plan]}"),
        ("plan_list.json", "expected a mapping"),
    ),
    (
        "final-config-bad-bits",
        cmd("final", "{run}", "--config", "{a.plans[bad_bits]}"),
        ("plan_bad_bits.json", "'fc1'", "[2, 8]"),
    ),
    (
        "final-config-unknown-layer",
        cmd("final", "{run}", "--config", "{a.plans[unknown_layer]}"),
        ("'fc9'", ALL_LAYERS),
    ),
    (
        "final-set-unknown-key",
        cmd("final", "{run}", "--set", "final.train.epoc=1"),
        ("'final.train.epoc'", "did you mean 'epochs'"),
    ),
    (
        "final-address-unreachable",
        cmd("final", "{run}", "--config", "{a.plans[good]}", "--address", "127.0.0.1:1"),
        ("127.0.0.1:1", "ray start --head"),
    ),
    ("final-no-trials", cmd("final", "{run}"), ("no trials.csv", "search")),
]
if not torch.cuda.is_available():  # asking for GPUs where there are none: refused, not a silent wait forever
    CASES.append(
        ("gpus-without-cuda", search("--set", "resources.gpus_per_trial=1"), ("gpus_per_trial=1", "no CUDA GPU"))
    )


@pytest.fixture
def ctx(tmp_path: Path, assets: Assets) -> Ctx:
    results = tmp_path / "results"
    results.mkdir()
    return Ctx(tmp_path, results, assets)


@pytest.mark.parametrize(("args", "needles"), [pytest.param(a, n, id=i) for i, a, n in CASES])
def test_bad_input_is_one_clear_line(ctx: Ctx, args: Callable[[Ctx], list[str]], needles: tuple[str, ...]) -> None:
    argv = args(ctx)
    before = _tree(ctx.tmp, ctx.a.root)
    res, _ = _run(argv)
    _check_rejected(res, needles)
    assert _tree(ctx.tmp, ctx.a.root) == before, "the failed command left files behind"


def test_unreachable_address_fails_fast(ctx: Ctx) -> None:
    before = _tree(ctx.tmp)
    res, seconds = _run(search("--address", "127.0.0.1:1")(ctx))
    _check_rejected(res, ("127.0.0.1:1", "ray start --head"))
    assert seconds < 30
    assert _tree(ctx.tmp) == before


def test_debug_shows_the_traceback(ctx: Ctx) -> None:
    res, _ = _run(["--debug", "pretrain", str(ctx.tmp / "nope.yaml"), "--results", str(ctx.results)])
    assert res.returncode == 2
    assert "Traceback (most recent call last)" in res.stderr
    assert res.stderr.splitlines()[-1].startswith("error: space file")


def test_good_clipq_file_still_inspects(assets: Assets) -> None:
    """The corrupted copies fail because of the corruption, not because the original is bad."""
    res, _ = _run(["inspect", str(assets.clipq["good"])])
    assert res.returncode == 0, res.stderr
    assert "fc1.weight" in res.stdout
