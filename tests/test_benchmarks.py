"""The benchmark scripts run (tiny random models, --quick) and print one valid JSON object per line.

They measure nothing here; docs/PERFORMANCE.md has the numbers and the commands. bench_round.py is
checked on a synthetic run folder (no mpirun); `run_scripts/gpu_check.sh --dry-run` (an mpirun job,
minutes on 2 cores) is documented there rather than run here.
"""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks"


def run_json(*args: str, timeout: int = 120) -> list[dict]:
    proc = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    assert lines, proc.stderr[-3000:]
    return [json.loads(line) for line in lines]  # every stdout line is JSON


def test_bench_fisher_quick():
    records = run_json(str(BENCH / "bench_fisher.py"), "--quick", "--models", "tiny-bert", "--repeats", "1")
    timed = {r["what"]: r for r in records if "median_s" in r}
    assert {"embedding_onepass", "lora_onepass", "logits_onepass", "train_fwd_bwd", "embedding_loop", "lora_loop",
            "dataset_embedding_onepass", "dataset_embedding_loop", "dataset_train_fwd_bwd"} <= set(timed)
    for r in timed.values():
        assert r["min_s"] <= r["median_s"] <= r["max_s"] and r["threads"] == 1
    summary = next(r for r in records if r["what"] == "summary")
    assert {"embedding_speedup_vs_loop", "embedding_vs_train", "lora_speedup_vs_loop", "targets"} <= set(summary)
    # the one-pass scores are the loop's scores
    assert summary["embedding_max_rel_diff"] < 1e-4 and summary["lora_max_rel_diff"] < 1e-4


def test_bench_local_step_quick():
    records = run_json(str(BENCH / "bench_local_step.py"), "--quick", "--models", "tiny-llama", "--repeats", "1")
    steps = {r["what"]: r for r in records if "median_s" in r}
    assert {"dense", "fibec", "lowest_block=0", "lowest_block=4"} <= set(steps)
    assert steps["lowest_block=4"]["blocks_with_backward"] == []  # head only: no block runs backward
    assert steps["lowest_block=2"]["blocks_with_backward"] == [2, 3]
    summary = next(r for r in records if r["what"] == "summary")
    assert summary["autograd_skips_frozen_lower_blocks"] is True
    assert 0 < summary["selected_neuron_share"] <= 0.25 + 1e-9
    assert {r["variant"] for r in records if r["what"] == "phases"} == {"dense", "fibec"}


def test_bench_round_analyze_synthetic(tmp_path):
    t = 1000.0
    metrics = [{"round": 0, "round_seconds": 10.0, "bytes_up": 100, "bytes_down": 200, "global_accuracy": 0.5},
               {"round": 1, "round_seconds": 10.0, "bytes_up": 100, "bytes_down": 200, "global_accuracy": 0.6}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))
    timing = tmp_path / "bench_timing"
    timing.mkdir()
    server, client = [], []
    for r in range(2):
        s = t + 10 * r
        server += [{"rank": 0, "kind": "mpi_send", "start": s, "seconds": 0.2},
                   {"rank": 0, "kind": "pickle_dumps", "start": s, "seconds": 0.1, "nbytes": 50},
                   {"rank": 0, "kind": "aggregate", "start": s + 8, "seconds": 0.3},
                   {"rank": 0, "kind": "to_wire", "start": s + 8.1, "seconds": 0.1},
                   {"rank": 0, "kind": "server_eval", "start": s + 8.5, "seconds": 1.0},
                   {"rank": 0, "kind": "server_test", "start": s + 8.5, "seconds": 1.1},
                   {"rank": 0, "kind": "round_end", "start": s + 10, "round": r}]
        client += [{"rank": 1, "kind": "client_train", "start": s + 0.5, "seconds": 7.0, "round": r},
                   {"rank": 1, "kind": "local_compute", "start": s + 1, "seconds": 5.0, "round": r},
                   {"rank": 1, "kind": "scoring_difficulty", "start": s + 0.6, "seconds": 1.0, "round": r},
                   {"rank": 1, "kind": "device_eval", "start": s + 6, "seconds": 0.5, "round": r}]
    client.append({"rank": 1, "kind": "peak", "start": t + 30, "max_rss_bytes": 123})
    (timing / "rank0.jsonl").write_text("".join(json.dumps(e) + "\n" for e in server))
    (timing / "rank1.jsonl").write_text("".join(json.dumps(e) + "\n" for e in client))
    records = run_json(str(BENCH / "bench_round.py"), "analyze", str(tmp_path))
    rounds = [r for r in records if r["what"] == "round"]
    assert [r["round"] for r in rounds] == [0, 1]
    r1 = rounds[1]
    assert abs(r1["wall_s"] - 10.0) < 1e-9 and r1["local_compute_s"] == 5.0 and r1["scoring_s"] == 1.0
    assert abs(r1["evaluation_s"] - 1.5) < 1e-9 and abs(r1["aggregation_s"] - 0.2) < 1e-9
    assert abs(r1["overhead_share"] - (1 - 7.5 / 10)) < 1e-9
    summary = records[-1]
    assert summary["what"] == "summary" and summary["rounds_in_median"] == [1]
    assert summary["peak_rss_bytes_per_rank"] == {"1": 123}


