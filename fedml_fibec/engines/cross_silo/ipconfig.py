"""FedML's GRPC address file (ipconfig CSV) made from a plain host list, and checked before a run.

FedML 0.9.6 reads `eid,rank,grpc_server_ip,grpc_server_port[,ingress_ip]`: every process listens on
the address of its own row and sends to the address of the receiver's row (ingress_ip, when set,
is the address others dial while grpc_server_ip is the one bound). A host list is simpler to write:

    # one line per process: rank 0 (the server) first, then silo 1, 2, ...
    10.0.0.1            # server, port 8890 (base port + rank)
    10.0.0.2:9000       # silo 1 on an explicit port
    silo2.example.org   # silo 2, port 8892
    203.0.113.7:8893 bind=0.0.0.0   # silo 3 behind NAT: others dial 203.0.113.7, it binds 0.0.0.0

No FedML import here: the launch scripts use it before anything heavy is loaded.
"""
from __future__ import annotations

import csv
import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional

from ...errors import ConfigError

HEADER = ["eid", "rank", "grpc_server_ip", "grpc_server_port"]
BASE_PORT = 8890  # FedML's CommunicationConstants.GRPC_BASE_PORT


@dataclass(frozen=True)
class Endpoint:
    """Where one rank listens (bind) and where the others reach it (address)."""

    rank: int
    address: str
    port: int
    bind: Optional[str] = None


def parse_hosts(lines: Iterable[str], base_port: int = BASE_PORT, source: str = "<hosts>") -> list[Endpoint]:
    """Endpoints from a host list: `HOST[:PORT] [bind=ADDR]` per line, rank 0 first; '#' starts a comment."""
    endpoints: list[Endpoint] = []
    for lineno, raw in enumerate(lines, 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        host, bind = parts[0], None
        for extra in parts[1:]:
            if not extra.startswith("bind="):
                raise ConfigError(f"{source}:{lineno}: unexpected {extra!r}; a line is HOST[:PORT] [bind=ADDR]")
            bind = extra[len("bind="):]
        rank = len(endpoints)
        port = base_port + rank
        if host.startswith("[") or host.count(":") > 1:
            raise ConfigError(f"{source}:{lineno}: {host!r}: IPv6 literals are not supported (FedML joins "
                              "address and port as ADDRESS:PORT); use an IPv4 address or a host name")
        if host.count(":") == 1:
            host, p = host.split(":")
            port = _port(p, source, lineno)
        if not host:
            raise ConfigError(f"{source}:{lineno}: empty host")
        endpoints.append(Endpoint(rank, host, port, bind))
    if len(endpoints) < 2:
        raise ConfigError(f"{source}: needs at least 2 lines (the server, then one line per silo), "
                          f"got {len(endpoints)}")
    seen: dict[tuple[str, int], int] = {}
    for e in endpoints:
        key = (e.address, e.port)
        if key in seen:
            raise ConfigError(f"{source}: ranks {seen[key]} and {e.rank} both use {e.address}:{e.port}; "
                              "give processes on the same host different ports (HOST:PORT)")
        seen[key] = e.rank
    return endpoints


def _port(text: str, source: str, lineno: int) -> int:
    try:
        port = int(text)
    except ValueError:
        raise ConfigError(f"{source}:{lineno}: port {text!r} is not a number") from None
    if not 1 <= port <= 65535:
        raise ConfigError(f"{source}:{lineno}: port {port} is out of range")
    return port


def to_csv(endpoints: list[Endpoint]) -> str:
    """FedML's ipconfig CSV for the endpoints (eid = rank)."""
    nat = any(e.bind for e in endpoints)
    out = io.StringIO()
    w = csv.writer(out, lineterminator="\n")
    w.writerow(HEADER + (["ingress_ip"] if nat else []))
    for e in endpoints:
        # With a bind address, FedML binds grpc_server_ip and the others dial ingress_ip.
        row = [e.rank, e.rank, e.bind or e.address, e.port]
        if nat:
            row.append(e.address if e.bind else "")
        w.writerow(row)
    return out.getvalue()


def loopback(num_silos: int, base_port: int = BASE_PORT) -> list[Endpoint]:
    """Server and silos on this machine (127.0.0.1), ports base_port + rank."""
    return [Endpoint(r, "127.0.0.1", base_port + r) for r in range(num_silos + 1)]


def read_ipconfig(path: str | os.PathLike, num_silos: Optional[int] = None) -> dict[int, Endpoint]:
    """Read and check an ipconfig CSV: FedML's header, ranks 0..N present once each."""
    p = Path(path)
    text = p.read_text()
    rows = list(csv.DictReader(io.StringIO(text)))
    header = text.splitlines()[0].split(",") if text.strip() else []
    if header[:4] != HEADER:
        raise ConfigError(f"{p}: the first line must be FedML's header {','.join(HEADER)} (got "
                          f"{','.join(header) or 'nothing'}); make the file with run_scripts/make_ipconfig.py")
    table: dict[int, Endpoint] = {}
    for i, row in enumerate(rows, 2):
        try:
            rank, port = int(row["rank"]), int(row["grpc_server_port"])
        except (TypeError, ValueError):
            raise ConfigError(f"{p}:{i}: rank and grpc_server_port must be integers") from None
        if rank in table:
            raise ConfigError(f"{p}:{i}: rank {rank} appears twice")
        ingress = (row.get("ingress_ip") or "").strip()
        addr = row["grpc_server_ip"].strip()
        table[rank] = Endpoint(rank, ingress or addr, port, addr if ingress else None)
    if num_silos is not None:
        missing = [r for r in range(num_silos + 1) if r not in table]
        if missing:
            raise ConfigError(f"{p}: no row for rank(s) {missing}; a run with {num_silos} silos needs ranks "
                              f"0 (server) to {num_silos}")
    return table
