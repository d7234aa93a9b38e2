"""fedml-fibec: FibecFed (EMNLP 2024) federated LoRA fine-tuning as a FedML plugin."""
from setuptools import find_packages, setup

INSTALL_REQUIRES = [
    "fedml==0.9.6",
    # fedml imports pkg_resources at import time; setuptools 81 removed it.
    "setuptools<81",
    # fedml pulls torchvision unpinned; an unmatched pair fails to import
    # ("operator torchvision::nms does not exist"). 2.14.1/0.29.1 is a matching
    # pair that runs on CPU and CUDA alike.
    "torch==2.14.1",
    "torchvision==0.29.1",
    # wandb 0.13.2 (a fedml dependency) uses np.float_, removed in numpy 2.
    "numpy<2",
    # pandas 3 requires numpy 2.
    "pandas<3",
    # pyarrow 26 requires numpy 2; datasets needs pyarrow.
    "pyarrow<26",
    # Versions checked together with fedml 0.9.6 and numpy 1.26 (see shared FEDML_NOTES).
    "transformers>=5,<6",
    "peft>=0.21,<0.22",
    "datasets>=5,<6",
    "accelerate>=1.0",
    # Reads the SmolLM2 GGUF asset.
    "gguf>=0.10",
    "mpi4py>=3.1",
    # The GRPC backend (cross-silo across hosts): fedml 0.9.6 imports grpc for it but does not
    # install it.
    "grpcio>=1.50",
    # Our GRPC wire: tensors as safetensors (no pickle), mutual TLS certificates (make_certs.py).
    "safetensors>=0.4",
    "cryptography>=42",
    "matplotlib>=3.7",
    "tqdm>=4.60",
    "pyyaml>=6.0",
]

setup(
    name="fedml-fibec",
    version="0.1.0",
    description="FibecFed: Fisher information-based curriculum federated LoRA fine-tuning for FedML",
    packages=find_packages(include=["fedml_fibec", "fedml_fibec.*"]),
    python_requires=">=3.10",
    install_requires=INSTALL_REQUIRES,
    extras_require={"test": ["pytest>=7", "psutil>=5"]},
    license="Apache-2.0",
)
