"""Train and evaluate a multimodal classifier: the baseline, Diagnosing & Re-learning, or any
registered method, on any registered dataset, through one epoch loop.

    python code/main.py                                   # D&R, the authors' CREMA-D settings, built-in data
    python code/main.py --method baseline --epochs 30
    python code/main.py --help

The flags' defaults are the D&R authors' CREMA-D settings (90 epochs, SGD lr 0.002, a diagnosis
every 20 epochs, at most 3); on the built-in dataset that takes about an hour on a CPU.
script/ours.sh and script/baseline.sh use demo settings for the built-in dataset instead (30
epochs, lr 0.01, a diagnosis every 5 epochs; a few minutes) and the authors' settings with DATA=.

Splits: train trains, val selects the epoch (and feeds the D&R diagnosis), test is reported at
the epoch chosen on val. Everything a run writes goes under --ckpt_path.

Exit status: 0 the run finished (or had finished before: --resume then changes nothing); 1 an
error, named on stderr (a missing or foreign file, different data on resume, a diverging loss,
a run folder in use); 2 a bad flag; 130 stopped by Ctrl-C, 143 by SIGTERM (last.pth holds the
last finished epoch; the message says how to continue).
"""
from __future__ import annotations

import argparse
import json
import platform
import shlex
import signal
import sys
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from dnr import __version__
from dnr import checkpoint as ckpt_io
from dnr import distributed as dist
from dnr.data import DATASETS, build_datasets
from dnr.engine import AMP_DTYPES, FeatureSource, evaluate, extract_features, forward_pass, metrics_of, train_one_epoch
from dnr.imbalance import modality_shapley, run_cost
from dnr.logger import RunLogger, write_json
from dnr.methods import METHODS, TrainContext, add_diagnosis_args, create_method, make_tracker
from dnr.metrics import linear_probe_accuracy
from dnr.models import ENCODERS, FUSIONS, encoder_options
from dnr.models.pretrained import describe_weights, load_encoder_weights, parse_weights
from dnr.rundir import run_folder
from dnr.runtime import epoch_seed, pick_device, seed_everything, set_deterministic, worker_init
from dnr.selection import Selection
from dnr import stepping
from dnr.stepping import Updater

SPLIT_METRICS = ("acc", "macro_f1", "f1_weighted", "map")
EPOCH_LEGEND = ("epoch e/E (0-based) | training loss and accuracy | val: acc, f1 = macro-F1, mAP, "
                "[m=...] = each modality's accuracy from its uni-modal logits (its slice of the fusion head, or "
                "the method's own uni-modal head) | test acc | seconds; "
                "* = the best epoch so far on --select_on (val), the one the run reports")


