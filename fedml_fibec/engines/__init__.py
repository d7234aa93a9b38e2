"""The two engines, side by side; each imports the shared core and the thin FedML layer, never the other.

- cross_silo/: our engine over FedML's cross-silo managers (MPI or GRPC): FibecFed and the LoRA-FL
  methods, whose device and server rounds live in core/.
- simulation/: FedML's simulation-MPI engine running FedML's built-in algorithms (FedAvg, FedProx,
  FedOpt, FedNova) on the same model, data, sampling and seeds: the baselines.
"""
