"""MLA's training step and test-time fusion equal the authors' (SPEC section 4).

Re-derived here in our own words from Cecile-hi/Multimodal-Learning-with-Alternating-Unimodal-
Adaptation at ab6c184:
  main.py L419-476   (gs_flag training: one forward of both encoders; per modality in the order a,
                      v (, t): logits = fc_out(feature) with the head as the previous step left it,
                      CE, backward, gs_plugin.before_update, optimizer.step, optimizer.zero_grad,
                      exp_count += 1; after the batch every .grad is deleted)
  utils/utils.py L24-41 (before_update: acts only on a parameter named "module.weight", which the
                      head it is handed (its weight is "weight") never has, so as released it does
                      nothing; the body of that test: skipped while exp_count == 0; alpha = 0.1 **
                      (step / len + 1); r = batch mean of the feature; k = P r^T; P -= k k^T /
                      (alpha + k r) with k r an outer product, element-wise division; P /= ||P||_F;
                      grad W <- grad W P^T)
  main.py L65-87, L636-646 (test time: entropy of softmax over dim 0, i.e. over the batch, summed
                      over everything; weights exp(max H - H_m) normalised; fused = sum w_m logits_m)
  requirements.txt   (torch 1.8.1: zero_grad() zeroes gradients in place instead of deleting them)
The comparison must fail on each broken variant (a plausible mistake), so it is known to be able to.
"""
import copy

import pytest
import torch
import torch.nn.functional as F

from test_equivalence import INFO, LR, MOMENTUM, WD, B, build, differences, make_args, state
from test_equivalence import tiny_encoder  # noqa: F401  (the autouse fixture that registers the tiny encoder)
from dnr.data import DatasetInfo, ModalitySpec
from dnr.methods import create_method
from dnr.methods.mla import MLA, SharedHead, fuse
from dnr.stepping import Batch, Updater

STEP, STEPS = 1, 3  # the batch's 0-based index in the epoch, batches per epoch


def optimiser(model):
    return torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WD)


def primed(model, seed=3):
    """An SGD whose momentum buffers are already non-zero (a run in progress), gradients deleted."""
    opt = optimiser(model)
    gen = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=gen) * 0.1
    opt.step()
    opt.zero_grad(set_to_none=True)
    return opt


def start_projector(width, seed=5):
    """A projector from earlier steps of the run: symmetric, Frobenius norm 1, not the identity."""
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(width, width, generator=gen)
    p = torch.eye(width) + 0.3 * (a + a.t())
    return p / torch.linalg.matrix_norm(p)


def authors_step(model, opt, x, y, P, count, projection="released", variant=None):
    """Their gs_flag batch on a copy of the model and optimiser; returns (state, P, count).
    `projection`: "released" = their code as it runs (before_update's name test, "module.weight",
    never matches the head's "weight": nothing happens), "written" = the rule in the body of that test
    (live in 4735bbc, which also accepted "weight"), "owm" = the same with the scalar denominator
    alpha + r P r^T of the orthogonal-weight-modification recursion (the paper's equation)."""
    ref = copy.deepcopy(model)
    ref_opt = optimiser(ref)
    ref_opt.load_state_dict(copy.deepcopy(opt.state_dict()))  # its buffers, not shared ones
    ref.train()
    fc = ref.fusion.fc
    feats = {m: ref.encoders[m](x[m]) for m in INFO.modality_names}  # one forward of every encoder
    if variant == "stale_head":  # every modality's logits from the head before any step
        early = {m: F.linear(feats[m], fc.weight.clone(), fc.bias.clone()) for m in feats}
    if variant == "joint_loss":  # one step on the summed uni-modal losses
        sum(F.cross_entropy(fc(feats[m]), y) for m in feats).backward()
        ref_opt.step()
        return state(ref), P, count + 1
    for m in INFO.modality_names:
        logits = early[m] if variant == "stale_head" else fc(feats[m])
        F.cross_entropy(logits, y).backward(retain_graph=variant == "stale_head")
        if projection != "released" and (count != 0 or variant == "project_first_step"):
            exponent = STEP / STEPS + (0 if variant == "alpha_without_one" else 1)
            alpha = 1.0 * 0.1 ** exponent
            r = feats[m].detach().mean(0, keepdim=True)  # (1, D)
            old = P
            k = P @ r.t()  # (D, 1)
            denom = alpha + (r @ k if projection == "owm" else k @ r)  # (1, 1), or (D, D) element-wise
            P = P - k @ k.t() / denom
            if variant != "no_normalisation":
                P = P / torch.linalg.matrix_norm(P)
            use = old if variant == "project_with_old_P" else P
            fc.weight.grad = fc.weight.grad @ use.t()
            if variant == "project_bias_too":
                fc.bias.grad = fc.bias.grad * use.diagonal().mean()
        ref_opt.step()
        if variant == "delete_grads":  # PyTorch >= 2.0's zero_grad
            ref_opt.zero_grad(set_to_none=True)
        else:  # torch 1.8.1: every existing gradient set to zero in place
            for p in ref.parameters():
                if p.grad is not None:
                    p.grad.zero_()
        count += 1
    return state(ref), P, count