class Parser(argparse.ArgumentParser):
    """A bad flag gets one line naming it (exit 2), not the 60-line usage of every flag."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n(every flag: python code/main.py --help)\n")


def get_args_parser() -> argparse.ArgumentParser:
    p = Parser(
        description="Balanced multimodal learning: baseline, Diagnosing & Re-learning (D&R) and "
                    "comparison methods in one trainer.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        epilog="Defaults are the D&R authors' CREMA-D settings (90 epochs, lr 0.002, a diagnosis every 20 "
               "epochs); script/ours.sh and script/baseline.sh use demo settings on the built-in dataset "
               "(30 epochs, lr 0.01, a diagnosis every 5 epochs). Each epoch prints one line: "
               + EPOCH_LEGEND + ". Exit status: 0 done, 1 error, 2 bad flag, 130 Ctrl-C, 143 SIGTERM.",
    )
    g = p.add_argument_group("data")
    g.add_argument("--dataset", default="builtin", choices=sorted(DATASETS),
                   help="dataset; 'builtin' is generated on the fly, no download")
    g.add_argument("--data_path", default=None,
                   help="folder of a prepared dataset (not used by 'builtin')")
    g.add_argument("--num_workers", type=int, default=0,
                   help="DataLoader worker processes; 0 loads in the main process")
    g.add_argument("--train_augment", action=argparse.BooleanOptionalAction, default=True,
                   help="training-time sampling and augmentation; --no-train_augment trains on the "
                        "evaluation transform, as the authors' D&R runs did (reproduction switch)")
    g.add_argument("--frame_cache", choices=("off", "cpu", "gpu"), default="off",
                   help="prepared datasets (video frames, still images): read frames from the packed cache built by "
                        "'script/prepare.py pack' instead of decoding JPEGs; cpu: augment in the loader, "
                        "gpu: the loader returns uint8 frames and crop/flip/resize run batched on the "
                        "training device (values differ slightly from the JPEG path)")
    for name, entry in sorted(DATASETS.items()):
        entry.add_args(p.add_argument_group(f"dataset '{name}' ({entry.description})"))

    g = p.add_argument_group("model")
    g.add_argument("--fusion", default="concat", choices=FUSIONS,
                   help="fusion head; per-modality accuracy comes from the head for concat and sum, "
                        "from a linear probe for film and gated")
    g.add_argument("--encoders", default="",
                   help="override the encoder per modality as NAME=ENCODER pairs, e.g. "
                        "'audio=resnet18'; by default each modality's kind picks one")
    g.add_argument("--encoder_weights", default="",
                   help="start encoders from your own pretrained weights, MODALITY=PATH pairs, e.g. "
                        "'image=/path/resnet18.pth': a state dict of the encoder or of its part (a "
                        "torchvision ResNet-18's for our ResNet-18), read with torch.load(weights_only=True); "
                        "D&R re-initialises towards them (default: none, random initialisation)")
    for name, entry in sorted(ENCODERS.items()):
        if entry.add_args is not None:
            entry.add_args(p.add_argument_group(f"encoder '{name}'"))

    g = p.add_argument_group("optimisation")
    g.add_argument("--method", default="relearn", choices=sorted(METHODS),
                   help="training method: " + "; ".join(f"{n}: {c.help}" for n, c in sorted(METHODS.items())))
    g.add_argument("--batch_size", type=int, default=64, help="samples per step")
    g.add_argument("--epochs", type=int, default=90, help="training epochs")
    g.add_argument("--optimizer", choices=("sgd", "adam"), default="sgd", help="optimiser")
    g.add_argument("--learning_rate", type=float, default=0.002, help="initial learning rate")
    g.add_argument("--momentum", type=float, default=0.9, help="SGD momentum")
    g.add_argument("--weight_decay", type=float, default=1e-4, help="L2 weight decay")
    g.add_argument("--lr_decay_step", type=int, default=0,
                   help="multiply the learning rate by --lr_decay_ratio every this many epochs; 0 "
                        "keeps it constant (the authors' D&R runs had no schedule)")
    g.add_argument("--lr_decay_ratio", type=float, default=0.1, help="learning-rate decay factor")
    g.add_argument("--grad_clip", type=float, default=0.0,
                   help="clip the gradient norm to this value; 0 disables")

    add_diagnosis_args(p.add_argument_group("D&R (diagnosis and re-learning)"))
    for name, cls in sorted(METHODS.items()):
        cls.add_args(p.add_argument_group(f"method '{name}'"))

    g = p.add_argument_group("evaluation")
    g.add_argument("--select_on", choices=("val", "test"), default="val",
                   help="split whose accuracy picks the reported epoch; 'test' reproduces the "
                        "authors' selection on the test set (biased; reproduction switch)")
    g.add_argument("--probe", action=argparse.BooleanOptionalAction, default=True,
                   help="after training, fit a logistic-regression probe per modality on the "
                        "selected model's frozen training features and report its test accuracy")
    g.add_argument("--eval_batch_size", type=int, default=0,
                   help="batch size for evaluation and feature extraction; 0 = 2 x --batch_size")
    g.add_argument("--eval_only", action="store_true",
                   help="evaluate a checkpoint (--resume PATH, else <ckpt_path>/best.pth) on val and "
                        "test, write eval.json, and exit")

    g = p.add_argument_group("runtime")
    g.add_argument("--random_seed", type=int, default=0, help="seed of initialisation, shuffling, augmentation")
    g.add_argument("--ckpt_path", default=None,
                   help="output folder of this run (created if missing); default "
                        "runs/<dataset>_<method>_seed<seed> under the current folder")
    g.add_argument("--tensorboard_path", default=None,
                   help="TensorBoard folder; default <ckpt_path>/tensorboard")
    g.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="auto takes CUDA when available; choose the GPU with CUDA_VISIBLE_DEVICES")
    g.add_argument("--resume", nargs="?", const="auto", default=None,
                   help="continue a run: a checkpoint file or run folder; the bare flag takes "
                        "<ckpt_path>/last.pth")
    g.add_argument("--deterministic", action="store_true",
                   help="deterministic algorithms only (slower; a resumed run then matches an "
                        "uninterrupted one exactly on the CPU)")
    g.add_argument("--progress", choices=("auto", "on", "off"), default="auto",
                   help="progress bars; auto shows them when stderr is a terminal")
    g.add_argument("--log_every", type=int, default=-1,
                   help="without progress bars (output not a terminal): print a line every this many "
                        "training steps; 0 never; -1 (auto) about five lines per epoch of at least 50 steps")
    g.add_argument("--save_last", choices=("every_epoch", "end", "never"), default="every_epoch",
                   help="when to write last.pth (about 270 MB for two ResNet-18s: model, optimiser, the D&R "
                        "snapshot): every_epoch lets --resume continue a cut run; end writes it once, after "
                        "the last epoch; never leaves it out (the disk saving); with end or never a cut run "
                        "starts again")
    g.add_argument("--keep_every", type=int, default=0,
                   help="also keep the model alone after every 0-based epoch e with e %% N == 0 as "
                        "epoch_XXX.pth (the weights that epoch evaluated, before any re-initialisation; "
                        "script/diagnose.py --checkpoint epoch N reads them); each file is the size of "
                        "best.pth (about 90 MB for two ResNet-18s); 0 keeps none")

    g = p.add_argument_group("speed (all off by default; launch with torchrun for several processes)")
    g.add_argument("--amp", choices=tuple(AMP_DTYPES), default="off",
                   help="mixed precision: bf16 (CPU or GPU) or fp16 (CUDA, with a gradient scaler)")
    g.add_argument("--channels_last", action="store_true",
                   help="channels-last memory format for the convolutional encoders (faster on GPUs "
                        "with tensor cores)")
    g.add_argument("--compile", action="store_true", help="torch.compile the model (slow start, faster steps)")
    g.add_argument("--sync_bn", action="store_true",
                   help="with several CUDA processes: BatchNorm statistics over the global batch "
                        "(SyncBatchNorm), so N processes x batch B train like 1 x N*B")
    return p


def check_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse out-of-range values before anything is built (exit 2, naming the flag); the method
    checks its own flags (and the diagnosis flags every method shares)."""
    rules = [
        (args.epochs >= 1, f"--epochs must be >= 1, got {args.epochs}"),
        (args.batch_size >= 1, f"--batch_size must be >= 1, got {args.batch_size}"),
        (args.eval_batch_size >= 0, f"--eval_batch_size must be >= 0, got {args.eval_batch_size}"),
        (args.learning_rate > 0, f"--learning_rate must be > 0, got {args.learning_rate}"),
        (args.weight_decay >= 0, f"--weight_decay must be >= 0, got {args.weight_decay}"),
        (args.lr_decay_step >= 0, f"--lr_decay_step must be >= 0 (0 disables), got {args.lr_decay_step}"),
        (0 < args.lr_decay_ratio <= 1, f"--lr_decay_ratio must lie in (0, 1], got {args.lr_decay_ratio}"),
        (args.grad_clip >= 0, f"--grad_clip must be >= 0 (0 disables), got {args.grad_clip}"),
        (args.num_workers >= 0, f"--num_workers must be >= 0, got {args.num_workers}"),
        (args.keep_every >= 0, f"--keep_every must be >= 0 (0 keeps none), got {args.keep_every}"),
        (not (args.amp == "fp16" and args.device == "cpu"),
         "--amp fp16 needs CUDA; on the CPU use --amp bf16"),
    ]
    for ok, message in rules:
        if not ok:
            p.error(message)
    try:
        METHODS[args.method].check_args(args)
    except ValueError as err:
        p.error(str(err))
    try:
        missing = [f"{m}={path}" for m, path in parse_weights(args.encoder_weights).items() if not path.is_file()]
    except ValueError as err:
        p.error(str(err))
    if missing:
        p.error(f"--encoder_weights: no such file: {', '.join(missing)}")
    if args.data_path is not None and not Path(args.data_path).is_dir():
        p.error(f"--data_path {args.data_path!r} is not a folder")
    if args.ckpt_path is not None and Path(args.ckpt_path).exists() and not Path(args.ckpt_path).is_dir():
        p.error(f"--ckpt_path {args.ckpt_path!r} exists and is not a folder")


