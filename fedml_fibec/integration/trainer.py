"""FedML ClientTrainer for FibecFed and FedAvg-LoRA: one device's round, its state kept by device id.

FedML calls, per round: update_dataset(train, test, n) -> set_model_params(message) ->
on_before_local_training -> train -> on_after_local_training -> get_model_params. The train set is
a DeviceData, so the trainer knows which device it serves and loads that device's own state.
"""
from __future__ import annotations

import hashlib
import logging
import time
from typing import Any, Optional

import torch
from fedml.core import ClientTrainer

from .. import algorithm as alg
from ..config import RunConfig
from ..data import DeviceData, EncodedSet
from ..models import (block_index, head_parameter_names, load_trainable_state, num_blocks, trainable_state_dict,
                      transformer_blocks)
from .local import (evaluate, length_sorted_batches, make_optimizer, model_inputs, round_lr_scale,
                    train_steps)
from .payload import PHASE_SCORE, frozen_keys, to_wire, upload_message
from .state_store import DeviceStateStore

log = logging.getLogger(__name__)


def derived_seed(*parts: Any) -> int:
    """A stable 63-bit seed from the run seed and identifiers (same on every host and process)."""
    digest = hashlib.sha256(":".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


class FibecClientTrainer(ClientTrainer):
    """Serves whichever device FedML assigns each round; all device state lives in the store."""

    def __init__(self, model, args, cfg: RunConfig, store: DeviceStateStore):
        super().__init__(model, args)
        self.cfg = cfg
        self.store = store
        self.fibec = cfg.train_args.federated_optimizer == "FibecFed"
        # Latest known value of every trainable tensor: the initial model, then each global update.
        # A device's local part starts from it the first time the device is served.
        self.reference = {k: v.detach().clone() for k, v in trainable_state_dict(model).items()}
        self.keys = list(self.reference)
        self.head_names = head_parameter_names(model)
        self.message: Optional[dict] = None
        self.upload: Optional[dict] = None
        self._eval_set: Optional[EncodedSet] = None

    # FedML hooks -------------------------------------------------------------------------------
    def get_model_params(self):
        return self.upload

    def set_model_params(self, model_parameters):
        self.message = model_parameters
        for k, v in model_parameters["tensors"].items():
            self.reference[k] = v.float()

    def train(self, train_data: DeviceData, device, args):
        started = time.time()
        state = self.store.load(train_data.device_id)
        generator = torch.Generator()
        if "rng" in state:
            generator.set_state(state["rng"])
        else:
            generator.manual_seed(derived_seed(self.cfg.common_args.random_seed, "device", train_data.device_id))
        self._compose_model(state, device)
        if self.message["phase"] == PHASE_SCORE:
            scores = self._layer_scores(train_data.data, generator, device)
            self.upload = upload_message(train_data.device_id, len(train_data), {}, scores)
        else:
            self.upload = self._train_round(train_data, state, generator, device)
        state["rng"] = generator.get_state()
        self.store.save(train_data.device_id, state)
        log.debug("device %d served in %.1fs", train_data.device_id, time.time() - started)

    def test(self, test_data, device, args):
        return None

    # one round ------------------------------------------------------------------------------------
    def _compose_model(self, state: dict, device) -> None:
        """Load the global shared part from the message and the device's own part from its state."""
        shared = self.message["tensors"]
        local = state.get("local", {})
        values = {k: (shared[k] if k in shared else local.get(k, self.reference[k])) for k in self.keys}
        load_trainable_state(self.model, {k: v.to(device=device, dtype=torch.float32) for k, v in values.items()})

    def _train_round(self, train_data: DeviceData, state: dict, generator: torch.Generator, device) -> dict:
        cfg, fb, tr = self.cfg, self.cfg.fibec_args, self.cfg.train_args
        data = train_data.data
        round_idx = int(self.message["round"])
        shared = list(self.message["tensors"].keys())
        local_keys = [k for k in self.keys if k not in self.message["tensors"]]
        torch.manual_seed(derived_seed(cfg.common_args.random_seed, "dropout", train_data.device_id, round_idx))

        n_total = len(data)
        clock = {"scoring_seconds": 0.0}
        t0 = time.perf_counter()
        if self.fibec and fb.g0 < 1:
            n_use = alg.curriculum_size(round_idx, n_total, g0=fb.g0, T_c=cfg.curriculum_rounds, p=fb.p,
                                        min_samples=fb.min_samples)
            order = self._difficulty_order(data, state, device)
            clock["scoring_seconds"] = time.perf_counter() - t0
            batches = alg.curriculum_batches(order, n_use, batch_size=tr.batch_size, num_steps=tr.local_steps,
                                             generator=generator)
        else:
            n_use = n_total
            batches = alg.local_batches(n_total, batch_size=tr.batch_size, num_steps=tr.local_steps,
                                        generator=generator)

        t0 = time.perf_counter()
        params = dict(self.model.named_parameters())
        frozen = [params[k] for k in frozen_keys(self.keys, tr.federated_optimizer) if params[k].requires_grad]
        for p in frozen:
            p.requires_grad_(False)
        local_params = {k: params[k] for k in local_keys if params[k].requires_grad}
        sq_grads: dict[str, torch.Tensor] = {}
        # Squared gradients are taken before the sparse mask zeroes rows: every row of a trained
        # module gets a true score for the next selection, at no extra backward pass.
        hooks = [p.register_hook(self._accumulator(sq_grads, k)) for k, p in local_params.items()]
        sparse, updated_share = None, (1.0 if local_keys else None)
        scored = {k: v.to(local_params[k].device) for k, v in state.get("momentum", {}).items() if k in local_params}
        if self.fibec and scored and fb.rho < 1:
            # Modules without a score yet (first participation, or new to the local part) train densely.
            masks = alg.select_top_neurons(scored, fb.rho)
            sparse = alg.SparseUpdate({k: local_params[k] for k in masks}, masks)
            selected = sum(int(m.sum()) for m in masks.values()) + sum(
                local_params[k].shape[0] for k in local_params if k not in masks)
            updated_share = selected / sum(p.shape[0] for p in local_params.values())
        try:
            scale = round_lr_scale(round_idx, tr.comm_round, tr.lr_schedule, tr.min_lr_ratio)
            head_lr = None if tr.head_learning_rate is None else tr.head_learning_rate * scale
            optimizer = make_optimizer(self.model, tr.client_optimizer, tr.learning_rate * scale, tr.weight_decay,
                                       head_lr=head_lr, head_names=self.head_names)
            loss = train_steps(self.model, data, batches, optimizer,
                               device=device, max_grad_norm=tr.max_grad_norm, bf16=cfg.device_args.bf16,
                               after_step=None if sparse is None else sparse.after_step)
        finally:
            for h in hooks:
                h.remove()
            for p in frozen:
                p.requires_grad_(True)
            if sparse is not None:
                sparse.close()

        after = trainable_state_dict(self.model)
        if local_keys:
            # A module frozen this round has no new score: it keeps its momentum unchanged.
            prev = state.get("momentum", {})
            momentum = {k: prev[k] for k in local_keys if k in prev}
            momentum.update(alg.momentum_update(prev, alg.neuron_scores(sq_grads), fb.beta))
            state["momentum"] = {k: v.detach().cpu() for k, v in momentum.items()}
        state["local"] = {k: after[k].detach().cpu() for k in local_keys}
        state["participations"] = state.get("participations", 0) + 1

        clock["train_seconds"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        device_acc = None
        if cfg.validation_args.device_eval_samples > 0 and self.local_test_dataset is not None:
            ev = self._device_eval_set(self.local_test_dataset.data)
            device_acc, _ = evaluate(self.model, ev, batch_size=cfg.validation_args.eval_batch_size, device=device,
                                     bf16=cfg.device_args.bf16)
        clock["eval_seconds"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        scores = self._layer_scores(data, generator, device) if self.message.get("rescore") else None
        clock["scoring_seconds"] += time.perf_counter() - t0
        stats = {"train_loss": loss, "device_accuracy": device_acc, "curriculum_share": n_use / n_total,
                 "updated_neuron_share": updated_share, **clock}
        return upload_message(train_data.device_id, n_use,
                              to_wire({k: after[k] for k in shared}, cfg.comm_args.payload_dtype), scores, stats)

    @staticmethod
    def _accumulator(acc: dict[str, torch.Tensor], name: str):
        def hook(grad: torch.Tensor) -> None:
            sq = grad.detach().float() ** 2
            acc[name] = sq if name not in acc else acc[name] + sq
        return hook

    def _difficulty_order(self, data: EncodedSet, state: dict, device) -> torch.Tensor:
        """Easy-to-hard order of the device's samples, scored with the current model when due."""
        fb = self.cfg.fibec_args
        seen = state.get("participations", 0)
        due = "difficulty" not in state or (fb.refresh_every > 0 and seen > 0 and seen % fb.refresh_every == 0)
        if due:
            scores = torch.empty(len(data))
            for rows in length_sorted_batches(data.attention_mask, fb.scoring_batch_size):
                inputs = model_inputs(data, rows, device)
                scores[rows] = alg.score_dataset(
                    self.model, inputs["input_ids"], inputs["attention_mask"], data.labels[rows].to(device),
                    batch_size=len(rows), wrt=fb.wrt, fisher=fb.fisher, normalize=fb.normalize).cpu()
            state["difficulty"] = scores
        return alg.easiest_first(state["difficulty"], data.labels if fb.stratify_by_label else None)

    def _layer_scores(self, data: EncodedSet, generator: torch.Generator, device) -> torch.Tensor:
        """Sensitivity of every block, on a sample of the device's data."""
        fb = self.cfg.fibec_args
        n = min(len(data), fb.layer_score_samples)
        idx = torch.randperm(len(data), generator=generator)[:n]
        ids, mask, y = data.input_ids[idx].to(device), data.attention_mask[idx].to(device), data.labels[idx].to(device)
        if fb.layer_score == "perturbation":
            noise = torch.Generator(device=device)
            noise.manual_seed(int(torch.randint(0, 2**62, (1,), generator=generator)))
            return alg.perturbation_layer_scores(self.model, ids, mask, blocks=transformer_blocks(self.model),
                                                 sigma=fb.sigma, generator=noise).cpu()
        return alg.grad_sensitivity_layer_scores(self.model, ids, mask, y, block_of=block_index,
                                                 num_blocks=num_blocks(self.model)).cpu()

    def _device_eval_set(self, test: EncodedSet) -> EncodedSet:
        """A fixed, seeded subsample of the global test set for device accuracy."""
        if self._eval_set is None:
            n = min(len(test), self.cfg.validation_args.device_eval_samples)
            g = torch.Generator().manual_seed(derived_seed(self.cfg.common_args.random_seed, "device_eval"))
            self._eval_set = test.subset(torch.randperm(len(test), generator=g)[:n].sort().values)
        return self._eval_set
