"""Data-parallel search under torchrun: 2 CPU processes over gloo.

One launch of ``python -m torch.distributed.run --standalone --nproc_per_node=2`` with this file as
the worker (``_worker``; a launch costs seconds of imports on a small machine) serves every test:
each process joins the group from torchrun's environment, runs ``granular search`` (uninterrupted;
stopped after a few epochs, then resumed; with a batch that does not split), then searches
through the Python API that record each rank's masks, parameters and state every epoch.

What "the same" means: a 2-process run does not see its samples in the order a 1-process run of
the same seed does (its sampler is a DistributedSampler), so the comparison with one process
gives that process the very global batches of the 2-process run (each the two ranks' shards,
concatenated). With no BatchNorm (whose batch statistics are per rank under data parallelism)
both runs then compute the same mean gradients, up to float summation order, and must take the
same pruning decisions. With BatchNorm, and in a multi-stage search (heads, phase changes,
regrowth), the check is that both ranks hold identical masks, parameters and buffers.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import granular
from granular.config import SearchConfig
from granular.data import load_data
from granular.errors import DataError
from granular.driver import MultiStageSearcher, Searcher

TESTS = Path(__file__).resolve().parent
WORLD = 2
RESNET = str(TESTS / "models" / "resnet_like.py") + ":build_model"
CLI = ["search", RESNET, "--target-params", "4K", "--seed", "3", "--warmup-epochs", "1", "--prune-every", "1",
       "--no-progress"]
EPOCHS, STOP_AT = 6, 3

# The equality run: no BatchNorm, rounds every epoch, λ rising fast enough to prune in a few epochs. The
# live cap is off here: it masks the k lowest of a layer's near-equal gates, a choice that the float
# drift between one process and two (summation order) can flip, after which the runs differ by more
# than drift. The ranks of one run still agree exactly (checked every epoch), and MULTI runs with it.
PLAIN = dict(target_params=2000, epochs=7, warmup_epochs=2, prune_every=1, batch_size=32, lambda_init=1e-3,
             lr_weights=0.1, bn_recalibration_batches=0, seed=5, live_cap=0.0)
# The multi-stage run: two resolutions, so stage 1 (aux head), stage 2, regrowth, final. Per-layer weight
# scales (weight_scale="layer"): with the default model scale this run's searches decide differently and
# regrowth brings no op back, so the regrowth path would go unchecked. Seed 3: with seed 1 stage 2
# pruned no op under two processes on one machine (regrowth quota 0) though it did on another; seeds 2-4
# regrow an op in one process and in two there.
MULTI = dict(target_params=1500, epochs=8, warmup_epochs=1, prune_every=1, batch_size=32, lambda_init=3e-2,
             bn_recalibration_batches=2, multi_stage="on", stage_keep=0.4, regrow=1.0, seed=3, weight_scale="layer")
LIMIT = 384


class _PlainBlock(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        return x + self.conv2(F.relu(self.conv1(x)))


class _PlainNet(nn.Module):
    """A small residual net without BatchNorm: ops (the branches), filters and weights to prune."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(1, 8, 3, padding=1)
        self.block1 = _PlainBlock(8)
        self.down = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.block2 = _PlainBlock(16)
        self.fc = nn.Linear(16 * 4 * 4, 10)

    def forward(self, x):
        x = self.block1(F.relu(self.stem(x)))
        x = self.block2(F.relu(self.down(x)))
        return self.fc(torch.flatten(x, 1))


def _data(batch_size: int):
    return load_data("digits", batch_size=batch_size, seed=0, limit=LIMIT)


def _plain_gm(data):
    torch.manual_seed(0)
    return granular.prepare(_PlainNet(), data.example_input())


def _resnet_gm(data):
    from _models import user_model  # noqa: PLC0415 - tests/ is on sys.path in the worker too
    return granular.prepare(user_model("resnet_like"), data.example_input())


