"""One federated run over FedML's cross-silo engine: config -> data -> model -> server or client rank.

Under `mpirun -np K+1`, rank 0 is the server and ranks 1..K are client processes; each round the
server samples K of the `client_num_in_total` devices and each client process serves one of them.
With `backend: GRPC` (cross-silo across hosts) every process is started on its own with `--rank R`:
rank 0 is the server, silo r (1..N) holds device r-1 only (integration/cross_silo.py).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
import traceback
import uuid
from pathlib import Path
from typing import Optional, Sequence

from ..atomic import atomic_write_text
from ..config import RunConfig, dump_yaml, load_config
from ..errors import ConfigError, FibecError
from .offline import disable_fedml_cloud, guard_outbound_connections, set_offline_environment

log = logging.getLogger("fedml_fibec")


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Command line of run_fibec.py."""
    p = argparse.ArgumentParser(description="Run FibecFed (or FedAvg-LoRA) over FedML. Launch with "
                                "`mpirun -np <client_num_per_round + 1> python run_scripts/run_fibec.py`, or "
                                "with backend GRPC one process per host with --rank R (docs/DEPLOYMENT.md).")
    p.add_argument("--cf", help="YAML config (FedML sections + fibec_args); default: the embedded default")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key (flat `comm_round=2` or `train_args.comm_round=2`); repeatable")
    p.add_argument("--out", help="results folder (default: results/<time>-<method>)")
    p.add_argument("--rank", type=int, default=None,
                   help="backend GRPC: this process's rank (0 = server, 1..N = silos); under mpirun the MPI rank")
    p.add_argument("--resume", metavar="DIR",
                   help="continue the run in DIR (its results folder) from its last completed round; the "
                        "config is DIR/config.yaml (with --cf, that config must match it)")
    return p.parse_args(argv)


