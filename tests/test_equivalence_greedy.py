"""The greedy-learner method (methods/greedy.py, methods/mmtm.py) against an independent
re-derivation of its authors' update, written here in our own words from nyukat/
greedy_multimodal_learning at a190e03:
  - src/model.py L63-108 (MMTM_MVCNN.forward): stem and layer1 per branch, then layer2..4 each
    followed by an MMTM block, average pooling, one Linear head per branch, fused = mean;
  - src/balanced_mmtm.py L49-154 (MMTM_mitigate.forward): squeeze by spatial mean, shared
    fc_squeeze + ReLU, one sigmoid excitation per modality, running means of the gates (both from
    the visual gate, L113-114), held gates in curation mode;
  - train.py L21-28 (blend_loss): the sum of the branches' cross-entropies;
  - src/framework.py L305-315: zero_grad, forward, backward, callback, optimiser step;
  - src/callbacks.py L199-267 (Bias_Mitigation_Strong): compute_BDR by parameter names and the
    curation switch.
One step of the project's method (through train_step, a real SGD with momentum and weight decay)
must equal the re-derivation in every parameter and buffer (1e-5 of the update) and in the
switch's state; each broken variant (a plausible slip) must be reported as different.
"""
import copy
import functools
import math

import pytest
import torch
import torch.nn.functional as F

from dnr.data import DatasetInfo, ModalitySpec
from dnr.methods import METHODS, create_method
from dnr.methods.greedy import Rebalancer
from dnr.methods.mmtm import MMTMClassifier
from test_equivalence import differences, make_args, project_step, reference_step, sgd, state  # noqa: F401
from test_main import read_log, run

# audio: a spectrogram (B, 1, 16, 16); visual: 2 frames (B, 2, 3, 16, 16) folded into the batch.
INFO = DatasetInfo("tiny", ("a", "b", "c", "d"),
                   (ModalitySpec("audio", "spectrogram", (1, 16, 16)),
                    ModalitySpec("visual", "frames", (2, 3, 16, 16))))
NAMES = ["audio", "visual"]
B = 8


def build(seed=0):
    """The method's model, its BatchNorm statistics and MMTM running means moved off their start by
    three training-mode passes, and a fixed batch."""
    torch.manual_seed(seed)
    model = METHODS["greedy"].build_model(INFO)
    shapes = {s.name: s.shape for s in INFO.modalities}
    with torch.no_grad():
        for _ in range(3):
            model({m: torch.randn(B, *shapes[m]) * 2 + 0.5 for m in NAMES})
    x = {m: torch.randn(B, *shapes[m]) for m in NAMES}
    y = torch.arange(B) % INFO.num_classes
    return model, x, y


def greedy_args(**flags):
    base = dict(random_seed=0, greedy_threshold=0.01, greedy_window=5, greedy_starts=1)
    base.update(flags)
    return make_args(**base)


