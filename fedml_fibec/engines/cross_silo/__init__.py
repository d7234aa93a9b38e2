"""Our engine: FedML's cross-silo server and client managers (MPI or GRPC) driving the device round
and the server round of core/ through a thin FedML ClientTrainer and ServerAggregator."""
