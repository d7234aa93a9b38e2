#!/usr/bin/env bash
# Cross-silo try-out on this machine over GRPC: a server and N silos as separate processes on
# 127.0.0.1 (the same processes that run one per host across machines; docs/DEPLOYMENT.md).
#   bash run_scripts/cross_silo_local.sh [N] [--cf FILE] [--set KEY=VALUE ...] [--out DIR]
# N defaults to 10 (config/cross_silo.yaml). The server writes DIR (metrics.jsonl, summary.json,
# checkpoint.pt); silo r writes DIR/silo<r> (its log and its own device state). Ports: free ones
# from BASE_PORT (default 8890) up. Exit code: the server's (0 = all rounds done).
set -uo pipefail
cd "$(dirname "$0")/.."
N=10
if [[ $# -gt 0 && $1 =~ ^[0-9]+$ ]]; then N=$1; shift; fi
CF=config/cross_silo.yaml
OUT="results/$(date +%Y%m%d-%H%M%S)-cross-silo"
ARGS=()
while [[ $# -gt 0 ]]; do
  case $1 in
    --cf) CF=$2; shift 2 ;;
    --out) OUT=$2; shift 2 ;;
    *) ARGS+=("$1"); shift ;;
  esac
done
PY=${PYTHON:-python3}
mkdir -p "$OUT"
# N+1 free ports on 127.0.0.1, written as FedML's ipconfig CSV.
BASE=$($PY - "${BASE_PORT:-8890}" "$N" <<'PYEOF'
import socket, sys
base, n = int(sys.argv[1]), int(sys.argv[2])
def free(p):
    s = socket.socket()
    try:
        s.bind(("127.0.0.1", p)); return True
    except OSError:
        return False
    finally:
        s.close()
while not all(free(base + r) for r in range(n + 1)):
    base += n + 1
print(base)
PYEOF
)
$PY run_scripts/make_ipconfig.py --local "$N" --base-port "$BASE" > "$OUT/ipconfig.csv" || exit 2
# Mutual TLS, as across hosts: a CA and one certificate per rank (an explicit --set insecure=true
# after the other arguments turns it off, for a plaintext try).
$PY run_scripts/make_certs.py --local "$N" --out "$OUT/certs" 2>/dev/null || exit 2
MIN=$(( (N * 6 + 9) / 10 ))  # go on while 60% of the silos answer (override with --set min_silos_per_round=K)
COMMON=(--cf "$CF" --set "grpc_ipconfig_path=$OUT/ipconfig.csv" --set "tls_ca_cert=$OUT/certs/ca.crt"
        --set "tls_cert=$OUT/certs/rank{rank}.crt" --set "tls_key=$OUT/certs/rank{rank}.key"
        --set "client_num_in_total=$N"
        --set "client_num_per_round=$N" --set "min_silos_per_round=$MIN" "${ARGS[@]}")
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill -TERM "$p" 2>/dev/null; done; }
trap 'cleanup; exit 130' INT TERM
echo "cross-silo on 127.0.0.1 (mutual TLS, certificates in $OUT/certs): server :$BASE, silos :$((BASE + 1))-:$((BASE + N)); results in $OUT"
$PY run_scripts/run_fibec.py "${COMMON[@]}" --rank 0 --out "$OUT" &
SERVER=$!
PIDS+=("$SERVER")
for r in $(seq 1 "$N"); do
  mkdir -p "$OUT/silo$r"
  $PY run_scripts/run_fibec.py "${COMMON[@]}" --rank "$r" --out "$OUT/silo$r" > "$OUT/silo$r/console.log" 2>&1 &
  PIDS+=("$!")
done
wait "$SERVER"
RC=$?
# Silos end on the server's last message; give them a moment, then make sure none is left.
for p in "${PIDS[@]:1}"; do
  for _ in $(seq 1 50); do kill -0 "$p" 2>/dev/null || break; sleep 0.2; done
done
cleanup
[[ $RC -ne 0 ]] && echo "server exited with code $RC; silo logs: $OUT/silo*/console.log, $OUT/silo*/logs/" >&2
exit $RC
