"""The GRPC wire format: JSON checked against a schema, tensors as safetensors; no pickle anywhere.

A message on the wire is

    MAGIC (8 bytes) | header length (4 bytes, big-endian) | JSON header (UTF-8) | safetensors blob

The JSON header holds the FedML message type, sender and receiver ranks, and the message's
arguments, each message type with its own fixed set of keys (`SCHEMAS`); where an argument holds
tensors (the Download a server sends, each Upload in a silo's bundle) the JSON lists their names
and the tensors themselves are in the safetensors blob under `d/<name>` and `u<i>/<name>`.

Decoding never executes anything from the message: it checks the JSON's types, ranges and keys,
then reads the safetensors header (a small JSON of its own) and checks every tensor's name, dtype,
shape and byte range against the tensors the receiver expects (`TensorSpec`: the model's shareable
tensors in the wire dtype, narrowed on the server to those of the exchange it is waiting for)
before a single tensor is materialised. Anything else is a `WireError` with the reason.

No FedML import: the transport (grpc_transport.py) turns a decoded message into FedML's Message.
"""
from __future__ import annotations

import json
import math
import re
import struct
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

MAGIC = b"FIBECW1\n"
VERSION = 1
MAX_HEADER_BYTES = 1 << 20  # the JSON of one message: names, a few numbers, statistics

# FedML's cross-silo message types (fedml.cross_silo.{server,client}.message_define.MyMessage)
MSG_INIT_CONFIG, MSG_SYNC_MODEL, MSG_UPLOAD, MSG_CLIENT_STATUS, MSG_CHECK_STATUS, MSG_FINISH = 1, 2, 3, 5, 6, 7
# FedML's argument keys of those messages
ARG_MODEL, ARG_CLIENT_INDEX, ARG_CLIENT_OS, ARG_NUM_SAMPLES, ARG_CLIENT_STATUS = (
    "model_params", "client_idx", "client_os", "num_samples", "client_status")

SAFETENSORS_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}
_ITEMSIZE = {"F32": 4, "BF16": 2, "F16": 2}


class WireError(ValueError):
    """A received message that fails to decode or to validate; the reason is the message."""


@dataclass(frozen=True)
class TensorSpec:
    """The tensors a receiver accepts: name -> (shape, dtype), plus the layer-score vector's length.

    `allowed` narrows the names further (the server: the keys of the exchange it waits for);
    None accepts every name in `shapes`.
    """

    shapes: Mapping[str, tuple[int, ...]]
    dtype: torch.dtype
    num_layers: int
    allowed: Optional[frozenset] = None

    def narrowed(self, names) -> "TensorSpec":
        return TensorSpec(self.shapes, self.dtype, self.num_layers, frozenset(names))

    def expect(self, name: str) -> tuple[tuple[int, ...], str]:
        """(shape, safetensors dtype) a tensor of this name must have; WireError if it is not accepted."""
        if name not in self.shapes:
            raise WireError(f"tensor {name!r} is not one of the model's shared tensors")
        if self.allowed is not None and name not in self.allowed:
            raise WireError(f"tensor {name!r} is not part of the current exchange (outside the GAL)")
        return tuple(self.shapes[name]), SAFETENSORS_DTYPES[self.dtype]

    def max_tensor_bytes(self) -> int:
        """Bytes of every accepted tensor once (the largest Download or Upload), plus layer scores."""
        item = self.dtype.itemsize
        return sum(math.prod(s) * item for s in self.shapes.values()) + 4 * self.num_layers


@dataclass
class WireMessage:
    """A decoded message: FedML's type, sender and receiver, and its arguments (tensors in place)."""

    type: int
    sender: int
    receiver: int
    params: dict = field(default_factory=dict)


# the schema ---------------------------------------------------------------------------------------------
def _fail(where: str, expected: str, value: Any) -> None:
    shown = repr(value)
    raise WireError(f"{where}: expected {expected}, got {shown[:80]}")


def _int(where: str, value: Any, lo: int = 0, hi: int = 2**31 - 1) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
        _fail(where, f"an integer in [{lo}, {hi}]", value)
    return value


def _str(where: str, value: Any, max_len: int = 64, pattern: Optional[str] = None) -> str:
    if not isinstance(value, str) or len(value) > max_len or (pattern and not re.fullmatch(pattern, value)):
        _fail(where, f"a string of at most {max_len} characters" + (f" matching {pattern}" if pattern else ""), value)
    return value


