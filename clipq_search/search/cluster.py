"""Ray: starting a private local instance or connecting to a cluster, and the checks before either.

Every other module reaches Ray's cluster through here: ``init_ray`` before
any trial or task, ``check_address`` and ``check_gpus`` before any work, and
``first_line`` to turn Ray's page-long errors into one line.

Joining a cluster, ``init_ray`` first asks the head whether it accepts this
process's token (one line naming what to set when it does not), ships the
package to the workers through Ray's ``runtime_env`` (``py_modules``: a node
needs Ray, torch and the package's dependencies, not the package), and runs one
task on every node to compare versions before the first trial
(``node_reports``, ``check_nodes``; the ``cluster`` command prints them).
"""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from clipq_search.errors import ClipQError, ConfigError, shown

__all__ = [
    "NodeReport",
    "check_address",
    "check_auth",
    "check_gpus",
    "check_nodes",
    "first_line",
    "init_ray",
    "local_concurrency",
    "node_reports",
    "shipped_code",
    "use_ray_settings",
]

# A Ray address is a gRPC server (HTTP/2): it answers a client's connection preface with a SETTINGS frame
# at once. Seconds to wait for that answer before calling the address something else.
HANDSHAKE_SECONDS = 5.0
_H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"  # + empty SETTINGS
_H2_SETTINGS = 0x04


# Ray's own switch for instances confined to one machine (what it does on macOS and Windows): every Ray
# process stays on 127.0.0.1. Ray reads it when it is first imported.
LOOPBACK_SWITCH = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


# What this package runs Ray with, unless the environment says otherwise: Tune's classic console output
# and no automatic logger callbacks (the commands print their own lines), every worker's log lines as they
# come, and Ray Train's v1 API (``final --workers``). Ray reads some of them when its modules are imported.
# A local instance starts no idle workers ahead of the first task (one per CPU, by Ray's default): Tune's trial
# actors run with a runtime environment of Tune's, so they never take such a worker, which only costs a
# process start and some CPU a minute while it waits.
RAY_SETTINGS = {
    "RAY_AIR_NEW_OUTPUT": "0",
    "RAY_DEDUP_LOGS": "0",
    "TUNE_DISABLE_AUTO_CALLBACK_LOGGERS": "1",
    "RAY_TRAIN_V2_ENABLED": "0",
    "RAY_prestart_worker_first_driver": "0",
}


def use_ray_settings() -> None:
    """Put ``RAY_SETTINGS`` in this process' environment (a value already set stays)."""
    for key, value in RAY_SETTINGS.items():
        os.environ.setdefault(key, value)


def _stay_on_loopback() -> None:
    """Keep a local instance, or a cluster of nodes on this machine, on 127.0.0.1.

    Ray replaces a loopback address by the machine's outward IP (the address a
    remote node would use); for a private instance or several nodes on one
    machine that sends traffic off loopback, and it cannot reach a cluster
    started with ``--node-ip-address 127.0.0.1``. The switch is set before this
    process imports Ray (the command line always is), and the instance's
    processes inherit it. A program that imported Ray earlier keeps Ray's own
    choice unless it set ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` itself.
    """
    if "ray" not in sys.modules:
        os.environ.setdefault(LOOPBACK_SWITCH, "0")


def _connect_problem(address: str, exc: BaseException) -> str:
    """One line for a failed ``ray.init(address=...)``; Ray's version mismatch spans lines, so it is read whole."""
    import re

    versions = re.findall(r"Ray: (\S+)\s+Python: (\S+)", str(exc))
    if str(exc).startswith("Version mismatch") and len(versions) == 2:
        (ray_there, py_there), (ray_here, py_here) = versions
        return (
            f"the Ray cluster at --address {address} runs Ray {ray_there} on Python {py_there}, this machine Ray "
            f"{ray_here} on Python {py_here}; run the command with the cluster's Ray and Python versions"
        )
    return (
        f"no Ray cluster answers at --address {address} ({first_line(exc)}); start one with `ray start --head` "
        "or drop --address to run locally"
    )


def _loopback_ip(host: str) -> str | None:
    """The loopback IP ``host`` names (localhost: 127.0.0.1; Ray keeps 127.0.0.2 and up as given), or None."""
    import ipaddress

    if host == "localhost":
        return "127.0.0.1"
    try:
        return host if ipaddress.ip_address(host.strip("[]")).is_loopback else None
    except ValueError:
        return None


