#!/usr/bin/env python
"""
A bandwidth-limited testbed on one Linux machine: each worker runs in its own network namespace, joined to the others
through a switch (a bridge in a namespace of its own) by a veth link shaped with `tc tbf` in both directions, so every
worker can send and receive at most `--rate` (like a server with a 100 Mbit/s or 1 Gbit/s NIC on a switch).

It needs root (`ip netns`, `tc`), creates only namespaces named `dppftb-<pid>-*`, and removes them on exit, also
after a failure, Ctrl-C or SIGTERM. `--cleanup` removes namespaces that a killed testbed left behind (those whose
creating process is gone). Traffic never leaves the namespaces it creates.

    # is the shaping real? measure TCP throughput across one link (about 0.95 x the rate is expected: headers)
    sudo python scripts/netns_testbed.py --workers 2 --rate 100mbit --selftest

    # run a command once per namespace: one torchrun node per worker (the default launcher)
    sudo python scripts/netns_testbed.py --workers 2 --rate 100mbit -- recipes/text_classification.py --dppf

    # "machines" with several processes each: 2 nodes x 2 processes, one replica per node (hierarchical DPPF)
    sudo python scripts/netns_testbed.py --workers 2 --nproc_per_node 2 --rate 100mbit -- \
        recipes/text_classification.py --dppf --dppf_replica_size 2

    # or one plain process per worker, with RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT set (torch `env://`)
    sudo python scripts/netns_testbed.py --workers 4 --rate 1gbit --launcher env -- python my_script.py

    # time to a target accuracy: every method at every rate, a markdown table at the end
    sudo python scripts/netns_testbed.py --workers 2 --compare --rates 100mbit 1gbit --target 0.9 \
        --method ddp= --method "dppf=--dppf --dppf_tau 8" -- recipes/text_classification.py --eval_strategy steps ...

In `--compare` mode the command must print its evaluation metrics as the `Trainer` does (a dict per evaluation on
rank 0's stdout, e.g. with `--disable_tqdm True`); the tool stamps each evaluation with the wall time since launch
minus the time spent evaluating so far (the sum of `eval_runtime`), so the times are training time, start-up included.
Every worker process gets `GLOO_SOCKET_IFNAME` (its link) and `OMP_NUM_THREADS=1` unless set.

Bytes across the links are counted, not estimated: the kernel's counters of each worker's link (the switch-side end
of its veth) are read before and after every run, and the run reports what each worker sent and received across it
during the run (frames: the payload plus its TCP/IP/Ethernet headers, up to ~4.6 %, and ACKs; start-up, rendezvous
and every collective of the run included). `--compare` shows them as MiB sent per node (the mean over the
workers) and per process (that / `--nproc_per_node`); `--link_samples S` also records the counters every S seconds.

The torchrun launcher is the multi-node launch users run: on every worker `torchrun --nnodes <workers>
--nproc_per_node <N> --rdzv_backend c10d --rdzv_endpoint <worker 0>:29500`, so `--nproc_per_node N` runs N processes
per "machine" (global ranks i*N .. i*N+N-1 on worker i). Processes of one worker reach each other through their
namespace's own address (local delivery, unshaped: a fast intra-node link); traffic between workers crosses the shaped
links (the slow inter-node network). Because the namespaces share the machine's hostname, each node also gets
`--local_addr <its address>` and `--rdzv_conf is_host=0|1` (real machines do not need them); c10d orders the nodes by
address, so worker i is node (GROUP_RANK) i.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from trainer_logs import parse_metrics  # noqa: E402 (a sibling script, not a package)

PREFIX = "dppftb"
SUBNET = "10.213"  # a private /16; its addresses exist only inside the testbed's namespaces
IFNAME = "tb0"  # each worker's link, as seen inside its namespace
MASTER_PORT = 29500
_RATE_UNITS = {"bit": 1, "kbit": 10**3, "mbit": 10**6, "gbit": 10**9}


def parse_rate(rate: str) -> int:
    """
    A `tc`-style rate (`100mbit`, `1gbit`, `500kbit`, `2000000bit`) in bits per second.

    Raises:
        `ValueError`: the rate has no known unit or is not positive.
    """
    match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*(bit|kbit|mbit|gbit)", rate.strip().lower())
    if match is None or float(match.group(1)) <= 0:
        raise ValueError(f"--rate={rate!r} is invalid: give a positive number with a unit in {list(_RATE_UNITS)}.")
    return int(float(match.group(1)) * _RATE_UNITS[match.group(2)])


def check_requirements() -> None:
    """Refuse, naming what is missing, unless we are root and `ip` and `tc` exist."""
    missing = [tool for tool in ("ip", "tc") if shutil.which(tool) is None]
    if missing:
        raise SystemExit(f"netns_testbed: {missing} not found; install iproute2 (it provides `ip` and `tc`).")
    if os.geteuid() != 0:
        raise SystemExit("netns_testbed: network namespaces and tc need root; run it with sudo (or as root).")


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


def _namespaces() -> list[str]:
    listing = subprocess.run(["ip", "netns", "list"], check=True, capture_output=True, text=True).stdout
    return [line.split()[0] for line in listing.splitlines() if line.strip()]


def _pids_in(namespace: str) -> list[int]:
    out = subprocess.run(["ip", "netns", "pids", namespace], capture_output=True, text=True).stdout
    return [int(pid) for pid in out.split()]


def _delete_namespace(namespace: str) -> None:
    """Kill what still runs inside `namespace` (only processes inside it), then delete it."""
    for pid in _pids_in(namespace):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    subprocess.run(["ip", "netns", "delete", namespace], capture_output=True)


def cleanup_leftovers(prefix: str = PREFIX) -> list[str]:
    """Delete the namespaces `<prefix>-<pid>-*` whose creating process `<pid>` is gone; returns their names."""
    removed = []
    for namespace in _namespaces():
        match = re.fullmatch(rf"{re.escape(prefix)}-(\d+)-\w+", namespace)
        if match is None:
            continue
        try:
            os.kill(int(match.group(1)), 0)
            continue  # its testbed is alive: not a leftover
        except ProcessLookupError:
            pass
        _delete_namespace(namespace)
        removed.append(namespace)
    return removed


@dataclass
class Testbed:
    """
    `workers` namespaces on a switch; every link shaped to `rate` in both directions.

    Use it as a context manager: the namespaces exist inside the `with` block and are deleted on the way out, whatever
    happens. `address(i)` is worker i's IP address, `namespaces[i]` its namespace, `popen(i, argv, env)` runs a process
    in it.

    Args:
        workers (`int`): number of worker namespaces (>= 2).
        rate (`str`): `tc` rate of every link, each direction (e.g. `100mbit`).
        burst_ms (`float`, defaults to 2.0): token-bucket depth, in milliseconds at `rate` (at least 32 KiB).
        queue_ms (`float`, defaults to 50.0): `tbf latency`: the longest a packet may wait in the shaper's queue.
        prefix (`str`, defaults to `dppftb`): namespace-name prefix; names are `<prefix>-<our pid>-<role>`.
    """

    workers: int
    rate: str
    burst_ms: float = 2.0
    queue_ms: float = 50.0
    prefix: str = PREFIX
    namespaces: list[str] = field(init=False, default_factory=list)
    switch: str = field(init=False, default="")
    _created: list[str] = field(init=False, default_factory=list)

    def __post_init__(self) -> None:
        if not 2 <= self.workers <= 200:
            raise ValueError(f"--workers={self.workers} is invalid: it must be in [2, 200].")
        self.bits_per_s = parse_rate(self.rate)
        tag = f"{self.prefix}-{os.getpid()}"
        self.namespaces = [f"{tag}-w{i}" for i in range(self.workers)]
        self.switch = f"{tag}-sw"

    def address(self, worker: int) -> str:
        # three-digit last bytes: sorted as strings (torchrun's c10d rendezvous orders nodes so) they stay in order
        return f"{SUBNET}.{worker // 100}.{100 + worker % 100}"

    def _shape(self, namespace: str, device: str) -> None:
        burst = max(32 * 1024, int(self.bits_per_s / 8 * self.burst_ms / 1000))
        subprocess.run(
            ["tc", "-n", namespace, "qdisc", "replace", "dev", device, "root", "tbf"]
            + ["rate", f"{self.bits_per_s}bit", "burst", str(burst), "latency", f"{self.queue_ms}ms"],
            check=True,
            capture_output=True,
            text=True,
        )

    def up(self) -> Testbed:
        for namespace in [self.switch, *self.namespaces]:
            _ip("netns", "add", namespace)
            self._created.append(namespace)
            _ip("-n", namespace, "link", "set", "lo", "up")
        _ip("-n", self.switch, "link", "add", "sw", "type", "bridge")
        _ip("-n", self.switch, "link", "set", "sw", "up")
        for i, namespace in enumerate(self.namespaces):
            port = f"p{i}"
            _ip("link", "add", "name", IFNAME, "netns", namespace, "type", "veth", "peer", "name", port, "netns",
                self.switch)  # fmt: skip
            _ip("-n", self.switch, "link", "set", port, "master", "sw", "up")
            _ip("-n", namespace, "addr", "add", f"{self.address(i)}/16", "dev", IFNAME)
            _ip("-n", namespace, "link", "set", IFNAME, "up")
            self._shape(namespace, IFNAME)  # the worker's upload
            self._shape(self.switch, port)  # its download
        return self

    def down(self) -> None:
        for namespace in reversed(self._created):
            _delete_namespace(namespace)
        self._created.clear()

    def __enter__(self) -> Testbed:
        try:
            return self.up()
        except BaseException:
            self.down()
            raise

    def __exit__(self, *exc: object) -> None:
        self.down()

    def link_bytes(self) -> list[tuple[int, int]]:
        """
        (bytes sent, bytes received) by each worker across its link since the testbed came up: the kernel's counters
        of the link's switch-side end `p<i>` (what worker i sends arrives there), Ethernet frames with their headers.
        """
        listing = subprocess.run(
            ["ip", "-n", self.switch, "-json", "-statistics", "link", "show"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        stats = {link["ifname"]: link["stats64"] for link in json.loads(listing)}
        return [(stats[f"p{i}"]["rx"]["bytes"], stats[f"p{i}"]["tx"]["bytes"]) for i in range(self.workers)]

    def popen(self, worker: int, argv: Sequence[str], env: dict[str, str], **kwargs) -> subprocess.Popen:
        """Start `argv` in worker `worker`'s namespace, in a session of its own (so it can be killed as a group)."""
        full_env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), **env}
        full_env["GLOO_SOCKET_IFNAME"] = IFNAME
        command = ["ip", "netns", "exec", self.namespaces[worker], *argv]
        return subprocess.Popen(command, env=full_env, start_new_session=True, **kwargs)


