"""Pytest setup: make tests/ importable so test modules can `import tiny`; keep HF libraries offline."""
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
# Tests must make no outbound connection; these are read when huggingface_hub/datasets are imported.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