def _bool(where: str, value: Any) -> bool:
    if not isinstance(value, bool):
        _fail(where, "true or false", value)
    return value


def _keys(where: str, obj: Any, required: set, optional: set = frozenset()) -> dict:
    if not isinstance(obj, dict):
        _fail(where, "an object", obj)
    missing, extra = required - set(obj), set(obj) - required - set(optional)
    if missing or extra:
        raise WireError(f"{where}: keys {sorted(obj)}; expected {sorted(required)}"
                        + (f" (optional {sorted(optional)})" if optional else ""))
    return obj


def _names(where: str, value: Any) -> list[str]:
    if not isinstance(value, list) or len(value) > 100_000:
        _fail(where, "a list of tensor names", value)
    names = [_str(f"{where}[{i}]", v, max_len=512) for i, v in enumerate(value)]
    if len(set(names)) != len(names):
        raise WireError(f"{where}: a tensor name is repeated")
    return names


def _stats(where: str, value: Any) -> dict:
    """Round statistics: a flat object of numbers (NaN allowed: a diverged loss is a fact), null or strings."""
    if not isinstance(value, dict) or len(value) > 64:
        _fail(where, "an object of at most 64 statistics", value)
    for k, v in value.items():
        _str(f"{where} key", k)
        if v is not None and not isinstance(v, (int, float, str)):
            _fail(f"{where}.{k}", "a number, a string or null", v)
        if isinstance(v, str):
            _str(f"{where}.{k}", v, max_len=256)
    return value


def _rows(where: str, value: Any, names: list[str]) -> dict[str, list[int]]:
    """Row lists of the row-sparse tensors (core.messages.Upload.rows): each names a listed tensor and holds
    distinct ascending row indices; the tensor's shape is checked against them when the blob is read."""
    if not isinstance(value, dict) or len(value) > len(names):
        _fail(where, "an object of tensor name -> row list", value)
    for name, rows in value.items():
        if name not in names:
            raise WireError(f"{where}: {name!r} is not one of the upload's tensors")
        if not isinstance(rows, list) or len(rows) > 1_000_000:
            _fail(f"{where}.{name}", "a list of row indices", rows)
        for i, r in enumerate(rows):
            _int(f"{where}.{name}[{i}]", r)
        if any(b <= a for a, b in zip(rows, rows[1:])):
            raise WireError(f"{where}.{name}: row indices must be distinct and ascending")
    return value


DEVICE_LIST = r"\d{1,9}(,\d{1,9}){0,9999}"


def _check_download(where: str, d: Any) -> None:
    _keys(where, d, {"round", "phase", "gal", "rescore", "tensors"})
    _int(f"{where}.round", d["round"])
    if d["phase"] not in ("score", "train"):
        _fail(f"{where}.phase", "'score' or 'train'", d["phase"])
    if d["gal"] is not None:
        if not isinstance(d["gal"], list) or len(d["gal"]) > 10_000:
            _fail(f"{where}.gal", "null or a list of block indices", d["gal"])
        for i, b in enumerate(d["gal"]):
            _int(f"{where}.gal[{i}]", b, 0, 9_999)
    _bool(f"{where}.rescore", d["rescore"])
    _names(f"{where}.tensors", d["tensors"])


def _check_bundle(where: str, b: Any) -> None:
    _keys(where, b, {"reply_to", "uploads"})
    tag = b["reply_to"]
    if not isinstance(tag, list) or len(tag) != 2:
        _fail(f"{where}.reply_to", "[round, phase]", tag)
    _int(f"{where}.reply_to[0]", tag[0])
    if tag[1] not in ("score", "train"):
        _fail(f"{where}.reply_to[1]", "'score' or 'train'", tag[1])
    if not isinstance(b["uploads"], list) or not 1 <= len(b["uploads"]) <= 10_000:
        _fail(f"{where}.uploads", "a list of 1 or more uploads", b["uploads"])
    for i, u in enumerate(b["uploads"]):
        w = f"{where}.uploads[{i}]"
        _keys(w, u, {"device_id", "num_samples", "tensors", "layer_scores", "stats"}, optional={"rows"})
        _int(f"{w}.device_id", u["device_id"])
        _int(f"{w}.num_samples", u["num_samples"])
        _rows(f"{w}.rows", u.get("rows", {}), _names(f"{w}.tensors", u["tensors"]))
        _bool(f"{w}.layer_scores", u["layer_scores"])
        _stats(f"{w}.stats", u["stats"])