# ------------------------------------------------------------------ the re-derivation
class Callback:
    """Bias_Mitigation_Strong (callbacks.py L173-267), state kept in their names."""

    def __init__(self, epsilon=0.01, windowsize=5, variant=None):
        self.epsilon, self.windowsize, self.variant = epsilon, windowsize, variant
        self.M_bypass, self.M_main = [0.0, 0.0], [0.0, 0.0]
        self.curation_mode, self.caring_modality, self.curation_step, self.d_BDR = False, 0, 0, None

    def compute_BDR(self, model):
        wn_main, wn_bypass, gn_main, gn_bypass = [0.0, 0.0], [0.0, 0.0], [0.0, 0.0], [0.0, 0.0]
        for name, p in model.named_parameters():
            wn = float((p.detach().double() ** 2).sum())
            gn = float((p.grad.double() ** 2).sum())
            if self.variant == "norm_not_squared":
                wn, gn = math.sqrt(wn), math.sqrt(gn)
            if name.startswith("mmtm."):
                owner = [i for i, m in enumerate(NAMES) if f".excite.{m}." in name]
                if not owner and self.variant == "squeeze_not_shared":
                    continue
                for i in owner or [0, 1]:  # fc_squeeze is shared: counted for both
                    wn_bypass[i] += wn
                    gn_bypass[i] += gn
            else:
                for i, m in enumerate(NAMES):
                    if name.startswith(f"encoders.{m}.") or name.startswith(f"heads.{m}."):
                        wn_main[i] += wn
                        gn_main[i] += gn
        if self.variant == "not_cumulative":
            self.M_bypass, self.M_main = [0.0, 0.0], [0.0, 0.0]
        for i in range(2):
            self.M_bypass[i] += gn_bypass[i] / wn_bypass[i]
            self.M_main[i] += gn_main[i] / wn_main[i]
        bdr = [math.log10(self.M_bypass[i] / self.M_main[i]) for i in range(2)]
        return bdr[0] - bdr[1]

    def on_backward_end(self, model, unlock):
        if not unlock:
            self.d_BDR = self.compute_BDR(model)
            self.curation_mode, self.caring_modality = False, 0
        elif not self.curation_mode:
            self.d_BDR = self.compute_BDR(model)
            if abs(self.d_BDR) > self.epsilon:
                self.curation_mode, self.curation_step = True, 0
                positive = self.d_BDR > 0
                if self.variant == "sign":
                    positive = not positive
                self.caring_modality = 0 if positive else 1
            else:
                self.curation_mode, self.caring_modality = False, 0
        else:
            self.curation_step += 1
            if self.curation_step == self.windowsize + (1 if self.variant == "window_plus_one" else 0):
                self.curation_mode = False


def reference_loss(model, x, y, curation_mode, caring_modality, variant=None):
    """MMTM_MVCNN.forward + MMTM_mitigate.forward + blend_loss on the model's own layers."""
    h, frames = [], []
    for m in NAMES:
        net, xm = model.encoders[m].net, x[m]
        t = xm.shape[1] if xm.dim() == 5 else 1
        xm = xm.reshape(-1, *xm.shape[-3:])  # frames into the batch
        h.append(net.layer1(net.maxpool(net.relu(net.bn1(net.conv1(xm))))))
        frames.append(t)
    for i in (2, 3, 4):
        h = [getattr(model.encoders[m].net, f"layer{i}")(h[k]) for k, m in enumerate(NAMES)]
        block = model.mmtm[str(i)]
        # squeeze: spatial mean, then the mean over the frames of each clip
        sq = [hk.reshape(hk.shape[0], hk.shape[1], -1).mean(-1).reshape(-1, frames[k], hk.shape[1]).mean(1)
              for k, hk in enumerate(h)]
        excitation = torch.relu(block.squeeze(torch.cat(sq, 1)))
        vis_out = torch.sigmoid(block.excite["audio"](excitation))
        sk_out = torch.sigmoid(block.excite["visual"](excitation))
        step = float(block.passes)
        avg_v, avg_s = block.average_audio, block.average_visual
        old_v, old_s = avg_v.clone(), avg_s.clone()
        new_v = (vis_out.mean(0) + avg_v * step).detach() / (step + 1)
        new_s = ((sk_out if variant == "own_average" else vis_out).mean(0) + avg_s * step).detach() / (step + 1)
        with torch.no_grad():
            avg_v.copy_(new_v)
            avg_s.copy_(new_s)
            block.passes += 1
        if curation_mode:
            held_v, held_s = (old_v, old_s) if variant == "hold_before_update" else (new_v, new_s)
            if variant == "hold_other":
                caring = 1 - caring_modality
            else:
                caring = caring_modality
            if caring == 0 or variant == "hold_both":
                vis_out = held_v.expand_as(vis_out)
            if caring == 1 or variant == "hold_both":
                sk_out = held_s.expand_as(sk_out)
        gates = [vis_out, sk_out]
        h = [hk * gates[k].repeat_interleave(frames[k], 0)[:, :, None, None] for k, hk in enumerate(h)]
    logits = []
    for k, m in enumerate(NAMES):
        net = model.encoders[m].net
        z = torch.flatten(net.avgpool(h[k]), 1).reshape(-1, frames[k], 512).mean(1)
        logits.append(model.heads[m](z))
    if variant == "mean_loss":
        return F.cross_entropy((logits[0] + logits[1]) / 2, y)
    return sum(F.cross_entropy(lg, y) for lg in logits)


