"""Server-side aggregation of uploaded LoRA/head tensors (FIBECFED.md section 4)."""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from ..errors import FibecError

_SHOW = 5


class PayloadError(FibecError, ValueError):
    """An uploaded payload does not match what the server expects."""


def _names(keys) -> str:
    """A few key names, then a count of the rest."""
    keys = sorted(keys)
    shown = ", ".join(keys[:_SHOW])
    return f"[{shown}{f', ... (+{len(keys) - _SHOW} more)' if len(keys) > _SHOW else ''}] ({len(keys)})"


def check_payload(
    payload: Mapping[str, Tensor],
    expected: Mapping[str, tuple[tuple[int, ...], torch.dtype]],
    *,
    device_id,
    check_finite: bool = True,
) -> None:
    """Raise PayloadError naming the device and every missing, unexpected, misshapen, mistyped or non-finite key."""
    problems = []
    missing = set(expected) - set(payload)
    unexpected = set(payload) - set(expected)
    common = [k for k in expected if k in payload]
    shape = [k for k in common if tuple(payload[k].shape) != tuple(expected[k][0])]
    dtype = [k for k in common if payload[k].dtype != expected[k][1]]
    if missing:
        problems.append(f"missing keys {_names(missing)}")
    if unexpected:
        problems.append(f"unexpected keys {_names(unexpected)}")
    if shape:
        problems.append(f"wrong shape {_names(shape)}")
    if dtype:
        problems.append(f"wrong dtype {_names(dtype)}")
    if check_finite:
        floats = [k for k in common if payload[k].is_floating_point() or payload[k].is_complex()]
        if floats:
            # One host sync for the whole payload, not one per key.
            dev = payload[floats[0]].device
            ok = torch.stack([torch.isfinite(payload[k]).all().to(dev) for k in floats])
            bad = [k for k, fine in zip(floats, ok.tolist()) if not fine]
            if bad:
                problems.append(f"non-finite values in {_names(bad)}")
    if problems:
        raise PayloadError(f"payload from device {device_id} rejected: " + "; ".join(problems))


def check_rows(rows: Mapping[str, Tensor], shapes: Mapping[str, tuple[int, ...]], *, device_id) -> None:
    """Raise PayloadError naming the device and key unless every row list of a row-sparse payload is a 1-D
    integer tensor of distinct ascending rows of an expected tensor."""
    for key, idx in rows.items():
        where = f"payload from device {device_id} rejected: rows of {key!r}"
        if key not in shapes:
            raise PayloadError(f"{where}: not one of the expected keys")
        if idx.dim() != 1 or idx.is_floating_point() or idx.is_complex() or idx.dtype == torch.bool:
            raise PayloadError(f"{where}: expected a 1-D integer tensor, got {idx.dtype} of shape {tuple(idx.shape)}")
        n = shapes[key][0] if shapes[key] else 1
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= n):
            raise PayloadError(f"{where}: row indices must be in [0, {n})")
        if idx.numel() > 1 and not bool((idx[1:] > idx[:-1]).all()):
            raise PayloadError(f"{where}: row indices must be distinct and ascending")


def weighted_average(payloads: Sequence[tuple[Mapping[str, Tensor], float]]) -> OrderedDict[str, Tensor]:
    """Per key sum_i w_i x_i / sum_i w_i, accumulated in float32 (float64 for float64 inputs)."""
    if not payloads:
        raise PayloadError("no payloads to average")
    weights = [float(w) for _, w in payloads]
    total = sum(weights)
    if any(w < 0 for w in weights) or total <= 0:
        raise PayloadError(f"weights must be >= 0 with a positive sum, got {weights}")
    first = payloads[0][0]
    for i, (payload, _) in enumerate(payloads[1:], start=1):
        if set(payload) != set(first):
            raise PayloadError(f"payload {i} keys differ from payload 0: missing {_names(set(first) - set(payload))}, "
                               f"unexpected {_names(set(payload) - set(first))}")
    out: OrderedDict[str, Tensor] = OrderedDict()
    for key, ref in first.items():
        acc_dtype = torch.float64 if ref.dtype == torch.float64 else torch.float32
        acc = torch.zeros(ref.shape, dtype=acc_dtype, device=ref.device)
        for i, ((payload, _), w) in enumerate(zip(payloads, weights)):
            x = payload[key]
            if x.shape != ref.shape:
                raise PayloadError(f"payload {i} key {key!r} has shape {tuple(x.shape)}, expected {tuple(ref.shape)}")
            acc.add_(x.to(device=ref.device, dtype=acc_dtype), alpha=w)
        out[key] = (acc / total).to(ref.dtype)
    return out


def payload_bytes(payload: Mapping[str, Tensor]) -> int:
    """Tensor payload size in bytes: sum of numel * element_size."""
    return sum(t.numel() * t.element_size() for t in payload.values())
