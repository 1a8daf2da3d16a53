"""Training across nodes with torchrun's own c10d rendezvous: two "nodes" on this machine,
each a launcher of its own (``--nnodes 2 --nproc_per_node 1``) meeting at one endpoint,
which assigns their node ranks. The commands are docs/scaling.md's.

Checked: each rank reads its own part of the data (the line every rank prints at start-up),
only rank 0's node writes checkpoints and experiment records (each node has its own
working directory, as separate machines have separate disks), and two nodes train exactly
what one node with two processes trains. A node killed mid-run (its launcher and its
worker, as when a machine dies) ends the job on the other node within seconds, and both
launchers started again with ``--resume`` finish the run as if nothing had happened.
"""

from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from models_src.checkpoint import load_checkpoint
from models_src.records import query

from .cluster import node_args
from .processes import Tracked, alive, free_port, wait_for_port

ROOT = Path(__file__).resolve().parents[2]
STEPS, BATCH, SEQ = 40, 8, 32
#: The tolerance tests/training/test_training.py holds a resumed run's validation loss to.
TOLERANCE = 1e-6
RANK_LINE = re.compile(r"^rank (\d+) of (\d+) \(node (\d+), local rank (\d+)\): (.*)$", re.M)
SHARD = re.compile(r"training tokens \[(\d+), (\d+)\)")
WORDS = "the a cat dog bird sat ran saw ate on under near big small red mat tree house".split()
# torchrun sets these for its workers; one leaking in from the caller would confuse a launcher
TORCHRUN_VARIABLES = ("MASTER_", "RANK", "WORLD_SIZE", "LOCAL_", "GROUP_", "ROLE_", "TORCHELASTIC_")

pytestmark = [pytest.mark.train, pytest.mark.subprocess]  # torchrun launchers, each a child process


def make_corpus(path: Path) -> Path:
    rng = random.Random(0)
    lines = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 9))).capitalize() + "."
             for _ in range(3000)]
    path.write_text("\n".join(lines) + "\n")
    return path