def _check_model_message(p: dict) -> None:
    _keys("params", p, {ARG_MODEL, ARG_CLIENT_INDEX, ARG_CLIENT_OS})
    _check_download(f"params.{ARG_MODEL}", p[ARG_MODEL])
    _str(f"params.{ARG_CLIENT_INDEX}", p[ARG_CLIENT_INDEX], max_len=100_000, pattern=DEVICE_LIST)
    _str(f"params.{ARG_CLIENT_OS}", p[ARG_CLIENT_OS])


def _check_upload_message(p: dict) -> None:
    _keys("params", p, {ARG_MODEL, ARG_NUM_SAMPLES})
    _check_bundle(f"params.{ARG_MODEL}", p[ARG_MODEL])
    _int(f"params.{ARG_NUM_SAMPLES}", p[ARG_NUM_SAMPLES])


def _check_status_message(p: dict) -> None:
    _keys("params", p, {ARG_CLIENT_STATUS, ARG_CLIENT_OS})
    _str(f"params.{ARG_CLIENT_STATUS}", p[ARG_CLIENT_STATUS])
    _str(f"params.{ARG_CLIENT_OS}", p[ARG_CLIENT_OS])


def _check_index_message(p: dict) -> None:
    _keys("params", p, {ARG_CLIENT_INDEX})
    _str(f"params.{ARG_CLIENT_INDEX}", p[ARG_CLIENT_INDEX], max_len=100_000, pattern=DEVICE_LIST)


# message type -> (check of its JSON arguments, who may send it: "server" or "silo")
SCHEMAS: dict[int, tuple[Callable[[dict], None], str]] = {
    MSG_INIT_CONFIG: (_check_model_message, "server"),
    MSG_SYNC_MODEL: (_check_model_message, "server"),
    MSG_CHECK_STATUS: (_check_index_message, "server"),
    MSG_FINISH: (_check_index_message, "server"),
    MSG_UPLOAD: (_check_upload_message, "silo"),
    MSG_CLIENT_STATUS: (_check_status_message, "silo"),
}


# encoding -------------------------------------------------------------------------------------------------
def encode(msg_type: int, sender: int, receiver: int, params: Mapping[str, Any]) -> bytes:
    """The wire bytes of one message (params as FedML's managers fill them)."""
    msg_type = int(msg_type)
    if msg_type not in SCHEMAS:
        raise WireError(f"message type {msg_type} has no wire schema")
    tensors: "OrderedDict[str, torch.Tensor]" = OrderedDict()
    header_params: dict[str, Any] = {}
    for key, value in params.items():
        if key == ARG_MODEL and msg_type in (MSG_INIT_CONFIG, MSG_SYNC_MODEL):
            value = _encode_download(value, tensors)
        elif key == ARG_MODEL and msg_type == MSG_UPLOAD:
            value = _encode_bundle(value, tensors)
        elif key == ARG_NUM_SAMPLES:
            value = int(value)
        elif key in (ARG_CLIENT_INDEX, ARG_CLIENT_OS, ARG_CLIENT_STATUS):
            value = str(value)
        header_params[key] = value
    header = {"v": VERSION, "type": msg_type, "sender": int(sender), "receiver": int(receiver),
              "params": header_params}
    check_header(header)  # a sender never puts on the wire what a receiver would refuse
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    blob = save_safetensors({k: v.contiguous() for k, v in tensors.items()}) if tensors else b""
    return MAGIC + struct.pack(">I", len(text)) + text + blob


def _encode_download(d: Mapping[str, Any], tensors: dict) -> dict:
    names = list(d["tensors"])
    for n in names:
        tensors[f"d/{n}"] = d["tensors"][n]
    return {"round": int(d["round"]), "phase": str(d["phase"]),
            "gal": None if d["gal"] is None else [int(b) for b in d["gal"]], "rescore": bool(d["rescore"]),
            "tensors": names}


