"""The GRPC wire: our codec (JSON + safetensors, no pickle), mutual TLS and its refusals, limits.

Codec and certificate checks run in-process; the transport tests run real GRPC servers and
clients on 127.0.0.1 (our FibecGrpcTransport, the sender side crafted by hand where it attacks).
The whole-run tests (a TLS run equal to the plaintext run, attacked meanwhile) are at the end.
"""
from __future__ import annotations

import datetime as dt
import json
import os
import pickle
import struct
import subprocess
import sys
import threading
import time
from collections import OrderedDict
from pathlib import Path

import grpc
import pytest
import torch
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from fedml_fibec.engines.cross_silo import certs, codec
from fedml_fibec.engines.cross_silo.ipconfig import loopback, to_csv
from fedml_fibec.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent

SHAPES = {"head.weight": (2, 8), "head.bias": (2,), "blk0.lora_A": (4, 8), "blk1.lora_A": (4, 8)}
SPEC = codec.TensorSpec(SHAPES, torch.float32, num_layers=2)
LIMIT = 64 * 1024


def _tensors(names, seed=0):
    g = torch.Generator().manual_seed(seed)
    return OrderedDict((n, torch.randn(SHAPES[n], generator=g)) for n in names)


def _download(names=("head.weight", "head.bias")):
    return OrderedDict(round=3, phase="train", gal=[1], tensors=_tensors(names), rescore=False)


def _bundle(names=("head.weight", "blk1.lora_A"), scores=True):
    up = {"device_id": 4, "num_samples": 17, "tensors": _tensors(names, 1),
          "layer_scores": torch.tensor([0.25, 0.75]) if scores else None,
          "stats": {"train_loss": 0.5, "device_accuracy": None, "curriculum_share": 0.2}, "reply_to": [3, "train"]}
    return {"reply_to": [3, "train"], "uploads": [up]}


def _model_params(d=None):
    return {"model_params": d or _download(), "client_idx": "3", "client_os": "PythonClient"}


def _upload_params(b=None):
    return {"model_params": b or _bundle(), "num_samples": 17}


def _frame(header: dict, blob: bytes = b"") -> bytes:
    text = json.dumps(header).encode()
    return codec.MAGIC + struct.pack(">I", len(text)) + text + blob


# the codec ---------------------------------------------------------------------------------------------
def test_messages_round_trip_bit_exactly():
    data = codec.encode(codec.MSG_SYNC_MODEL, 0, 2, _model_params())
    msg = codec.decode(data, SPEC, LIMIT)
    assert (msg.type, msg.sender, msg.receiver) == (codec.MSG_SYNC_MODEL, 0, 2)
    d, ref = msg.params["model_params"], _download()
    assert {k: d[k] for k in ("round", "phase", "gal", "rescore")} == {"round": 3, "phase": "train", "gal": [1],
                                                                     "rescore": False}
    assert list(d["tensors"]) == list(ref["tensors"])
    assert all(torch.equal(d["tensors"][k], ref["tensors"][k]) for k in ref["tensors"])
    assert msg.params["client_idx"] == "3"

    up = codec.decode(codec.encode(codec.MSG_UPLOAD, 2, 0, _upload_params()), SPEC, LIMIT).params
    got, want = up["model_params"]["uploads"][0], _bundle()["uploads"][0]
    assert up["model_params"]["reply_to"] == [3, "train"] and up["num_samples"] == 17
    assert (got["device_id"], got["num_samples"], got["stats"]) == (4, 17, want["stats"])
    assert torch.equal(got["layer_scores"], want["layer_scores"])
    assert all(torch.equal(got["tensors"][k], want["tensors"][k]) for k in want["tensors"])

    st = codec.decode(codec.encode(codec.MSG_CLIENT_STATUS, 1, 0, {"client_status": "ONLINE", "client_os": "Linux"}),
                      SPEC, LIMIT)
    assert st.params == {"client_status": "ONLINE", "client_os": "Linux"}
    bf = codec.TensorSpec(SHAPES, torch.bfloat16, 2)
    d = OrderedDict(round=0, phase="score", gal=None, rescore=False,
                    tensors=OrderedDict((k, v.bfloat16()) for k, v in _tensors(SHAPES).items()))
    back = codec.decode(codec.encode(codec.MSG_INIT_CONFIG, 0, 1, _model_params(d)), bf, LIMIT)
    assert all(torch.equal(back.params["model_params"]["tensors"][k], d["tensors"][k]) for k in SHAPES)


