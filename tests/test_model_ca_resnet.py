"""ca_resnet (hybrid attention + coordinate-attention residual network) and the focal loss."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fer_core.data.labels import EXPRESSIONS
from fer_core.losses.focal import FocalLoss, focal_loss, method_focal_loss
from fer_core.models import create_model
from fer_core.models.ca_resnet import CABasicBlock, CoordinateAttention, HybridAttention
from tests.model_checks import check_every_parameter_gets_gradient, check_forward, check_onnx_export

TINY = dict(width=8, img_size=24)


def _randomise_batch_norm(module: nn.Module) -> None:
    """Non-trivial running statistics and affine parameters, so eval-mode BN is not the identity."""
    g = torch.Generator().manual_seed(1)
    for m in module.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.3)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            with torch.no_grad():
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.2)


def _bn_eval(x: torch.Tensor, bn: nn.BatchNorm2d) -> torch.Tensor:
    shape = (1, -1, 1, 1)
    return (x - bn.running_mean.view(shape)) / torch.sqrt(bn.running_var.view(shape) + bn.eps) * bn.weight.view(
        shape
    ) + bn.bias.view(shape)


def _conv1x1(x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    out = torch.einsum("oc,bchw->bohw", conv.weight[:, :, 0, 0], x)
    return out if conv.bias is None else out + conv.bias.view(1, -1, 1, 1)


# --- architecture -------------------------------------------------------------------------------


def test_default_is_the_described_network():
    model = create_model("ca_resnet")
    meta = model.metadata
    assert meta.task == "static" and meta.input.name == "image" and meta.input.shape == (1, 48, 48)
    assert meta.outputs[0].shape == (7,) and meta.label_names == EXPRESSIONS == meta.outputs[0].labels
    assert meta.primary_output == "logits" and meta.mean == (0.5,) and meta.std == (0.5,)
    assert [len(stage) for stage in model.stages] == [2, 2, 2, 2]
    assert all(isinstance(b, CABasicBlock) for stage in model.stages for b in stage)
    assert isinstance(model.attention, HybridAttention) and model.attention.spatial.conv.kernel_size == (7, 7)
    assert model.stem[0].kernel_size == (3, 3) and model.stem[0].stride == (1, 1)
    assert isinstance(model.final_act, nn.PReLU) and model.drop_rate == 0.3
    assert model.num_features == 512 and model.fc.out_features == 7
    model.eval()
    with torch.no_grad():
        assert model.forward_features(torch.rand(2, 1, 48, 48)).shape == (2, 512, 3, 3)


def test_resnet34_depth_and_input_downsampling():
    deep = create_model("ca_resnet", layers=[3, 4, 6, 3], width=4)
    assert [len(stage) for stage in deep.stages] == [3, 4, 6, 3]
    assert deep.metadata.extra["layers"] == (3, 4, 6, 3)
    small = create_model("ca_resnet", width=4, downsample_input=True).eval()
    assert small.metadata.input.shape == (1, 48, 48)  # served input is unchanged
    with torch.no_grad():
        # 48 -> 24 by the input down-sample, then 12 -> 12, 6, 3, 2 through pool + stages
        assert small.forward_features(torch.rand(1, 1, 48, 48)).shape == (1, 32, 2, 2)
        assert small(torch.rand(3, 1, 48, 48)).shape == (3, 7)


def test_kaiming_initialisation():
    model = create_model("ca_resnet", width=16)
    conv = model.stages[1][0].conv1  # fan_out = 32 * 9
    assert conv.weight.std().item() == pytest.approx(math.sqrt(2.0 / (32 * 9)), rel=0.1)
    assert torch.all(model.fc.bias == 0)


@pytest.mark.parametrize(
    "kwargs",
    [dict(layers=[2, 2, 2]), dict(layers=[2, 0, 2, 2]), dict(drop_rate=1.0), dict(img_size=4), dict(width=0)],
)
def test_bad_configuration_is_a_value_error(kwargs):
    with pytest.raises(ValueError):
        create_model("ca_resnet", **kwargs)


def test_platform_checks_on_a_tiny_network(tmp_path):
    model = create_model("ca_resnet", **TINY)
    check_forward(model)
    labels = torch.tensor([0, 3, 5, 6])
    check_every_parameter_gets_gradient(model, lambda out: FocalLoss(gamma=2.0)(out, {"label": labels}))
    assert check_onnx_export(model, tmp_path) <= 1e-4


def test_onnx_export_with_input_downsampling(tmp_path):
    model = create_model("ca_resnet", width=4, img_size=32, downsample_input=True)
    assert check_onnx_export(model, tmp_path) <= 1e-4


def test_reset_classifier_updates_outputs_and_metadata():
    model = create_model("ca_resnet", **TINY)
    model.reset_classifier(3)
    assert model.metadata.outputs[0].shape == (3,) and model.metadata.label_names == ("class_0", "class_1", "class_2")
    assert check_forward(model)["logits"].shape == (2, 3)
    model.eval()
    x = model.example_input(2)
    with torch.no_grad():
        pooled = model.forward_head(model.forward_features(x), pre_logits=True)
    assert pooled.shape == (2, model.num_features)


# --- attention mechanisms against direct implementations ----------------------------------------


def test_hybrid_attention_is_input_times_fused_attention():
    torch.manual_seed(3)
    ham = HybridAttention(channels=32).eval()
    _randomise_batch_norm(ham)
    x = torch.randn(2, 32, 6, 5)
    with torch.no_grad():
        # channel attention: shared MLP on the average- and max-pooled descriptors
        mlp1, mlp2 = ham.channel.mlp[0].weight[:, :, 0, 0], ham.channel.mlp[2].weight[:, :, 0, 0]
        avg, mx = x.mean(dim=(2, 3)), x.flatten(2).max(dim=2).values
        mc = torch.sigmoid(F.relu(avg @ mlp1.T) @ mlp2.T + F.relu(mx @ mlp1.T) @ mlp2.T)[:, :, None, None]
        # spatial attention: 7x7 conv over [channel mean; channel max]
        pooled = torch.stack([x.mean(dim=1), x.max(dim=1).values], dim=1)
        ms = torch.sigmoid(F.conv2d(pooled, ham.spatial.conv.weight, ham.spatial.conv.bias, padding=3))
        fused = torch.sigmoid(_bn_eval(_conv1x1(torch.cat([x * mc, x * ms], dim=1), ham.fuse[0]), ham.fuse[1]))
        expected = F.relu(x * fused)
        attention = ham.attention(x)
        out = ham(x)
    assert mc.shape == (2, 32, 1, 1) and ms.shape == (2, 1, 6, 5) and attention.shape == x.shape
    assert torch.all((attention > 0) & (attention < 1))
    torch.testing.assert_close(attention, fused, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)


def _hardswish(x: torch.Tensor) -> torch.Tensor:
    return x * torch.clamp(x + 3.0, 0.0, 6.0) / 6.0


def test_coordinate_attention_pools_each_axis_and_reweights():
    torch.manual_seed(4)
    ca = CoordinateAttention(channels=16, reduction=4, min_hidden=2).eval()
    _randomise_batch_norm(ca)
    batch, channels, height, width = 2, 16, 5, 3  # non-square, so swapped axes would fail
    x = torch.randn(batch, channels, height, width)
    with torch.no_grad():
        a_h, a_w = ca.weights(x)
        out = ca(x)
        # loop over rows / columns: the descriptor of row h is the mean over its W pixels, and so on
        rows = torch.stack([x[:, :, h, :].mean(dim=-1) for h in range(height)], dim=2)  # (B, C, H)
        cols = torch.stack([x[:, :, :, w].mean(dim=-1) for w in range(width)], dim=2)  # (B, C, W)
        both = torch.cat([rows, cols], dim=2)[..., None]  # (B, C, H + W, 1)
        mixed = _hardswish(_bn_eval(_conv1x1(both, ca.reduce[0]), ca.reduce[1]))
        expected_h = torch.sigmoid(_conv1x1(mixed[:, :, :height], ca.conv_h))  # (B, C, H, 1)
        expected_w = torch.sigmoid(_conv1x1(mixed[:, :, height:], ca.conv_w))[..., 0][:, :, None, :]  # (B, C, 1, W)
        expected = torch.empty_like(x)
        for h in range(height):
            for w in range(width):
                expected[:, :, h, w] = x[:, :, h, w] * expected_h[:, :, h, 0] * expected_w[:, :, 0, w]
    assert a_h.shape == (batch, channels, height, 1) and a_w.shape == (batch, channels, 1, width)
    assert ca.reduce[0].out_channels == 4
    torch.testing.assert_close(a_h, expected_h, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(a_w, expected_w, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)


def test_ca_basic_block_reweights_the_residual_branch():
    torch.manual_seed(5)
    block = CABasicBlock(8, 16, stride=2).eval()
    _randomise_batch_norm(block)
    x = torch.randn(2, 8, 9, 7)
    with torch.no_grad():
        branch = block.bn2(block.conv2(F.relu(block.bn1(block.conv1(x)))))
        expected = F.relu(block.coord(branch) + block.downsample(x))
        out = block(x)
    assert out.shape == (2, 16, 5, 4)
    torch.testing.assert_close(out, expected)
    assert not torch.allclose(block.coord(branch), branch)  # the attention does re-weight


# --- focal loss ------------------------------------------------------------------------------------


def _focal_loop(logits, target, gamma, alpha=None, smoothing=0.0):
    """The formula written out per sample and class: Σ_k q_k α_k (1 - p_k)^γ (-log p_k), averaged."""
    n, k = logits.shape
    total = 0.0
    for i in range(n):
        z = [float(v) for v in logits[i]]
        top = max(z)
        log_norm = top + math.log(sum(math.exp(v - top) for v in z))
        for c in range(k):
            q = (1.0 - smoothing) * (c == int(target[i])) + smoothing / k
            log_p = z[c] - log_norm
            a = 1.0 if alpha is None else (alpha if isinstance(alpha, float) else alpha[c])
            total += q * a * (1.0 - math.exp(log_p)) ** gamma * (-log_p)
    return total / n


@pytest.mark.parametrize("smoothing", [0.0, 0.1, 0.3])
def test_focal_with_gamma_zero_and_no_alpha_is_cross_entropy(smoothing):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(64, 7, generator=g, dtype=torch.float64) * 3
    target = torch.randint(0, 7, (64,), generator=g)
    ce = F.cross_entropy(logits, target, label_smoothing=smoothing)
    assert focal_loss(logits, target, gamma=0.0, label_smoothing=smoothing).item() == pytest.approx(ce.item(), rel=1e-12)
    logits32 = logits.float()
    torch.testing.assert_close(
        focal_loss(logits32, target, gamma=0.0, label_smoothing=smoothing),
        F.cross_entropy(logits32, target, label_smoothing=smoothing), rtol=1e-6, atol=0.0,
    )


@pytest.mark.parametrize("smoothing", [0.0, 0.2])
@pytest.mark.parametrize("alpha", [None, 0.25, (0.5, 2.0, 1.0, 0.7, 1.5, 0.3, 1.2)])
def test_focal_matches_a_loop_over_the_formula(alpha, smoothing):
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(16, 7, generator=g, dtype=torch.float64) * 2
    target = torch.randint(0, 7, (16,), generator=g)
    got = focal_loss(logits, target, gamma=2.0, alpha=alpha, label_smoothing=smoothing)
    assert got.item() == pytest.approx(_focal_loop(logits, target, 2.0, alpha, smoothing), rel=1e-10)


def test_focal_down_weights_easy_examples_and_keeps_finite_gradients():
    logits = torch.tensor([[12.0, 0.0, 0.0], [0.2, 0.0, 0.1]], requires_grad=True)
    target = torch.tensor([0, 0])
    per_sample_ce = F.cross_entropy(logits, target, reduction="none")
    per_sample_fl = focal_loss(logits, target, gamma=2.0, reduction="none")
    ratio = per_sample_fl / per_sample_ce
    assert ratio[0] < 1e-8 < ratio[1] < 1.0  # the confident sample almost vanishes
    per_sample_fl.sum().backward()
    assert torch.isfinite(logits.grad).all()


def test_focal_loss_module_reads_the_output_and_target_dicts():
    logits = torch.randn(5, 7)
    target = torch.tensor([0, 1, 2, 3, 4])
    alpha = [1.0, 2.0, 1.0, 1.0, 0.5, 1.0, 1.0]
    module = FocalLoss(gamma=1.5, alpha=alpha, label_smoothing=0.1, form="target")
    expected = focal_loss(logits, target, 1.5, torch.tensor(alpha), 0.1)
    torch.testing.assert_close(module({"logits": logits}, {"label": target}), expected)
    assert "alpha" in dict(module.named_buffers())


@pytest.mark.parametrize(
    "kwargs", [dict(gamma=-1.0), dict(label_smoothing=1.0), dict(alpha=[1.0, 2.0]), dict(reduction="avg")]
)
def test_focal_rejects_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        focal_loss(torch.randn(4, 7), torch.zeros(4, dtype=torch.long), **kwargs)


def _method_focal_by_hand(logits, target, gamma, alpha, smoothing=0.0):
    """−Σ_i Σ_c [α(1−p)^γ y ln p + (1−α) p^γ (1−y) ln(1−p)] with p from a hand-written softmax."""
    n, k = logits.shape
    total = 0.0
    for i in range(n):
        z = [float(v) for v in logits[i]]
        e = [math.exp(v - max(z)) for v in z]
        for c in range(k):
            p = e[c] / sum(e)
            y = (1.0 - smoothing) * (c == int(target[i])) + smoothing / k
            total -= alpha * (1 - p) ** gamma * y * math.log(p) + (1 - alpha) * p**gamma * (1 - y) * math.log(1 - p)
    return total


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize("gamma, alpha", [(0.0, 0.5), (2.0, 0.25), (5.0, 1.0), (1.5, 0.0)])
def test_method_focal_matches_a_hand_computation(gamma, alpha, smoothing):
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(6, 4, generator=g, dtype=torch.float64) * 2
    target = torch.randint(0, 4, (6,), generator=g)
    got = method_focal_loss(logits, target, gamma=gamma, alpha=alpha, label_smoothing=smoothing)
    assert got.item() == pytest.approx(_method_focal_by_hand(logits, target, gamma, alpha, smoothing), rel=1e-10)
    mean = method_focal_loss(logits, target, gamma, alpha, smoothing, reduction="mean")
    assert mean.item() == pytest.approx(got.item() / 6, rel=1e-12)  # "sum" is Σ_i, "mean" its average


def test_method_focal_two_numbers_by_hand():
    # z = (0, ln 3): p = (1/4, 3/4); target 1, γ = 1, α = 0.5:
    # −[0.5·(1/4)·ln(3/4)] − [0.5·(1/4)·ln(3/4)] = −0.25·ln 0.75
    logits = torch.tensor([[0.0, math.log(3.0)]], dtype=torch.float64)
    got = method_focal_loss(logits, torch.tensor([1]), gamma=1.0, alpha=0.5)
    assert got.item() == pytest.approx(-0.25 * math.log(0.75), rel=1e-12)


def test_method_focal_stays_finite_for_confident_logits_and_is_the_module_default():
    logits = torch.tensor([[60.0, 0.0, 0.0], [0.0, 0.0, 0.0]], requires_grad=True)
    target = torch.tensor([1, 2])
    loss = FocalLoss(gamma=2.0, alpha=0.25)({"logits": logits}, {"label": target})  # form="method"
    assert torch.isfinite(loss)
    loss.backward()
    assert torch.isfinite(logits.grad).all()
    assert loss.item() == pytest.approx(method_focal_loss(logits.detach(), target, 2.0, 0.25).item())


@pytest.mark.parametrize("kwargs", [dict(gamma=5.5), dict(alpha=1.2), dict(alpha=[0.2, 0.3]), dict(gamma=-0.1)])
def test_method_focal_rejects_values_outside_the_method_ranges(kwargs):
    with pytest.raises(ValueError):
        FocalLoss(**kwargs)
    with pytest.raises(ValueError):
        method_focal_loss(torch.randn(4, 3), torch.zeros(4, dtype=torch.long), **kwargs)


# --- learning ----------------------------------------------------------------------------------------


def _grey(images) -> torch.Tensor:
    """uint8 (N, H, W, 3) RGB -> float (N, 1, H, W) grey, normalised with the model's mean/std 0.5."""
    grey = torch.from_numpy(images).float().mean(dim=-1, keepdim=True).permute(0, 3, 1, 2) / 255.0
    return (grey - 0.5) / 0.5


