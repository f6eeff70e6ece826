"""The trainer end to end on a tiny built-in dataset: every method, three modalities, resume after
SIGKILL, evaluation of a checkpoint, and clear errors for bad flags and paths."""
import json
import os
import shlex
import signal
import subprocess
import sys

import pytest
import torch

from conftest import CODE, TINY
from dnr.diagnose import relearn_strength
from dnr.methods import METHODS

sys.path.insert(0, str(CODE))
import main as trainer  # noqa: E402


def run(args, tmp_path, name="run"):
    out = tmp_path / name
    rc = trainer.cli(TINY + ["--ckpt_path", str(out)] + args)
    return rc, out


def read_log(out):
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


# Flags some methods need on a 3-epoch run (one entry per line): a modality to keep, modulation
# from the first epoch, short stages.
EXTRA = {
    "unimodal": ["--unimodal_modality", "visual"],
    "opm": ["--opm_starts", "0"],
    # one boosting and one rectification epoch per stage: 3 epochs reach the second modality's stage
    "reconboost": ["--reconboost_boost_epochs", "1", "--reconboost_correct_epochs", "1"],
    "umt": ["--umt_teacher_epochs", "1"],  # one-epoch teacher stages
    "ume": ["--ume_teacher_epochs", "1"],
    "sample_valuation": ["--sample_valuation_warmup", "1"],
    "gblending": ["--gblending_warmup", "1", "--gblending_super_epoch", "2"],
}
# D&R needs a diagnosis followed by a training epoch: three epochs, a diagnosis after the second.
D_AND_R = ["--epochs", "3", "--reinit_epoch", "1", "--reinit_num", "1"]


@pytest.mark.parametrize("method", sorted(METHODS))
def test_method_end_to_end_with_diagnosis(method, tmp_path, monkeypatch):
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)  # nothing may be written to the working directory
    rc, out = run(["--method", method, "--epochs", "3", "--reinit_epoch", "1", "--reinit_num", "2",
                   "--track_purity"] + EXTRA.get(method, []), tmp_path)
    assert rc == 0
    assert list(cwd.iterdir()) == []
    for name in ("args.json", "log.jsonl", "last.pth", "best.pth", "results.json"):
        assert (out / name).is_file(), name
    assert any((out / "tensorboard").iterdir())
    res = json.loads((out / "results.json").read_text())
    assert res["method"] == method and res["dataset"] == "builtin" and res["seed"] == 0
    assert 0 <= res["best_epoch"] < 3
    for split in ("val", "test"):
        assert set(res[split]) == {"acc", "macro_f1", "f1_weighted", "map"}
        assert all(0.0 <= v <= 1.0 for v in res[split].values())
    assert res["best_test_acc"] >= res["test"]["acc"]
    modalities = {"visual"} if method == "unimodal" else {"audio", "visual"}
    assert set(res["modalities"]) == modalities
    assert set(res["unimodal_test_acc"]) == modalities and res["unimodal_source"] == "head"
    assert set(res["probe_test_acc"]) == modalities
    assert res["seconds"] > 0
    # where the seconds were measured: they compare only between runs on the same kind of machine
    machine = res["versions"]["machine"]
    assert machine["cpu"] and machine["threads"] == torch.get_num_threads() and machine["cpu_capability"]
    # diagnoses after 0-based epochs 1 and 2 (reinit_epoch 1, reinit_num 2)
    assert [d["epoch"] for d in res["diagnoses"]] == [1, 2]
    for d in res["diagnoses"]:
        assert d["applied"] == (method == "relearn")
        assert set(d["purity"]) == modalities
        for m in modalities:
            p = d["purity"][m]
            assert 0.0 < p["train"] <= 1.0 and 0.0 < p["val"] <= 1.0
            assert d["gap"][m] == pytest.approx(abs(p["train"] - p["val"]))
            assert d["alpha"][m] == pytest.approx(relearn_strength(p["train"], p["val"], 3.0))
    log = read_log(out)
    assert [r["epoch"] for r in log] == [0, 1, 2]
    assert {"train", "val", "test", "seconds"} <= set(log[0])
    assert all(f"acc_{m}" in log[0]["val"] for m in modalities) and "map" in log[0]["test"]
    assert "diagnosis" in log[1] and "diagnosis" not in log[0]
    best = torch.load(out / "best.pth", weights_only=True)
    assert best["epoch"] == res["best_epoch"]


