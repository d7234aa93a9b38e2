"""FedML's cross-silo server and client managers with round timeouts, checkpoints and re-joining silos.

Made from our side without editing FedML (subclasses of FedMLServerManager / ClientMasterManager),
for both backends; the timeout parts act only on GRPC (under mpirun a lost rank ends the job).

Server (FibecServerManager), per exchange:
- sends the global message to the silos taking part (`active`); a silo that cannot be reached is
  left out of the round;
- collects uploads tagged with the exchange they answer (late answers to an earlier exchange are
  dropped, duplicates ignored); when all arrived, aggregates in silo order (as FedML does), tests,
  writes the checkpoint and starts the next exchange;
- after `round_timeout_s` (GRPC) without all uploads: with at least `min_silos_per_round` answers
  it aggregates those and drops the missing silos (each later exchange probes them; a silo that
  answers, e.g. after a restart, re-joins at the next exchange); with fewer it stops: it tells the
  live silos to finish and raises SiloFailure (the last completed exchange is checkpointed). The
  same timeout bounds the wait for silos at start-up and for their goodbyes at the end.
The timeout is a local message posted into the transport's receive queue by a timer thread, so all
state changes happen on FedML's main loop.

Client (FibecClientManager): trains on every model message (initial or not, so a restarted server
can re-initialise running silos), decides the end from the message itself (its round reaches
comm_round), tags each upload with the exchange it answers, and keeps a per-device backup so that
an exchange repeated after a server crash starts from the same device state (DeviceLedger).
"""
from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections import OrderedDict
from pathlib import Path
from typing import Optional

import torch
from fedml.core.distributed.communication.message import Message
from fedml.cross_silo.client.fedml_client_master_manager import ClientMasterManager
from fedml.cross_silo.client.message_define import MyMessage as ClientMessage
from fedml.cross_silo.server.fedml_server_manager import FedMLServerManager
from fedml.cross_silo.server.message_define import MyMessage

from ..atomic import atomic_write, atomic_write_text
from ..config import RunConfig
from ..errors import FibecError
from . import checkpoint
from .payload import PHASE_TRAIN

log = logging.getLogger("fedml_fibec")

MSG_TYPE_TIMEOUT = "fibec_round_timeout"
MSG_ARG_TOKEN = "fibec_token"
REPLY_TO = "reply_to"  # upload key: the (round, phase) of the message the upload answers

# Debug switches for tests (simulated faults), read from the environment.
ENV_STOP_AFTER_ROUND = "FEDML_FIBEC_STOP_AFTER_ROUND"  # server: checkpoint round k, then exit (crash)
ENV_CORRUPT_UPLOAD = "FEDML_FIBEC_CORRUPT_UPLOAD"  # silo: NaN in its upload of training round k


class SiloFailure(FibecError):
    """Too few silos answered: the run stopped (the last completed exchange is checkpointed)."""


class SimulatedCrash(FibecError):
    """FEDML_FIBEC_STOP_AFTER_ROUND: the server stopped on purpose after a checkpoint."""


def exchange_tag(message: dict) -> list:
    """What identifies an exchange in a download message (and in the upload answering it)."""
    return [int(message["round"]), str(message["phase"])]


