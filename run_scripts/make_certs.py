#!/usr/bin/env python
"""Certificates for a TLS federation: `python run_scripts/make_certs.py hosts.txt --out certs`.

Reads the same host list as make_ipconfig.py (one line per process, the server first) and writes
into --out: ca.crt (every host trusts it), ca.key (the CA's key: keep it on this machine, offline,
never copy it to a host), and for every rank R rankR.crt and rankR.key (copy these two and ca.crt
to host R only). Keys are 0600 and the folder 0700. Run it again with the same --out to rotate the
host certificates (the CA stays, so hosts keep trusting each other); --new-ca also replaces the CA
(then every host needs the new ca.crt). `--local N` makes them for a server and N silos on
127.0.0.1. See docs/DEPLOYMENT.md.
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from fedml_fibec.errors import ConfigError  # noqa: E402
from fedml_fibec.engines.cross_silo.certs import make_federation_certs  # noqa: E402
from fedml_fibec.engines.cross_silo.ipconfig import BASE_PORT, loopback, parse_hosts  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("hosts", nargs="?", help="host list file, as for make_ipconfig.py ('-' = stdin)")
    p.add_argument("--local", type=int, metavar="N", help="server and N silos on 127.0.0.1")
    p.add_argument("--out", required=True, help="folder for ca.crt, ca.key and rank<R>.crt/.key")
    p.add_argument("--days", type=int, default=365, help="validity of the host certificates (default 365)")
    p.add_argument("--new-ca", action="store_true", help="replace the CA in --out (default: reuse it)")
    ns = p.parse_args()
    try:
        if ns.days < 1:
            raise ConfigError(f"--days {ns.days}: expected at least 1")
        if ns.local is not None:
            if ns.local < 1:
                raise ConfigError("--local N needs N >= 1 silos")
            endpoints = loopback(ns.local, BASE_PORT)
        elif ns.hosts:
            text = sys.stdin.read() if ns.hosts == "-" else Path(ns.hosts).read_text()
            endpoints = parse_hosts(text.splitlines(), BASE_PORT, source=ns.hosts)
        else:
            p.error("give a host list file or --local N")
        written = make_federation_certs(endpoints, Path(ns.out), days=ns.days, new_ca=ns.new_ca)
    except (ConfigError, OSError, ValueError) as exc:
        print(f"make_certs: {exc}", file=sys.stderr)
        return 2
    print(f"make_certs: {len(written)} files in {ns.out} for ranks 0..{len(endpoints) - 1}; copy ca.crt, "
          "rank<R>.crt and rank<R>.key to host R (never ca.key)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