# ------------------------------------------------------------------------------------------------------- selftest
_RECEIVER = """
import socket, sys, time
warmup, seconds = float(sys.argv[1]), float(sys.argv[2])
server = socket.create_server(("0.0.0.0", 5201)); print("ready", flush=True)
conn, _ = server.accept(); got = 0; start = None; t0 = time.perf_counter()
while True:
    chunk = conn.recv(1 << 20)
    now = time.perf_counter()
    if not chunk or now - t0 > warmup + seconds: break
    if now - t0 >= warmup:
        start = start or now; got += len(chunk)
print(got * 8 / (now - start), flush=True)
"""
_SENDER = """
import socket, sys, time
conn = socket.create_connection((sys.argv[1], 5201)); data = bytes(1 << 16)
end = time.perf_counter() + float(sys.argv[2])
try:
    while time.perf_counter() < end: conn.sendall(data)
except OSError: pass
"""


def measure_throughput(testbed: Testbed, sender: int = 0, receiver: int = 1, seconds: float = 2.0) -> float:
    """TCP goodput from worker `sender` to worker `receiver`, in bit/s, after a 0.5 s warm-up (slow start, burst)."""
    warmup = 0.5
    rx = testbed.popen(
        receiver, [sys.executable, "-c", _RECEIVER, str(warmup), str(seconds)], {}, stdout=subprocess.PIPE, text=True
    )
    try:
        assert rx.stdout.readline().strip() == "ready"
        tx = testbed.popen(
            sender, [sys.executable, "-c", _SENDER, testbed.address(receiver), str(warmup + seconds + 1)], {}
        )
        out, _ = rx.communicate(timeout=warmup + seconds + 30)
        tx.wait(timeout=30)
        return float(out.strip())
    finally:
        for proc in (rx,):
            if proc.poll() is None:
                proc.kill()


