"""Pytest setup: make tests/ importable so test modules can `import tiny`; keep HF libraries offline."""
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
# Tests must make no outbound connection; these are read when huggingface_hub/datasets are imported.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_assets(tmp_path_factory):
    """A tiny BERT model directory and a small labelled CSV, shared by the integration tests."""
    import pandas as pd
    from tiny import tiny_model_dir, tiny_texts

    root = tmp_path_factory.mktemp("tiny_assets")
    model_dir = tiny_model_dir(root / "tiny_bert", "bert")
    texts, labels = tiny_texts(400, seed=1)
    csv = root / "tiny.csv"
    pd.DataFrame({"text": texts, "label": labels}).to_csv(csv, index=False)
    return model_dir, csv


def pytest_configure(config):
    # `pytest -m cuda` selects the tests that need a CUDA device (tests/test_gpu_paths.py); they skip without one.
    config.addinivalue_line("markers", "cuda: needs a CUDA device (skipped without one); run with `pytest -m cuda`")