def test_decoding_never_unpickles(monkeypatch):
    """The receiving path works with every unpickling entry point broken."""
    def boom(*a, **k):
        raise AssertionError("pickle used on the receiving path")
    data = codec.encode(codec.MSG_UPLOAD, 1, 0, _upload_params())
    monkeypatch.setattr(pickle, "loads", boom)
    monkeypatch.setattr(pickle, "load", boom)
    monkeypatch.setattr(pickle, "Unpickler", boom)
    monkeypatch.setattr(torch, "load", boom)
    assert codec.decode(data, SPEC, LIMIT).params["num_samples"] == 17


def _sparse_bundle(rows=(0, 2), sent_rows=None):
    """An upload whose blk1.lora_A travels row-sparse: the rows `rows` listed, `sent_rows` of them sent."""
    b = _bundle(scores=False)
    u = b["uploads"][0]
    u["rows"] = {"blk1.lora_A": torch.tensor(list(rows), dtype=torch.int64)}
    u["tensors"]["blk1.lora_A"] = u["tensors"]["blk1.lora_A"][: len(rows) if sent_rows is None else sent_rows]
    return b


def test_row_sparse_uploads_round_trip_and_bad_rows_are_refused():
    server_spec = SPEC.narrowed(["head.weight", "head.bias", "blk1.lora_A"])
    up = codec.decode(codec.encode(codec.MSG_UPLOAD, 2, 0, _upload_params(_sparse_bundle())), server_spec, LIMIT)
    got, want = up.params["model_params"]["uploads"][0], _sparse_bundle()["uploads"][0]
    assert got["rows"]["blk1.lora_A"].tolist() == [0, 2] and got["tensors"]["blk1.lora_A"].shape == (2, 8)
    assert all(torch.equal(got["tensors"][k], want["tensors"][k]) for k in want["tensors"])
    assert codec.decode(codec.encode(codec.MSG_UPLOAD, 2, 0, _upload_params()), server_spec, LIMIT).params[
        "model_params"]["uploads"][0]["rows"] == {}  # a dense upload has no row lists
    for bundle, reason in ((_sparse_bundle(rows=(2, 0)), "distinct and ascending"),
                           (_sparse_bundle(rows=(1, 1)), "distinct and ascending"),
                           (_sparse_bundle(rows=(0, 4)), "beyond the tensor"),
                           (_sparse_bundle(rows=(0, 1, 2), sent_rows=2), r"shape \[2, 8\], expected \[3, 8\]")):
        with pytest.raises(codec.WireError, match=reason):
            codec.decode(codec.encode(codec.MSG_UPLOAD, 2, 0, _upload_params(bundle)), server_spec, LIMIT)
    unlisted = _sparse_bundle()
    unlisted["uploads"][0]["rows"] = {"blk0.lora_A": torch.tensor([0])}
    with pytest.raises(codec.WireError, match="not one of the upload's tensors"):
        codec.decode(codec.encode(codec.MSG_UPLOAD, 2, 0, _upload_params(unlisted)), server_spec, LIMIT)


def _blob_with(entries: dict, data: bytes) -> bytes:
    head = json.dumps(entries).encode()
    return struct.pack("<Q", len(head)) + head + data