# ------------------------------------------------------------------------------------------------------ launching
def worker_argv(
    testbed: Testbed, worker: int, command: Sequence[str], launcher: str, nproc_per_node: int
) -> list[str]:
    """
    Worker `worker`'s command line: a torchrun node of a c10d multi-node launch (`launcher="torchrun"`) or the command
    itself (`"env"`, one process per worker: `nproc_per_node` must be 1).
    """
    if launcher == "env":
        if nproc_per_node != 1:
            raise ValueError(f"--nproc_per_node={nproc_per_node} needs --launcher torchrun (env starts one process).")
        return list(command)
    script = list(command)
    if script and Path(script[0]).name.startswith("python"):
        script = script[1:]  # `torchrun python x.py` would run python as the script
    return [
        sys.executable, "-m", "torch.distributed.run", "--nnodes", str(testbed.workers), "--nproc_per_node",
        str(nproc_per_node), "--rdzv_backend", "c10d", "--rdzv_endpoint", f"{testbed.address(0)}:{MASTER_PORT}",
        "--rdzv_id", testbed.switch, "--rdzv_conf", f"is_host={int(worker == 0)}", "--local_addr",
        testbed.address(worker), *script,
    ]  # fmt: skip


def worker_env(testbed: Testbed, worker: int, launcher: str) -> dict[str, str]:
    if launcher != "env":
        return {}  # torchrun sets the rest
    return {"MASTER_ADDR": testbed.address(0), "MASTER_PORT": str(MASTER_PORT), "RANK": str(worker),
            "WORLD_SIZE": str(testbed.workers), "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1"}  # fmt: skip


