#!/usr/bin/env python
"""Cost of the GRPC wire per message: FedML's pickled messages vs our codec, plaintext vs mutual TLS.

The messages are those of a training exchange of config/cross_silo.yaml (MiniLM-L6, LoRA r=8 on
query/value, GAL = 3 of 6 blocks, float32): the server's Download (head + GAL LoRA) and one silo's
Upload bundle (the same tensors + statistics), built from the real model.

  serialize    FedML's way (the Message object through pickle.dumps / pickle.loads) against
               codec.encode / codec.decode (JSON + safetensors, every check included): seconds, bytes
  send         one unary GRPC call over loopback carrying those bytes, a new channel per message as
               FedML and our transport do: insecure channel vs TLS channel with client certificate
               (the handshake is part of every call), to a server that answers at once

A `per_round` line adds them up for 10 silos (each exchange: 10 downloads + 10 uploads).

    python benchmarks/bench_wire.py [--repeats 30] [--models minilm]
"""
from __future__ import annotations

import pickle
import tempfile
from collections import OrderedDict
from concurrent import futures
from pathlib import Path

from common import base_parser, context, emit, loadavg, lora_model, setup, summarize, time_interleaved

import grpc
import torch
from fedml.core.distributed.communication.grpc import grpc_comm_manager_pb2 as pb
from fedml.core.distributed.communication.grpc import grpc_comm_manager_pb2_grpc as pbg
from fedml.core.distributed.communication.message import Message

from fedml_fibec.engines.cross_silo import certs, codec
from fedml_fibec.engines.cross_silo.ipconfig import loopback
from fedml_fibec.models import block_index, num_blocks, trainable_state_dict

SILOS = 10


class _Answer(pbg.gRPCCommManagerServicer):
    def sendMessage(self, request, context):
        return pb.CommResponse()