class _Recorder:
    """Records, every epoch, the trained parameters right after training (before rank 0's copy
    is broadcast) and, at the end of the epoch, the masks, every parameter and buffer, and state."""

    def __init__(self, *args, **kwargs):
        self.records: list[dict] = []
        super().__init__(*args, **kwargs)

    def _tensors(self):
        out = {f"gm.{k}": v.detach().clone() for k, v in self.gm.state_dict().items()}
        if getattr(self, "head", None) is not None:
            out.update({f"head.{k}": v.detach().clone() for k, v in self.head.state_dict().items()})
        return out

    def train_epoch(self, *args, **kwargs):
        stats = super().train_epoch(*args, **kwargs)
        self.records.append({"trained": {n: p.detach().clone() for n, p in self.gm.named_parameters()},
                             "stats": stats})
        return stats

    def after_epoch(self, round_info):
        extra = super().after_epoch(round_info)
        self.records[-1].update(masks=self._masks(), tensors=self._tensors(), units=self.unit_counts(),
                                state=json.loads(json.dumps(self.state, default=str)),
                                round=json.loads(json.dumps(round_info, default=str)),
                                extra=json.loads(json.dumps(extra, default=str)))
        return extra


class _RecSearcher(_Recorder, Searcher):
    pass


class _RecMulti(_Recorder, MultiStageSearcher):
    pass


class _GlobalBatches:
    """The global batches of a ``world``-process run as one process sees them: step i's batch is
    the ranks' step-i shards, concatenated in rank order."""

    def __init__(self, bundle, world: int):
        self.bundle, self.world = bundle, world
        self.train_set, self.batch_size = bundle.train_set, bundle.batch_size

    def train_loader(self, epoch: int):
        shards = [list(self.bundle.train_loader(epoch, rank=r, world_size=self.world)) for r in range(self.world)]
        return [(torch.cat([s[i][0] for s in shards]), torch.cat([s[i][1] for s in shards]))
                for i in range(len(shards[0]))]

    def val_loader(self):
        return self.bundle.val_loader()


def _plain_run(data) -> _RecSearcher:
    s = _RecSearcher(_plain_gm(_data(PLAIN["batch_size"])), data, SearchConfig(**PLAIN), progress=False)
    s.run()
    return s


@pytest.fixture
def one_thread():
    """One intra-op thread, as each torchrun worker has: a tiny model gains nothing from more,
    and on a busy 2-core machine waiting threads slow it down many times over."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _multi_run(data) -> _RecMulti:
    s = _RecMulti(_resnet_gm(data), data, SearchConfig(**MULTI), progress=False)
    s.run()
    return s


# --------------------------------------------------------------------------- launches


def _torchrun(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get(
        "PYTHONPATH", "")]).rstrip(os.pathsep)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={WORLD}", *args]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def ddp(tmp_path_factory):
    """One torchrun launch of this file as the worker (``_worker``); returns its output folder."""
    out = tmp_path_factory.mktemp("ddp")
    proc = _torchrun(__file__, str(out), cwd=out)
    assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-4000:])
    return out


def _cli(out: Path, name: str, *args: str, kill_after: int = 0) -> int:
    """``granular search`` as torchrun's workers run it, with this rank's stderr kept in a file;
    ``kill_after`` interrupts both ranks right after that epoch's checkpoint (a killed run)."""
    import contextlib
    import io

    from granular import distributed
    from granular.cli import main
    from granular.driver.checkpoint import CheckpointMixin

    write = CheckpointMixin.checkpoint

    def killed(self):
        write(self)
        if self.state["epoch"] == kill_after:
            raise KeyboardInterrupt

    err = io.StringIO()
    CheckpointMixin.checkpoint = killed if kill_after else write
    try:
        with contextlib.redirect_stderr(err):
            code = main([*CLI, *args])
    finally:
        CheckpointMixin.checkpoint = write
    (out / f"{name}{distributed.local_rank()}.err").write_text(err.getvalue())
    return code


