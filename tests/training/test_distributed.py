"""Data-parallel training (torch.distributed, gloo on the loopback interface, 2 CPU processes).

The recipe runs every stage data-parallel under torchrun or ``ism-edge train --nproc N``: ranks see
disjoint shards, reduce their metrics and held-out figures to the same numbers, and only rank 0
writes; a rank that dies takes the job down with one error line.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from ism_edge.errors import ExitCode  # noqa: E402
from ism_edge_training import distributed as dist  # noqa: E402
from tests.conftest import CIFAR_TEST, CIFAR_TRAIN, ROOT  # noqa: E402

# A short recipe: every stage, one epoch, 120 training images (6 batches of 20; 10 per rank with 2 ranks).
SHORT = ["--data", str(CIFAR_TRAIN), "--limit", "133", "--preset", "small", "--epochs", "1", "--epochs-finetune", "1",
         "--batch-size", "20", "--guard-examples", "8", "--device", "cpu", "--seed", "3"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _cli(*args: str, timeout: float = 900) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ism_edge_cli", *args], cwd=ROOT, env=ENV, capture_output=True,
                          text=True, timeout=timeout)


def test_shards_are_disjoint_equal_and_cover_everything() -> None:
    order = np.random.default_rng(0).permutation(10)
    for world in (2, 3, 4):
        parts = [dist.shard(order, of=(r, world)) for r in range(world)]
        assert len({len(p) for p in parts}) == 1  # as many batches on every rank (DDP needs that)
        assert set(np.concatenate(parts)) == set(order)
        if 10 % world == 0:
            assert len(np.concatenate(parts)) == len(set(np.concatenate(parts)))
        else:  # padded with the first indices of the permutation, as DistributedSampler does
            extra = len(np.concatenate(parts)) - 10
            assert 0 < extra < world
            assert sorted(np.concatenate(parts).tolist()) == sorted([*order.tolist(), *order[:extra].tolist()])
        held = [dist.local_part(10, of=(r, world)) for r in range(world)]
        assert np.array_equal(np.concatenate(held), np.arange(10))  # evaluation: every image once, in order
    assert dist.shard(order) is order and not dist.active() and dist.rank() == 0 and dist.rank_seed(5) == 5


def _rank_probe(rank: int, world: int, port: int, out: str) -> None:
    """One gloo rank: what its epoch context yields and what the reductions return."""
    import torch.distributed as td

    from ism_edge_training.data import ImageArrays
    from ism_edge_training.recipe import RecipeConfig
    from ism_edge_training.recipe.stages import EpochContext, heldout_accuracy

    td.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        n = 42
        x = np.zeros((n, 8, 8, 3), dtype=np.uint8)
        x[:, 0, 0, 0] = np.arange(n)  # the first pixel names the image
        data = ImageArrays(x, (np.arange(n) % 3).astype(np.int64), tuple(f"c{i}" for i in range(3)), {"kind": "probe"})
        cfg = RecipeConfig(batch_size=8, augment=False)
        ctx = EpochContext(cfg, data, torch.device("cpu"), 0, None, "probe")
        seen = [int(v) for xb, _ in ctx.batches() for v in (xb[:, 0, 0, 0] * 255).round().long()]
        pool_index = dist.shard(np.arange(n))
        pool = torch.from_numpy(pool_index.astype(np.float32)).view(-1, 1, 1, 1)
        ctx = EpochContext(cfg, data, torch.device("cpu"), 1, None, "probe", pool=pool, pool_index=pool_index)
        pairs = [(int(v), int(p)) for xb, pb, _ in ctx.pairs()
                 for v, p in zip((xb[:, 0, 0, 0] * 255).round().long(), pb.flatten().long(), strict=True)]

        class Count(torch.nn.Module):  # "correct" for every image of class 0
            def forward(self, t: torch.Tensor) -> torch.Tensor:
                return torch.nn.functional.one_hot(torch.zeros(t.shape[0], dtype=torch.long), 3).float()

        clean, _ = heldout_accuracy(Count(), data, torch.device("cpu"))
        gathered = dist.gather_arrays({"r": np.full(3 + rank, rank)})["r"].tolist()
        metrics = dist.average_metrics({"loss": float(rank), "img_s": 10.0})
        Path(out).write_text(json.dumps({"batches": seen, "n_batches": ctx.n_batches(), "pairs": pairs,
                                         "clean": clean, "gathered": gathered, "metrics": metrics,
                                         "seed": dist.rank_seed(3)}))
    finally:
        td.destroy_process_group()


def test_two_ranks_see_disjoint_shards_and_reduce_to_the_same_figures(tmp_path: Path) -> None:
    import torch.multiprocessing as mp

    port = _free_port()
    procs = [mp.get_context("spawn").Process(target=_rank_probe, args=(r, 2, port, str(tmp_path / f"{r}.json")))
             for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(600)
        assert p.exitcode == 0
    r0, r1 = (json.loads((tmp_path / f"{r}.json").read_text()) for r in range(2))
    assert not set(r0["batches"]) & set(r1["batches"])  # 42 images, 21 each, no image on both ranks
    assert sorted(r0["batches"] + r1["batches"]) == list(range(42))
    for r, probe in ((0, r0), (1, r1)):  # a rank's pool rows stay with its own images
        assert all(v == p for v, p in probe["pairs"]) and len(probe["pairs"]) == 21
        assert set(v for v, _ in probe["pairs"]) == set(dist.shard(np.arange(42), of=(r, 2)).tolist())
    assert r0["n_batches"] == r1["n_batches"] == 6  # 21 images in batches of 8 / 2 ranks
    assert r0["clean"] == r1["clean"] == pytest.approx(14 / 42)  # counts summed over both halves
    assert r0["gathered"] == r1["gathered"] == [0, 0, 0, 1, 1, 1, 1]  # in rank order
    assert r0["metrics"] == r1["metrics"] == {"loss": 0.5, "img_s": 20.0}
    assert (r0["seed"], r1["seed"]) == (3, 3 + dist.RANK_SEED_STRIDE)


@pytest.fixture(scope="module")
def two_rank_and_one_rank_bundles(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, str]:
    """The same short recipe and seed trained by ``--nproc 2`` and by one process."""
    tmp = tmp_path_factory.mktemp("ddp")
    run = _cli("train", *SHORT, "--out", str(tmp / "two"), "--nproc", "2")
    assert run.returncode == 0, run.stderr[-3000:]
    from typer.testing import CliRunner

    from ism_edge_cli.main import app

    one = CliRunner().invoke(app, ["train", *SHORT, "--out", str(tmp / "one")])
    assert one.exit_code == 0, one.output
    assert not torch.distributed.is_initialized()  # one process: the plain path, no process group
    return tmp / "two", tmp / "one", run.stdout + run.stderr


def test_two_rank_and_one_rank_bundles_load_evaluate_and_build(two_rank_and_one_rank_bundles, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from ism_edge_cli.main import app
    from ism_edge_training.bundle import DefenseBundle
    from ism_edge_training.recipe import STAGES

    two, one, log = two_rank_and_one_rank_bundles
    d2 = DefenseBundle.load(two).provenance["distributed"]
    assert d2 == {"world_size": 2, "backend": "gloo", "batch_size_per_rank": 10}
    for path, ranks in ((one, 1), (two, 2)):
        b = DefenseBundle.load(path)
        assert set(b.stages) == set(STAGES) and b.calibrated and b.provenance["seed"] == 3
        assert b.provenance.get("distributed", {}).get("world_size", 1) == ranks
        assert b.provenance["n_train"] == 120 and b.stages["calibrate"]["n"] == 13  # the whole held-out set
        r = CliRunner().invoke(app, ["evaluate", str(path), "--data", str(CIFAR_TEST), "--n", "16", "--eps", "8/255",
                                     "--attacks", "fgsm", "--threat", "known", "--no-sanity", "--device", "cpu",
                                     "--out", str(tmp_path / f"eval{ranks}")])
        assert r.exit_code == 0, r.output
        assert json.loads((tmp_path / f"eval{ranks}" / "results.json").read_text())["bundles"][0]["n"] == 16
        r = CliRunner().invoke(app, ["build", str(path), "--out", str(tmp_path / f"engines{ranks}"),
                                     "--backend", "onnxruntime"])
        assert r.exit_code == 0, r.output
        assert (tmp_path / f"engines{ranks}" / "manifest.json").is_file()


def test_only_rank_0_writes_and_logs(two_rank_and_one_rank_bundles) -> None:
    two, _, log = two_rank_and_one_rank_bundles
    assert sorted(p.name for p in two.parent.iterdir() if p.name.startswith("two")) == ["two", "two.ckpt"]
    assert sorted(p.name for p in (two.parent / "two.ckpt").iterdir()) == ["checkpoint.pt"]
    for stage in ("undefended", "mapper", "calibrate"):  # one log: rank 0's
        assert log.count(f"stage {stage} done") == 1, log
    assert log.count("data: 133 images") == 1 and "(60 on each of 2 ranks)" in log
    assert "Traceback" not in log and "Warning" not in log


# Rank 1 dies (a crash, an OOM kill) or stalls (a hung device, a deadlock) in the second epoch of
# the undefended stage; launched by hand, without torchrun's agent to stop the other rank.
FAULTY_RANK = """
import os, sys, time
from ism_edge_training.recipe import runner
if os.environ["RANK"] == "1":
    real = runner.classifier_epoch
    def faulty(*a, **kw):
        if a[2].epoch == 1:
            if sys.argv[1] == "dies":
                os._exit(3)
            time.sleep(600)
        return real(*a, **kw)
    runner.classifier_epoch = faulty
