"""Our GRPC transport for FedML's cross-silo managers: mutual TLS, a wire format without pickle, limits.

FedML 0.9.6's GRPCCommManager listens on a plaintext port and unpickles every message it receives,
so anyone who can reach a port runs code in the process (docs/DEPLOYMENT.md). This transport keeps
FedML's GRPC service (one unary `sendMessage` call per message, a new connection per message,
every process listening on its ipconfig row) and FedML's Message objects on both sides of it, and
changes what is between:

- the bytes are our codec's (codec.py): JSON checked against a schema plus safetensors, decoded
  and validated in the GRPC handler thread; a message that fails is logged with the peer and the
  reason, counted (`rejected_messages`) and dropped, and the managers never see it: a silo whose
  upload is dropped is a missing silo, handled by the round timeout rules;
- with TLS (the default) the port requires a client certificate signed by the federation's CA;
  the sender's rank is read from that certificate and a message claiming another rank is
  refused; a sender dials its peer with the peer's rank name as the TLS target name, so it only
  talks to the holder of that rank's key (silos verify the server, the server each silo);
- messages are bounded: the codec's limit (derived from the model's shared tensors, with margin)
  is checked on every message, and GRPC itself refuses anything over twice that before reading it;
- receivers block on their queue (FedML's loop spins on a full core), sends retry while the peer is
  not listening (up to `retry_s`) and then raise PeerUnreachable, bytes on the wire are counted,
  and our server manager posts local messages (round timeouts) into the same queue.

Senders must be ranks of the ipconfig (FedML learns unknown senders from the message: not here).
"""
from __future__ import annotations

import functools
import logging
import queue
import threading
import time
from concurrent import futures
from dataclasses import dataclass
from typing import Optional

import grpc
from fedml.core.distributed.communication.base_com_manager import BaseCommunicationManager
from fedml.core.distributed.communication.constants import CommunicationConstants
from fedml.core.distributed.communication.grpc import grpc_comm_manager as fedml_grpc
from fedml.core.distributed.communication.grpc import grpc_comm_manager_pb2, grpc_comm_manager_pb2_grpc
from fedml.core.distributed.communication.message import Message

from ...errors import ConfigError, FibecError
from . import codec
from .certs import TlsIdentity, rank_name, rank_of_common_name
from .ipconfig import read_ipconfig

log = logging.getLogger("fedml_fibec")

RPC_TIMEOUT_S = 600.0  # one message (model payload) must arrive within this
RETRY_CODES = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
FRAME_KEYS = (Message.MSG_ARG_KEY_TYPE, Message.MSG_ARG_KEY_SENDER, Message.MSG_ARG_KEY_RECEIVER)


class PeerUnreachable(FibecError):
    """A GRPC peer did not accept a message within the retry window."""

    def __init__(self, rank: int, url: str, detail: str):
        super().__init__(f"rank {rank} at {url} is unreachable: {detail}")
        self.rank = rank


@dataclass(frozen=True)
class WireSettings:
    """What the transport of one process needs besides FedML's arguments."""

    spec: codec.TensorSpec  # tensors it accepts
    max_message_bytes: int  # the codec's limit; GRPC refuses over twice this
    identity: Optional[TlsIdentity]  # None: plaintext (insecure: true)

    @staticmethod
    def limit_for(spec: codec.TensorSpec, devices_per_message: int = 1) -> int:
        """The largest message a run can send (every shareable tensor once per device), with margin."""
        return int(1.25 * spec.max_tensor_bytes() * max(1, devices_per_message)) + codec.MAX_HEADER_BYTES


class _Servicer(grpc_comm_manager_pb2_grpc.gRPCCommManagerServicer):
    """FedML's GRPC service; each received message is decoded and checked here, in GRPC's thread."""

    def __init__(self, transport: "FibecGrpcTransport"):
        self.transport = transport

    def sendMessage(self, request, context):
        self.transport.receive(request.message, context)
        return grpc_comm_manager_pb2.CommResponse()

    def handleReceiveMessage(self, request, context):
        return grpc_comm_manager_pb2.CommResponse()


