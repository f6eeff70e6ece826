"""LFM's training step and its per-epoch weights equal the authors' (SPEC section 4), and the
comparisons fail on broken variants. Helpers come from test_equivalence.py; the model uses
--fusion sum, their architecture (one Linear head per modality)."""
import copy
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from dnr.methods import METHODS, create_method
from test_equivalence import (B, INFO, TOL, differences, make_args, project_step, reference_step, state,
                              tiny_encoder)  # noqa: F401  (tiny_encoder: the autouse fixture)

# njustkmg/NeurIPS24-LFM at ad44fa0, Crema_epoch.py L49-50: their two fitted polynomials in the epoch.
THEIR_CLS = [2.04623704e-01, 3.35472727e-03, 1.22989557e-04, -2.92947416e-06, 2.23835486e-08, -5.39717505e-11]
THEIR_ALIGN = [7.95376296e-01, -3.35472727e-03, -1.22989557e-04, 2.92947416e-06, -2.23835486e-08, 5.39717505e-11]


def their_fitted(epoch):
    return [sum(c * epoch ** i for i, c in enumerate(THEIR_CLS)),
            sum(c * epoch ** i for i, c in enumerate(THEIR_ALIGN))]


def build_sum(seed=0):
    torch.manual_seed(seed)
    model = METHODS["lfm"].build_model(INFO, fusion="sum", encoders={m: "tiny_conv" for m in INFO.modality_names})
    with torch.no_grad():
        for _ in range(3):
            model({m: torch.randn(B, 1, 6, 6) * 2 + 0.5 for m in INFO.modality_names})
        model.fusion.inner.heads["audio"].weight.mul_(3)  # the audio head louder: the two predictions differ
    x = {m: torch.randn(B, 1, 6, 6) for m in INFO.modality_names}
    y = torch.arange(B) % INFO.num_classes
    return model, x, y


def their_outputs(model, x):
    """(o_a, o_v) of their AVClassifier.forward (model/AudioVideo.py L58-67): encoder, then the modality's head."""
    heads = model.fusion.inner.heads
    return (heads["audio"](model.encoders["audio"](x["audio"])),
            heads["visual"](model.encoders["visual"](x["visual"])))


def their_alignment(p, q, variant=None):
    """Crema_epoch.py L38-45: softmax both, m their mean, F.kl_div(p.log(), m) + F.kl_div(q.log(), m), halved."""
    p, q = F.softmax(p, dim=-1), F.softmax(q, dim=-1)
    m = 0.5 * p + 0.5 * q
    if variant == "true_js":  # KL(p || m) + KL(q || m), the textbook Jensen-Shannon divergence
        return 0.5 * (F.kl_div(m.log(), p, reduction="batchmean") + F.kl_div(m.log(), q, reduction="batchmean"))
    return 0.5 * (F.kl_div(p.log(), m, reduction="batchmean") + F.kl_div(q.log(), m, reduction="batchmean"))


# Crema_epoch.py L56-77 (train_audio_video): CE of 0.5 o_v + 0.5 o_a, the alignment of o_a and o_v,
# loss = 2 (cls_k[0] CE + cls_k[1] alignment); cls_k from getAlpha_Learnable_Fitted(epoch) (L195).
def lfm_reference(model, x, y, cls_k, variant=None):
    ref = copy.deepcopy(model).train()
    o_a, o_v = their_outputs(ref, x)
    fused = o_a + o_v if variant == "sum_logits" else 0.5 * o_v + 0.5 * o_a
    loss_cls = F.cross_entropy(fused, y)
    align = their_alignment(o_a, o_v, variant)
    k = cls_k[::-1] if variant == "swapped_weights" else cls_k
    loss = (1 if variant == "no_factor_two" else 2) * (k[0] * loss_cls + k[1] * align)
    params = list(ref.parameters())
    return ref, dict(zip(params, torch.autograd.grad(loss, params)))


def lfm_compare(epoch, variant=None):
    model, x, y = build_sum()
    method = create_method("lfm", make_args(), model, INFO)
    before = state(model)
    ref, grads = lfm_reference(model, x, y, their_fitted(epoch), variant)
    want = reference_step(ref, grads)
    got = project_step(method, model, x, y, epoch=epoch)
    return differences(before, got, want)


@pytest.mark.parametrize("epoch", [0, 37, 150])
def test_lfm_step_equals_the_authors_update(epoch):
    assert lfm_compare(epoch) == []


@pytest.mark.parametrize("variant", ["sum_logits", "true_js", "swapped_weights", "no_factor_two"])
def test_lfm_comparison_fails_on_a_broken_update(variant):
    assert lfm_compare(37, variant) != []