from ism_edge_cli.main import main
sys.argv = ["ism-edge", *sys.argv[2:]]
main()
"""


@pytest.mark.parametrize("fault", ["dies", "stalls"])
def test_a_dead_or_stalled_rank_ends_the_job_with_one_line(fault: str, tmp_path: Path) -> None:
    out = tmp_path / "b"
    args = [*SHORT, "--stages", "undefended", "--epochs", "2", "--out", str(out), "--dist-timeout", "30"]
    port = str(_free_port())
    procs = [subprocess.Popen([sys.executable, "-c", FAULTY_RANK, fault, "train", *args], cwd=ROOT, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              env={**ENV, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "WORLD_SIZE": "2",
                                   "RANK": str(r), "LOCAL_RANK": str(r)}) for r in range(2)]
    try:
        _, err0 = procs[0].communicate(timeout=600)  # rank 0 does not wait for ever
    finally:
        procs[1].kill()
        procs[1].communicate()
    # Its next collective fails (the peer closed its connection, or after the 30 s timeout) and it
    # says so in one line, as its last.
    errors = [line for line in err0.splitlines() if line.startswith("error:")]
    assert procs[0].returncode == ExitCode.BAD_INPUT and len(errors) == 1, err0
    assert errors[0].startswith("error: rank 0: lost the other ranks (")
    if fault == "stalls":  # a dead peer shows as a reset connection or, if noticed late, as the same timeout
        assert "time" in errors[0].lower()  # gloo: "Timed out waiting …" or "Application timeout caused …"
    assert err0.strip().endswith(errors[0]) and "Traceback" not in err0
    assert not out.exists() and (tmp_path / "b.ckpt" / "checkpoint.pt").is_file()  # epoch 1 was checkpointed
    if fault == "stalls":
        return
    run = _cli("train", *args, "--nproc", "2", "--resume")  # the job continues where it stopped
    assert run.returncode == 0, run.stderr[-3000:]
    assert "undefended: resuming at epoch 2/2" in run.stdout + run.stderr
    from ism_edge_training.bundle import DefenseBundle

    assert len(DefenseBundle.load(out).stages["undefended"]["history"]) == 2


def test_a_failing_launch_is_one_error_line(tmp_path: Path) -> None:
    run = _cli("train", *SHORT[2:], "--data", str(tmp_path / "missing.npz"), "--out", str(tmp_path / "b"),
               "--nproc", "2")
    err = run.stderr.strip().splitlines()
    assert run.returncode == ExitCode.BAD_INPUT and len(err) == 1, run.stderr
    assert err[0].startswith("error: rank ") and "does not exist" in err[0]
    assert not (tmp_path / "b").exists()
    run = _cli("train", *SHORT, "--batch-size", "21", "--out", str(tmp_path / "b"), "--nproc", "2")
    assert run.returncode == ExitCode.USAGE and "must be a multiple of --nproc 2" in run.stderr