def reference_update(model, x, y, cb, epoch, starts, variant=None):
    """framework.py L310-315: zero_grad, forward (with the callback's current mode), backward,
    on_backward_end, SGD step."""
    model.train()
    model.zero_grad(set_to_none=True)
    loss = reference_loss(model, x, y, cb.curation_mode, cb.caring_modality, variant)
    loss.backward()
    cb.on_backward_end(model, unlock=epoch >= starts)
    # A held modality's excitation layers take no part in the loss; the PyTorch of their time had
    # zero_grad fill zeros, so the optimiser (momentum, weight decay) still sees a zero gradient.
    if variant == "held_without_gradient":
        grads = {p: p.grad.clone() for p in model.parameters() if p.grad is not None}
    else:
        grads = {p: torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in model.parameters()}
    return reference_step(model, grads)


# ------------------------------------------------------------------ cases
# (epoch, prior switch state); the prior M sums make d exceed the threshold in "switch".
CASES = {
    "before_start": (0, None),
    "switch": (1, {"bypass": {"audio": 4e-2, "visual": 1e-4}, "main": {"audio": 1e-2, "visual": 1e-2},
                   "caring": None, "rebalanced": 0, "d": None, "steps": 10}),
    "rebalance_audio_last": (2, {"bypass": {"audio": 1.0, "visual": 1.0}, "main": {"audio": 1.0, "visual": 1.0},
                                 "caring": "audio", "rebalanced": 4, "d": 0.5, "steps": 10}),
    "rebalance_visual": (2, {"bypass": {"audio": 1.0, "visual": 1.0}, "main": {"audio": 1.0, "visual": 1.0},
                             "caring": "visual", "rebalanced": 0, "d": -0.5, "steps": 10}),
}


def callback_from(prior, variant=None):
    cb = Callback(variant=variant)
    if prior is not None:
        cb.M_bypass = [prior["bypass"][m] for m in NAMES]
        cb.M_main = [prior["main"][m] for m in NAMES]
        cb.curation_mode = prior["caring"] is not None
        cb.caring_modality = NAMES.index(prior["caring"]) if prior["caring"] else 0
        cb.curation_step, cb.d_BDR = prior["rebalanced"], prior["d"]
    return cb


def switch_differences(switch, cb):
    """The project's switch state against the callback's (M sums to 1e-9 relative)."""
    out = []
    want_caring = NAMES[cb.caring_modality] if cb.curation_mode else None
    if switch.caring != want_caring:
        out.append(f"caring: {switch.caring} vs {want_caring}")
    if switch.caring is not None and switch.rebalanced != cb.curation_step:
        out.append(f"window step: {switch.rebalanced} vs {cb.curation_step}")
    for k, m in enumerate(NAMES):
        for name, got, want in (("bypass", switch.bypass[m], cb.M_bypass[k]), ("main", switch.main[m], cb.M_main[k])):
            if not math.isclose(got, want, rel_tol=1e-9, abs_tol=0):
                out.append(f"M_{name}[{m}]: {got} vs {want}")
    if (switch.d is None) != (cb.d_BDR is None) or (switch.d is not None and not math.isclose(switch.d, cb.d_BDR,
                                                                                               rel_tol=1e-9)):
        out.append(f"d: {switch.d} vs {cb.d_BDR}")
    return out


