"""A user's own pretrained weights for an encoder (`--encoder_weights MODALITY=PATH,...`).

We cannot ship or fetch pretrained weights (ImageNet ResNet-18, BERT, ViT), but a user who has a
checkpoint may start an encoder from it. The file is read with torch.load(weights_only=True), so it
can hold tensors and plain containers only, never code. What it may be:
  - the encoder's own state dict (keys as `model.encoders[m].state_dict()`: 'net.conv1.weight', ...);
  - a state dict of one of the encoder's parts, e.g. a torchvision ResNet-18's ('conv1.weight', ...,
    'fc.weight') for the `net` inside our ResNet-18 encoder (its classifier keys are ignored);
  - either under a prefix ('module.', 'encoders.visual.', 'backbone.'), or wrapped in a dict under
    'model' or 'state_dict' (a checkpoint of this trainer: best.pth, last.pth).
Every weight of the encoder (or of the part) must be in the file with the same shape; keys the
encoder has no use for are ignored and counted. The weights are loaded before D&R snapshots its
starting point, so re-learning moves an encoder back towards the pretrained weights, not towards a
random initialisation.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Dict, List, Mapping, Sequence, Tuple

import torch
from torch import nn

WRAPPERS = ("model", "state_dict")
OPTIONAL = ("num_batches_tracked",)  # BatchNorm's step counters: not weights, absent from some files


def parse_weights(text: str, flag: str = "--encoder_weights") -> Dict[str, Path]:
    """'image=/a.pth,text=/b.pth' -> {modality: path}."""
    out: Dict[str, Path] = {}
    for part in filter(None, (t.strip() for t in (text or "").split(","))):
        if "=" not in part:
            raise ValueError(f"{flag}: expected MODALITY=PATH pairs, got {part!r}")
        m, path = (s.strip() for s in part.split("=", 1))
        if m in out:
            raise ValueError(f"{flag}: modality {m!r} given twice")
        out[m] = Path(path)
    return out


def _digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_state(path: Path) -> Dict[str, torch.Tensor]:
    """The flat {key: tensor} in a weights file (unwrapping 'model' / 'state_dict')."""
    if not path.is_file():
        raise FileNotFoundError(f"--encoder_weights: no file {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a pickle with code in it, a truncated or foreign file
        raise ValueError(f"--encoder_weights {path}: cannot be read with torch.load(weights_only=True) "
                         f"({type(err).__name__}: {err}); it must hold tensors in a dict") from None
    for key in WRAPPERS:
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not obj:
        raise ValueError(f"--encoder_weights {path}: holds a {type(obj).__name__}, expected a state dict "
                         f"({{name: tensor}}, possibly under {' or '.join(map(repr, WRAPPERS))})")
    state = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    if not state:
        raise ValueError(f"--encoder_weights {path}: no tensors in it (keys {list(obj)[:5]})")
    return state


def _needed(target: nn.Module) -> List[str]:
    return list(target.state_dict())


def _prefixes(state: Mapping[str, torch.Tensor], keys: Sequence[str]) -> List[str]:
    """Every prefix P such that P + k is in the file for every required key k."""
    required = [k for k in keys if not k.endswith(OPTIONAL)] or list(keys)
    first = required[0]
    found = []
    for name in state:
        if name.endswith(first):
            p = name[: len(name) - len(first)]
            if (p == "" or p.endswith(".")) and all(p + k in state for k in required):
                found.append(p)
    return sorted(set(found))


def _best_partial(state: Mapping[str, torch.Tensor], keys: Sequence[str]) -> Tuple[str, int, List[str]]:
    """For the error message: the prefix under which most of the keys are found."""
    best = ("", 0, list(keys))
    for name in state:
        for k in keys:
            if name.endswith(k):
                p = name[: len(name) - len(k)]
                hits = sum(1 for q in keys if p + q in state)
                if hits > best[1]:
                    best = (p, hits, [q for q in keys if p + q not in state])
    return best


def load_into(encoder: nn.Module, path: Path, modality: str, encoder_name: str) -> dict:
    """Load `path` into `encoder` (or one of its direct parts) -> what was loaded, for the records."""
    path = Path(path)
    state = read_state(path)
    targets = [("", encoder)] + [(name, child) for name, child in encoder.named_children()
                                 if _needed(child)]
    matches = [(part, module, p) for part, module in targets for p in _prefixes(state, _needed(module))]
    # The whole encoder before a part of it; then, as a checkpoint of this trainer holds every
    # modality's encoder, the one of this modality; then the keys without a prefix.
    matches = [mt for mt in matches if mt[0] == ""] or matches
    for prefer in (lambda mt: f"encoders.{modality}." in mt[2], lambda mt: mt[2] == ""):
        if len(matches) > 1 and sum(map(prefer, matches)) == 1:
            matches = [mt for mt in matches if prefer(mt)]
    if not matches:
        keys = _needed(encoder)
        prefix, hits, missing = _best_partial(state, keys)
        raise ValueError(
            f"--encoder_weights {modality}={path}: its keys do not fit the {modality} encoder ({encoder_name}, "
            f"{len(keys)} weights such as {keys[:2]}, or one of its parts {[n for n, _ in targets[1:]]}): the "
            f"closest match, under prefix {prefix!r}, has {hits} of {len(keys)} and lacks e.g. {missing[:3]}; "
            f"the file's keys are e.g. {list(state)[:4]}")
    if len(matches) > 1:
        raise ValueError(f"--encoder_weights {modality}={path}: several sets of keys fit the {modality} encoder, "
                         f"under the prefixes {[p for _, _, p in matches]}; keep one in the file")
    part, module, prefix = matches[0]
    needed = _needed(module)
    wrong = [f"{prefix}{k}: file {tuple(state[prefix + k].shape)}, encoder {tuple(v.shape)}"
             for k, v in module.state_dict().items() if prefix + k in state and state[prefix + k].shape != v.shape]
    if wrong:
        raise ValueError(f"--encoder_weights {modality}={path}: {len(wrong)} weight(s) have another shape than the "
                         f"{modality} encoder's ({encoder_name}"
                         f"{', part ' + repr(part) if part else ''}), e.g. {'; '.join(wrong[:3])}")
    sub = {k: state[prefix + k] for k in needed if prefix + k in state}
    module.load_state_dict(sub, strict=False)
    used = {prefix + k for k in sub}
    ignored = sorted(k for k in state if k not in used)
    return {"path": str(path), "sha256": _digest(path), "part": part, "prefix": prefix, "loaded": len(sub),
            "ignored": len(ignored), "ignored_examples": ignored[:5]}


def load_encoder_weights(model: nn.Module, weights: Mapping[str, Path],
                         dataset_modalities: Sequence[str]) -> Dict[str, dict]:
    """Load each modality's weights into `model.encoders` -> {modality: record}. A modality the
    dataset lacks is an error; one the dataset has but this model does not train (a uni-modal run)
    is skipped, so one flag serves every run of a comparison."""
    records = {}
    for modality, path in weights.items():
        if modality not in dataset_modalities:
            raise ValueError(f"--encoder_weights: unknown modality {modality!r}; the dataset has "
                             f"{list(dataset_modalities)}")
        if modality not in model.encoders:
            continue
        records[modality] = load_into(model.encoders[modality], path, modality,
                                      getattr(model, "encoder_names", {}).get(modality, "encoder"))
    return records


def describe_weights(records: Mapping[str, dict]) -> List[str]:
    """One line per modality whose encoder started from a file."""
    lines = []
    for m, r in records.items():
        where = (f" into its part '{r['part']}'" if r["part"] else "") + (f", keys under '{r['prefix']}'"
                                                                        if r["prefix"] else "")
        skipped = f"; {r['ignored']} keys of the file unused, e.g. {r['ignored_examples'][:2]}" if r["ignored"] else ""
        lines.append(f"{m} encoder: {r['loaded']} weights from {r['path']} (sha256 {r['sha256'][:12]}){where}{skipped}")
    return lines
