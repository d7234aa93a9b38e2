"""Every config key, once: its FedML-style section, type, default, help text and own check.

Why one declaration per key: the YAML loader, `--set`, validation and docs/CONFIG.md all read these
dataclasses, so a key is documented and checked the moment it exists. Sections mirror FedML's YAML
(common_args, data_args, ...) plus our fibec_args; keys are unique across sections so `--set KEY=V`
needs no section. Checks that relate several keys are in rules.py, not here.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields
from typing import Any, Optional

from ..methods import METHODS as _OUR_METHODS
from .fields import at_least, dir_or_name, in_interval, must_be, non_negative, nonempty_names, option, positive

BUILTIN_DATASETS = ("mr", "stackoverflow")
# The paper's ten tasks by name (fedml_fibec/data/tasks.py has where each lives; a test keeps the two equal).
PAPER_TASK_NAMES = ("boolq", "cola", "mpqa", "mr", "mrpc", "qnli", "rte", "sst-2", "subj", "trec")
BUILTIN_MODELS = ("minilm", "smollm2")
METHODS = tuple(_OUR_METHODS)  # our cross-silo engine; what each shares and freezes is in fedml_fibec/methods.py
# FedML's own algorithms on its simulation-MPI path (training_type: simulation), by FedML's names.
FEDML_METHODS = ("FedAvg", "FedProx", "FedOpt", "FedNova")
OPTIMIZER_CHOICES = METHODS + tuple(m for m in FEDML_METHODS if m not in METHODS)

OFFLINE = must_be(False, "false (runs are offline)")


@dataclass
class CommonArgs:
    training_type: str = option("cross_silo", "FedML engine. cross_silo: our trainer/aggregator hooks "
                                "(over MPI or GRPC); simulation: FedML's own simulation-MPI algorithms "
                                "(FedAvg, FedProx, FedOpt, FedNova) on our LoRA model (baselines).",
                                ("cross_silo", "simulation"))
    scenario: str = option("horizontal", "FedML cross-silo scenario.", ("horizontal",))
    random_seed: int = option(0, "Seed for the split, partition, client sampling, model init and batches.")
    using_mlops: bool = option(False, "FedML's cloud tracking. Must stay false: runs are offline.", check=OFFLINE)
    config_version: str = option("release", "FedML environment name (unused offline).")


@dataclass
class DataArgs:
    data_source: str = option("builtin", "Where the task comes from.", ("builtin", "files", "hub"))
    dataset: str = option("mr", "A task by name: mr or stackoverflow (20 classes; embedded offline copies with "
                          "data_source=builtin) or one of "
                          "the paper's tasks boolq, cola, mpqa, mr, mrpc, qnli, rte, sst-2, subj, trec (from the "
                          "hub, or from task_copy); with data_source=hub also any `datasets` hub id or local "
                          "dataset dir.")
    task_copy: Optional[str] = option(None, "A saved copy (DatasetDict.save_to_disk folder) of the named paper task, "
                                      "read instead of the hub, e.g. on a machine without hub access.")
    train_file: Optional[str] = option(None, "data_source=files: training file (.csv .tsv .json .jsonl .parquet).")
    test_file: Optional[str] = option(None, "data_source=files: test file; none = seeded stratified split.")
    text_column: str = option("text", "Column holding the text.")
    text_pair_column: Optional[str] = option(None, "Second text column for pair tasks (e.g. NLI).")
    label_column: str = option("label", "Column holding the label (strings or integers).")
    hub_config: Optional[str] = option(None, "data_source=hub: dataset configuration name.")
    test_fraction: float = option(0.1, "Share of the data held out as global test set when no test split exists.",
                                  check=in_interval("(0, 1)"))
    validation_fraction: float = option(0.0, "Share of the training data held out on the server as a validation "
                                        "set (seeded, stratified, taken before the devices' partition, so no "
                                        "device holds it). Settings are chosen on its accuracy, never on the "
                                        "test set's. 0 = none.", check=in_interval("[0, 1)"))
    max_train_samples: Optional[int] = option(None, "Stratified subsample of the training set (quick runs).",
                                              check=positive("a positive integer"))
    max_seq_length: int = option(64, "Tokens per sample (padding/truncation).", check=at_least(8))
    partition_method: str = option("dirichlet", "How training data is split over devices.", ("dirichlet", "iid"))
    partition_alpha: float = option(1.0, "Dirichlet concentration of the label skew (smaller = more skewed).",
                                    check=positive())
    min_samples_per_device: int = option(16, "Every device gets at least this many training samples.",
                                         check=at_least(1))
    data_cache_dir: Optional[str] = option(None, "Cache of the offline assets; default $FEDML_FIBEC_CACHE "
                                           "or ~/.cache/fedml_fibec.")


@dataclass
class ModelArgs:
    model: str = option("minilm", "Built-in model (minilm, smollm2), a local model directory or a hub id.",
                        check=dir_or_name(BUILTIN_MODELS, f"a built-in model {list(BUILTIN_MODELS)}, an existing "
                                          "model directory or a hub id"))
    lora_r: int = option(8, "LoRA rank.", check=at_least(1))
    lora_alpha: int = option(16, "LoRA scaling alpha.", check=at_least(1))
    lora_dropout: float = option(0.0, "LoRA dropout.", check=in_interval("[0, 1)"))
    lora_target_modules: Optional[list] = option(None, "Module names to adapt; none = chosen per architecture "
                                                 "(attention query/value projections).",
                                                 check=nonempty_names("module names"))


@dataclass
class TrainArgs:
    federated_optimizer: str = option("FibecFed", "FibecFed; FedAvg (plain federated LoRA); FFA-LoRA (A frozen, "
                                      "B shared); FedSA-LoRA (A shared, B kept on the device); with "
                                      "training_type=simulation FedML's FedAvg, FedProx, FedOpt or FedNova.",
                                      OPTIMIZER_CHOICES)
    client_num_in_total: int = option(100, "Number of devices the data is partitioned over.", check=at_least(1))
    client_num_per_round: int = option(10, "Devices sampled per round (= client processes unless worker_num "
                                       "is lower).", check=at_least(1))
    comm_round: int = option(20, "Training rounds.", check=at_least(1))
    epochs: Optional[float] = option(1.0, "FedML's epochs: local passes over the samples a device uses this round "
                                     "(FibecFed: its curriculum share), so local work follows that share; "
                                     "null = a fixed local_steps per round.", check=positive("null or a positive "
                                                                                             "number of passes"))
    local_steps: Optional[int] = option(None, "Local optimizer steps per device per round when epochs is null; with "
                                        "epochs, a cap on them (null = no cap).", check=at_least(1))
    batch_size: int = option(16, "Local minibatch size.", check=at_least(1))
    learning_rate: float = option(1e-2, "Local learning rate (the default: FibecFed's, chosen on validation; "
                                   "docs/results/study12_mr).", check=positive())
    lr_schedule: str = option("cosine", "Local learning rate across rounds: constant, or cosine decay from "
                              "learning_rate at round 0 to min_lr_ratio * learning_rate at the last round.",
                              ("constant", "cosine"))
    min_lr_ratio: float = option(0.1, "Final/initial learning rate ratio of the cosine schedule.",
                                 check=in_interval("(0, 1]"))
    head_learning_rate: Optional[float] = option(None, "Local learning rate of the classification head; "
                                                 "null = learning_rate.", check=positive())
    weight_decay: float = option(0.0, "Local AdamW weight decay.", check=non_negative())
    client_optimizer: str = option("adamw", "Local optimizer.", ("adamw", "sgd"))
    max_grad_norm: float = option(1.0, "Gradient clipping norm (0 = off).", check=non_negative())
    fedprox_mu: float = option(0.01, "FedProx: weight mu of the proximal term mu/2 ||w - w_global||^2 "
                               "(over the trainable LoRA + head tensors).", check=non_negative())
    server_optimizer: str = option("adam", "FedOpt: server optimizer on the averaged update (adam = FedAdam, "
                                   "sgd = FedAvgM with server_momentum).", ("adam", "sgd"))
    server_lr: float = option(0.01, "FedOpt: server learning rate (sgd with server_lr=1, momentum 0 = FedAvg).",
                              check=positive())
    server_momentum: float = option(0.9, "FedOpt: SGD momentum, or Adam's beta1.", check=in_interval("[0, 1)"))


@dataclass
class ValidationArgs:
    frequency_of_the_test: int = option(1, "Evaluate the global model every N rounds (and at the last).",
                                        check=at_least(1))
    eval_only_last: Optional[int] = option(None, "Evaluate the global model only at the last N of those rounds "
                                           "(null = at all of them). Tuning runs use 3: their score, the mean "
                                           "validation accuracy of the last three evaluated rounds, reads no other.",
                                           check=at_least(1, "null (every evaluation round) or at least 1"))
    eval_test_set: bool = option(True, "Evaluate the global model on the test set; false = on the validation set "
                                 "only (tuning runs: they choose on validation, so they never read the test set).")
    eval_batch_size: int = option(64, "Batch size for evaluation.", check=at_least(1))
    device_eval_samples: int = option(128, "Global-test samples each participating device evaluates its own "
                                      "model on (0 = skip device accuracy).", check=at_least(0, "0 or more"))
    personal_eval_fraction: float = option(0.0, "Share of each device's own data it holds out (seeded, never "
                                           "trained on) to score its own model after local training: the "
                                           "personalised accuracy (mean over the round's devices). 0 = off.",
                                           check=in_interval("[0, 1)"))


@dataclass
class DeviceArgs:
    using_gpu: bool = option(False, "Place each rank on a GPU from FedML's gpu mapping.")
    gpu_mapping_file: Optional[str] = option(None, "FedML gpu mapping YAML (using_gpu).")
    gpu_mapping_key: Optional[str] = option(None, "Key inside gpu_mapping_file.")
    worker_num: Optional[int] = option(None, "Client processes; none = client_num_per_round. Below it, each client "
                                       "process serves several of the round's devices in turn (cross_silo only).",
                                       check=at_least(1))
    torch_threads: int = option(0, "Torch threads per rank; 0 = CPU cores / ranks (at least 1).",
                                check=at_least(0, "0 (auto) or more"))
    bf16: bool = option(False, "bfloat16 autocast for local training on GPU.")
    flush_denormal: bool = option(False, "CPU: treat subnormal floats as zero (x86 FTZ/DAZ, "
                                  "torch.set_flush_denormal). Faster where training makes subnormal values "
                                  "(saturated outputs; a matrix product with them ran 163x slower, see "
                                  "docs/PERFORMANCE.md); results can differ in the last digits. No effect on GPU.")


@dataclass
class CommArgs:
    backend: str = option("MPI", "FedML communication backend.", ("MPI", "GRPC"))
    grpc_ipconfig_path: Optional[str] = option(None, "GRPC: FedML ipconfig CSV (eid,rank,grpc_server_ip,"
                                               "grpc_server_port).")
    payload_dtype: str = option("float32", "Dtype of tensors on the wire.", ("float32", "bfloat16", "float16"))
    round_timeout_s: Optional[float] = option(None, "GRPC: seconds the server waits for a round's uploads (and "
                                              "for silos at start-up and at the end) before going on with the "
                                              "silos that answered; null = wait forever (FedML's behaviour).",
                                              check=positive("null (wait forever) or a positive number of seconds"))
    min_silos_per_round: Optional[int] = option(None, "GRPC: fewest silos that must answer a timed-out round for "
                                                "it to count (the others are dropped until they come back); "
                                                "fewer stops the run with an error. null = all silos.",
                                                check=at_least(1, "null (all silos) or at least 1"))
    connect_timeout_s: float = option(120.0, "GRPC: seconds a process keeps retrying to reach a peer that is not "
                                      "(yet) listening, e.g. a silo started before the server.",
                                      check=positive("a positive number of seconds"))
    tls_ca_cert: Optional[str] = option(None, "GRPC: the federation CA's certificate (PEM) every process trusts "
                                        "(run_scripts/make_certs.py makes it). `{rank}` in this and the next two "
                                        "paths is replaced by the process's rank.")
    tls_cert: Optional[str] = option(None, "GRPC: this process's certificate (PEM), signed by the CA and naming its "
                                     "rank, e.g. certs/rank{rank}.crt.")
    tls_key: Optional[str] = option(None, "GRPC: this process's private key (PEM, mode 0600), e.g. "
                                    "certs/rank{rank}.key.")
    insecure: bool = option(False, "GRPC: plaintext without certificates: anyone who can reach a port can read, "
                            "forge and inject messages in any rank's name. For loopback tries only; false = mutual "
                            "TLS with tls_ca_cert, tls_cert and tls_key.")


@dataclass
class TrackingArgs:
    enable_wandb: bool = option(False, "Weights & Biases logging (must stay false offline).", check=OFFLINE)
    log_level: str = option("INFO", "Log level.", ("DEBUG", "INFO", "WARNING", "ERROR"))


@dataclass
class FibecArgs:
    wrt: str = option("logits", "Fisher difficulty with respect to input embeddings or LoRA tensors (one "
                      "backward pass), or the logits (closed form from one forward pass: the cheap score).",
                      ("embeddings", "lora", "logits"))
    normalize: str = option("none", "Divide a sample's Fisher trace by its token count.", ("none", "tokens"))
    fisher: str = option("empirical", "empirical: given label; true: expectation over the model's labels.",
                         ("empirical", "true"))
    g0: float = option(0.2, "Initial curriculum share of the easiest samples (1 = curriculum off).",
                       check=in_interval("(0, 1]"))
    T_c: Optional[float] = option(None, "Rounds until the whole data set is used; none = half the rounds.",
                                  check=non_negative("null or a non-negative number of rounds"))
    p: float = option(0.5, "Pacing exponent (1 = linear).", check=positive())
    min_samples: int = option(16, "Fewest samples a device trains on in a round.", check=at_least(1))
    stratify_by_label: bool = option(True, "Curriculum subsets keep the device's label shares (easiest first "
                                     "within each class); false = easiest overall.")
    refresh_every: int = option(0, "Recompute difficulty every N participations of a device (0 = never).",
                                check=at_least(0, "0 (never) or more"))
    scoring_batch_size: int = option(32, "Batch size of the difficulty scoring pass.", check=at_least(1))
    layer_score: str = option("perturbation", "Layer sensitivity score.", ("perturbation", "grad_sensitivity"))
    sigma: float = option(0.1, "Relative scale of the Gaussian embedding perturbation.", check=non_negative())
    layer_score_samples: int = option(64, "Local samples a device uses to score layer sensitivity.",
                                      check=at_least(1))
    gal_ratio: Optional[float] = option(0.5, "Share of blocks chosen as global aggregation layers (GAL).",
                                        check=in_interval("(0, 1]"))
    gal_mass: Optional[float] = option(None, "Instead of gal_ratio: smallest top set holding this share of "
                                       "the total layer score.", check=in_interval("(0, 1]"))
    gal_shape: str = option("suffix", "Which blocks form the GAL. scored: the top-scoring ones (the paper); "
                            "suffix: the last ones, as many as gal_ratio asks (or the shortest run of last "
                            "blocks holding gal_mass of the score), so that with sparse_target=gal the blocks "
                            "below are frozen and backward stops at the GAL.", ("scored", "suffix"))
    reselect_every: int = option(0, "Re-select the GAL every N rounds (0 = once).",
                                 check=at_least(0, "0 (once) or more"))
    gal_warmup_rounds: int = option(0, "Rounds trained with every block global before the GAL is chosen from the "
                                    "trained model's layer scores (sent with the last warm-up round's uploads); "
                                    "0 = choose it before any training, in a scoring exchange.",
                                    check=at_least(0, "0 (no warm-up) or more"))
    beta: float = option(0.9, "Momentum of the neuron scores.", check=in_interval("[0, 1)"))
    rho: float = option(0.5, "Share of the sparse-trained neurons (see sparse_target) updated in a device's "
                        "participation.", check=in_interval("(0, 1]"))
    sparse_target: str = option("gal", "Which LoRA tensors the sparse update trains. local: the device-local "
                                "(non-GAL) ones, the GAL's densely (our first reading); gal: the GAL's LoRA "
                                "sparsely and the non-GAL LoRA frozen, so nothing is trained that the global model "
                                "does not see (second reading; docs/ALGORITHM.md).", ("local", "gal"))
    neuron_ranking: str = option("per_module", "How neurons compete for the sparse update. global: jointly over all "
                                 "modules (an A row sums hidden-size squared gradients, a B row r of them, so this "
                                 "mostly ranks module types); per_module: the top rho of each module.",
                                 ("global", "per_module"))
    cache_frozen_prefix: bool = option(True, "When the blocks below the lowest trained one are frozen (gal_shape=suffix "
                                       "with sparse_target=gal), compute their output once per sample in eval mode "
                                       "(no dropout there) on the device, keep it in the device's state, and replay "
                                       "it instead of running those blocks in every step and participation.")
    state_dir: Optional[str] = option(None, "Per-device state store (shared by all ranks); "
                                      "none = <out>/device_state. A run that is not a --resume removes the "
                                      "device files an earlier run left there; a --resume keeps them.")


SECTIONS: dict[str, type] = {
    "common_args": CommonArgs,
    "data_args": DataArgs,
    "model_args": ModelArgs,
    "train_args": TrainArgs,
    "validation_args": ValidationArgs,
    "device_args": DeviceArgs,
    "comm_args": CommArgs,
    "tracking_args": TrackingArgs,
    "fibec_args": FibecArgs,
}


@dataclass
class RunConfig:
    common_args: CommonArgs = field(default_factory=CommonArgs)
    data_args: DataArgs = field(default_factory=DataArgs)
    model_args: ModelArgs = field(default_factory=ModelArgs)
    train_args: TrainArgs = field(default_factory=TrainArgs)
    validation_args: ValidationArgs = field(default_factory=ValidationArgs)
    device_args: DeviceArgs = field(default_factory=DeviceArgs)
    comm_args: CommArgs = field(default_factory=CommArgs)
    tracking_args: TrackingArgs = field(default_factory=TrackingArgs)
    fibec_args: FibecArgs = field(default_factory=FibecArgs)
    source: str = "<embedded default>"

    def to_sections(self) -> dict[str, dict[str, Any]]:
        """The config as FedML-style YAML sections."""
        return {name: dataclasses.asdict(getattr(self, name)) for name in SECTIONS}

    @property
    def curriculum_rounds(self) -> float:
        """T_c resolved: rounds until the whole local data set is used."""
        t_c = self.fibec_args.T_c
        return self.train_args.comm_round / 2 if t_c is None else t_c

    @property
    def worker_num(self) -> int:
        """Client processes."""
        return self.device_args.worker_num or self.train_args.client_num_per_round


def _key_index() -> dict[str, str]:
    index: dict[str, str] = {}
    for section, cls in SECTIONS.items():
        for f in fields(cls):
            assert f.name not in index, f"config key {f.name} declared twice"
            index[f.name] = section
    return index


KEY_SECTION = _key_index()