def test_lfm_fitted_weights_follow_their_polynomials_and_stretch():
    method = create_method("lfm", make_args(), build_sum()[0], INFO)
    for e in (0, 1, 10, 80, 199):
        a_cls, a_match = method.weights(e)
        want = their_fitted(e)
        assert a_cls == pytest.approx(want[0], rel=1e-9) and a_match == pytest.approx(want[1], rel=1e-9, abs=1e-12)
    assert method.weights(0)[0] == pytest.approx(0.2046237, rel=1e-6)
    stretched = create_method("lfm", make_args(lfm_fit_epochs=50), build_sum()[0], INFO)
    assert stretched.weights(10)[0] == pytest.approx(their_fitted(40)[0])
    with pytest.raises(ValueError, match="--lfm_fit_epochs"):
        METHODS["lfm"].check_args(make_args(epochs=300))
    METHODS["lfm"].check_args(make_args(epochs=300, lfm_fit_epochs=300))


def test_lfm_evaluation_uses_the_mean_of_the_modality_logits():
    model, x, y = build_sum()
    model.eval()
    out = model(x)
    o_a, o_v = their_outputs(model, x)
    assert torch.allclose(out.logits, 0.5 * o_a + 0.5 * o_v, atol=1e-6)
    with pytest.raises(ValueError, match="--fusion concat or sum"):
        METHODS["lfm"].build_model(INFO, fusion="gated")


# ---------------------------------------------------------------- the learnt weights
# Crema_epoch_learnable.py L55-97 (getAlpha_Learnable): the first half of the held-out batch through the
# model (in whatever mode it is: training at epoch 0, evaluation after their val()), L_total = cls_k[0]
# CE + cls_k[1] alignment, theta_grads = dL_total/dtheta (create_graph), cls_grads = dCE/dtheta, the
# Hessian-vector product grad(theta_grads, theta, grad_outputs=cls_grads), alpha_grad = the mean of its
# first tensor; lr_alpha halved when epoch % 20 == 0 and epoch != 0; cls_k[1] -= lr_alpha alpha_grad,
# clipped to [0.05, 0.95]; cls_k[0] = 1 - cls_k[1]. L246-250: lr_alpha 1e-4, cls_k = [0.05, 0.95].
def their_alpha_update(model, half_batch, epoch, cls_k, lr_alpha, variant=None):
    ref = copy.deepcopy(model)
    ref.train(epoch == 0 if variant != "always_eval" else False)
    x, y = half_batch
    o_a, o_v = their_outputs(ref, x)
    loss_cls = F.cross_entropy(0.5 * o_v + 0.5 * o_a, y)
    total = cls_k[0] * loss_cls + cls_k[1] * their_alignment(o_a, o_v)
    params = list(ref.parameters())
    theta = torch.autograd.grad(total, params, create_graph=True)
    cls_grads = torch.autograd.grad(loss_cls, params, retain_graph=True, create_graph=True)
    hvp = torch.autograd.grad(theta, params, grad_outputs=cls_grads, retain_graph=True)
    first = hvp[0] if variant != "all_tensors" else torch.cat([h.flatten() for h in hvp])
    alpha_grad = float(first.mean())
    if epoch % 20 == 0 and epoch != 0 and variant != "no_halving":
        lr_alpha = lr_alpha / 2
    a1 = max(0.05, min(0.95, cls_k[1] - lr_alpha * alpha_grad))
    return [1 - a1, a1], lr_alpha, alpha_grad, state(ref)


class TinySet(Dataset):
    def __init__(self, n=24):
        g = torch.Generator().manual_seed(5)
        self.x = {m: torch.randn(n, 1, 6, 6, generator=g) for m in INFO.modality_names}
        self.y = torch.arange(n) % INFO.num_classes

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return {"inputs": {m: v[i] for m, v in self.x.items()}, "label": int(self.y[i]), "index": i}


def learnable_setup(**flags):
    model, _, _ = build_sum(seed=2)
    method = create_method("lfm", make_args(lfm_weighting="learnable", random_seed=7, **flags), model, INFO)
    loader = DataLoader(TinySet(), batch_size=4)
    ctx = SimpleNamespace(model=model, device="cpu", train_loader=loader, train_transform=None,
                          broadcast=lambda obj: obj)
    method.before_training(ctx)
    return model, method, ctx