def parse_encoders(text: str) -> dict:
    out = {}
    for part in filter(None, (t.strip() for t in text.split(","))):
        if "=" not in part:
            raise ValueError(f"--encoders: expected MODALITY=ENCODER pairs, got {part!r}")
        m, e = part.split("=", 1)
        out[m.strip()] = e.strip()
    return out


def encoders_seen(choice: dict, dataset_modalities, seen) -> dict:
    """`choice` (from --encoders) restricted to the modalities `seen` by the method; a name that is
    not a modality of the dataset at all is an error."""
    unknown = sorted(set(choice) - set(dataset_modalities))
    if unknown:
        raise ValueError(f"--encoders names {unknown}, which are not modalities of this dataset; "
                         f"it has {list(dataset_modalities)}")
    return {m: e for m, e in choice.items() if m in seen}


def say(*parts) -> None:
    print(*parts, flush=True)


def build_optimizer(args, model):
    return stepping.build_optimizer(args, model.parameters())


def make_loaders(args, splits, device):
    """Training batches from a per-epoch permutation shared by all processes (each takes its part
    of every global batch); evaluation sharded across processes without padding."""
    eval_bs = args.eval_batch_size or 2 * args.batch_size
    common = dict(num_workers=args.num_workers, pin_memory=device.type == "cuda", worker_init_fn=worker_init)
    d = dist.info()
    train_set = splits.train if args.train_augment else splits.train_eval
    sampler = dist.EpochBatchSampler(len(train_set), args.batch_size, d.rank, d.world_size)
    if len(sampler) == 0:
        raise ValueError(f"the training split has {len(train_set)} samples: too few for batches of "
                         f"--batch_size {args.batch_size} x {d.world_size} processes")
    train = DataLoader(train_set, batch_sampler=sampler, **common)
    evals = {name: DataLoader(ds, batch_size=eval_bs, shuffle=False,
                              sampler=dist.ShardSampler(len(ds), d.rank, d.world_size), **common)
             for name, ds in (("train", splits.train_eval), ("val", splits.val), ("test", splits.test))}
    return train, sampler, evals