def test_diagnosis_takes_val_features_from_the_evaluation(tmp_path, monkeypatch):
    """The val features of a diagnosis come from that epoch's val evaluation (one pass fewer), and
    are exactly what a separate extraction of the same model would give."""
    from dnr import engine

    real_pass, real_extract = engine.forward_pass, engine.extract_features
    extracted, checked = [], []

    def forward_pass(model, loader, device, **kw):
        out = real_pass(model, loader, device, **kw)
        if kw.get("features") and kw.get("head", True):  # the trainer's val evaluation
            fresh, labels = real_extract(model, loader, device, device_transform=kw.get("device_transform"))
            assert set(out.features) == set(fresh) == {"audio", "visual"}
            for m in fresh:
                assert torch.equal(out.features[m], fresh[m])
            assert torch.equal(out.labels, labels)
            checked.append(len(labels))
        return out

    def extract(model, loader, device, **kw):
        extracted.append(kw.get("desc", ""))
        return real_extract(model, loader, device, **kw)

    monkeypatch.setattr(trainer, "forward_pass", forward_pass)
    monkeypatch.setattr(engine, "extract_features", extract)
    rc, out = run(["--method", "relearn", "--epochs", "3", "--reinit_epoch", "1", "--reinit_num", "2"], tmp_path)
    assert rc == 0
    assert checked == [20, 20, 20]  # every epoch's val evaluation kept its features
    diagnosis_passes = [d for d in extracted if d.startswith("features ")]
    assert diagnosis_passes == ["features train", "features train"]  # two diagnoses, no val pass
    res = json.loads((out / "results.json").read_text())
    assert [d["epoch"] for d in res["diagnoses"]] == [1, 2]


# greedy joins exactly two ResNet-18 branches with MMTM blocks and refuses three modalities (and the
# sensor MLP), naming --builtin_modalities: tests/test_equivalence_greedy.py checks that refusal.
@pytest.mark.parametrize("method", sorted(set(METHODS) - {"unimodal", "greedy"}))
def test_every_method_runs_with_three_modalities(method, tmp_path):
    rc, out = run(["--method", method, "--builtin_modalities", "audio,visual,sensor", "--epochs", "1",
                   "--reinit_epoch", "0", "--no-probe", "--builtin_image_size", "16"] + EXTRA.get(method, [])
                  + (D_AND_R if method == "relearn" else []),
                  tmp_path)
    assert rc == 0
    res = json.loads((out / "results.json").read_text())
    assert set(res["unimodal_test_acc"]) == {"audio", "visual", "sensor"}
    assert set(res["shapley_test_acc"]) == {"audio", "visual", "sensor"} and len(res["subset_test_acc"]) == 8
    assert res["subset_test_acc"]["audio+visual+sensor"] == pytest.approx(res["test"]["acc"])
    log = read_log(out)[0]["train"]
    prefix = {"ogm": "ogm_coeff_", "ogm_ge": "ogm_coeff_", "agm": "agm_coeff_", "pmr": "pmr_ratio_",
              "mmpareto": "mmpareto_cos_", "opm": "opm_q_",
              "mbsd": "mbsd_ce_",
              "umt": "umt_mse_",
              }.get(method)
    if prefix:  # the method's own per-modality numbers reach the log, for all three modalities
        assert {k[len(prefix):] for k in log if k.startswith(prefix)} == {"audio", "visual", "sensor"}


def test_three_modalities_and_lr_decay(tmp_path):
    rc, out = run(["--builtin_modalities", "audio,visual,sensor", "--epochs", "3", "--reinit_epoch", "1",
                   "--reinit_num", "1", "--lr_decay_step", "1", "--lr_decay_ratio", "0.5", "--no-probe"],
                  tmp_path)
    assert rc == 0
    res = json.loads((out / "results.json").read_text())
    assert set(res["diagnoses"][0]["alpha"]) == {"audio", "visual", "sensor"}
    assert set(res["unimodal_test_acc"]) == {"audio", "visual", "sensor"}
    assert [r["train"]["lr"] for r in read_log(out)] == pytest.approx([0.002, 0.001, 0.0005])
    assert res["probe_test_acc"] == {}


