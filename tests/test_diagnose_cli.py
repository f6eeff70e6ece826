"""script/diagnose.py: a diagnosis of any run's checkpoint after the fact, and its refusals."""
import json
import shutil
import sys

import pytest
import torch

from conftest import ROOT, TINY
from dnr.diagnose import relearn_strength

sys.path.insert(0, str(ROOT / "script"))
import diagnose as cli  # noqa: E402  (script/diagnose.py)
import main as trainer  # noqa: E402

FAST = ["--repeats", "2", "--tsne_samples", "20"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A tiny baseline run with purity tracked every epoch (2 k-means seeds) and every epoch kept."""
    out = tmp_path_factory.mktemp("diag") / "run"
    assert trainer.cli(TINY + ["--method", "baseline", "--epochs", "3", "--reinit_epoch", "0", "--track_purity_every",
                               "1", "--diagnosis_repeats", "2", "--keep_every", "1", "--ckpt_path", str(out)]) == 0
    return out


def log_of(out):
    return {r["epoch"]: r for r in map(json.loads, (out / "log.jsonl").read_text().splitlines())}


def test_best_checkpoint_reproduces_the_run(run_dir, capsys):
    assert cli.main([str(run_dir)] + FAST) == 0
    printed = capsys.readouterr().out
    d = json.loads((run_dir / "diagnosis_best" / "diagnosis.json").read_text())
    res = json.loads((run_dir / "results.json").read_text())
    assert d["epoch"] == res["best_epoch"] and d["method"] == "baseline" and d["checkpoint"].endswith("best.pth")
    # the same weights, data and k-means seeds as the run: its numbers, exactly
    assert d["acc"] == pytest.approx(res["test"]["acc"]) and d["eval_split"] == "test"
    assert d["shapley"] == pytest.approx(res["shapley_test_acc"])
    assert d["subset_acc"] == pytest.approx(res["subset_test_acc"])
    assert d["unimodal_acc"] == pytest.approx(res["unimodal_test_acc"]) and d["unimodal_source"] == "head"
    assert d["probe_acc"] == pytest.approx(res["probe_test_acc"])
    tracked = log_of(run_dir)[d["epoch"]]["tracked_purity"]
    for m in ("audio", "visual"):
        for split in ("train", "val"):
            assert d["purity"][m][split] == pytest.approx(tracked["purity"][m][split])
            assert d["purity_std"][m][split] == pytest.approx(tracked["purity_std"][m][split])
        assert 0 < d["purity"][m]["test"] <= 1 and d["purity_std"][m]["test"] >= 0
        assert d["strength"][m] == pytest.approx(relearn_strength(d["purity"][m]["train"], d["purity"][m]["val"], 3.0))
        assert d["strength_std"][m] == pytest.approx(tracked["alpha_std"][m])
    assert d["samples"] == {"train": 40, "val": 20, "test": 20} and d["kmeans"]["repeats"] == 2
    assert (run_dir / "diagnosis_best" / "diagnosis.png").stat().st_size > 20_000
    assert "Shapley" in printed and "diagnosis.json" in printed


def test_epoch_and_last_checkpoints(run_dir):
    out = run_dir.parent / "epoch1"
    assert cli.main([str(run_dir), "--checkpoint", "epoch", "1", "--out", str(out), "--no_probe"] + FAST) == 0
    d = json.loads((out / "diagnosis.json").read_text())
    rec = log_of(run_dir)[1]
    assert d["epoch"] == 1 and d["acc"] == pytest.approx(rec["test"]["acc"]) and d["probe_acc"] == {}
    assert d["purity"]["visual"]["val"] == pytest.approx(rec["tracked_purity"]["purity"]["visual"]["val"])
    assert cli.main([str(run_dir), "--checkpoint", "last"] + FAST) == 0
    assert json.loads((run_dir / "diagnosis_last" / "diagnosis.json").read_text())["epoch"] == 2


def test_refuses_what_it_cannot_diagnose(run_dir, tmp_path, capsys):
    assert cli.main([str(run_dir), "--checkpoint", "epoch", "7"]) == 1
    err = capsys.readouterr().err
    assert f"no checkpoint {run_dir / 'epoch_007.pth'}" in err and "kept epochs: epoch_000.pth, epoch_001.pth" in err

    bad = tmp_path / "bad"
    shutil.copytree(run_dir, bad, ignore=shutil.ignore_patterns("diagnosis_*", "tensorboard"))
    (bad / "best.pth").write_bytes(b"not a checkpoint")
    assert cli.main([str(bad)]) == 1
    assert f"cannot read checkpoint {bad / 'best.pth'}" in capsys.readouterr().err

    torch.save({"weights": torch.zeros(2)}, bad / "best.pth")  # readable, but not this trainer's
    assert cli.main([str(bad)]) == 1
    assert f"{bad / 'best.pth'} is not a checkpoint written by this trainer (it lacks" in capsys.readouterr().err

    args = json.loads((bad / "args.json").read_text())
    (bad / "args.json").write_text(json.dumps({**args, "method": "ogm_ge"}))  # the folder of another kind of run
    assert cli.main([str(bad), "--checkpoint", "last"]) == 1
    assert (f"{bad / 'last.pth'} comes from another kind of run: it was trained with --method 'baseline', "
            f"{bad / 'args.json'} says 'ogm_ge'") in capsys.readouterr().err

    (bad / "args.json").write_text(json.dumps(args))
    saved = torch.load(bad / "last.pth", weights_only=True)
    saved["args"]["builtin_image_size"] = 24  # the data its flags give no longer match its model
    torch.save(saved, bad / "last.pth")
    assert cli.main([str(bad), "--checkpoint", "last"]) == 1
    assert f"{bad / 'last.pth'} was trained on other data than these dataset flags give" in capsys.readouterr().err

    assert cli.main([str(tmp_path / "nowhere")]) == 1
    assert "no run folder" in capsys.readouterr().err
    for argv, message in ((["--checkpoint", "epoch", "x"], "--checkpoint: expected best, last or 'epoch N'"),
                          (["--repeats", "0"], "--repeats must be >= 1")):
        with pytest.raises(SystemExit) as exc:
            cli.main([str(run_dir)] + argv)
        assert exc.value.code == 2 and message in capsys.readouterr().err
