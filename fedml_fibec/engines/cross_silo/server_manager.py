"""FedML's cross-silo server loop with round timeouts, checkpoints, re-joining silos and several
devices per client process.

Made from our side without editing FedML (a subclass of FedMLServerManager), for both backends;
the timeout parts act only on GRPC (under mpirun a lost rank ends the job). Per exchange:
- the round's devices are drawn and split over the client processes taking part (`active`); each
  process gets the global message once with the list of its devices (one each in FedML's layout);
  a silo that cannot be reached is left out of the round;
- uploads are bundles tagged with the exchange they answer (late answers to an earlier exchange
  are dropped, duplicates ignored); when all arrived they are aggregated in the round's device
  order, tested, checkpointed, and the next exchange starts;
- after `round_timeout_s` (GRPC) without all uploads: with at least `min_silos_per_round` answers
  it aggregates those and drops the missing silos (each later exchange probes them; one that
  answers, e.g. after a restart, re-joins at the next exchange); with fewer it stops: it tells the
  live silos to finish and raises SiloFailure (the last completed exchange is checkpointed). The
  same timeout bounds the wait for silos at start-up and for their goodbyes at the end.
The timeout is a local message posted into the transport's receive queue by a timer thread, so all
state changes happen on FedML's main loop.
"""
from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Optional

from fedml.core.distributed.communication.message import Message
from fedml.cross_silo.server.fedml_server_manager import FedMLServerManager
from fedml.cross_silo.server.message_define import MyMessage

from ...config import RunConfig
from ...errors import FibecError
from . import checkpoint
from .faults import ENV_STOP_AFTER_ROUND, FaultPlan, SimulatedCrash
from .sampling import split_devices
from .wire import device_list_arg, unbundle

log = logging.getLogger("fedml_fibec")

MSG_TYPE_TIMEOUT = "fibec_round_timeout"
MSG_ARG_TOKEN = "fibec_token"


class SiloFailure(FibecError):
    """Too few silos answered: the run stopped (the last completed exchange is checkpointed)."""


