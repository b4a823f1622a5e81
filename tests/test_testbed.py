"""
The bandwidth-limited testbed (scripts/netns_testbed.py): the shaping is real, gloo runs across it at the shaped rate,
its link byte counters count what a collective sends, a multi-node torchrun launch (several processes per namespace)
puts fast links inside a node and the shaped ones between nodes, and no namespace outlives the testbed: not after a
normal run, a failing command, or a SIGTERM. Also that accelerate reads accelerate_configs/multi_node_gpu.yaml as a
2-machine launch.

The testbed tests need root and iproute2 (`ip`, `tc`); they are skipped only where either is missing.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.dist_utils import cpu_env, load_script

needs_root = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("ip") is None or shutil.which("tc") is None,
    reason="the testbed needs root and iproute2 (ip, tc)",
)
RATE = "50mbit"
REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "netns_testbed.py"
ALL_REDUCE = """
import time, torch, torch.distributed as dist
dist.init_process_group("gloo")
x = torch.full((1_250_000,), float(dist.get_rank() + 1))  # 5 MB of fp32
dist.barrier(); start = time.perf_counter(); dist.all_reduce(x); seconds = time.perf_counter() - start
print({"eval_sum": x.sum().item(), "eval_seconds": seconds, "eval_runtime": 0.0}, flush=True)
dist.barrier(); dist.destroy_process_group()
"""


def live_namespaces(prefix: str = "dppftb-") -> list[str]:
    """The network namespaces whose names start with `prefix` (every testbed's by default)."""
    listing = subprocess.run(["ip", "netns", "list"], check=True, capture_output=True, text=True).stdout
    return [line.split()[0] for line in listing.splitlines() if line.startswith(prefix)]


def namespaces_of(pid: int) -> list[str]:
    return live_namespaces(f"dppftb-{pid}-")


PER_NODE = """
import os, subprocess, time, torch, torch.distributed as dist
dist.init_process_group("gloo")
rank = dist.get_rank()
netns = subprocess.run(["ip", "netns", "identify", str(os.getpid())], capture_output=True, text=True).stdout.strip()
env = [os.environ[k] for k in ("WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK")]
seen = [None] * dist.get_world_size()
dist.all_gather_object(seen, [rank, netns, *env])
node = [dist.new_group([0, 1]), dist.new_group([2, 3])][rank // 2]
across = dist.new_group([0, 2])  # one process per node, so nothing else shares the link

def timed(group, member):
    x = torch.ones(1_250_000)  # 5 MB of fp32
    if member:
        dist.all_reduce(torch.ones(1), group=group)  # warm-up
    dist.barrier()
    start = time.perf_counter()
    if member:
        dist.all_reduce(x, group=group)
    return time.perf_counter() - start, x[0].item()

inside = min(timed(node, True) for _ in range(3))  # both nodes at once, each inside its own namespace
across_s = timed(across, rank in (0, 2))
if rank == 0:
    print({"eval_seen": seen, "eval_inside": inside, "eval_across": across_s}, flush=True)
dist.barrier()
dist.destroy_process_group()
"""


@pytest.fixture(scope="module")
def testbed_module():
    return load_script("netns_testbed")


@needs_root
def test_shaped_link_and_all_reduce_across_it(testbed_module, tmp_path):
    tb = testbed_module
    script = tmp_path / "all_reduce.py"
    script.write_text(ALL_REDUCE)
    with tb.Testbed(2, RATE) as testbed:
        assert namespaces_of(os.getpid()) != []
        goodput = tb.measure_throughput(testbed, seconds=1.5)
        # TCP goodput over a tbf link: the rate less the Ethernet/IP/TCP headers (1448 of 1514 bytes, ~0.956)
        assert 0.8 * testbed.bits_per_s <= goodput <= 1.0 * testbed.bits_per_s, goodput
        result = tb.launch(testbed, [sys.executable, str(script)], launcher="env", echo=False, timeout_s=120)
    assert result.returncodes == [0, 0]
    ((_, metrics),) = result.evaluations
    assert metrics["eval_sum"] == 3.0 * 1_250_000  # ranks hold 1 and 2: exact in fp32
    # a 2-rank ring all-reduce sends each rank's 5 MB once (half in reduce-scatter, half in all-gather): at the rate it
    # takes >= 5e6 * 8 / rate, which an unshaped veth (> 10 Gbit/s) would beat by two orders of magnitude
    assert metrics["eval_seconds"] >= 0.9 * 5e6 * 8 / testbed.bits_per_s
    assert namespaces_of(os.getpid()) == []


@needs_root
def test_link_counters_count_an_all_reduce(testbed_module, tmp_path):
    """A 2-rank all-reduce of B bytes sends B per rank; the counters see it with its headers, and nothing when idle."""
    tb = testbed_module
    script = tmp_path / "all_reduce.py"
    script.write_text(ALL_REDUCE)
    with tb.Testbed(2, "1gbit") as testbed:
        idle = tb.launch(testbed, ["true"], launcher="env", echo=False, timeout_s=30, sample_s=0.2)
        result = tb.launch(
            testbed, [sys.executable, str(script)], launcher="env", echo=False, timeout_s=60, sample_s=0.2
        )
    assert idle.returncodes == result.returncodes == [0, 0]
    assert max(idle.link_tx_bytes + idle.link_rx_bytes) < 2_000  # nothing but a stray IPv6 neighbour discovery frame
    payload = 5_000_000  # the ring's reduce-scatter and all-gather each send half of each rank's 5 MB
    for sent in result.link_tx_bytes:
        # frames carry the payload plus TCP/IP/Ethernet headers (~4.6 % of a 1514-byte frame) and the ACKs of what
        # the rank receives (~2 %); the rendezvous, connection set-up and barriers add a few kB: measured ~1.06 x
        assert payload <= sent <= 1.10 * payload, result.link_tx_bytes
    # what one worker sends is what the other receives (give or take a few ARP frames)
    sent, received = result.link_tx_bytes, result.link_rx_bytes
    assert abs(received[1] - sent[0]) < 10_000 and abs(received[0] - sent[1]) < 10_000, (sent, received)
    times = [sample[0] for sample in result.link_samples]
    assert times == sorted(times) and len(times) >= 2
    for worker in range(2):  # cumulative counts from the launch: they only grow, up to the run's total
        counts = [sample[1 + worker] for sample in result.link_samples]
        assert counts == sorted(counts) and counts[-1] <= result.link_tx_bytes[worker]


@needs_root
def test_torchrun_launcher_and_cleanup_after_a_failing_command(testbed_module, tmp_path):
    tb = testbed_module
    script = tmp_path / "fail_on_rank_1.py"
    script.write_text(
        "import os, sys, time\nif os.environ['RANK'] == '1': sys.exit(3)\ntime.sleep(60)\n"  # rank 0 would wait
    )
    start = time.perf_counter()
    with pytest.raises(RuntimeError, match="boom"):
        with tb.Testbed(2, RATE) as testbed:
            result = tb.launch(testbed, [str(script)], launcher="torchrun", echo=False, timeout_s=60)
            raise RuntimeError("boom")  # a failure inside the block still removes the namespaces
    assert result.returncodes[0] != 0 and result.returncodes[1] != 0  # torchrun reports the failure; rank 0 killed
    assert time.perf_counter() - start < 50  # the survivor was killed, not waited for
    assert namespaces_of(os.getpid()) == []


@needs_root
def test_sigterm_removes_the_namespaces():
    tool = subprocess.Popen(
        [sys.executable, str(SCRIPT), "--workers", "3", "--rate", RATE, "--launcher", "env", "--", "sleep", "60"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while len(namespaces_of(tool.pid)) < 4 and time.monotonic() < deadline:  # 3 workers + the switch
            time.sleep(0.1)
        assert len(namespaces_of(tool.pid)) == 4
        tool.send_signal(signal.SIGTERM)
        assert tool.wait(timeout=30) != 0
    finally:
        if tool.poll() is None:
            tool.kill()
    assert namespaces_of(tool.pid) == []


@needs_root
def test_cleanup_removes_only_leftovers_of_dead_testbeds(testbed_module):
    tb = testbed_module
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    leftover = f"dppftb-{int(dead.stdout)}-w0"  # as a SIGKILLed testbed would leave it
    subprocess.run(["ip", "netns", "add", leftover], check=True)
    try:
        with tb.Testbed(2, RATE) as testbed:  # alive: must survive the cleanup
            removed = tb.cleanup_leftovers()
            assert removed == [leftover]
            assert sorted(namespaces_of(os.getpid())) == sorted([*testbed.namespaces, testbed.switch])
    finally:
        subprocess.run(["ip", "netns", "delete", leftover], capture_output=True)


@needs_root
def test_refuses_bad_rates_and_sizes(testbed_module):
    tb = testbed_module
    assert tb.parse_rate("100mbit") == 100_000_000 and tb.parse_rate("1gbit") == 10**9
    with pytest.raises(ValueError, match="--rate='100mb'"):
        tb.parse_rate("100mb")
    with pytest.raises(ValueError, match=r"--workers=1 is invalid: it must be in \[2, 200\]"):
        tb.Testbed(1, RATE)
    with pytest.raises(SystemExit, match="--launcher env starts one process per worker"):
        tb.main(["--launcher", "env", "--nproc_per_node", "2", "--", "true"])
    with pytest.raises(ValueError, match="--nproc_per_node=2 needs --launcher torchrun"):
        tb.worker_argv(tb.Testbed(2, RATE), 0, ["true"], "env", 2)
    # c10d orders nodes by address as strings: worker i must sort i-th (also past 10 and 100 workers)
    addresses = [tb.Testbed(200, RATE).address(i) for i in range(200)]
    assert sorted(addresses) == addresses and len(set(addresses)) == 200


@needs_root
def test_compare_times_exclude_evaluation(testbed_module, tmp_path):
    # rank 0 "evaluates" twice, 1.5 s apart, each evaluation reporting 1.0 s of eval_runtime: 0.5 s of training between
    tb = testbed_module
    script = tmp_path / "evaluations.py"
    script.write_text(
        "import os, time\n"
        "if os.environ['RANK'] == '0':\n"
        "    print({'eval_accuracy': '0.5', 'eval_runtime': '1.0'}, flush=True); time.sleep(1.5)\n"
        "    print({'eval_accuracy': '0.95', 'eval_runtime': '1.0'}, flush=True)\n"
    )
    with tb.Testbed(2, RATE) as testbed:
        result = tb.launch(testbed, [sys.executable, str(script)], launcher="env", echo=False, timeout_s=60)
    assert result.returncodes == [0, 0]
    (t1, first), (t2, second) = result.evaluations
    assert (first["eval_accuracy"], second["eval_accuracy"]) == (0.5, 0.95)
    assert 0.45 <= t2 - t1 <= 1.0  # 1.5 s of wall time less the second evaluation's 1.0 s
    assert tb.time_to_target(result.evaluations, "eval_accuracy", 0.9) == t2
    assert tb.time_to_target(result.evaluations, "eval_accuracy", 0.99) is None
    row = {"rate": RATE, "measured_mbit_s": None, "method": "x", "returncodes": [0, 1], "wall_s": 3.0,
           "time_to_target_s": None, "final": 0.95, "link_mib_sent_per_node": 12.34,
           "link_mib_sent_per_process": 6.17}  # fmt: skip
    assert "| 50mbit | x | not reached | 0.9500 | 3 (failed: exit codes [0, 1]) | 12.3 | 6.2 |" in tb.compare_table(
        [row], "eval_accuracy", 0.9
    )


@needs_root
def test_bench_across_links_table_matches_runs(tmp_path):
    """`scripts/bench_consensus.py --rates`: a loopback and a shaped run, and a table that is exactly those runs."""
    out, out_json = tmp_path / "links.md", tmp_path / "links.json"
    before = set(live_namespaces())
    cmd = [sys.executable, str(SCRIPT.parent / "bench_consensus.py"), "--model", "bert-tiny", "--repeats", "1"]
    cmd += ["--skip_localsgd", "--rates", RATE, "--output", str(out), "--output_json", str(out_json)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=cpu_env())
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    loopback, shaped = json.loads(out_json.read_text())
    floor = "flat all-reduce (floor)"
    # 2 ranks: the ring sends each rank's fp32 parameters once, so across the link it takes >= their bits / rate
    bits = shaped["parameters"] * 4 * 8
    assert shaped["methods"][floor]["median_ms"] / 1e3 >= 0.9 * bits / 50e6
    assert loopback["methods"][floor]["median_ms"] < shaped["methods"][floor]["median_ms"] / 5
    rows = out.read_text().splitlines()[4:]
    assert [row.split(" | ")[0] for row in rows] == ["| loopback (no shaping)", f"| {RATE} (0.05 Gbit/s)"]
    for row, result in zip(rows, (loopback, shaped)):
        cells = row.strip("| ").split(" | ")[1:]
        expected = [f"{result['methods'][floor]['median_ms']:.0f} ms"] + [
            f"{m['median_ms']:.0f} ms ({m['ratio']:.2f}x)" for name, m in result["methods"].items() if name != floor
        ]
        assert cells == expected
    assert set(live_namespaces()) == before  # the sweep removed its namespaces


@needs_root
def test_two_nodes_of_two_processes_fast_inside_shaped_across(testbed_module, tmp_path):
    """The CLI's multi-node launch (torchrun c10d, --nproc_per_node 2), through --compare: a node is one namespace."""
    script, out_json = tmp_path / "per_node.py", tmp_path / "rows.json"
    script.write_text(PER_NODE)
    cmd = [sys.executable, str(SCRIPT), "--workers", "2", "--nproc_per_node", "2", "--compare", "--rates", RATE]
    cmd += ["--method", "2x2=", "--timeout", "90", "--no_echo", "--output_json", str(out_json), "--link_samples", "1"]
    cmd += ["--", str(script)]
    tool = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=cpu_env())
    try:
        output, _ = tool.communicate(timeout=150)
    finally:
        tool.kill()
    assert tool.returncode == 0, output[-4000:]
    ((row,),) = [json.loads(out_json.read_text())]
    ((_, metrics),) = row["evaluations"]
    # ranks 0,1 are node 0 in worker 0's namespace, ranks 2,3 node 1 in worker 1's: what `--dppf_replica_size 2` needs
    assert metrics["eval_seen"] == [
        [rank, f"dppftb-{tool.pid}-w{rank // 2}", "4", str(rank % 2), "2", str(rank // 2)] for rank in range(4)
    ]
    (inside_s, inside_sum), (across_s, across_sum) = metrics["eval_inside"], metrics["eval_across"]
    assert inside_sum == across_sum == 2.0  # two ones summed, in either group
    wire_s = 5e6 * 8 / testbed_module.parse_rate(RATE)  # a 2-rank ring sends each rank's 5 MB once
    assert across_s >= 0.9 * wire_s, metrics
    assert inside_s <= 0.2 * wire_s, metrics  # local delivery: far faster than the shaped link
    # the link counters see the one 5 MB all-reduce across (each node sends 5 MB and headers) and none of the three
    # inside a node (15 MB per node, local delivery); the rest is the rendezvous and the process groups' set-up
    for sent in row["link_tx_bytes"]:
        assert 5e6 <= sent <= 1.15 * 5e6, row["link_tx_bytes"]
    assert row["link_mib_sent_per_node"] == sum(row["link_tx_bytes"]) / 2 / 2**20
    assert row["link_mib_sent_per_process"] == row["link_mib_sent_per_node"] / 2
    assert row["link_samples"] and all(len(sample) == 3 for sample in row["link_samples"])
    assert " | 2x2 | " in output and f" | {row['link_mib_sent_per_node']:.1f} | " in output  # the table's columns
    assert namespaces_of(tool.pid) == []


def test_multi_node_accelerate_config_is_a_two_machine_launch(monkeypatch):
    """What torchrun gets from `accelerate launch --config_file <multi_node_gpu.yaml> --machine_rank 1 train.py`."""
    import torch.distributed.run as distrib_run
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.commands.launch import _filter_args, _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_multi_gpu_env

    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # else torchrun's config_from_args sets it in os.environ
    path = str(REPO / "accelerate_configs" / "multi_node_gpu.yaml")
    config = load_config_from_file(path)
    assert (config.distributed_type, config.num_machines, config.num_processes, config.machine_rank) == (
        "MULTI_GPU", 2, 16, 0
    )  # fmt: skip
    assert (config.rdzv_backend, config.same_network) == ("static", True)
    script_args = ["--dppf", "--dppf_replica_size", "8"]
    args = launch_command_parser().parse_args(["--config_file", path, "--machine_rank", "1", "train.py", *script_args])
    args, _, _ = _validate_launch_command(args)
    prepare_multi_gpu_env(args)  # machine 1: no check that the port is free here
    torchrun_args = _filter_args(
        args,
        distrib_run.get_args_parser(),
        ["--training_script", args.training_script, "--training_script_args", args.training_script_args],
    )
    launch, _, argv = distrib_run.config_from_args(torchrun_args)
    assert (launch.min_nodes, launch.max_nodes, launch.nproc_per_node, launch.rdzv_backend) == (2, 2, 8, "static")
    assert launch.rdzv_endpoint == f"{config.main_process_ip}:{config.main_process_port}"
    assert launch.rdzv_configs["rank"] == 1  # the node rank: --machine_rank overrides the file's 0
    assert argv[-4:] == ["train.py", *script_args]
