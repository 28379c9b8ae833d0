"""Batched on-device augmentation: shapes, ranges, determinism, and exact results on crafted inputs."""

import math

import pytest

torch = pytest.importorskip("torch")

from histobench.pretrain.augment import (  # noqa: E402
    MultiCropAugment,
    color_jitter,
    gaussian_blur,
    normalize,
    random_grayscale,
    random_resized_crop,
    solarize,
)


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def images(b=8, size=32, seed=0):
    return torch.randint(0, 256, (b, 3, size, size), dtype=torch.uint8, generator=gen(seed))


def test_multicrop_shapes_dtypes_and_normalisation():
    aug = MultiCropAugment(global_size=32, local_size=16, n_global=2, n_local=3)
    views = aug(images(5, 40), gen())
    assert [tuple(v.shape) for v in views] == [(5, 3, 32, 32)] * 2 + [(5, 3, 16, 16)] * 3
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in views)
    mean = torch.tensor(aug.mean).view(1, 3, 1, 1)
    std = torch.tensor(aug.std).view(1, 3, 1, 1)
    for v in views:  # un-normalised pixels lie in [0, 1]
        pixels = v * std + mean
        assert pixels.min() >= -1e-5 and pixels.max() <= 1 + 1e-5


def test_crop_output_range_and_dtype():
    out = random_resized_crop(images(), 24, generator=gen())
    assert out.shape == (8, 3, 24, 24) and out.dtype == torch.float32
    assert 0 <= out.min() and out.max() <= 1


def test_determinism_under_a_fixed_generator():
    aug = MultiCropAugment(global_size=24, local_size=12, n_local=2)
    x = images()
    a, b, c = aug(x, gen(1)), aug(x, gen(1)), aug(x, gen(2))
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    assert not torch.equal(a[0], c[0])


def test_samples_get_different_crops():
    x = images(1, 32).repeat(6, 1, 1, 1)
    out = random_resized_crop(x, 16, scale=(0.1, 0.5), generator=gen())
    flat = out.flatten(1)
    assert all(not torch.allclose(flat[i], flat[j]) for i in range(6) for j in range(i + 1, 6))


def test_flips_of_a_full_crop_are_exact():
    x = images(4, 16)
    xf = x.float() / 255
    h = random_resized_crop(x, 16, scale=(1, 1), ratio=(1, 1), hflip=1.0, generator=gen())
    v = random_resized_crop(x, 16, scale=(1, 1), ratio=(1, 1), hflip=0.0, vflip=1.0, generator=gen())
    same = random_resized_crop(x, 16, scale=(1, 1), ratio=(1, 1), hflip=0.0, generator=gen())
    assert torch.allclose(h, xf.flip(-1), atol=1e-5)
    assert torch.allclose(v, xf.flip(-2), atol=1e-5)
    assert torch.allclose(same, xf, atol=1e-5)


def test_rotations_are_exact_quarter_turns_and_all_occur():
    x = images(1, 16).repeat(64, 1, 1, 1)
    xf = x.float() / 255
    out = random_resized_crop(x, 16, scale=(1, 1), ratio=(1, 1), hflip=0.0, rot90=True, generator=gen())
    seen = set()
    for i in range(64):
        ks = [k for k in range(4) if torch.allclose(out[i], torch.rot90(xf[i], k, dims=(1, 2)), atol=1e-5)]
        assert len(ks) == 1, f"sample {i} is not a quarter turn of its input"
        seen.add(ks[0])
    assert seen == {0, 1, 2, 3}


def test_grayscale():
    x = images()
    g = random_grayscale(x, p=1.0, generator=gen())
    assert torch.equal(g[:, 0], g[:, 1]) and torch.equal(g[:, 1], g[:, 2])
    xf = x.float() / 255
    luma = 0.299 * xf[:, 0] + 0.587 * xf[:, 1] + 0.114 * xf[:, 2]
    assert torch.allclose(g[:, 0], luma, atol=1e-6)
    assert torch.equal(random_grayscale(x, p=0.0, generator=gen()), xf)


