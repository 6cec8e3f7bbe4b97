"""Bad input gets a clear answer: a table of hostile and careless inputs through the real command line.

Every case runs ``clipq_search.cli.main(argv)`` in this process (a fresh
interpreter per case would take minutes) and must be answered as promised:
exit 2, exactly one line on stderr (no traceback) naming the problem and its
fix, nothing written anywhere (the case's folder, the shared inputs, the
working folder), no file of the user's changed, within 10 s and 500 MB. A
few cases also run as real subprocesses (an interpreter's traceback or a hang
shows there). Cases are written by hand (each defect found) and generated
(every key of the space schema with a wrong type, out of range, or null; every
flag with bad values; bad files of each kind).
"""

from __future__ import annotations

import http.server
import json
import os
import random
import resource
import shutil
import signal
import struct
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from clipq_search.cli import main as cli_main
from clipq_search.search.space import SCHEMA, yaml_load

from .conftest import SMOKE, needs_fashion

pytestmark = needs_fashion

LIMIT_S = 10  # each case: seconds
LIMIT_BYTES = 500 << 20  # each case: growth of the process's peak memory
MAX_LINE = 1500  # the error line: user text in it is quoted at a bounded length

# -- running the command line --------------------------------------------------------------


class _Hang(BaseException):
    pass


def _alarm(signum: int, frame: object) -> None:
    raise _Hang


@dataclass
class Outcome:
    code: int | str | None
    out: str
    err: str
    seconds: float
    grew: int  # bytes the process's peak memory grew by
    torch: bool | None = None  # whether the command imported torch (its own interpreter only)


def run_in_process(argv: list[str], capfd: pytest.CaptureFixture[str]) -> Outcome:
    """``main(argv)`` here, with a time limit (SIGALRM ends even a blocked read) and peak-memory growth."""
    capfd.readouterr()
    peak0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    old = signal.signal(signal.SIGALRM, _alarm)
    signal.setitimer(signal.ITIMER_REAL, LIMIT_S)
    t0 = time.perf_counter()
    code: int | str | None
    try:
        code = cli_main(argv)
    except SystemExit as exc:  # argparse's errors, and anything else that exits
        code = exc.code
    except _Hang:
        code = "hang"
    finally:
        seconds = time.perf_counter() - t0
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    grew = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak0) * 1024
    out, err = capfd.readouterr()
    return Outcome(code, out, err, seconds, grew)


# The command line as run_search.py runs it, timing itself from after the interpreter has started.
_TIMED_MAIN = """
import os, sys, time
t0 = time.perf_counter()
try:
    from clipq_search.cli import main
    code = main(sys.argv[1:])
except SystemExit as exc:
    code = exc.code
finally:
    with open(os.environ["CLIPQ_TEST_SECONDS"], "w") as fh:
        fh.write(f"{time.perf_counter() - t0} {int('torch' in sys.modules)}")
sys.exit(code)
"""


def run_subprocess(argv: list[str], cwd: Path, timeout: float = 60) -> Outcome:
    """The real command in its own interpreter; ``seconds`` counts from the interpreter's start (not its launch)."""
    clock = cwd / ".seconds"
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "CLIPQ_TEST_SECONDS": str(clock)}
    t0 = time.perf_counter()
    try:
        res = subprocess.run(
            [sys.executable, "-c", _TIMED_MAIN, *argv],
            cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout,
        )
    except subprocess.TimeoutExpired as exc:
        return Outcome("hang", str(exc.stdout or ""), str(exc.stderr or ""), time.perf_counter() - t0, 0)
    seconds, torch = time.perf_counter() - t0, None
    if clock.exists():
        took, imported = clock.read_text().split()
        seconds, torch = float(took), imported == "1"
    clock.unlink(missing_ok=True)
    return Outcome(res.returncode, res.stdout, res.stderr, seconds, 0, torch)


def _tree(*roots: Path) -> dict[str, tuple[int, int] | None]:
    """Every path under ``roots`` with (size, mtime) for files: a before/after fingerprint."""
    out: dict[str, tuple[int, int] | None] = {}
    for root in roots:
        for p in root.rglob("*"):
            st = p.lstat()
            out[str(p)] = (st.st_size, st.st_mtime_ns) if p.is_file() and not p.is_symlink() else None
    return out


