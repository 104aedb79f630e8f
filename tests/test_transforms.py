"""Augmentation: deterministic per generator, shape-preserving, same draw across a clip's frames."""

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