def _bad_messages() -> dict[str, bytes]:
    """Each kind of bad message the issue names, as bytes a peer could send."""
    good = codec.encode(codec.MSG_UPLOAD, 1, 0, _upload_params())
    header_len = struct.unpack(">I", good[8:12])[0]
    upload_header = json.loads(good[12:12 + header_len])
    wrong_shape = _bundle()
    wrong_shape["uploads"][0]["tensors"]["head.weight"] = torch.zeros(3, 8)
    wrong_dtype = _bundle()
    wrong_dtype["uploads"][0]["tensors"]["head.weight"] = torch.zeros(2, 8, dtype=torch.float16)
    outside = _bundle(names=("head.weight", "blk0.lora_A"))  # blk0 is not in the exchange's GAL
    huge_header = dict(upload_header)
    huge_blob = _blob_with({"u0/head.weight": {"dtype": "F32", "shape": [2**20, 2**20], "data_offsets": [0, 2**42]}},
                           b"\0" * 64)
    wrong_type = json.loads(json.dumps(upload_header))
    wrong_type["params"]["model_params"]["uploads"][0]["num_samples"] = "17"
    return {
        "random bytes": os.urandom(4096),
        "truncated safetensors": good[:-100],
        "wrong shape": codec.encode(codec.MSG_UPLOAD, 1, 0, _upload_params(wrong_shape)),
        "wrong dtype": codec.encode(codec.MSG_UPLOAD, 1, 0, _upload_params(wrong_dtype)),
        "key outside the GAL": codec.encode(codec.MSG_UPLOAD, 1, 0, _upload_params(outside)),
        "huge tensor header": _frame({**huge_header, "params": {**huge_header["params"], "model_params": {
            "reply_to": [3, "train"], "uploads": [{"device_id": 0, "num_samples": 1, "tensors": ["head.weight"],
                                                   "layer_scores": False, "stats": {}}]}}}, huge_blob),
        "over the size limit": _frame(upload_header, b"\0" * (LIMIT + 10)),
        "JSON field of the wrong type": _frame(wrong_type, good[12 + header_len:]),
        "pickle": pickle.dumps({"x": 1}),
    }


EXPECTED_REASONS = {
    "random bytes": "bad magic", "truncated safetensors": "outside the", "wrong shape": "shape [3, 8], expected [2, 8]",
    "wrong dtype": "dtype 'F16', expected 'F32'", "key outside the GAL": "outside the GAL",
    "huge tensor header": "outside the 64 data bytes", "over the size limit": "over the limit",
    "JSON field of the wrong type": "num_samples: expected an integer", "pickle": "bad magic",
}


@pytest.mark.parametrize("kind", sorted(EXPECTED_REASONS))
def test_bad_messages_are_refused_with_the_reason(kind):
    server_spec = SPEC.narrowed(["head.weight", "head.bias", "blk1.lora_A"])
    with pytest.raises(codec.WireError, match=EXPECTED_REASONS[kind].replace("[", r"\[").replace("]", r"\]")):
        codec.decode(_bad_messages()[kind], server_spec, LIMIT)


def test_schema_refuses_unknown_types_keys_and_roles():
    ok = json.loads(codec.encode(codec.MSG_FINISH, 0, 1, {"client_idx": "0"})[12:])
    for change, reason in (({"type": 99}, "message.type"), ({"sender": 1}, "sent by the server"),
                           ({"params": {"client_idx": "0", "evil": 1}}, "keys"),
                           ({"params": {"client_idx": "0;rm -rf"}}, "matching"), ({"v": 2}, "version")):
        with pytest.raises(codec.WireError, match=reason):
            codec.decode(_frame({**ok, **change}), SPEC, LIMIT)
    # The sender never puts on the wire what a receiver would refuse.
    with pytest.raises(codec.WireError):
        codec.encode(codec.MSG_FINISH, 0, 1, {"client_idx": "0", "extra": 1})