def first_line(exc: BaseException) -> str:
    """The first line of an error from Ray (its messages run to pages), or its type's name."""
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]


def init_ray(
    address: str | None,
    concurrency: int,
    cpus_per_trial: float,
    gpus_per_trial: float,
    log: Callable[[str], None],
    *,
    check_versions: bool = True,
) -> None:
    """Start a private local Ray instance (``address`` None) or join the cluster at ``address``.

    Joining: the token is checked first (``check_auth``), the package travels
    to the workers (``shipped_code``), and with ``check_versions`` every node
    that can run a trial must agree with this machine (``check_nodes``).
    """
    use_ray_settings()
    if not address or address.rpartition(":")[0] in ("127.0.0.1", "localhost"):
        _stay_on_loopback()  # before Ray is imported
    running = "ray" in sys.modules and sys.modules["ray"].is_initialized()
    if address and not running:
        check_auth(address)  # before importing Ray: a refused token is answered in seconds
    import ray

    if ray.is_initialized():
        return
    if address:
        try:
            # A cluster on loopback (several nodes on one machine): the driver joins it at the head's address.
            loopback = _loopback_ip(address.rpartition(":")[0])
            local = {"_node_ip_address": loopback} if loopback else {}
            ray.init(address=address, logging_level="ERROR", log_to_driver=False, runtime_env=shipped_code(), **local)
        except Exception as exc:  # noqa: BLE001 - connection failures come in many types
            raise ClipQError(_connect_problem(address, exc)) from None
        res = ray.cluster_resources()
        log(
            f"connected to Ray cluster at {address}: {len(ray.nodes())} node(s), "
            f"{res.get('CPU', 0):g} CPUs, {res.get('GPU', 0):g} GPUs"
        )
        if gpus_per_trial > res.get("GPU", 0):  # else every trial would wait for a GPU forever
            raise ClipQError(
                f"resources.gpus_per_trial={gpus_per_trial:g} but the Ray cluster at {address} has "
                f"{res.get('GPU', 0):g} GPU(s); add GPU nodes or set resources.gpus_per_trial lower"
            )
        if check_versions:
            reports = node_reports()
            check_nodes(reports, address, cpus_per_trial, gpus_per_trial)
            log(nodes_summary(reports, cpus_per_trial, gpus_per_trial))
        return
    # The machine's own CPUs (at least one trial's worth): Ray is never told of CPUs that are not there,
    # so it never runs more trials at once than fit (local_concurrency says what does).
    cpus = max(_local_cpus(), math.ceil(cpus_per_trial))
    kwargs: dict[str, Any] = {
        "num_cpus": cpus,
        "include_dashboard": False,
        "logging_level": "ERROR",
        "log_to_driver": False,
    }
    if gpus_per_trial == 0:
        kwargs["num_gpus"] = 0
    ray.init(address="local", **kwargs, _node_ip_address="127.0.0.1")
    log(f"started a local Ray instance ({cpus} CPUs)")


def check_gpus(address: str | None, gpus_per_trial: float) -> None:
    """A local run asking for GPUs per trial needs a CUDA GPU here (else its trials would wait forever)."""
    if address or gpus_per_trial <= 0:
        return  # a cluster's GPUs are counted once connected (``init_ray``)
    import torch

    if not torch.cuda.is_available():
        raise ConfigError(
            f"resources.gpus_per_trial={gpus_per_trial:g} but this machine has no CUDA GPU; "
            "set it to 0 (--set resources.gpus_per_trial=0), or run on a GPU host or a cluster (--address)"
        )


