#!/usr/bin/env python
"""FedML's GRPC ipconfig CSV from a host list: `python run_scripts/make_ipconfig.py hosts.txt > ipconfig.csv`.

hosts.txt has one line per process, the server (rank 0) first, then silo 1, 2, ...:
`HOST[:PORT] [bind=ADDR]` (port default: --base-port + rank; `bind=` when the host must listen on
another address than the one the others dial, e.g. behind NAT). `--local N` writes the file for a
server and N silos on this machine (127.0.0.1) instead. See docs/DEPLOYMENT.md.
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from fedml_fibec.errors import ConfigError  # noqa: E402
from fedml_fibec.engines.cross_silo.ipconfig import BASE_PORT, loopback, parse_hosts, to_csv  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("hosts", nargs="?", help="host list file ('-' = stdin)")
    p.add_argument("--local", type=int, metavar="N", help="server and N silos on 127.0.0.1")
    p.add_argument("--base-port", type=int, default=BASE_PORT, help=f"port of rank 0; rank r uses base+r "
                   f"unless its line names a port (default {BASE_PORT})")
    ns = p.parse_args()
    try:
        if ns.local is not None:
            if ns.local < 1:
                raise ConfigError("--local N needs N >= 1 silos")
            endpoints = loopback(ns.local, ns.base_port)
        elif ns.hosts:
            text = sys.stdin.read() if ns.hosts == "-" else Path(ns.hosts).read_text()
            endpoints = parse_hosts(text.splitlines(), ns.base_port, source=ns.hosts)
        else:
            p.error("give a host list file or --local N")
    except (ConfigError, OSError) as exc:
        print(f"make_ipconfig: {exc}", file=sys.stderr)
        return 2
    sys.stdout.write(to_csv(endpoints))
    print(f"# {len(endpoints) - 1} silos: set client_num_in_total = client_num_per_round = {len(endpoints) - 1}",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
