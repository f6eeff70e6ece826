"""Seed summaries and the README's promises about itself."""
import json
import re
import subprocess

import pytest

from dnr.report import find_results, markdown, mean_std, pm, summarize


def fake_run(folder, method, seed, acc, modalities=("audio", "visual"), extra=None):
    folder.mkdir(parents=True)
    res = {
        "method": method, "dataset": "builtin", "seed": seed, "fusion": "concat",
        "modalities": list(modalities), "epochs": 3, "seconds": 10.0 + seed,
        "val": {"acc": acc, "macro_f1": acc, "map": acc},
        "test": {"acc": acc, "macro_f1": acc - 0.1, "map": acc},
        "best_test_acc": acc + 0.05,
        "unimodal_test_acc": {m: 0.5 for m in modalities}, "probe_test_acc": {},
        "diagnoses": [{"epoch": 1, "applied": True, "purity": {m: {"train": 0.9, "val": 0.6} for m in modalities},
                       "gap": {m: 0.3 for m in modalities}, "alpha": {m: 0.7 for m in modalities}}],
    }
    res.update(extra or {})
    (folder / "results.json").write_text(json.dumps(res))


def test_mean_std_is_the_sample_std():
    assert mean_std([0.7, 0.8, 0.9]) == (pytest.approx(0.8), pytest.approx(0.1))
    assert pm([0.7, 0.8, 0.9]) == "80.00 ± 10.00"
    assert pm([]) == "-"


def test_summary_groups_seeds_and_keeps_unimodal_runs_apart(tmp_path):
    for s, acc in enumerate([0.7, 0.8, 0.9]):
        fake_run(tmp_path / f"dr{s}", "relearn", s, acc)
    fake_run(tmp_path / "vis0", "baseline", 0, 0.95, modalities=("visual",))
    (tmp_path / "unfinished").mkdir()
    (tmp_path / "unfinished" / "last.pth").write_bytes(b"")
    runs, unfinished = find_results([tmp_path])
    assert len(runs) == 4 and unfinished == [tmp_path / "unfinished"]
    rows = summarize(runs)
    assert [(r["method"], r["modalities"], r["seeds"]) for r in rows] == [
        ("relearn", ["audio", "visual"], [0, 1, 2]), ("baseline", ["visual"], [0])]
    assert rows[0]["test_acc"] == "80.00 ± 10.00"
    assert rows[0]["diagnoses"][0]["purity"]["audio"]["train"] == "0.900 ± 0.000"
    text = markdown(rows)
    assert "| builtin | relearn | audio+visual | 3 | 80.00 ± 10.00 |" in text
    assert "| relearn | audio+visual | 1 | yes | 0.900 ± 0.000 | 0.600 ± 0.000 | 0.700 ± 0.000 |" in text


def test_first_stages_are_part_of_their_run_not_runs_of_their_own(tmp_path):
    # UMT's teachers: <run>/teacher_<m> are this trainer's unimodal runs, seed 0 like a real
    # unimodal_seed0 beside them; they must neither count as runs (two runs with one seed) nor
    # hide their cost.
    run = tmp_path / "umt_seed0"
    fake_run(run, "umt", 0, 0.8)
    (run / "args.json").write_text("{}")
    for m, secs in (("audio", 3.0), ("visual", 4.5)):
        fake_run(run / f"teacher_{m}", "unimodal", 0, 0.6, modalities=(m,), extra={"seconds": secs})
        (run / f"teacher_{m}" / "args.json").write_text("{}")
    fake_run(tmp_path / "unimodal_seed0", "unimodal", 0, 0.7, modalities=("audio",))
    cut = tmp_path / "ume_seed0"  # cut inside its second teacher: the run is unfinished, not the teacher
    (cut / "teacher_visual").mkdir(parents=True)
    (cut / "args.json").write_text("{}")
    fake_run(cut / "teacher_audio", "unimodal", 0, 0.6, modalities=("audio",))
    (cut / "teacher_visual" / "last.pth").write_bytes(b"")
    runs, unfinished = find_results([tmp_path])
    assert sorted(r["method"] for r in runs) == ["umt", "unimodal"]
    umt = next(r for r in runs if r["method"] == "umt")
    assert umt["seconds"] == pytest.approx(10.0 + 3.0 + 4.5)
    assert umt["stage_seconds"] == {"teacher_audio": 3.0, "teacher_visual": 4.5}
    assert unfinished == [cut]
    assert [r["method"] for r in find_results([run])[0]] == ["umt"]  # the run folder itself


