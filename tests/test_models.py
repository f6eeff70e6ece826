"""Every fusion head and encoder on tiny inputs: shapes, finite values, gradients everywhere."""
import pytest
import torch

from dnr.data import DatasetInfo, ModalitySpec
from dnr.models import FUSIONS, ENCODERS, create_encoder, create_model

AV = DatasetInfo("tiny", ("a", "b", "c"), (
    ModalitySpec("audio", "spectrogram", (1, 16, 16)),
    ModalitySpec("visual", "frames", (2, 3, 16, 16)),
))
AVS = DatasetInfo("tiny3", ("a", "b", "c", "d"), AV.modalities + (ModalitySpec("sensor", "vector", (8,)),))


def batch(info, b=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {s.name: torch.randn((b,) + tuple(s.shape), generator=g) for s in info.modalities}


@pytest.mark.parametrize("info", [AV, AVS], ids=["two-modalities", "three-modalities"])
@pytest.mark.parametrize("fusion", FUSIONS)
def test_forward_backward_every_fusion(info, fusion):
    torch.manual_seed(0)
    model = create_model(info, fusion=fusion)
    out = model(batch(info))
    assert out.logits.shape == (4, info.num_classes)
    assert set(out.features) == set(info.modality_names)
    for m, f in out.features.items():
        assert f.shape == (4, model.encoders[m].out_dim)
    assert torch.isfinite(out.logits).all()
    out.logits.logsumexp(1).mean().backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None]
    assert no_grad == []
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    if fusion in ("concat", "sum"):
        # The per-modality logits are exactly the parts the fused logits are made of.
        assert set(out.unimodal_logits) == set(info.modality_names)
        total = torch.stack(list(out.unimodal_logits.values())).sum(0)
        assert torch.allclose(total, out.logits, atol=1e-5)
    else:
        assert out.unimodal_logits is None


def test_resnet_encoders_give_512d_pooled_features_and_average_frames():
    torch.manual_seed(0)
    model = create_model(AV).eval()
    x = batch(AV, b=3)
    with torch.no_grad():
        f = model.encode(x)
        assert f["audio"].shape == (3, 512) and f["visual"].shape == (3, 512)
        # visual: frames folded into the batch, features averaged over frames
        per_frame = model.encoders["visual"].net(x["visual"][:, 1])
        swapped = dict(x, visual=x["visual"].flip(1))
        assert torch.allclose(model.encode(swapped)["visual"], f["visual"], atol=1e-5)
        one = dict(x, visual=x["visual"][:, 1:2].repeat(1, 2, 1, 1, 1))
        assert torch.allclose(model.encode(one)["visual"], per_frame, atol=1e-5)
    assert model.encoders["audio"].net.conv1.in_channels == 1
    assert model.encoders["visual"].net.conv1.in_channels == 3


def test_model_errors_name_the_problem():
    with pytest.raises(ValueError, match="unknown --fusion 'bogus'"):
        create_model(AV, fusion="bogus")
    with pytest.raises(ValueError, match="needs at least two modalities"):
        create_model(DatasetInfo("one", ("a", "b"), AV.modalities[:1]), fusion="film")
    with pytest.raises(ValueError, match="unknown modalities"):
        create_model(AV, encoders={"text": "mlp"})
    with pytest.raises(ValueError, match="unknown encoder 'vgg'"):
        create_model(AV, encoders={"audio": "vgg"})
    with pytest.raises(ValueError, match="encoder mlp takes a vector"):
        create_encoder("mlp", AV.modalities[0])
    with pytest.raises(KeyError, match="lacks modalities"):
        create_model(AV)({"audio": torch.randn(2, 1, 16, 16)})
    assert {"resnet18", "mlp"} <= set(ENCODERS)


def official_init_problems(model) -> list:
    """What differs from the official D&R backbone's initialisation (GeWu-Lab/Diagnosing_Relearning_ECCV2024
    at 025085e, code/models/backbone.py L104-119: convolutions kaiming-normal fan_out/relu, BatchNorm
    weights N(1, 0.02), biases 0): [] when the model's ResNet-18 encoders match it."""
    bn_weights, problems = [], []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            bn_weights.append(module.weight.detach().flatten())
            if module.bias.abs().max() != 0:
                problems.append(f"{name}: bias not 0")
        elif isinstance(module, torch.nn.Conv2d):
            fan_out = module.out_channels * module.kernel_size[0] * module.kernel_size[1]
            std = module.weight.std().item()
            if abs(std / (2 / fan_out) ** 0.5 - 1) > 0.1:
                problems.append(f"{name}: conv std {std:.4f}, kaiming fan_out wants {(2 / fan_out) ** 0.5:.4f}")
    w = torch.cat(bn_weights)  # ~4,800 channels per ResNet-18: the mean is known to +-0.0003, the std to +-0.0002
    if abs(w.mean().item() - 1) > 0.002 or abs(w.std().item() - 0.02) > 0.002:
        problems.append(f"BatchNorm weights mean {w.mean().item():.4f} std {w.std().item():.4f}, want 1 and 0.02")
    return problems


def test_official_resnet_init_matches_the_official_backbone():
    torch.manual_seed(0)
    official = create_model(AV, encoder_options={"resnet18": {"init": "official"}})
    assert official_init_problems(official) == []
    # torchvision's: the same convolutions, BatchNorm weights exactly 1, which the check must catch.
    torch.manual_seed(0)
    plain = create_model(AV)
    bn = [m for m in plain.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert len(bn) == 2 * 20 and all(torch.equal(m.weight, torch.ones_like(m.weight)) for m in bn)
    problems = official_init_problems(plain)
    assert len(problems) == 1 and problems[0].startswith("BatchNorm weights mean 1.0000 std 0.0000")
    with pytest.raises(ValueError, match="--init must be one of"):
        create_model(AV, encoder_options={"resnet18": {"init": "xavier"}})