def _encode_bundle(b: Mapping[str, Any], tensors: dict) -> dict:
    uploads = []
    for i, u in enumerate(b["uploads"]):
        names = list(u["tensors"])
        for n in names:
            tensors[f"u{i}/{n}"] = u["tensors"][n]
        if u.get("layer_scores") is not None:
            tensors[f"u{i}/#layer_scores"] = u["layer_scores"].detach().float().cpu()
        uploads.append({"device_id": int(u["device_id"]), "num_samples": int(u["num_samples"]), "tensors": names,
                        "rows": {str(k): [int(i) for i in r.tolist()] for k, r in (u.get("rows") or {}).items()},
                        "layer_scores": u.get("layer_scores") is not None,
                        "stats": {str(k): _plain(v) for k, v in (u.get("stats") or {}).items()}})
    tag = b["reply_to"]
    return {"reply_to": [int(tag[0]), str(tag[1])], "uploads": uploads}


def _plain(v: Any) -> Any:
    """A statistic as a JSON value (numpy and one-element torch scalars become floats)."""
    if isinstance(v, (int, float, str)) or v is None:
        return v
    return float(v)


# decoding -------------------------------------------------------------------------------------------------
def check_header(header: Any) -> None:
    """The JSON part of a message against its schema (types, ranges, the keys its type may carry)."""
    _keys("message", header, {"v", "type", "sender", "receiver", "params"})
    if header["v"] != VERSION:
        _fail("message.v", f"wire format version {VERSION}", header["v"])
    _int("message.type", header["type"])
    if header["type"] not in SCHEMAS:
        _fail("message.type", f"one of {sorted(SCHEMAS)}", header["type"])
    _int("message.sender", header["sender"], 0, 1_000_000)
    _int("message.receiver", header["receiver"], 0, 1_000_000)
    check, sent_by = SCHEMAS[header["type"]]
    if (header["sender"] == 0) != (sent_by == "server"):
        raise WireError(f"message type {header['type']} is sent by the {sent_by}, not by rank {header['sender']}")
    if not isinstance(header["params"], dict):
        _fail("message.params", "an object", header["params"])
    check(header["params"])