def test_table_shows_shapley_and_cost_and_old_runs_get_dashes(tmp_path):
    for s, (phi, secs) in enumerate([(0.30, 4.0), (0.10, 6.0)]):
        fake_run(tmp_path / f"b{s}", "baseline", s, 0.8, extra={
            "shapley_test_acc": {"audio": phi, "visual": 0.2},
            "cost": {"parameters": 22_000_000, "flops_per_sample": 2.0e8, "seconds_per_epoch": secs,
                     "train_seconds_per_epoch": secs / 2,
                     "peak_memory": {"mb": 1000.0 + s * 100, "kind": "cpu_peak_rss"}}})
    fake_run(tmp_path / "old", "relearn", 0, 0.7)  # made before Shapley and cost were recorded
    rows = summarize(find_results([tmp_path])[0])
    assert rows[0]["shapley"]["audio"] == "20.00 ± 14.14" and rows[1]["shapley"]["audio"] == "-"
    text = markdown(rows)
    header = text.splitlines()[0]
    assert header.endswith("| s / run | audio Shapley (pts) | visual Shapley (pts) |")
    assert "| 20.00 ± 14.14 | 20.00 ± 0.00 |" in text and text.splitlines()[3].endswith("| - | - |")
    assert "| baseline | audio+visual | 22.00 | 0.200 | 5.0 | 2.5 | 1050 |" in text
    assert "CPU: peak resident set size of the whole process" in text
    assert "| relearn | audio+visual | -" not in text.split("Cost (mean")[1].split("Diagnoses")[0]  # no cost row


def test_summary_refuses_two_runs_with_one_seed(tmp_path):
    fake_run(tmp_path / "a", "relearn", 0, 0.7)
    fake_run(tmp_path / "b", "relearn", 0, 0.8)
    with pytest.raises(ValueError, match="share a seed"):
        summarize(find_results([tmp_path])[0])


def test_readme_has_exactly_two_quick_start_commands_and_ci_runs_the_second(root):
    readme = (root / "README.md").read_text()
    quick = readme.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```sh\n(.*?)```", quick, flags=re.S)
    assert len(blocks) == 2 and all(b.count("\n") == 1 for b in blocks)
    assert "script/ours.sh" in blocks[0] and "requirements.txt" in blocks[0]
    assert "pytest" in blocks[1] and "<!-- test-command -->" in quick
    awk = re.search(r"cmd=\$\(awk '(.*?)' README.md\)", (root / ".ci" / "run").read_text()).group(1)
    extracted = subprocess.run(["awk", awk, "README.md"], cwd=root, capture_output=True, text=True).stdout
    assert extracted.strip() == blocks[1].strip()
    for path in ("script/ours.sh", "script/baseline.sh", "requirements.txt", "requirements-dev.txt",
                 "method.png", "LICENSE"):
        assert (root / path).is_file(), path


def test_table_names_the_machine_each_methods_seconds_come_from(tmp_path):
    epyc = {"cpu": "AMD EPYC", "cpu_capability": "AVX2", "threads": 1, "gpu": None}

    def cost(seconds):
        return {"parameters": 2e6, "flops_per_sample": 1e9, "seconds_per_epoch": seconds,
                "train_seconds_per_epoch": seconds / 2, "peak_memory": {"kind": "cpu_peak_rss", "mb": 100.0}}

    fake_run(tmp_path / "b0", "baseline", 0, 0.8, extra={"versions": {"machine": epyc}, "cost": cost(30.0)})
    fake_run(tmp_path / "b1", "baseline", 1, 0.8, extra={"versions": {"machine": {**epyc, "threads": 2}},
                                                         "cost": cost(8.0)})
    fake_run(tmp_path / "b2", "baseline", 2, 0.8, extra={"versions": {"machine": {**epyc, "threads": 2}},
                                                         "cost": cost(10.0)})
    fake_run(tmp_path / "r0", "relearn", 0, 0.8, extra={"cost": cost(20.0)})  # made before machines were recorded
    rows = summarize(find_results([tmp_path])[0])
    assert rows[0]["machines"] == ["AMD EPYC (AVX2, 1 thread)", "AMD EPYC (AVX2, 2 threads)"]
    table = markdown(rows)
    assert ("Seconds measured on: [1] AMD EPYC (AVX2, 1 thread): baseline; [2] AMD EPYC (AVX2, 2 threads): baseline; "
            "[3] not recorded: relearn.") in table
    # seconds per run (fake_run: 10 + seed) and per epoch are never averaged across machines
    assert "| 10 [1] / 12 [2] |" in table and "| 10 |" in table.split("| relearn |")[1]
    assert "| baseline [1] | audio+visual | 2.00 | 1.000 | 30.0 | 15.0 | 100 |" in table
    assert "| baseline [2] | audio+visual | 2.00 | 1.000 | 9.0 | 4.5 | 100 |" in table
    assert "| relearn | audio+visual | 2.00 | 1.000 | 20.0 | 10.0 | 100 |" in table


def test_one_machine_keeps_the_plain_seconds_line(tmp_path):
    epyc = {"cpu": "AMD EPYC", "cpu_capability": "AVX2", "threads": 1, "gpu": None}
    for s in range(2):
        fake_run(tmp_path / f"b{s}", "baseline", s, 0.8, extra={"versions": {"machine": epyc}})
    table = markdown(summarize(find_results([tmp_path])[0]))
    assert "Seconds measured on: AMD EPYC (AVX2, 1 thread): baseline." in table and "| 10 |" in table

