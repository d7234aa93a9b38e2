"""Cross-silo over GRPC: separate server and silo processes, hosts in network namespaces, resume, faults.

Every process is `run_scripts/run_fibec.py --rank R` on the tiny model, as on real hosts. Tests
start each process in its own process group and kill the groups (and delete the namespaces) in
`finally`, so nothing is left behind even when an assertion fails.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import torch

from fedml_fibec.config import load_config
from fedml_fibec.errors import ConfigError
from fedml_fibec.engines.cross_silo.ipconfig import Endpoint, loopback, parse_hosts, read_ipconfig, to_csv

ROOT = Path(__file__).resolve().parent.parent
RUN = ROOT / "run_scripts" / "run_fibec.py"
TINY = ["data_source=files", "min_samples_per_device=8", "min_samples=8", "local_steps=2", "batch_size=8",
        "device_eval_samples=16", "max_seq_length=16", "backend=GRPC", "connect_timeout_s=60"]


# address file and config ------------------------------------------------------------------------
def test_host_list_to_fedml_ipconfig(tmp_path):
    eps = parse_hosts(["# server first", "10.0.0.1", "10.0.0.2:9000  # silo 1", "", "silo2.example bind=0.0.0.0"])
    assert eps == [Endpoint(0, "10.0.0.1", 8890), Endpoint(1, "10.0.0.2", 9000),
                   Endpoint(2, "silo2.example", 8892, "0.0.0.0")]
    text = to_csv(eps)
    assert text.splitlines()[0] == "eid,rank,grpc_server_ip,grpc_server_port,ingress_ip"
    assert text.splitlines()[3] == "2,2,0.0.0.0,8892,silo2.example"  # binds 0.0.0.0, dialled at its name
    (tmp_path / "ip.csv").write_text(text)
    assert read_ipconfig(tmp_path / "ip.csv", num_silos=2)[2] == eps[2]
    plain = to_csv(loopback(2, 7000))
    assert plain.splitlines() == ["eid,rank,grpc_server_ip,grpc_server_port", "0,0,127.0.0.1,7000",
                                  "1,1,127.0.0.1,7001", "2,2,127.0.0.1,7002"]
    # the script writes the same
    proc = subprocess.run([sys.executable, str(ROOT / "run_scripts" / "make_ipconfig.py"), "--local", "2",
                           "--base-port", "7000"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout == plain


@pytest.mark.parametrize("lines, message", [
    (["10.0.0.1"], "at least 2 lines"),
    (["10.0.0.1:9000", "10.0.0.1:9000"], "both use 10.0.0.1:9000"),
    (["10.0.0.1", "fe80::1"], "IPv6"),
    (["10.0.0.1", "h:99999"], "out of range"),
])
def test_bad_host_lists_fail_clearly(lines, message):
    with pytest.raises(ConfigError, match=message):
        parse_hosts(lines)


def test_ipconfig_checks(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("rank,ip,port\n0,127.0.0.1,1\n")
    with pytest.raises(ConfigError, match="FedML's header"):
        read_ipconfig(bad)
    short = tmp_path / "short.csv"
    short.write_text(to_csv(loopback(1)))
    with pytest.raises(ConfigError, match=r"no row for rank\(s\) \[2\]"):
        read_ipconfig(short, num_silos=2)


def test_grpc_config_combinations(tmp_path):
    ip = tmp_path / "ip.csv"
    ip.write_text(to_csv(loopback(2)))
    grpc = ["backend=GRPC", f"grpc_ipconfig_path={ip}"]
    with pytest.raises(ConfigError, match="client_num_in_total = 100: expected equal to client_num_per_round"):
        load_config(None, grpc + ["client_num_per_round=2"])
    with pytest.raises(ConfigError, match="min_silos_per_round = 3"):
        load_config(None, grpc + ["client_num_per_round=2", "client_num_in_total=2", "min_silos_per_round=3"])
    with pytest.raises(ConfigError, match="round_timeout_s = 5.0: expected null with backend=MPI"):
        load_config(None, ["round_timeout_s=5"])
    with pytest.raises(ConfigError, match="grpc_ipconfig_path = 'nope.csv': expected an existing ipconfig CSV"):
        load_config(None, ["backend=GRPC", "client_num_in_total=10", "grpc_ipconfig_path=nope.csv"])
    two = grpc + ["client_num_per_round=2", "client_num_in_total=2"]
    with pytest.raises(ConfigError, match="tls_ca_cert = None: expected a PEM file path when backend=GRPC"):
        load_config(None, two)
    assert load_config(None, two + ["insecure=true"]).comm_args.insecure
    with pytest.raises(ConfigError, match="tls_cert = 'c.crt': expected null with backend=MPI"):
        load_config(None, ["tls_cert=c.crt"])
    with pytest.raises(ConfigError, match="insecure = True: expected false with backend=MPI"):
        load_config(None, ["insecure=true"])
    cfg = load_config(ROOT / "config" / "cross_silo.yaml", [f"grpc_ipconfig_path={ip}"])
    assert cfg.train_args.client_num_in_total == cfg.train_args.client_num_per_round == 10
    # The shipped loopback address file is what make_ipconfig.py --local 10 writes.
    assert (ROOT / "config" / "ipconfig_local.csv").read_text() == to_csv(loopback(10))


def test_grpc_rank_is_required_and_checked(tmp_path, tiny_assets):
    model_dir, csv = tiny_assets
    ip = tmp_path / "ip.csv"
    ip.write_text(to_csv(loopback(2)))
    overrides = _tiny(model_dir, csv, ip, 2, 1)
    short = ip.with_name("short.csv")
    short.write_text(to_csv(loopback(1)))
    certs = Path(tls_overrides()[0].split("=", 1)[1]).parent
    wrong_cert = [f"tls_cert={certs}/rank1.crt", f"tls_key={certs}/rank1.key"]
    for sets, extra, message in ((overrides, ["--rank", "3"], "--rank 3: expected 0 (server) to 2"),
                                 (overrides + wrong_cert, ["--rank", "2"], "names rank 1 (common name"),
                                 (overrides, [], "--rank R"),
                                 (overrides + [f"grpc_ipconfig_path={short}"], ["--rank", "0"], "no row for rank(s) [2]")):
        cmd = [sys.executable, str(RUN)] + sum((["--set", o] for o in sets), []) + extra
        proc = subprocess.run(cmd + ["--out", str(tmp_path / "x")], capture_output=True, text=True,
                              timeout=120, cwd=ROOT)
        assert proc.returncode == 2 and message in proc.stderr, proc.stderr[-2000:]
        assert "Traceback" not in proc.stderr


def test_repeated_exchange_starts_from_the_device_state_before_it(tmp_path):
    """After a server crash the same exchange may come again: the device state is rolled back first."""
    from fedml_fibec.engines.cross_silo.client_manager import DeviceLedger
    from fedml_fibec.core.state_store import DeviceStateStore

    store = DeviceStateStore(tmp_path)
    ledger = DeviceLedger(store)
    ledger.before_training(3, [0, "train"])
    store.save(3, {"participations": 1})  # trained exchange (0, train)
    ledger.before_training(3, [1, "train"])
    store.save(3, {"participations": 2})  # trained (1, train); then the server crashed before its checkpoint
    ledger.before_training(3, [1, "train"])  # the resumed server sends (1, train) again
    assert store.load(3) == {"participations": 1}
    store.save(3, {"participations": 2})
    ledger.before_training(3, [2, "train"])  # the next exchange keeps the new state
    assert store.load(3) == {"participations": 2}
    # The store counts device 3 once (its ledger backup is not a device), and clear() removes the
    # state, the backup and the mark, and nothing else.
    (tmp_path / "notes.txt").write_text("kept")
    assert store.count() == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "device_00003.before.pt", "device_00003.exchange", "device_00003.pt", "notes.txt"]
    assert store.clear() == 3 and store.count() == 0
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


# process helpers ----------------------------------------------------------------------------------
_CERTS: list[Path] = []


def tls_overrides() -> list[str]:
    """Mutual TLS for up to 4 ranks (made once per test session by run_scripts/make_certs.py).

    A certificate's rank name, not its address, is what a peer checks, so one set serves the
    loopback tests and the network-namespace hosts alike.
    """
    if not _CERTS:
        import tempfile
        out = Path(tempfile.mkdtemp(prefix="fibec-certs-")) / "certs"
        proc = subprocess.run([sys.executable, str(ROOT / "run_scripts" / "make_certs.py"), "--local", "3",
                               "--out", str(out)], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        _CERTS.append(out)
    d = _CERTS[0]
    return [f"tls_ca_cert={d}/ca.crt", f"tls_cert={d}/rank{{rank}}.crt", f"tls_key={d}/rank{{rank}}.key"]


def _tiny(model_dir, csv, ipconfig, silos: int, rounds: int, *extra: str) -> list[str]:
    return TINY + tls_overrides() + [f"model={model_dir}", f"train_file={csv}", f"grpc_ipconfig_path={ipconfig}",
                                     f"client_num_in_total={silos}", f"client_num_per_round={silos}",
                                     f"comm_round={rounds}", *extra]


def _free_base_port(n: int) -> int:
    for base in range(20000 + (os.getpid() * 7) % 20000, 60000, n + 1):
        socks = []
        try:
            for r in range(n):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", base + r))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no free ports")


class Procs:
    """Processes started in their own process groups; kill() ends every group."""

    def __init__(self):
        self.procs: dict[str, subprocess.Popen] = {}

    def start(self, name: str, out: Path, rank: int, overrides: list[str], *, env=None, netns=None,
              resume: Path | None = None) -> subprocess.Popen:
        out.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, str(RUN), "--rank", str(rank)]
        cmd += ["--resume", str(resume)] if resume else ["--out", str(out)]
        for o in overrides:
            cmd += ["--set", o]
        if netns:
            cmd = ["ip", "netns", "exec", netns] + cmd
        log = open(out / f"console-{name}.log", "w")
        p = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                             env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
        p.log_path = out / f"console-{name}.log"
        self.procs[name] = p
        return p

    def wait(self, name: str, timeout: float) -> int:
        return self.procs[name].wait(timeout=timeout)

    def output(self, name: str) -> str:
        return self.procs[name].log_path.read_text()

    def kill(self, name: str) -> None:
        p = self.procs[name]
        if p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            p.wait(timeout=30)

    def kill_all(self) -> None:
        for name in self.procs:
            self.kill(name)


def records(out: Path) -> list[dict]:
    p = out / "metrics.jsonl"
    return [json.loads(x) for x in p.read_text().splitlines()] if p.exists() else []


def wait_for(cond, timeout: float, what: str, procs: Procs | None = None):
    end = time.time() + timeout
    while time.time() < end:
        value = cond()
        if value:
            return value
        time.sleep(0.1)
    detail = "" if procs is None else "\n".join(f"--- {n}\n{procs.output(n)[-1500:]}" for n in procs.procs)
    raise AssertionError(f"timed out waiting for {what}\n{detail}")


def final_globals(out: Path) -> dict:
    return torch.load(out / "checkpoint.pt", weights_only=False)["aggregator"]["global_tensors"]


# separate hosts in network namespaces -------------------------------------------------------------
def _sh(*cmd: str) -> str:
    return subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=30).stdout


@pytest.fixture
def three_hosts():
    """A server host and two silo hosts: network namespaces joined by veth pairs (a star), no bridge.

    server ns: 10.213.1.1 (to silo 1) and 10.213.2.1 (to silo 2); silo r: 10.213.r.2 with its
    default route to the server. Nothing is attached to this machine's own network.
    """
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("network namespaces need root and iproute2 (CI runs as root)")
    tag = uuid.uuid4().hex[:6]
    names = {"server": f"fbs{tag}", 1: f"fb1{tag}", 2: f"fb2{tag}"}
    try:
        for ns in names.values():
            _sh("ip", "netns", "add", ns)
            _sh("ip", "-n", ns, "link", "set", "lo", "up")
        for r in (1, 2):
            a, b = f"vs{r}{tag}", f"vc{r}{tag}"
            _sh("ip", "link", "add", a, "type", "veth", "peer", "name", b)
            _sh("ip", "link", "set", a, "netns", names["server"])
            _sh("ip", "link", "set", b, "netns", names[r])
            _sh("ip", "-n", names["server"], "addr", "add", f"10.213.{r}.1/24", "dev", a)
            _sh("ip", "-n", names[r], "addr", "add", f"10.213.{r}.2/24", "dev", b)
            _sh("ip", "-n", names["server"], "link", "set", a, "up")
            _sh("ip", "-n", names[r], "link", "set", b, "up")
            _sh("ip", "-n", names[r], "route", "add", "default", "via", f"10.213.{r}.1")
        yield names, tag
    finally:
        for ns in names.values():
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)
        assert not any(ns in _sh("ip", "netns", "list") for ns in names.values())


def test_server_and_two_silos_on_separate_hosts(tmp_path, tiny_assets, three_hosts):
    """Hosts with their own addresses; silo 2 sends a NaN upload in round 1, which the server rejects."""
    names, tag = three_hosts
    model_dir, csv = tiny_assets
    hosts = tmp_path / "hosts.txt"
    hosts.write_text("10.213.1.1   # server\n10.213.1.2   # silo 1\n10.213.2.2   # silo 2\n")
    ipconfig = tmp_path / "ipconfig.csv"
    proc = subprocess.run([sys.executable, str(ROOT / "run_scripts" / "make_ipconfig.py"), str(hosts)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    ipconfig.write_text(proc.stdout)
    overrides = _tiny(model_dir, csv, ipconfig, 2, 3, "round_timeout_s=90")
    procs = Procs()
    out = {r: tmp_path / f"host{r}" for r in range(3)}
    try:
        procs.start("server", out[0], 0, overrides, netns=names["server"])
        procs.start("silo1", out[1], 1, overrides, netns=names[1])
        procs.start("silo2", out[2], 2, overrides, netns=names[2], env={"FEDML_FIBEC_CORRUPT_UPLOAD": "1"})
        rc = procs.wait("server", timeout=240)
        assert rc == 0, procs.output("server")[-3000:]
        for s in ("silo1", "silo2"):
            assert procs.wait(s, timeout=60) == 0, procs.output(s)[-3000:]
    finally:
        procs.kill_all()
    rows = records(out[0])
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert [r["rejected_payloads"] for r in rows] == [0, 1, 0]
    assert rows[1]["devices"] == [0] and rows[0]["devices"] == rows[2]["devices"] == [0, 1]
    assert all(torch.isfinite(v).all() for v in final_globals(out[0]).values())
    summary = json.loads((out[0] / "summary.json").read_text())
    assert summary["rounds"] == 3 and summary["backend"] == "GRPC"
    # The messages really came from the silos' own addresses, over the veth links.
    log = (out[0] / "logs" / "rank0.log").read_text()
    assert "from rank 1 at ipv4:10.213.1.2:" in log and "from rank 2 at ipv4:10.213.2.2:" in log
    assert "mutual TLS" in log and summary["tls"] is True
    rx = 0
    for r in (1, 2):
        stats = json.loads(_sh("ip", "-n", names["server"], "-s", "-j", "link", "show", "dev", f"vs{r}{tag}"))
        rx += stats[0]["stats64"]["rx"]["bytes"]
    assert rx >= summary["wire_bytes_received"] > summary["total_bytes_up"] > 0
    # Each silo holds its own device's state only; the server holds none.
    assert sorted(p.name for p in (out[1] / "device_state").glob("device_*[0-9].pt")) == ["device_00000.pt"]
    assert sorted(p.name for p in (out[2] / "device_state").glob("device_*[0-9].pt")) == ["device_00001.pt"]
    assert not list((out[0] / "device_state").glob("device_*.pt"))
    assert "rejected upload: payload from device 1 rejected" in log


# checkpoint and resume ----------------------------------------------------------------------------
def _loopback_ipconfig(path: Path, silos: int) -> Path:
    path.write_text(to_csv(loopback(silos, _free_base_port(silos + 1))))
    return path


def test_interrupted_and_resumed_run_ends_with_the_same_global_model(tmp_path, tiny_assets):
    """4 rounds straight == 2 rounds, server crash (silos keep running), --resume to 4 rounds."""
    model_dir, csv = tiny_assets
    procs = Procs()
    try:
        ip_a = _loopback_ipconfig(tmp_path / "a.csv", 2)
        ov_a = _tiny(model_dir, csv, ip_a, 2, 4, "rho=0.5")
        a = tmp_path / "straight"
        procs.start("a0", a, 0, ov_a)
        procs.start("a1", a / "silo1", 1, ov_a)
        procs.start("a2", a / "silo2", 2, ov_a)
        assert procs.wait("a0", 240) == 0, procs.output("a0")[-3000:]

        ip_b = _loopback_ipconfig(tmp_path / "b.csv", 2)
        ov_b = _tiny(model_dir, csv, ip_b, 2, 4, "rho=0.5")
        b = tmp_path / "resumed"
        procs.start("b0", b, 0, ov_b, env={"FEDML_FIBEC_STOP_AFTER_ROUND": "2"})
        procs.start("b1", b / "silo1", 1, ov_b)
        procs.start("b2", b / "silo2", 2, ov_b)
        assert procs.wait("b0", 240) == 3, procs.output("b0")[-3000:]  # the simulated crash
        assert "stopped after round 2" in procs.output("b0")
        assert [r["round"] for r in records(b)] == [0, 1]
        ckpt = json.loads((b / "checkpoint.json").read_text())
        assert ckpt["rounds_done"] == 2 and not ckpt["complete"]
        # The silos wait; a new server continues from the checkpoint and re-initialises them.
        procs.start("b0r", b, 0, [], resume=b)
        assert procs.wait("b0r", 240) == 0, procs.output("b0r")[-3000:]
        for s in ("a1", "a2", "b1", "b2"):
            assert procs.wait(s, 60) == 0, procs.output(s)[-3000:]
    finally:
        procs.kill_all()
    ga, gb = final_globals(a), final_globals(b)
    assert ga.keys() == gb.keys()
    for k in ga:
        assert torch.equal(ga[k], gb[k]), k
    ra, rb = records(a), records(b)
    assert [r["round"] for r in rb] == [0, 1, 2, 3]
    assert [r["global_accuracy"] for r in ra] == [r["global_accuracy"] for r in rb]
    assert json.loads((b / "summary.json").read_text())["rounds"] == 4
    # A finished run cannot be resumed again; it says so.
    proc = subprocess.run([sys.executable, str(RUN), "--rank", "0", "--resume", str(b)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "already complete" in proc.stderr


# a silo killed mid-run --------------------------------------------------------------------------
def test_killed_silos_continue_then_stop_with_checkpoint(tmp_path, tiny_assets):
    """3 silos, min_silos_per_round=2: without silo 3 the run goes on with 2, silo 3 restarted re-joins;
    then with only silo 1 left it stops with a clear error and the last completed round checkpointed."""
    model_dir, csv = tiny_assets
    ip = _loopback_ipconfig(tmp_path / "ip.csv", 3)
    timeout_s = 6
    # Many short rounds: the run is stopped by the test's faults long before its end.
    ov = _tiny(model_dir, csv, ip, 3, 1000, f"round_timeout_s={timeout_s}", "min_silos_per_round=2")
    out = tmp_path / "run"
    procs = Procs()
    try:
        procs.start("server", out, 0, ov)
        for r in (1, 2, 3):
            procs.start(f"silo{r}", out / f"silo{r}", r, ov)
        # A round with all three silos first: on a loaded machine a silo can miss the start-up wait
        # (round_timeout_s), and the server then starts without it; such a round is not one after the kill.
        first = wait_for(lambda: next((r for r in records(out) if r["num_devices"] == 3), None), 240,
                         "a round with all three silos", procs)
        procs.kill("silo3")
        # Behaviour 1: after the timeout (or at once, if silo 3 was already gone when the round was
        # sent) the server goes on with silos 1 and 2.
        row = wait_for(lambda: next((r for r in records(out)[first["round"] + 1:] if 3 in r["silos_dropped"]),
                                    None), 120, "a round without silo 3", procs)
        assert row["devices"] == [0, 1] and row["silos_dropped"] == [3]
        # Silo 3 restarted with --resume of its own folder re-joins and keeps its device state. A device
        # file it holds no device for stands in for that state: a restart that clears the store (one
        # started with --out) removes it.
        store = out / "silo3" / "device_state"
        assert (store / "device_00002.pt").exists()  # silo 3's device trained in round `first`
        torch.save({"participations": 7}, store / "device_00099.pt")
        procs.start("silo3b", out / "silo3", 3, ov, resume=out / "silo3")
        row = wait_for(lambda: next((r for r in records(out)[row["round"] + 1:] if r["num_devices"] == 3), None),
                       180, "silo 3 re-joining", procs)
        assert row["devices"] == [0, 1, 2] and row["silos_dropped"] == []
        assert torch.load(store / "device_00099.pt", weights_only=False) == {"participations": 7}
        assert "--resume keeps the 2 device state file(s)" in (out / "silo3" / "logs" / "rank3.log").read_text()
        procs.kill("silo2")
        procs.kill("silo3b")
        t0 = time.time()
        # Behaviour 2: one silo left < min_silos_per_round = 2: the server stops with a clear error.
        rc = procs.wait("server", timeout=120)
        assert time.time() - t0 < timeout_s + 60
        assert procs.wait("silo1", timeout=60) == 0, procs.output("silo1")[-2000:]  # told to finish
    finally:
        procs.kill_all()
    text = procs.output("server")
    assert rc == 2, text[-3000:]
    # Killed mid-round: "1 of 2 silo(s) answered ... no upload from silo(s) [2]"; between rounds:
    # "only 1 silo(s) reachable ... unreachable: silo(s) [2, 3]".
    assert "fewer than min_silos_per_round = 2" in text and "silo(s) [2" in text, text[-3000:]
    assert f"--resume {out}" in text and "Traceback" not in text
    rows = records(out)
    ckpt = torch.load(out / "checkpoint.pt", weights_only=False)
    assert ckpt["aggregator"]["round"] == len(rows) == rows[-1]["round"] + 1  # the last completed round
    assert not (out / "summary.json").exists()
