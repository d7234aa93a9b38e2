"""The process layout run_main.sh asks for: FedML's where the machine allows it, fewer processes otherwise."""
import subprocess
import sys
from pathlib import Path

from fedml_fibec.config import load_config
from fedml_fibec.layout import RANK_MEMORY_BYTES, plan

ROOT = Path(__file__).resolve().parent.parent
GB = 1024**3


def test_big_machine_keeps_one_process_per_device_slot():
    workers, why = plan(load_config(), cores=16, memory=64 * GB)
    assert workers == 10 and "11 ranks" in why


def test_small_machine_gets_fewer_client_processes_limited_by_cores_and_memory():
    workers, why = plan(load_config(), cores=2, memory=24 * GB)
    assert workers == 2 and "NP=11" in why and "2 client process(es)" in why
    workers, _ = plan(load_config(), cores=16, memory=6 * RANK_MEMORY_BYTES)  # memory for 1 server + 5
    assert workers == 5
    assert plan(load_config(), cores=1, memory=1 * GB)[0] == 1  # never none


def test_forced_and_configured_layouts_win():
    assert plan(load_config(), cores=2, memory=24 * GB, np_forced=11)[0] == 10
    assert plan(load_config(None, ["worker_num=4"]), cores=2, memory=24 * GB)[0] == 4
    # FedML's simulation engine runs one process per device slot whatever the machine
    cfg = load_config(None, ["training_type=simulation", "federated_optimizer=FedAvg"])
    assert plan(cfg, cores=2, memory=24 * GB)[0] == 10


def test_cli_prints_np_and_workers_and_rejects_bad_config():
    ok = subprocess.run([sys.executable, "-m", "fedml_fibec.layout", "--np", "5", "--set", "comm_round=2",
                         "--out", "ignored"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0 and ok.stdout.split() == ["5", "4"] and "layout: NP=5" in ok.stderr
    bad = subprocess.run([sys.executable, "-m", "fedml_fibec.layout", "--set", "rho=3"], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and bad.stdout == "" and "fibec_args.rho" in bad.stderr
