"""One device's round of our engine, in pure torch: a Download and the device's state in, an Upload out.

Read it as the paper's device steps (FIBECFED.md sections 1 and 3):
1. compose the device's model: the global shared tensors, and its own device-local part;
2. choose this round's samples: the easiest n(t) by Fisher difficulty (scored when due);
3. train: shared tensors densely, device-local ones sparsely (top-rho neurons by momentum of
   squared gradients), tensors the method freezes not at all;
4. keep the device-local tensors and the new neuron momentum in the device's state;
5. evaluate the device's model, and score layer sensitivity when the server asks;
6. upload the shared tensors, weighted by the samples used.
FedAvg-LoRA, FFA-LoRA and FedSA-LoRA are the same round with the method's record deciding what is
shared and frozen (fedml_fibec/methods.py). Nothing here knows FedML.
"""
from __future__ import annotations

import contextlib
import logging
import time
from typing import Optional

import torch
from torch import nn

from .. import algorithm as alg
from ..config import RunConfig
from ..data import EncodedSet
from ..models import (block_index, head_parameter_names, load_trainable_state, num_blocks, trainable_state_dict,
                      transformer_blocks)
from ..models.prefix_cache import FrozenPrefixCache, capture_prefix_output, prefix_fingerprint
from .local import evaluate, length_sorted_batches, make_optimizer, model_inputs, round_lr_scale, train_steps
from .messages import PHASE_SCORE, Download, Upload, select_rows, to_wire
from ..methods import method_of
from .seeds import device_generator, seed_dropout

log = logging.getLogger(__name__)