def check_rejected(res: Outcome, needles: tuple[str, ...]) -> str:
    """Exit 2 and exactly one stderr line (no traceback) containing every needle, in time and memory."""
    assert res.code != "hang", f"no answer within {LIMIT_S} s; stderr={res.err[-2000:]!r}"
    lines = res.err.splitlines()
    assert res.code == 2, f"exit {res.code!r}; stdout={res.out[-2000:]!r} stderr={res.err[-2000:]!r}"
    assert len(lines) == 1, f"expected one stderr line, got {len(lines)}:\n{res.err[-4000:]}"
    line = lines[0]
    assert "Traceback" not in line
    assert line.startswith(("error: ", "clipq-search")), line
    assert len(line) <= MAX_LINE, f"a {len(line)}-character error line: {line[:300]}..."
    for needle in needles:
        assert needle in line, f"{needle!r} not in {line!r}"
    # nothing started: no training, no Ray
    assert "pretraining" not in res.out and "Ray" not in res.out, res.out
    assert res.seconds < LIMIT_S, f"took {res.seconds:.1f} s"
    assert res.grew < LIMIT_BYTES, f"peak memory grew by {res.grew / 2**20:.0f} MB"
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
    spaces: dict[str, Path]
    not_a_run: Path
    fifo: Path


def _write_idx(path: Path, magic: bytes, dims: tuple[int, ...], fill: int = 0) -> None:
    n = 1
    for d in dims:
        n *= d
    path.write_bytes(magic + struct.pack(f">{len(dims)}I", *dims) + bytes([fill]) * n)


_BOMB = """\
a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]
b: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]
c: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]
d: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c]
e: &e [*d,*d,*d,*d,*d,*d,*d,*d,*d]
f: &f [*e,*e,*e,*e,*e,*e,*e,*e,*e]
g: &g [*f,*f,*f,*f,*f,*f,*f,*f,*f]
h: &h [*g,*g,*g,*g,*g,*g,*g,*g,*g]
i: &i [*h,*h,*h,*h,*h,*h,*h,*h,*h]
"""
# An alias bomb inside a real key, whose value is refused: the refusal used to quote all of it.
_BOMB_IN_A_VALUE = """\
model: lenet300
layers:
  dense: &a [[x, x, x, x, x, x, x, x], [x, x, x, x, x, x, x, x]]
  groups: {g: [*a, *a, *a, *a, *a, *a, *a, *a, *a, *a, *a, *a, *a, *a, *a, *a]}
description: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a, *a, *a, *a, *a, *a, *a, *a]
name: [*b, *b, *b, *b, *b, *b, *b, *b, *b, *b, *b, *b, *b, *b, *b, *b]
"""


def _crafted_clipq(shape: tuple[int, int]) -> bytes:
    """A tiny sparse record with no entries that declares ``shape``."""
    body = (
        b"CLIPQ\0" + struct.pack("<HI", 1, 1) + struct.pack("<H", 1) + b"w" + struct.pack("<BBB", 1, 0, 2)
        + struct.pack("<II", *shape) + struct.pack("<BBfI", 2, 4, 0.5, 0) + bytes(12)
    )
    return body + struct.pack("<I", zlib.crc32(body))


def _fake_run(path: Path, root: Path) -> Path:
    """A run directory as `search` leaves it (space, baseline, run.json), with a random-init baseline."""
    from clipq_search.search.space import load_space

    path.mkdir()
    (path / "space.yaml").write_text(load_space(SMOKE).to_yaml())
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
    (path / "baseline.json").write_text(json.dumps(baseline))
    (path / "run.json").write_text(json.dumps({"storage": f"sqlite:///{path / 'study.db'}", "name": path.name}))
    return path