@pytest.mark.parametrize("fusion", ["film", "gated"])
def test_mixing_fusions_report_probe_accuracy(fusion, tmp_path):
    rc, out = run(["--method", "baseline", "--fusion", fusion, "--epochs", "1"], tmp_path)
    assert rc == 0
    res = json.loads((out / "results.json").read_text())
    assert res["unimodal_source"] == "probe"
    assert res["unimodal_test_acc"] == res["probe_test_acc"] and set(res["probe_test_acc"]) == {"audio", "visual"}


def test_unimodal_takes_its_own_choice_from_encoders_naming_every_modality(tmp_path, capsys):
    """One --encoders string can serve every run of a comparison: the uni-modal run builds its own
    modality's choice and ignores the others' (it used to refuse them as unknown modalities)."""
    # visual=mlp could not even be built (the MLP takes vectors, the frames are images)
    both = ["--encoders", "audio=resnet18,visual=mlp", "--epochs", "1"]
    rc, out = run(["--method", "unimodal", "--unimodal_modality", "audio"] + both, tmp_path)
    assert rc == 0
    saved = torch.load(out / "last.pth", map_location="cpu", weights_only=False)
    assert saved["model_args"]["encoders"] == {"audio": "resnet18"}
    rc, _ = run(["--method", "unimodal", "--unimodal_modality", "audio", "--encoders", "smell=mlp",
                 "--epochs", "1"], tmp_path, name="bad")
    assert rc == 1 and "--encoders names ['smell']" in capsys.readouterr().err


def test_eval_only_reproduces_the_selected_epoch(tmp_path):
    rc, out = run(["--method", "baseline", "--epochs", "2", "--no-probe"], tmp_path)
    assert rc == 0
    assert trainer.cli(TINY + ["--ckpt_path", str(out), "--eval_only"]) == 0
    res = json.loads((out / "results.json").read_text())
    ev = json.loads((out / "eval.json").read_text())
    assert ev["epoch"] == res["best_epoch"]
    assert ev["test"]["acc"] == pytest.approx(res["test"]["acc"])
    assert ev["val"]["macro_f1"] == pytest.approx(res["val"]["macro_f1"])


def test_select_on_test_and_no_augmentation_switches(tmp_path):
    rc, out = run(["--method", "baseline", "--epochs", "2", "--select_on", "test", "--no-train_augment",
                   "--no-probe"], tmp_path)
    assert rc == 0
    res = json.loads((out / "results.json").read_text())
    assert res["select_on"] == "test"
    assert res["test"]["acc"] == res["best_test_acc"]


def _results_without_timing(path):
    res = json.loads(path.read_text())
    for key in ("seconds", "device", "versions", "cost"):  # cost: seconds per epoch, peak memory
        res.pop(key)
    for d in res["diagnoses"]:
        d.pop("seconds")
    return res


def test_resume_after_sigkill_or_sigterm_matches_uninterrupted_run(tmp_path):
    """A run killed (SIGKILL) or stopped (SIGTERM, what schedulers send) during its third epoch
    resumes to the same results as an uninterrupted run; SIGTERM prints the command that does it."""
    common = [sys.executable, str(CODE / "main.py")] + TINY + [
        "--builtin_train_size", "64", "--epochs", "4", "--reinit_epoch", "2", "--reinit_num", "1",
        "--deterministic", "--device", "cpu", "--no-probe"]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    full = tmp_path / "full"
    subprocess.run(common + ["--ckpt_path", str(full)], check=True, env=env, capture_output=True, cwd=tmp_path)

    for sig in (signal.SIGKILL, signal.SIGTERM):
        cut = tmp_path / f"cut_{sig.name}"
        proc = subprocess.Popen(common + ["--ckpt_path", str(cut)], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path)
        stopped_in = None
        for line in proc.stdout:
            # The "epoch 1" line is printed right after epoch 1's checkpoint: stop during epoch 2,
            # the third epoch.
            if line.startswith("epoch   1/"):
                proc.send_signal(sig)
                stopped_in = 2
                break
        _, err = proc.communicate()
        assert stopped_in == 2
        assert not (cut / "results.json").exists()
        assert torch.load(cut / "last.pth", weights_only=True)["epoch"] == 1
        resume = common + ["--ckpt_path", str(cut), "--resume"]
        if sig == signal.SIGKILL:
            assert proc.returncode == -signal.SIGKILL
        else:  # a clean stop: no traceback, the state and the exact command to continue
            assert proc.returncode == 128 + signal.SIGTERM, err
            assert "Traceback" not in err
            assert f"stopped by SIGTERM after epoch 1 (0-based) had finished; {cut / 'last.pth'} holds that" in err
            printed = shlex.split(err.split("continue with:\n", 1)[1].splitlines()[0])
            assert printed[0] == "python" and printed[-1] == "--resume"
            resume = [sys.executable] + printed[1:]
        subprocess.run(resume, check=True, env=env, capture_output=True, cwd=tmp_path)
        assert _results_without_timing(cut / "results.json") == _results_without_timing(full / "results.json")
        assert [r["epoch"] for r in read_log(cut)] == [0, 1, 2, 3]
        assert [d["epoch"] for d in json.loads((cut / "results.json").read_text())["diagnoses"]] == [2]
        assert [r["val"] for r in read_log(cut)] == [r["val"] for r in read_log(full)]


