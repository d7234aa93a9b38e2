"""ClientTrainers for FedML's simulation-MPI algorithms: local LoRA training as on our path.

FedML's FedAVGTrainer / FedProxTrainer / FedOptTrainer call, per round: set_model_params(global)
-> train(device data) -> get_model_params(); FedNovaTrainer calls train(..., ratio=...) and wants
(loss, norm_grad, tau_eff) back. Parameters are the trainable tensors only (LoRA + head); the
frozen backbone never travels. Batches, dropout seeds, per-device RNG continuity and the device
evaluation subset come from core/seeds.py, as in our engine's device round, so FedML-FedAvg trains
exactly what our FedAvg-LoRA trains.
"""
from __future__ import annotations

import time
from collections import OrderedDict
from typing import Callable, Mapping, Optional

import torch
from fedml.core import ClientTrainer
from fedml.ml.trainer.fednova_trainer import FedNova, FedNovaModelTrainer

from ... import algorithm as alg
from ...config import RunConfig
from ...core.local import evaluate, make_optimizer, round_lr_scale, train_steps
from ...core.seeds import device_eval_subset, device_generator, sample_devices, seed_dropout
from ...core.state_store import DeviceStateStore
from ...data import DeviceData, EncodedSet
from ...models import head_parameter_names, load_trainable_state, trainable_state_dict


class BaselineUpload(OrderedDict):
    """Uploaded tensors (what FedML averages) plus the device's round statistics as an attribute.

    FedML's aggregators treat every key as a tensor to average, so the statistics (loss, device
    accuracy) ride along as an attribute: pickled with the dict, invisible to FedML's arithmetic.
    """

    def __init__(self, tensors: Mapping[str, torch.Tensor] = (), stats: Optional[dict] = None):
        super().__init__(tensors)
        self.stats = dict(stats or {})


def proximal_term(params: Mapping[str, torch.nn.Parameter], anchor: Mapping[str, torch.Tensor],
                  mu: float) -> Callable[[], torch.Tensor]:
    """FedProx's mu/2 * ||w - w_global||^2 over the trained tensors, as a train_steps extra_loss."""
    pairs = [(p, anchor[k].detach()) for k, p in params.items() if p.requires_grad]

    def loss() -> torch.Tensor:
        return (mu / 2) * sum(((p - g) ** 2).sum() for p, g in pairs)
    return loss


class BaselineClientTrainer(ClientTrainer):
    """FedAvg / FedProx / FedOpt local round over the LoRA + head tensors."""

    def __init__(self, model, args, cfg: RunConfig, store: DeviceStateStore, test_set: EncodedSet):
        super().__init__(model, args)
        self.cfg = cfg
        self.store = store
        n_eval = cfg.validation_args.device_eval_samples
        self.eval_set = device_eval_subset(test_set, n_eval, cfg.common_args.random_seed) if n_eval > 0 else None
        self.global_params: Optional[dict[str, torch.Tensor]] = None
        self.upload: Optional[BaselineUpload] = None
        self.head_names = head_parameter_names(model)

    # FedML hooks -------------------------------------------------------------------------------
    def get_model_params(self):
        return self.upload

    def set_model_params(self, model_parameters):
        # FedML's FedProx sends round 0 as lists and converts them back; every value is a tensor here.
        device = next(self.model.parameters()).device
        tensors = {k: torch.as_tensor(v).to(device, torch.float32) for k, v in model_parameters.items()}
        load_trainable_state(self.model, tensors)
        self.global_params = tensors

    def train(self, train_data: DeviceData, device, args):
        mu = self.cfg.train_args.fedprox_mu if self.cfg.train_args.federated_optimizer == "FedProx" else 0.0
        params = dict(self.model.named_parameters())
        # mu = 0 adds nothing at all, so FedProx(mu=0) is FedAvg bit for bit.
        extra = proximal_term({k: params[k] for k in self.global_params}, self.global_params, mu) if mu > 0 else None
        tr = self.cfg.train_args
        round_idx = int(args.round_idx)
        lr, head_lr = self.learning_rates(round_idx)
        stats = self.local_round(train_data, device, round_idx,
                                 lambda: make_optimizer(self.model, tr.client_optimizer, lr, tr.weight_decay,
                                                        head_lr=head_lr, head_names=self.head_names), extra)
        self.upload = BaselineUpload({k: v.cpu() for k, v in trainable_state_dict(self.model).items()}, stats)

    def test(self, test_data, device, args):
        return None

    # one round ------------------------------------------------------------------------------------
    def learning_rates(self, round_idx: int) -> tuple[float, Optional[float]]:
        """This round's local learning rate and head learning rate: our path's schedule."""
        tr = self.cfg.train_args
        scale = round_lr_scale(round_idx, tr.comm_round, tr.lr_schedule, tr.min_lr_ratio)
        return tr.learning_rate * scale, None if tr.head_learning_rate is None else tr.head_learning_rate * scale

    def local_round(self, train_data: DeviceData, device, round_idx: int,
                    make_opt: Callable[[], torch.optim.Optimizer],
                    extra_loss: Optional[Callable[[], torch.Tensor]] = None) -> dict:
        """Local steps on the device's batches (same draw as our path); returns the round's statistics."""
        cfg, tr = self.cfg, self.cfg.train_args
        seed = cfg.common_args.random_seed
        state = self.store.load(train_data.device_id)
        generator = device_generator(state, seed, train_data.device_id)
        seed_dropout(seed, train_data.device_id, round_idx)
        t0, c0 = time.perf_counter(), time.thread_time()
        batches = alg.local_batches(len(train_data), batch_size=tr.batch_size, generator=generator,
                                    num_steps=alg.local_step_count(len(train_data), batch_size=tr.batch_size,
                                                                   epochs=tr.epochs, max_steps=tr.local_steps))
        self.optimizer = make_opt()
        loss = train_steps(self.model, train_data.data, batches, self.optimizer, device=device,
                           max_grad_norm=tr.max_grad_norm, bf16=cfg.device_args.bf16, extra_loss=extra_loss)
        state["rng"] = generator.get_state()
        state["participations"] = state.get("participations", 0) + 1
        self.store.save(train_data.device_id, state)
        train_seconds, train_cpu_seconds = time.perf_counter() - t0, time.thread_time() - c0
        t0 = time.perf_counter()
        device_acc = personal_acc = None
        if self.eval_set is not None:
            device_acc, _ = evaluate(self.model, self.eval_set, batch_size=cfg.validation_args.eval_batch_size,
                                     device=device, bf16=cfg.device_args.bf16)
        if train_data.heldout is not None:  # the device's model on its own held-out samples
            personal_acc, _ = evaluate(self.model, train_data.heldout, batch_size=cfg.validation_args.eval_batch_size,
                                       device=device, bf16=cfg.device_args.bf16)
        return {"device_id": train_data.device_id, "train_loss": loss, "device_accuracy": device_acc,
                "personal_accuracy": personal_acc,
                "num_samples": len(train_data), "train_seconds": train_seconds, "train_cpu_seconds": train_cpu_seconds,
                "eval_seconds": time.perf_counter() - t0, "local_steps": len(batches),
                "samples_seen": sum(len(b) for b in batches)}