@pytest.fixture(scope="session")
def assets(tmp_path_factory: pytest.TempPathFactory) -> Assets:
    """Bad and good inputs, made once and cheaply (random-init weights, no training)."""
    from clipq_search.core.encoding import save_compressed
    from clipq_search.core.plan import Plan
    from clipq_search.search.final import _checkpoints
    from clipq_search.search.space import load_space
    from clipq_search.search.trial import train_config
    from clipq_search.training.loop import save_state_dict
    from clipq_search.training.models import build_model

    root = tmp_path_factory.mktemp("cli_assets")
    torch.manual_seed(0)
    lenet300 = build_model("lenet300")
    save_state_dict(lenet300, root / "lenet300.pt")
    save_state_dict(build_model("lenet5"), root / "lenet5.pt")
    (root / "random.pt").write_bytes(random.Random(0).randbytes(4096))
    (root / "empty.pt").write_bytes(b"")
    fifo = root / "fifo"
    os.mkfifo(fifo)

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
    clipq["empty"] = root / "empty.clipq"
    clipq["empty"].write_bytes(b"")
    for shape in ((50000, 30000), (20000, 20000)):
        clipq[f"{shape[0]}x{shape[1]}"] = root / f"crafted-{shape[0]}x{shape[1]}.clipq"
        clipq[f"{shape[0]}x{shape[1]}"].write_bytes(_crafted_clipq(shape))

    run = _fake_run(root / "run", root)
    plans = {name: root / f"plan_{name}.json" for name in ("good", "not_json", "unknown_layer", "bad_bits")}
    plans["good"].write_text(json.dumps({"layers": {"fc1": {"p": 0.9, "bits": 3}}, "default": {"p": 0.5, "bits": 4}}))
    plans["not_json"].write_text("{layers: fc1")
    plans["unknown_layer"].write_text(json.dumps({"layers": {"fc9": {"p": 0.5, "bits": 3}}}))
    plans["bad_bits"].write_text(json.dumps({"layers": {"fc1": {"p": 0.5, "bits": 12}}}))
    plans["not_a_plan"] = root / "plan_list.json"
    plans["not_a_plan"].write_text("[1, 2]")
    plans["nan"] = root / "plan_nan.json"
    plans["nan"].write_text('{"layers": {"fc1": {"p": NaN, "bits": 3}}}')
    plans["deep"] = root / "plan_deep.json"
    plans["deep"].write_text("[" * 200_000 + "]" * 200_000)
    plans["big"] = root / "plan_big.json"
    plans["big"].write_text('{"layers": {}, "pad": "' + "x" * (5 << 20) + '"}')
    plans["huge_key"] = root / "plan_huge_key.json"
    plans["huge_key"].write_text(json.dumps({"layers": {"f" * 300_000: {"p": 0.5, "bits": 3}}}))
    plans["binary"] = root / "plan_binary.json"
    plans["binary"].write_bytes(random.Random(1).randbytes(2000))
    for name, text in (("run_base_list", "[]"), ("run_base_broken", "{oops"), ("run_base_short", '{"val_top1": 10}')):
        shutil.copytree(run, root / name)
        (root / name / "baseline.json").write_text(text)
    shutil.copytree(run, root / "run_trials_binary")
    (root / "run_trials_binary" / "trials.csv").write_bytes(random.Random(2).randbytes(3000))
    shutil.copytree(run, root / "run_space_fifo")
    (root / "run_space_fifo" / "space.yaml").unlink()
    os.mkfifo(root / "run_space_fifo" / "space.yaml")
    shutil.copytree(run, root / "run_base_zero")
    (root / "run_base_zero" / "baseline.json").unlink()
    (root / "run_base_zero" / "baseline.json").symlink_to("/dev/zero")

    # A finished final of another plan (must not be replaced without --force) and a corrupt checkpoint.
    space = load_space(SMOKE)
    setup = {"plan": Plan.load(plans["good"]).to_dict(), "train": train_config(space, "final").to_dict()}
    other = _fake_run(root / "run_final_other", root)
    (other / "final").mkdir()
    (other / "final" / "metrics.json").write_text(
        json.dumps({"plan": Plan.uniform(0.5, 4).to_dict(), "source": {"trial": 7}, "setup": "0123456789ab"})
    )
    (other / "final" / "model.clipq").write_bytes(data)
    corrupt = _fake_run(root / "run_bad_ckpt", root)
    (corrupt / "final").mkdir()
    _checkpoints(corrupt / "final", setup)["compressed"].write_bytes(b"PK\x03\x04 not a checkpoint")

    not_a_run = root / "not_a_run"
    not_a_run.mkdir()
    (not_a_run / "notes.txt").write_text("hello\n")

    smoke = SMOKE.read_text()
    texts = {
        "bomb": _BOMB,
        "bomb_in_a_value": _BOMB_IN_A_VALUE,
        "deep": "[" * 5000 + "]" * 5000,
        "deep_map": "".join("  " * i + f"k{i}:\n" for i in range(200)),
        "big": "# padding\n" * (150 << 10),
        "huge_value": "model: [" + ", ".join(["0"] * 300_000) + "]\n",
        "long_value": "model: [" + ", ".join(["0"] * 10_000) + "]\n",
        "long_string": "model: " + "x" * 1_000_000 + "\n",
        "huge_key": smoke + "\n" + "k" * 300_000 + ": 1\n",
        "tabs": "model:\tlenet300\n\tdataset: x\n",
        "name_dotdot": smoke.replace("name: smoke", "name: ../.."),
        "name_slash": smoke.replace("name: smoke", "name: a/b"),
        "model_exit": smoke.replace("model: lenet300", "model: builtins:exit"),
        "lr_word": smoke.replace("lr: 0.01", "lr: 1e-3x"),
        "merge_key": "base: &b {model: lenet300}\nspace:\n  <<: *b\n",
    }
    spaces = {}
    for name, text in texts.items():
        spaces[name] = root / f"space_{name}.yaml"
        spaces[name].write_text(text)
    spaces["binary"] = root / "space_binary.yaml"
    spaces["binary"].write_bytes(random.Random(3).randbytes(4000))
    spaces["latin1"] = root / "space_latin1.yaml"
    spaces["latin1"].write_bytes(b"model: caf\xe9\n")
    spaces["zero_link"] = root / "space_zero.yaml"
    spaces["zero_link"].symlink_to("/dev/zero")
    return Assets(
        root, root / "lenet300.pt", root / "lenet5.pt", root / "random.pt", idx, clipq, run, plans, spaces,
        not_a_run, fifo,
    )


