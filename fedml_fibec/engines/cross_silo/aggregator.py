"""FedML ServerAggregator of our engine: a thin adapter over the server round (core/server_round.py).

Our server manager calls, per exchange: aggregate(list of (n, upload)) -> set_model_params ->
test_all -> test, as FedML's cross-silo server does; what `aggregate` returns is sent to the next
exchange's devices. The record of a training round leaves `aggregate` complete but for the
global accuracy and the clock, which `test` adds before writing it.
"""
from __future__ import annotations

from typing import Optional

from fedml.core import ServerAggregator

from ...config import RunConfig
from ...core.messages import Upload
from ...core.records import RoundClock
from ...core.server_round import ServerRound
from ...data import EncodedSet
from ...metrics import MetricsLog


class FibecServerAggregator(ServerAggregator):
    """FedML's view of the server round; writes one metrics record per training round."""

    def __init__(self, model, args, cfg: RunConfig, test_set: EncodedSet, metrics: MetricsLog, device,
                 validation_set: Optional[EncodedSet] = None):
        super().__init__(model, args)
        self.server_round = ServerRound(model, cfg, test_set, device, validation_set)
        self.clock = RoundClock(metrics)
        self.receivers: Optional[int] = None  # devices the current exchange went to (None = all)
        self.transport: dict = {}  # transport facts of the current exchange for its record (GRPC)
        self._transport_carry: dict = {}  # counts of the scoring exchange, for round 0's record
        self._record: Optional[dict] = None

    def note_exchange(self, receivers: Optional[int] = None, **transport) -> None:
        """What the engine knows of the exchange being completed: who got it, and wire-level facts."""
        self.receivers, self.transport = receivers, dict(transport)

    def _carried(self) -> dict:
        """This exchange's transport facts, with the counts of an exchange that had no record added."""
        facts = dict(self.transport)
        for k, v in self._transport_carry.items():
            if isinstance(v, int) and isinstance(facts.get(k), int):
                facts[k] += v
        return facts

    # FedML hooks -------------------------------------------------------------------------------
    def get_model_params(self):
        return self.server_round.download().to_fedml()

    def set_model_params(self, model_parameters):
        pass  # the global state lives in the server round; FedML hands back what aggregate returned

    def aggregate(self, raw_client_model_or_grad_list):
        uploads = [Upload.from_fedml(payload) for _, payload in raw_client_model_or_grad_list]
        record = self.server_round.aggregate(uploads, receivers=self.receivers)
        if record is None:  # the scoring exchange: its wire counts go into round 0, as its tensor bytes do
            self._transport_carry = self._carried()
        else:
            record.update(self._carried())
            self._transport_carry = {}
        self._record = record
        return self.server_round.download().to_fedml()

    def test_all(self, train_data_local_dict, test_data_local_dict, device, args) -> bool:
        return True

    def test(self, test_data, device, args):
        """Evaluate the new global model (when due) and write this round's record."""
        if self._record is None:  # after the scoring exchange: nothing trained yet
            return None
        record, self._record = self.server_round.evaluate_if_due(self._record), None
        self.clock.close(record)
        return record["global_accuracy"], record["global_loss"], None, None

    # checkpoints --------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return self.server_round.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.server_round.load_state_dict(state)
        self._record = None
        self.clock.restart()
