"""The FedML-free core both engines share: the device round and the server round of our engine, the
typed messages between them, each method's record, local training steps, seeds, round records and
the per-device state store. Nothing here imports fedml."""
