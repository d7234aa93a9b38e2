"""FedML's server-side aggregator with our per-round device draw, and the split of a round's devices
over the client processes that serve them."""
from __future__ import annotations

from fedml.cross_silo.server.fedml_aggregator import FedMLAggregator

from ...core.seeds import sample_devices


class RoundSampledAggregator(FedMLAggregator):
    """FedML's server-side aggregator with one change: which devices take part in each round.

    FedML 0.9.6 draws the devices of round r+1 with the seed of round r, so rounds 0 and 1 train
    the same devices. Here the k-th draw is for the k-th exchange; the scoring exchange of FibecFed
    uses the devices of training round 0, so every method trains the same devices in each round.
    """

    def __init__(self, *fedml_args, seed: int, scoring_exchange: bool, first_exchange: int = 0):
        super().__init__(*fedml_args)
        self._seed = seed
        self.next_exchange = first_exchange  # the exchange the next draw is for (checkpointed)
        self._offset = 1 if scoring_exchange else 0

    def data_silo_selection(self, round_idx, client_num_in_total, client_num_per_round):
        train_round = max(0, self.next_exchange - self._offset)
        self.next_exchange += 1
        return sample_devices(self._seed, train_round, client_num_in_total, client_num_per_round)


def split_devices(devices: list[int], processes: int) -> list[list[int]]:
    """The round's devices in order, in `processes` contiguous runs as even as possible.

    One device per process when there are as many processes as devices (FedML's layout); with
    fewer processes each serves its run one device after another.
    """
    base, extra = divmod(len(devices), processes)
    runs, start = [], 0
    for i in range(processes):
        end = start + base + (1 if i < extra else 0)
        runs.append(list(devices[start:end]))
        start = end
    return runs
