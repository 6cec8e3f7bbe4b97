"""Joining a Ray cluster: the token check, the package shipped to the workers, the per-node checks, `cluster`.

The tests below the line start a real two-node cluster with `ray start` (see ``token_cluster``), as a user does;
the token tests take seconds, the search is marked slow.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest

import clipq_search
from clipq_search.errors import ClipQError
from clipq_search.search import cluster
from clipq_search.search.cluster import NodeReport

from .conftest import needs_fashion

TOKEN_FILE = str(Path.home() / ".ray" / "auth_token")
# What a user's shell would not have: this test session's Ray settings, and any token or import path.
_SCRUBBED = (
    "RAY_AUTH_MODE",
    "RAY_AUTH_TOKEN",
    "RAY_AUTH_TOKEN_PATH",
    "RAY_ADDRESS",
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER",
    "PYTHONPATH",
)


# -- the one-line messages, without a cluster -------------------------------------------------------------------


def test_a_client_without_token_mode_is_told_what_to_set(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in _SCRUBBED:
        monkeypatch.delenv(key, raising=False)
    line = cluster._auth_problem("10.0.0.1:6379", "rejected", "InvalidAuthToken")
    assert line is not None and "\n" not in line
    assert "10.0.0.1:6379 requires token authentication" in line
    assert "RAY_AUTH_MODE=token" in line and "RAY_AUTH_TOKEN" in line and TOKEN_FILE in line
    assert "ray get-auth-token" in line


def test_a_rejected_token_names_where_it_came_from(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    monkeypatch.setenv("RAY_AUTH_TOKEN", "abc")
    assert "rejected the token in RAY_AUTH_TOKEN" in cluster._auth_problem("h:1", "rejected", "x")
    monkeypatch.delenv("RAY_AUTH_TOKEN")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "tok"))
    assert f"rejected the token in the token file {tmp_path / 'tok'}" in cluster._auth_problem("h:1", "rejected", "x")
    missing = cluster._auth_problem("h:1", "no-token", "RAY_AUTH_TOKEN_PATH is set but file cannot be opened. Ensure")
    assert missing.startswith("RAY_AUTH_MODE=token but no token") and "file cannot be opened)" in missing
    assert cluster._auth_problem("h:1", "ok", "") is None and cluster._auth_problem("h:1", "other", "boom") is None


def test_the_head_is_asked_once_for_the_same_token_and_again_for_another(monkeypatch: pytest.MonkeyPatch) -> None:
    """The commands check the token before reading the space; joining later asks the head only if a setting changed."""
    verdicts = iter(['{"verdict": "ok", "detail": ""}', '{"verdict": "rejected", "detail": "x"}'])
    probes: list[list[str]] = []

    def fake_run(cmd: list[str], **_: object) -> subprocess.CompletedProcess:
        probes.append(cmd)
        return subprocess.CompletedProcess(cmd, 0, next(verdicts) + "\n", "")

    monkeypatch.setattr(cluster.subprocess, "run", fake_run)
    monkeypatch.setattr(cluster, "_AUTH_PASSED", set())
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    monkeypatch.setenv("RAY_AUTH_TOKEN", "a" * 64)
    cluster.check_auth("10.9.8.7:6379")
    cluster.check_auth("10.9.8.7:6379")
    assert len(probes) == 1 and probes[0][-1] == "10.9.8.7:6379"
    monkeypatch.setenv("RAY_AUTH_TOKEN", "b" * 64)  # another token: the head is asked again, and refuses it
    with pytest.raises(ClipQError, match="rejected the token in RAY_AUTH_TOKEN"):
        cluster.check_auth("10.9.8.7:6379")
    assert len(probes) == 2


def test_a_cluster_on_other_versions_is_named_in_one_line() -> None:
    ray_says = RuntimeError(
        "Version mismatch: The cluster was started with:\n    Ray: 2.60.0\n    Python: 3.11.7\n"
        "This process on node 127.0.0.2 was started with:\n    Ray: 2.60.0\n    Python: 3.11.2\n"
    )
    assert cluster._connect_problem("h:1", ray_says) == (
        "the Ray cluster at --address h:1 runs Ray 2.60.0 on Python 3.11.7, this machine Ray 2.60.0 on Python "
        "3.11.2; run the command with the cluster's Ray and Python versions"
    )
    assert cluster._connect_problem("h:1", ConnectionError("refused\nmore")).startswith(
        "no Ray cluster answers at --address h:1 (refused)"
    )


def test_the_package_folder_is_shipped_without_caches() -> None:
    env = cluster.shipped_code()
    assert env["py_modules"] == [str(Path(clipq_search.__file__).resolve().parent)]
    assert "__pycache__/" in env["excludes"] and "*.nbc" in env["excludes"]


def _node(ip: str, **kw: object) -> NodeReport:
    import torch

    found = {
        "node_id": f"{ip.replace('.', '')}abcdef",
        "ip": ip,
        "head": False,
        "cpus": 4.0,
        "gpus": 0.0,
        "host": "h",
        "python": "3.11.2",
        "torch": str(torch.__version__),
        "package": clipq_search.__version__,
        "package_from": "shipped",
    }
    return NodeReport(**{**found, **kw})


def test_nodes_that_differ_are_named_in_one_line() -> None:
    import torch

    release = str(torch.__version__).split("+")[0]
    same = [_node("10.0.0.1", head=True), _node("10.0.0.2", torch=release + "+cu121")]  # a build tag is no mismatch
    assert cluster.node_problems(same) == []
    cluster.check_nodes(same, "h:1", 1, 0)
    odd = [
        *same,
        _node("10.0.0.3", torch="1.13.1"),
        _node("10.0.0.4", package=None, package_from="No module named 'x'"),
    ]
    with pytest.raises(ClipQError) as err:
        cluster.check_nodes(odd, "h:1", 1, 0)
    line = str(err.value)
    assert "\n" not in line and "node 10.0.0.3 (h/1000" in line and "runs torch 1.13.1" in line
    assert "(and 1 more)" in line and "clipq-search cluster --address h:1" in line
    # a node that runs no trial (the head with no CPUs) is not held against the search
    assert cluster.node_problems([same[0], _node("10.0.0.5", cpus=0.0, torch="1.0")], cpus_per_trial=1) == []


def test_gpu_nodes_must_agree_on_cuda() -> None:
    gpus = [_node("10.0.0.1", gpus=2.0, cuda="12.1", cuda_devices=2), _node("10.0.0.2", gpus=2.0, cuda="11.8")]
    problems = [p for p, _ in cluster.node_problems(gpus, 1, 1)]
    assert "the GPU nodes run torch built for CUDA 11.8 and 12.1" in problems
    assert any("10.0.0.2" in p and "cannot use them" in p for p in problems)  # no usable GPU with trials asking one
    assert "GPUs" in cluster.format_node(gpus[0]) and "CUDA 12.1 (2 usable GPU(s))" in cluster.format_node(gpus[0])


# -- a real cluster started with `ray start` ------------------------------------------------------------------


@dataclass(frozen=True)
class TokenCluster:
    address: str
    token: str
    python: Path  # the nodes' interpreter: Ray, torch and the dependencies, not clipq_search
    cwd: Path  # outside the checkout


def _bare_python(root: Path) -> Path:
    """A virtual environment whose interpreter sees this one's packages but cannot import clipq_search.

    Its site-packages holds a .pth file with one line, the path of this
    environment's site-packages: Python appends such a path to sys.path but
    processes no .pth file inside it, so the editable install's import hook
    (a .pth file there) never runs. Ray, torch and every dependency import;
    clipq_search does not, as on a node where only those are installed.
    """
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root)], check=True, timeout=120)
    site = Path(
        subprocess.run(
            [str(root / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
    )
    ours = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    (site / "dependencies.pth").write_text("".join(f"{p}\n" for p in sorted(ours)))
    return root / "bin" / "python"


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _SCRUBBED}
    return {**env, **extra}


def _session_pids(sid: int) -> list[int]:
    """Processes of the session ``sid`` (every daemon `ray start` left behind, and their workers)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[3]) == sid:
                pids.append(int(entry.name))
    return pids


