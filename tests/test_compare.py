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