class FibecGrpcTransport(BaseCommunicationManager):
    """FedML's communication-manager interface over GRPC with TLS, our codec and bounded sends."""

    def __init__(self, grpc_ipconfig_path, topic="fedml", client_rank=0, client_num=0, args=None, *,
                 settings: WireSettings):
        self.rank = self.client_rank = self.client_id = int(client_rank)
        self.settings = settings
        self.endpoints = read_ipconfig(grpc_ipconfig_path)
        if self.rank not in self.endpoints:
            raise ConfigError(f"{grpc_ipconfig_path}: no row for rank {self.rank}")
        self._observers = []
        self._queue: "queue.Queue[Message]" = queue.Queue()
        self._lock = threading.Lock()
        self.spec = settings.spec  # the server narrows it to the keys of the exchange it waits for
        self.retry_s = 30.0
        self.rpc_timeout_s = RPC_TIMEOUT_S
        self.bytes_sent = 0
        self.bytes_received = 0
        self.rejected_messages = 0
        self.is_running = True
        hard_cap = 2 * settings.max_message_bytes
        self.opts = [("grpc.max_send_message_length", hard_cap), ("grpc.max_receive_message_length", hard_cap),
                     ("grpc.enable_http_proxy", 0)]
        ident = settings.identity
        self._channel_credentials = None if ident is None else grpc.ssl_channel_credentials(
            root_certificates=ident.ca_pem, private_key=ident.key_pem, certificate_chain=ident.cert_pem)
        me = self.endpoints[self.rank]
        listen = f"{me.bind or me.address}:{me.port}"
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=max(4, int(client_num))), options=self.opts)
        grpc_comm_manager_pb2_grpc.add_gRPCCommManagerServicer_to_server(_Servicer(self), self.server)
        try:
            if ident is None:
                bound = self.server.add_insecure_port(listen)
            else:
                creds = grpc.ssl_server_credentials([(ident.key_pem, ident.cert_pem)], root_certificates=ident.ca_pem,
                                                    require_client_auth=True)
                bound = self.server.add_secure_port(listen, creds)
        except RuntimeError as exc:  # grpc: "Failed to bind to address ..."
            bound, detail = 0, str(exc)
        else:
            detail = "bind failed"
        if not bound:
            raise ConfigError(f"rank {self.rank} cannot listen on {listen}, the address of its row in the ipconfig "
                              f"({detail}); is that address on this host and the port free?")
        self.server.start()
        log.info("rank %d listening on %s (%s, messages up to %d bytes)", self.rank, listen,
                 "plaintext" if ident is None else "mutual TLS", settings.max_message_bytes)

    # receiving -------------------------------------------------------------------------------------
    def expect_uploads(self, names) -> None:
        """Server: from now on accept tensors of these names only (the exchange being sent)."""
        self.spec = self.settings.spec.narrowed(names)

    def receive(self, data: bytes, context) -> None:
        """Decode and check one received message (GRPC thread); queue it, or reject and count it."""
        peer = context.peer()
        cert_rank = None
        if self.settings.identity is not None:
            names = context.auth_context().get("x509_common_name") or [b""]
            cert_rank = rank_of_common_name(names[0].decode("utf-8", "replace"))
        try:
            msg = codec.decode(data, self.spec, self.settings.max_message_bytes)
            self._check_route(msg, cert_rank)
        except codec.WireError as exc:
            with self._lock:
                self.rejected_messages += 1
            who = peer if cert_rank is None else f"{peer} (certificate of rank {cert_rank})"
            log.warning("rejected a message from %s: %s", who, exc)
            return
        with self._lock:
            self.bytes_received += len(data)
        log.info("rank %d: message type %d from rank %d at %s (%d bytes)", self.rank, msg.type, msg.sender, peer,
                 len(data))
        fedml_msg = Message(msg.type, msg.sender, msg.receiver)
        for k, v in msg.params.items():
            fedml_msg.add_params(k, v)
        self._queue.put(fedml_msg)

    def _check_route(self, msg: codec.WireMessage, cert_rank: Optional[int]) -> None:
        if msg.receiver != self.rank:
            raise codec.WireError(f"addressed to rank {msg.receiver}, this is rank {self.rank}")
        if msg.sender not in self.endpoints or msg.sender == self.rank:
            raise codec.WireError(f"sender rank {msg.sender} is not another rank of the ipconfig")
        if self.rank != 0 and msg.sender != 0:
            raise codec.WireError(f"rank {msg.sender} is a silo; silos only hear from the server")
        if self.settings.identity is not None and msg.sender != cert_rank:
            raise codec.WireError(f"claims to be rank {msg.sender}, but its certificate names "
                                  f"{'rank ' + str(cert_rank) if cert_rank is not None else 'no rank'}")

    def post_local(self, msg: Message) -> None:
        """Queue a message for this process's own main loop (thread-safe; not sent on the wire)."""
        self._queue.put(msg)

    def handle_receive_message(self):
        self._notify(CommunicationConstants.MSG_TYPE_CONNECTION_IS_READY, self._ready_message())
        while self.is_running:
            try:
                msg = self._queue.get(timeout=0.05)
            except queue.Empty:
                continue
            self._notify(msg.get_type(), msg)

    def _ready_message(self) -> Message:
        msg = Message()
        msg.sender_id = msg.receiver_id = self.rank
        return msg

    def _notify(self, msg_type, msg: Message) -> None:
        for observer in list(self._observers):
            observer.receive_message(msg_type, msg)

    def notify(self, message: Message):
        self._notify(message.get_type(), message)

    def stop_receive_message(self):
        self.is_running = False
        self.server.stop(None)

    def add_observer(self, observer):
        self._observers.append(observer)

    def remove_observer(self, observer):
        self._observers.remove(observer)

    # sending ---------------------------------------------------------------------------------------
    def _channel(self, receiver: int) -> tuple[grpc.Channel, str]:
        e = self.endpoints[receiver]
        url = f"{e.address}:{e.port}"
        if self._channel_credentials is None:
            return grpc.insecure_channel(url, options=self.opts), url
        # The peer must prove it holds rank `receiver`'s key, whatever address it is reached at.
        opts = self.opts + [("grpc.ssl_target_name_override", rank_name(receiver))]
        return grpc.secure_channel(url, self._channel_credentials, options=opts), url

    def send_message(self, msg: Message, retry_s: Optional[float] = None):
        receiver = int(msg.get_receiver_id())
        if receiver not in self.endpoints:
            raise FibecError(f"rank {self.rank}: no ipconfig row for receiver rank {receiver}")
        params = {k: v for k, v in msg.get_params().items() if k not in FRAME_KEYS}
        payload = codec.encode(msg.get_type(), self.rank, receiver, params)
        if len(payload) > self.settings.max_message_bytes:
            raise FibecError(f"rank {self.rank}: a message of {len(payload)} bytes to rank {receiver} is over the "
                             f"limit of {self.settings.max_message_bytes} (a bug: the limit covers every shared tensor)")
        request = grpc_comm_manager_pb2.CommRequest(client_id=self.rank, message=payload)
        deadline = time.monotonic() + (self.retry_s if retry_s is None else retry_s)
        delay = 0.2
        while True:
            channel, url = self._channel(receiver)
            try:
                grpc_comm_manager_pb2_grpc.gRPCCommManagerStub(channel).sendMessage(request, timeout=self.rpc_timeout_s)
                with self._lock:
                    self.bytes_sent += len(payload)
                return
            except grpc.RpcError as exc:
                code = exc.code() if hasattr(exc, "code") else None
                if code not in RETRY_CODES or time.monotonic() + delay > deadline:
                    detail = exc.details() if hasattr(exc, "details") else exc
                    if self._channel_credentials is not None:
                        detail = f"{detail} (or the TLS handshake was refused: see the peer's log)"
                    raise PeerUnreachable(receiver, url, f"{code}: {detail}") from None
                log.debug("rank %d at %s not reachable yet (%s); retrying", receiver, url, code)
            finally:
                channel.close()
            time.sleep(delay)
            delay = min(delay * 2, 2.0)


def install(settings: WireSettings) -> None:
    """Make FedML's comm manager construct our transport for backend GRPC."""
    fedml_grpc.GRPCCommManager = functools.partial(FibecGrpcTransport, settings=settings)