def project_step(model, opt, x, y, P, count, **flags):
    method = create_method("mla", make_args(**flags), model, INFO)
    method.projector, method.sub_steps, method.steps_per_epoch = P.clone(), count, STEPS
    model.train()
    method.train_step(model, Batch(x, y, torch.arange(B), 0, STEP), Updater(model, opt, "cpu"))
    return state(model), method


def mla_compare(projection="released", variant=None, count=7, **flags):
    model, x, y = build("mla", seed=2)
    opt = primed(model)
    P = start_projector(model.fusion.width)
    before = state(model)
    want, want_P, want_count = authors_step(model, opt, x, y, P, count, projection, variant)
    got, method = project_step(model, opt, x, y, P, count, **flags)
    problems = differences(before, got, want)
    if not torch.allclose(method.projector, want_P, atol=1e-6, rtol=1e-5):
        problems.append(f"projector {float((method.projector - want_P).abs().max()):.2e} apart")
    if method.sub_steps != want_count:
        problems.append(f"sub-steps {method.sub_steps} != {want_count}")
    return problems


FLAG = {"released": {}, "written": {"mla_projection": "written"}, "owm": {"mla_projection": "owm"}}


@pytest.mark.parametrize("projection", sorted(FLAG))
def test_mla_step_equals_the_authors_update(projection):
    assert mla_compare(projection, **FLAG[projection]) == []
    for other in set(FLAG) - {projection}:  # and no other reading of their code
        assert mla_compare(other, **FLAG[projection]) != [], other


def test_mla_first_step_of_the_run_is_not_projected():
    assert mla_compare("written", count=0, **FLAG["written"]) == []
    assert mla_compare("written", "project_first_step", count=0, **FLAG["written"]) != []


def test_mla_zero_grad_flag_equals_deleting_gradients():
    assert mla_compare(variant="delete_grads", mla_zero_grad="none") == []
    assert mla_compare(variant="delete_grads") != []


@pytest.mark.parametrize("variant", ["delete_grads", "stale_head", "joint_loss"])
def test_mla_comparison_fails_on_a_broken_alternation(variant):
    assert mla_compare(variant=variant) != []


@pytest.mark.parametrize("variant", ["alpha_without_one", "no_normalisation", "project_with_old_P",
                                     "project_bias_too", "stale_head"])
def test_mla_comparison_fails_on_a_broken_projection(variant):
    assert mla_compare("written", variant, **FLAG["written"]) != []


def test_mla_each_sub_step_moves_its_own_encoder():
    """With gradients deleted after each step (--mla_zero_grad none), the audio step leaves the visual
    encoder alone; with torch 1.8.1's zeroing (the default) the visual step moves the audio encoder
    again (momentum and weight decay only), the visual step itself never touches audio's gradient."""
    for zero_grad, audio_moves_twice in (("none", False), ("zeros", True)):
        model, x, y = build("mla", seed=2)
        opt = primed(model)
        method = create_method("mla", make_args(mla_zero_grad=zero_grad), model, INFO)
        seen = []
        real_step = opt.step

        def step(*a, **k):
            seen.append({m: torch.cat([p.detach().flatten().clone() for p in model.encoders[m].parameters()])
                         for m in INFO.modality_names})
            return real_step(*a, **k)

        opt.step = step
        before = {m: torch.cat([p.detach().flatten().clone() for p in model.encoders[m].parameters()])
                  for m in INFO.modality_names}
        model.train()
        method.train_step(model, Batch(x, y, torch.arange(B), 0, 0), Updater(model, opt, "cpu"))
        assert len(seen) == 2  # one optimiser step per modality
        assert torch.equal(seen[0]["visual"], before["visual"])  # before the audio step
        assert torch.equal(seen[1]["visual"], before["visual"])  # the audio step left visual alone
        after_audio = seen[1]["audio"]
        final_audio = torch.cat([p.detach().flatten() for p in model.encoders["audio"].parameters()])
        assert (not torch.equal(final_audio, after_audio)) == audio_moves_twice
        assert all(p.grad is None for p in model.parameters())  # deleted after the batch
        assert method.sub_steps == 2


