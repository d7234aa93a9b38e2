"""The paper's ten tasks by name: each builds from a saved copy with its registry columns; offline errors."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fedml_fibec.config import load_config
from fedml_fibec.config.schema import PAPER_TASK_NAMES
from fedml_fibec.data import load_source
from fedml_fibec.data.tasks import PAPER_TASKS
from fedml_fibec.errors import ConfigError, DataError


def _save_copy(task, root) -> str:
    """A small DatasetDict laid out like the hub's: the task's columns, splits and label type."""
    import datasets

    n_classes = task.num_classes

    def split(n: int, offset: int):
        rows = {task.text_column: [f"{task.name} text {offset + i}" for i in range(n)]}
        if task.text_pair_column:
            rows[task.text_pair_column] = [f"pair {offset + i}" for i in range(n)]
        if task.label_column == "answer":  # BoolQ's label is a bool
            rows["answer"] = [bool(i % 2) for i in range(n)]
            features = None
        else:
            rows[task.label_column] = [i % n_classes for i in range(n)]
            features = datasets.Features({**{k: datasets.Value("string") for k in rows if k != task.label_column},
                                          task.label_column: datasets.ClassLabel(num_classes=n_classes)})
        return datasets.Dataset.from_dict(rows, features=features)
    dsd = datasets.DatasetDict({task.train_split: split(24, 0), task.test_split: split(12, 100)})
    path = root / task.name
    dsd.save_to_disk(str(path))
    return str(path)


def test_registry_names_are_the_config_names():
    assert tuple(PAPER_TASKS) == PAPER_TASK_NAMES
    assert len(PAPER_TASKS) == 10


@pytest.mark.parametrize("name", PAPER_TASK_NAMES)
def test_each_task_builds_from_its_saved_copy(tmp_path, name):
    task = PAPER_TASKS[name]
    copy = _save_copy(task, tmp_path)
    cfg = load_config(None, [f"dataset={name}", f"task_copy={copy}"])  # data_source stays builtin
    d = cfg.data_args
    train, test = load_source(source=d.data_source, dataset=d.dataset, task_copy=d.task_copy,
                              text_column=d.text_column, label_column=d.label_column)
    assert (len(train), len(test)) == (24, 12)
    assert train.num_classes == task.num_classes and sorted(set(train.labels)) == list(range(task.num_classes))
    assert train.texts[0] == f"{name} text 0" and test.texts[0] == f"{name} text 100"
    assert (train.texts_pair is not None) == (task.text_pair_column is not None)
    if task.text_pair_column:
        assert train.texts_pair[3] == "pair 3"


def test_offline_error_names_the_hub_id_and_the_way_out(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(DataError) as err:
        load_source(source="builtin", dataset="rte")
    msg = str(err.value)
    assert "'nyu-mll/glue', config 'rte'" in msg and "save_to_disk('rte')" in msg and "task_copy" in msg


# Runs run_fibec.py in this interpreter after refusing and recording every name lookup and connection that
# leaves the machine (a DNS query counts: the hub is asked before a connection fails).
NETWORK_PROBE = """
import json, runpy, socket, sys
report, script, *args = sys.argv[1:]
LOCAL = ("localhost", "127.0.0.1", "::1", None)
def refuse(kind, host):
    with open(report, "a") as fh:
        fh.write(json.dumps({"kind": kind, "host": str(host)}) + "\\n")
    raise OSError(f"network probe: {kind} {host} refused")
real_lookup, real_connect = socket.getaddrinfo, socket.socket.connect
def lookup(host, *a, **k):
    return real_lookup(host, *a, **k) if host in LOCAL else refuse("lookup", host)
def connect(sock, address):
    local = not isinstance(address, tuple) or address[0] in LOCAL
    return real_connect(sock, address) if local else refuse("connect", address[0])
socket.getaddrinfo, socket.socket.connect = lookup, connect
sys.argv = [script, *args]
runpy.run_path(script, run_name="__main__")
"""


def test_a_run_of_a_hub_task_asks_no_network_before_its_offline_error(tmp_path):
    """With none of the offline variables set by the user, `--set dataset=rte` fails with the clear error and
    no name lookup or connection: runs are offline unless told otherwise, from their first step."""
    root = Path(__file__).resolve().parent.parent
    report = tmp_path / "network.jsonl"
    env = {k: v for k, v in os.environ.items()
           if k not in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env["HF_HOME"] = str(tmp_path / "hf")  # an empty hub cache: nothing to find locally
    env["PYTHONPATH"] = str(root)
    proc = subprocess.run([sys.executable, "-c", NETWORK_PROBE, str(report), str(root / "run_scripts" / "run_fibec.py"),
                           "--out", str(tmp_path / "run"), "--set", "dataset=rte"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    asked = [json.loads(line) for line in report.read_text().splitlines()] if report.exists() else []
    assert asked == [], f"the run asked the network: {asked[:3]}"
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "dataset=rte needs the Hugging Face Hub dataset 'nyu-mll/glue', config 'rte'" in proc.stderr
    assert not (tmp_path / "run").exists()  # the error came before any work


def test_task_copy_checks(tmp_path):
    with pytest.raises(ConfigError, match="task_copy = .*expected an existing folder"):
        load_config(None, ["dataset=rte", f"task_copy={tmp_path / 'none'}"])
    with pytest.raises(ConfigError, match="expected null unless dataset names one of the paper's tasks"):
        load_config(None, ["data_source=hub", "dataset=some/thing", f"task_copy={tmp_path}"])
    with pytest.raises(ConfigError, match="one of the paper's tasks"):
        load_config(None, ["dataset=imdb"])
    wrong = tmp_path / "wrong"
    import datasets
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"x": ["a", "b"], "y": [0, 1]})}).save_to_disk(str(wrong))
    with pytest.raises(DataError, match="task_copy=.*does not hold the task"):
        load_source(source="builtin", dataset="cola", task_copy=str(wrong))
