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

from clipq_search.errors import ClipQError, ConfigError

__all__ = ["check_address", "check_gpus", "first_line", "init_ray"]


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
    cpus = max(os.cpu_count() or 1, math.ceil(concurrency * cpus_per_trial))
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


def check_address(address: str) -> None:
    """Fail in seconds, not minutes, when nothing listens at host:port."""
    if address in ("auto", "local") or address.startswith("ray://"):
        return
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ClipQError(f"--address {address!r} is not HOST:PORT (e.g. 127.0.0.1:6379)")
    try:
        with socket.create_connection((host, int(port)), timeout=3):
            pass
    except OSError as exc:
        raise ClipQError(
            f"no Ray cluster answers at --address {address} ({exc.strerror or exc}); start one with "
            "`ray start --head` or drop --address to run locally"
        ) from None
