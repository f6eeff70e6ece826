"""Summarise finished runs over seeds as markdown tables (mean ± std).

    python script/summarize.py runs/builtin_*_seed*            # print
    python script/summarize.py runs/ --out runs/results.md     # also write a file
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "code"))
from dnr.report import find_results, markdown, summarize  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="run folders (or folders holding run folders)")
    p.add_argument("--out", default=None, help="also write the tables to this markdown file")
    args = p.parse_args(argv)
    try:
        runs, unfinished = find_results(args.runs)
    except FileNotFoundError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    for u in unfinished:
        print(f"note: {u} has no results.json yet (unfinished run); left out", file=sys.stderr)
    text = markdown(summarize(runs))
    print(text, end="")
    if args.out:
        Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