@pytest.mark.slow
def test_ca_resnet_learns_expressions_of_unseen_subjects():
    from fer_core.data.synthfacs import SynthFACS
    from tests.learning import epochs, fit

    torch.set_num_threads(1)
    gen = SynthFACS(seed=0, image_size=48, difficulty=0.0)
    train = gen.expression_set(840, num_subjects=40)
    test = gen.expression_set(280, num_subjects=10, first_subject=100)  # subjects never seen in training
    x_train, y_train = _grey(train.images), torch.from_numpy(train.labels)
    x_test, y_test = _grey(test.images), torch.from_numpy(test.labels)

    model = create_model("ca_resnet", width=8, downsample_input=True)  # 48x48 input, 24x24 inside
    losses = fit(model, FocalLoss(gamma=2.0), epochs(x_train, {"label": y_train}, batch_size=32), steps=250)
    model.eval()
    with torch.no_grad():
        accuracy = (model(x_test).argmax(dim=1) == y_test).float().mean().item()
    chance = 1.0 / len(EXPRESSIONS)
    print(f"ca_resnet held-out accuracy {accuracy:.3f}, loss {losses[0]:.3f} -> {losses[-1]:.3f}")
    # measured 0.675 on held-out subjects (0.62-0.68 in trials; chance 0.143); demand 3x chance
    assert accuracy >= 3.0 * chance, f"accuracy {accuracy:.3f} on unseen subjects (chance {chance:.3f})"
    assert sum(losses[-20:]) < 0.5 * sum(losses[:20])