def _local_cpus() -> int:
    """CPUs this process may use (its affinity mask where the platform has one)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def local_concurrency(
    concurrency: int, cpus_per_trial: float, gpus_per_trial: float, log: Callable[[str], None]
) -> int:
    """``concurrency`` capped at the trials this machine's CPUs (and GPUs) fit at once, saying so when it is."""
    cpus = max(_local_cpus(), math.ceil(cpus_per_trial))
    fit = max(1, math.floor(cpus / cpus_per_trial + 1e-9))
    why = f"{cpus} CPU(s) and each trial takes resources.cpus_per_trial={cpus_per_trial:g}"
    if gpus_per_trial > 0:
        import torch

        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
        by_gpu = max(1, math.floor(gpus / gpus_per_trial + 1e-9))
        if by_gpu < fit:
            fit, why = by_gpu, f"{gpus} GPU(s) and each trial takes resources.gpus_per_trial={gpus_per_trial:g}"
    if concurrency <= fit:
        return concurrency
    log(
        f"concurrency {concurrency} lowered to {fit}: this machine has {why} "
        "(a Ray cluster, --address, runs more at once)"
    )
    return fit


def _split_address(address: str) -> tuple[str, int]:
    target = address.removeprefix("ray://")
    host, _, port = target.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ClipQError(f"--address {shown(address)} is not HOST:PORT (e.g. 127.0.0.1:6379)")
    return host.strip("[]"), int(port)


def _speaks_grpc(sock: socket.socket) -> tuple[bool, str]:
    """Send HTTP/2's connection preface; (whether a SETTINGS frame came back, what came back instead)."""
    try:
        sock.sendall(_H2_PREFACE)
        head = b""
        while len(head) < 9:
            chunk = sock.recv(9 - len(head))
            if not chunk:
                break
            head += chunk
    except TimeoutError:
        return False, f"no answer to Ray's handshake within {HANDSHAKE_SECONDS:g} s"
    except OSError as exc:
        return False, f"the connection failed: {exc.strerror or exc}"
    if len(head) == 9 and head[3] == _H2_SETTINGS:
        return True, ""
    if not head:
        return False, "it closed the connection at Ray's handshake"
    text = head.decode("latin-1")
    said = text if text.isprintable() else head.hex()
    return False, f"it answered {shown(said, 24)}, not Ray's gRPC"


def check_address(address: str) -> None:
    """Fail in seconds, not minutes, when no Ray cluster answers at host:port.

    Something must listen there, and it must speak gRPC (HTTP/2) as Ray's
    head does; a web server or any other service at that port would make
    ``ray.init`` wait for ever. ``auto`` and ``local`` are left to Ray.
    """
    if address in ("auto", "local"):
        return
    host, port = _split_address(address)
    fix = "start one with `ray start --head` (it prints the address to give) or drop --address to run locally"
    try:
        sock = socket.create_connection((host, port), timeout=HANDSHAKE_SECONDS)
    except OSError as exc:
        raise ClipQError(f"no Ray cluster answers at --address {address} ({exc.strerror or exc}); {fix}") from None
    with sock:
        if os.environ.get("RAY_USE_TLS", "0").lower() in ("1", "true"):
            return  # a TLS handshake comes first; Ray's own connection checks the rest
        sock.settimeout(HANDSHAKE_SECONDS)
        ok, why = _speaks_grpc(sock)
    if not ok:
        raise ClipQError(f"--address {address} is not a Ray cluster ({why}); {fix}")


# What the workers do not need of the package: bytecode, and numba's kernel cache (compiled for each machine).
_NOT_SHIPPED = ["__pycache__/", "*.pyc", "*.nbi", "*.nbc"]


def shipped_code() -> dict[str, Any]:
    """The ``runtime_env`` that ships this package's code to every worker of a cluster.

    Ray uploads the package folder once (keyed by its content) and puts it on
    each worker's import path, so a node needs only Ray, torch and the
    package's dependencies, and always runs the driver's version of the code.
    """
    import clipq_search

    return {"py_modules": [str(Path(clipq_search.__file__).resolve().parent)], "excludes": list(_NOT_SHIPPED)}


