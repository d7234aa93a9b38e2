"""Real runs through FedML over `mpirun -np 3` (1 server + 2 client processes), offline."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MPIRUN = shutil.which("mpirun")
pytestmark = pytest.mark.skipif(MPIRUN is None, reason="Open MPI is not installed")

MPI_ENV = {
    "OMPI_ALLOW_RUN_AS_ROOT": "1",
    "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
    "OMPI_MCA_rmaps_base_oversubscribe": "1",
    "OMPI_MCA_mpi_yield_when_idle": "1",
}


def mpirun(out: Path, tiny_assets, *overrides: str, np: int = 3, guard: Path | None = None, timeout: int = 300):
    model_dir, csv = tiny_assets
    env = {**os.environ, **MPI_ENV}
    cmd = [MPIRUN, "-np", str(np)]
    if guard is not None:
        env["FEDML_FIBEC_NETWORK_GUARD"] = str(guard)
        cmd += ["-x", "FEDML_FIBEC_NETWORK_GUARD"]
    cmd += [sys.executable, str(ROOT / "run_scripts" / "run_fibec.py"), "--out", str(out),
            "--set", f"model={model_dir}", "--set", "data_source=files", "--set", f"train_file={csv}",
            "--set", "client_num_in_total=6", "--set", "client_num_per_round=2", "--set", "min_samples_per_device=8",
            "--set", "min_samples=8", "--set", "local_steps=2", "--set", "batch_size=8",
            "--set", "device_eval_samples=16", "--set", "max_seq_length=16"]
    for o in overrides:
        cmd += ["--set", o]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_fedavg_two_rounds_offline(tmp_path, tiny_assets):
    guard = tmp_path / "outbound.jsonl"
    out = tmp_path / "fedavg"
    proc = mpirun(out, tiny_assets, "federated_optimizer=FedAvg", "comm_round=2", guard=guard)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = records(out)
    assert [r["round"] for r in rows] == [0, 1]
    for key in ("method", "wall_seconds", "train_loss", "global_accuracy", "device_accuracy", "bytes_up",
                "bytes_down", "curriculum_share", "gal", "updated_neuron_share", "server_eval_seconds"):
        assert key in rows[0], key
    # the server's evaluation is part of the round's wall time, timed on its own
    assert all(0 < r["server_eval_seconds"] < r["round_seconds"] for r in rows)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["method"] == "FedAvg" and summary["rounds"] == 2
    assert summary["total_bytes_up"] == sum(r["bytes_up"] for r in rows) > 0
    assert summary["config"]["train_args"]["comm_round"] == 2
    assert "| FedAvg | 2 |" in proc.stdout and str(out) in proc.stdout
    console_lines_are_only_ours(proc.stdout, rounds=2)
    # what the console no longer shows is in the per-rank files
    assert (out / "logs" / "rank1.out").exists() and "round 2/2" in (out / "logs" / "rank0.log").read_text()
    # No Python socket in any rank tried to leave this machine.
    assert not guard.exists() or guard.read_text() == ""
    # FedML's own files stayed inside the run folder.
    assert (out / "fedml_home").is_dir()
    assert (out / "accuracy_vs_round.png").stat().st_size > 1000
    assert "| FedAvg | 2 |" in (out / "summary.md").read_text()


def console_lines_are_only_ours(stdout: str, rounds: int) -> None:
    """A normal run's stdout: the start line, one progress line per round, the table and the folder."""
    lines = [line for line in stdout.splitlines() if line.strip()]
    assert "results and logs in" in lines[0], lines[:3]
    progress = lines[1:1 + rounds]
    assert [p.split("] ", 1)[1].split("  ")[0] for p in progress] == [f"round {r}/{rounds}" for r in
                                                                       range(1, rounds + 1)], lines
    assert all("ETA" in p for p in progress)
    rest = lines[1 + rounds:]
    assert all(line.startswith("|") for line in rest[:-1]) and len(rest) == 4, rest
    assert rest[-1].startswith("results: ")


