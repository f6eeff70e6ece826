"""Compare methods over seeds on one dataset: run (or re-read) every run, then write
OUT/results.md (mean ± std over seeds) and OUT/results.png (test accuracy per epoch).

    python script/compare.py --out runs/compare --methods baseline relearn ogm_ge unimodal \\
        --seeds 0 1 2 -- --epochs 30 --learning_rate 0.01
    python script/compare.py --out runs/compare --report_only     # table and plot only

Everything after `--` goes to code/main.py for every run.
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "code"))
from dnr.methods import METHODS  # noqa: E402  (the one list of methods: the registry)

ALL = list(METHODS)  # registration order: baseline, relearn, then the comparison methods


def modalities_of(extra):
    """The dataset's modality names, from the same flags main.py will get."""
    import main as trainer
    from dnr.data import build_datasets

    args = trainer.get_args_parser().parse_args(list(extra))
    return build_datasets(args.dataset, args).info.modality_names


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = []
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1:]
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="folder holding one sub-folder per run")
    p.add_argument("--methods", nargs="+", default=ALL,
                   help="methods to run; 'unimodal' = one run per modality, 'unimodal:NAME' = one "
                        f"(default: {' '.join(ALL)})")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="seeds (default: 0 1 2)")
    p.add_argument("--report_only", action="store_true", help="only re-read the runs and write the table and plot")
    args = p.parse_args(argv)
    from dnr.compare import report, run_all

    out = Path(args.out)
    try:
        if not args.report_only:
            unknown = [m for m in args.methods if m.split(":")[0] not in METHODS]
            if unknown:
                p.error(f"--methods: unknown {unknown}; choose from {sorted(METHODS)}")
            out.mkdir(parents=True, exist_ok=True)
            mods = modalities_of(extra) if any(m == "unimodal" for m in args.methods) else []
            run_all(out, args.methods, args.seeds, mods, extra)
        print(report(out), end="")
    except FileNotFoundError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"[compare] wrote {out / 'results.md'} and {out / 'results.png'}")
    if (out / "failed.txt").exists():
        print(f"[compare] some runs failed: {(out / 'failed.txt').read_text().strip()}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