@functools.lru_cache(maxsize=None)
def project_result(case, own_average=False):
    """(state before, state after, switch) of the project's step: the same for every variant of a case."""
    epoch, prior = CASES[case]
    model, x, y = build()
    before = state(model)
    method = create_method("greedy", greedy_args(greedy_own_average=own_average), model, INFO)
    if prior is not None:
        method.switch.load_state_dict(prior)
    got = project_step(method, model, x, y, epoch=epoch)
    return before, got, method.switch


def compare(case, variant=None, own_average=False):
    epoch, prior = CASES[case]
    before, got, switch = project_result(case, own_average)
    ref_model, x, y = build()  # the same model and batch again (seeded)
    cb = callback_from(prior, variant)
    want = reference_update(ref_model, x, y, cb, epoch, starts=1,
                            variant=variant or ("own_average" if own_average else None))
    return differences(before, got, want) + switch_differences(switch, cb)


@pytest.mark.parametrize("case", sorted(CASES))
def test_greedy_step_equals_the_authors_update(case):
    assert compare(case) == []


def test_greedy_own_average_flag_equals_the_fixed_running_mean():
    assert compare("rebalance_visual", own_average=True) == []


@pytest.mark.parametrize("case, variant", [
    ("rebalance_visual", "own_average"),        # the fixed running mean where theirs feeds g_0 to both
    ("rebalance_audio_last", "hold_before_update"),  # held gates without this batch's update
    ("rebalance_visual", "hold_other"),          # the other modality's gates held
    ("rebalance_audio_last", "hold_both"),       # both modalities' gates held
    ("before_start", "mean_loss"),               # CE of the averaged logits instead of the sum of branches'
    ("switch", "sign"),                          # d > 0 re-balancing modality 1
    ("before_start", "norm_not_squared"),        # norms instead of squared norms
    ("before_start", "squeeze_not_shared"),      # fc_squeeze counted for neither modality
    ("switch", "not_cumulative"),                # this step's ratio instead of the sum over steps
    ("rebalance_audio_last", "window_plus_one"),  # windows one step too long
    ("rebalance_visual", "held_without_gradient"),  # the held excitation layer skipped by the optimiser
])
def test_greedy_comparison_fails_on_a_broken_update(case, variant):
    assert compare(case, variant) != []


def test_greedy_several_steps_follow_the_authors_switch():
    """Eight steps from the start (threshold 0: every speed computation switches), through plain
    and re-balancing steps for both modalities, stay equal to the callback's."""
    model, x, y = build(seed=1)
    ref_model = copy.deepcopy(model)
    method = create_method("greedy", greedy_args(greedy_threshold=0.0, greedy_window=2, greedy_starts=0),
                           model, INFO)
    cb = Callback(epsilon=0.0, windowsize=2)
    opt, ref_opt = sgd(model), sgd(ref_model)
    from dnr.stepping import Batch, Updater
    update = Updater(model, opt, "cpu")
    seen, before = [], state(model)
    for step in range(8):
        batch = {m: v + 0.1 * step for m, v in x.items()}
        model.train()
        method.train_step(model, Batch(batch, y, torch.arange(B), 0, step), update)
        ref_model.train()
        ref_opt.zero_grad(set_to_none=False)  # zeros, as their PyTorch's zero_grad
        reference_loss(ref_model, batch, y, cb.curation_mode, cb.caring_modality).backward()
        cb.on_backward_end(ref_model, unlock=True)
        ref_opt.step()
        assert switch_differences(method.switch, cb) == [], step
        seen.append(method.switch.caring)
    assert differences(before, state(model), state(ref_model)) == []  # any step apart would show here
    assert None in seen and len(set(seen)) >= 2, seen  # plain and re-balancing steps both happened


