"""A user's own pretrained encoder weights (--encoder_weights), and the token encoder (kind
"tokens") that the text of Food-101 uses."""
import json
import pickle
import sys

import pytest
import torch
from torchvision.models import resnet18

from conftest import CODE, TINY
from dnr.data import DatasetInfo, ModalitySpec, check_sample
from dnr.models import create_encoder, create_model
from dnr.models.pretrained import load_encoder_weights, parse_weights

sys.path.insert(0, str(CODE))
import main as trainer  # noqa: E402

AV = DatasetInfo("tiny", ("a", "b"), (ModalitySpec("audio", "spectrogram", (1, 16, 16)),
                                      ModalitySpec("visual", "frames", (2, 3, 16, 16))))


@pytest.fixture(scope="module")
def torchvision_weights(tmp_path_factory):
    """A torchvision ResNet-18 state dict, as a user's ImageNet file would be (random values here)."""
    torch.manual_seed(1)
    path = tmp_path_factory.mktemp("weights") / "resnet18.pth"
    net = resnet18(weights=None)
    torch.save(net.state_dict(), path)
    return path, net.state_dict()


def test_a_torchvision_resnet_fills_the_visual_encoder(torchvision_weights):
    path, state = torchvision_weights
    model = create_model(AV)
    records = load_encoder_weights(model, parse_weights(f"visual={path}"), AV.modality_names)
    r = records["visual"]
    assert (r["part"], r["prefix"], r["ignored"], r["ignored_examples"]) == ("net", "", 2, ["fc.bias", "fc.weight"])
    assert r["loaded"] == len(model.encoders["visual"].net.state_dict()) and len(r["sha256"]) == 64
    for k, v in model.encoders["visual"].net.state_dict().items():
        assert torch.equal(v, state[k]), k
    # the audio encoder's first convolution takes one channel: the same file does not fit, and says why
    with pytest.raises(ValueError, match=r"audio=.*resnet18.pth: 1 weight\(s\) have another shape than the audio "
                                         r"encoder's \(resnet18, part 'net'\), e.g. conv1.weight: file "
                                         r"\(64, 3, 7, 7\), encoder \(64, 1, 7, 7\)"):
        load_encoder_weights(model, {"audio": path}, AV.modality_names)


def test_a_checkpoint_of_this_trainer_and_bad_files(tmp_path):
    torch.manual_seed(2)
    source = create_model(AV)
    ckpt = tmp_path / "best.pth"
    torch.save({"model": source.state_dict(), "epoch": 3}, ckpt)
    model = create_model(AV)
    records = load_encoder_weights(model, {"audio": ckpt, "visual": ckpt}, AV.modality_names)
    assert records["audio"]["prefix"] == "encoders.audio." and records["visual"]["prefix"] == "encoders.visual."
    assert records["visual"]["part"] == ""
    for m in ("audio", "visual"):
        for k, v in model.encoders[m].state_dict().items():
            assert torch.equal(v, source.encoders[m].state_dict()[k])
    junk = tmp_path / "junk.pth"
    torch.save({"backbone.layer9.weight": torch.zeros(3)}, junk)
    with pytest.raises(ValueError, match=r"junk.pth: its keys do not fit the visual encoder \(resnet18, 120 weights "
                                         r"such as \['net.conv1.weight', 'net.bn1.weight'\], or one of its parts "
                                         r"\['net'\]\).*has 0 of 120"):
        load_encoder_weights(model, {"visual": junk}, AV.modality_names)
    evil = tmp_path / "evil.pth"
    evil.write_bytes(pickle.dumps({"w": print}, protocol=2))
    with pytest.raises(ValueError, match=r"evil.pth: cannot be read with torch.load\(weights_only=True\)"):
        load_encoder_weights(model, {"visual": evil}, AV.modality_names)
    with pytest.raises(ValueError, match=r"unknown modality 'image'; the dataset has \['audio', 'visual'\]"):
        load_encoder_weights(model, {"image": ckpt}, AV.modality_names)
    with pytest.raises(ValueError, match="expected MODALITY=PATH pairs"):
        parse_weights("visual")