# ---------------------------------------------------------------------------- test-time fusion
def authors_fusion(logits, variant=None):
    """Their calculate_entropy / calculate_gating_weights on one batch of (B, C) logits per modality."""
    dim = 1 if variant == "softmax_over_classes" else 0
    entropies = []
    for out in logits:
        p = torch.softmax(out, dim=dim)
        entropies.append(-(p * torch.log(p)).sum())
    top = max(entropies)
    sign = -1 if variant == "inverted" else 1
    gates = [torch.exp(sign * (top - h)) for h in entropies]
    weights = [g / sum(gates) for g in gates]
    if variant == "probabilities":
        return sum(w * torch.softmax(o, 1) for w, o in zip(weights, logits)), weights
    return sum(w * o for w, o in zip(weights, logits)), weights


def paper_fusion(logits):
    """The paper's per-sample entropies: each sample's own weights."""
    ent = torch.stack([-(torch.softmax(o, 1) * torch.log_softmax(o, 1)).sum(1) for o in logits])  # (M, B)
    gates = torch.exp(ent.max(0).values - ent)
    w = gates / gates.sum(0)
    return sum(w[i][:, None] * o for i, o in enumerate(logits))


def fusion_case(seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(6, 4, generator=gen) * s for s in (1.0, 3.0)]


def test_mla_fusion_weights_equal_the_authors():
    logits = fusion_case()
    want, weights = authors_fusion(logits)
    assert torch.allclose(fuse(logits, "dynamic/batch"), want, atol=1e-6)
    assert abs(sum(float(w) for w in weights) - 1) < 1e-6 and float(weights[0]) != pytest.approx(0.5)
    assert torch.allclose(fuse(logits, "dynamic/sample"), paper_fusion(logits), atol=1e-6)
    assert torch.allclose(fuse(logits, "fixed", [0.55, 0.45]), 0.55 * logits[0] + 0.45 * logits[1])
    # groups: each run of `group` samples gets its own weights, as the authors' batches of 64 do
    grouped = fuse(logits, "dynamic/batch", group=4)
    parts = [authors_fusion([o[:4] for o in logits])[0], authors_fusion([o[4:] for o in logits])[0]]
    assert torch.allclose(grouped, torch.cat(parts), atol=1e-6)


@pytest.mark.parametrize("variant", ["softmax_over_classes", "inverted", "probabilities"])
def test_mla_fusion_comparison_fails_on_a_broken_rule(variant):
    logits = fusion_case()
    assert not torch.allclose(fuse(logits, "dynamic/batch"), authors_fusion(logits, variant)[0], atol=1e-4)


def test_mla_model_evaluates_with_the_fusion_and_keeps_its_settings():
    """What the trainer evaluates (the model's own forward in eval mode) is the fusion of the shared
    head's logits; the settings travel with the weights (best.pth, --eval_only)."""
    model, x, y = build("mla", seed=2)
    create_method("mla", make_args(mla_entropy_group=0), model, INFO)
    model.eval()
    with torch.no_grad():
        out = model(x)
        feats = model.encode(x)
        uni = [model.fusion.fc(feats[m]) for m in INFO.modality_names]
    assert torch.allclose(out.logits, authors_fusion(uni)[0], atol=1e-6)
    for m, u in zip(INFO.modality_names, uni):
        assert torch.allclose(out.unimodal_logits[m], u)
    create_method("mla", make_args(mla_fusion="fixed", mla_fixed_weights="0.3,0.7"), model, INFO)
    fresh = MLA.build_model(INFO, encoders={m: "tiny_conv" for m in INFO.modality_names})
    fresh.load_state_dict(model.state_dict())
    fresh.eval()
    assert fresh.fusion.mode == "fixed"
    with torch.no_grad():
        assert torch.allclose(fresh(x).logits, 0.3 * uni[0] + 0.7 * uni[1], atol=1e-6)