@dataclass
class RunResult:
    """
    What a launched command did: exit codes, wall time, rank 0's evaluations as (training s, metrics), and the bytes
    each worker sent (`link_tx_bytes[i]`) and received (`link_rx_bytes[i]`) across its link during the run (counted,
    see `Testbed.link_bytes`). `link_samples` (with `sample_s`): `[s since launch, bytes sent by worker 0, 1, ...]`
    every `sample_s` seconds, counted from the launch.
    """

    returncodes: list[int]
    wall_s: float
    evaluations: list[tuple[float, dict]]
    log_dir: str
    link_tx_bytes: list[int] = field(default_factory=list)
    link_rx_bytes: list[int] = field(default_factory=list)
    link_samples: list[list[float]] = field(default_factory=list)


def launch(
    testbed: Testbed,
    command: Sequence[str],
    launcher: str = "torchrun",
    nproc_per_node: int = 1,
    timeout_s: float | None = None,
    echo: bool = True,
    sample_s: float = 0.0,
) -> RunResult:
    """
    Run `command` on every worker of `testbed` and wait for all; kill them all if one fails or the time runs out.

    Rank 0's output is echoed (with `echo`) and scanned for evaluation metrics; every worker's output is kept in
    `<log_dir>/worker<i>.log`. The link counters are read before the launch and after every process has ended (and
    every `sample_s` seconds in between if `sample_s` > 0).
    """
    log_dir = tempfile.mkdtemp(prefix="netns_testbed_")
    procs: list[subprocess.Popen] = []
    evaluations: list[tuple[float, dict]] = []
    samples: list[list[float]] = []
    before = testbed.link_bytes()
    start = time.perf_counter()
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(sample_s):
            now = testbed.link_bytes()
            samples.append(
                [round(time.perf_counter() - start, 2), *(tx - tx0 for (tx, _), (tx0, _) in zip(now, before))]
            )

    def follow(proc: subprocess.Popen, log_path: str) -> None:
        eval_s = 0.0
        with open(log_path, "w") as log:
            for line in proc.stdout:
                now = time.perf_counter() - start
                log.write(line)
                log.flush()
                if echo:
                    sys.stdout.write(line)
                    sys.stdout.flush()
                metrics = parse_metrics(line)
                if metrics is not None:
                    eval_s += float(metrics.get("eval_runtime", 0.0))
                    evaluations.append((now - eval_s, metrics))

    threads = []
    if sample_s > 0:
        threads.append(threading.Thread(target=sample, daemon=True))
        threads[-1].start()
    try:
        for i in range(testbed.workers):
            argv = worker_argv(testbed, i, command, launcher, nproc_per_node)
            log_path = f"{log_dir}/worker{i}.log"
            if i == 0:
                proc = testbed.popen(i, argv, worker_env(testbed, i, launcher), stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True)  # fmt: skip
                threads.append(threading.Thread(target=follow, args=(proc, log_path), daemon=True))
                threads[-1].start()
            else:
                with open(log_path, "w") as log:
                    proc = testbed.popen(
                        i, argv, worker_env(testbed, i, launcher), stdout=log, stderr=subprocess.STDOUT
                    )
            procs.append(proc)
        deadline = None if timeout_s is None else start + timeout_s
        while any(p.poll() is None for p in procs):
            if any(p.poll() not in (None, 0) for p in procs) or (
                deadline is not None and time.perf_counter() > deadline
            ):
                break  # one failed (the others would wait for it forever) or out of time
            time.sleep(0.2)
    finally:
        for proc in procs:
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            proc.wait()
        stop.set()
        for thread in threads:
            thread.join(timeout=10)
    wall_s = time.perf_counter() - start
    after = testbed.link_bytes()
    return RunResult(
        [p.returncode for p in procs],
        wall_s,
        evaluations,
        log_dir,
        link_tx_bytes=[tx - tx0 for (tx, _), (tx0, _) in zip(after, before)],
        link_rx_bytes=[rx - rx0 for (_, rx), (_, rx0) in zip(after, before)],
        link_samples=samples,
    )