def without_augmentation(transform):
    """--no-train_augment: training batches get the evaluation device transform too."""
    return None if transform is None else (lambda inputs, train: transform(inputs, False))


def fmt_metrics(m: dict, modalities) -> str:
    uni = " ".join(f"{k}={m[f'acc_{k}']:.3f}" for k in modalities if f"acc_{k}" in m)
    return f"acc {m['acc']:.4f} f1 {m['macro_f1']:.4f} mAP {m['map']:.4f}" + (f" [{uni}]" if uni else "")


def versions() -> dict:
    import numpy
    import sklearn
    import torchvision

    return {"dnr": __version__, "python": platform.python_version(), "torch": torch.__version__,
            "torchvision": torchvision.__version__, "numpy": numpy.__version__,
            "sklearn": sklearn.__version__, "cuda": torch.version.cuda, "machine": machine()}


def machine() -> dict:
    """Where the run's seconds were measured (and its floating point computed: results differ in the
    last bits between CPU instruction sets and thread counts): CPU model, the SIMD level PyTorch uses,
    intra-op threads, and the GPU if any."""
    cpu = platform.processor() or platform.machine()
    try:
        names = [line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                 if line.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:  # not Linux
        pass
    return {"cpu": cpu, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "threads": torch.get_num_threads(),
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}


def load_data(args, method: str, method_args=None):
    """The dataset's splits, seen through the modalities `method` (with `method_args`, by default
    `args`) trains on."""
    splits = build_datasets(args.dataset, args)
    seen = METHODS[method].select_modalities(method_args or args, splits.info)
    return splits if list(seen) == splits.info.modality_names else splits.restrict(seen)


def model_args_of(args) -> dict:
    """What rebuilds the model (stored in every checkpoint)."""
    return {"fusion": args.fusion, "encoders": parse_encoders(args.encoders),
            "encoder_options": encoder_options(args)}


def place_model(args, net, device, d):
    """`net` on `device` with the speed options; returns (net, the module the loop calls: net
    itself or its DDP / compiled wrapper)."""
    net = net.to(device)
    if args.channels_last:
        net = net.to(memory_format=torch.channels_last)
        for enc in net.encoders.values():
            if hasattr(enc, "memory_format"):
                enc.memory_format = torch.channels_last
    if args.sync_bn and d.enabled:
        if device.type != "cuda":
            raise ValueError("--sync_bn needs CUDA processes (PyTorch's SyncBatchNorm has no CPU kernel)")
        net = torch.nn.SyncBatchNorm.convert_sync_batchnorm(net)
    model = net
    if d.enabled:
        # DDP broadcasts rank 0's weights now, so the D&R snapshot taken after this is the same everywhere.
        model = torch.nn.parallel.DistributedDataParallel(
            net, device_ids=[device.index] if device.type == "cuda" else None)
    if args.compile:
        model = torch.compile(model)
    return net, model


def run_eval_only(args, out: Path, device) -> dict:
    path = ckpt_io.find_checkpoint(args.resume or "auto", out, "best.pth")
    saved = ckpt_io.load(path, map_location="cpu")
    saved_args = argparse.Namespace(**saved["args"])
    splits = load_data(args, saved_args.method, saved_args)
    if saved["info"] != splits.info.to_dict():
        raise ValueError(f"{path} was trained on {saved['info']}, not on the current data {splits.info.to_dict()}")
    model = METHODS[saved_args.method].build_model(splits.info, **saved["model_args"]).to(device)
    model.load_state_dict(saved["model"])
    _, _, evals = make_loaders(args, splits, device)
    result = {"checkpoint": str(path), "epoch": saved["epoch"]}
    for split in ("val", "test"):
        result[split] = evaluate(model, evals[split], device, splits.info.num_classes,
                                 device_transform=splits.device_transform)
        say(f"{split}: {fmt_metrics(result[split], splits.info.modality_names)}")
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "eval.json", result)
    return result