def test_fewer_client_processes_serving_several_devices_give_identical_results(tmp_path, tiny_assets):
    """worker_num below client_num_per_round: -np 3 with 4 devices per round equals -np 5, to the last digit."""
    common = ("comm_round=3", "client_num_per_round=4", "gal_ratio=0.5", "rho=0.5", "torch_threads=1")
    five, three = tmp_path / "np5", tmp_path / "np3"
    proc = mpirun(five, tiny_assets, *common, np=5, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    proc = mpirun(three, tiny_assets, *common, "worker_num=2", np=3, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    a, b = records(five), records(three)
    keys = ("round", "global_accuracy", "global_loss", "device_accuracy", "train_loss", "bytes_up", "bytes_down",
            "devices", "gal", "curriculum_share", "updated_neuron_share", "num_devices")
    assert [{k: r[k] for k in keys} for r in a] == [{k: r[k] for k in keys} for r in b]
    assert all(r["num_devices"] == 4 for r in b)
    import torch

    ga = torch.load(five / "checkpoint.pt", weights_only=False)["aggregator"]["global_tensors"]
    gb = torch.load(three / "checkpoint.pt", weights_only=False)["aggregator"]["global_tensors"]
    assert ga.keys() == gb.keys() and all(torch.equal(ga[k], gb[k]) for k in ga)
    assert "over 2 client process(es)" in proc.stdout


def test_fibecfed_three_rounds_logs_gal_and_sends_less(tmp_path, tiny_assets):
    out_f, out_a = tmp_path / "fibec", tmp_path / "avg"
    proc = mpirun(out_f, tiny_assets, "comm_round=3", "gal_ratio=0.5")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    proc = mpirun(out_a, tiny_assets, "comm_round=3", "federated_optimizer=FedAvg")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    fib, avg = records(out_f), records(out_a)
    assert len(fib) == 3 and all(r["gal"] == fib[0]["gal"] and len(r["gal"]) == 1 for r in fib)
    assert all(len(r["gal"]) == 2 for r in avg)
    # Uploads after the first round carry only the GAL block and the head.
    assert all(f["bytes_up"] < 0.75 * a["bytes_up"] for f, a in zip(fib[1:], avg[1:]))
    assert any(r["curriculum_share"] < 1 for r in fib)
    assert "GAL selected" in (out_f / "logs" / "rank0.log").read_text()


def test_wrong_rank_count_fails_before_work(tmp_path, tiny_assets):
    proc = mpirun(tmp_path / "x", tiny_assets, "comm_round=1", np=4)
    assert proc.returncode != 0
    assert "client_num_per_round" in proc.stderr and "needs 3 processes" in proc.stderr
    assert not (tmp_path / "x").exists()


def test_bad_data_file_fails_clearly(tmp_path, tiny_assets):
    bad = tmp_path / "bad.csv"
    bad.write_text("sentence,label\nfine film,1\ndull film,0\n")
    proc = subprocess.run([sys.executable, str(ROOT / "run_scripts" / "run_fibec.py"), "--set", "data_source=files",
                           "--set", f"train_file={bad}"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "DataError" in proc.stderr and str(bad) in proc.stderr and "'text'" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_bad_config_fails_clearly(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "run_scripts" / "run_fibec.py"), "--set", "rho=2"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "fibec_args.rho = 2" in proc.stderr and "Traceback" not in proc.stderr


def test_a_fresh_run_into_a_used_folder_starts_every_device_from_nothing(tmp_path, tiny_assets):
    """Running the same command again into a folder that holds an earlier run's device state (a stopped run
    started again) gives that run's results, to the last digit: the devices' RNG streams and kept LoRA B
    (FedSA-LoRA keeps B on the device) start fresh, not where the earlier run left them. A device that took
    part twice is what the cross-silo ledger alone does not undo (it restores only a repeated exchange)."""
    out = tmp_path / "again"
    common = ("comm_round=3", "client_num_per_round=3", "worker_num=2", "federated_optimizer=FedSA-LoRA",
              "torch_threads=1")
    proc = mpirun(out, tiny_assets, *common)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    first = records(out)
    taken = [d for r in first for d in r["devices"]]
    assert len(taken) > len(set(taken)), "no device took part twice: this test would not test anything"
    left = sorted(p.name for p in (out / "device_state").glob("device_*"))
    (out / "device_state" / "notes.txt").write_text("not ours\n")
    proc = mpirun(out, tiny_assets, *common)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    keys = ("round", "global_accuracy", "global_loss", "device_accuracy", "train_loss", "personal_accuracy",
            "bytes_up", "devices")
    assert [{k: r.get(k) for k in keys} for r in records(out)] == [{k: r.get(k) for k in keys} for r in first]
    assert (out / "device_state" / "notes.txt").read_text() == "not ours\n"  # only device files are removed
    assert f"removed {len(left)} device file(s)" in (out / "logs" / "rank0.log").read_text()