# Seconds the token check may take (a Python start, importing Ray's core, one call to the head).
AUTH_SECONDS = 10.0
# Run in a subprocess: asks the head with Ray's own client and this environment's RAY_AUTH_* settings, and
# prints one JSON verdict. Ray's client prints its warnings there (dropped), and one that aborts (Ray stops
# the process when RAY_AUTH_MODE=token finds no token) cannot take the command with it. Ray has no public
# call for this; should these internals move, the verdict is "ok" or "other" and ``ray.init`` reports.
_AUTH_PROBE = """
import json, sys
verdict, detail = "ok", ""
try:
    from ray._raylet import GcsClient
    from ray.exceptions import AuthenticationError
    from ray._private.authentication.authentication_token_setup import ensure_token_if_auth_enabled
except ImportError:  # a Ray without token authentication
    pass
else:
    try:
        ensure_token_if_auth_enabled(None, create_token_if_missing=False)
    except AuthenticationError as exc:
        verdict, detail = "no-token", str(exc)
    else:
        try:
            GcsClient(address=sys.argv[1])
        except AuthenticationError as exc:
            verdict, detail = "rejected", str(exc)
        except Exception as exc:
            verdict, detail = "other", str(exc)
print(json.dumps({"verdict": verdict, "detail": detail}))
"""
_GET_TOKEN = "`ray get-auth-token` on the head prints it"
# (address, RAY_AUTH_MODE, RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH) the head accepted in this process.
_AUTH_PASSED: set[tuple[str | None, ...]] = set()


def _token_file() -> Path:
    """The token file Ray reads when RAY_AUTH_TOKEN is not set: RAY_AUTH_TOKEN_PATH, else ~/.ray/auth_token."""
    return Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or "~/.ray/auth_token").expanduser()


def _auth_problem(address: str, verdict: str, detail: str) -> str | None:
    """The one line for a token the cluster refuses (``verdict`` from the probe), or None when it is not that."""
    token_mode = os.environ.get("RAY_AUTH_MODE", "").strip().lower() == "token"
    file = _token_file()
    if verdict == "no-token":
        why = detail.split(". ")[0].rstrip(".")
        return (
            f"RAY_AUTH_MODE=token but no token for the Ray cluster at {address} was found ({why}): set RAY_AUTH_TOKEN "
            f"to the cluster's token ({_GET_TOKEN}) or copy the head's token file to {file}"
        )
    if verdict != "rejected":
        return None
    if not token_mode:
        here = "present" if file.is_file() else "absent"
        return (
            f"the Ray cluster at {address} requires token authentication: set RAY_AUTH_MODE=token, with the "
            f"cluster's token in RAY_AUTH_TOKEN ({_GET_TOKEN}) or in the token file {file} ({here} here; "
            "RAY_AUTH_TOKEN_PATH names another)"
        )
    source = "RAY_AUTH_TOKEN" if os.environ.get("RAY_AUTH_TOKEN") else f"the token file {file}"
    return (
        f"the Ray cluster at {address} rejected the token in {source}: give the cluster's token "
        f"({_GET_TOKEN}; the head keeps it in ~/.ray/auth_token)"
    )