# ------------------------------------------------------------------ the switch on its own
def literal_switch(d_values, unlocked, epsilon, window):
    """The callback's decisions for a sequence of d values (one per computation)."""
    d_iter, curation, caring, step, out = iter(d_values), False, 0, 0, []
    for u in unlocked:
        if not u:
            next(d_iter)
            curation, caring = False, 0
        elif not curation:
            d = next(d_iter)
            if abs(d) > epsilon:
                curation, step, caring = True, 0, (0 if d > 0 else 1)
            else:
                curation, caring = False, 0
        else:
            step += 1
            if step == window:
                curation = False
        out.append(NAMES[caring] if curation else None)
    return out


def test_greedy_switch_schedule_matches_the_callback():
    torch.manual_seed(0)
    unlocked = [False] * 4 + [True] * 40
    bdr = iter(torch.randn(100, 2).mul(6).exp().tolist())  # wide swings, so the cumulative d changes sign
    switch = Rebalancer(NAMES, threshold=0.3, window=3)
    ds, got = [], []
    for u in unlocked:
        def ratios():
            r = next(bdr)
            return {"bypass": {"audio": r[0], "visual": r[1]}, "main": {"audio": 1.0, "visual": 1.0}}
        before = switch.d
        switch.after_backward(ratios, u)
        if switch.d is not before:
            ds.append(switch.d)
        got.append(switch.caring)
    assert got == literal_switch(ds, unlocked, 0.3, 3)
    assert {"audio", "visual", None} <= set(got)  # both directions and plain steps occur


def test_greedy_switch_skips_overflowing_steps():
    switch = Rebalancer(NAMES, threshold=0.01, window=5)
    ok = {"bypass": {"audio": 2.0, "visual": 1.0}, "main": {"audio": 1.0, "visual": 1.0}}
    switch.after_backward(lambda: ok, unlocked=False)
    d, sums = switch.d, dict(switch.bypass)
    switch.after_backward(lambda: {"bypass": {"audio": math.inf, "visual": 1.0}, "main": ok["main"]}, unlocked=True)
    assert switch.d == d and switch.bypass == sums
    assert switch.caring == "audio"  # the last finite d (log10 2 > 0.01) still decides


def test_greedy_random_mode_draws_uniformly_after_the_start():
    switch = Rebalancer(NAMES, threshold=0.01, window=5, mode="random", seed=3)
    before = []
    for _ in range(5):
        switch.after_backward(lambda: pytest.fail("random mode computes no speed"), unlocked=False)
        before.append(switch.caring)
    assert before == [None] * 5
    draws = []
    for _ in range(600):
        switch.after_backward(lambda: pytest.fail("random mode computes no speed"), unlocked=True)
        draws.append(switch.caring)
    for value in (None, "audio", "visual"):
        assert 150 < draws.count(value) < 250, value
    again = Rebalancer(NAMES, threshold=0.01, window=5, mode="random", seed=3)
    for _ in range(5):
        again.after_backward(None, unlocked=False)
    assert [again.after_backward(None, unlocked=True) or again.caring for _ in range(600)] == draws


# ------------------------------------------------------------------ model
def test_mmtm_model_shapes_gradients_and_plain_evaluation():
    model, x, y = build()
    out = model(x)
    assert out.logits.shape == (B, 4) and set(out.unimodal_logits) == set(NAMES)
    assert torch.allclose(out.logits, (out.unimodal_logits["audio"] + out.unimodal_logits["visual"]) / 2)
    assert all(f.shape == (B, 512) for f in out.features.values())
    sum(F.cross_entropy(u, y) for u in out.unimodal_logits.values()).backward()
    assert all(p.grad is not None for p in model.parameters())
    # evaluation passes update the running means (the authors' module), unless --greedy_average_passes train
    model.eval()
    passes = int(model.mmtm["2"].passes)
    with torch.no_grad():
        model(x)
    assert int(model.mmtm["2"].passes) == passes + 1
    model.configure(average_passes="train")
    with torch.no_grad():
        model(x)
    assert int(model.mmtm["2"].passes) == passes + 1
    # the authors' running mean of modality 1 follows modality 0's gates
    assert torch.equal(model.mmtm["3"].average_audio, model.mmtm["3"].average_visual)


