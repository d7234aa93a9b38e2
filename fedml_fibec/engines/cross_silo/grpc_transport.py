"""FedML's GRPC transport with blocking waits, bounded sends and byte counters.

FedML 0.9.6's GRPCCommManager (a) spins on its receive queue without sleeping (its sleep sits
after the loop), so every idle process burns a full core; (b) sends without a deadline or retry, so
a silo started before the server dies on its first message and a send to a dead peer raises deep
inside FedML's handlers. This subclass blocks on the queue, retries a send while the peer is not
listening (up to `retry_s`), raises PeerUnreachable after that, counts the bytes on the wire and
lets our server manager post local messages (round timeouts) into the same queue, so they are
handled on the main loop like any message. Message content and the wire format (a pickled FedML
Message in a protobuf bytes field) are FedML's own.
"""
from __future__ import annotations

import logging
import pickle
import queue
import time

import grpc
from fedml.core.distributed.communication.grpc import grpc_comm_manager as fedml_grpc
from fedml.core.distributed.communication.grpc import grpc_comm_manager_pb2, grpc_comm_manager_pb2_grpc
from fedml.core.distributed.communication.message import Message

from ...errors import ConfigError, FibecError

log = logging.getLogger(__name__)

RPC_TIMEOUT_S = 600.0  # one message (model payload) must arrive within this
RETRY_CODES = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


class PeerUnreachable(FibecError):
    """A GRPC peer did not accept a message within the retry window."""

    def __init__(self, rank: int, url: str, detail: str):
        super().__init__(f"rank {rank} at {url} is unreachable: {detail}")
        self.rank = rank


class QuietGrpcCommManager(fedml_grpc.GRPCCommManager):
    """FedML's GRPCCommManager without busy-waiting, with bounded sends and wire byte counts."""

    def __init__(self, *args, **kwargs):
        try:
            super().__init__(*args, **kwargs)
        except RuntimeError as exc:  # grpc: "Failed to bind to address ..."
            rank = kwargs.get("client_rank", "?")
            raise ConfigError(f"rank {rank} cannot listen on the address of its row in the ipconfig "
                              f"({exc}); is that address on this host and the port free?") from None
        self.retry_s = 30.0
        self.rpc_timeout_s = RPC_TIMEOUT_S
        self.bytes_sent = 0
        self.bytes_received = 0

    # sending -------------------------------------------------------------------------------------
    def _url(self, rank: int) -> str:
        m = self.grpc_mappings[int(rank)]
        return f"{m.ingress_ip or m.grpc_server_ip}:{m.grpc_server_port}"

    def send_message(self, msg: Message, retry_s: float | None = None):
        me = self.grpc_mappings[self.client_id]
        msg.add_params(self.MSG_ARG_KEY_SENDER_RANK, self.client_rank)
        msg.add_params(self.MSG_ARG_KEY_SENDER_IP, me.ingress_ip or me.grpc_server_ip)
        msg.add_params(self.MSG_ARG_KEY_SENDER_PORT, me.grpc_server_port)
        payload = pickle.dumps(msg)
        receiver = int(msg.get_receiver_id())
        url = self._url(receiver)
        request = grpc_comm_manager_pb2.CommRequest(client_id=self.client_id, message=payload)
        deadline = time.monotonic() + (self.retry_s if retry_s is None else retry_s)
        delay = 0.2
        while True:
            channel = grpc.insecure_channel(url, options=self.opts)
            try:
                grpc_comm_manager_pb2_grpc.gRPCCommManagerStub(channel).sendMessage(request, timeout=self.rpc_timeout_s)
                self.bytes_sent += len(payload)
                return
            except grpc.RpcError as exc:
                code = exc.code() if hasattr(exc, "code") else None
                if code not in RETRY_CODES or time.monotonic() + delay > deadline:
                    raise PeerUnreachable(receiver, url, f"{code}: {exc.details() if hasattr(exc, 'details') else exc}") from None
                log.debug("rank %d at %s not reachable yet (%s); retrying", receiver, url, code)
            finally:
                channel.close()
            time.sleep(delay)
            delay = min(delay * 2, 2.0)

    # receiving -----------------------------------------------------------------------------------
    def post_local(self, msg: Message) -> None:
        """Queue a message for this process's own main loop (thread-safe; not sent on the wire)."""
        self.grpc_servicer.message_q.put(msg)

    def message_handling_subroutine(self):
        q = self.grpc_servicer.message_q
        while self.is_running:
            try:
                item = q.get(timeout=0.05)
            except queue.Empty:
                continue
            if isinstance(item, Message):
                msg = item
            else:
                self.bytes_received += len(item)
                msg = pickle.loads(item)
            sender_id = int(msg.get_sender_id())
            if sender_id not in self.grpc_mappings:  # FedML learns unknown senders from the message
                params = msg.get_params()
                ip = str(params[self.MSG_ARG_KEY_SENDER_IP])
                self.grpc_mappings[sender_id] = fedml_grpc.GRPCMapping(
                    eid=sender_id, rank=int(params[self.MSG_ARG_KEY_SENDER_RANK]), grpc_server_ip=ip,
                    grpc_server_port=int(params[self.MSG_ARG_KEY_SENDER_PORT]), ingress_ip=ip)
            for observer in list(self._observers):
                observer.receive_message(msg.get_type(), msg)

    def stop_receive_message(self):
        self.is_running = False
        self.grpc_server.stop(None)


def install() -> None:
    """Make FedML's comm manager construct the quiet transport for backend GRPC."""
    fedml_grpc.GRPCCommManager = QuietGrpcCommManager