def test_mla_resume_restores_the_projector_and_the_count():
    model, x, y = build("mla", seed=2)
    method = create_method("mla", make_args(mla_projection="owm"), model, INFO)  # a projector that moves
    opt = optimiser(model)
    for step in range(2):
        method.train_step(model.train(), Batch(x, y, torch.arange(B), 0, step), Updater(model, opt, "cpu"))
    saved = copy.deepcopy(method.state_dict())
    other = create_method("mla", make_args(mla_projection="owm"), build("mla", seed=2)[0], INFO)
    other.load_state_dict(saved)
    assert other.sub_steps == 4 and torch.equal(other.projector, method.projector)
    assert not torch.allclose(other.projector, torch.eye(other.projector.shape[0]))  # it has moved


def test_mla_unequal_widths_are_zero_padded():
    head = SharedHead({"a": 3, "b": 5}, 2)
    z = torch.randn(4, 3)
    assert torch.allclose(head.logits(z), z @ head.fc.weight[:, :3].t() + head.fc.bias)
    assert head.width == 5


@pytest.mark.parametrize("flags,needle", [
    ({"fusion": "sum"}, "--fusion"),
    ({"mla_entropy_group": -1}, "--mla_entropy_group"),
    ({"mla_fixed_weights": "a,b"}, "--mla_fixed_weights"),
    ({"batch_size": 16, "eval_batch_size": 24}, "--eval_batch_size"),
    ({"batch_size": 16, "mla_entropy_group": 5}, "--mla_entropy_group"),
])
def test_mla_refuses_bad_flags(flags, needle):
    with pytest.raises(ValueError, match=needle):
        MLA.check_args(make_args(**flags))


def test_mla_accepts_evaluation_batches_made_of_whole_groups():
    MLA.check_args(make_args(batch_size=16, eval_batch_size=0))  # 32: two groups of the batch size
    MLA.check_args(make_args(batch_size=16, eval_batch_size=24, mla_entropy="sample"))  # no groups
    MLA.check_args(make_args(batch_size=16, eval_batch_size=24, mla_fusion="fixed"))


def test_mla_fixed_weights_must_match_the_modalities():
    model, _, _ = build("mla")
    with pytest.raises(ValueError, match="--mla_fixed_weights"):
        create_method("mla", make_args(mla_fusion="fixed", mla_fixed_weights="0.2,0.3,0.5"), model, INFO)
    four = DatasetInfo("four", ("a", "b"), tuple(ModalitySpec(n, "spectrogram", (1, 6, 6)) for n in "pqrs"))
    with pytest.raises(ValueError, match="--mla_fixed_weights"):
        MLA.fixed_weights(make_args(mla_fusion="fixed"), len(four.modalities))


def test_mla_resumed_run_equals_an_uninterrupted_one(tmp_path, monkeypatch):
    """One epoch, then --resume to two, ends with the weights of two epochs in one go: the projector
    and the sub-step count survive the checkpoint (a resume that forgot them would differ)."""
    import shutil
    import sys

    from conftest import CODE, TINY
    sys.path.insert(0, str(CODE))
    import main as trainer

    common = TINY + ["--method", "mla", "--mla_projection", "owm", "--reinit_epoch", "0", "--no-probe",
                     "--deterministic", "--device", "cpu"]

    def weights(out):
        return torch.load(out / "last.pth", weights_only=True)["model"]

    assert trainer.cli(common + ["--epochs", "2", "--ckpt_path", str(tmp_path / "full")]) == 0
    assert trainer.cli(common + ["--epochs", "1", "--ckpt_path", str(tmp_path / "cut")]) == 0
    shutil.copytree(tmp_path / "cut", tmp_path / "forgetful")
    for name, forget in (("cut", False), ("forgetful", True)):
        if forget:
            monkeypatch.setattr(MLA, "load_state_dict", lambda self, state: None)
        assert trainer.cli(common + ["--epochs", "2", "--ckpt_path", str(tmp_path / name), "--resume"]) == 0
        full, got = weights(tmp_path / "full"), weights(tmp_path / name)
        same = all(torch.equal(full[k], got[k]) for k in full)
        assert same != forget, name