def _epoch_metrics(out):
    return [(r["train"]["loss"], r["val"], r["test"]) for r in read_log(out)]


def test_track_purity_every_and_keep_every_record_without_changing_training(tmp_path):
    """--track_purity_every records purity curves, --keep_every model-only checkpoints; neither
    changes a number of the training; the run's results hold Shapley contributions and cost."""
    common = ["--method", "baseline", "--epochs", "3", "--reinit_epoch", "0", "--deterministic", "--device", "cpu"]
    rc, plain = run(common, tmp_path, "plain")
    assert rc == 0
    rc, out = run(common + ["--track_purity_every", "2", "--diagnosis_repeats", "2", "--keep_every", "2"],
                  tmp_path, "tracked")
    assert rc == 0
    assert _epoch_metrics(out) == _epoch_metrics(plain)
    res, res_plain = (json.loads((o / "results.json").read_text()) for o in (out, plain))
    assert res["test"] == res_plain["test"] and res["probe_test_acc"] == res_plain["probe_test_acc"]
    assert res_plain["tracked_purity"] == [] and res["diagnoses"] == []  # D&R's diagnoses: none asked for
    log = read_log(out)
    assert [r["epoch"] for r in log if "tracked_purity" in r] == [0, 2]
    assert [t["epoch"] for t in res["tracked_purity"]] == [0, 2]
    for t in res["tracked_purity"]:
        assert t["repeats"] == 2 and not t["applied"] and set(t["purity_std"]) == {"audio", "visual"}
        for m, p in t["purity"].items():
            assert 0 < p["train"] <= 1 and t["alpha"][m] == pytest.approx(relearn_strength(p["train"], p["val"], 3.0))
    # model-only checkpoints after epochs 0 and 2, the weights those epochs evaluated
    assert sorted(f.name for f in out.glob("epoch_*.pth")) == ["epoch_000.pth", "epoch_002.pth"]
    kept = torch.load(out / "epoch_002.pth", weights_only=True)
    assert kept["epoch"] == 2 and "optimizer" not in kept and kept["test"] == log[2]["test"]
    # imbalance measures at the selected epoch: Shapley contributions add up to acc(all) - acc(none)
    subsets = res["subset_test_acc"]
    assert list(subsets) == ["none", "audio", "visual", "audio+visual"]
    assert subsets["audio+visual"] == pytest.approx(res["test"]["acc"])
    assert sum(res["shapley_test_acc"].values()) == pytest.approx(subsets["audio+visual"] - subsets["none"])
    cost = res["cost"]
    assert cost["parameters"] == sum(v.numel() for k, v in kept["model"].items()
                                     if not k.endswith(("running_mean", "running_var", "num_batches_tracked")))
    assert cost["flops_per_sample"] > 1e6 and cost["peak_memory"]["kind"] == "cpu_peak_rss"
    assert cost["seconds_per_epoch"] == pytest.approx(sum(r["seconds"] for r in log) / 3)
    assert cost["train_seconds_per_epoch"] == pytest.approx(sum(r["train"]["seconds"] for r in log) / 3)