class DeviceRound:
    """Runs any device's round on one model; everything that belongs to a device is in its state dict."""

    def __init__(self, model: nn.Module, cfg: RunConfig):
        self.model = model
        self.cfg = cfg
        self.method = method_of(cfg.train_args.federated_optimizer)
        # Latest known value of every trainable tensor: the initial model, then each global update.
        # A device's local part starts from it the first time the device is served.
        self.reference = {k: v.detach().clone() for k, v in trainable_state_dict(model).items()}
        self.keys = list(self.reference)
        self.head_names = head_parameter_names(model)

    def run(self, download: Download, device_id: int, data: EncodedSet, state: dict, device: torch.device,
            eval_set: Optional[EncodedSet] = None, personal_set: Optional[EncodedSet] = None) -> Upload:
        """Serve one device for one exchange; `state` (the device's own) is updated in place."""
        started = time.time()
        for k, v in download.tensors.items():
            self.reference[k] = v.float()
        generator = device_generator(state, self.cfg.common_args.random_seed, device_id)
        self._compose_model(download, state, device)
        if download.phase == PHASE_SCORE:
            upload = Upload(device_id, len(data), layer_scores=self._layer_scores(data, generator, device))
        else:
            upload = self._train(download, device_id, data, state, generator, device, eval_set, personal_set)
        state["rng"] = generator.get_state()
        upload.reply_to = download.tag
        log.debug("device %d served in %.1fs", device_id, time.time() - started)
        return upload

    # 1. the device's model ------------------------------------------------------------------------
    def _compose_model(self, download: Download, state: dict, device) -> None:
        """Load the global shared part from the message and the device's own part from its state."""
        shared = download.tensors
        local = state.get("local", {})
        values = {k: (shared[k] if k in shared else local.get(k, self.reference[k])) for k in self.keys}
        load_trainable_state(self.model, {k: v.to(device=device, dtype=torch.float32) for k, v in values.items()})

    # 2-6. a training round --------------------------------------------------------------------------
    def _train(self, download: Download, device_id: int, data: EncodedSet, state: dict,
               generator: torch.Generator, device, eval_set: Optional[EncodedSet],
               personal_set: Optional[EncodedSet] = None) -> Upload:
        cfg, fb, tr = self.cfg, self.cfg.fibec_args, self.cfg.train_args
        round_idx = download.round
        shared = list(download.tensors)
        local_keys = [k for k in self.keys if k not in download.tensors]
        seed_dropout(cfg.common_args.random_seed, device_id, round_idx)
        # Wall seconds, and the CPU seconds of this thread (where the work runs with one torch thread, as on
        # a client rank that shares its cores): CPU time barely moves when other processes share the cores.
        clock = {"scoring_seconds": 0.0, "scoring_cpu_seconds": 0.0}

        if self.method.fibec and fb.sparse_target == "gal":
            # Second reading: the GAL's LoRA trains sparsely; the device-local LoRA stays frozen.
            heads = set(self.head_names)
            sparse_keys, still = [k for k in shared if k not in heads], local_keys
        else:  # first reading: the device-local (non-GAL) LoRA trains sparsely, the shared tensors densely
            sparse_keys, still = local_keys, []
        prefix = self._prefix_cache(state, still, len(data)) if self.method.fibec and fb.cache_frozen_prefix else None

        t0, c0 = time.perf_counter(), time.thread_time()
        n_total = len(data)
        if self.method.fibec and fb.g0 < 1:
            n_use = alg.curriculum_size(round_idx, n_total, g0=fb.g0, T_c=cfg.curriculum_rounds, p=fb.p,
                                        min_samples=fb.min_samples)
            # With every sample in use the order cannot matter (the draw over all of them is the plain
            # one), so a device that is due for scoring then is not scored: no compute for nothing.
            order = (self._difficulty_order(data, state, device, prefix) if n_use < n_total
                     else torch.arange(n_total))
            clock["scoring_seconds"] = time.perf_counter() - t0
            clock["scoring_cpu_seconds"] = time.thread_time() - c0
            batches = alg.curriculum_batches(order, n_use, batch_size=tr.batch_size, generator=generator,
                                             num_steps=alg.local_step_count(n_use, batch_size=tr.batch_size,
                                                                            epochs=tr.epochs, max_steps=tr.local_steps))
        else:
            n_use = n_total
            batches = alg.local_batches(n_total, batch_size=tr.batch_size, generator=generator,
                                        num_steps=alg.local_step_count(n_total, batch_size=tr.batch_size,
                                                                       epochs=tr.epochs, max_steps=tr.local_steps))

        t0, c0 = time.perf_counter(), time.thread_time()
        if prefix is not None:  # samples the scoring pass did not see (or a stale cache): prefix only, once
            prefix.fill(self.model, length_sorted_batches(data.attention_mask, fb.scoring_batch_size),
                        lambda rows: model_inputs(data, rows, device))
            state["prefix_cache"] = prefix.to_state()
        loss, sq_grads, updated_share, row_masks = self._train_steps(round_idx, data, batches, sparse_keys, state,
                                                                     device, still=still, prefix=prefix)
        after = trainable_state_dict(self.model)
        if sparse_keys:
            # A module frozen this round has no new score: it keeps its momentum unchanged.
            prev = state.get("momentum", {})
            momentum = {k: prev[k] for k in sparse_keys if k in prev}
            momentum.update(alg.momentum_update(prev, alg.neuron_scores(sq_grads), fb.beta))
            state["momentum"] = {k: v.detach().cpu() for k, v in momentum.items()}
        state["local"] = {k: after[k].detach().cpu() for k in local_keys}
        state["participations"] = state.get("participations", 0) + 1
        clock["train_seconds"] = time.perf_counter() - t0
        clock["train_cpu_seconds"] = time.thread_time() - c0

        t0 = time.perf_counter()
        device_acc = None
        if eval_set is not None:
            device_acc, _ = evaluate(self.model, eval_set, batch_size=cfg.validation_args.eval_batch_size,
                                     device=device, bf16=cfg.device_args.bf16)
        personal_acc = None
        if personal_set is not None:  # the device's own model on its own held-out samples
            personal_acc, _ = evaluate(self.model, personal_set, batch_size=cfg.validation_args.eval_batch_size,
                                       device=device, bf16=cfg.device_args.bf16)
        clock["eval_seconds"] = time.perf_counter() - t0
        t0, c0 = time.perf_counter(), time.thread_time()
        scores = self._layer_scores(data, generator, device) if download.rescore else None
        clock["scoring_seconds"] += time.perf_counter() - t0
        clock["scoring_cpu_seconds"] += time.thread_time() - c0
        stats = {"train_loss": loss, "device_accuracy": device_acc, "personal_accuracy": personal_acc,
                 "curriculum_share": n_use / n_total,
                 "local_steps": len(batches), "samples_seen": sum(len(b) for b in batches),
                 "updated_neuron_share": updated_share,
                 "replayed_blocks": 0 if prefix is None else prefix.first_trained, **clock}
        # Second reading: only the rows the sparse update selected can differ from the download, so only they
        # travel (a module trained densely, without a score yet, travels whole).
        tensors, rows = select_rows(to_wire({k: after[k] for k in shared}, cfg.comm_args.payload_dtype),
                                    {k: m for k, m in row_masks.items() if k in download.tensors})
        return Upload(device_id, n_use, tensors, layer_scores=scores, stats=stats, rows=rows)

    def _train_steps(self, round_idx: int, data: EncodedSet, batches, sparse_keys: list[str], state: dict,
                     device, still: list[str] = (), prefix: Optional[FrozenPrefixCache] = None,
                     ) -> tuple[float, dict, Optional[float], dict]:
        """Local steps: `sparse_keys` sparse (top neurons by momentum score), `still` frozen, the rest dense;
        returns (loss, squared grads of the sparse tensors, share of their neurons updated, the row masks of
        the tensors trained sparsely)."""
        cfg, fb, tr = self.cfg, self.cfg.fibec_args, self.cfg.train_args
        params = dict(self.model.named_parameters())
        frozen = [params[k] for k in [*self.method.frozen_keys(self.keys), *still] if params[k].requires_grad]
        for p in frozen:
            p.requires_grad_(False)
        local_params = {k: params[k] for k in sparse_keys if params[k].requires_grad}
        sq_grads: dict[str, torch.Tensor] = {}
        hooks = alg.squared_grad_hooks(sq_grads, local_params)
        sparse, updated_share = None, (1.0 if sparse_keys else None)
        scored = {k: v.to(local_params[k].device) for k, v in state.get("momentum", {}).items() if k in local_params}
        if self.method.fibec and scored and fb.rho < 1:
            # Modules without a score yet (first participation, or new to the local part) train densely.
            masks = alg.select_top_neurons(scored, fb.rho, per_module=fb.neuron_ranking == "per_module")
            sparse = alg.SparseUpdate({k: local_params[k] for k in masks}, masks)
            selected = sum(int(m.sum()) for m in masks.values()) + sum(
                local_params[k].shape[0] for k in local_params if k not in masks)
            updated_share = selected / sum(p.shape[0] for p in local_params.values())
        try:
            scale = round_lr_scale(round_idx, tr.comm_round, tr.lr_schedule, tr.min_lr_ratio)
            head_lr = None if tr.head_learning_rate is None else tr.head_learning_rate * scale
            optimizer = make_optimizer(self.model, tr.client_optimizer, tr.learning_rate * scale, tr.weight_decay,
                                       head_lr=head_lr, head_names=self.head_names)
            loss = train_steps(self.model, data, batches, optimizer, device=device, max_grad_norm=tr.max_grad_norm,
                               bf16=cfg.device_args.bf16, after_step=None if sparse is None else sparse.after_step,
                               prefix=prefix)
        finally:
            for h in hooks:
                h.remove()
            for p in frozen:
                p.requires_grad_(True)
            if sparse is not None:
                sparse.close()
        return loss, sq_grads, updated_share, ({} if sparse is None else {k: m.cpu() for k, m in masks.items()})

    def _prefix_cache(self, state: dict, still: list[str], n: int) -> Optional[FrozenPrefixCache]:
        """The device's frozen-prefix cache when the blocks below the lowest trained one are all frozen.

        None when block 0 trains, or when a trained tensor outside the blocks is not the head (e.g.
        trained embeddings): then there is no frozen prefix whose output could be reused.
        """
        untrained = {*self.method.frozen_keys(self.keys), *still}
        trained = [k for k in self.keys if k not in untrained]
        heads = set(self.head_names)
        if any(block_index(k) is None and k not in heads for k in trained):
            return None
        first_trained = min((block_index(k) for k in trained if block_index(k) is not None), default=0)
        if first_trained < 1:
            return None
        params = dict(self.model.named_parameters())
        inside = {k: params[k].detach() for k in self.keys if (block_index(k) is not None
                                                                and block_index(k) < first_trained)}
        return FrozenPrefixCache.from_state(state, first_trained, prefix_fingerprint(inside), n)

    def _difficulty_order(self, data: EncodedSet, state: dict, device,
                          prefix: Optional[FrozenPrefixCache] = None) -> torch.Tensor:
        """Easy-to-hard order of the device's samples, scored with the current model when due.

        The scoring pass runs the whole model in eval mode on the training inputs (segment ids
        included), so it also fills `prefix` on the way.
        """
        fb = self.cfg.fibec_args
        seen = state.get("participations", 0)
        due = "difficulty" not in state or (fb.refresh_every > 0 and seen > 0 and seen % fb.refresh_every == 0)
        if due:
            watch = (capture_prefix_output(self.model, prefix.first_trained) if prefix is not None
                     else contextlib.nullcontext())
            scores = torch.empty(len(data))
            with watch as seen_out:
                for rows in length_sorted_batches(data.attention_mask, fb.scoring_batch_size):
                    inputs = model_inputs(data, rows, device)
                    scores[rows] = alg.score_dataset(
                        self.model, inputs["input_ids"], inputs["attention_mask"], data.labels[rows].to(device),
                        batch_size=len(rows), wrt=fb.wrt, fisher=fb.fisher, normalize=fb.normalize,
                        token_type_ids=inputs.get("token_type_ids")).cpu()
                    if prefix is not None:
                        prefix.store(rows, seen_out["hidden"], inputs["attention_mask"], seen_out["tuple"])
            state["difficulty"] = scores
        return alg.easiest_first(state["difficulty"], data.labels if fb.stratify_by_label else None)

    def _layer_scores(self, data: EncodedSet, generator: torch.Generator, device) -> torch.Tensor:
        """Sensitivity of every block, on a sample of the device's data."""
        fb = self.cfg.fibec_args
        n = min(len(data), fb.layer_score_samples)
        idx = torch.randperm(len(data), generator=generator)[:n]
        ids, mask, y = data.input_ids[idx].to(device), data.attention_mask[idx].to(device), data.labels[idx].to(device)
        segments = None if data.token_type_ids is None else data.token_type_ids[idx].to(device)
        if fb.layer_score == "perturbation":
            noise = torch.Generator(device=device)
            noise.manual_seed(int(torch.randint(0, 2**62, (1,), generator=generator)))
            return alg.perturbation_layer_scores(self.model, ids, mask, blocks=transformer_blocks(self.model),
                                                 sigma=fb.sigma, generator=noise, token_type_ids=segments).cpu()
        return alg.grad_sensitivity_layer_scores(self.model, ids, mask, y, block_of=block_index,
                                                 num_blocks=num_blocks(self.model), token_type_ids=segments).cpu()

