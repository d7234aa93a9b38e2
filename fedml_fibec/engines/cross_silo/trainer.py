"""FedML ClientTrainer of our engine: a thin adapter over the device round (core/device_round.py).

FedML calls, per device served: update_dataset(train, test, n) -> set_model_params(message) ->
on_before_local_training -> train -> on_after_local_training -> get_model_params. The train set is
a DeviceData, so the adapter knows which device it serves; it loads that device's state from the
store, runs the device round, and saves the state back.
"""
from __future__ import annotations

from typing import Optional

from fedml.core import ClientTrainer

from ...config import RunConfig
from ...core.device_round import DeviceRound
from ...core.messages import Download, Upload
from ...core.seeds import device_eval_subset
from ...core.state_store import DeviceStateStore
from ...data import DeviceData, EncodedSet


class FibecClientTrainer(ClientTrainer):
    """Serves whichever device FedML assigns; all device state lives in the store."""

    def __init__(self, model, args, cfg: RunConfig, store: DeviceStateStore):
        super().__init__(model, args)
        self.cfg = cfg
        self.store = store
        self.device_round = DeviceRound(model, cfg)
        self.download: Optional[Download] = None
        self.upload: Optional[Upload] = None
        self._eval_set: Optional[EncodedSet] = None

    def get_model_params(self):
        return self.upload.to_fedml()

    def set_model_params(self, model_parameters):
        self.download = Download.from_fedml(model_parameters)

    def train(self, train_data: DeviceData, device, args):
        state = self.store.load(train_data.device_id)
        self.upload = self.device_round.run(self.download, train_data.device_id, train_data.data, state, device,
                                            eval_set=self._device_eval_set(), personal_set=train_data.heldout)
        self.store.save(train_data.device_id, state)

    def test(self, test_data, device, args):
        return None

    def _device_eval_set(self) -> Optional[EncodedSet]:
        """The seeded global-test subsample the device's model is evaluated on (None = off)."""
        n = self.cfg.validation_args.device_eval_samples
        if n <= 0 or self.local_test_dataset is None:
            return None
        if self._eval_set is None:
            self._eval_set = device_eval_subset(self.local_test_dataset.data, n, self.cfg.common_args.random_seed)
        return self._eval_set
