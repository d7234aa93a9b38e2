#!/usr/bin/env bash
# The main job: FibecFed on the embedded default (MiniLM-L6 on MR, 10 devices per round) over MPI.
# With the cores and memory for it: mpirun -np 11 (1 server + 10 clients, FedML's layout); on a
# smaller machine fewer client processes, each serving several devices per round (same results).
# NP=11 forces the 11-rank layout. Extra arguments go to run_fibec.py, e.g.
# `bash run_scripts/run_main.sh --set comm_round=2 --out results/try`.
set -euo pipefail
cd "$(dirname "$0")/.."
# Root is allowed (containers); more ranks than cores need oversubscription, and idle ranks
# should yield the CPU to the ones computing.
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
export OMPI_MCA_rmaps_base_oversubscribe=1 OMPI_MCA_mpi_yield_when_idle=1
read -r np workers < <(python3 -m fedml_fibec.layout ${NP:+--np "$NP"} "$@") || exit 2
[ -n "${np:-}" ] || exit 2
exec mpirun -np "$np" python3 run_scripts/run_fibec.py --set "worker_num=$workers" "$@"
