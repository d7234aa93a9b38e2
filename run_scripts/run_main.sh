#!/usr/bin/env bash
# The main job: FibecFed on the embedded default (MiniLM-L6 on MR), 1 server + 10 clients over MPI.
# Extra arguments go to run_fibec.py, e.g. `bash run_scripts/run_main.sh --set comm_round=2 --out results/try`.
set -euo pipefail
cd "$(dirname "$0")/.."
# Root is allowed (containers); 11 ranks on fewer cores need oversubscription, and idle ranks
# should yield the CPU to the ones computing.
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
export OMPI_MCA_rmaps_base_oversubscribe=1 OMPI_MCA_mpi_yield_when_idle=1
NP=${NP:-11}
exec mpirun -np "$NP" python3 run_scripts/run_fibec.py "$@"
