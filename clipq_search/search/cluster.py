"""Ray: starting a private local instance or connecting to a cluster, and the checks before either.

Every other module reaches Ray's cluster through here: ``init_ray`` before
any trial or task, ``check_address`` and ``check_gpus`` before any work, and
``first_line`` to turn Ray's page-long errors into one line.
"""

from __future__ import annotations

import math
import os
import socket
from collections.abc import Callable
from typing import Any

from clipq_search.errors import ClipQError, ConfigError, shown

__all__ = ["check_address", "check_gpus", "first_line", "init_ray", "local_concurrency"]

# A Ray address is a gRPC server (HTTP/2): it answers a client's connection preface with a SETTINGS frame
# at once. Seconds to wait for that answer before calling the address something else.
HANDSHAKE_SECONDS = 5.0
_H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"  # + empty SETTINGS
_H2_SETTINGS = 0x04


def _stay_on_loopback() -> None:
    """Keep a local instance, or a cluster of nodes on this machine, on 127.0.0.1.

    Ray replaces a loopback address by the machine's outward IP (the address a
    remote node would use); for a private instance or several nodes on one
    machine that sends traffic off loopback, and it cannot reach a cluster
    started with ``--node-ip-address 127.0.0.1``. Ray reads this switch at call
    time (it is how Ray itself behaves on macOS and Windows).
    """
    from ray._private import ray_constants

    ray_constants.ENABLE_RAY_CLUSTER = False


def first_line(exc: BaseException) -> str:
    """The first line of an error from Ray (its messages run to pages), or its type's name."""
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]


def init_ray(
    address: str | None, concurrency: int, cpus_per_trial: float, gpus_per_trial: float, log: Callable[[str], None]
) -> None:
    import ray

    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "0")
    if ray.is_initialized():
        return
    if not address or address.rpartition(":")[0] in ("127.0.0.1", "localhost"):
        _stay_on_loopback()
    if address:
        try:
            host = address.rpartition(":")[0]
            # A cluster on loopback (several nodes on one machine): the driver is on loopback too.
            local = {"_node_ip_address": "127.0.0.1"} if host in ("127.0.0.1", "localhost") else {}
            ray.init(address=address, logging_level="ERROR", log_to_driver=False, **local)
        except Exception as exc:  # noqa: BLE001 - connection failures come in many types
            first = first_line(exc)
            raise ClipQError(
                f"no Ray cluster answers at --address {address} ({first}); start one with `ray start --head` "
                "or drop --address to run locally"
            ) from None
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
