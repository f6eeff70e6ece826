"""DistributedDataParallel on the CPU (gloo, 2 processes via torchrun)."""
import json
import subprocess
import sys

import pytest

from conftest import CODE, ROOT, TINY

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


def test_samplers_split_global_batches_and_shard_without_padding():
    from dnr.distributed import EpochBatchSampler, ShardSampler

    one = EpochBatchSampler(21, 8, 0, 1)
    one.set_epoch(5)
    parts = [EpochBatchSampler(21, 4, r, 2) for r in range(2)]
    for p in parts:
        p.set_epoch(5)
    glob = list(one)
    assert [len(b) for b in glob] == [8, 8, 5]
    for step, batch in enumerate(glob):
        pieces = [list(p)[step] for p in parts]
        assert pieces[0] + pieces[1] == batch  # rank 0 then rank 1: the same global batch
    assert sorted(sum(glob, [])) == list(range(21))
    tail = EpochBatchSampler(17, 8, 0, 1)
    assert [len(b) for b in tail] == [8, 8]  # a last batch of one sample is dropped (BatchNorm)
    shards = [list(ShardSampler(7, r, 2)) for r in range(2)]
    assert shards == [[0, 2, 4, 6], [1, 3, 5]]


def test_ddp_reinit_keeps_replicas_identical(tmp_path):
    subprocess.run(TORCHRUN + [str(ROOT / "tests" / "ddp_worker.py"), str(tmp_path)], check=True,
                   capture_output=True, cwd=tmp_path)
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2))
    assert r0["world"] == 2 and r0["identical"] and r1["identical"]
    assert r0["alpha"] == r1["alpha"] and r0["moved"] > 0  # the same re-init, and it did something
    assert r0["val_labels"] == r1["val_labels"] and r0["val_features"] == 20  # gathered, in order


def test_torchrun_end_to_end_matches_single_process(tmp_path):
    """D&R through main.py: 2 processes x batch 8 against 1 process x batch 16. They see the same
    global batches; with a BatchNorm-free encoder (the sensor modality's MLP) the only difference
    is the order of floating-point sums, so the tolerance is tight: train loss within 1e-4
    (relative), the same accuracies and purities. (With ResNets, per-process BatchNorm statistics
    make the runs differ more; --sync_bn removes that on GPUs.)"""
    common = TINY + ["--builtin_modalities", "sensor", "--builtin_train_size", "64", "--epochs", "3",
                     "--reinit_epoch", "1", "--reinit_num", "2", "--deterministic", "--device", "cpu",
                     "--learning_rate", "0.05"]
    single = tmp_path / "single"
    subprocess.run([sys.executable, str(CODE / "main.py"), *common, "--batch_size", "16", "--ckpt_path", str(single)],
                   check=True, capture_output=True, cwd=tmp_path)
    multi = tmp_path / "multi"
    proc = subprocess.run(TORCHRUN + [str(CODE / "main.py"), *common, "--batch_size", "8", "--ckpt_path", str(multi)],
                          capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert sorted(p.name for p in multi.iterdir()) == sorted(p.name for p in single.iterdir())
    a, b = (json.loads((run / "results.json").read_text()) for run in (single, multi))
    assert b["world_size"] == 2 and a["world_size"] == 1
    assert len(b["diagnoses"]) == 2
    assert [d["purity"] for d in b["diagnoses"]] == [d["purity"] for d in a["diagnoses"]]
    assert b["best_epoch"] == a["best_epoch"] and b["test"]["acc"] == a["test"]["acc"]
    assert b["probe_test_acc"] == pytest.approx(a["probe_test_acc"], abs=0.051)
    logs = [[json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()] for run in (single, multi)]
    for x, y in zip(*logs):
        assert y["train"]["loss"] == pytest.approx(x["train"]["loss"], rel=1e-4)
        for split in ("val", "test"):
            assert y[split]["acc"] == x[split]["acc"]