def check_auth(address: str) -> None:
    """Fail within seconds, naming what to set, when the cluster at ``address`` refuses this process's token.

    Ray 2.60's ``ray start --head`` turns on token authentication; a client
    without the token would retry for a minute, printing a warning a second,
    and then fail with a connection error. ``auto``, ``local`` and Ray Client
    (``ray://``) addresses are left to Ray, as is anything the check cannot
    tell in time.
    """
    if address in ("auto", "local") or address.startswith("ray://"):
        return
    asked = (address, *(os.environ.get(k) for k in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")))
    if asked in _AUTH_PASSED:
        return  # the command's early check (``commands``) already asked the head with these settings
    try:
        proc = subprocess.run(
            [sys.executable, "-c", _AUTH_PROBE, address],
            capture_output=True,
            text=True,
            timeout=AUTH_SECONDS,
            check=False,
        )
        found = json.loads(proc.stdout.strip().splitlines()[-1])
    except (subprocess.TimeoutExpired, OSError, IndexError, ValueError):
        return  # no verdict: connecting says what is wrong
    problem = _auth_problem(address, str(found.get("verdict")), str(found.get("detail", "")))
    if problem:
        raise ClipQError(problem)
    _AUTH_PASSED.add(asked)


@dataclass(frozen=True)
class NodeReport:
    """One Ray node as a task pinned to it found it; ``error`` when that task failed."""

    node_id: str
    ip: str
    head: bool
    cpus: float
    gpus: float
    host: str = ""
    python: str = ""
    torch: str | None = None  # torch.__version__ there; None: torch does not import
    cuda: str | None = None  # the CUDA torch was built with; None: a CPU build
    cuda_devices: int = 0  # GPUs torch can use there
    package: str | None = None  # clipq-search version imported there; None: the import failed
    package_from: str = ""  # "shipped" (runtime_env), the folder it was imported from, or the import error
    dataset: str | None = None  # "ROOT readable (N entries)" or why not; None: not checked
    dataset_ok: bool | None = None  # whether the task read dataset.root there; None: not checked
    error: str | None = None  # the task itself failed (runtime_env setup, a lost node, no answer)

    @property
    def name(self) -> str:
        """``node IP (HOST/ID)``: HOST/ID as the trials' ``node`` column names the node."""
        return f"node {self.ip} ({self.host + '/' if self.host else ''}{self.node_id[:8]})"


def _node_probe() -> Callable[[str | None], dict[str, Any]]:
    """The function run on each node. Built here so that it travels by value: a node that cannot import the
    package still runs it and says why."""

    def probe(dataset_root: str | None) -> dict[str, Any]:
        import os
        import platform
        import socket

        found: dict[str, Any] = {"host": socket.gethostname(), "python": platform.python_version()}
        try:
            import torch

            found["torch"], found["cuda"] = str(torch.__version__), torch.version.cuda
        except Exception as exc:  # noqa: BLE001 - reported, whatever it is
            found["torch_error"] = f"{type(exc).__name__}: {exc}"
        if found.get("cuda"):
            # Ray hides the GPUs from a task that asks for none (CUDA_VISIBLE_DEVICES=""), and this one takes
            # none so that it runs on a busy node: count them in a process that sees the node's devices, which
            # also keeps CUDA's context out of this worker.
            import subprocess
            import sys

            env = {k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"}
            count = "import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)"
            try:
                cmd = [sys.executable, "-c", count]
                out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120, check=False)
                found["cuda_devices"] = int(out.stdout.strip().splitlines()[-1])
            except (OSError, subprocess.TimeoutExpired, IndexError, ValueError):
                found["cuda_devices"] = 0
        try:
            import clipq_search

            folder = os.path.dirname(os.path.abspath(clipq_search.__file__))
            found["package"] = clipq_search.__version__
            found["package_from"] = "shipped" if "runtime_resources" in folder.split(os.sep) else folder
        except Exception as exc:  # noqa: BLE001 - reported, whatever it is
            found["package_from"] = f"{type(exc).__name__}: {exc}"
        if dataset_root is not None:
            try:
                found["dataset"] = f"{dataset_root} readable ({len(os.listdir(dataset_root))} entries)"
                found["dataset_ok"] = True
            except OSError as exc:
                found["dataset"] = f"{dataset_root} not readable ({exc.strerror or exc})"
                found["dataset_ok"] = False
        return found

    return probe


def node_reports(dataset_root: str | None = None, timeout: float = 120.0) -> list[NodeReport]:
    """Run one task on every live node (pinned there, no CPU taken) and report what it found; head first."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    probe = ray.remote(num_cpus=0, max_retries=0)(_node_probe())
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    nodes.sort(key=lambda n: ("node:__internal_head__" not in n.get("Resources", {}), n["NodeManagerAddress"]))
    refs = [
        probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote(dataset_root)
        for n in nodes
    ]
    ready, _ = ray.wait(refs, num_returns=len(refs), timeout=timeout) if refs else ([], [])
    reports = []
    for n, ref in zip(nodes, refs, strict=True):
        res = n.get("Resources", {})
        base = {
            "node_id": n["NodeID"],
            "ip": n["NodeManagerAddress"],
            "head": "node:__internal_head__" in res,
            "cpus": float(res.get("CPU", 0)),
            "gpus": float(res.get("GPU", 0)),
        }
        if ref not in ready:
            ray.cancel(ref, force=True)
            reports.append(NodeReport(**base, error=f"no answer within {timeout:g} s"))
            continue
        try:
            found = ray.get(ref)
        except Exception as exc:  # noqa: BLE001 - runtime_env setup, a lost node: all reported per node
            reports.append(NodeReport(**base, error=first_line(exc)))
            continue
        found.pop("torch_error", None)
        reports.append(NodeReport(**base, **found))
    return reports


def _release(version: str) -> str:
    """A torch version without its build tag (2.13.0+cu121 -> 2.13.0): builds of one release load the same weights."""
    return version.split("+")[0]


def node_problems(
    reports: list[NodeReport], cpus_per_trial: float = 0.0, gpus_per_trial: float = 0.0
) -> list[tuple[str, str]]:
    """(problem, fix) for each node that can run a trial and differs from this machine, or cannot import the package.

    Compared: clipq-search's version, torch's release (its build tag may differ:
    a CPU driver, GPU workers), and the CUDA build across GPU nodes; a GPU node
    whose torch cannot use its GPUs counts when trials ask for GPUs.
    """
    import torch

    import clipq_search

    fits = [r for r in reports if r.cpus >= cpus_per_trial and r.gpus >= gpus_per_trial]
    same_torch = f"install torch {_release(torch.__version__)} (as here) on every node"
    found: list[tuple[str, str]] = []
    for r in fits or reports:
        if r.error:
            found.append((f"{r.name} did not answer the version check ({r.error})", "check that node's Ray logs"))
        elif r.package is None:
            found.append(
                (f"{r.name} cannot import clipq-search ({r.package_from})", "install the package's dependencies there")
            )
        elif r.package != clipq_search.__version__:
            found.append(
                (
                    f"{r.name} runs clipq-search {r.package} from {r.package_from}, this machine "
                    f"{clipq_search.__version__}",
                    "remove that install, or run the search from a machine with the same version",
                )
            )
        elif r.torch is None:
            found.append((f"{r.name} has no torch", same_torch))
        elif _release(r.torch) != _release(torch.__version__):
            found.append((f"{r.name} runs torch {r.torch}, this machine {torch.__version__}", same_torch))
        elif gpus_per_trial > 0 and r.gpus > 0 and r.cuda_devices == 0:
            found.append(
                (
                    f"{r.name} has {r.gpus:g} GPU(s) but its torch {r.torch} cannot use them",
                    "install a CUDA build of torch there",
                )
            )
    cudas = sorted({r.cuda for r in fits or reports if r.gpus > 0 and r.cuda and not r.error})
    if len(cudas) > 1:
        found.append(
            (f"the GPU nodes run torch built for CUDA {' and '.join(cudas)}", "install one CUDA build on every node")
        )
    return found


def check_nodes(reports: list[NodeReport], address: str, cpus_per_trial: float, gpus_per_trial: float) -> None:
    """One line (the first problem, and how many more) when a node that can run trials differs from this machine."""
    problems = node_problems(reports, cpus_per_trial, gpus_per_trial)
    if not problems:
        return
    (problem, fix), more = problems[0], len(problems) - 1
    also = f" (and {more} more)" if more else ""
    where, hint = f"Ray cluster at {address}", f" (`clipq-search cluster --address {address}` lists each node)"
    if address == "local":
        where, hint = "local Ray instance", ""
    raise ClipQError(f"{where}: {problem}{also}; {fix}{hint}")


def nodes_summary(reports: list[NodeReport], cpus_per_trial: float = 0.0, gpus_per_trial: float = 0.0) -> str:
    """One line: what the nodes that can run trials agree on."""
    fits = [r for r in reports if r.cpus >= cpus_per_trial and r.gpus >= gpus_per_trial and not r.error] or reports
    torches = ", ".join(sorted({r.torch or "none" for r in fits}))
    cudas = ", ".join(sorted({r.cuda or "none" for r in fits if r.gpus > 0})) or "not used (no GPU nodes)"
    packages = ", ".join(sorted({f"{r.package} {r.package_from}" for r in fits if r.package}))
    return f"checked {len(fits)} node(s): torch {torches}, CUDA {cudas}, clipq-search {packages}"


def format_node(r: NodeReport) -> str:
    """One line per node for ``clipq-search cluster``."""
    role = "head" if r.head else "worker"
    head = f"{r.name} {role}: {r.cpus:g} CPUs, {r.gpus:g} GPUs"
    if r.error:
        return f"{head}; check failed: {r.error}"
    torch = f"torch {r.torch}, CUDA {r.cuda or 'none'} ({r.cuda_devices} usable GPU(s))" if r.torch else "torch missing"
    package = (
        f"clipq-search {r.package} ({r.package_from})"
        if r.package
        else f"clipq-search NOT importable ({r.package_from})"
    )
    dataset = f"; dataset.root {r.dataset}" if r.dataset is not None else ""
    return f"{head}; python {r.python}; {torch}; {package}{dataset}"