def learnable_compare(epoch, variant=None, lr_alpha=1e-4, alpha=0.5):  # alpha inside the clip range
    model, method, ctx = learnable_setup()
    method.alpha_match, method.lr_alpha = alpha, lr_alpha
    half = (method.held_batch["inputs"], method.held_batch["label"])
    want_k, want_lr, alpha_grad, want_state = their_alpha_update(model, half, epoch, [1 - alpha, alpha], lr_alpha,
                                                                 variant)
    model.eval()  # what the loop leaves behind; the method must pick the mode itself
    method.on_epoch_start(epoch, ctx)
    gaps = []
    step_want, step_got = want_k[1] - alpha, method.alpha_match - alpha
    if not math.isclose(step_got, step_want, rel_tol=TOL, abs_tol=1e-12):
        gaps.append(f"alpha step {step_got} vs {step_want}")
    if not math.isclose(method.lr_alpha, want_lr, rel_tol=1e-12):
        gaps.append(f"lr_alpha {method.lr_alpha} vs {want_lr}")
    for k, v in want_state.items():  # BatchNorm statistics: updated at epoch 0 only
        if not torch.allclose(model.state_dict()[k], v, atol=1e-7):
            gaps.append(f"{k} differs")
    return gaps, alpha_grad


@pytest.mark.parametrize("epoch", [0, 3, 20])
def test_lfm_learnt_weight_equals_the_authors_hypergradient(epoch):
    gaps, alpha_grad = learnable_compare(epoch)
    assert gaps == [] and alpha_grad != 0


@pytest.mark.parametrize("epoch, variant", [(3, "all_tensors"), (0, "always_eval"), (20, "no_halving")])
def test_lfm_learnt_weight_comparison_fails_on_a_broken_update(epoch, variant):
    assert learnable_compare(epoch, variant)[0] != []


def test_lfm_learnt_weight_is_clipped_and_the_holdout_leaves_training():
    gaps, alpha_grad = learnable_compare(3, lr_alpha=1e6, alpha=0.5)  # a huge step: clipped to an end
    assert gaps == []
    model, method, ctx = learnable_setup()
    assert len(method.holdout) == 16 and len(method.held_batch["label"]) == 8
    kept = method.epoch_indices(0, ctx)
    assert sorted(kept + method.holdout) == list(range(24))
    assert torch.equal(method.held_batch["label"], torch.tensor([int(TinySet().y[i]) for i in method.holdout[:8]]))
    # The state brings back the weight, the step size and the very same held-out batch.
    method.alpha_match, method.lr_alpha = 0.3, 2.5e-5
    saved = method.state_dict()
    other = create_method("lfm", make_args(lfm_weighting="learnable", random_seed=99), build_sum()[0], INFO)
    other.load_state_dict(saved)
    other.before_training(ctx)  # must not draw a new batch
    assert other.alpha_match == 0.3 and other.lr_alpha == 2.5e-5 and other.holdout == method.holdout
    assert all(torch.equal(other.held_batch["inputs"][m], method.held_batch["inputs"][m]) for m in INFO.modality_names)


def test_lfm_learnable_step_uses_the_current_weights():
    model, method, ctx = learnable_setup()
    method.alpha_match = 0.8
    x = {m: torch.randn(B, 1, 6, 6) for m in INFO.modality_names}
    y = torch.arange(B) % INFO.num_classes
    before = state(model)
    ref, grads = lfm_reference(model, x, y, [0.2, 0.8])
    want = reference_step(ref, grads)
    got = project_step(method, model, x, y, epoch=4)
    assert differences(before, got, want) == []


def test_lfm_learnable_end_to_end_and_resume(tmp_path):
    """The trainer end to end with the learnt weights: a new weight every epoch, and a run cut after
    epoch 0 and resumed reproduces the uninterrupted run (weight, step size and batch restored)."""
    from test_main import read_log, run

    flags = ["--method", "lfm", "--lfm_weighting", "learnable", "--lfm_lr_alpha", "1.0", "--no-probe",
             "--deterministic", "--device", "cpu", "--reinit_epoch", "5"]
    rc, full = run(flags + ["--epochs", "2"], tmp_path, "full")
    assert rc == 0
    rc, cut = run(flags + ["--epochs", "1"], tmp_path, "cut")
    assert rc == 0
    rc, _ = run(flags + ["--epochs", "2", "--resume"], tmp_path, "cut")
    assert rc == 0
    weights = [r["train"]["lfm_alpha_cls"] for r in read_log(full)]
    assert len(set(weights)) == 2  # learnt: a new weight every epoch
    assert [r["train"]["lfm_alpha_cls"] for r in read_log(cut)] == weights
    assert [r["val"] for r in read_log(cut)] == [r["val"] for r in read_log(full)]