def split_frame(data: bytes, max_bytes: int) -> tuple[dict, memoryview]:
    """(JSON header, safetensors blob) of a message, the header parsed and checked."""
    if len(data) > max_bytes:
        raise WireError(f"message of {len(data)} bytes is over the limit of {max_bytes}")
    if len(data) < len(MAGIC) + 4 or data[:len(MAGIC)] != MAGIC:
        raise WireError("not a fedml-fibec wire message (bad magic bytes)")
    (n,) = struct.unpack(">I", data[len(MAGIC):len(MAGIC) + 4])
    start = len(MAGIC) + 4
    if n > MAX_HEADER_BYTES or start + n > len(data):
        raise WireError(f"JSON header length {n} does not fit the message of {len(data)} bytes")
    try:
        header = json.loads(bytes(data[start:start + n]).decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise WireError(f"JSON header does not parse ({exc})") from None
    check_header(header)
    return header, memoryview(data)[start + n:]


def _blob_entries(blob: memoryview) -> dict[str, dict]:
    """The safetensors header of a blob, checked for a consistent layout (nothing is loaded yet)."""
    if len(blob) == 0:
        return {}
    if len(blob) < 8:
        raise WireError("truncated safetensors blob (no header length)")
    (n,) = struct.unpack("<Q", blob[:8])
    if n > MAX_HEADER_BYTES or 8 + n > len(blob):
        raise WireError(f"safetensors header length {n} does not fit the blob of {len(blob)} bytes")
    try:
        meta = json.loads(bytes(blob[8:8 + n]).decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise WireError(f"safetensors header does not parse ({exc})") from None
    if not isinstance(meta, dict):
        raise WireError("safetensors header is not an object")
    meta.pop("__metadata__", None)
    data_len = len(blob) - 8 - n
    spans = []
    for name, e in meta.items():
        if not isinstance(e, dict) or set(e) != {"dtype", "shape", "data_offsets"}:
            raise WireError(f"safetensors entry {name!r} is malformed")
        off = e["data_offsets"]
        if (not isinstance(off, list) or len(off) != 2 or not all(isinstance(o, int) and o >= 0 for o in off)
                or not off[0] <= off[1] <= data_len):
            raise WireError(f"tensor {name!r}: data offsets {off} outside the {data_len} data bytes (truncated?)")
        spans.append(tuple(off))
    spans.sort()
    pos = 0
    for a, b in spans:  # contiguous, no overlap, no slack: exactly what safetensors writes
        if a != pos:
            raise WireError("safetensors data offsets overlap or leave gaps")
        pos = b
    if pos != data_len:
        raise WireError(f"safetensors data is {data_len} bytes but its tensors cover {pos}")
    return meta


def _check_entry(name: str, entry: dict, shape: tuple[int, ...], dtype: str) -> None:
    if entry["dtype"] != dtype:
        raise WireError(f"tensor {name!r}: dtype {entry['dtype']!r}, expected {dtype!r}")
    if list(entry["shape"]) != list(shape):
        raise WireError(f"tensor {name!r}: shape {entry['shape']}, expected {list(shape)}")
    a, b = entry["data_offsets"]
    if b - a != math.prod(shape) * _ITEMSIZE[dtype]:
        raise WireError(f"tensor {name!r}: {b - a} data bytes for shape {list(shape)} of {dtype}")


def decode(data: bytes, spec: TensorSpec, max_bytes: int) -> WireMessage:
    """A received message, every part checked; WireError (with the reason) for anything else."""
    header, blob = split_frame(data, max_bytes)
    entries = _blob_entries(blob)
    params = header["params"]
    wanted: dict[str, tuple[tuple[int, ...], str]] = {}  # blob key -> (shape, dtype)
    t = header["type"]
    if t in (MSG_INIT_CONFIG, MSG_SYNC_MODEL):
        for n in params[ARG_MODEL]["tensors"]:
            wanted[f"d/{n}"] = spec.expect(n)
    elif t == MSG_UPLOAD:
        for i, u in enumerate(params[ARG_MODEL]["uploads"]):
            rows = u.get("rows", {})
            for n in u["tensors"]:
                shape, dtype = spec.expect(n)
                if n in rows:  # a row-sparse tensor: only the listed rows, each inside the tensor
                    if not shape or (rows[n] and rows[n][-1] >= shape[0]):
                        raise WireError(f"uploads[{i}].rows.{n}: a row index beyond the tensor's {shape[:1]} rows")
                    shape = (len(rows[n]), *shape[1:])
                wanted[f"u{i}/{n}"] = (shape, dtype)
            if u["layer_scores"]:
                wanted[f"u{i}/#layer_scores"] = ((spec.num_layers,), "F32")
    if set(entries) != set(wanted):
        extra, missing = sorted(set(entries) - set(wanted)), sorted(set(wanted) - set(entries))
        raise WireError(f"tensors in the blob do not match the header (unlisted {extra[:3]}, missing {missing[:3]})")
    for key, (shape, dtype) in wanted.items():
        _check_entry(key, entries[key], shape, dtype)
    try:
        tensors = load_safetensors(bytes(blob)) if wanted else {}
    except Exception as exc:  # safetensors' own checks, after ours
        raise WireError(f"safetensors blob does not load ({type(exc).__name__}: {exc})") from None
    if t in (MSG_INIT_CONFIG, MSG_SYNC_MODEL):
        d = params[ARG_MODEL]
        params[ARG_MODEL] = OrderedDict(round=d["round"], phase=d["phase"], gal=d["gal"],
                                        tensors=OrderedDict((n, tensors[f"d/{n}"]) for n in d["tensors"]),
                                        rescore=d["rescore"])
    elif t == MSG_UPLOAD:
        b = params[ARG_MODEL]
        uploads = []
        for i, u in enumerate(b["uploads"]):
            uploads.append({"device_id": u["device_id"], "num_samples": u["num_samples"],
                            "tensors": OrderedDict((n, tensors[f"u{i}/{n}"]) for n in u["tensors"]),
                            "rows": {n: torch.tensor(r, dtype=torch.int64) for n, r in u.get("rows", {}).items()},
                            "layer_scores": tensors.get(f"u{i}/#layer_scores"), "stats": dict(u["stats"]),
                            "reply_to": list(b["reply_to"])})
        params[ARG_MODEL] = {"reply_to": list(b["reply_to"]), "uploads": uploads}
    return WireMessage(t, header["sender"], header["receiver"], params)
