"""FedML's cross-silo client loop for our engine: serves each device the server names, answers once.

Trains on every model message (initial or not, so a restarted server can re-initialise running
silos), decides the end from the message itself (its round reaches comm_round), answers each
exchange with one bundle of its devices' uploads tagged with the exchange, and keeps a per-device
backup so that an exchange repeated after a server crash starts from the same device state
(DeviceLedger).
"""
from __future__ import annotations

import json
import logging

import torch
from fedml.cross_silo.client.fedml_client_master_manager import ClientMasterManager
from fedml.cross_silo.client.message_define import MyMessage as ClientMessage

from ...atomic import atomic_write, atomic_write_text
from ...config import RunConfig
from ...core.messages import PHASE_TRAIN
from ...core.state_store import DeviceStateStore
from ...errors import FibecError
from .faults import FaultPlan
from .wire import bundle, parse_device_list

log = logging.getLogger("fedml_fibec")


class DeviceLedger:
    """Per-device backup so a repeated exchange (after a server crash) starts from the same state.

    Before a device trains exchange E it records E and a copy of its state; asked to train E again
    (the server was restarted from a checkpoint taken before E completed), it first puts the copy back.
    """

    def __init__(self, store: DeviceStateStore):
        self.store = store

    def before_training(self, device_id: int, tag: list) -> None:
        mark, backup = self.store.mark_path(device_id), self.store.backup_path(device_id)
        if mark.exists() and json.loads(mark.read_text()) == tag and backup.exists():
            state = torch.load(backup, map_location="cpu", weights_only=False)
            self.store.save(device_id, state)
            log.warning("device %d: exchange %s is repeated; its state was restored from before it", device_id, tag)
            return
        state = self.store.load(device_id)
        atomic_write(backup, lambda fh: torch.save(state, fh))
        atomic_write_text(mark, json.dumps(tag))


class FibecClientManager(ClientMasterManager):
    """FedML's client loop: serves the named devices on every model message, ends when the message says so."""

    def __init__(self, args, trainer_dist_adapter, comm, rank, size, backend, *, cfg: RunConfig,
                 store: DeviceStateStore, faults: FaultPlan = FaultPlan()):
        super().__init__(args, trainer_dist_adapter, comm, rank, size, backend)
        self.cfg = cfg
        self.ledger = DeviceLedger(store)
        self.faults = faults
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
        tag = [int(message["round"]), str(message["phase"])]
        if message["phase"] == PHASE_TRAIN and int(message["round"]) >= self.cfg.train_args.comm_round:
            self._goodbye()
            return
        devices = parse_device_list(msg_params.get(ClientMessage.MSG_ARG_KEY_CLIENT_INDEX))
        held = self.trainer_dist_adapter.trainer.train_data_local_dict
        if self.grpc and any(d not in held for d in devices):
            raise FibecError(f"the server asked silo {self.rank} for device(s) {devices}, but this silo holds "
                             f"device(s) {sorted(held)}: the server and this silo disagree on ranks (same ipconfig "
                             "and config on every host?)")
        uploads = []
        for device_id in devices:  # one after another, each from its own state in the store
            self.ledger.before_training(device_id, tag)
            # FedML's adapter reads index 0 as "no index" (`client_index or ...`): call its trainer directly.
            self.trainer_dist_adapter.trainer.update_dataset(device_id)
            self.trainer_dist_adapter.update_model(message)
            upload, _ = self.trainer_dist_adapter.train(self.round_idx)
            self.faults.corrupt(upload)
            uploads.append(upload)
        try:
            if self.grpc:  # a server that is gone re-sends this exchange when it is resumed
                self.com_manager.retry_s = min(10.0, self.cfg.comm_args.connect_timeout_s)
            self.send_model_to_server(0, bundle(uploads, tag), sum(u["num_samples"] for u in uploads))
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
