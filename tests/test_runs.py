"""What a newcomer trips over: one folder per run (a lock, no empty folder after a failed start,
a finished run left alone), checkpoints checked before anything is built, D&R schedules that
cannot silently train a baseline, and output that explains itself."""
import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import CODE, TINY
from dnr.compare import last_wins
from dnr.diagnose import Relearner, diagnosis_epochs
from dnr.report import pm

sys.path.insert(0, str(CODE))
import main as trainer  # noqa: E402

BASE = TINY + ["--method", "baseline", "--no-probe"]


def run(argv, out):
    return trainer.cli(argv + ["--ckpt_path", str(out)])


# ---------------------------------------------------------------- the run folder
def test_a_second_run_into_a_busy_folder_is_refused_with_the_first_ones_pid(tmp_path, capsys):
    out = tmp_path / "race"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    cmd = [sys.executable, str(CODE / "main.py")] + BASE + ["--epochs", "50", "--ckpt_path", str(out)]
    first = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    try:
        for line in first.stdout:
            if line.startswith("columns:"):  # started, folder locked, before any checkpoint
                break
        assert not (out / "last.pth").exists()
        assert run(BASE + ["--epochs", "1"], out) == 1
        err = capsys.readouterr().err
        assert f"{out} is in use by another run (process {first.pid})" in err
        assert "--ckpt_path" in err and "OUT=" in err
    finally:
        first.kill()
        first.wait()
    assert out.is_dir()  # the refused run removed nothing of the first one's


def test_a_failed_start_leaves_no_folder_but_a_failed_run_keeps_its_epochs(tmp_path, capsys):
    out = tmp_path / "new"
    assert run(BASE + ["--epochs", "1", "--builtin_modalities", "audio,taste"], out) == 1
    assert "--builtin_modalities" in capsys.readouterr().err
    assert not out.exists()
    existing = tmp_path / "mine"
    existing.mkdir()
    (existing / "notes.txt").write_text("keep me")
    assert run(BASE + ["--epochs", "1", "--builtin_modalities", "audio,taste"], existing) == 1
    assert (existing / "notes.txt").read_text() == "keep me"  # a folder it did not create stays


def test_resume_of_a_finished_run_changes_nothing(tmp_path, capsys):
    out = tmp_path / "done"
    assert run(BASE + ["--epochs", "1"], out) == 0
    stamps = {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.is_file()}
    capsys.readouterr()
    assert run(BASE + ["--epochs", "1", "--resume"], out) == 0
    assert "holds a finished run" in capsys.readouterr().out
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.is_file()} == stamps


@pytest.mark.parametrize("save_last, expect", [("never", None), ("end", 2)])
def test_save_last(save_last, expect, tmp_path):
    out = tmp_path / save_last
    assert run(BASE + ["--epochs", "3", "--save_last", save_last], out) == 0
    if expect is None:
        assert not (out / "last.pth").exists()
    else:
        assert torch.load(out / "last.pth", weights_only=True)["epoch"] == expect
    assert (out / "best.pth").exists() and (out / "results.json").exists()


# ---------------------------------------------------------------- checkpoints
def test_a_foreign_file_is_named_before_anything_is_built(tmp_path, capsys, monkeypatch):
    built = []
    monkeypatch.setattr(trainer, "load_data", lambda *a, **k: built.append(1))
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    plain = tmp_path / "tensor.pth"
    torch.save({"weights": torch.zeros(2)}, plain)
    for path, why in ((text, "is not a checkpoint written by this trainer"),
                      (plain, "is not a checkpoint written by this trainer (it lacks ['epoch',")):
        assert run(BASE + ["--epochs", "1", "--resume", str(path)], tmp_path / "x") == 1
        assert f"{path} {why}" in capsys.readouterr().err
    assert built == [] and not (tmp_path / "x").exists()


def test_resuming_with_other_data_names_the_field(tmp_path, capsys):
    out = tmp_path / "run"
    assert run(BASE + ["--epochs", "1"], out) == 0
    (out / "results.json").unlink()  # not finished, so --resume goes on to check the data
    capsys.readouterr()
    assert run(BASE + ["--epochs", "2", "--resume", "--builtin_image_size", "24"], out) == 1
    err = capsys.readouterr().err
    assert "modalities[1].shape[2]: 16 in the checkpoint, 24 now" in err
    assert len(err.splitlines()) == 1  # one line, not two dicts


