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