def _worker(out: Path) -> None:
    """Each of the two processes joins the process group from torchrun's environment
    (:func:`granular.distributed.init`), then runs the command line (which must use that group
    and leave it open) and the Python API searches.

    One process group for all of it: ending a group and starting another in the same torchrun
    worker races on the rendezvous store's keys of the first (gloo may connect to a closed port).
    """
    import torch.distributed as dist

    from granular import distributed

    torch.set_num_threads(1)
    assert not dist.is_initialized()
    assert distributed.init("cpu") == torch.device("cpu") and distributed.world_size() == WORLD
    rank = distributed.rank()
    assert rank == distributed.local_rank() == int(os.environ["RANK"])
    codes = {"full": _cli(out, "full", "--epochs", str(EPOCHS), "--out", str(out / "full")),
             "stopped": _cli(out, "stopped", "--epochs", str(EPOCHS), "--out", str(out / "resumed"),
                             kill_after=STOP_AT),
             "resumed": _cli(out, "resumed", "--epochs", str(EPOCHS), "--out", str(out / "resumed"), "--resume"),
             "odd": _cli(out, "odd", "--epochs", "2", "--batch-size", "33", "--out", str(out / "odd"))}
    assert dist.is_initialized()  # the caller's group is the caller's to end
    torch.save(_plain_run(_data(PLAIN["batch_size"])).records, out / f"plain{rank}.pt")
    torch.save(_multi_run(_data(MULTI["batch_size"])).records, out / f"multi{rank}.pt")
    (out / f"codes{rank}.json").write_text(json.dumps(codes))
    distributed.barrier()
    distributed.cleanup()
    assert not dist.is_initialized()


# --------------------------------------------------------------------------- helpers


def _assert_equal_tensors(a: dict, b: dict, what: str) -> None:
    assert a.keys() == b.keys(), what
    for k in a:
        assert torch.equal(a[k], b[k]), f"{what}: {k} differs"


def _rows(run: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if k != "seconds"}
            for line in (run / "metrics.jsonl").read_text().splitlines()]


# --------------------------------------------------------------------------- tests


def test_shards_are_disjoint_and_make_up_the_global_batch():
    data = load_data("digits", batch_size=32, seed=4, limit=200)
    for epoch in (0, 1):
        shards = [list(data.train_loader(epoch, rank=r, world_size=WORLD)) for r in range(WORLD)]
        assert len(shards[0]) == len(shards[1]) == len(data.train_loader(epoch)) == 200 // 32
        assert all(x.shape[0] == 16 for s in shards for x, _ in s)  # the per-rank batch
        seen = [torch.cat([x.flatten(1) for x, _ in s]) for s in shards]
        both = torch.cat(seen)
        assert torch.unique(both, dim=0).shape[0] == both.shape[0]  # no sample on both ranks, none twice
        again = [list(data.train_loader(epoch, rank=r, world_size=WORLD)) for r in range(WORLD)]
        assert all(torch.equal(x, y) for s, t in zip(shards, again) for (x, _), (y, _) in zip(s, t))
    e0, e1 = (data.train_loader(e, rank=0, world_size=WORLD) for e in (0, 1))
    assert not torch.equal(next(iter(e0))[0], next(iter(e1))[0])  # set_epoch reshuffles
    val = [torch.cat([y for _, y in data.val_loader(rank=r, world_size=WORLD)]) for r in range(WORLD)]
    assert sum(v.numel() for v in val) == len(data.val_set)  # no padding: the counts add up exactly
    with pytest.raises(DataError, match="divide evenly over 2 processes") as err:  # the global batch
        load_data("digits", batch_size=33, limit=200).train_loader(0, rank=0, world_size=WORLD)
    assert "\n" not in str(err.value)


def test_two_processes_prune_like_one_process_on_the_same_global_batches(ddp, one_thread):
    ranks = [torch.load(ddp / f"plain{r}.pt", weights_only=False) for r in range(WORLD)]
    for a, b in zip(*ranks):  # both ranks: the same after training, before any broadcast, and after the epoch
        _assert_equal_tensors(a["trained"], b["trained"], "trained parameters")
        _assert_equal_tensors(a["masks"], b["masks"], "masks")
        _assert_equal_tensors(a["tensors"], b["tensors"], "parameters and buffers")
        assert a["state"] == b["state"] and a["stats"] == b["stats"]
    one = _plain_run(_GlobalBatches(_data(PLAIN["batch_size"]), WORLD)).records
    two = ranks[0]
    assert len(one) == len(two) == PLAIN["epochs"]
    assert sum(sum(r["round"].get("pruned_units", {}).values()) for r in two) > 0  # the run did prune
    for epoch, (a, b) in enumerate(zip(one, two), 1):
        assert a["units"] == b["units"], f"epoch {epoch}: units kept"
        assert a["round"] == b["round"], f"epoch {epoch}: round"
        _assert_equal_tensors(a["masks"], b["masks"], f"epoch {epoch}: masks")
        assert a["state"]["params"] == b["state"]["params"] and a["state"]["rounds"] == b["state"]["rounds"]
        assert a["state"]["lambda"] == pytest.approx(b["state"]["lambda"], rel=1e-12)
        # the all-reduce sums the two halves of a batch in another order than one process does: at lr 0.1
        # that float drift grows to ~4e-5 on weights of size ~1 by epoch 6 (a wrong average would be O(1))
        for k in a["tensors"]:
            torch.testing.assert_close(a["tensors"][k], b["tensors"][k], rtol=1e-3, atol=2e-4, msg=k)
        assert a["stats"]["loss"] == pytest.approx(b["stats"]["loss"], rel=1e-4)
        assert a["stats"]["train_acc"] == b["stats"]["train_acc"]


