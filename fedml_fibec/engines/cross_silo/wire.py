"""The FedML-message form of what our engine's client processes send and receive.

A client process may serve several of a round's devices (device_args.worker_num below
client_num_per_round): the server names them in FedML's client-index argument as "3,17,42", and
the process answers with one bundle holding each device's upload (in that order) and the tag of
the exchange it answers. With one device per process this is FedML's layout with a one-item list.
"""
from __future__ import annotations

from typing import Any, Optional


def device_list_arg(devices: list[int]) -> str:
    """FedML's client-index argument naming the devices a process serves."""
    return ",".join(str(int(d)) for d in devices)


def parse_device_list(arg: Any) -> list[int]:
    return [int(x) for x in str(arg).split(",") if x.strip()]


def bundle(uploads: list[dict], tag: list) -> dict:
    """One process's answer to an exchange: the uploads of its devices, in the order it was given them."""
    return {"reply_to": list(tag), "uploads": list(uploads)}


def unbundle(message: Any) -> tuple[Optional[list], list[dict]]:
    """(tag, uploads) of a received answer; (None, []) for anything that is not a bundle."""
    if not isinstance(message, dict) or not isinstance(message.get("uploads"), list):
        return None, []
    return message.get("reply_to"), message["uploads"]