def main(args: argparse.Namespace) -> dict:
    out = output_folder(args)
    set_deterministic(args.deterministic)
    d = dist.init_distributed_mode(args.device)
    device = dist.process_device(pick_device(args.device))
    if args.eval_only:
        return run_eval_only(args, out, device)
    saved = checkpoint_to_resume(args, out, device)  # checked before anything is built
    if saved is not None and (out / "results.json").exists() and saved["epoch"] >= args.epochs - 1:
        if d.is_main:
            say(f"{out} holds a finished run (epoch {saved['epoch']} of {args.epochs}, results.json): nothing to "
                f"do. Re-evaluate it with --eval_only; train it longer with a larger --epochs and --resume")
        return json.loads((out / "results.json").read_text())
    with run_folder(out, enabled=d.is_main):  # locked for the whole run; a failed start leaves nothing
        if saved is None and ((out / "last.pth").exists() or (out / "results.json").exists()):
            raise FileExistsError(f"{out} already holds a run (last.pth or results.json); pass --resume to "
                                  f"continue it, or write this run elsewhere (--ckpt_path, or OUT= for the scripts)")
        return train(args, out, d, device, saved)


def train(args: argparse.Namespace, out: Path, d, device, saved) -> dict:
    """The run itself: data, model, method, then the epoch loop and the results."""
    main_proc = d.is_main
    progress = main_proc and (sys.stderr.isatty() if args.progress == "auto" else args.progress == "on")
    amp = AMP_DTYPES[args.amp]
    seed_everything(args.random_seed)

    splits = load_data(args, args.method)
    info = splits.info
    model_args = model_args_of(args)
    # --encoders may name every modality of the dataset; a method that trains on fewer (unimodal)
    # builds only those, so the choice is checked against the dataset and then narrowed.
    model_args["encoders"] = encoders_seen(model_args["encoders"], splits.train.info.modality_names,
                                           info.modality_names)
    net = METHODS[args.method].build_model(info, **model_args)
    # Carried over by a resume: training time over every process, and what --encoder_weights loaded.
    run_vars = {"seconds": 0.0, "encoder_weights_loaded": {}}
    if saved is None:  # a resumed run's weights come from its checkpoint
        # splits.train.info: the dataset's modalities, also when the method trains on fewer
        run_vars["encoder_weights_loaded"] = load_encoder_weights(net, parse_weights(args.encoder_weights),
                                                                  splits.train.info.modality_names)
    net, model = place_model(args, net, device, d)
    method = create_method(args.method, args, net, info)  # D&R snapshots theta_init here (after the weights)
    tracker = make_tracker(args, info)  # --track_purity_every: purity curves, recorded only
    optimizer, scheduler = build_optimizer(args, net)
    scaler = torch.amp.GradScaler(device.type) if args.amp == "fp16" else None
    selection = Selection(args.select_on)
    start_epoch = 0
    if saved is not None:
        ckpt_io.check_resumable(saved, args, info, model_args)
        start_epoch = ckpt_io.restore(saved, run_vars, model=net, optimizer=optimizer, scheduler=scheduler,
                                      scaler=scaler, method=method, selection=selection)
        if main_proc:
            say(f"resumed {args.resume if args.resume != 'auto' else out / 'last.pth'} after epoch {saved['epoch']}")

    if main_proc:
        for line in describe_weights(run_vars["encoder_weights_loaded"]):
            say(line)
        write_json(out / "args.json", {**vars(args), "ckpt_path": str(out), "data": info.to_dict(),
                                        "encoder_weights_loaded": run_vars["encoder_weights_loaded"],
                                        "world_size": d.world_size, "versions": versions(),
                                        "command": sys.argv})
    logger = RunLogger(out, args.tensorboard_path or str(out / "tensorboard"), resume_epoch=start_epoch,
                       enabled=main_proc)
    train_loader, train_sampler, evals = make_loaders(args, splits, device)
    eval_transform = splits.device_transform
    train_transform = eval_transform if args.train_augment else without_augmentation(eval_transform)
    update = Updater(model, optimizer, device, amp=amp, scaler=scaler, grad_clip=args.grad_clip)
    features = FeatureSource(model, evals, device, amp=amp, progress=progress, device_transform=eval_transform)
    ctx = TrainContext(model=net, device=device, info=info, args=args, extract_features=features,
                       is_main=main_proc, broadcast=dist.broadcast_object, out=out,
                       run_stage=lambda name, **flags: run_stage(args, out, name, **flags),
                       train_loader=train_loader, train_transform=train_transform,
                       extract_features_of=lambda m, split: extract_features(
                           m, evals[split], device, amp=amp, progress=progress, device_transform=eval_transform),
                       evaluate=lambda split: forward_pass(model, evals[split], device, features=True, amp=amp,
                                                           device_transform=eval_transform))
    if main_proc:
        say(describe_run(args, splits, net, device, d, out))
        say("columns: " + EPOCH_LEGEND.replace("(val)", f"({args.select_on})"))
    log_every = args.log_every if args.log_every >= 0 else (0 if progress else auto_log_every(len(train_loader)))
    method.before_training(ctx)

    for epoch in range(start_epoch, args.epochs):
        t0 = time.perf_counter()
        seed = epoch_seed(args.random_seed, epoch)
        seed_everything(seed + d.rank)  # augmentation differs per process, shuffling does not
        train_sampler.set_epoch(seed, method.epoch_indices(epoch, ctx))
        method.on_epoch_start(epoch, ctx)
        train_stats = train_one_epoch(model, method, train_loader, update, epoch, progress=progress,
                                      device_transform=train_transform, log_every=log_every if main_proc else 0,
                                      log=say)
        val_pass = forward_pass(model, evals["val"], device, features=True, amp=amp, device_transform=eval_transform)
        val = metrics_of(val_pass, info.num_classes)
        features.keep("val", val_pass)  # what a diagnosis after this epoch clusters
        test = evaluate(model, evals["test"], device, info.num_classes, amp=amp, device_transform=eval_transform)
        scheduler.step()

        # Model selection comes before any re-initialisation at this epoch's end: best.pth holds
        # the weights that produced these numbers.
        is_best = selection.update(epoch, val, test)
        model_only = dict(model=net.state_dict(), epoch=epoch, model_args=model_args, info=info.to_dict(),
                          args=vars(args), val=val, test=test,
                          encoder_weights_loaded=run_vars["encoder_weights_loaded"])
        if is_best and main_proc:
            ckpt_io.save_atomic(model_only, out / "best.pth")
        if args.keep_every and epoch % args.keep_every == 0 and main_proc:
            ckpt_io.save_atomic(model_only, out / ckpt_io.epoch_file(epoch))
        # Tracked before the method's end of epoch: the weights this epoch evaluated, not re-initialised ones.
        tracked = tracker and tracker.step(epoch, features.remembering, compute=main_proc, share=dist.broadcast_object)
        extra = method.on_epoch_end(epoch, ctx)
        features.clear()  # the weights may change from here on
        diagnosis = extra.pop("diagnosis", None)
        record = {"epoch": epoch, "train": train_stats, "val": val, "test": test, **extra}
        if diagnosis is not None:
            record["diagnosis"] = diagnosis.to_dict()
        if tracked:
            record["tracked_purity"] = tracked.to_dict()
        record["seconds"] = time.perf_counter() - t0
        run_vars["seconds"] += record["seconds"]
        logger.log_epoch(record)
        if main_proc and (args.save_last == "every_epoch" or (args.save_last == "end" and epoch == args.epochs - 1)):
            ckpt_io.save_atomic(ckpt_io.training_state(
                epoch, model=net, optimizer=optimizer, scheduler=scheduler, scaler=scaler, method=method,
                selection=selection, seconds=run_vars["seconds"], args=vars(args), model_args=model_args,
                encoder_weights_loaded=run_vars["encoder_weights_loaded"], info=info.to_dict()), out / "last.pth")
        if main_proc:
            say(epoch_line(record, args.epochs, info.modality_names, is_best))
            if diagnosis is not None:
                say(diagnosis.summary())
            if tracked:
                say(tracked.summary("tracked purity"))
        dist.barrier()  # a resumed run must find this epoch's checkpoint complete on every process
    logger.close()

    finish_start = time.perf_counter()
    results = finalize(args, out, model, net, splits, evals, device, selection, method, model_args, amp)
    results["seconds"] = run_vars["seconds"] + (time.perf_counter() - finish_start)
    results["encoder_weights_loaded"] = run_vars["encoder_weights_loaded"]
    if main_proc:
        write_json(out / "results.json", results)
        say(results_line(results, out))
    dist.barrier()
    return results