class FibecServerManager(FedMLServerManager):
    """FedML's cross-silo server loop with timeouts, dropped and re-joining silos, and checkpoints."""

    def __init__(self, args, aggregator, comm, rank, size, backend, *, cfg: RunConfig, out_dir: Path,
                 metrics, first_exchange: int = 0, active: Optional[list[int]] = None,
                 faults: FaultPlan = FaultPlan()):
        super().__init__(args, aggregator, comm, rank, size, backend)
        self.cfg = cfg
        self.out_dir = Path(out_dir)
        self.metrics = metrics
        self.faults = faults
        self.grpc = backend == "GRPC"
        c = cfg.comm_args
        self.timeout = c.round_timeout_s if self.grpc else None
        self.min_silos = c.min_silos_per_round or len(self.client_real_ids)
        self.first_exchange = first_exchange
        self.fedml_rounds = first_exchange + self.round_num
        self.active = sorted(active or self.client_real_ids)
        self.online: set[int] = set()
        self.state = "connect"  # connect -> round -> finish
        self.expected: dict[int, list[int]] = {}  # client process -> the devices it serves this exchange
        self.received: dict[int, list] = {}
        self.tag: Optional[list] = None
        self.failure: Optional[FibecError] = None
        self._token = 0
        self._timer: Optional[threading.Timer] = None
        self._sent_any: set[int] = set()
        self._wire = (0, 0, 0)  # transport counters at the last completed exchange
        self.first_exchange_at: Optional[float] = None  # unix time the first exchange was sent (start-up ends)
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
    def _assign(self, clients: list[int]) -> list[list[int]]:
        """The devices each client process serves in the next exchange (draws the round's devices)."""
        if self.grpc:  # each silo is one fixed device: silo r holds device r-1
            return [[cid - 1] for cid in clients]
        devices = self.aggregator.data_silo_selection(self.args.round_idx, self.args.client_num_in_total,
                                                      self.cfg.train_args.client_num_per_round)
        return split_devices([int(i) for i in devices], len(clients))

    def _start_exchange(self, message) -> None:
        if self.first_exchange_at is None:
            self.first_exchange_at = time.time()
        self.state = "round"
        self.is_initialized = True
        self._probe_dropped()
        clients = list(self.active)
        runs = self._assign(clients)
        self.client_id_list_in_this_round = clients
        self.data_silo_index_list = [device_list_arg(run) for run in runs]
        self.tag = [int(message["round"]), str(message["phase"])]
        if self.grpc:  # uploads may carry only tensors this exchange sent (the GAL's), checked on arrival
            self.com_manager.expect_uploads(message["tensors"])
        self.received, self.expected = {}, {}
        for cid, run in zip(clients, runs):
            send = self.send_message_sync_model_to_client if cid in self._sent_any else self.send_message_init_config
            if self._try_send(send, cid, message, device_list_arg(run)):
                self.expected[cid] = run
                self._sent_any.add(cid)
        dead = [cid for cid in clients if cid not in self.expected]
        if dead:  # dropped now; probed again at each later exchange
            log.warning("exchange %d: silo(s) %s unreachable; going on with %s", self._exchange(), dead,
                        sorted(self.expected))
            self.active = [cid for cid in self.active if cid not in dead]
        if len(self.expected) < self.min_silos:
            self._fail(f"exchange {self._exchange()} (round {self.inner.server_round.round}): only "
                       f"{len(self.expected)} silo(s) reachable, fewer than min_silos_per_round = {self.min_silos}; "
                       f"unreachable: silo(s) {dead}")
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
        tag, uploads = unbundle(msg_params.get(MyMessage.MSG_ARG_KEY_MODEL_PARAMS))
        if self.state != "round" or sender not in self.expected or sender in self.received or tag != self.tag:
            log.warning("ignored an upload from silo %d answering %s (now at %s, %s)", sender, tag, self.tag,
                        "a duplicate" if sender in self.received else "late or unexpected")
            return
        self.received[sender] = uploads
        if set(self.received) == set(self.expected):
            self._complete_exchange()

    def _complete_exchange(self) -> None:
        self._disarm()
        order = sorted(self.received, key=self.client_real_ids.index)
        model_list = [(u["num_samples"], u) for cid in order for u in self.received[cid]]
        transport = {}
        if self.grpc:
            cm = self.com_manager
            sent, received, rejected = cm.bytes_sent, cm.bytes_received, cm.rejected_messages
            transport = {"wire_bytes_down": sent - self._wire[0], "wire_bytes_up": received - self._wire[1],
                         "wire_rejected": rejected - self._wire[2],
                         "silos_dropped": [cid for cid in self.client_real_ids if cid not in self.active]}
            self._wire = (sent, received, rejected)
        self.inner.note_exchange(receivers=sum(len(run) for run in self.expected.values()), **transport)
        model_list, _ = self.inner.on_before_aggregation(model_list)
        averaged = self.inner.aggregate(model_list)
        averaged = self.inner.on_after_aggregation(averaged)
        self.aggregator.set_global_model_params(averaged)
        self.aggregator.test_on_server_for_all_clients(self.args.round_idx)
        self.args.round_idx += 1
        done = self._exchange()
        server_round = self.inner.server_round
        checkpoint.save(self.out_dir, aggregator=self.inner, metrics=self.metrics, exchanges_done=done,
                        fedml_rounds=self.fedml_rounds, sampler_next=self.aggregator.next_exchange,
                        active_silos=self.active, cfg=self.cfg)
        if self.faults.crash_now(server_round.phase, server_round.round) and done < self.fedml_rounds:
            self.failure = SimulatedCrash(f"{ENV_STOP_AFTER_ROUND}={self.faults.stop_after_round}: stopped after "
                                          f"round {server_round.round} (checkpointed in {self.out_dir})")
            self._stop(clean=False)
            return
        if self.args.round_idx < self.round_num:
            self._start_exchange(averaged)
            return
        # The last message: silos see its round reach comm_round, say goodbye and exit.
        self.state = "finish"
        self.client_id_list_in_this_round = list(self.active)
        self.data_silo_index_list = [device_list_arg(run) for run in self._assign(self.active)]
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
            missing = sorted(set(self.expected) - set(self.received))
            if len(self.received) >= self.min_silos:
                log.warning("exchange %d: no upload from silo(s) %s within %.0fs; going on with %d silo(s) %s "
                            "(the missing ones re-join when they answer again)", self._exchange(), missing, t,
                            len(self.received), sorted(self.received))
                self.active = [cid for cid in self.active if cid not in missing]  # re-joined ones stay
                self._complete_exchange()
            else:
                self._fail(f"exchange {self._exchange()} (round {self.inner.server_round.round}): "
                           f"{len(self.received)} of {len(self.expected)} silo(s) answered within {t:.0f}s, fewer "
                           f"than min_silos_per_round = {self.min_silos}; no upload from silo(s) {missing}",
                           silent=set(missing))
        elif self.state == "finish":
            log.warning("silo(s) %s did not confirm the end within %.0fs; finishing anyway",
                        [c for c in self.client_id_list_in_this_round
                         if not self.client_finished_mapping.get(str(c))], t)
            self._stop()

    def _fail(self, reason: str, silent: set | frozenset = frozenset()) -> None:
        done = self._exchange()
        ckpt = checkpoint.checkpoint_path(self.out_dir)
        where = (f"the last completed exchange ({done} of {self.fedml_rounds}, {self.inner.server_round.round} "
                 f"training round(s)) is checkpointed in {ckpt}; fix the silos and continue with "
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
