"""FedML's own algorithms (FedAvg, FedProx, FedOpt, FedNova) on our LoRA model and data.

They run on FedML's simulation-MPI code path (training_type: simulation); this package provides
what that path needs from us: a ClientTrainer over the trainable LoRA + head tensors, a
ServerAggregator that evaluates and writes the same metrics as our path, and the round sampling
every method shares. FedML itself is never edited. See docs/BASELINES.md.
"""