def write_config(folder: Path, arch: str, *, shared: bool) -> Path:
    """A tiny run on a generated text. ``shared``: its outputs at absolute paths (a shared
    filesystem, which --resume needs: every rank loads last/); otherwise relative to each
    launcher's working directory (every node its own disk)."""
    folder.mkdir(parents=True, exist_ok=True)
    corpus = make_corpus(folder / "corpus.txt")
    model = (dict(arch=arch, n_layer=2, n_head=2, n_embd=32, block_size=SEQ) if arch == "gpt"
             else dict(arch=arch, n_layer=2, n_embd=32, n_hidden=48))
    out = folder if shared else Path(".")
    raw = {"name": f"tiny-{arch}", "model": model,
           "data": {"path": str(corpus), "cache_dir": str(out / "cache"), "max_seq_len": SEQ},
           "tokenizer": {"kind": "char"},
           "training": {"batch_size": BATCH, "learning_rate": 3e-3, "max_steps": STEPS,
                        "warmup_steps": 5, "eval_every": 10, "eval_batches": 4, "save_every": 5,
                        "num_threads": 1},
           "output": {"dir": str(out / "runs" / "{name}"), "experiments_dir": str(out / "exp")}}
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def environment() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(TORCHRUN_VARIABLES)}
    return {**env, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def launch(config: Path, cwd: Path, log: Path, torchrun: list[str], *extra: str) -> Tracked:
    cwd.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        return Tracked([sys.executable, "-m", "torch.distributed.run", *torchrun, "-m", "training.train",
                        "--config", str(config), "--quiet", *extra],
                       cwd=cwd, env=environment(), stdout=out, stderr=subprocess.STDOUT)


def start_nodes(config: Path, cwds: list[Path], logs: list[Path], *extra: str) -> list[Tracked]:
    """Two launchers at one fresh endpoint. The first hosts the rendezvous store (the first
    to bind its port does): the second starts once the port accepts, so which is which is
    known."""
    port = free_port()
    endpoint, run_id = f"127.0.0.1:{port}", f"fable-{port}"
    nodes = [launch(config, cwds[0], logs[0], node_args(endpoint, run_id), *extra)]
    try:
        wait_for_port(port, 120, nodes[0].process)
        nodes.append(launch(config, cwds[1], logs[1], node_args(endpoint, run_id), *extra))
    except BaseException:
        nodes[0].kill()
        raise
    return nodes


def finish(nodes: list[Tracked], logs: list[Path], timeout: float = 300) -> None:
    """Wait for every launcher to exit 0 (each is killed, with its workers, on the way out)."""
    deadline = time.monotonic() + timeout
    try:
        for node, log in zip(nodes, logs):
            while node.process.poll() is None:
                node.look()
                assert time.monotonic() < deadline, f"no end in {timeout:g} s:\n" + "\n".join(map(tail, logs))
                time.sleep(0.1)
            assert node.process.returncode == 0, tail(log)
    finally:
        for node in nodes:
            node.stop()


def tail(log: Path, chars: int = 3000) -> str:
    return log.read_text(errors="replace")[-chars:]


def rank_lines(*logs: Path) -> list[tuple[int, int, int, int, str]]:
    """(rank, world, node, local rank, what it reads) of every rank's start-up line."""
    return [(int(r), int(w), int(n), int(lr), reads)
            for log in logs for r, w, n, lr, reads in RANK_LINE.findall(log.read_text(errors="replace"))]


def run_dir(root: Path, arch: str) -> Path:
    return root / "runs" / f"tiny-{arch}"


@pytest.fixture(scope="module")
def two_node_runs(tmp_path_factory):
    """``run(arch)``: the uninterrupted two-node run of that architecture, each node in a
    working directory of its own: (node directories, logs), run once per module."""
    done: dict[str, tuple[list[Path], list[Path]]] = {}

    def run(arch: str):
        if arch not in done:
            folder = tmp_path_factory.mktemp(f"two-nodes-{arch}")
            config = write_config(folder, arch, shared=False)
            cwds = [folder / "node-a", folder / "node-b"]
            logs = [folder / "node-a.log", folder / "node-b.log"]
            finish(start_nodes(config, cwds, logs), logs)
            done[arch] = (cwds, logs)
        return done[arch]
    return run


def final_of(cwds: list[Path], arch: str):
    [writer] = [cwd for cwd in cwds if (run_dir(cwd, arch) / "final").is_dir()]
    return load_checkpoint(run_dir(writer, arch) / "final")


def test_two_nodes_read_their_own_shards_and_train_what_one_node_trains(tmp_path, two_node_runs):
    arch = "lstm"  # a recurrent model reads contiguous shards of the stream (training/batches.py)
    cwds, logs = two_node_runs(arch)

    # One line per rank, from the launcher that ran it: two nodes, one process on each.
    per_log = [rank_lines(log) for log in logs]
    assert [len(lines) for lines in per_log] == [1, 1], [tail(log) for log in logs]
    lines = sorted(per_log[0] + per_log[1])
    assert [(rank, world, node, local) for rank, world, node, local, _ in lines] == [
        (0, 2, 0, 0), (1, 2, 1, 0)]
    shards = [tuple(map(int, SHARD.search(reads).groups())) for *_, reads in lines]
    (start0, end0), (start1, end1) = shards
    assert start0 == 0 < end0 == start1 < end1 and end1 - start1 == end0  # halves, disjoint

    # Rank 0's node alone wrote checkpoints and records; the other's disk holds neither.
    writer = next(cwd for cwd, log in zip(cwds, logs) if rank_lines(log)[0][0] == 0)
    other = next(cwd for cwd in cwds if cwd != writer)
    assert sorted(p.name for p in (writer / "runs").iterdir()) == [f"tiny-{arch}"]
    assert {"last", "best", "final"} <= {p.name for p in run_dir(writer, arch).iterdir()}
    assert len(list((writer / "exp").rglob("*.parquet"))) == 1
    assert not (other / "runs").exists() and not (other / "exp").exists()
    runs = query(writer / "exp", "SELECT count(DISTINCT run_id) AS n FROM experiments")
    assert runs[0]["n"] == 1

    # The same run on one node, two processes: the same shards, the same model.
    config = write_config(tmp_path, arch, shared=False)
    log = tmp_path / "one-node.log"
    finish([launch(config, tmp_path / "one", log, ["--standalone", "--nnodes", "1", "--nproc_per_node", "2"])],
           [log])
    one_lines = sorted(rank_lines(log))
    assert [(rank, node, local) for rank, _, node, local, _ in one_lines] == [(0, 0, 0), (1, 0, 1)]
    assert [reads for *_, reads in one_lines] == [reads for *_, reads in lines]
    one = load_checkpoint(run_dir(tmp_path / "one", arch) / "final")
    two = final_of(cwds, arch)
    for final in (one, two):
        assert final.training.hardware.startswith("2 x ")
        assert final.training.tokens_seen == STEPS * BATCH * SEQ * 2 and final.training.finished
    assert abs(two.training.val_loss - one.training.val_loss) < TOLERANCE
    weights_one, weights_two = one.model.state_dict(), two.model.state_dict()
    assert all(torch.allclose(weights_one[k], weights_two[k], rtol=0, atol=TOLERANCE) for k in weights_one)


@pytest.mark.parametrize("arch, victim", [("gpt", 0), ("lstm", 1)],
                         ids=["gpt-kill-the-rendezvous-host", "lstm-kill-the-other-node"])
def test_a_node_killed_mid_run_ends_the_job_and_both_resume_from_last(tmp_path, two_node_runs, arch, victim):
    """``victim``: which launcher dies, the first (it hosts the rendezvous store) or the second."""
    config = write_config(tmp_path, arch, shared=True)
    last = run_dir(tmp_path, arch) / "last"
    logs = [tmp_path / "node-a.log", tmp_path / "node-b.log"]
    nodes = start_nodes(config, [tmp_path / "node-a", tmp_path / "node-b"], logs)
    try:
        deadline = time.monotonic() + 180
        while not (last / "trainer_state.pt").exists():  # the first save (step 5 of 40)
            for node, log in zip(nodes, logs):
                node.look()
                assert node.process.poll() is None, tail(log)
            assert time.monotonic() < deadline, tail(logs[0])
            time.sleep(0.02)
        survivor = nodes[1 - victim]
        survivors_workers = {pid: t for pid, t in survivor.look().items() if pid != survivor.pid}
        assert survivors_workers, "the surviving launcher has no worker"
        nodes[victim].kill(signal.SIGKILL)  # the machine is gone: its launcher and its worker
        killed = time.monotonic()
        try:
            code = survivor.process.wait(timeout=90)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the surviving node still runs 90 s after its peer died:\n{tail(logs[1 - victim])}")
        stopped_after = time.monotonic() - killed
        assert code != 0, tail(logs[1 - victim])
        time.sleep(0.5)  # what the launcher killed on its way out
        assert not alive(survivors_workers), "the survivor's worker outlived its launcher"
    finally:
        for node in nodes:
            node.stop()
    killed_at = load_checkpoint(last).training.step  # whole, never half-written
    assert 0 < killed_at < STEPS and not (last.parent / "final").exists()
    print(f"\n{arch}: launcher {victim} killed after step {killed_at}; the other exited "
          f"{code} after {stopped_after:.1f} s")

    resumed_logs = [tmp_path / "resume-a.log", tmp_path / "resume-b.log"]
    finish(start_nodes(config, [tmp_path / "node-a", tmp_path / "node-b"], resumed_logs, "--resume"),
           resumed_logs)
    assert "holds no place" not in "".join(log.read_text() for log in resumed_logs)  # every rank's own
    final = load_checkpoint(last.parent / "final").training
    assert final.step == STEPS and final.finished
    uninterrupted = final_of(two_node_runs(arch)[0], arch).training
    assert abs(final.val_loss - uninterrupted.val_loss) < TOLERANCE
    assert len(list((tmp_path / "exp").rglob("*.parquet"))) == 1  # the resumed run goes on in its file
    rows = query(tmp_path / "exp", "SELECT kind, count(DISTINCT run_id) AS runs, count(*) AS n "
                                   "FROM experiments WHERE kind = 'final' GROUP BY kind")
    assert [(r["runs"], r["n"]) for r in rows] == [(1, 1)]
