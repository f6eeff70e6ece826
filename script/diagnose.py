#!/usr/bin/env python3
"""Diagnose a run's model after the fact: how imbalanced are its modalities?

    python script/diagnose.py runs/builtin_baseline_seed0                       # the selected epoch (best.pth)
    python script/diagnose.py runs/builtin_baseline_seed0 --checkpoint last     # the last finished epoch
    python script/diagnose.py runs/builtin_baseline_seed0 --checkpoint epoch 5  # epoch_005.pth (--keep_every)

For a finished or a running run (checkpoints are written atomically), on the run's own data and
splits: each modality's k-means purity on train, val and test (mean ± std over --repeats k-means
seeds), the D&R strengths tanh(lambda |train - val|) it would apply, each modality's Shapley
contribution to the fused test accuracy (absent modalities' inputs zeroed), and uni-modal
(head-slice) and linear-probe test accuracies. Writes <out>/diagnosis.json and <out>/diagnosis.png
(per modality: purity train/val/test, t-SNE of the features coloured by class, train and val);
<out> is RUN_DIR/diagnosis_<best|last|epoch_XXX> unless --out says otherwise.

The work is one library call, dnr.imbalance.diagnose_model (README, "Diagnose your own model");
this script only finds the checkpoint, checks it and rebuilds the run's model and data.
Exit status: 0 done, 1 an error named on stderr (a missing, unreadable or foreign checkpoint, data
that differ from the run's), 2 a bad flag.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "code"))

import torch  # noqa: E402

import main as trainer  # noqa: E402  (the trainer's own data, model and loader builders)
from dnr import checkpoint as ckpt_io  # noqa: E402
from dnr.methods import METHODS  # noqa: E402

MODEL_KEYS = ("model", "epoch", "args", "info", "model_args")  # best.pth, last.pth and epoch_XXX.pth have them


def checkpoint_path(run_dir: Path, which) -> Path:
    """best | last | ("epoch", N) -> the file in `run_dir`; a missing one is named with what exists."""
    if which in ("best", "last"):
        path = run_dir / f"{which}.pth"
    else:
        path = run_dir / ckpt_io.epoch_file(which[1])
    if not path.is_file():
        kept = sorted(p.name for p in run_dir.glob("epoch_*.pth"))
        hint = (f"; kept epochs: {', '.join(kept)}" if kept else
                "; this run kept no per-epoch checkpoints (train with --keep_every N for --checkpoint epoch N)")
        raise FileNotFoundError(f"no checkpoint {path}" + (hint if which not in ("best", "last") else ""))
    return path


def read_checkpoint(path: Path, run_dir: Path) -> dict:
    """The checkpoint's dict, checked: readable with weights_only, written by this trainer, and from
    the run in `run_dir` (same dataset, method and fusion as its args.json)."""
    saved = ckpt_io.load(path, map_location="cpu")  # ValueError naming the file when it cannot be read
    if not isinstance(saved, dict):
        raise ValueError(f"{path} is not a checkpoint written by this trainer (it holds a {type(saved).__name__})")
    missing = [k for k in MODEL_KEYS if k not in saved]
    if missing:
        raise ValueError(f"{path} is not a checkpoint written by this trainer (it lacks {missing})")
    args_file = run_dir / "args.json"
    if args_file.is_file():
        run_args = json.loads(args_file.read_text())
        for key in ("dataset", "method", "fusion"):
            if run_args.get(key) != saved["args"].get(key):
                raise ValueError(f"{path} comes from another kind of run: it was trained with --{key} "
                                 f"{saved['args'].get(key)!r}, {args_file} says {run_args.get(key)!r}")
    return saved


def load_run(path: Path, run_dir: Path, device, *, data_path=None, num_workers: int = 0):
    """(saved, splits, model on `device` in eval mode, {"train", "val", "test"} evaluation loaders)
    for a checkpoint of this trainer, on the data its run used."""
    saved = read_checkpoint(path, run_dir)
    # Today's defaults under the run's values: flags added since the run was made get their default.
    args = trainer.get_args_parser().parse_args([])
    vars(args).update(saved["args"])
    args.num_workers = num_workers
    if data_path is not None:
        args.data_path = str(data_path)
    splits = trainer.load_data(args, args.method)
    diff = ckpt_io.first_difference(saved["info"], splits.info.to_dict())
    if diff:
        raise ValueError(f"{path} was trained on other data than these dataset flags give: {diff}")
    model = METHODS[args.method].build_model(splits.info, **saved["model_args"]).to(device)
    try:
        model.load_state_dict(saved["model"])
    except RuntimeError as err:
        raise ValueError(f"{path}: its weights do not fit the model its own flags build "
                         f"({str(err).splitlines()[0]})") from None
    model.eval()
    _, _, evals = trainer.make_loaders(args, splits, torch.device(device))
    return saved, splits, model, evals


def parse_which(tokens) -> object:
    """--checkpoint best | last | epoch N -> "best", "last" or ("epoch", N); None when malformed."""
    if len(tokens) == 1 and tokens[0] in ("best", "last"):
        return tokens[0]
    if len(tokens) == 2 and tokens[0] == "epoch" and tokens[1].isdigit():
        return ("epoch", int(tokens[1]))
    return None


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", type=Path, help="a run's output folder (--ckpt_path)")
    p.add_argument("--checkpoint", nargs="+", default=["best"], metavar="WHICH",
                   help="best (the epoch selected on val), last (the last finished epoch: last.pth) or "
                        "'epoch N' (epoch_NNN.pth, kept by training with --keep_every) (default: best)")
    p.add_argument("--repeats", type=int, default=10,
                   help="k-means seeds per purity, from the run's --kmeans_seed; 10 makes the strength "
                        "two to three times steadier than one seed (README, 'How sure is a diagnosis') "
                        "(default: %(default)s)")
    p.add_argument("--out", type=Path, default=None,
                   help="folder for diagnosis.json and diagnosis.png (default: RUN_DIR/diagnosis_<checkpoint>)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="auto takes CUDA when available (default: %(default)s)")
    p.add_argument("--data_path", default=None, help="the dataset's folder, if it moved since the run")
    p.add_argument("--num_workers", type=int, default=0, help="DataLoader workers (default: %(default)s)")
    p.add_argument("--tsne_samples", type=int, default=500,
                   help="t-SNE of at most this many samples per split (a seeded subset) (default: %(default)s)")
    p.add_argument("--no_probe", action="store_true", help="skip the logistic-regression probes")
    return p


def main(argv=None) -> int:
    p = get_parser()
    args = p.parse_args(argv)
    which = parse_which(args.checkpoint)
    if which is None:
        p.error(f"--checkpoint: expected best, last or 'epoch N', got {' '.join(args.checkpoint)!r}")
    for flag, value, low in (("--repeats", args.repeats, 1), ("--tsne_samples", args.tsne_samples, 5),
                             ("--num_workers", args.num_workers, 0)):
        if value < low:
            p.error(f"{flag} must be >= {low}, got {value}")
    from dnr.imbalance import diagnose_model, plot_model_diagnosis
    from dnr.logger import write_json
    from dnr.runtime import pick_device

    try:
        if not args.run_dir.is_dir():
            raise FileNotFoundError(f"no run folder {args.run_dir}")
        path = checkpoint_path(args.run_dir, which)
        device = pick_device(args.device)
        saved, splits, model, evals = load_run(path, args.run_dir, device, data_path=args.data_path,
                                               num_workers=args.num_workers)
        run = saved["args"]
        report = diagnose_model(model, evals, splits.info.num_classes, device=device, repeats=args.repeats,
                                lam=run["move_lambda"], seed=run["kmeans_seed"], n_init=run["kmeans_n_init"],
                                backend=run["kmeans_backend"], probe=not args.no_probe,
                                device_transform=splits.device_transform)
    except (FileNotFoundError, ValueError, KeyError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    name = which if isinstance(which, str) else ckpt_io.epoch_file(which[1])[:-4]
    out = args.out or args.run_dir / f"diagnosis_{name}"
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "diagnosis.json", {"checkpoint": str(path), "epoch": saved["epoch"], "method": run["method"],
                                        "dataset": run["dataset"], "seed": run["random_seed"],
                                        "lambda": run["move_lambda"], **report.to_dict()})
    plot_model_diagnosis(report, out / "diagnosis.png", tsne_samples=args.tsne_samples, seed=run["kmeans_seed"],
                         class_names=splits.info.classes,
                         title=f"{run['method']} on {run['dataset']}, seed {run['random_seed']}: {path.name} "
                               f"(0-based epoch {saved['epoch']})")
    print(f"{path} (0-based epoch {saved['epoch']}, {run['method']} on {run['dataset']}):")
    print(report.summary())
    print(f"wrote {out / 'diagnosis.json'} and {out / 'diagnosis.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
