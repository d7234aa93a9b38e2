"""Keep FedML and Hugging Face offline and inside the run's own folder."""
from __future__ import annotations

import ipaddress
import json
import os
import socket
from pathlib import Path

OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "WANDB_MODE": "disabled",
    "FEDML_ENV_VERSION": "release",
    "TOKENIZERS_PARALLELISM": "false",
}


# A user with hub access may allow downloads explicitly (HF_HUB_OFFLINE=0 HF_DATASETS_OFFLINE=0 ...);
# anything else is forced: a run makes no call to a cloud it was not asked to reach.
USER_MAY_SET = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE")


def set_offline_switches() -> None:
    """Offline switches for Hugging Face and wandb.

    Must run first in a run, before its data is read: `datasets`, `transformers` and `huggingface_hub`
    read these variables once, when imported, and a named task (dataset=rte) is loaded before the run
    knows its folder. Set later, the hub is asked (with retries) before the clear offline error.
    """
    for key, value in OFFLINE_ENV.items():
        if key in USER_MAY_SET:
            os.environ.setdefault(key, value)
        else:
            os.environ[key] = value


def set_fedml_home(fedml_home: Path) -> None:
    """FedML's ~/.fedml files under the run folder.

    Must run before fedml is imported: FedML resolves its home folder from HOME.
    """
    fedml_home.mkdir(parents=True, exist_ok=True)
    os.environ["HOME"] = str(fedml_home)


def disable_fedml_cloud() -> None:
    """Replace FedML's cloud config fetch (5 posts per init, no timeout) with a no-op."""
    import fedml.core.mlops as core_mlops

    core_mlops.fetch_config = lambda args, version="release": False


def _is_local(address) -> bool:
    if not isinstance(address, tuple):  # AF_UNIX paths
        return True
    host = address[0]
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def guard_outbound_connections(report_path: Path, allowed_hosts: tuple[str, ...] = ()) -> None:
    """Refuse and record every Python socket connection to a non-local, non-allowed address.

    Turned on by FEDML_FIBEC_NETWORK_GUARD=<file>; tests use it to prove a run opens no outbound
    connection (Open MPI's own sockets are not Python's and stay on the cluster).
    """
    original = socket.socket.connect

    def connect(sock, address):
        if not _is_local(address) and (not isinstance(address, tuple) or address[0] not in allowed_hosts):
            with open(report_path, "a") as fh:
                fh.write(json.dumps({"pid": os.getpid(), "address": list(map(str, address))}) + "\n")
            raise ConnectionRefusedError(f"fedml-fibec network guard: outbound connection to {address} refused")
        return original(sock, address)

    socket.socket.connect = connect