# ---------------------------------------------------------------- schedules that do nothing
@pytest.mark.parametrize("argv, message", [
    (["--epochs", "6", "--reinit_epoch", "5"], "no diagnosis is followed by a training epoch (diagnoses after "
                                               "0-based epochs [5]; the last epoch is 5)"),
    (["--epochs", "30", "--reinit_epoch", "0"], "--method relearn with --reinit_epoch 0 and --reinit_num 3 never "
                                                "re-initialises: that is the baseline"),
    (["--epochs", "30", "--reinit_num", "0"], "never re-initialises"),
])
def test_d_and_r_schedules_that_would_train_a_baseline_are_refused(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        trainer.cli(["--method", "relearn"] + argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert message in err and len(err.splitlines()) == 2  # the message, and where --help is


def test_diagnosis_epochs_agree_with_the_relearner():
    for epochs, every, num in [(90, 20, 3), (30, 5, 3), (6, 5, 3), (10, 3, 10), (5, 0, 3), (5, 2, 0)]:
        r = Relearner({"a": torch.nn.Linear(2, 2)}, n_clusters=2, reinit_epoch=every, reinit_num=num)
        due = []
        for e in range(epochs):
            if r.due(e):
                due.append(e)
                r.num_reinits += 1
        assert diagnosis_epochs(epochs, every, num) == due


# ---------------------------------------------------------------- reading the output
def test_the_epoch_line_is_explained_and_redirected_output_shows_progress(tmp_path, capsys):
    assert run(BASE + ["--epochs", "1", "--log_every", "1"], tmp_path / "run") == 0
    out = capsys.readouterr().out
    assert "columns: epoch e/E (0-based)" in out and "* = the best epoch so far on --select_on (val)" in out
    steps = [line for line in out.splitlines() if line.startswith("  epoch 0 step ")]
    assert [s.split()[3] for s in steps] == ["1/3", "2/3", "3/3"]  # 40 samples in batches of 16
    assert trainer.auto_log_every(93) == 19 and trainer.auto_log_every(10) == 0
    help_text = " ".join(trainer.get_args_parser().format_help().split())  # unwrapped
    assert "Exit status: 0 done, 1 error, 2 bad flag, 130 Ctrl-C, 143 SIGTERM" in help_text
    assert "Defaults are the D&R authors' CREMA-D settings" in help_text


def test_one_seed_has_no_spread_and_the_printed_command_shows_the_values_used():
    assert pm([0.5]) == "50.00 ± –"
    assert pm([0.5, 0.7]) == "60.00 ± 14.14"
    argv = ["--epochs", "30", "--learning_rate", "0.01", "--probe", "--track_purity", "--epochs", "6", "--no-probe"]
    assert last_wins(argv) == ["--learning_rate", "0.01", "--track_purity", "--epochs", "6", "--no-probe"]
    assert last_wins(["--encoders", "audio=mlp", "--x=1", "--x=2"]) == ["--encoders", "audio=mlp", "--x=2"]


def test_ctrl_c_prints_where_the_run_stands(tmp_path, capsys, monkeypatch):
    """KeyboardInterrupt anywhere in the run: a short message, exit 130, no traceback."""
    real = trainer.train_one_epoch
    calls = []

    def interrupted(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(trainer, "train_one_epoch", interrupted)
    out = tmp_path / "run"
    assert run(BASE + ["--epochs", "3"], out) == 130
    err = capsys.readouterr().err
    assert f"stopped by Ctrl-C after epoch 0 (0-based) had finished; {out / 'last.pth'} holds that epoch" in err
    assert "--resume" in err.splitlines()[-2] and "Traceback" not in err
    monkeypatch.setattr(trainer, "train_one_epoch", real)
    assert run(BASE + ["--epochs", "3", "--resume"], out) == 0
    assert [json.loads(line)["epoch"] for line in (out / "log.jsonl").read_text().splitlines()] == [0, 1, 2]


def test_the_folder_lock_names_its_holder(tmp_path):
    """One lock for run folders and prepared-data folders (prepare.py takes it too)."""
    from dnr.data.prepare import UsageError, _exclusive
    from dnr.rundir import FolderBusy, folder_lock

    with folder_lock(tmp_path, ".lock", "{folder} busy, held by {pid}"):
        with pytest.raises(FolderBusy, match=f"{tmp_path} busy, held by {os.getpid()}"):
            with folder_lock(tmp_path, ".lock", "{folder} busy, held by {pid}"):
                pass
    with _exclusive(tmp_path):
        with pytest.raises(UsageError, match=f"another preparation is writing into {tmp_path}"):
            with _exclusive(tmp_path):
                pass
    with folder_lock(tmp_path, ".lock", "{folder} busy"):  # released when the block ends
        pass
