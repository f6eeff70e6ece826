"""script/compare.py: runs through the one trainer, re-reads finished runs, writes table and plot."""
import sys

from conftest import ROOT, TINY

sys.path.insert(0, str(ROOT / "script"))
import compare  # noqa: E402


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
    stamp = (out / "baseline_seed0" / "results.json").stat().st_mtime_ns
    assert "finished earlier" not in first

    assert compare.main(argv) == 0  # the second time nothing is trained again
    second = capsys.readouterr().out
    assert second.count("finished earlier, re-read") == 2
    assert (out / "baseline_seed0" / "results.json").stat().st_mtime_ns == stamp
    assert compare.main(["--out", str(out), "--report_only"]) == 0
    assert (out / "results.md").read_text() == table


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