def test_multi_stage_ranks_stay_identical_through_heads_and_regrowth(ddp):
    ranks = [torch.load(ddp / f"multi{r}.pt", weights_only=False) for r in range(WORLD)]
    stages = {r["extra"]["stage"] for r in ranks[0]}
    assert {1, 2, 3} <= stages  # stage 1 (aux head), stage 2, final
    assert any(r["extra"].get("regrowth", {}).get("regrown_ops") for r in ranks[0])  # an op came back
    for epoch, (a, b) in enumerate(zip(*ranks), 1):
        _assert_equal_tensors(a["trained"], b["trained"], f"epoch {epoch}: trained parameters")
        _assert_equal_tensors(a["masks"], b["masks"], f"epoch {epoch}: masks")
        _assert_equal_tensors(a["tensors"], b["tensors"], f"epoch {epoch}: parameters and buffers (BN, head)")
        assert a["state"] == b["state"] and a["round"] == b["round"] and a["extra"] == b["extra"]


def test_ddp_run_resumes_to_the_uninterrupted_result(ddp):
    codes = [json.loads((ddp / f"codes{r}.json").read_text()) for r in range(WORLD)]
    assert codes[0] == codes[1]
    assert codes[0]["stopped"] == 130  # killed after epoch STOP_AT
    assert codes[0]["full"] == codes[0]["resumed"] == 0  # both land at the budget's last round
    full, resumed = ddp / "full", ddp / "resumed"
    assert _rows(resumed) == _rows(full)
    a = torch.load(full / "checkpoint.pt", weights_only=False)
    b = torch.load(resumed / "checkpoint.pt", weights_only=False)
    assert a["state"] == b["state"] and a["state"]["rounds"] >= 2
    _assert_equal_tensors(a["model"], b["model"], "checkpoint model")
    _assert_equal_tensors(a["opt_w"]["state"][0], b["opt_w"]["state"][0], "momentum")


def test_only_rank_zero_writes(ddp):
    for run, epochs in (("full", EPOCHS), ("resumed", EPOCHS)):
        rows = [json.loads(line) for line in (ddp / run / "metrics.jsonl").read_text().splitlines()]
        assert [r["epoch"] for r in rows] == list(range(1, epochs + 1))  # one row per epoch, not one per rank
        assert not list((ddp / run).glob("*.tmp"))
    full = ddp / "full"
    assert json.loads((full / "config.json").read_text())["search"]["batch_size"] == 96  # the global batch
    assert (full / "arch.json").is_file() and (full / "model" / "model.py").is_file()
    said = (ddp / "full0.err").read_text()
    assert said.count("compact model:") == 1 and re.search(r"2\s+processes\s+of\s+48", said)
    assert "resuming" in (ddp / "resumed0.err").read_text()
    for run in ("full", "stopped", "resumed"):
        assert (ddp / f"{run}1.err").read_text() == ""  # rank 1 prints nothing


def test_batch_that_does_not_split_stops_in_one_line(ddp):
    codes = [json.loads((ddp / f"codes{r}.json").read_text()) for r in range(WORLD)]
    assert codes[0]["odd"] == codes[1]["odd"] == 2  # GranularError: exit status 2, before anything is written
    assert not (ddp / "odd").exists()
    for r in range(WORLD):
        lines = (ddp / f"odd{r}.err").read_text().strip().splitlines()
        assert len(lines) == 1 and "must divide evenly over 2 processes" in lines[0]
        assert "--batch-size 32" in lines[0]


if __name__ == "__main__":
    _worker(Path(sys.argv[1]))