@pytest.mark.parametrize("modalities", [("audio", "visual", "sensor"), ("audio", "sensor")])
def test_greedy_refuses_what_mmtm_does_not_join(modalities):
    specs = {"audio": ModalitySpec("audio", "spectrogram", (1, 16, 16)),
             "visual": ModalitySpec("visual", "frames", (2, 3, 16, 16)),
             "sensor": ModalitySpec("sensor", "vector", (32,))}
    info = DatasetInfo("tiny", ("a", "b"), tuple(specs[m] for m in modalities))
    with pytest.raises(ValueError, match="--builtin_modalities"):
        MMTMClassifier(info)


# ------------------------------------------------------------------ through the trainer
def test_greedy_refuses_three_modalities_in_the_trainer(tmp_path, capsys):
    rc, _ = run(["--method", "greedy", "--builtin_modalities", "audio,visual,sensor", "--epochs", "1"], tmp_path)
    assert rc == 1
    assert "--builtin_modalities" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--greedy_window", "0"], "--greedy_window must be >= 1, got 0"),
    (["--greedy_threshold", "-1"], "--greedy_threshold must be >= 0"),
    (["--fusion", "sum"], "--fusion sum: --method greedy fuses through MMTM blocks"),
])
def test_greedy_bad_flags_name_the_flag(argv, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        run(["--method", "greedy", "--epochs", "1"] + argv, tmp_path)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_greedy_resume_restores_the_switch_and_running_means(tmp_path):
    common = ["--method", "greedy", "--greedy_starts", "0", "--deterministic", "--device", "cpu", "--no-probe"]
    rc, full = run(common + ["--epochs", "2"], tmp_path, "full")
    assert rc == 0
    rc, cut = run(common + ["--epochs", "1"], tmp_path, "cut")
    assert rc == 0
    rc, cut = run(common + ["--epochs", "2", "--resume"], tmp_path, "cut")
    assert rc == 0
    def train(out):
        return [{k: v for k, v in r["train"].items() if k != "seconds"} for r in read_log(out)]

    assert train(cut) == train(full)
    assert [r["val"] for r in read_log(cut)] == [r["val"] for r in read_log(full)]
    saved = torch.load(cut / "last.pth", weights_only=True)
    assert saved["method"]["switch"]["steps"] == 6  # 40 samples, batches of 16: 3 steps an epoch


# ------------------------------------------------------------------ conditional utilisation
def test_greedy_alone_gates_follow_turnoff_cross_modal_flow():
    """balanced_mmtm.py L72-91: with the cross-modal flow turned off, a modality's gates come from
    its own squeeze and the other's mean squeeze over the recorded (training) samples; the
    recording and alone passes leave the running means and pass counts as they were."""
    model, x, y = build()
    model.eval()
    train_x = {m: v * 1.5 - 0.2 for m, v in x.items()}
    kept = {k: v.clone() for k, v in model.state_dict().items()}
    recorded = {}
    with torch.no_grad():
        # re-derivation: the squeezes each block sees on the training batch (plain model)
        h = {}
        for m in NAMES:
            net = model.encoders[m].net
            xm = train_x[m].reshape(-1, *train_x[m].shape[-3:])
            h[m] = net.layer1(net.maxpool(net.relu(net.bn1(net.conv1(xm)))))
        for i in (2, 3, 4):
            h = {m: getattr(model.encoders[m].net, f"layer{i}")(h[m]) for m in NAMES}
            t = {"audio": 1, "visual": 2}
            sq = {m: h[m].reshape(h[m].shape[0], h[m].shape[1], -1).mean(-1).reshape(B, t[m], -1).mean(1)
                  for m in NAMES}
            recorded[i] = {m: sq[m].mean(0) for m in NAMES}
            block = model.mmtm[str(i)]
            e = torch.relu(block.squeeze(torch.cat([sq["audio"], sq["visual"]], 1)))
            g = {m: torch.sigmoid(block.excite[m](e)) for m in NAMES}
            h = {m: h[m] * g[m].repeat_interleave(t[m], 0)[:, :, None, None] for m in NAMES}
        with model.analysis("record"):
            model(train_x)
        for i in (2, 3, 4):
            for m in NAMES:
                got = model.mmtm[str(i)].recorded[m]
                assert torch.allclose((got[:-1] / got[-1]).float(), recorded[i][m], atol=1e-6)
        with model.analysis("alone"):
            alone = model(x)
        # re-derivation of the alone pass on x
        h = {}
        for m in NAMES:
            net = model.encoders[m].net
            xm = x[m].reshape(-1, *x[m].shape[-3:])
            h[m] = net.layer1(net.maxpool(net.relu(net.bn1(net.conv1(xm)))))
        for i in (2, 3, 4):
            h = {m: getattr(model.encoders[m].net, f"layer{i}")(h[m]) for m in NAMES}
            sq = {m: h[m].reshape(h[m].shape[0], h[m].shape[1], -1).mean(-1).reshape(B, t[m], -1).mean(1)
                  for m in NAMES}
            block = model.mmtm[str(i)]
            mean = {m: recorded[i][m].expand(B, -1) for m in NAMES}
            g = {"audio": torch.sigmoid(block.excite["audio"](torch.relu(block.squeeze(
                     torch.cat([sq["audio"], mean["visual"]], 1))))),
                 "visual": torch.sigmoid(block.excite["visual"](torch.relu(block.squeeze(
                     torch.cat([mean["audio"], sq["visual"]], 1)))))}
            h = {m: h[m] * g[m].repeat_interleave(t[m], 0)[:, :, None, None] for m in NAMES}
        for m in NAMES:
            z = torch.flatten(model.encoders[m].net.avgpool(h[m]), 1).reshape(B, t[m], -1).mean(1)
            assert torch.allclose(alone.unimodal_logits[m], model.heads[m](z), atol=1e-5)
        for k, v in model.state_dict().items():  # the analysis passes moved no running mean
            if ".average_" in k or k.endswith(".passes"):
                assert torch.equal(v, kept[k]), k
        plain = model(x)  # an ordinary evaluation pass counts (the authors' module)
    assert int(model.mmtm["4"].passes) == int(kept["mmtm.4.passes"]) + 1
    assert not torch.allclose(plain.unimodal_logits["audio"], alone.unimodal_logits["audio"], atol=1e-5)


def test_greedy_utilization_is_logged_and_changes_no_training_number(tmp_path):
    common = ["--method", "greedy", "--greedy_starts", "0", "--epochs", "2", "--deterministic", "--device", "cpu",
              "--no-probe"]  # evaluation passes move the running means: the analysis must not
    rc, plain = run(common, tmp_path, "plain")
    assert rc == 0
    rc, out = run(common + ["--greedy_utilization", "test"], tmp_path, "util")
    assert rc == 0
    log, log_plain = read_log(out), read_log(plain)
    assert [r["train"]["loss"] for r in log] == [r["train"]["loss"] for r in log_plain]
    assert [r["test"] for r in log] == [r["test"] for r in log_plain]
    for r in log:
        assert r["greedy_acc_audio"] == pytest.approx(r["test"]["acc_audio"])
        assert r["greedy_acc_visual"] == pytest.approx(r["test"]["acc_visual"])
        assert {"greedy_utilization_visual_given_audio", "greedy_utilization_audio_given_visual",
                "greedy_acc_audio_alone", "greedy_acc_visual_alone"} <= set(r)