def _messages(model):
    tensors = trainable_state_dict(model)
    gal = list(range(num_blocks(model) // 2, num_blocks(model)))
    shared = OrderedDict((k, v.detach().float().clone()) for k, v in tensors.items()
                         if block_index(k) is None or block_index(k) in gal)
    download = OrderedDict(round=5, phase="train", gal=gal, tensors=shared, rescore=False)
    upload = {"device_id": 3, "num_samples": 96, "tensors": OrderedDict((k, v + 0.01) for k, v in shared.items()),
              "layer_scores": None, "stats": {"train_loss": 0.61, "device_accuracy": 0.7, "curriculum_share": 0.4,
                                              "updated_neuron_share": 0.25, "train_seconds": 7.5,
                                              "eval_seconds": 2.7, "scoring_seconds": 0.0},
              "reply_to": [5, "train"]}
    params = {"down": (codec.MSG_SYNC_MODEL, 0, 3, {"model_params": download, "client_idx": "2",
                                                    "client_os": "PythonClient"}),
              "up": (codec.MSG_UPLOAD, 3, 0, {"model_params": {"reply_to": [5, "train"], "uploads": [upload]},
                                              "num_samples": 96})}
    spec = codec.TensorSpec({k: tuple(v.shape) for k, v in tensors.items()}, torch.float32, num_blocks(model))
    return params, spec


def _fedml_message(msg_type, sender, receiver, params) -> Message:
    m = Message(msg_type, sender, receiver)
    for k, v in params.items():
        m.add_params(k, v)
    for k, v in (("sender_rank", sender), ("sender_ip", "127.0.0.1"), ("sender_port", 8890 + sender)):
        m.add_params(k, v)  # what FedML's GRPC transport adds before pickling
    return m


def main() -> None:
    p = base_parser(__doc__.splitlines()[1], default_models=("minilm",))
    args = p.parse_args()
    setup(args, default_repeats=30)
    ctx = context(args)
    for name in args.models:
        model, _ = lora_model(name)
        messages, spec = _messages(model)
        limit = int(1.25 * spec.max_tensor_bytes()) + codec.MAX_HEADER_BYTES
        per_msg = {}
        for kind, (t, s, r, params) in messages.items():
            msg = _fedml_message(t, s, r, params)
            pickled = pickle.dumps(msg)
            encoded = codec.encode(t, s, r, params)
            check = spec.narrowed(params["model_params"]["tensors"]) if kind == "down" else spec
            times = time_interleaved({
                "pickle": lambda: pickle.loads(pickle.dumps(msg)),
                "codec": lambda: codec.decode(codec.encode(t, s, r, params), check, limit),
            }, repeats=args.repeats, warmup=args.warmup)
            tensor_bytes = sum(v.numel() * v.element_size() for v in (
                params["model_params"]["tensors"] if kind == "down" else
                params["model_params"]["uploads"][0]["tensors"]).values())
            per_msg[kind] = {"pickle_s": summarize(times["pickle"])["median_s"],
                             "codec_s": summarize(times["codec"])["median_s"],
                             "pickle_bytes": len(pickled), "codec_bytes": len(encoded)}
            emit({"bench": "wire", "case": "serialize", "model": name, "message": kind, "tensor_bytes": tensor_bytes,
                  "pickle_bytes": len(pickled), "codec_bytes": len(encoded),
                  "pickle": summarize(times["pickle"]), "codec": summarize(times["codec"]),
                  "loadavg": loadavg(), **ctx})

        with tempfile.TemporaryDirectory() as tmp:
            certs.make_federation_certs(loopback(1), Path(tmp))
            ident = certs.load_identity(f"{tmp}/ca.crt", f"{tmp}/rank{{rank}}.crt", f"{tmp}/rank{{rank}}.key", 0)
            peer = certs.load_identity(f"{tmp}/ca.crt", f"{tmp}/rank{{rank}}.crt", f"{tmp}/rank{{rank}}.key", 1)
            opts = [("grpc.max_send_message_length", 2 * limit), ("grpc.max_receive_message_length", 2 * limit)]
            servers, ports = [], {}
            for mode in ("plain", "tls"):
                srv = grpc.server(futures.ThreadPoolExecutor(max_workers=4), options=opts)
                pbg.add_gRPCCommManagerServicer_to_server(_Answer(), srv)
                if mode == "plain":
                    ports[mode] = srv.add_insecure_port("127.0.0.1:0")
                else:
                    ports[mode] = srv.add_secure_port("127.0.0.1:0", grpc.ssl_server_credentials(
                        [(ident.key_pem, ident.cert_pem)], root_certificates=ident.ca_pem, require_client_auth=True))
                srv.start()
                servers.append(srv)
            creds = grpc.ssl_channel_credentials(root_certificates=peer.ca_pem, private_key=peer.key_pem,
                                                 certificate_chain=peer.cert_pem)

            def send(mode: str, payload: bytes):
                url = f"127.0.0.1:{ports[mode]}"
                if mode == "plain":
                    ch = grpc.insecure_channel(url, options=opts)
                else:
                    ch = grpc.secure_channel(url, creds, options=opts + [
                        ("grpc.ssl_target_name_override", certs.rank_name(0))])
                try:
                    pbg.gRPCCommManagerStub(ch).sendMessage(pb.CommRequest(client_id=1, message=payload), timeout=60)
                finally:
                    ch.close()

            for kind, (t, s, r, params) in messages.items():
                pickled = pickle.dumps(_fedml_message(t, s, r, params))
                encoded = codec.encode(t, s, r, params)
                times = time_interleaved({
                    "plain_pickled": lambda: send("plain", pickled),
                    "tls_codec": lambda: send("tls", encoded),
                    "plain_codec": lambda: send("plain", encoded),
                }, repeats=args.repeats, warmup=args.warmup)
                med = {k: summarize(v)["median_s"] for k, v in times.items()}
                per_msg[kind].update({f"send_{k}_s": v for k, v in med.items()})
                emit({"bench": "wire", "case": "send", "model": name, "message": kind,
                      **{k: summarize(v) for k, v in times.items()}, "loadavg": loadavg(), **ctx})
            for srv in servers:
                srv.stop(None)

        # One exchange of 10 silos: each message serialized once, sent once, deserialized once.
        def total(ser: str, send_key: str) -> float:
            return SILOS * sum(per_msg[k][ser] + per_msg[k][send_key] for k in ("down", "up"))
        before = total("pickle_s", "send_plain_pickled_s")
        after = total("codec_s", "send_tls_codec_s")
        emit({"bench": "wire", "case": "per_round", "model": name, "silos": SILOS,
              "pickled_plaintext_s": before, "codec_tls_s": after, "codec_plaintext_s": total("codec_s",
                                                                                             "send_plain_codec_s"),
              "extra_s_per_round": after - before,
              "bytes_per_round_pickled": SILOS * (per_msg["down"]["pickle_bytes"] + per_msg["up"]["pickle_bytes"]),
              "bytes_per_round_codec": SILOS * (per_msg["down"]["codec_bytes"] + per_msg["up"]["codec_bytes"]),
              "loadavg": loadavg(), **ctx})


if __name__ == "__main__":
    main()
