"""Data pipeline: source (built-in, files, hub) -> split -> partition -> encode -> FedML dataset list."""
from fedml_fibec.data.encode import EncodedSet, encode, ensure_pad_token
from fedml_fibec.data.federated import (
    DeviceData,
    FederatedData,
    build_federated_data,
    load_source,
    to_fedml_dataset,
)
from fedml_fibec.data.partition import partition_indices
from fedml_fibec.data.sources import TextTable, load_builtin, load_files, load_hub
from fedml_fibec.data.split import stratified_split, stratified_subsample

__all__ = [
    "DeviceData", "EncodedSet", "FederatedData", "TextTable", "build_federated_data", "encode",
    "ensure_pad_token", "load_builtin", "load_files", "load_hub", "load_source", "partition_indices",
    "stratified_split", "stratified_subsample", "to_fedml_dataset",
]
