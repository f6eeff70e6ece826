"""script/compare.py: runs through the one trainer, re-reads finished runs, writes table and plot."""
import json
import sys

from conftest import ROOT, TINY

sys.path.insert(0, str(ROOT / "script"))
import compare  # noqa: E402


def image_size(path):
    from PIL import Image

    with Image.open(path) as im:
        return im.size


def test_compare_runs_then_rereads(tmp_path, capsys):
    out = tmp_path / "cmp"
    argv = ["--out", str(out), "--methods", "baseline", "unimodal:visual", "--seeds", "0", "--",
            *TINY, "--epochs", "1", "--reinit_epoch", "0", "--no-probe"]
    assert compare.main(argv) == 0
    first = capsys.readouterr().out
    assert (out / "baseline_seed0" / "results.json").exists()
    assert (out / "unimodal_visual_seed0" / "results.json").exists()
    table = (out / "results.md").read_text()
    assert "| builtin | baseline | audio+visual | 1 |" in table
    assert "| builtin | unimodal | visual | 1 |" in table
    assert (out / "results.png").stat().st_size > 1000
    assert image_size(out / "results.png") == (1500, 400)  # no purity recorded: the accuracy row only
    stamp = (out / "baseline_seed0" / "results.json").stat().st_mtime_ns
    assert "finished earlier" not in first

    assert compare.main(argv) == 0  # the second time nothing is trained again
    second = capsys.readouterr().out
    assert second.count("finished earlier, re-read") == 2
    assert (out / "baseline_seed0" / "results.json").stat().st_mtime_ns == stamp
    assert compare.main(["--out", str(out), "--report_only"]) == 0
    assert (out / "results.md").read_text() == table


def test_compare_plots_purity_curves(tmp_path):
    """The figure's second row: purity per modality over epochs, from --track_purity_every, else
    from the diagnoses."""
    from dnr.compare import read_purity

    out = tmp_path / "cmp"
    argv = ["--out", str(out), "--methods", "baseline", "--seeds", "0", "--", *TINY, "--epochs", "3",
            "--reinit_epoch", "2", "--reinit_num", "1", "--track_purity", "--no-probe"]
    assert compare.main(argv) == 0
    only_diagnoses = read_purity(out / "baseline_seed0")
    assert set(only_diagnoses) == {"audio/train", "audio/val", "visual/train", "visual/val"}
    assert list(only_diagnoses["audio/train"]) == [2]
    assert image_size(out / "results.png") == (1500, 800)  # two panel rows: accuracy, then purity
    import shutil

    shutil.rmtree(out)
    assert compare.main(argv + ["--track_purity_every", "1"]) == 0
    curves = read_purity(out / "baseline_seed0")
    log = [json.loads(line) for line in (out / "baseline_seed0" / "log.jsonl").read_text().splitlines()]
    assert curves["visual/val"] == {r["epoch"]: r["tracked_purity"]["purity"]["visual"]["val"] for r in log}
    assert list(curves["visual/val"]) == [0, 1, 2]


def test_compare_rejects_unknown_method_and_empty_folder(tmp_path, capsys):
    import pytest

    with pytest.raises(SystemExit):
        compare.main(["--out", str(tmp_path), "--methods", "magic"])
    assert "unknown ['magic']" in capsys.readouterr().err
    assert compare.main(["--out", str(tmp_path), "--report_only"]) == 1
    assert "no finished run" in capsys.readouterr().err


def test_compare_takes_its_methods_from_the_registry(root):
    """One list of methods: the registry. Neither script keeps a second one by hand."""
    from dnr.methods import METHODS

    assert compare.ALL == list(METHODS)
    assert "METHODS:-" not in (root / "script" / "compare.sh").read_text()


