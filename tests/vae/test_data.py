"""Specification of ImageSet and binarize: how batches are drawn under each binarization."""

import pickle

import pytest
import torch

from vae.data import ImageSet, binarize

PIXELS = torch.tensor([0, 63, 127, 128, 191, 255], dtype=torch.uint8).repeat(2, 1).reshape(2, 2, 3)  # [N=2, H=2, W=3]
LABELS = torch.tensor([3, 7])


def test_binarize_scales_uint8_to_0_1_and_adds_the_channel_dimension():
    images = binarize(PIXELS, LABELS, "none")
    assert images.pixels.shape == (2, 1, 2, 3) and images.pixels.dtype == torch.float32
    assert images.pixels[0].flatten().tolist() == pytest.approx([0, 63 / 255, 127 / 255, 128 / 255, 191 / 255, 1])
    assert images.labels.dtype == torch.int64 and not images.resample


def test_threshold_keeps_pixels_at_or_above_one_half():
    assert binarize(PIXELS, LABELS, "threshold").pixels[0].flatten().tolist() == [0, 0, 0, 1, 1, 1]


def test_dynamic_batches_are_fresh_bernoulli_draws_with_the_pixel_probabilities():
    probabilities = torch.tensor([0.0, 0.1, 0.5, 0.9, 1.0]).reshape(1, 1, 1, 5).expand(40_000, 1, 1, 5).contiguous()
    images = ImageSet(probabilities, torch.zeros(40_000, dtype=torch.long), resample=True)
    generator = torch.Generator().manual_seed(0)
    first, second = images.batch(slice(None), generator), images.batch(slice(None), generator)
    assert set(first.unique().tolist()) == {0.0, 1.0} and not torch.equal(first, second)
    torch.testing.assert_close(first.mean(0).flatten(), torch.tensor([0.0, 0.1, 0.5, 0.9, 1.0]), atol=0.01, rtol=0)


def test_same_generator_seed_gives_the_same_dynamic_batch():
    images = binarize(PIXELS, LABELS, "dynamic")
    a = images.batch(torch.tensor([1, 0]), torch.Generator().manual_seed(4))
    b = images.batch(torch.tensor([1, 0]), torch.Generator().manual_seed(4))
    assert torch.equal(a, b)


@pytest.mark.parametrize("index", [torch.tensor([1, 0, 1]), torch.tensor([1, 0, 1], dtype=torch.int32), torch.tensor([False, True]), slice(1, None)])
def test_a_dynamic_batch_is_the_images_at_the_index_each_pixel_one_where_a_uniform_draw_falls_below_it(index):
    # The draw every logged run was trained with: one uniform per pixel, in the batch's order, from the generator.
    images = binarize(PIXELS, LABELS, "dynamic")
    expected_pixels = images.pixels[index]
    uniforms = torch.rand(expected_pixels.shape, generator=torch.Generator().manual_seed(4))
    batch = images.batch(index, torch.Generator().manual_seed(4))
    assert batch.dtype == torch.float32 and torch.equal(batch, (uniforms < expected_pixels).float())
    assert torch.equal(binarize(PIXELS, LABELS, "none").batch(index), expected_pixels)


def test_fixed_draws_one_binarization_for_good_and_leaves_other_sets_alone():
    dynamic = binarize(PIXELS, LABELS, "dynamic")
    fixed = dynamic.fixed(seed=9)
    assert not fixed.resample and torch.equal(fixed.pixels, dynamic.fixed(seed=9).pixels)
    assert torch.equal(fixed.batch(slice(None)), fixed.batch(slice(None)))
    static = binarize(PIXELS, LABELS, "static", seed=9)
    assert static.fixed(seed=1) is static


def test_subset_and_to_keep_labels_aligned():
    images = binarize(PIXELS, LABELS, "none")
    assert images.subset(torch.tensor([1])).labels.tolist() == [7]
    assert images.to("cpu").labels.tolist() == [3, 7]


def test_malformed_image_sets_are_rejected():
    with pytest.raises(ValueError, match="pixels must be float32 of shape"):
        ImageSet(torch.zeros(2, 28, 28), torch.zeros(2))
    with pytest.raises(ValueError, match=r"labels must have shape \(2,\)"):
        ImageSet(torch.zeros(2, 1, 28, 28), torch.zeros(3))
    with pytest.raises(ValueError, match="unknown binarization 'otsu'"):
        binarize(PIXELS, LABELS, "otsu")


@pytest.mark.parametrize("mode", ["none", "threshold", "static", "dynamic"])
def test_an_image_set_of_idx_images_pickles_as_bytes_and_comes_back_bit_identical(mode):
    pixels = torch.randint(0, 256, (50, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    images = binarize(pixels, torch.arange(50) % 10, mode, seed=3)
    restored = pickle.loads(pickle.dumps(images))
    assert torch.equal(restored.pixels, images.pixels) and restored.pixels.dtype == torch.float32
    assert torch.equal(restored.labels, images.labels) and restored.resample == images.resample
    assert len(pickle.dumps(images)) < images.pixels.numel() * 1.1  # about a byte a pixel, not four


def test_an_image_set_of_arbitrary_floats_pickles_as_float32():
    images = ImageSet(torch.rand(5, 1, 4, 4, generator=torch.Generator().manual_seed(0)), torch.zeros(5, dtype=torch.long))
    restored = pickle.loads(pickle.dumps(images))
    assert torch.equal(restored.pixels, images.pixels)