def test_tracked_purity_beside_d_and_r(tmp_path, monkeypatch):
    """Beside D&R, tracking leaves D&R's schedule alone, measures the weights D&R diagnoses (before
    its re-initialisation) and shares that epoch's training features with it (one pass)."""
    from dnr import engine

    real_extract, passes = engine.extract_features, []

    def extract(model, loader, device, **kw):
        passes.append(kw.get("desc", ""))
        return real_extract(model, loader, device, **kw)

    monkeypatch.setattr(engine, "extract_features", extract)
    rc, out = run(D_AND_R + ["--method", "relearn", "--track_purity_every", "1", "--no-probe"], tmp_path)
    assert rc == 0
    res = json.loads((out / "results.json").read_text())
    assert [d["epoch"] for d in res["diagnoses"]] == [1]
    assert [t["epoch"] for t in res["tracked_purity"]] == [0, 1, 2]
    d, t = res["diagnoses"][0], res["tracked_purity"][1]
    assert t["purity"] == d["purity"] and t["alpha"] == d["alpha"] and d["applied"] and not t["applied"]
    assert passes == ["features train"] * 3  # epochs 0, 1 (shared with D&R), 2


# ---------------------------------------------------------------- errors
@pytest.mark.parametrize("argv, message", [
    (["--fusion", "bogus"], "--fusion: invalid choice: 'bogus'"),
    (["--method", "nope"], "--method: invalid choice: 'nope'"),
    (["--epochs", "0"], "--epochs must be >= 1, got 0"),
    (["--lr_decay_ratio", "2"], "--lr_decay_ratio must lie in (0, 1]"),
    (["--data_path", "/no/such/folder"], "--data_path '/no/such/folder' is not a folder"),
    (["--diagnosis_repeats", "0"], "--diagnosis_repeats must be >= 1, got 0"),
    (["--track_purity_every", "-1"], "--track_purity_every must be >= 0 (0 never), got -1"),
    (["--keep_every", "-2"], "--keep_every must be >= 0 (0 keeps none), got -2"),
])
def test_bad_flags_exit_with_a_message_naming_the_flag(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        trainer.cli(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--resume", "/no/such/run.pth"], "--resume: no checkpoint at /no/such/run.pth"),
    (["--builtin_informativeness", "audio=2"], "--builtin_informativeness: audio=2.0 is outside [0, 1]"),
    (["--builtin_noise", "smell=1"], "--builtin_noise: unknown modality 'smell'"),
    (["--builtin_modalities", "audio,taste"], "--builtin_modalities"),
])
def test_bad_values_and_paths_give_clear_errors(argv, message, tmp_path, capsys):
    rc, _ = run(argv + ["--method", "baseline", "--epochs", "1"], tmp_path)
    assert rc == 1
    assert message in capsys.readouterr().err


def test_existing_run_is_not_overwritten_and_corrupt_checkpoint_is_named(tmp_path, capsys):
    rc, out = run(["--method", "baseline", "--epochs", "1", "--no-probe"], tmp_path)
    assert rc == 0
    before = (out / "results.json").read_text()
    rc, _ = run(["--method", "baseline", "--epochs", "1"], tmp_path)
    err = capsys.readouterr().err
    assert rc == 1 and "already holds a run" in err and "OUT=" in err and "--ckpt_path" in err
    assert (out / "results.json").read_text() == before
    (out / "last.pth").write_bytes(b"not a checkpoint")
    rc, _ = run(["--method", "baseline", "--epochs", "2", "--resume"], tmp_path)
    assert rc == 1 and f"{out / 'last.pth'} is not a checkpoint written by this trainer" in capsys.readouterr().err


def test_non_finite_loss_names_epoch_and_step():
    from torch.utils.data import DataLoader

    from dnr.engine import train_one_epoch
    from dnr.methods import Method
    from dnr.stepping import Updater

    class Exploding(Method):
        def loss(self, out, labels, epoch):
            return out.logits.sum() * float("nan"), {}

    class Lin(torch.nn.Module):
        def forward(self, inputs):
            from dnr.models import ModelOutput
            return ModelOutput(self.w(inputs["x"]), {"x": inputs["x"]})

        def __init__(self):
            super().__init__()
            self.w = torch.nn.Linear(3, 2)

    data = [{"inputs": {"x": torch.randn(3)}, "label": 0, "index": i} for i in range(4)]
    model = Lin()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(FloatingPointError, match="at epoch 7, step 0"):
        train_one_epoch(model, Exploding(None, model, None), DataLoader(data, batch_size=2),
                        Updater(model, opt, "cpu"), 7, progress=False)