def test_bench_wire_quick():
    records = run_json(str(BENCH / "bench_wire.py"), "--quick", "--models", "tiny-bert", "--repeats", "1")
    ser = {r["message"]: r for r in records if r["case"] == "serialize"}
    assert set(ser) == {"down", "up"}
    for r in ser.values():  # the codec's frame around the tensors is smaller than the pickled message
        assert r["tensor_bytes"] < r["codec_bytes"] < r["pickle_bytes"]
    sends = [r for r in records if r["case"] == "send"]
    assert len(sends) == 2 and all({"plain_pickled", "tls_codec", "plain_codec"} <= set(r) for r in sends)
    per_round = next(r for r in records if r["case"] == "per_round")
    assert per_round["bytes_per_round_codec"] == 10 * (ser["down"]["codec_bytes"] + ser["up"]["codec_bytes"])


def test_bench_models_quick():
    records = run_json(str(BENCH / "bench_models.py"), "--quick", "--repeats", "1", timeout=600)
    *models, summary = records
    expected_targets = {"minilm": ["query", "value"], "roberta-base": ["query", "value"],
                        "roberta-large": ["query", "value"], "gpt2": ["c_attn"],
                        "meta-llama/Llama-3.2-1B": ["q_proj", "v_proj"]}
    assert [r["model"] for r in models] == list(expected_targets)  # one line per model, in order
    for r in models:
        assert r["lora_targets"] == expected_targets[r["model"]]  # apply_lora's choice for the family
        assert r["weights"] == "random (architecture only)" and r["quick"] is True and r["threads"] == 1
        assert 0 < r["trainable_params"] < r["params"]
        assert r["step_s"] > 0 and r["eval_s"] > 0 and r["round_s"] == r["step_s"] * r["steps_per_round"]
        assert r["steps_per_round"] == 2 and r["eval_batches"] == 3  # 8 samples / 4; 20 samples / 8
        rss = [r[f"peak_rss_mb_after_{k}"] for k in ("imports", "build", "train", "eval")]
        assert rss == sorted(rss) and rss[1] >= r["weights_mb"]  # one process per model: its own peak
    assert summary["table"] is True and summary["failed"] == []
    assert [row["model"] for row in summary["rows"]] == list(expected_targets)


def test_bench_subnormal_quick():
    records = run_json(str(BENCH / "bench_subnormal.py"), "--quick")
    if "error" in records[0]:  # a CPU without the x86 DAZ flag says so and measures nothing
        assert len(records) == 1
        return
    cases = {(r["input"], r["flush_denormal"]): r for r in records}
    assert set(cases) == {(i, f) for i in ("normal", "subnormal") for f in (False, True)}
    # flushed, subnormal inputs read as zero; unflushed (and normal inputs either way) they do not
    assert cases[("subnormal", True)]["zero_share"] == 1.0
    assert cases[("subnormal", False)]["zero_share"] == 0.0 and cases[("normal", True)]["zero_share"] == 0.0