class MpiWorld:
    """Rank, size and collective helpers; a single process when not launched by mpirun."""

    def __init__(self):
        launched = any(v in os.environ for v in ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK"))
        self.comm = None
        if launched:
            from mpi4py import MPI

            self.comm = MPI.COMM_WORLD
        self.rank = self.comm.Get_rank() if self.comm else 0
        self.size = self.comm.Get_size() if self.comm else 1

    def bcast(self, value):
        return self.comm.bcast(value, root=0) if self.comm else value

    def all_ok(self, ok: bool) -> bool:
        """True when every rank says ok (a collective: every rank must call it)."""
        if self.comm is None:
            return ok
        return all(self.comm.allgather(ok))

    def barrier(self) -> None:
        if self.comm:
            self.comm.Barrier()

    def abort(self, code: int) -> None:
        if self.comm and self.size > 1:
            self.comm.Abort(code)
        sys.exit(code)


def _default_out_dir(cfg: RunConfig) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return Path("results") / f"{stamp}-{cfg.train_args.federated_optimizer.lower()}"


def _setup_logging(out_dir: Path, rank: int, level: str) -> None:
    logs = out_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    fmt = logging.Formatter(f"%(asctime)s [rank {rank}] %(levelname)s %(name)s: %(message)s", "%H:%M:%S")
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    file_handler = logging.FileHandler(logs / f"rank{rank}.log")
    file_handler.setFormatter(fmt)
    file_handler.setLevel(logging.INFO)
    console = logging.StreamHandler(sys.stdout)
    console.setFormatter(fmt)
    # The console shows our progress from the server and warnings from everyone; FedML's chatter
    # stays in the per-rank files.
    console.setLevel(logging.WARNING)
    root.addHandler(file_handler)
    root.addHandler(console)
    root.setLevel(logging.INFO)
    if rank == 0:
        ours = logging.StreamHandler(sys.stdout)
        ours.setFormatter(fmt)
        ours.setLevel(getattr(logging, level))
        ours.addFilter(lambda record: record.levelno < logging.WARNING)
        log.addHandler(ours)
    log.setLevel(getattr(logging, level))


def _torch_threads(cfg: RunConfig, rank: int, world_size: int) -> int:
    if cfg.device_args.torch_threads:
        return cfg.device_args.torch_threads
    cores = os.cpu_count() or 1
    if rank == 0:
        # The server computes (evaluation) only while every client waits for the next message.
        return cores
    return max(1, cores // max(1, world_size - 1))


def check_world(cfg: RunConfig, world_size: int) -> None:
    """The process count must be client_num_per_round + 1 (one server, one process per device slot)."""
    expected = cfg.worker_num + 1
    if world_size == 1 and expected > 1:
        raise ConfigError(
            f"not launched by mpirun: this config (client_num_per_round = {cfg.train_args.client_num_per_round}) "
            f"runs as `mpirun -np {expected} python run_scripts/run_fibec.py ...`")
    if world_size != expected:
        raise ConfigError(
            f"{cfg.source}: train_args.client_num_per_round = {cfg.train_args.client_num_per_round} needs "
            f"{expected} processes (1 server + {cfg.worker_num} clients), but {world_size} were started: "
            f"run `mpirun -np {expected} ...` or set client_num_per_round={world_size - 1}")


def run(cfg: RunConfig, tables, out_dir: Path, world: MpiWorld, resume: bool = False) -> Optional[dict]:
    """Run this rank's part of the federated job; the server returns the summary."""
    import torch

    rank = world.rank
    procs_here = world.size
    if cfg.comm_args.backend == "GRPC":  # processes of this run on this host share its cores
        from .ipconfig import read_ipconfig

        table = read_ipconfig(cfg.comm_args.grpc_ipconfig_path)
        procs_here = sum(1 for e in table.values() if e.address == table[rank].address)
    torch.set_num_threads(_torch_threads(cfg, rank, procs_here))
    cache_dir = Path(os.environ["FEDML_FIBEC_CACHE"])
    state_dir = Path(cfg.fibec_args.state_dir or out_dir / "device_state")

    # Rank 0 fetches/converts assets first; the others then find them cached.
    num_labels = len(tables[0].label_names)
    if rank == 0:
        model, tokenizer = build_model(cfg, num_labels, cache_dir)
    world.barrier()
    if rank != 0:
        model, tokenizer = build_model(cfg, num_labels, cache_dir)
    fed_data = build_data(cfg, tables, tokenizer)
    if rank == 0:
        log.info("data: %s", json.dumps({k: v for k, v in fed_data.stats().items()
                                         if not isinstance(v, list)}))

    from .state_store import DeviceStateStore

    store = DeviceStateStore(state_dir)
    grpc = cfg.comm_args.backend == "GRPC"
    if not grpc:  # under MPI every rank must see the one store; each GRPC silo has its own
        token = world.bcast(uuid.uuid4().hex if rank == 0 else None)
        if rank == 0:
            store.write_token(token)
        world.barrier()
        store.check_shared(token)
    if cfg.common_args.training_type == "simulation":  # FedML's own algorithms (baselines)
        from ..baselines.runner import run_simulation

        return run_simulation(cfg, out_dir, world, model, fed_data, store)

    import fedml
    from fedml.cross_silo.client.fedml_trainer_dist_adapter import TrainerDistAdapter

    from ..data import to_fedml_dataset
    from ..metrics import MetricsLog
    from .aggregator import FibecServerAggregator
    from . import checkpoint, grpc_transport, mpi_transport
    from .cross_silo import FibecClientManager, FibecServerManager, silo_dataset
    from .fedml_glue import RoundSampledAggregator, fedml_arguments
    from .trainer import FibecClientTrainer

    if grpc:
        grpc_transport.install()
    else:
        mpi_transport.install()
    dataset = to_fedml_dataset(fed_data)
    if grpc:  # a silo keeps only its own partition; the server keeps none (it needs the test set)
        dataset = silo_dataset(dataset, rank - 1 if rank else None)
        fed_data.train = [d for d in fed_data.train if rank and d.device_id == rank - 1]
    fedml_rounds = cfg.train_args.comm_round + (1 if _has_scoring_exchange(cfg) else 0)
    resumed = checkpoint.load(out_dir) if rank == 0 and resume else None
    done = resumed["exchanges_done"] if resumed else 0
    if resumed and done >= fedml_rounds:
        raise ConfigError(f"--resume {out_dir}: the run is already complete ({done} of {fedml_rounds} "
                          "exchanges); see its summary.json")
    if rank == 0 and resume and resumed is None:
        log.warning("--resume %s: no checkpoint yet (no exchange completed); starting from round 0", out_dir)
    # FedML runs the exchanges that remain (all of them on the clients: they stop on the server's word).
    args = fedml_arguments(cfg, rank, world.comm, fedml_rounds=fedml_rounds - done)
    fedml.init(args, check_env=False, should_init_logs=False)
    device = fedml.device.get_device(args)
    model.to(device)
    if rank != 0:
        trainer = FibecClientTrainer(model, args, cfg, store)
        adapter = TrainerDistAdapter(args, device, rank, model, dataset[0], dataset[4], dataset[5], dataset[6],
                                     trainer)
        FibecClientManager(args, adapter, world.comm, rank, cfg.worker_num, cfg.comm_args.backend, cfg=cfg,
                           store=store).run()
        return None
    metrics = MetricsLog(out_dir, cfg.train_args.federated_optimizer, cfg.train_args.comm_round)
    aggregator = FibecServerAggregator(model, args, cfg, fed_data.test, metrics, device)
    assert aggregator.fedml_rounds == fedml_rounds
    aggregator.set_id(0)
    if resumed:
        checkpoint.restore(resumed, aggregator=aggregator, metrics=metrics)
        log.info("resumed from %s: %d of %d exchanges done (round %d)", checkpoint.checkpoint_path(out_dir), done,
                 fedml_rounds, aggregator.round)
    server_side = RoundSampledAggregator(
        dataset[2], dataset[3], dataset[0], dataset[5], dataset[6], dataset[4], cfg.worker_num, device, args,
        aggregator, seed=cfg.common_args.random_seed, scoring_exchange=fedml_rounds > cfg.train_args.comm_round,
        first_round=resumed["sampler_next"] if resumed else 0)
    log.info("server on %s: %d rounds (%d FedML exchanges), %d devices, %d per round; results in %s",
             device, cfg.train_args.comm_round, fedml_rounds, cfg.train_args.client_num_in_total,
             cfg.train_args.client_num_per_round, out_dir)
    manager = FibecServerManager(args, server_side, world.comm, rank, cfg.worker_num, cfg.comm_args.backend,
                                 cfg=cfg, out_dir=out_dir, metrics=metrics, first_exchange=done)
    manager.run()
    if manager.failure is not None:
        raise manager.failure
    extra = {"gal": aggregator.gal, "out_dir": str(out_dir), "world_size": world.size}
    if grpc:
        extra.update(backend="GRPC", wire_bytes_sent=manager.com_manager.bytes_sent,
                     wire_bytes_received=manager.com_manager.bytes_received,
                     silos_active_at_end=manager.active)
    return metrics.write_summary(cfg.to_sections(), extra)


def _has_scoring_exchange(cfg: RunConfig) -> bool:
    fb = cfg.fibec_args
    return cfg.train_args.federated_optimizer == "FibecFed" and not (fb.gal_ratio is not None and fb.gal_ratio >= 1)


def build_model(cfg: RunConfig, num_labels: int, cache_dir: Optional[Path] = None):
    """The initial model with LoRA and its tokenizer, the same on every rank (seeded)."""
    import torch

    from ..models import apply_lora, load_model_and_tokenizer

    m = cfg.model_args
    # Every rank builds the same initial model (head and LoRA init) from the run seed.
    torch.manual_seed(cfg.common_args.random_seed)
    model, tokenizer = load_model_and_tokenizer(m.model, num_labels, cache_dir=cache_dir)
    model = apply_lora(model, r=m.lora_r, alpha=m.lora_alpha, dropout=m.lora_dropout,
                       target_modules=m.lora_target_modules)
    return model, tokenizer


def load_tables(cfg: RunConfig, cache_dir: Path):
    """The task's (train, test or None) tables: read before anything else so bad data fails first."""
    from ..data import load_source

    d = cfg.data_args
    return load_source(source=d.data_source, dataset=d.dataset, cache_dir=cache_dir, train_file=d.train_file,
                       test_file=d.test_file, text_column=d.text_column, label_column=d.label_column,
                       text_pair_column=d.text_pair_column, hub_config=d.hub_config)


def build_data(cfg: RunConfig, tables, tokenizer):
    """The config's federated data set from already loaded (train, test or None) tables."""
    from ..data import build_federated_data

    d, t = cfg.data_args, cfg.train_args
    return build_federated_data(
        source=d.data_source, dataset=d.dataset, tokenizer=tokenizer, max_length=d.max_seq_length,
        num_devices=t.client_num_in_total, partition_method=d.partition_method,
        partition_alpha=d.partition_alpha, min_samples_per_device=d.min_samples_per_device,
        test_fraction=d.test_fraction, seed=cfg.common_args.random_seed, max_train_samples=d.max_train_samples,
        tables=tables)


def plot_run(out_dir: Path, summary: dict) -> None:
    """The run's accuracy curves (against round, wall seconds and MB uploaded) as PNGs beside its metrics."""
    from ..metrics import read_jsonl
    from ..report.compare import RunResult
    from ..report.plots import plot_curves

    run = RunResult(method=summary["method"], seed=summary["config"]["common_args"]["random_seed"],
                    records=read_jsonl(out_dir / "metrics.jsonl"), summary=summary)
    plot_curves([run], out_dir)


def result_table(summary: dict) -> str:
    """A short Markdown table of the run's result."""
    def fmt(x, spec):
        return "-" if x is None else format(x, spec)
    return ("| method | rounds | final acc | best acc | device acc | MB up | MB down | wall s |\n"
            "|---|---|---|---|---|---|---|---|\n"
            f"| {summary['method']} | {summary['rounds']} | {fmt(summary['final_accuracy'], '.4f')} | "
            f"{fmt(summary['best_accuracy'], '.4f')} | {fmt(summary['final_device_accuracy'], '.4f')} | "
            f"{summary['total_bytes_up'] / 1e6:.2f} | {summary['total_bytes_down'] / 1e6:.2f} | "
            f"{summary['wall_seconds']:.0f} |\n")


def report_result(out_dir: Path, summary: dict) -> None:
    """Write summary.md and the accuracy plots beside the metrics, and print the table and the folder."""
    table = result_table(summary)
    atomic_write_text(out_dir / "summary.md", table)
    plot_run(out_dir, summary)
    print("\n" + table)
    print(f"results: {summary['out_dir']} (metrics.jsonl, summary.json, summary.md, accuracy_vs_*.png, logs/)")


def cfg_is_grpc(ns: argparse.Namespace) -> bool:
    """Whether this process was started on its own with --rank (GRPC), so it reports its own errors."""
    return ns.rank is not None


def _load_run_config(ns: argparse.Namespace) -> RunConfig:
    """The config: --cf/--set, or with --resume DIR that run's config.yaml (and --cf must match it)."""
    if not ns.resume:
        return load_config(ns.cf, ns.overrides)
    from .checkpoint import check_same_config

    saved_path = Path(ns.resume) / "config.yaml"
    if not saved_path.is_file():
        raise ConfigError(f"--resume {ns.resume}: no config.yaml there; give the results folder of the run "
                          "to continue")
    if ns.cf is None:
        return load_config(saved_path, ns.overrides)
    cfg = load_config(ns.cf, ns.overrides)
    import yaml

    check_same_config(cfg, yaml.safe_load(saved_path.read_text()), ns.resume)
    return cfg


def _grpc_world(cfg: RunConfig, rank: Optional[int], world: MpiWorld):
    """Rank and size of a GRPC process, checked against the ipconfig."""
    from .cross_silo import GrpcWorld
    from .ipconfig import read_ipconfig

    n = cfg.train_args.client_num_per_round
    if world.size > 1:
        raise ConfigError("backend GRPC: start each process on its own with --rank R (not under mpirun); "
                          "see run_scripts/cross_silo_local.sh")
    if rank is None:
        raise ConfigError(f"backend GRPC: give this process's rank with --rank R (0 = server, 1..{n} = silos)")
    if not 0 <= rank <= n:
        raise ConfigError(f"--rank {rank}: expected 0 (server) to {n} (client_num_per_round = {n} silos)")
    read_ipconfig(cfg.comm_args.grpc_ipconfig_path, num_silos=n)
    return GrpcWorld(rank, n + 1)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of run_fibec.py: validate everything, then run this rank."""
    ns = parse_args(argv)
    world = MpiWorld()
    from ..assets import default_cache_dir

    try:
        cfg = _load_run_config(ns)
        cache_dir = Path(cfg.data_args.data_cache_dir or default_cache_dir()).expanduser().resolve()
        tables = load_tables(cfg, cache_dir)
        if cfg.comm_args.backend == "GRPC":
            world = _grpc_world(cfg, ns.rank, world)
        else:
            check_world(cfg, world.size)
    except FibecError as exc:
        if world.rank == 0 or cfg_is_grpc(ns):
            print(f"{type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    out = ns.resume or ns.out
    mine = world.rank == 0 or world.comm is None  # under MPI rank 0 decides for all
    out_dir = Path(world.bcast(str(Path(out) if out else _default_out_dir(cfg)) if mine else None))
    out_dir = out_dir.resolve()
    if world.rank == 0 or world.comm is None:
        # Under GRPC every process writes its own copy (hosts do not share folders); atomic, so
        # processes sharing one folder on one machine do not tear it.
        out_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out_dir / "config.yaml", dump_yaml(cfg))
    world.barrier()
    # The asset cache was resolved before HOME is pointed at the run folder for FedML's own files.
    os.environ["FEDML_FIBEC_CACHE"] = str(cache_dir)
    set_offline_environment(out_dir / "fedml_home" / f"rank{world.rank}")
    guard_file = os.environ.get("FEDML_FIBEC_NETWORK_GUARD")
    if guard_file:
        guard_outbound_connections(Path(guard_file))
    _setup_logging(out_dir, world.rank, cfg.tracking_args.log_level)
    try:
        disable_fedml_cloud()
        summary = run(cfg, tables, out_dir, world, resume=bool(ns.resume))
    except FibecError as exc:
        from .cross_silo import SimulatedCrash

        code = 3 if isinstance(exc, SimulatedCrash) else 2
        log.error("%s", exc)
        print(f"error (rank {world.rank}): {exc}", file=sys.stderr)
        world.abort(code)
        return code
    except BaseException:
        log.error("rank %d failed:\n%s", world.rank, traceback.format_exc())
        print(f"rank {world.rank} failed; see {out_dir}/logs/rank{world.rank}.log", file=sys.stderr)
        traceback.print_exc()
        world.abort(1)
        return 1
    if summary is not None:
        report_result(out_dir, summary)
    return 0
