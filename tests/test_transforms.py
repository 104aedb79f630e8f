"""Augmentation: deterministic per generator, shape-preserving, same draw across a clip's frames."""

import dataclasses
import math

import pytest
import torch

from fer_core.data.transforms import AugmentConfig, augment, normalize


def test_same_generator_seed_same_result_and_range():
    x = torch.rand(1, 24, 24)
    cfg = AugmentConfig()
    a = augment(x, torch.Generator().manual_seed(5), cfg)
    b = augment(x, torch.Generator().manual_seed(5), cfg)
    c = augment(x, torch.Generator().manual_seed(6), cfg)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.shape == x.shape and a.min() >= 0 and a.max() <= 1


def test_clip_frames_share_the_geometric_draw():
    frame = torch.rand(1, 16, 16)
    clip = frame.expand(4, 1, 16, 16).clone()
    cfg = AugmentConfig(noise_var=0.0, erase_prob=1.0)
    out = augment(clip, torch.Generator().manual_seed(0), cfg)
    assert all(torch.allclose(out[0], out[t]) for t in range(4))


def test_no_augmentation_is_identity_and_flip_flips():
    x = torch.rand(3, 8, 8)
    assert torch.equal(augment(x, torch.Generator().manual_seed(0), AugmentConfig.none()), x)
    flips = AugmentConfig.none().__class__(**{**AugmentConfig.none().__dict__, "hflip": True})
    outs = [augment(x, torch.Generator().manual_seed(s), flips) for s in range(8)]
    assert any(torch.equal(o, x.flip(-1)) for o in outs) and any(torch.equal(o, x) for o in outs)


def test_normalize():
    x = torch.full((2, 4, 4), 0.5)
    assert torch.allclose(normalize(x, (0.5, 0.25), (0.5, 0.25)), torch.tensor([0.0, 1.0]).view(2, 1, 1).expand(2, 4, 4))


def _only(**kwargs) -> AugmentConfig:
    return dataclasses.replace(AugmentConfig.none(), **kwargs)


def test_vertical_flip_and_fixed_gamma():
    x = torch.rand(3, 8, 8)
    seen_v, seen_g = set(), set()
    for seed in range(20):
        out = augment(x, torch.Generator().manual_seed(seed), _only(vflip=True))
        assert torch.allclose(out, x) or torch.allclose(out, x.flip(-2))
        seen_v.add(bool(torch.allclose(out, x)))
        out = augment(x, torch.Generator().manual_seed(seed), _only(gamma=2.0, gamma_prob=0.5))
        assert torch.allclose(out, x) or torch.allclose(out, x**2)  # exactly gamma 2 or untouched
        seen_g.add(bool(torch.allclose(out, x)))
    assert seen_v == seen_g == {True, False}


def test_rotation_range_draws_a_magnitude_between_its_ends():
    # a centred bright dot: rotating by angle a moves it to an angle a around the centre
    x = torch.zeros(1, 65, 65)
    x[0, 32, 52] = 1.0  # 20 px right of the centre
    angles = []
    for seed in range(12):
        out = augment(x, torch.Generator().manual_seed(seed), _only(rotation_range=(30.0, 90.0)))
        ys, xs = torch.nonzero(out[0] > 0.05 * out.max(), as_tuple=True)
        w = out[0, ys, xs]
        cy, cx = float((ys * w).sum() / w.sum()) - 32, float((xs * w).sum() / w.sum()) - 32
        angles.append(abs(math.degrees(math.atan2(cy, cx))))
    assert all(28.0 <= a <= 92.0 for a in angles), angles
    with pytest.raises(ValueError):
        AugmentConfig.from_mapping({"rotation_span": [1, 2]})


def test_random_greyscale_is_bt601_luma_in_every_channel_and_skips_grey_inputs():
    x = torch.rand(3, 6, 6)
    luma = 0.299 * x[0] + 0.587 * x[1] + 0.114 * x[2]  # hand computation
    seen = set()
    for seed in range(20):
        out = augment(x, torch.Generator().manual_seed(seed), _only(greyscale_prob=0.5))
        grey = all(torch.allclose(out[c], luma, atol=1e-6) for c in range(3))
        assert grey or torch.allclose(out, x)
        seen.add(grey)
    assert seen == {True, False}
    one = torch.rand(1, 6, 6)  # a grey model input is left alone
    assert torch.allclose(augment(one, torch.Generator().manual_seed(0), _only(greyscale_prob=1.0)), one)


def test_square_crop_of_fixed_area_is_the_method_s_224_of_256():
    # crop_area (224/256)^2 with ratio (1, 1): every crop keeps 224/256 of each side, at a random offset
    x = torch.zeros(1, 256, 256)
    x[0, :, 128:] = 1.0
    cfg = _only(crop_area=((224 / 256) ** 2, (224 / 256) ** 2), crop_ratio=(1.0, 1.0))
    for seed in range(5):
        out = augment(x, torch.Generator().manual_seed(seed), cfg)
        edge = int((out[0, 128] > 0.5).float().argmax())  # where the step lands after the zoom
        # the step at column 128 of the source moves by at most the crop's slack, scaled by 256/224
        assert abs(edge - 128) <= (256 - 224) / 2 * 256 / 224 + 2, edge
    assert AugmentConfig.from_mapping({"crop_ratio": [1, 1]}).crop_ratio == (1, 1)