class FibecServerManager(FedMLServerManager):
    """FedML's cross-silo server loop with timeouts, dropped and re-joining silos, and checkpoints."""

    def __init__(self, args, aggregator, comm, rank, size, backend, *, cfg: RunConfig, out_dir: Path,
                 metrics, first_exchange: int = 0, active: Optional[list[int]] = None):
        super().__init__(args, aggregator, comm, rank, size, backend)
        self.cfg = cfg
        self.out_dir = Path(out_dir)
        self.metrics = metrics
        self.grpc = backend == "GRPC"
        c = cfg.comm_args
        self.timeout = c.round_timeout_s if self.grpc else None
        self.min_silos = c.min_silos_per_round or len(self.client_real_ids)
        self.first_exchange = first_exchange
        self.fedml_rounds = first_exchange + self.round_num
        self.active = sorted(active or self.client_real_ids)
        self.online: set[int] = set()
        self.state = "connect"  # connect -> round -> finish
        self.expected: set[int] = set()
        self.received: dict[int, tuple] = {}
        self.tag: Optional[list] = None
        self.failure: Optional[FibecError] = None
        self._token = 0
        self._timer: Optional[threading.Timer] = None
        self._sent_any: set[int] = set()
        self._wire = (0, 0)
        if self.grpc:
            # The server does not wait long for one silo: the round timeout covers missing ones.
            self.com_manager.retry_s = min(5.0, c.connect_timeout_s)

    @property
    def inner(self):
        """Our FibecServerAggregator (FedML wraps it in its FedMLAggregator)."""
        return self.aggregator.aggregator

    def register_message_receive_handlers(self):
        super().register_message_receive_handlers()
        self.register_message_receive_handler(MSG_TYPE_TIMEOUT, self.handle_timeout)

    # timers ---------------------------------------------------------------------------------------
    def _arm(self, seconds: Optional[float]) -> None:
        self._disarm()
        self._token += 1
        if seconds is None or not self.grpc:
            return
        token = self._token
        self._timer = threading.Timer(seconds, self._post_timeout, args=(token,))
        self._timer.daemon = True
        self._timer.start()

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _post_timeout(self, token: int) -> None:
        msg = Message(MSG_TYPE_TIMEOUT, self.rank, self.rank)
        msg.add_params(MSG_ARG_TOKEN, token)
        self.com_manager.post_local(msg)

    # start-up -------------------------------------------------------------------------------------
    def handle_message_connection_ready(self, msg_params):
        if self.is_initialized or self.state != "connect":
            return
        self.client_id_list_in_this_round = list(self.active)
        # Silos already running answer this; the others say they are online when they start.
        for cid in self.active:
            self._try_send(self.send_message_check_client_status, cid, cid - 1, retry_s=0.5)
        self._arm(self.timeout)

    def process_online_status(self, client_status, msg_params):
        sender = int(msg_params.get_sender_id())
        self.online.add(sender)
        if self.state == "connect":
            if all(cid in self.online for cid in self.active):
                self._start_exchange(self.inner.get_model_params())
            return
        if sender not in self.active and self.state == "round":
            log.warning("silo %d is back: it re-joins at the next exchange", sender)
            self.active = sorted(self.active + [sender])

    # rounds ---------------------------------------------------------------------------------------
    def _silo_indices(self, clients: list[int]) -> list[int]:
        exchange_idx = self.args.round_idx
        sampled = self.aggregator.data_silo_selection(exchange_idx, self.args.client_num_in_total, len(clients))
        if self.grpc:  # each silo is one fixed device: silo r holds device r-1
            return [cid - 1 for cid in clients]
        return [int(i) for i in sampled]

    def _start_exchange(self, message) -> None:
        self.state = "round"
        self.is_initialized = True
        self._probe_dropped()
        clients = list(self.active)
        indices = self._silo_indices(clients)
        self.client_id_list_in_this_round, self.data_silo_index_list = clients, indices
        self.tag = exchange_tag(message)
        self.received, self.expected = {}, set()
        for cid, index in zip(clients, indices):
            send = self.send_message_sync_model_to_client if cid in self._sent_any else self.send_message_init_config
            if self._try_send(send, cid, message, index):
                self.expected.add(cid)
                self._sent_any.add(cid)
        dead = [cid for cid in clients if cid not in self.expected]
        if dead:  # dropped now; probed again at each later exchange
            log.warning("exchange %d: silo(s) %s unreachable; going on with %s", self._exchange(), dead,
                        sorted(self.expected))
            self.active = [cid for cid in self.active if cid not in dead]
        if len(self.expected) < self.min_silos:
            self._fail(f"exchange {self._exchange()} (round {self.inner.round}): only {len(self.expected)} "
                       f"silo(s) reachable, fewer than min_silos_per_round = {self.min_silos}; unreachable: "
                       f"silo(s) {dead}")
            return
        self._arm(self.timeout)

    def _exchange(self) -> int:
        return self.first_exchange + self.args.round_idx

    def _probe_dropped(self) -> None:
        """Ask dropped silos for their status; one that answers re-joins (process_online_status)."""
        for cid in self.client_real_ids:
            if cid not in self.active:
                self._try_send(self.send_message_check_client_status, cid, cid - 1, retry_s=0.5)

    def _try_send(self, send, cid: int, *args, retry_s: Optional[float] = None) -> bool:
        try:
            if retry_s is not None and self.grpc:  # a small message: short retry and deadline
                cm = self.com_manager
                saved = cm.retry_s, cm.rpc_timeout_s
                cm.retry_s, cm.rpc_timeout_s = retry_s, max(5.0, retry_s)
                try:
                    send(cid, *args)
                finally:
                    cm.retry_s, cm.rpc_timeout_s = saved
            else:
                send(cid, *args)
            return True
        except FibecError as exc:  # PeerUnreachable
            log.info("send to silo %d failed: %s", cid, exc)
            return False

    def handle_message_receive_model_from_client(self, msg_params):
        sender = int(msg_params.get(MyMessage.MSG_ARG_KEY_SENDER))
        upload = msg_params.get(MyMessage.MSG_ARG_KEY_MODEL_PARAMS)
        n = msg_params.get(MyMessage.MSG_ARG_KEY_NUM_SAMPLES)
        tag = upload.get(REPLY_TO) if isinstance(upload, dict) else None
        if self.state != "round" or sender not in self.expected or sender in self.received or tag != self.tag:
            log.warning("ignored an upload from silo %d answering %s (now at %s, %s)", sender, tag, self.tag,
                        "a duplicate" if sender in self.received else "late or unexpected")
            return
        self.received[sender] = (n, upload)
        if set(self.received) == self.expected:
            self._complete_exchange()

    def _complete_exchange(self) -> None:
        self._disarm()
        order = sorted(self.received, key=self.client_real_ids.index)
        model_list = [self.received[cid] for cid in order]
        model_list, _ = self.inner.on_before_aggregation(model_list)
        averaged = self.inner.aggregate(model_list)
        averaged = self.inner.on_after_aggregation(averaged)
        self.aggregator.set_global_model_params(averaged)
        pending = getattr(self.inner, "_pending", None)
        if self.grpc and isinstance(pending, dict):
            sent, received = self.com_manager.bytes_sent, self.com_manager.bytes_received
            pending["wire_bytes_down"], pending["wire_bytes_up"] = sent - self._wire[0], received - self._wire[1]
            pending["silos_dropped"] = [cid for cid in self.client_real_ids if cid not in self.active]
            per_round = self.cfg.train_args.client_num_per_round
            if len(self.expected) != per_round:  # the aggregator counts the download once per silo
                pending["bytes_down"] = pending["bytes_down"] * len(self.expected) // per_round
            self._wire = (sent, received)
        self.aggregator.test_on_server_for_all_clients(self.args.round_idx)
        self.args.round_idx += 1
        done = self._exchange()
        checkpoint.save(self.out_dir, aggregator=self.inner, metrics=self.metrics, exchanges_done=done,
                        fedml_rounds=self.fedml_rounds, sampler_next=self.aggregator._next_exchange,
                        active_silos=self.active, cfg=self.cfg)
        stop_after = os.environ.get(ENV_STOP_AFTER_ROUND)
        if stop_after is not None and self.inner.phase == PHASE_TRAIN and self.inner.round == int(stop_after) \
                and done < self.fedml_rounds:
            self.failure = SimulatedCrash(f"{ENV_STOP_AFTER_ROUND}={stop_after}: stopped after round "
                                          f"{self.inner.round} (checkpointed in {self.out_dir})")
            self._stop(clean=False)
            return
        if self.args.round_idx < self.round_num:
            self._start_exchange(averaged)
            return
        # The last message: silos see its round reach comm_round, say goodbye and exit.
        self.state = "finish"
        self.client_id_list_in_this_round = list(self.active)
        self.data_silo_index_list = self._silo_indices(self.active) if self.grpc else \
            [int(i) for i in self.aggregator.data_silo_selection(self.args.round_idx, self.args.client_num_in_total,
                                                                 len(self.active))]
        for cid, index in zip(self.active, self.data_silo_index_list):
            self._try_send(self.send_message_sync_model_to_client, cid, averaged, index)
        self._arm(self.timeout)

    def process_finished_status(self, client_status, msg_params):
        if not self.grpc:
            return super().process_finished_status(client_status, msg_params)
        self.client_finished_mapping[str(msg_params.get_sender_id())] = True
        if all(self.client_finished_mapping.get(str(cid), False) for cid in self.client_id_list_in_this_round):
            self._stop()

    # timeouts and failures --------------------------------------------------------------------------
    def handle_timeout(self, msg_params):
        if msg_params.get(MSG_ARG_TOKEN) != self._token:
            return  # a timer of an exchange that completed meanwhile
        t = self.timeout
        if self.state == "connect":
            online = [cid for cid in self.active if cid in self.online]
            if len(online) >= self.min_silos:
                log.warning("start-up: silo(s) %s not online after %.0fs; starting with %s",
                            [c for c in self.active if c not in online], t, online)
                self.active = online
                self._start_exchange(self.inner.get_model_params())
            else:
                self._fail(f"only {len(online)} of {len(self.active)} silos came online within {t:.0f}s "
                           f"(min_silos_per_round = {self.min_silos}); missing: "
                           f"{[c for c in self.active if c not in online]}")
        elif self.state == "round":
            missing = sorted(self.expected - set(self.received))
            if len(self.received) >= self.min_silos:
                log.warning("exchange %d: no upload from silo(s) %s within %.0fs; going on with %d silo(s) %s "
                            "(the missing ones re-join when they answer again)", self._exchange(), missing, t,
                            len(self.received), sorted(self.received))
                self.active = [cid for cid in self.active if cid not in missing]  # re-joined ones stay
                self._complete_exchange()
            else:
                self._fail(f"exchange {self._exchange()} (round {self.inner.round}): {len(self.received)} of "
                           f"{len(self.expected)} silo(s) answered within {t:.0f}s, fewer than "
                           f"min_silos_per_round = {self.min_silos}; no upload from silo(s) {missing}",
                           silent=set(missing))
        elif self.state == "finish":
            log.warning("silo(s) %s did not confirm the end within %.0fs; finishing anyway",
                        [c for c in self.client_id_list_in_this_round
                         if not self.client_finished_mapping.get(str(c))], t)
            self._stop()

    def _fail(self, reason: str, silent: set | frozenset = frozenset()) -> None:
        done = self._exchange()
        ckpt = checkpoint.checkpoint_path(self.out_dir)
        where = (f"the last completed exchange ({done} of {self.fedml_rounds}, {self.inner.round} training "
                 f"round(s)) is checkpointed in {ckpt}; fix the silos and continue with "
                 f"--resume {self.out_dir}") if ckpt.exists() else "no exchange was completed (nothing to resume)"
        self.failure = SiloFailure(f"{reason}. Stopped: {where}")
        log.error("%s", self.failure)
        for cid in self.active:  # live silos exit instead of waiting for a server that is gone
            if cid not in silent:
                self._try_send(self.send_message_finish, cid, cid - 1, retry_s=1.0)
        self._stop(clean=False)

    def _stop(self, clean: bool = True) -> None:
        """Leave the main loop: FedML's finish() after a complete run; on a failure only the loop
        (under MPI, finish() would enter MPI_Finalize while the clients still wait; the runner aborts)."""
        self._disarm()
        self.state = "stopped"
        if clean:
            self.finish()
        else:
            self.com_manager.stop_receive_message()