def test_blur_keeps_the_mean_and_smooths():
    x = images(6, 32)
    xf = x.float() / 255
    b = gaussian_blur(x, p=1.0, sigma=(1.0, 2.0), generator=gen())
    assert b.shape == x.shape
    assert torch.allclose(b.mean(dim=(1, 2, 3)), xf.mean(dim=(1, 2, 3)), atol=5e-3)
    assert (b.std(dim=(1, 2, 3)) < 0.6 * xf.std(dim=(1, 2, 3))).all()
    flat = torch.full((2, 3, 16, 16), 0.3)
    assert torch.allclose(gaussian_blur(flat, p=1.0, generator=gen()), flat, atol=1e-6)
    assert torch.equal(gaussian_blur(x, p=0.0, generator=gen()), xf)


def test_blur_sigma_is_per_sample():
    x = images(1, 32).repeat(8, 1, 1, 1)
    b = gaussian_blur(x, p=1.0, sigma=(0.1, 3.0), generator=gen())
    stds = b.std(dim=(1, 2, 3))
    assert stds.max() - stds.min() > 0.02


def test_solarize_inverts_values_above_the_threshold():
    x = torch.tensor([0.2, 0.5, 0.6, 1.0]).view(1, 1, 1, 4).expand(2, 3, 1, 4)
    out = solarize(x, p=1.0, generator=gen())
    assert torch.allclose(out[0, 0, 0], torch.tensor([0.2, 0.5, 0.4, 0.0]))
    assert torch.equal(solarize(x, p=0.0, generator=gen()), x)


def test_color_jitter():
    x = images()
    xf = x.float() / 255
    assert torch.equal(color_jitter(x, p=0.0, generator=gen()), xf)
    y = color_jitter(x, p=1.0, generator=gen())
    assert y.shape == x.shape and 0 <= y.min() and y.max() <= 1
    assert all(not torch.allclose(y[i], xf[i]) for i in range(len(x)))
    # brightness only: every sample is its input scaled by one factor in [0.6, 1.4]
    dim = torch.full((4, 3, 8, 8), 0.5)
    b = color_jitter(dim, brightness=0.4, contrast=0, saturation=0, hue=0, p=1.0, generator=gen())
    factors = b.flatten(1) / 0.5
    assert torch.allclose(factors, factors[:, :1].expand_as(factors), atol=1e-6)
    assert ((factors >= 0.6 - 1e-6) & (factors <= 1.4 + 1e-6)).all()
    # hue rotation and saturation leave gray pixels gray
    gray = torch.full((4, 3, 8, 8), 0.4)
    h = color_jitter(gray, brightness=0, contrast=0, saturation=0.5, hue=0.5, p=1.0, generator=gen())
    assert torch.allclose(h, gray, atol=1e-5)


def test_normalize():
    x = torch.full((1, 3, 2, 2), 255, dtype=torch.uint8)
    out = normalize(x, mean=(0.5, 0.5, 0.5), std=(0.25, 0.5, 1.0))
    assert torch.allclose(out[0, :, 0, 0], torch.tensor([2.0, 1.0, 0.5]))


def test_multicrop_first_global_view_is_always_blurred():
    aug = MultiCropAugment(global_size=32, local_size=16, n_local=0, global_scale=(1, 1), ratio=(1, 1),
                           jitter_p=0.0, grayscale_p=0.0, blur_sigma=(2.0, 2.0), rotations=False, hflip=0.0,
                           global_blur_p=(1.0, 0.0), global_solarize_p=(0.0, 0.0), mean=(0, 0, 0), std=(1, 1, 1))
    x = images(4, 32)
    g1, g2 = aug(x, gen())
    assert torch.allclose(g2, x.float() / 255, atol=1e-5)
    assert (g1.std(dim=(1, 2, 3)) < 0.6 * g2.std(dim=(1, 2, 3))).all()
    assert math.isclose(float(g1.mean()), float(g2.mean()), abs_tol=5e-3)


def test_views_stay_float32_under_bf16_autocast():
    aug = MultiCropAugment(global_size=16, local_size=8, n_local=1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        views = aug(images(2, 16), gen())
    assert all(v.dtype == torch.float32 for v in views)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_the_gpu_with_a_device_generator():
    x = images(4, 32).cuda()
    aug = MultiCropAugment(global_size=24, local_size=12, n_local=2)
    a = aug(x, torch.Generator(device="cuda").manual_seed(0))
    b = aug(x, torch.Generator(device="cuda").manual_seed(0))
    assert all(v.is_cuda and v.dtype == torch.float32 for v in a)
    assert all(torch.equal(u, v) for u, v in zip(a, b))
