"""One federated run: config -> data -> model -> engine, on this process's rank.

The entry point of run_scripts/run_fibec.py. It validates everything before any work, sets up the
pieces every method shares (offline switches, logging, model, data, the device state store), and
picks the engine: our cross-silo engine (FibecFed and the LoRA-FL methods, over MPI or GRPC) or
FedML's simulation engine (FedML's built-in algorithms, the baselines). The engines never import
each other.
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

from .atomic import atomic_write_text
from .build import build_data, build_model, load_tables
from .config import RunConfig, dump_yaml, load_config
from .errors import ConfigError, FibecError
from .logs import console_error, console_print, setup_logging
from .world import MpiWorld, check_world, grpc_world, set_cpu_float_mode, torch_threads

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


def run(cfg: RunConfig, tables, out_dir: Path, world, resume: bool = False) -> Optional[dict]:
    """Run this rank's part of the federated job; the server returns the summary."""
    from .core.state_store import DeviceStateStore

    rank, procs_here = world.rank, world.size
    if cfg.comm_args.backend == "GRPC":  # processes of this run on this host share its cores
        from .engines.cross_silo.ipconfig import read_ipconfig

        table = read_ipconfig(cfg.comm_args.grpc_ipconfig_path)
        procs_here = sum(1 for e in table.values() if e.address == table[rank].address)
    set_cpu_float_mode(cfg, torch_threads(cfg, rank, procs_here))
    cache_dir = Path(os.environ["FEDML_FIBEC_CACHE"])

    # Rank 0 fetches/converts assets first; the others then find them cached.
    num_labels = len(tables[0].label_names)
    if rank == 0:
        model, tokenizer = build_model(cfg, num_labels, cache_dir)
    world.barrier()
    if rank != 0:
        model, tokenizer = build_model(cfg, num_labels, cache_dir)
    fed_data = build_data(cfg, tables, tokenizer, cache_dir)
    if rank == 0:
        log.info("data: %s", json.dumps({k: v for k, v in fed_data.stats().items() if not isinstance(v, list)}))

    store = DeviceStateStore(Path(cfg.fibec_args.state_dir or out_dir / "device_state").resolve())
    # A run that is not a --resume starts every device from nothing. Device files left in the store by an
    # earlier run into the same folder (a stopped run started again) or the same state_dir would carry that
    # run's RNG streams, kept LoRA B (FedSA-LoRA) or curriculum state into this one, and change its results.
    # A --resume keeps them: the server's resumed run, and a GRPC silo restarted mid-run with --resume of its
    # own folder, continue from them (the cross-silo ledger rewinds a device caught in an unfinished exchange).
    shared = cfg.comm_args.backend != "GRPC"  # under MPI every rank sees the one store; each silo has its own
    if rank == 0 or not shared:
        if not resume:
            removed = store.clear()
            if removed:
                log.info("device state: removed %d device file(s) of an earlier run from %s", removed, store.root)
        else:
            log.info("device state: --resume keeps the %d device state file(s) in %s", store.count(), store.root)
    if shared:
        token = world.bcast(uuid.uuid4().hex if rank == 0 else None)
        if rank == 0:
            store.write_token(token)
        world.barrier()
        store.check_shared(token)
    if cfg.common_args.training_type == "simulation":  # FedML's own algorithms (baselines)
        from .engines.simulation.run import run_simulation

        return run_simulation(cfg, out_dir, world, model, fed_data, store)
    from .engines.cross_silo.run import run_cross_silo

    return run_cross_silo(cfg, out_dir, world, model, fed_data, store, resume=resume)


def load_run_config(ns: argparse.Namespace) -> RunConfig:
    """The config: --cf/--set, or with --resume DIR that run's config.yaml (and --cf must match it)."""
    if not ns.resume:
        return load_config(ns.cf, ns.overrides)
    from .engines.cross_silo.checkpoint import check_same_config

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


def _default_out_dir(cfg: RunConfig) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return Path("results") / f"{stamp}-{cfg.train_args.federated_optimizer.lower()}"


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of run_fibec.py: validate everything, then run this rank."""
    from .assets import default_cache_dir
    from .fedml_glue.offline import guard_outbound_connections, set_fedml_home, set_offline_switches

    ns = parse_args(argv)
    set_offline_switches()
    guard_file = os.environ.get("FEDML_FIBEC_NETWORK_GUARD")
    if guard_file:
        guard_outbound_connections(Path(guard_file))
    world = MpiWorld()
    standalone = ns.rank is not None  # started on its own (GRPC): reports its own errors
    try:
        cfg = load_run_config(ns)
        cache_dir = Path(cfg.data_args.data_cache_dir or default_cache_dir()).expanduser().resolve()
        tables = load_tables(cfg, cache_dir)
        if cfg.comm_args.backend == "GRPC":
            world = grpc_world(cfg, ns.rank, world)
        else:
            check_world(cfg, world.size)
    except FibecError as exc:
        if world.rank == 0 or standalone:
            print(f"{type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    out = ns.resume or ns.out
    decides = world.rank == 0 or world.comm is None  # under MPI rank 0 decides for all
    out_dir = Path(world.bcast(str(Path(out) if out else _default_out_dir(cfg)) if decides else None)).resolve()
    if decides:
        # Under GRPC every process writes its own copy (hosts do not share folders); atomic, so
        # processes sharing one folder on one machine do not tear it.
        out_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out_dir / "config.yaml", dump_yaml(cfg))
    world.barrier()
    # The asset cache was resolved before HOME is pointed at the run folder for FedML's own files.
    os.environ["FEDML_FIBEC_CACHE"] = str(cache_dir)
    set_fedml_home(out_dir / "fedml_home" / f"rank{world.rank}")
    setup_logging(out_dir, world.rank, cfg.tracking_args.log_level)
    log.info("%s", start_line(cfg, out_dir), extra={"console": True})
    try:
        from .fedml_glue.offline import disable_fedml_cloud

        disable_fedml_cloud()
        summary = run(cfg, tables, out_dir, world, resume=bool(ns.resume))
    except FibecError as exc:
        from .engines.cross_silo.faults import SimulatedCrash

        code = 3 if isinstance(exc, SimulatedCrash) else 2
        logging.getLogger().error("%s", exc)  # the file; the console gets the line below
        console_error(f"error (rank {world.rank}): {exc}")
        world.abort(code)
        return code
    except BaseException as exc:
        logging.getLogger().error("rank %d failed:\n%s", world.rank, traceback.format_exc())
        console_error(f"rank {world.rank} failed: {type(exc).__name__}: {exc}; the traceback is in "
                      f"{out_dir}/logs/rank{world.rank}.log")
        world.abort(1)
        return 1
    if summary is not None:
        from .report.run_report import report_result

        console_print(report_result(out_dir, summary))
    return 0


def start_line(cfg: RunConfig, out_dir: Path) -> str:
    """The console's first line: what runs, in which layout, and where its results go."""
    t, d = cfg.train_args, cfg.data_args
    engine = "FedML simulation" if cfg.common_args.training_type == "simulation" else cfg.comm_args.backend
    return (f"{t.federated_optimizer} on {d.dataset} with {cfg.model_args.model} ({engine}): {t.comm_round} rounds, "
            f"{t.client_num_in_total} devices, {t.client_num_per_round} per round over {cfg.worker_num} client "
            f"process(es); results and logs in {out_dir}")