class DeviceLedger:
    """Per-device backup so a repeated exchange (after a server crash) starts from the same state.

    Before a device trains exchange E it records E and a copy of its state; asked to train E again
    (the server was restarted from a checkpoint taken before E completed), it first puts the copy back.
    """

    def __init__(self, store):
        self.store = store

    def before_training(self, device_id: int, tag: list) -> None:
        root = self.store.root
        mark, backup = root / f"device_{device_id:05d}.exchange", root / f"device_{device_id:05d}.before.pt"
        if mark.exists() and json.loads(mark.read_text()) == tag and backup.exists():
            state = torch.load(backup, map_location="cpu", weights_only=False)
            self.store.save(device_id, state)
            log.warning("device %d: exchange %s is repeated; its state was restored from before it", device_id, tag)
            return
        state = self.store.load(device_id)
        atomic_write(backup, lambda fh: torch.save(state, fh))
        atomic_write_text(mark, json.dumps(tag))


class FibecClientManager(ClientMasterManager):
    """FedML's client loop: trains on every model message and ends when the message says so."""

    def __init__(self, args, trainer_dist_adapter, comm, rank, size, backend, *, cfg: RunConfig, store):
        super().__init__(args, trainer_dist_adapter, comm, rank, size, backend)
        self.cfg = cfg
        self.ledger = DeviceLedger(store)
        self.grpc = backend == "GRPC"
        if self.grpc:  # the server may start after this silo
            self.com_manager.retry_s = cfg.comm_args.connect_timeout_s

    def handle_message_init(self, msg_params):
        self._serve(msg_params)

    def handle_message_receive_model_from_server(self, msg_params):
        self._serve(msg_params)

    def handle_message_connection_ready(self, msg_params):
        if not self.has_sent_online_msg:
            self.has_sent_online_msg = True
            self.send_client_status(0)

    def _serve(self, msg_params) -> None:
        message = msg_params.get(ClientMessage.MSG_ARG_KEY_MODEL_PARAMS)
        index = int(msg_params.get(ClientMessage.MSG_ARG_KEY_CLIENT_INDEX))
        tag = exchange_tag(message)
        if message["phase"] == PHASE_TRAIN and int(message["round"]) >= self.cfg.train_args.comm_round:
            self._goodbye()
            return
        held = self.trainer_dist_adapter.trainer.train_data_local_dict
        if self.grpc and index not in held:
            raise FibecError(f"the server asked silo {self.rank} for device {index}, but this silo holds device(s) "
                             f"{sorted(held)}: the server and this silo disagree on ranks (same ipconfig and "
                             "config on every host?)")
        self.ledger.before_training(index, tag)
        self.trainer_dist_adapter.update_dataset(index)
        self.trainer_dist_adapter.update_model(message)
        upload, n = self.trainer_dist_adapter.train(self.round_idx)
        upload = dict(upload)
        upload[REPLY_TO] = tag
        corrupt = os.environ.get(ENV_CORRUPT_UPLOAD)
        if corrupt is not None and tag == [int(corrupt), PHASE_TRAIN] and upload["tensors"]:
            key = next(iter(upload["tensors"]))
            upload["tensors"] = OrderedDict(upload["tensors"])
            upload["tensors"][key] = torch.full_like(upload["tensors"][key], float("nan"))
            log.warning("%s: sending a NaN upload for round %s on purpose", ENV_CORRUPT_UPLOAD, corrupt)
        try:
            if self.grpc:  # a server that is gone re-sends this exchange when it is resumed
                self.com_manager.retry_s = min(10.0, self.cfg.comm_args.connect_timeout_s)
            self.send_model_to_server(0, upload, n)
        except FibecError as exc:
            log.warning("upload for exchange %s not delivered (%s); waiting for the server", tag, exc)
        self.round_idx += 1

    def handle_message_finish(self, msg_params):
        self._goodbye()

    def _goodbye(self) -> None:
        try:
            if self.grpc:
                self.com_manager.retry_s = 5.0
            self.send_client_status(0, ClientMasterManager.RUN_FINISHED_STATUS_FLAG)
        except FibecError as exc:
            log.warning("could not tell the server goodbye: %s", exc)
        self.finish()


class GrpcWorld:
    """The MpiWorld interface for a process started on its own (GRPC): no collectives."""

    comm = None

    def __init__(self, rank: int, size: int):
        self.rank, self.size = rank, size

    def bcast(self, value):
        return value

    def all_ok(self, ok: bool) -> bool:
        return ok

    def barrier(self) -> None:
        pass

    def abort(self, code: int) -> None:
        # GRPC's server threads must not keep a failed process alive.
        logging.shutdown()
        os._exit(code)


def silo_dataset(dataset: list, silo_index: Optional[int]) -> list:
    """FedML's dataset list keeping only one silo's partition (None: the server keeps none)."""
    keep = [] if silo_index is None else [silo_index]
    num, local, test_local = dataset[4], dataset[5], dataset[6]
    return [sum(num[i] for i in keep), dataset[1], None, dataset[3], {i: num[i] for i in keep},
            {i: local[i] for i in keep}, {i: test_local[i] for i in keep}, dataset[7]]
