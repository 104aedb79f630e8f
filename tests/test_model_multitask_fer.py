"""multitask_fer: architecture, mechanisms against direct implementations, ONNX export, learning."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from fer_core.losses.multitask import MultitaskLoss
from fer_core.metrics.affect import concordance_correlation, expression_accuracy
from fer_core.metrics.landmarks import decode_heatmaps, nme, render_heatmaps
from fer_core.models import create_model
from fer_core.models.multitask_fer import Attention, ConvBlock, EncoderBlock, Hourglass
from tests.model_checks import check_every_parameter_gets_gradient, check_forward, check_onnx_export

TINY = dict(
    img_size=32, width=16, num_stacks=2, hourglass_depth=2, pyramid_dim=16, num_heads=2, head_hidden=32,
)


def tiny_model(**overrides):
    return create_model("multitask_fer", **{**TINY, **overrides})


def random_targets(model, batch_size: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    size = model.metadata.input_size[0]
    return {
        "expression": torch.randint(0, 7, (batch_size,), generator=g),
        "valence_arousal": torch.rand(batch_size, 2, generator=g) * 2 - 1,
        "landmarks": torch.rand(batch_size, 68, 2, generator=g) * (size - 1),
    }


# ---------------------------------------------------------------- architecture and platform checks


def test_metadata_describes_the_four_outputs():
    model = tiny_model()
    meta = model.metadata
    assert meta.task == "multitask" and meta.primary_output == "logits"
    assert meta.output_names == ("logits", "valence_arousal", "heatmaps", "landmarks")
    assert meta.input.name == "image" and meta.input.shape == (3, 32, 32)
    assert meta.outputs[2].shape == (68, 8, 8) and meta.outputs[2].kind == "heatmaps"
    assert meta.outputs[1].labels == ("valence", "arousal")
    assert meta.extra["heatmap_stride"] == 4 and meta.extra["nme_normaliser"] == [36, 45]
    assert len(meta.mean) == len(meta.std) == 3


def test_forward_shapes_and_ranges():
    model = tiny_model()
    outs = check_forward(model, batch_size=3)
    assert outs["valence_arousal"].abs().max() <= 1.0
    # The landmarks output is the decoding of the heatmaps output (what serving returns).
    assert torch.allclose(outs["landmarks"], decode_heatmaps(outs["heatmaps"], stride=4, radius=2))


def test_default_is_fan_sized_order_4_hourglass():
    model = create_model("multitask_fer")
    assert model.metadata.input.shape == (3, 64, 64)
    assert len(model.hourglasses) == 4
    order, hourglass = 0, model.hourglasses[0]
    while isinstance(hourglass, Hourglass):
        order, hourglass = order + 1, hourglass.low2
    assert order == 4
    assert model.metadata.outputs[2].shape == (68, 16, 16)


def test_forward_train_supervises_every_stack():
    model = tiny_model(num_stacks=3)
    out = model.forward_train(model.example_input(2))
    assert out["stack_heatmaps"].shape == (2, 3, 68, 8, 8)
    assert torch.equal(out["stack_heatmaps"][:, -1], out["heatmaps"])


def test_features_and_head_api():
    model = tiny_model().eval()
    x = model.example_input(2)
    with torch.no_grad():
        feats = model.forward_features(x)
        logits, va = model.forward_head(feats)
        hidden = model.forward_head(feats, pre_logits=True)
        full = model(x)
    assert feats.shape == (2, model.num_features) and hidden.shape == (2, 32)
    assert torch.allclose(logits, full[0]) and torch.allclose(va, full[1])


def test_reset_classifier_updates_metadata():
    model = tiny_model()
    model.reset_classifier(3)
    assert model.metadata.outputs[0].shape == (3,) and len(model.metadata.label_names) == 3
    check_forward(model)


@pytest.mark.parametrize(
    "kwargs", [dict(img_size=36), dict(heatmap_stride=3), dict(width=12), dict(num_landmarks=20), dict(num_stacks=0),
               dict(pyramid_input="features"), dict(encoder_placement="top_down")]
)
def test_bad_configurations_raise_value_error(kwargs):
    with pytest.raises(ValueError):
        tiny_model(**kwargs)


@pytest.mark.parametrize("placement", ["lateral", "bottom_up"])
def test_pyramid_encoders_sit_where_the_placement_says(placement):
    torch.manual_seed(0)
    model = tiny_model(encoder_placement=placement).eval()
    pyramid = model.pyramid
    x = model.example_input(2)
    with torch.no_grad():
        _, stacks = model.forward_landmarks(x)
        heatmaps = stacks[-1]
        got = pyramid(heatmaps)  # default input: the heatmap keypoint features only
        c = [pyramid.input_proj(heatmaps)]
        if placement == "lateral":  # plain bottom-up convs, one encoder on each lateral link
            for down in pyramid.downs:
                c.append(down(c[-1]))
            t = [enc(level) for enc, level in zip(pyramid.encoders, c)]
        else:  # encoders in series on the bottom-up path
            t = [pyramid.encoders[0](c[0])]
            for down, enc in zip(pyramid.downs, pyramid.encoders[1:]):
                t.append(enc(down(t[-1])))
        p3 = t[2]
        p2 = pyramid.smooth[1](t[1] + nn.functional.interpolate(p3, scale_factor=2.0, mode="nearest"))
        p1 = pyramid.smooth[0](t[0] + nn.functional.interpolate(p2, scale_factor=2.0, mode="nearest"))
    for a, b in zip(got, [p1, p2, p3]):
        torch.testing.assert_close(a, b)
    assert pyramid.input_proj[0].in_channels == 68
    assert model.metadata.extra["valence_arousal_head"] == "extra head outside the method"


def test_appearance_concatenation_is_an_option():
    model = tiny_model(pyramid_input="heatmaps+features")
    assert model.pyramid.input_proj[0].in_channels == 68 + 16
    check_forward(model)


def test_every_parameter_gets_gradient():
    model = tiny_model()
    loss = MultitaskLoss.for_model(model)
    targets = random_targets(model, 4)
    check_every_parameter_gets_gradient(model, lambda out: loss(out, targets), batch_size=4)


def test_onnx_export(tmp_path):
    # Decoded landmarks are in input pixels (up to ~48): float32 noise of the local-centroid step
    # reaches ~2e-4 px here, so the tolerance is the 1e-3 px the export parity gate uses for them.
    worst = check_onnx_export(tiny_model(), tmp_path, atol=1e-3)
    assert worst <= 1e-3


# ---------------------------------------------------------------- mechanisms vs direct implementations


def ccc_by_hand(x: list[float], y: list[float]) -> float:
    n = len(x)
    mx, my = sum(x) / n, sum(y) / n
    vx = sum((a - mx) ** 2 for a in x) / n
    vy = sum((b - my) ** 2 for b in y) / n
    cov = sum((a - mx) * (b - my) for a, b in zip(x, y)) / n
    return 2 * cov / (vx + vy + (mx - my) ** 2)


def test_ccc_matches_the_formula_and_its_extremes():
    rng = np.random.default_rng(0)
    pred, target = rng.normal(0.2, 0.5, (50, 2)), rng.normal(-0.1, 0.3, (50, 2))
    got = concordance_correlation(torch.tensor(pred), torch.tensor(target))
    for d in range(2):
        assert got[d].item() == pytest.approx(ccc_by_hand(list(pred[:, d]), list(target[:, d])), abs=1e-5)
    centred = torch.tensor(target[:, 0] - target[:, 0].mean())
    assert concordance_correlation(centred, centred).item() == pytest.approx(1.0, abs=1e-6)
    assert concordance_correlation(-centred, centred).item() == pytest.approx(-1.0, abs=1e-6)
    # A shift keeps Pearson's r at 1 but lowers the CCC.
    assert concordance_correlation(centred + 0.5, centred).item() < 0.9
    with pytest.raises(ValueError):
        concordance_correlation(torch.zeros(3), torch.zeros(4))


def test_expression_accuracy_ignores_unlabelled():
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [3.0, 0.0], [0.0, 5.0]])
    assert expression_accuracy(logits, torch.tensor([0, 0, -1, 1])) == pytest.approx(2 / 3)


def test_heatmap_target_matches_gaussian_and_peaks_at_the_landmark():
    stride, sigma, side = 4, 1.5, 16
    landmarks = torch.tensor([[[21.5, 37.5], [6.0, 50.0]]])  # (1, 2, 2) input pixels
    maps = render_heatmaps(landmarks, (side, side), stride, sigma)
    assert maps.shape == (1, 2, side, side)
    for k in range(2):
        cx = (landmarks[0, k, 0].item() + 0.5) / stride - 0.5
        cy = (landmarks[0, k, 1].item() + 0.5) / stride - 0.5
        for v in range(side):
            for u in range(side):
                expected = math.exp(-((u - cx) ** 2 + (v - cy) ** 2) / (2 * sigma**2))
                assert maps[0, k, v, u].item() == pytest.approx(expected, abs=1e-6)
    # Landmark 0 maps exactly onto cell (u, v) = (5, 9): the peak is there and equals 1.
    peak = int(maps[0, 0].argmax())
    assert (peak % side, peak // side) == (5, 9) and maps[0, 0, 9, 5].item() == pytest.approx(1.0)


@pytest.mark.parametrize("stride,sigma", [(4, 1.0), (1, 2.0), (2, 1.5)])
def test_decoding_a_rendered_target_recovers_the_landmark(stride, sigma):
    g = torch.Generator().manual_seed(1)
    size = 64
    # Sub-pixel landmarks anywhere at least 2 sigma (in input pixels) inside the image.
    margin = 2 * sigma * stride
    landmarks = margin + torch.rand(8, 68, 2, generator=g) * (size - 1 - 2 * margin)
    maps = render_heatmaps(landmarks, (size // stride, size // stride), stride, sigma)
    decoded = decode_heatmaps(maps, stride=stride, radius=math.ceil(2 * sigma))
    assert (decoded - landmarks).abs().max() < 0.5
    # Not a fluke of the window: the raw arg-max alone is off by up to half a cell.
    argmax = maps.flatten(2).argmax(-1)
    coarse = torch.stack([argmax % (size // stride), argmax // (size // stride)], -1).float()
    coarse = (coarse + 0.5) * stride - 0.5
    if stride > 1:
        assert (coarse - landmarks).abs().max() > 0.5


def test_decoding_ignores_a_distant_secondary_blob():
    # A global centroid / soft-argmax would be pulled halfway to the second blob; the window is not.
    target = torch.tensor([[[10.0, 12.0]]])
    maps = render_heatmaps(target, (32, 32), 1.0, 1.0) + 0.6 * render_heatmaps(torch.tensor([[[25.0, 25.0]]]), (32, 32))
    assert (decode_heatmaps(maps, radius=2) - target).abs().max() < 0.05


def test_nme_hand_computed():
    target = torch.zeros(1, 68, 2)
    target[0, :, 0] = torch.arange(68).float()  # eye corners 36 and 45 are 9 px apart
    pred = target.clone()
    pred[0, :34] += torch.tensor([3.0, 4.0])  # half the points 5 px off, the rest exact
    assert nme(pred, target).item() == pytest.approx((34 * 5 / 68) / 9)
    with pytest.raises(ValueError):
        nme(pred[:, :40], target[:, :40])


def test_conv_block_branches_and_identity_residual():
    block = ConvBlock(16, 16).eval()
    assert (block.conv1.out_channels, block.conv2.out_channels, block.conv3.out_channels) == (8, 4, 4)
    x = torch.randn(2, 16, 8, 8)
    for conv in (block.conv1, block.conv2, block.conv3):
        nn.init.zeros_(conv.weight)
    assert torch.equal(block(x), x)  # zero branches leave only the identity residual


def test_attention_matches_a_direct_loop():
    torch.manual_seed(0)
    attn = Attention(dim=8, num_heads=2).eval()
    x = torch.randn(2, 5, 8)
    with torch.no_grad():
        got = attn(x)
        wq, wk, wv = attn.qkv.weight.split(8)
        bq, bk, bv = attn.qkv.bias.split(8)
        expected = torch.zeros(2, 5, 8)
        for b in range(2):
            q, k, v = x[b] @ wq.T + bq, x[b] @ wk.T + bk, x[b] @ wv.T + bv
            heads = []
            for h in range(2):
                sl = slice(4 * h, 4 * h + 4)
                scores = torch.tensor([[float(q[i, sl] @ k[j, sl]) / 2.0 for j in range(5)] for i in range(5)])
                weights = scores.exp() / scores.exp().sum(dim=1, keepdim=True)
                heads.append(weights @ v[:, sl])
            expected[b] = torch.cat(heads, dim=1) @ attn.proj.weight.T + attn.proj.bias
    assert torch.allclose(got, expected, atol=1e-5)


def test_encoder_block_matches_torch_multihead_attention():
    torch.manual_seed(0)
    block = EncoderBlock(dim=16, num_heads=4, mlp_ratio=2.0).eval()
    mha = nn.MultiheadAttention(16, 4, batch_first=True).eval()
    with torch.no_grad():
        mha.in_proj_weight.copy_(block.attn.qkv.weight)
        mha.in_proj_bias.copy_(block.attn.qkv.bias)
        mha.out_proj.weight.copy_(block.attn.proj.weight)
        mha.out_proj.bias.copy_(block.attn.proj.bias)
        x = torch.randn(3, 10, 16)
        y = block.norm1(x)
        ref = x + mha(y, y, y, need_weights=False)[0]
        ref = ref + block.mlp(block.norm2(ref))
        assert torch.allclose(block(x), ref, atol=1e-5)


def test_loss_terms_by_hand():
    model = tiny_model()
    targets = random_targets(model, 4)
    outputs = {k: v.detach() for k, v in model.forward_train(model.example_input(4)).items()}
    loss = MultitaskLoss(expression_weight=0.5, va_weight=2.0, heatmap_weight=3.0, heatmap_stride=4, heatmap_sigma=1.0)
    parts = loss.parts(outputs, targets)
    ce = nn.functional.cross_entropy(outputs["logits"], targets["expression"])
    va = 1 - concordance_correlation(outputs["valence_arousal"], targets["valence_arousal"]).mean()
    maps = render_heatmaps(targets["landmarks"], (8, 8), 4, 1.0)
    hm = ((outputs["stack_heatmaps"] - maps[:, None]) ** 2).sum((-1, -2)).mean()
    assert parts["expression"].item() == pytest.approx(ce.item(), rel=1e-5)
    assert parts["valence_arousal"].item() == pytest.approx(va.item(), rel=1e-5)
    assert parts["heatmaps"].item() == pytest.approx(hm.item(), rel=1e-5)
    assert loss(outputs, targets).item() == pytest.approx(0.5 * ce.item() + 2 * va.item() + 3 * hm.item(), rel=1e-5)
    mse = MultitaskLoss(va_loss="mse").parts(outputs, targets)["valence_arousal"]
    assert mse.item() == pytest.approx(((outputs["valence_arousal"] - targets["valence_arousal"]) ** 2).mean().item(), rel=1e-5)


def test_loss_of_a_perfect_prediction_and_missing_labels():
    targets = {"valence_arousal": torch.tensor([[0.5, -0.2], [-0.3, 0.4], [0.1, 0.0]]),
               "landmarks": torch.tensor([[[10.0, 12.0]], [[3.0, 30.0]], [[20.0, 5.0]]])}
    maps = render_heatmaps(targets["landmarks"], (8, 8), 4, 1.0)
    outputs = {"valence_arousal": targets["valence_arousal"].clone(), "heatmaps": maps, "logits": torch.zeros(3, 7)}
    loss = MultitaskLoss()
    assert set(loss.parts(outputs, targets)) == {"valence_arousal", "heatmaps"}  # no expression labels given
    assert loss(outputs, targets).item() == pytest.approx(0.0, abs=1e-6)
    # A face without landmarks (NaN) is left out of the heatmap term.
    targets["landmarks"][1] = float("nan")
    outputs["heatmaps"] = maps.clone()
    outputs["heatmaps"][1] = 5.0
    assert loss.parts(outputs, targets)["heatmaps"].item() == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError):
        MultitaskLoss(va_loss="l1")


# ---------------------------------------------------------------- learning


def _as_tensors(faces) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """SynthFACS faces -> normalised (N, 3, 64, 64) RGB and the three targets; faceless frames dropped."""
    keep = faces.has_face
    x = torch.from_numpy(faces.images[keep]).permute(0, 3, 1, 2).float() / 255.0
    targets = {
        "expression": torch.from_numpy(faces.labels[keep]),
        "valence_arousal": torch.from_numpy(faces.valence_arousal[keep]),
        "landmarks": torch.from_numpy(faces.landmarks[keep]),
    }
    return (x - 0.5) / 0.5, targets


@pytest.mark.slow
def test_learns_landmarks_expression_and_valence_on_synthfacs():
    """250 Adam steps of a tiny network on SynthFACS, scored on 5 unseen subjects.

    Difficulty 0.3, not 0: at difficulty 0 every face is frontal and centred, so the mean training
    shape is already within ~0.9 px of every landmark (NME 0.038) and beating it needs sub-pixel
    heatmaps that a one-minute CPU run does not reach (measured: 0.042-0.045). At 0.3, pose, shift and
    scale vary and the mean shape scores ~0.088.
    250 steps, not 150: at 150 the expression head's accuracy depends on the initialisation (torch
    seeds 0/1/2: 0.19/0.40/0.56, so seed 0 failed the threshold); at 250, seeds 0/3 reach 0.25/0.51
    with NME 0.0507/0.0505 and CCC valence 0.43/0.63 (CPU, one thread, ~1.5 min). Deterministic for
    a given seed on one thread.
    Thresholds: NME <= 0.75 x mean-shape NME; accuracy >= 1.5 x chance; valence CCC >= 0.3.
    """
    from fer_core.data.synthfacs import SynthFACS
    from tests.learning import epochs, fit

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        gen = SynthFACS(seed=0, image_size=64, difficulty=0.3)
        x_train, y_train = _as_tensors(gen.expression_set(1400, num_subjects=20))
        x_test, y_test = _as_tensors(gen.expression_set(350, num_subjects=5, first_subject=100))
        model = create_model(
            "multitask_fer", img_size=64, width=32, num_stacks=1, hourglass_depth=2, pyramid_dim=32,
            num_heads=2, head_hidden=64,
        )
        loss = MultitaskLoss.for_model(model)
        curve = fit(model, loss, epochs(x_train, y_train, batch_size=32), steps=250, lr=2e-3)
        model.eval()
        with torch.no_grad():
            chunks = [model.outputs_as_dict(model(x_test[i : i + 64])) for i in range(0, len(x_test), 64)]
        out = {k: torch.cat([c[k] for c in chunks]) for k in chunks[0]}
    finally:
        torch.set_num_threads(threads)

    mean_shape = y_train["landmarks"].mean(dim=0).expand_as(y_test["landmarks"])
    baseline_nme = nme(mean_shape, y_test["landmarks"]).mean().item()
    model_nme = nme(out["landmarks"], y_test["landmarks"]).mean().item()
    accuracy = expression_accuracy(out["logits"], y_test["expression"])
    ccc = concordance_correlation(out["valence_arousal"], y_test["valence_arousal"])
    report = f"NME {model_nme:.4f} (mean shape {baseline_nme:.4f}), accuracy {accuracy:.3f}, CCC {ccc.tolist()}"
    print(report)
    assert sum(curve[-10:]) < 0.6 * sum(curve[:10]), f"loss did not fall: {curve[:3]} -> {curve[-3:]}"
    assert model_nme <= 0.75 * baseline_nme, report
    assert accuracy >= 1.5 / 7, report
    assert ccc[0].item() >= 0.3, report