class _QuietHandler(http.server.BaseHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        pass


@pytest.fixture(scope="session")
def http_port() -> Iterator[int]:
    """A web server on loopback: an open port that is not a Ray cluster."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _QuietHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


# -- the cases --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Ctx:
    tmp: Path
    results: Path
    a: Assets
    port: int

    def fill(self, text: str) -> str:
        return text.format(tmp=self.tmp, a=self.a, run=self.a.run_dir, port=self.port, results=self.results)

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


Argv = Callable[[Ctx], list[str]]
Setup = Callable[[Ctx], None]


@dataclass(frozen=True)
class Case:
    id: str
    argv: Argv
    needles: tuple[str, ...]
    setup: Setup | None = None


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


def search(*extra: str) -> Argv:
    """``search smoke.yaml --results DIR EXTRA...`` (``{tmp}``, ``{a.x}``, ``{port}`` in EXTRA are filled in)."""
    return lambda c: ["search", str(SMOKE), "--results", str(c.results), *(c.fill(e) for e in extra)]


def search_edited(edit: Callable[[dict], None], *extra: str) -> Argv:
    """``search`` on a copy of smoke.yaml changed by ``edit``."""
    return lambda c: ["search", c.space(edit=edit), "--results", str(c.results), *(c.fill(e) for e in extra)]


def pretrain_text(text: str) -> Argv:
    """``pretrain`` on a space file holding ``text``."""
    return lambda c: ["pretrain", c.space(text), "--results", str(c.results)]


def pretrain_edited(edit: Callable[[dict], None], *extra: str) -> Argv:
    return lambda c: ["pretrain", c.space(edit=edit), "--results", str(c.results), *(c.fill(e) for e in extra)]


def cmd(*argv: str) -> Argv:
    """Any command; ``{tmp}``, ``{a.x}``, ``{run}``, ``{port}`` and ``{results}`` are filled in."""
    return lambda c: [c.fill(a) for a in argv]


def files(*paths_and_texts: tuple[str, str]) -> Setup:
    """Setup: write each (path, text) (``{tmp}`` etc. filled in) before the case runs."""

    def setup(c: Ctx) -> None:
        for path, text in paths_and_texts:
            p = Path(c.fill(path))
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_text(text)

    return setup


ALL_LAYERS = "fc1, fc2, fc3"
TRIPLE_FC = ["fc1", "fc2", "fc3"]
USER_TRIALS = "number,state\n1,MINE\n"

# (id, argv, needles) found in earlier rounds of trying bad input
EARLIER: list[tuple[str, Argv, tuple[str, ...]]] = [
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

# (id, argv, needles, setup) of issue 19: confined run names, bounded reads, no hangs, clear answers
HOSTILE: list[Case] = [
    # 1. run names are one folder under --results; a folder of the user's is never written into
    *[
        Case(f"name-{label}", search("--name", name), ("run name", "--name", "letters, digits"))
        for label, name in (
            ("dotdot", ".."), ("dot", "."), ("up", "../mine"), ("up-up", "../../x"), ("abs", "{tmp}/mine"),
            ("abs-up", "{tmp}/results/../mine"), ("slash", "a/b"), ("empty", ""), ("space", "a b"),
            ("newline", "a\nb"), ("long", "x" * 101), ("accent", "café"), ("nul-like", "a\\x00b"),
        )
    ],
    Case(
        "name-escapes-onto-a-users-trials",
        search("--name", "../mine", "--trials", "1", "--concurrency", "1"),
        ("run name", "'../mine'"),
        files(("{tmp}/mine/trials.csv", USER_TRIALS)),
    ),
    Case(
        "name-absolute-onto-a-users-trials",
        search("--name", "{tmp}/mine", "--trials", "1", "--concurrency", "1"),
        ("run name",),
        files(("{tmp}/mine/trials.csv", USER_TRIALS)),
    ),
    Case("name-from-space-file", cmd("search", "{a.spaces[name_dotdot]}", "--results", "{results}"), ("'../..'",)),
    Case("name-slash-from-space-file", cmd("search", "{a.spaces[name_slash]}", "--results", "{results}"), ("'a/b'",)),
    Case("name-by-set", search("--set", "name=.."), ("run name", "'..'")),
    Case(
        "run-folder-holds-users-trials",
        search("--name", "mine"),
        ("mine", "did not write", "trials.csv", "another --name"),
        files(("{results}/mine/trials.csv", USER_TRIALS)),
    ),
    Case(
        "run-folder-holds-users-notes",
        search("--name", "mine"),
        ("did not write", "notes.txt"),
        files(("{results}/mine/notes.txt", "mine\n")),
    ),
    Case(
        "run-folder-is-a-file",
        search("--name", "mine"),
        ("is a file, not a run folder",),
        files(("{results}/mine", "a file\n")),
    ),
    # 3. addresses that are not a Ray cluster fail in seconds
    Case("address-web-server", search("--address", "127.0.0.1:{port}"), ("127.0.0.1:", "not a Ray cluster")),
    Case("address-web-server-ray-client", search("--address", "ray://127.0.0.1:{port}"), ("not a Ray cluster",)),
    Case("final-address-web-server", cmd("final", "{run}", "--address", "127.0.0.1:{port}"), ("not a Ray cluster",)),
    Case("address-closed", search("--address", "127.0.0.1:1"), ("127.0.0.1:1", "ray start --head")),
    Case("address-ray-client-closed", search("--address", "ray://127.0.0.1:1"), ("ray://127.0.0.1:1",)),
    *[
        Case(f"address-{label}", search("--address", bad), ("HOST:PORT",))
        for label, bad in (("no-host", ":6379"), ("port-word", "host:abc"), ("port-0", "127.0.0.1:0"),
                           ("port-big", "127.0.0.1:99999"), ("empty-port", "127.0.0.1:"))
    ],
    # 4. seeds
    *[
        Case(f"seed-{label}", search("--seed", bad), ("--seed", "[0, 4294967295]"))
        for label, bad in (("negative", "-1"), ("huge", "99999999999999999999"), ("2-32", "4294967296"))
    ],
    Case("seed-float", search("--seed", "1.5"), ("--seed", "not an integer")),
    Case("seed-set-negative", search("--set", "search.seed=-1"), ("search.seed", "[0, 4294967295]")),
    Case("seed-set-2-64", search("--set", "trial.train.seed=18446744073709551616"), ("trial.train.seed",)),
    # 5. unbounded reads: devices, pipes, huge files, YAML aliases, deep nesting
    Case("inspect-dev-zero", cmd("inspect", "/dev/zero"), ("/dev/zero", "character device", "not a regular file")),
    Case("inspect-fifo", cmd("inspect", "{a.fifo}"), ("fifo", "named pipe")),
    Case("inspect-empty", cmd("inspect", "{a.clipq[empty]}"), ("empty.clipq", "not a .clipq file")),
    Case("inspect-50000x30000", cmd("inspect", "{a.clipq[50000x30000]}"), ("[50000, 30000]", "entries reach")),
    Case("inspect-20000x20000", cmd("inspect", "{a.clipq[20000x20000]}"), ("[20000, 20000]", "entries reach")),
    Case("search-dev-zero", cmd("search", "/dev/zero", "--results", "{results}"), ("/dev/zero", "character device")),
    Case("search-fifo", cmd("search", "{a.fifo}", "--results", "{results}"), ("named pipe",)),
    Case("pretrain-zero-link", cmd("pretrain", "{a.spaces[zero_link]}", "--results", "{results}"), ("device",)),
    Case("space-too-big", cmd("pretrain", "{a.spaces[big]}", "--results", "{results}"), ("larger than 1 MiB",)),
    Case("space-alias-bomb", cmd("pretrain", "{a.spaces[bomb]}", "--results", "{results}"), ("YAML alias", "line 2")),
    Case(
        "space-alias-bomb-in-a-value",
        cmd("pretrain", "{a.spaces[bomb_in_a_value]}", "--results", "{results}"),
        ("YAML alias",),
    ),
    Case("space-merge-key", cmd("pretrain", "{a.spaces[merge_key]}", "--results", "{results}"), ("YAML alias",)),
    Case("space-deep", cmd("pretrain", "{a.spaces[deep]}", "--results", "{results}"), ("nests deeper than",)),
    Case("space-deep-map", cmd("pretrain", "{a.spaces[deep_map]}", "--results", "{results}"), ("nests deeper",)),
    Case("space-huge-value", cmd("pretrain", "{a.spaces[huge_value]}", "--results", "{results}"), ("20,000 values",)),
    Case("space-long-value", cmd("pretrain", "{a.spaces[long_value]}", "--results", "{results}"), ("model=[0, 0",)),
    Case("space-huge-key", cmd("pretrain", "{a.spaces[huge_key]}", "--results", "{results}"), ("not valid YAML",)),
    Case("space-long-string", cmd("pretrain", "{a.spaces[long_string]}", "--results", "{results}"), ("'xxxx",)),
    Case("space-binary", cmd("pretrain", "{a.spaces[binary]}", "--results", "{results}"), ("space_binary.yaml",)),
    Case("space-latin1", cmd("pretrain", "{a.spaces[latin1]}", "--results", "{results}"), ("is not text",)),
    Case("space-tabs", cmd("pretrain", "{a.spaces[tabs]}", "--results", "{results}"), ("not valid YAML",)),
    Case("set-alias", search("--set", "name=*a"), ("--set name", "YAML alias")),
    Case("final-config-dev-zero", cmd("final", "{run}", "--config", "/dev/zero"), ("/dev/zero", "character device")),
    Case("final-config-fifo", cmd("final", "{run}", "--config", "{a.fifo}"), ("plan file", "named pipe")),
    Case("final-config-deep", cmd("final", "{run}", "--config", "{a.plans[deep]}"), ("nests too deeply",)),
    Case("final-config-big", cmd("final", "{run}", "--config", "{a.plans[big]}"), ("larger than 4 MiB",)),
    Case("final-config-nan", cmd("final", "{run}", "--config", "{a.plans[nan]}"), ("p=nan", "[0, 1)")),
    Case("final-config-huge-key", cmd("final", "{run}", "--config", "{a.plans[huge_key]}"), ("'fffff",)),
    Case("final-config-binary", cmd("final", "{run}", "--config", "{a.plans[binary]}"), ("not valid JSON",)),
    Case("final-run-space-fifo", cmd("final", "{a.root}/run_space_fifo"), ("no space.yaml",)),
    Case("export-run-baseline-zero", cmd("export", "{a.root}/run_base_zero"), ("no baseline.json",)),
    Case("export-out-dev-zero", cmd("export", "{run}", "--out", "/dev/zero"), ("/dev/zero", "not a plan exported")),
    Case("export-out-fifo", cmd("export", "{run}", "--out", "{a.fifo}"), ("fifo", "not a plan exported")),
    Case("export-trials-binary", cmd("export", "{a.root}/run_trials_binary"), ("trials.csv", "unreadable")),
    Case("report-trials-binary", cmd("report", "{a.root}/run_trials_binary"), ("trials.csv", "unreadable")),
    Case("checkpoint-fifo", search("--set", "baseline.checkpoint={a.fifo}"), ("fifo", "not a regular file")),
    Case("checkpoint-dev-zero", search("--set", "baseline.checkpoint=/dev/zero"), ("/dev/zero", "not a regular")),
    Case("checkpoint-empty", search("--set", "baseline.checkpoint={a.root}/empty.pt"), ("empty.pt", "torch.save")),
    Case("checkpoint-directory", search("--set", "baseline.checkpoint={tmp}"), ("is a directory",)),
    # 6. wrongly accepted or badly answered
    Case("lr-word", cmd("pretrain", "{a.spaces[lr_word]}", "--results", "{results}"), ("lr='1e-3x'",)),
    Case(
        "group-layer-twice",
        search("--set", "layers.groups.a=[fc1, fc2]", "--set", "layers.groups.b=[fc2]"),
        ("'fc2'", "layers.groups.a", "layers.groups.b", "one group at most"),
    ),
    Case(
        "group-layer-twice-by-pattern",
        search_edited(_layers(groups={"a": ["fc*"], "b": ["fc3"]})),
        ("'fc3'", "one group at most"),
    ),
    Case("group-empty", search("--set", "layers.groups.g=[]"), ("layers.groups.g is empty",)),
    Case(
        "group-all-dense",
        search_edited(_layers(groups={"g": ["fc1"]}, dense=["fc1"])),
        ("every layer of layers.groups.g is in layers.dense",),
    ),
    Case("model-exit", cmd("pretrain", "{a.spaces[model_exit]}", "--results", "{results}"), ("SystemExit",)),
    *[
        Case(f"model-{label}", search("--set", f"model={ref}"), needles)
        for label, ref, needles in (
            ("exit-set", "builtins:exit", ("builtins:exit", "returns a torch.nn.Module")),
            ("sys-exit", "sys:exit", ("SystemExit",)),
            ("dict", "builtins:dict", ("returned dict", "nn.Module")),
            ("not-callable", "math:pi", ("not callable",)),
            ("no-attribute", "os:nothing", ("no attribute",)),
            ("no-module", "no_such_module_xyz:f", ("cannot import",)),
            ("malformed", "a:b:c", ("malformed",)),
            ("torchvision-unknown", "torchvision:nonet", ("nonet",)),
        )
    ],
    Case(
        "final-replaces-another-plan",
        cmd("final", "{a.root}/run_final_other", "--config", "{a.plans[good]}"),
        ("run_final_other/final", "trial 7", "--force"),
    ),
    Case(
        "final-corrupt-checkpoint",
        cmd("final", "{a.root}/run_bad_ckpt", "--config", "{a.plans[good]}"),
        ("ckpt-compressed-", "delete", "afresh"),
    ),
    # more flags
    *[
        Case(f"{flag[2:]}-{label}", search(flag, bad), (flag,))
        for flag in ("--trials", "--concurrency")
        for label, bad in (("float", "1.5"), ("empty", ""), ("huge-digits", "9" * 5000))
    ],
    Case("sampler-empty", search("--sampler", ""), ("--sampler",)),
    *[
        Case(f"export-{flag[2:]}-{label}", cmd("export", "{run}", flag, bad), (flag,))
        for flag in ("--max-drop", "--min-rate")
        for label, bad in (("negative", "-1"), ("nan", "nan"), ("word", "abc"), ("empty", ""))
    ],
    Case("export-trial-float", cmd("export", "{run}", "--trial", "1.5"), ("--trial",)),
    Case("export-two-rules", cmd("export", "{run}", "--max-drop", "1", "--min-rate", "2"), ("not allowed with",)),
    Case("export-out-folder", cmd("export", "{run}", "--out", "{tmp}"), ("is a folder",)),
    Case(
        "export-out-users-file",
        cmd("export", "{run}", "--out", "{tmp}/mine.json"),
        ("mine.json", "not a plan exported"),
        files(("{tmp}/mine.json", '{"mine": 1}\n')),
    ),
    Case("init-unknown-model", cmd("init", "lenet301"), ("lenet301",)),
    Case("init-bad-dataset", cmd("init", "lenet300", "--dataset", "nope"), ("nope",)),
    Case(
        "init-out-exists",
        cmd("init", "lenet300", "--out", "{tmp}/mine.yaml"),
        ("mine.yaml", "exists", "--force"),
        files(("{tmp}/mine.yaml", "mine: 1\n")),
    ),
    Case("init-out-no-folder", cmd("init", "lenet300", "--out", "{tmp}/no/dir/s.yaml"), ("does not exist",)),
    Case("no-command", cmd(), ("required",)),
    Case("unknown-command", cmd("serach"), ("invalid choice",)),
    Case("unknown-flag", search("--trails", "3"), ("unrecognized arguments",)),
    Case("storage-sqlite-into-a-file", search("--storage", "sqlite:///{a.lenet300_ckpt}/x.db"), ("lenet300.pt",)),
    Case("results-dev-zero", cmd("pretrain", str(SMOKE), "--results", "/dev/zero"), ("not a folder",)),
]


# -- generated: every key of the space schema, wrongly typed, out of range or null ------------------------


def _leaves(schema: Mapping[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    for key, sub in schema.items():
        if isinstance(sub, Mapping):
            yield from _leaves(sub, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", sub


_WRONG_TYPE = ("abc", "[1, 2]", "{a: 1}", "true")
_NUMBERS = ("-1", "0", "-0.5", "1", "1.5", "2", "11", "101", "4294967296", "1e30", "0.5")
# p and bits are ranges ([low, high] or one value), checked when the space is built
_RANGES = {
    "layers.default.p": ("abc", "[0.1]", "[0.9, 0.1]", "1.5", "-0.1", "[0.1, 0.2, 0.3]", "true"),
    "layers.default.bits": ("abc", "1", "9", "[6, 2]", "3.5", "[2, 3, 4]", "true"),
}


def _braced(text: str) -> str:
    """``text`` as an argument template (Ctx.fill formats it)."""
    return text.replace("{", "{{").replace("}", "}}")


def _rejected(field: Any, text: str) -> bool:
    return not field.check(yaml_load(text))


def _schema_cases() -> list[Case]:
    out: list[Case] = []
    for key, field in _leaves(SCHEMA):
        if key in _RANGES:
            for bad in _RANGES[key]:
                out.append(Case(f"set-{key}={bad}", search("--set", _braced(f"{key}={bad}")), (key,)))
            out.append(Case(f"file-{key}", search_edited(_set(key, yaml_load(_RANGES[key][0]))), (key,)))
            continue
        wrong = [t for t in _WRONG_TYPE if _rejected(field, t)][:2]
        for bad in wrong:
            out.append(Case(f"set-{key}={bad}", search("--set", _braced(f"{key}={bad}")), (key,)))
        out.append(Case(f"file-{key}", pretrain_edited(_set(key, yaml_load(wrong[0]))), (key,)))
        # out of range: a number of a type the key takes, with a value it does not
        accepted_types = {type(yaml_load(t)) for t in _NUMBERS if not _rejected(field, t)}
        ranged = [t for t in _NUMBERS if _rejected(field, t) and type(yaml_load(t)) in accepted_types][:2]
        for bad in ranged:
            out.append(Case(f"range-{key}={bad}", search("--set", _braced(f"{key}={bad}")), (key,)))
        if _rejected(field, "null"):
            out.append(Case(f"null-{key}", search("--set", f"{key}="), (key,)))
    return out


CASES: list[Case] = [Case(i, a, n) for i, a, n in EARLIER] + HOSTILE + _schema_cases()
if not torch.cuda.is_available():  # asking for GPUs where there are none: refused, not a silent wait forever
    CASES.append(
        Case("gpus-without-cuda", search("--set", "resources.gpus_per_trial=1"), ("gpus_per_trial=1", "no CUDA GPU"))
    )


def test_the_table_is_large_and_its_ids_unique() -> None:
    assert len(CASES) >= 250, len(CASES)
    ids = [c.id for c in CASES]
    assert len(ids) == len(set(ids)), sorted(i for i in ids if ids.count(i) > 1)


@pytest.fixture
def ctx(tmp_path: Path, assets: Assets, http_port: int, monkeypatch: pytest.MonkeyPatch) -> Ctx:
    results = tmp_path / "results"
    results.mkdir()
    monkeypatch.chdir(tmp_path)  # anything written relative to the working folder shows in the tree
    return Ctx(tmp_path, results, assets, http_port)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_one_clear_line(ctx: Ctx, case: Case, capfd: pytest.CaptureFixture[str]) -> None:
    if case.setup is not None:
        case.setup(ctx)
    argv = case.argv(ctx)
    before = _tree(ctx.tmp, ctx.a.root)
    res = run_in_process(argv, capfd)
    check_rejected(res, case.needles)
    assert _tree(ctx.tmp, ctx.a.root) == before, "the failed command wrote or changed files"


# -- a few as real subprocesses: a traceback or a hang of the interpreter itself shows there --------------

SUBPROCESS = ("inspect-dev-zero", "search-fifo", "address-web-server", "space-alias-bomb", "model-exit-set")
# Answered before anything imports torch (seconds sooner): a bad --address, and a space file that cannot be read.
BEFORE_TORCH = ("search-fifo", "address-web-server", "space-alias-bomb")


@pytest.mark.slow
@pytest.mark.parametrize("case", [c for c in CASES if c.id in SUBPROCESS], ids=list(SUBPROCESS))
def test_bad_input_in_its_own_interpreter(ctx: Ctx, case: Case) -> None:
    if case.setup is not None:
        case.setup(ctx)
    argv = case.argv(ctx)
    before = _tree(ctx.tmp, ctx.a.root)
    res = run_subprocess(argv, ctx.tmp, timeout=60)  # the interpreter's start-up is not the case's
    check_rejected(res, case.needles)
    assert _tree(ctx.tmp, ctx.a.root) == before
    assert res.torch is (case.id not in BEFORE_TORCH), "torch imported" if res.torch else "torch not imported"


def test_debug_shows_the_traceback(ctx: Ctx, capfd: pytest.CaptureFixture[str]) -> None:
    res = run_in_process(["--debug", "pretrain", str(ctx.tmp / "nope.yaml"), "--results", str(ctx.results)], capfd)
    assert res.code == 2
    assert "Traceback (most recent call last)" in res.err
    assert res.err.splitlines()[-1].startswith("error: space file")


def test_good_clipq_file_still_inspects(assets: Assets, capfd: pytest.CaptureFixture[str]) -> None:
    """The corrupted copies fail because of the corruption, not because the original is bad."""
    res = run_in_process(["inspect", str(assets.clipq["good"])], capfd)
    assert res.code == 0, res.err
    assert "fc1.weight" in res.out


def test_a_cases_files_are_untouched_by_a_good_run_name(ctx: Ctx, capfd: pytest.CaptureFixture[str]) -> None:
    """The user's folder beside results/ keeps its trials.csv when the run name is valid (it is not the run's)."""
    mine = ctx.tmp / "mine"
    mine.mkdir()
    (mine / "trials.csv").write_text(USER_TRIALS)
    res = run_in_process(search("--name", "mine", "--address", "127.0.0.1:1")(ctx), capfd)
    check_rejected(res, ("127.0.0.1:1",))  # stopped by the address; the name itself was fine
    assert (mine / "trials.csv").read_text() == USER_TRIALS
    assert not (ctx.results / "mine").exists()