def _end_sessions(sids: list[int]) -> None:
    for sig, wait in ((signal.SIGTERM, 2.0), (signal.SIGKILL, 5.0)):
        for sid in sids:
            for pid in _session_pids(sid):
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
        deadline = time.time() + wait
        while time.time() < deadline and any(_session_pids(s) for s in sids):
            time.sleep(0.2)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def token_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TokenCluster]:
    """A head and a worker node started with `ray start`, token authentication on, neither able to import the package.

    Each node gets its own loopback address (127.X.Y.2 and .3): Ray keeps
    those as given, where it would replace 127.0.0.1 by the machine's outward
    address (and, with RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 to keep it,
    refuses a second node). The head has no CPUs, so every trial runs on the
    worker node. Each `ray start` runs in a session of its own; the fixture
    ends every process of those sessions, whatever happened.
    """
    if not sys.platform.startswith("linux"):
        pytest.skip("the cluster is started and stopped through /proc (Linux)")
    root = tmp_path_factory.mktemp("token_cluster")
    python = _bare_python(root / "venv")
    cwd = root / "cwd"
    cwd.mkdir()
    net = f"127.{random.randint(1, 254)}.{random.randint(1, 254)}"
    head, port, token = f"{net}.2", _free_port(), os.urandom(32).hex()
    env = _env(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token)
    sids: list[int] = []
    ray_tmp = Path(tempfile.mkdtemp(prefix="cq-"))  # short: Ray's socket paths inside must stay under 108 bytes

    def ray_start(name: str, *args: str) -> None:
        with open(root / f"{name}.log", "w") as log:
            proc = subprocess.Popen(
                [str(python), "-m", "ray.scripts.scripts", "start", *args, "--disable-usage-stats"],
                cwd=cwd,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            sids.append(proc.pid)
            rc = proc.wait(timeout=180)
        assert rc == 0, (root / f"{name}.log").read_text()[-3000:]

    small = ("--num-gpus", "0", "--object-store-memory", str(400 * 2**20))
    try:
        ray_start("head", "--head", "--node-ip-address", head, "--port", str(port), "--temp-dir", str(ray_tmp),
                  "--num-cpus", "0", "--include-dashboard", "false", *small)  # fmt: skip
        ray_start("worker", "--address", f"{head}:{port}", "--node-ip-address", f"{net}.3", "--num-cpus", "2", *small)
        yield TokenCluster(f"{head}:{port}", token, python, cwd)
    finally:
        _end_sessions(sids)
        shutil.rmtree(ray_tmp, ignore_errors=True)


def _cli(c: TokenCluster, *args: str, timeout: int = 300, **env: str) -> tuple[subprocess.CompletedProcess, float]:
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "clipq_search.cli", *args],
        cwd=c.cwd,  # outside the checkout: Ray puts the driver's folder on the workers' import path
        env=_env(**env),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    return proc, time.perf_counter() - t0