class FedNovaClientTrainer(BaselineClientTrainer, FedNovaModelTrainer):
    """FedNova: SGD local steps with FedML's FedNova optimizer; returns (loss, norm_grad, tau_eff).

    FedML's FedNovaTrainer passes ratio = n_i / (data of ALL devices), which shrinks the update by
    about (K/N)^2 when K of N devices take part; FedNova weights by the participants' share
    p_i = n_i / sum of the round's n_j, which this trainer computes from the shared round sampling.
    """

    def __init__(self, model, args, cfg: RunConfig, store: DeviceStateStore, test_set: EncodedSet,
                 sizes: Mapping[int, int]):
        super().__init__(model, args, cfg, store, test_set)
        self.sizes = dict(sizes)

    def participant_share(self, device_id: int, round_idx: int) -> float:
        """p_i of FedNova: this device's samples over those of the round's participants."""
        tr = self.cfg.train_args
        devices = sample_devices(self.cfg.common_args.random_seed, round_idx, tr.client_num_in_total,
                                 tr.client_num_per_round)
        return self.sizes[device_id] / sum(self.sizes[d] for d in devices)

    def train(self, train_data: DeviceData, device, args, **kwargs):
        tr = self.cfg.train_args
        round_idx = int(args.round_idx)
        ratio = self.participant_share(train_data.device_id, round_idx)
        init = {k: v.detach().clone() for k, v in trainable_state_dict(self.model).items()}

        lr, head_lr = self.learning_rates(round_idx)

        def make_opt():
            # The same parameter groups as make_optimizer (the head may have its own learning rate).
            groups = make_optimizer(self.model, "sgd", lr, tr.weight_decay, head_lr=head_lr,
                                    head_names=self.head_names).param_groups
            # Vanilla FedNova: plain SGD locally, no proximal term, no server momentum (gmf).
            return FedNova([{"params": g["params"], "lr": g["lr"]} for g in groups], ratio=ratio, gmf=0.0, mu=0.0,
                           lr=lr, momentum=0.0, weight_decay=tr.weight_decay)
        stats = self.local_round(train_data, device, round_idx, make_opt)
        cur = trainable_state_dict(self.model)
        # FedML's own formulas: norm_grad = p_i (w_init - w) / a_i, tau_eff = p_i a_i.
        norm_grad = self.get_local_norm_grad(self.optimizer, cur, init)
        tau_eff = self.get_local_tau_eff(self.optimizer)
        stats.update(tau_eff=float(tau_eff), participant_share=ratio)
        self.upload = BaselineUpload({k: v.cpu() for k, v in norm_grad.items()}, stats)
        return stats["train_loss"], self.upload, tau_eff