def output_folder(args) -> Path:
    return Path(args.ckpt_path or f"runs/{args.dataset}_{args.method}_seed{args.random_seed}")


def checkpoint_to_resume(args, out: Path, device):
    """The training checkpoint --resume names (read and checked now, before data and model are
    built), or None for a new run."""
    path = ckpt_io.find_checkpoint(args.resume, out, "last.pth")
    if path is None:
        return None
    if not path.is_file():
        if args.resume == "auto" and stages_done(out):
            return None  # cut in a first stage (run_stage): the stages resume themselves; no epoch of its own yet
        raise FileNotFoundError(f"--resume: no checkpoint at {path}")
    return ckpt_io.load_training(path, map_location=device)


def stages_done(out: Path) -> list:
    """The first stages (run_stage folders) of the run in `out` with an epoch kept (last.pth) or finished."""
    return sorted(p.name for p in out.glob("*/") if (p / "last.pth").exists() or (p / "results.json").exists())


def auto_log_every(steps: int) -> int:
    """About five progress lines per epoch when there are no progress bars, for epochs long enough
    (>= 50 steps) that a minute can pass without output; none for short ones."""
    return -(-steps // 5) if steps >= 50 else 0


def describe_run(args, splits, net, device, d, out) -> str:
    info = splits.info
    return (f"{args.method} on {info.name}: {len(splits.train)}/{len(splits.val)}/{len(splits.test)} "
            f"train/val/test samples, {info.num_classes} classes, modalities "
            + ", ".join(f"{s.name} {tuple(s.shape)} ({net.encoder_names[s.name]})" for s in info.modalities)
            + f"; {sum(p.numel() for p in net.parameters()) / 1e6:.1f}M parameters; "
            f"{getattr(net, 'fusion_name', args.fusion)} fusion; "
            f"device {device}" + (f" x {d.world_size} processes" if d.enabled else "") + f"; output {out}")


def epoch_line(record: dict, epochs: int, modalities, is_best: bool) -> str:
    train = record["train"]
    return (f"epoch {record['epoch']:3d}/{epochs} loss {train['loss']:.4f} train acc {train['acc']:.3f} | "
            f"val {fmt_metrics(record['val'], modalities)} | test acc {record['test']['acc']:.4f} | "
            f"{record['seconds']:.1f}s{' *' if is_best else ''}")


def results_line(results: dict, out: Path) -> str:
    return (f"selected epoch {results['best_epoch']} (on {results['select_on']}): "
            f"val acc {results['val']['acc']:.4f}, test acc {results['test']['acc']:.4f}, "
            f"macro-F1 {results['test']['macro_f1']:.4f}, mAP {results['test']['map']:.4f}; "
            f"per-modality test acc ({results['unimodal_source']}) "
            + ", ".join(f"{m} {a:.4f}" for m, a in results["unimodal_test_acc"].items())
            + f"; best test acc over epochs {results['best_test_acc']:.4f} (epoch {results['best_test_epoch']}, "
            f"test-selected, for comparison with the authors); results in {out / 'results.json'}")


def run_stage(args, out: Path, name: str, **flags) -> Path:
    """A method's earlier stage (e.g. uni-modal teachers): this trainer with `flags` changed, into
    <out>/<name>. A finished stage (results.json) is re-read, a cut one resumed."""
    folder = out / name
    if (folder / "results.json").exists():
        return folder
    stage = argparse.Namespace(**{**vars(args), **flags, "ckpt_path": str(folder), "tensorboard_path": None,
                                  "resume": "auto" if (folder / "last.pth").exists() else None})
    main(stage)
    return folder


def finalize(args, out, model, net, splits, evals, device, selection, method, model_args, amp=None) -> dict:
    info = splits.info
    best_val, best_test = selection.best_val, selection.best_test
    probe = {}
    # Everything below measures the selected epoch's weights, after training: nothing it does can
    # change the numbers recorded above.
    dist.barrier()  # best.pth is written by the first process
    net.load_state_dict(ckpt_io.load(out / "best.pth", map_location=device)["model"])
    shapley, subsets = modality_shapley(model, evals["test"], device, info.modality_names, amp=amp,
                                        device_transform=splits.device_transform)
    if args.probe:
        train_f, train_y = extract_features(model, evals["train"], device, amp=amp,
                                            device_transform=splits.device_transform)
        test_f, test_y = extract_features(model, evals["test"], device, amp=amp,
                                          device_transform=splits.device_transform)
        if dist.is_main_process():
            probe = {m: linear_probe_accuracy(train_f[m], train_y, test_f[m], test_y, seed=args.random_seed)
                     for m in info.modality_names}
    records, cost = [], {}
    if dist.is_main_process():
        records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
        cost = run_cost(net, evals["test"], device, records, splits.device_transform)
    head = {m: best_test[f"acc_{m}"] for m in info.modality_names if f"acc_{m}" in best_test}
    if len(head) == len(info.modality_names):
        unimodal, source = head, "head"
    else:
        unimodal, source = probe, "probe" if probe else "none"
    return {
        "method": args.method,
        "dataset": args.dataset,
        "seed": args.random_seed,
        "fusion": args.fusion,
        "modalities": info.modality_names,
        "num_classes": info.num_classes,
        "epochs": args.epochs,
        "select_on": args.select_on,
        "best_epoch": selection.best_epoch,
        "val": {k: best_val[k] for k in SPLIT_METRICS},
        "test": {k: best_test[k] for k in SPLIT_METRICS},
        "best_test_acc": selection.best_test_acc,
        "best_test_epoch": selection.best_test_epoch,
        "unimodal_test_acc": unimodal,
        "unimodal_source": source,
        "unimodal_val_acc": {m: best_val[f"acc_{m}"] for m in info.modality_names if f"acc_{m}" in best_val},
        "probe_test_acc": probe,
        "diagnoses": method.diagnoses(),
        "tracked_purity": [r["tracked_purity"] for r in records if "tracked_purity" in r],
        "shapley_test_acc": shapley,
        "subset_test_acc": subsets,
        "cost": cost,
        "model_args": model_args,
        "device": str(device),
        "world_size": dist.info().world_size,
        "amp": args.amp,
        "versions": versions(),
    }


class Stopped(Exception):
    """SIGTERM (what cluster schedulers send before killing a job), raised in the main thread."""

    def __init__(self, signum: int):
        super().__init__(f"signal {signum}")
        self.signum = signum


def _raise_stopped(signum, frame):
    raise Stopped(signum)


def stop_message(args, argv, signum: int) -> str:
    """What a stopped run tells its user: where it stands and the exact command that continues it."""
    out = output_folder(args)
    name = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
    last = out / "last.pth"
    here = Path(__file__).resolve()
    try:
        here = here.relative_to(Path.cwd())
    except ValueError:
        pass
    again = list(argv) + ([] if "--resume" in argv else ["--resume"])
    if not last.exists():
        stages = stages_done(out) if out.exists() else []
        if stages:  # the first stages' epochs are kept: the same command with --resume continues from them
            return (f"stopped by {name} during the first stages ({', '.join(stages)} kept); continue with:\n"
                    f"  {shlex.join(['python', str(here)] + again)}")
        return (f"stopped by {name} before the first epoch finished: nothing to resume"
                + ("" if out.exists() else f" ({out} was removed)"))
    epoch = torch.load(last, map_location="cpu", weights_only=True, mmap=True)["epoch"]
    return (f"stopped by {name} after epoch {epoch} (0-based) had finished; {last} holds that epoch; "
            f"continue with:\n"
            f"  {shlex.join(['python', str(here)] + again)}\n"
            f"(or the same script command with --resume appended)")


def cli(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = get_args_parser()
    args = parser.parse_args(argv)
    check_args(parser, args)
    previous = signal.signal(signal.SIGTERM, _raise_stopped)
    try:
        main(args)
    except (KeyboardInterrupt, Stopped) as err:
        signum = err.signum if isinstance(err, Stopped) else signal.SIGINT
        print(stop_message(args, argv, signum), file=sys.stderr, flush=True)
        return 128 + signum
    except (FileNotFoundError, FileExistsError, ValueError, KeyError, FloatingPointError) as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        return 1
    finally:
        signal.signal(signal.SIGTERM, previous)
        dist.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(cli())
