"""Which process this is: rank and size under mpirun (MpiWorld) or on its own with --rank (GrpcWorld),
and the checks that the process layout fits the config."""
from __future__ import annotations

import logging
import os
import sys
from typing import Optional

from .config import RunConfig
from .errors import ConfigError


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

    def barrier(self) -> None:
        if self.comm:
            self.comm.Barrier()

    def abort(self, code: int) -> None:
        if self.comm and self.size > 1:
            self.comm.Abort(code)
        sys.exit(code)


class GrpcWorld:
    """The MpiWorld interface for a process started on its own (GRPC): no collectives."""

    comm = None

    def __init__(self, rank: int, size: int):
        self.rank, self.size = rank, size

    def bcast(self, value):
        return value

    def barrier(self) -> None:
        pass

    def abort(self, code: int) -> None:
        # GRPC's server threads must not keep a failed process alive.
        logging.shutdown()
        os._exit(code)


def check_world(cfg: RunConfig, world_size: int) -> None:
    """The process count must be worker_num + 1 (one server and the client processes)."""
    expected = cfg.worker_num + 1
    if world_size == 1 and expected > 1:
        raise ConfigError(
            f"not launched by mpirun: this config (client_num_per_round = {cfg.train_args.client_num_per_round}) "
            f"runs as `mpirun -np {expected} python run_scripts/run_fibec.py ...`")
    if world_size != expected:
        raise ConfigError(
            f"{cfg.source}: train_args.client_num_per_round = {cfg.train_args.client_num_per_round} "
            f"(device_args.worker_num = {cfg.worker_num}) needs {expected} processes (1 server + {cfg.worker_num} "
            f"clients), but {world_size} were started: run `mpirun -np {expected} ...`, or set "
            f"worker_num={world_size - 1} so that each client process serves several devices per round")


def grpc_world(cfg: RunConfig, rank: Optional[int], world: MpiWorld) -> GrpcWorld:
    """Rank and size of a GRPC process, checked against the ipconfig."""
    from .engines.cross_silo.ipconfig import read_ipconfig

    n = cfg.train_args.client_num_per_round
    if world.size > 1:
        raise ConfigError("backend GRPC: start each process on its own with --rank R (not under mpirun); "
                          "see run_scripts/cross_silo_local.sh")
    if rank is None:
        raise ConfigError(f"backend GRPC: give this process's rank with --rank R (0 = server, 1..{n} = silos)")
    if not 0 <= rank <= n:
        raise ConfigError(f"--rank {rank}: expected 0 (server) to {n} (client_num_per_round = {n} silos)")
    read_ipconfig(cfg.comm_args.grpc_ipconfig_path, num_silos=n)
    c = cfg.comm_args
    if c.insecure:
        logging.getLogger("fedml_fibec").warning(
            "comm_args.insecure = true: plaintext GRPC without certificates. Anyone who can reach these ports "
            "can read every update and send messages in any rank's name. Use it on loopback only.")
    else:  # the files must be right before any work: CA-signed, valid now, naming this rank, key 0600
        from .engines.cross_silo.certs import load_identity

        load_identity(c.tls_ca_cert, c.tls_cert, c.tls_key, rank)
    return GrpcWorld(rank, n + 1)


def torch_threads(cfg: RunConfig, rank: int, procs_here: int) -> int:
    """Torch threads of this rank: the config's, or the host's cores shared by its processes."""
    if cfg.device_args.torch_threads:
        return cfg.device_args.torch_threads
    cores = os.cpu_count() or 1
    if rank == 0:
        # The server computes (evaluation) only while every client waits for the next message.
        return cores
    return max(1, cores // max(1, procs_here - 1))


def set_cpu_float_mode(cfg: RunConfig, threads: int) -> None:
    """This rank's CPU arithmetic: subnormal floats flushed to zero or not (device_args.flush_denormal), then
    its torch thread count. The flush mode is a per-thread CPU flag that threads copy from the thread that
    starts them, so it is set first, before the thread pool that set_num_threads and the first parallel
    operation start."""
    import torch

    on = cfg.device_args.flush_denormal
    if not torch.set_flush_denormal(on) and on:
        logging.getLogger("fedml_fibec").warning(
            "device_args.flush_denormal = true: this CPU cannot flush subnormal floats (no x86 DAZ); "
            "arithmetic stays IEEE")
    torch.set_num_threads(threads)