def test_the_nodes_cannot_import_the_package_on_their_own(token_cluster: TokenCluster) -> None:
    def imports(module: str) -> bool:
        cmd = [str(token_cluster.python), "-c", f"import {module}"]
        return subprocess.run(cmd, cwd=token_cluster.cwd, env=_env(), capture_output=True).returncode == 0

    assert imports("ray") and imports("torch") and imports("optuna")
    assert not imports("clipq_search")


def test_a_missing_token_is_one_line_within_10_seconds(token_cluster: TokenCluster, tmp_path: Path) -> None:
    address = token_cluster.address
    proc, took = _cli(token_cluster, "search", "smoke", "--address", address, "--results", str(tmp_path), timeout=60)
    assert proc.returncode == 2 and took < 10, (took, proc.stderr[-2000:])
    assert proc.stderr.count("\n") == 1 and "InvalidAuthToken" not in proc.stdout + proc.stderr
    line = proc.stderr.strip()
    assert line.startswith(f"error: the Ray cluster at {address} requires token authentication")
    assert "set RAY_AUTH_MODE=token" in line and "RAY_AUTH_TOKEN" in line and TOKEN_FILE in line
    assert not (tmp_path / "smoke").exists()

    proc, took = _cli(token_cluster, "cluster", "--address", address, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN="0" * 64)
    assert proc.returncode == 2 and took < 10 and proc.stderr.count("\n") == 1, proc.stderr[-2000:]
    assert "rejected the token in RAY_AUTH_TOKEN" in proc.stderr


@pytest.mark.slow
@needs_fashion
def test_cluster_then_a_search_with_the_token_run_on_a_worker_without_the_package(
    token_cluster: TokenCluster, tmp_path: Path
) -> None:
    import torch

    c = token_cluster
    auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": c.token}
    proc, _ = _cli(c, "cluster", "--address", c.address, "--space", "smoke", **auth)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    assert lines[0] == f"connected to Ray cluster at {c.address}: 2 node(s), 2 CPUs, 0 GPUs"
    nodes = [line for line in lines if line.startswith("node ")]
    assert [line.split(":")[0].split(" ")[-1] for line in nodes] == ["head", "worker"]  # node 127.1.2.2 (h/id) head
    assert "0 CPUs, 0 GPUs" in nodes[0] and "2 CPUs, 0 GPUs" in nodes[1]
    for line in nodes:
        assert f"torch {torch.__version__}, CUDA {torch.version.cuda or 'none'} (0 usable GPU(s))" in line
        assert f"clipq-search {clipq_search.__version__} (shipped)" in line
        assert re.search(r"dataset\.root \S+ readable \(\d+ entries\)", line)
    assert "nodes need no copy" in lines[-2] and lines[-1].startswith("ok: checked 2 node(s)")
    node = re.search(r"\((\S+)\) worker:", nodes[1]).group(1)  # HOST/ID, as trials.csv names it

    budget = ["--set", "baseline.train.max_steps=20", "--set", "trial.train.max_steps=5", "--concurrency", "1"]
    args = ["search", "smoke", "--address", c.address, "--results", str(tmp_path), "--trials", "2", *budget]
    proc, _ = _cli(c, *args, timeout=600, **auth)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert "InvalidAuthToken" not in out and "Traceback" not in out
    assert "checked 1 node(s): torch" in proc.stdout and f"clipq-search {clipq_search.__version__} shipped" in out
    df = pd.read_csv(tmp_path / "smoke" / "trials.csv")
    assert (df["state"] == "COMPLETE").sum() == 2
    assert set(df["node"]) == {node}  # the worker node, whose interpreter cannot import the package


def test_cluster_without_address_checks_the_local_instance(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "clipq_search.cli", "cluster"],
        cwd=tmp_path,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("started a local Ray instance")
    (node,) = [line for line in lines if line.startswith("node ")]
    assert node.startswith("node 127.0.0.1 ")  # kept on loopback, without the switch in this shell
    package = Path(clipq_search.__file__).resolve().parent
    assert " head: " in node and f"clipq-search {clipq_search.__version__} ({package})" in node  # installed here
    assert "dataset.root" not in node  # checked only with --space
    assert lines[-1].startswith("ok: checked 1 node(s)")