# ------------------------------------------------------------------------------------------------------- compare
def time_to_target(evaluations: list[tuple[float, dict]], metric: str, target: float) -> float | None:
    """The training time of the first evaluation whose `metric` reaches `target` (None if none did)."""
    return next((t for t, m in evaluations if metric in m and m[metric] >= target), None)


_LONG_KEYS = ("evaluations", "link_samples")  # in --output_json, not in the line printed after each run


def compare(args: argparse.Namespace, command: list[str]) -> list[dict]:
    """Every `--method` at every `--rates` entry; returns one row per (rate, method) and prints a markdown table."""
    methods = []
    for spec in args.method:
        name, _, flags = spec.partition("=")
        methods.append((name, flags.split()))
    rows = []
    for rate in args.rates:
        with Testbed(args.workers, rate) as testbed:
            measured = measure_throughput(testbed) if args.measure else None
            for name, flags in methods:
                result = launch(
                    testbed, command + flags, args.launcher, args.nproc_per_node, args.timeout, args.echo,
                    args.link_samples,
                )  # fmt: skip
                finals = [m for _, m in result.evaluations if args.metric in m]
                per_node_mib = sum(result.link_tx_bytes) / len(result.link_tx_bytes) / 2**20
                rows.append(
                    {
                        "rate": rate,
                        "measured_mbit_s": None if measured is None else measured / 1e6,
                        "method": name,
                        "flags": " ".join(flags),
                        "returncodes": result.returncodes,
                        "wall_s": result.wall_s,
                        "time_to_target_s": time_to_target(result.evaluations, args.metric, args.target),
                        "final": finals[-1][args.metric] if finals else None,
                        "nproc_per_node": args.nproc_per_node,
                        "link_tx_bytes": result.link_tx_bytes,
                        "link_rx_bytes": result.link_rx_bytes,
                        "link_mib_sent_per_node": per_node_mib,
                        "link_mib_sent_per_process": per_node_mib / args.nproc_per_node,
                        "evaluations": [[t, m] for t, m in result.evaluations],
                        "link_samples": result.link_samples,
                        "log_dir": result.log_dir,
                    }
                )
                print(json.dumps({k: v for k, v in rows[-1].items() if k not in _LONG_KEYS}), flush=True)
    print(compare_table(rows, args.metric, args.target))
    if args.output_json:
        Path(args.output_json).write_text(json.dumps(rows, indent=2))
    return rows