def _fake_python(tmp_path):
    """A PYTHON for the scripts that prints the trainer's command line instead of training and
    runs anything else (the manifest reading) with the real interpreter."""
    fake = tmp_path / "fakepy"
    fake.write_text(f'#!/bin/sh\ncase "$1" in *main.py) shift; echo "$@"; exit 0;; esac\nexec {sys.executable} "$@"\n')
    fake.chmod(0o755)
    return fake


def test_scripts_take_the_dataset_from_the_prepared_folder(root, tmp_path):
    import json
    import os
    import subprocess

    def script(name, **env):
        run = subprocess.run(["sh", str(root / "script" / name)], cwd=tmp_path, capture_output=True, text=True,
                             env={**os.environ, "PYTHON": str(_fake_python(tmp_path)), **env})
        return run.returncode, run.stdout.split(), run.stderr

    def flag(argv, name):
        return argv[argv.index(name) + 1]

    folder = tmp_path / "data" / "my vgg"  # a path with a space survives
    folder.mkdir(parents=True)
    (folder / "manifest.json").write_text(json.dumps({"dataset": "vggsound", "format": 1}))
    rc, argv, _ = script("ours.sh", DATA=str(folder))
    assert rc == 0 and flag(argv, "--dataset") == "vggsound" and flag(argv, "--method") == "relearn"
    assert flag(argv, "--reinit_epoch") == "20" and flag(argv, "--ckpt_path") == "runs/vggsound_relearn_seed0"
    assert " ".join(argv).count(str(folder)) == 1
    (folder / "manifest.json").write_text(json.dumps({"dataset": "cremad"}))
    rc, argv, _ = script("baseline.sh", DATA=str(folder))
    assert rc == 0 and flag(argv, "--dataset") == "cremad" and flag(argv, "--learning_rate") == "0.002"
    assert flag(argv, "--epochs") == "90" and "--track_purity" in argv
    pickles = tmp_path / "mosei"
    pickles.mkdir()
    rc, argv, _ = script("ours.sh", DATA=str(pickles), DATASET="mosei")
    assert rc == 0 and flag(argv, "--dataset") == "mosei" and flag(argv, "--optimizer") == "adam"
    rc, _, err = script("ours.sh", DATA=str(pickles))
    assert rc == 2 and "holds no manifest.json" in err and "DATASET=mosi" in err
    (folder / "manifest.json").write_text(json.dumps({"dataset": "imagenet"}))
    rc, _, err = script("compare.sh", DATA=str(folder))
    assert rc == 2 and "no settings for dataset 'imagenet'" in err
    rc, argv, _ = script("ours.sh")
    assert rc == 0 and flag(argv, "--dataset") == "builtin"


def test_many_methods_get_distinct_colours_and_a_legend_off_the_curves(tmp_path, monkeypatch):
    import matplotlib.figure
    from dnr.compare import plot

    runs = []
    for i in range(22):  # the built-in comparison's rows
        folder = tmp_path / f"m{i:02d}"
        folder.mkdir()
        lines = [json.dumps({"epoch": e, "test": {"acc": 0.1 * e, "acc_audio": 0.1, "acc_visual": 0.2},
                             "tracked_purity": {"purity": {"audio": {"train": 0.5, "val": 0.4},
                                                           "visual": {"train": 0.6, "val": 0.5}}}})
                 for e in range(3)]
        (folder / "log.jsonl").write_text("\n".join(lines) + "\n")
        runs.append({"method": f"m{i:02d}", "modalities": ["audio", "visual"], "_path": str(folder)})
    saved = []
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", lambda fig, *a, **k: saved.append(fig))
    plot(runs, tmp_path / "results.png")
    fused, legend_cell = saved[0].axes[0], saved[0].axes[3]
    assert fused.get_legend() is None  # 22 entries would cover the fused panel's curves
    legend = legend_cell.get_legend()
    assert [t.get_text() for t in legend.get_texts()] == [r["method"] for r in runs]
    assert len({tuple(line.get_color()) for line in fused.get_lines()}) == 22