def test_fedml_message_types_are_the_codec_types():
    from fedml.cross_silo.client.message_define import MyMessage as C
    from fedml.cross_silo.server.message_define import MyMessage as S
    assert (S.MSG_TYPE_S2C_INIT_CONFIG, S.MSG_TYPE_S2C_SYNC_MODEL_TO_CLIENT, C.MSG_TYPE_C2S_SEND_MODEL_TO_SERVER,
            C.MSG_TYPE_C2S_CLIENT_STATUS, S.MSG_TYPE_S2C_CHECK_CLIENT_STATUS, S.MSG_TYPE_S2C_FINISH) == (
        codec.MSG_INIT_CONFIG, codec.MSG_SYNC_MODEL, codec.MSG_UPLOAD, codec.MSG_CLIENT_STATUS,
        codec.MSG_CHECK_STATUS, codec.MSG_FINISH)
    assert (S.MSG_ARG_KEY_MODEL_PARAMS, S.MSG_ARG_KEY_CLIENT_INDEX, S.MSG_ARG_KEY_CLIENT_OS,
            C.MSG_ARG_KEY_NUM_SAMPLES, C.MSG_ARG_KEY_CLIENT_STATUS) == (
        codec.ARG_MODEL, codec.ARG_CLIENT_INDEX, codec.ARG_CLIENT_OS, codec.ARG_NUM_SAMPLES, codec.ARG_CLIENT_STATUS)


