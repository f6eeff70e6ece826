"""Run by tests/test_distributed.py under torchrun (2 CPU processes, gloo): trains a tiny model for
one epoch with DistributedDataParallel, re-initialises with D&R, and checks that every process
holds the same parameters. Writes <out>/rank<r>.json."""
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "code"))
import main as trainer  # noqa: E402
from dnr import distributed as dist  # noqa: E402
from dnr.data import build_datasets  # noqa: E402
from dnr.engine import extract_features, train_one_epoch  # noqa: E402
from dnr.methods import TrainContext, create_method  # noqa: E402
from dnr.models import create_model  # noqa: E402
from dnr.stepping import Updater  # noqa: E402


def flat(module):
    return torch.cat([p.detach().flatten() for p in module.parameters()])


def main():
    out = Path(sys.argv[1])
    args = trainer.get_args_parser().parse_args([
        "--builtin_train_size", "32", "--builtin_val_size", "20", "--builtin_test_size", "20",
        "--builtin_image_size", "16", "--batch_size", "8", "--method", "relearn", "--reinit_epoch", "1",
        "--reinit_num", "1", "--move_lambda", "3", "--device", "cpu"])
    d = dist.init_distributed_mode("cpu")
    torch.manual_seed(d.rank)  # different initial weights per process: DDP must broadcast rank 0's
    splits = build_datasets("builtin", args)
    net = create_model(splits.info)
    model = torch.nn.parallel.DistributedDataParallel(net)
    method = create_method("relearn", args, net, splits.info)
    optimizer, _ = trainer.build_optimizer(args, net)
    train_loader, sampler, evals = trainer.make_loaders(args, splits, torch.device("cpu"))
    ctx = TrainContext(model=net, device="cpu", info=splits.info, args=args,
                       extract_features=lambda s: extract_features(model, evals[s], "cpu"),
                       is_main=d.is_main, broadcast=dist.broadcast_object)
    sampler.set_epoch(0)
    torch.manual_seed(100 + d.rank)  # augmentation differs per process
    train_one_epoch(model, method, train_loader, Updater(model, optimizer, "cpu"), 0, progress=False)
    before = flat(net)
    record = method.on_epoch_end(1, ctx)["diagnosis"]
    after = flat(net)
    gathered = [torch.zeros_like(after) for _ in range(d.world_size)]
    torch.distributed.all_gather(gathered, after)
    feats, labels = ctx.extract_features("val")
    (out / f"rank{d.rank}.json").write_text(json.dumps({
        "rank": d.rank, "world": d.world_size, "alpha": record.alpha,
        "moved": float((after - before).abs().max()),
        "identical": all(torch.equal(g, gathered[0]) for g in gathered),
        "val_labels": labels.tolist(), "val_features": int(feats["audio"].shape[0]),
        "snapshot_identical": bool(torch.equal(method.relearner.init_states["audio"]["net.conv1.weight"],
                                               method.relearner.init_states["audio"]["net.conv1.weight"])),
    }))
    dist.cleanup()


if __name__ == "__main__":
    main()