def compare_table(rows: list[dict], metric: str, target: float) -> str:
    """The markdown table of `compare`'s rows."""
    lines = [
        f"| link (each direction) | method | time to {metric} >= {target:g} (s) | final {metric} "
        "| total wall time (s) | link MiB sent per node | per process |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        ttt = "not reached" if row["time_to_target_s"] is None else f"{row['time_to_target_s']:.0f}"
        final = "-" if row["final"] is None else f"{row['final']:.4f}"
        failed = "" if all(rc == 0 for rc in row["returncodes"]) else f" (failed: exit codes {row['returncodes']})"
        link = row["rate"] + (
            "" if row["measured_mbit_s"] is None else f" (measured {row['measured_mbit_s']:.0f} Mbit/s)"
        )
        node, process = (
            ("-", "-")
            if row.get("link_mib_sent_per_node") is None
            else (f"{row['link_mib_sent_per_node']:.1f}", f"{row['link_mib_sent_per_process']:.1f}")
        )
        lines.append(
            f"| {link} | {row['method']} | {ttt} | {final} | {row['wall_s']:.0f}{failed} | {node} | {process} |"
        )
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------- main
def _on_signal(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)  # unwinds through every `finally`, so the namespaces are removed


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, default=2, help="Worker namespaces (default: %(default)s).")
    parser.add_argument("--rate", default="100mbit", help="Rate of every link, each direction (default: %(default)s).")
    parser.add_argument(
        "--launcher",
        default="torchrun",
        choices=("torchrun", "env"),
        help="torchrun: one torchrun node per worker (the command is a script and its arguments); env: the command "
        "itself, with RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT set (default: %(default)s).",
    )
    parser.add_argument(
        "--nproc_per_node",
        type=int,
        default=1,
        help="Processes per worker (a 'machine'; torchrun launcher only): they talk to each other unshaped, to other "
        "workers across the shaped links (default: %(default)s).",
    )
    parser.add_argument("--timeout", type=float, default=None, help="Kill a run after this many seconds.")
    parser.add_argument("--selftest", action="store_true", help="Measure TCP throughput worker 0 -> 1 and exit.")
    parser.add_argument(
        "--cleanup", action="store_true", help="Delete namespaces left by testbeds that no longer run, and exit."
    )
    compare_group = parser.add_argument_group("compare methods (time to a target metric)")
    compare_group.add_argument("--compare", action="store_true", help="Run every --method at every --rates entry.")
    compare_group.add_argument("--rates", nargs="+", default=["100mbit", "1gbit"], help="Link rates to compare.")
    compare_group.add_argument(
        "--method",
        action="append",
        default=[],
        help="NAME=FLAGS: a method and the flags it appends to the command (repeat; e.g. ddp= 'dppf=--dppf').",
    )
    compare_group.add_argument("--metric", default="eval_accuracy", help="Metric to reach (default: %(default)s).")
    compare_group.add_argument("--target", type=float, default=0.9, help="Target value (default: %(default)s).")
    compare_group.add_argument("--measure", action="store_true", help="Also measure each rate's TCP throughput.")
    compare_group.add_argument(
        "--output_json", default=None, help="Write every run's evaluations and link byte counts to this file."
    )
    compare_group.add_argument(
        "--link_samples",
        type=float,
        default=0.0,
        metavar="S",
        help="Also record every worker's bytes sent across its link every S seconds (in --output_json; default: "
        "only before and after each run).",
    )
    compare_group.add_argument("--no_echo", dest="echo", action="store_false", help="Do not echo rank 0's output.")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- then the training command.")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if args.launcher == "env" and args.nproc_per_node != 1:
        raise SystemExit("netns_testbed: --launcher env starts one process per worker; use --launcher torchrun.")
    check_requirements()
    if args.cleanup:
        removed = cleanup_leftovers()
        print(f"removed {len(removed)} leftover namespaces: {removed}")
        return 0
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    if args.selftest:
        with Testbed(args.workers, args.rate) as testbed:
            bits = measure_throughput(testbed)
        print(
            f"{args.rate}: measured {bits / 1e6:.1f} Mbit/s TCP goodput ({bits / testbed.bits_per_s:.1%} of the rate)"
        )
        return 0
    if not command:
        raise SystemExit("netns_testbed: give the command to run after `--` (or --selftest / --cleanup).")
    if args.compare:
        if not args.method:
            raise SystemExit("netns_testbed: --compare needs at least one --method NAME=FLAGS.")
        rows = compare(args, command)
        return 0 if all(rc == 0 for row in rows for rc in row["returncodes"]) else 1
    with Testbed(args.workers, args.rate) as testbed:
        result = launch(testbed, command, args.launcher, args.nproc_per_node, args.timeout)
    sent = ", ".join(f"{tx / 2**20:.1f}" for tx in result.link_tx_bytes)
    received = ", ".join(f"{rx / 2**20:.1f}" for rx in result.link_rx_bytes)
    print(f"exit codes {result.returncodes}, {result.wall_s:.1f} s; logs in {result.log_dir}", flush=True)
    print(f"MiB sent across each worker's link: {sent}; received: {received}", flush=True)
    return 0 if all(rc == 0 for rc in result.returncodes) else 1


if __name__ == "__main__":
    sys.exit(main())