# certificates ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    out = tmp_path_factory.mktemp("pki") / "certs"
    proc = subprocess.run([sys.executable, str(ROOT / "run_scripts" / "make_certs.py"), "--local", "3", "--out",
                           str(out)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return out


def _identity(out: Path, rank: int) -> certs.TlsIdentity:
    return certs.load_identity(str(out / "ca.crt"), str(out / "rank{rank}.crt"), str(out / "rank{rank}.key"), rank)


def test_make_certs_files_and_permissions(pki):
    assert sorted(p.name for p in pki.iterdir()) == ["ca.crt", "ca.key"] + sorted(
        f"rank{r}.{e}" for r in range(4) for e in ("crt", "key"))
    assert pki.stat().st_mode & 0o777 == 0o700
    for p in pki.glob("*.key"):
        assert p.stat().st_mode & 0o777 == 0o600, p
    cert = x509.load_pem_x509_certificate((pki / "rank2.crt").read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "rank-2.fedml-fibec" in san.get_values_for_type(x509.DNSName)
    assert [str(a) for a in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    assert _identity(pki, 2).rank == 2


def test_rotation_keeps_the_ca(tmp_path):
    eps = loopback(1)
    certs.make_federation_certs(eps, tmp_path)
    ca, old = (tmp_path / "ca.crt").read_bytes(), (tmp_path / "rank1.crt").read_bytes()
    certs.make_federation_certs(eps, tmp_path)
    assert (tmp_path / "ca.crt").read_bytes() == ca and (tmp_path / "rank1.crt").read_bytes() != old
    assert _identity(tmp_path, 1).rank == 1
    certs.make_federation_certs(eps, tmp_path, new_ca=True)
    assert (tmp_path / "ca.crt").read_bytes() != ca


def _signed(pki: Path, rank: int, **kw):
    ca_cert = x509.load_pem_x509_certificate((pki / "ca.crt").read_bytes())
    ca_key = serialization.load_pem_private_key((pki / "ca.key").read_bytes(), None)
    return certs.make_host_cert(ca_cert, ca_key, rank, ["127.0.0.1"], **kw)


def _write_pair(folder: Path, cert, key) -> tuple[Path, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    certs.write_cert(folder / "x.crt", cert)
    certs.write_key(folder / "x.key", key)
    return folder / "x.crt", folder / "x.key"


def test_start_up_refuses_bad_tls_files(pki, tmp_path):
    ca = str(pki / "ca.crt")
    with pytest.raises(ConfigError, match="names rank 1.*this process is rank 2"):
        certs.load_identity(ca, str(pki / "rank1.crt"), str(pki / "rank1.key"), 2)
    with pytest.raises(ConfigError, match="is not the key of"):
        certs.load_identity(ca, str(pki / "rank1.crt"), str(pki / "rank2.key"), 1)
    with pytest.raises(ConfigError, match="cannot read"):
        certs.load_identity(ca, str(tmp_path / "none.crt"), str(pki / "rank1.key"), 1)
    old = dt.datetime.now(dt.timezone.utc) - dt.timedelta(days=10)
    crt, key = _write_pair(tmp_path / "expired", *_signed(pki, 1, days=1, not_before=old))
    with pytest.raises(ConfigError, match="not now"):
        certs.load_identity(ca, str(crt), str(key), 1)
    other_ca, other_key = certs.make_ca(name="another CA")
    crt, key = _write_pair(tmp_path / "other", *certs.make_host_cert(other_ca, other_key, 1, ["127.0.0.1"]))
    with pytest.raises(ConfigError, match="not signed by the CA"):
        certs.load_identity(ca, str(crt), str(key), 1)
    crt, key = _write_pair(tmp_path / "open", *_signed(pki, 1))
    key.chmod(0o644)
    with pytest.raises(ConfigError, match="must be 0600"):
        certs.load_identity(ca, str(crt), str(key), 1)


# the transport over real GRPC ----------------------------------------------------------------------
class Inbox:
    def __init__(self):
        self.messages = []

    def receive_message(self, msg_type, msg):
        if msg_type != 0:  # not the transport's own "connection ready"
            self.messages.append((msg_type, msg))


@pytest.fixture
def transports(pki, tmp_path):
    """Start our transport for given ranks on free loopback ports; stopped at the end."""
    from fedml_fibec.engines.cross_silo import grpc_transport
    from test_cross_silo import _free_base_port

    base = _free_base_port(4)
    ip = tmp_path / "ip.csv"
    ip.write_text(to_csv(loopback(3, base)))
    started = []

    def start(rank: int, tls: bool = True):
        settings = grpc_transport.WireSettings(SPEC, LIMIT, _identity(pki, rank) if tls else None)
        t = grpc_transport.FibecGrpcTransport(str(ip), client_rank=rank, client_num=4, settings=settings)
        t.retry_s = 2.0
        inbox = Inbox()
        t.add_observer(inbox)
        threading.Thread(target=t.handle_receive_message, daemon=True).start()
        started.append(t)
        return t, inbox

    start.base = base
    yield start
    for t in started:
        t.stop_receive_message()


def _raw_send(port: int, payload: bytes, *, target_rank: int = 0, ca=None, cert=None, key=None) -> str:
    """Send bytes as FedML's CommRequest; 'ok' or the GRPC status code's name."""
    from fedml.core.distributed.communication.grpc import grpc_comm_manager_pb2 as pb
    from fedml.core.distributed.communication.grpc import grpc_comm_manager_pb2_grpc as pbg
    url = f"127.0.0.1:{port}"
    if ca is None:
        channel = grpc.insecure_channel(url)
    else:
        creds = grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)
        channel = grpc.secure_channel(url, creds, options=[
            ("grpc.ssl_target_name_override", certs.rank_name(target_rank)),
            ("grpc.max_send_message_length", 64 << 20)])
    try:
        pbg.gRPCCommManagerStub(channel).sendMessage(pb.CommRequest(client_id=1, message=payload), timeout=10)
        return "ok"
    except grpc.RpcError as exc:
        return exc.code().name
    finally:
        channel.close()


def _pem(cert, key) -> tuple[bytes, bytes]:
    return (cert.public_bytes(serialization.Encoding.PEM),
            key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                              serialization.NoEncryption()))


def _wait(cond, timeout=10.0):
    end = time.time() + timeout
    while time.time() < end and not cond():
        time.sleep(0.05)
    return cond()


def test_tls_delivers_and_refuses_peers_without_a_valid_certificate(pki, transports):
    server, inbox = transports(0)
    silo, _ = transports(1)
    from fedml.core.distributed.communication.message import Message
    msg = Message(codec.MSG_UPLOAD, 1, 0)
    for k, v in _upload_params().items():
        msg.add_params(k, v)
    silo.send_message(msg)
    assert _wait(lambda: len(inbox.messages) == 1)
    got = inbox.messages[0][1]
    assert got.get_sender_id() == 1 and got.get("num_samples") == 17
    port = transports.base
    ca = (pki / "ca.crt").read_bytes()
    good = codec.encode(codec.MSG_CLIENT_STATUS, 2, 0, {"client_status": "ONLINE", "client_os": "Linux"})
    r2 = (pki / "rank2.crt").read_bytes(), (pki / "rank2.key").read_bytes()
    assert _raw_send(port, good, ca=ca, cert=r2[0], key=r2[1]) == "ok"  # the reference: accepted
    # no certificate; plaintext; another CA; an expired certificate: the handshake fails, nothing arrives
    assert _raw_send(port, good, ca=ca) == "UNAVAILABLE"
    assert _raw_send(port, good) == "UNAVAILABLE"
    other_ca, other_key = certs.make_ca(name="another CA")
    assert _raw_send(port, good, ca=ca, **dict(zip(("cert", "key"), _pem(*certs.make_host_cert(
        other_ca, other_key, 2, ["127.0.0.1"]))))) == "UNAVAILABLE"
    old = dt.datetime.now(dt.timezone.utc) - dt.timedelta(days=10)
    assert _raw_send(port, good, ca=ca, **dict(zip(("cert", "key"), _pem(*_signed(pki, 2, days=1, not_before=old))))) \
        == "UNAVAILABLE"
    # a valid certificate of rank 2 sending as rank 3: delivered by TLS, refused and counted by us
    as3 = codec.encode(codec.MSG_CLIENT_STATUS, 3, 0, {"client_status": "ONLINE", "client_os": "Linux"})
    assert _raw_send(port, as3, ca=ca, cert=r2[0], key=r2[1]) == "ok"
    assert _wait(lambda: server.rejected_messages == 1)
    time.sleep(0.3)
    assert [m.get_sender_id() for _, m in inbox.messages] == [1, 2]
    # the sender verifies the receiver too: dialling rank 0's name, a listener with another rank's key is refused
    assert _raw_send(port + 1, good, target_rank=0, ca=ca, cert=r2[0], key=r2[1]) == "UNAVAILABLE"


@pytest.mark.parametrize("tls", [True, False], ids=["tls", "plaintext"])
def test_crafted_pickle_never_runs_and_bad_messages_are_counted(pki, transports, tmp_path, tls):
    """Server and silo: a pickle that would create a canary, and each bad message; the process goes on."""
    server, server_inbox = transports(0, tls)
    silo, silo_inbox = transports(2, tls)
    server.expect_uploads(["head.weight", "head.bias", "blk1.lora_A"])
    canary = tmp_path / "canary"

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {canary}",))
    payload = pickle.dumps(Exploit())
    ca = (pki / "ca.crt").read_bytes()
    r1 = dict(ca=ca, cert=(pki / "rank1.crt").read_bytes(), key=(pki / "rank1.key").read_bytes()) if tls else {}
    port = transports.base
    bad = _bad_messages()
    for name, data in [("pickle", payload)] + sorted(bad.items()):
        assert _raw_send(port, data, **r1) == "ok", name
    assert _raw_send(port + 2, payload, target_rank=2, **r1) == "ok"
    assert _wait(lambda: server.rejected_messages == len(bad) + 1 and silo.rejected_messages == 1)
    assert not canary.exists()
    # Over twice the limit GRPC itself refuses the message before reading it (not counted).
    assert _raw_send(port, b"\0" * (2 * LIMIT + 1), **r1) == "RESOURCE_EXHAUSTED"
    # Both processes still work.
    good = codec.encode(codec.MSG_CLIENT_STATUS, 1, 0, {"client_status": "ONLINE", "client_os": "Linux"})
    assert _raw_send(port, good, **r1) == "ok"
    assert _wait(lambda: len(server_inbox.messages) == 1) and not silo_inbox.messages


# whole runs ----------------------------------------------------------------------------------------------
def test_tls_run_equals_plaintext_run_while_attacked(tmp_path, tiny_assets):
    """2 rounds over mutual TLS == the same 2 rounds in plaintext (same seed), although an attacker
    holding silo 1's valid certificate sends the server and silo 2 every kind of bad message and a
    crafted pickle before the run starts: each is rejected and counted, none is executed."""
    from test_cross_silo import Procs, _loopback_ipconfig, _tiny, final_globals, records, tls_overrides, wait_for

    model_dir, csv = tiny_assets
    certs_dir = Path(tls_overrides()[0].split("=", 1)[1]).parent
    canary = tmp_path / "canary"

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {canary}",))

    procs = Procs()
    runs = {}
    try:
        for name, extra in (("plain", ["insecure=true"]), ("tls", [])):
            ip = _loopback_ipconfig(tmp_path / f"{name}.csv", 2)
            base = int(ip.read_text().splitlines()[1].split(",")[3])
            ov = _tiny(model_dir, csv, ip, 2, 2, *extra)
            out = runs[name] = tmp_path / name
            procs.start(f"{name}0", out, 0, ov)
            procs.start(f"{name}2", out / "silo2", 2, ov)
            if name == "tls":  # silo 1 is not up yet: the server waits for it while it is attacked
                for folder, rank in ((out, 0), (out / "silo2", 2)):
                    wait_for(lambda: (folder / "logs" / f"rank{rank}.log").exists() and "listening on" in (
                        folder / "logs" / f"rank{rank}.log").read_text(), 120, f"rank {rank} listening", procs)
                r1 = dict(ca=(certs_dir / "ca.crt").read_bytes(), cert=(certs_dir / "rank1.crt").read_bytes(),
                          key=(certs_dir / "rank1.key").read_bytes())
                attacks = [pickle.dumps(Exploit())] + [v for k, v in sorted(_bad_messages().items())
                                                       if k != "over the size limit"]
                for data in attacks:
                    assert _raw_send(base, data, **r1) == "ok"
                assert _raw_send(base + 2, pickle.dumps(Exploit()), target_rank=2, **r1) == "ok"
            procs.start(f"{name}1", out / "silo1", 1, ov)
            assert procs.wait(f"{name}0", 240) == 0, procs.output(f"{name}0")[-3000:]
            for s in (1, 2):
                assert procs.wait(f"{name}{s}", 60) == 0, procs.output(f"{name}{s}")[-3000:]
    finally:
        procs.kill_all()
    assert not canary.exists()
    plain, tls = final_globals(runs["plain"]), final_globals(runs["tls"])
    assert plain.keys() == tls.keys() and all(torch.equal(plain[k], tls[k]) for k in plain)
    assert [r["global_accuracy"] for r in records(runs["plain"])] == [r["global_accuracy"] for r in records(runs["tls"])]
    summary = json.loads((runs["tls"] / "summary.json").read_text())
    assert summary["tls"] is True and summary["wire_messages_rejected"] == len(attacks)
    assert json.loads((runs["plain"] / "summary.json").read_text())["tls"] is False
    # All came before the first (scoring) exchange; its counts are in round 0's record.
    assert [r["wire_rejected"] for r in records(runs["tls"])] == [len(attacks), 0]
    log = (runs["tls"] / "logs" / "rank0.log").read_text()
    assert log.count("rejected a message from ipv4:127.0.0.1") == len(attacks)
    assert "(certificate of rank 1)" in log and "bad magic" in log
    assert "bad magic" in (runs["tls"] / "silo2" / "logs" / "rank2.log").read_text()
    assert "insecure = true" in procs.output("plain0")