def test_the_trainer_loads_records_and_resumes_without_the_file(torchvision_weights, tmp_path, capsys):
    path, state = torchvision_weights
    out = tmp_path / "run"
    argv = TINY + ["--builtin_train_size", "20", "--builtin_val_size", "10", "--builtin_test_size", "10",
                   "--batch_size", "10", "--method", "baseline", "--epochs", "1", "--no-probe", "--ckpt_path", str(out),
                   "--encoder_weights", f"visual={path}"]
    assert trainer.cli(argv) == 0
    printed = capsys.readouterr().out
    assert f"visual encoder: 120 weights from {path} (sha256 " in printed and "into its part 'net'" in printed
    recorded = json.loads((out / "args.json").read_text())
    assert recorded["encoder_weights"] == f"visual={path}"
    assert recorded["encoder_weights_loaded"]["visual"]["loaded"] == 120
    saved = torch.load(out / "last.pth", weights_only=True)
    assert saved["encoder_weights_loaded"]["visual"]["sha256"] == recorded["encoder_weights_loaded"]["visual"]["sha256"]
    assert torch.load(out / "best.pth", weights_only=True)["encoder_weights_loaded"]["visual"]["part"] == "net"
    # a resumed run takes its weights from the checkpoint: the file may be gone, the record stays
    assert trainer.cli(argv[:argv.index("--encoder_weights")] + ["--epochs", "2", "--resume"]) == 0
    assert json.loads((out / "args.json").read_text())["encoder_weights_loaded"]["visual"]["loaded"] == 120
    assert json.loads((out / "results.json").read_text())["encoder_weights_loaded"]["visual"]["prefix"] == ""
    with pytest.raises(SystemExit):
        trainer.cli(TINY + ["--encoder_weights", f"visual={tmp_path / 'nope.pth'}"])
    assert "--encoder_weights: no such file: visual=" in capsys.readouterr().err


def test_token_encoder_embeds_ids_and_ignores_padding():
    spec = ModalitySpec("text", "tokens", (6,), vocab_size=20)
    assert spec.to_dict() == {"name": "text", "kind": "tokens", "shape": [6], "vocab_size": 20}
    with pytest.raises(ValueError, match="a vocab_size"):
        ModalitySpec("text", "tokens", (6,))
    with pytest.raises(ValueError, match=r"tokens are \(T,\) ids"):
        ModalitySpec("text", "tokens", (6, 2), vocab_size=20)
    torch.manual_seed(0)
    enc = create_encoder("transformer", spec, dim=16, layers=1, heads=2, dropout=0.0)
    ids = torch.tensor([[5, 7, 3, 0, 0, 0], [1, 2, 3, 4, 5, 6], [0, 0, 0, 0, 0, 0]])
    out = enc(ids)
    assert out.shape == (3, 16) and torch.isfinite(out).all()
    out.pow(2).mean().backward()
    assert [n for n, p in enc.named_parameters() if p.grad is None] == []
    assert enc.proj.weight.grad[0].abs().sum() == 0  # the padding id's embedding stays zero
    enc.eval()
    with torch.no_grad():
        assert torch.allclose(enc(ids)[0], enc(ids[:1, :3])[0], atol=1e-5)  # padding changes nothing
        assert torch.equal(enc(ids.float()), enc(ids))  # a float batch (AGM's zero input) is cast
    pooled = create_encoder("transformer", spec, dim=16, layers=1, heads=2, max_len=3)
    assert pooled.stride == 2 and pooled(ids).shape == (3, 16)
    info = DatasetInfo("t", ("a", "b"), (spec,))
    check_sample({"inputs": {"text": ids[0]}, "label": 1}, info, "here")
    with pytest.raises(ValueError, match=r"here: modality 'text' must hold int64 token ids in \[0, 20\)"):
        check_sample({"inputs": {"text": ids[0] + 20}, "label": 1}, info, "here")
