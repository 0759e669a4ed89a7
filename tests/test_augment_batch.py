"""Batched augmentation (training at scale augments on the GPU): the same transformations as the per-image
`augment`, each image with its own draw, empty view slots left empty."""

from __future__ import annotations

import torch

from cxrlt.data.transforms import affine_augment, augment_batch


def smooth(n=3, h=40, w=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    y, x = torch.meshgrid(torch.linspace(0, 3, h), torch.linspace(0, 2, w), indexing="ij")
    base = torch.sin(x * 2 + y)[None, None]
    return base.repeat(n, 3, 1, 1) + 0.1 * torch.rand(n, 3, 1, 1, generator=g)


def u_of(scale=1.0, cx=0.5, cy=0.5, flip=False, contrast=1.0, brightness=0.0):
    """The uniform draws that give these parameters (inverse of affine_augment's mapping)."""
    return torch.tensor([[(scale - 0.9) / 0.1, cx, cy, 0.25 if flip else 0.75, (contrast - 0.8) / 0.4,
                          brightness / 0.4 + 0.5]])


def test_identity_flip_and_intensity_are_exact():
    x = smooth(1)
    torch.testing.assert_close(affine_augment(x, u_of()), x, atol=1e-5, rtol=0)
    torch.testing.assert_close(affine_augment(x, u_of(flip=True)), x.flip(-1), atol=1e-5, rtol=0)
    torch.testing.assert_close(affine_augment(x, u_of(contrast=1.1, brightness=-0.1)), x * 1.1 - 0.1,
                               atol=1e-5, rtol=0)


def test_crop_matches_crop_then_resize():
    x = smooth(1, 100, 100)
    # a centred crop of 0.9 of the side, resized back: what `augment` does with its interpolate
    crop = x[:, :, 5:95, 5:95]
    ref = torch.nn.functional.interpolate(crop, size=(100, 100), mode="bilinear", align_corners=False)
    got = affine_augment(x, u_of(scale=0.9))
    assert (got - ref).abs().max() < 0.02  # bilinear on a smooth picture: same crop, same scale


def test_batch_draws_per_image_masks_empty_slots_and_is_reproducible():
    imgs = smooth(2 * 3).reshape(2, 3, 3, 40, 32)
    imgs[0, 0] = imgs[0, 1]  # two identical images in one study still get their own draws
    mask = torch.tensor([[True, True, False], [True, False, False]])
    imgs[~mask] = 0
    a = augment_batch(imgs, mask, torch.Generator().manual_seed(3))
    b = augment_batch(imgs, mask, torch.Generator().manual_seed(3))
    torch.testing.assert_close(a, b)
    assert torch.all(a[~mask] == 0)
    assert not torch.allclose(a[0, 0], a[0, 1])
    assert a.shape == imgs.shape and a.dtype == imgs.dtype
