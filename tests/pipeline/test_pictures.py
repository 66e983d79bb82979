"""Specification of the run's pictures: grids, fixed-z samples, GIFs, reconstructions, latent plots, loss curves."""

import io

import numpy as np
import pytest
import torch
from matplotlib import _pylab_helpers
from PIL import Image

from pipeline.pictures import (
    PAD_VALUE,
    animated_gif,
    class_examples,
    fixed_latents,
    grid_shape,
    image_grid,
    latent_manifold,
    latent_projection,
    latent_scatter,
    loss_curves,
    principal_components,
    prior_latents,
    prior_samples,
    reconstructions,
)
from pipeline.data import DATASETS
from vae.config import ModelConfig
from vae.data import ImageSet
from vae.models import build_model

CLASS_NAMES = DATASETS["fashion-mnist"].class_names
GREY = round(PAD_VALUE * 255)


def tiny_model(latent_dim: int) -> torch.nn.Module:
    return build_model(ModelConfig(architecture="mlp", hidden_dims=(16,), latent_dim=latent_dim), seed=0)


def images(per_class: int = 5, seed: int = 0) -> ImageSet:
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(10).repeat(per_class)
    return ImageSet(torch.rand(len(labels), 1, 28, 28, generator=generator), labels)


def history(epochs: int, validation: bool = True, kl_weight: float = 1.0) -> list[dict[str, float]]:
    entries = []
    for epoch in range(1, epochs + 1):
        entry = {
            "train_reconstruction_nats": 200.0 / epoch,
            "train_kl_nats": 10.0 + epoch,
            "kl_weight": kl_weight,
        }
        entry["train_elbo_nats"] = -(entry["train_reconstruction_nats"] + entry["train_kl_nats"])
        entry["train_loss"] = entry["train_reconstruction_nats"] + kl_weight * entry["train_kl_nats"]
        if validation:
            entry |= {"val_reconstruction_nats": 210.0 / epoch, "val_kl_nats": 11.0 + epoch}
            entry["val_elbo_nats"] = -(entry["val_reconstruction_nats"] + entry["val_kl_nats"])
        entries.append(entry)
    return entries


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image)


def assert_readable_figure(image: Image.Image, min_width: int = 400, min_height: int = 400) -> None:
    assert image.mode == "RGB"
    assert image.width >= min_width and image.height >= min_height
    assert (pixels(image) < 128).any(axis=2).mean() > 0.005  # dark ink on the white canvas: something was drawn


# --- image_grid ----------------------------------------------------------------------------------------------------


def test_image_grid_is_cells_plus_padding_times_scale():
    grid = image_grid(torch.zeros(5, 1, 3, 4), rows=2, cols=3, padding=2, scale=2)
    assert grid.mode == "L"
    assert grid.size == (((4 + 2) * 3 + 2) * 2, ((3 + 2) * 2 + 2) * 2)  # (width, height) = (40, 24)


def test_image_grid_places_image_k_at_row_k_div_cols_and_column_k_mod_cols():
    batch = torch.zeros(6, 1, 3, 4)
    batch[4] = 1.0  # row 1, column 1
    grid = pixels(image_grid(batch, rows=2, cols=3, padding=1, scale=1))
    expected = np.full((2 * 4 + 1, 3 * 5 + 1), GREY, dtype=np.uint8)
    for k in range(6):
        top, left = 1 + (k // 3) * 4, 1 + (k % 3) * 5
        expected[top : top + 3, left : left + 4] = 255 if k == 4 else 0
    np.testing.assert_array_equal(grid, expected)


def test_image_grid_scales_by_repeating_each_pixel():
    batch = torch.rand(4, 1, 5, 5, generator=torch.Generator().manual_seed(0))
    small = pixels(image_grid(batch, 2, 2, padding=1, scale=1))
    large = pixels(image_grid(batch, 2, 2, padding=1, scale=3))
    np.testing.assert_array_equal(large, small.repeat(3, axis=0).repeat(3, axis=1))


def test_image_grid_maps_zero_one_to_black_white_and_clamps_outside_values():
    batch = torch.tensor([0.0, 0.5, 1.0, -3.0, 7.0]).reshape(5, 1, 1, 1)
    grid = pixels(image_grid(batch, rows=1, cols=5, padding=0, scale=1))
    np.testing.assert_array_equal(grid, [[0, 128, 255, 0, 255]])


def test_image_grid_leaves_cells_without_an_image_grey():
    grid = pixels(image_grid(torch.zeros(1, 1, 2, 2), rows=1, cols=2, padding=0, scale=1))
    np.testing.assert_array_equal(grid, [[0, 0, GREY, GREY], [0, 0, GREY, GREY]])


def test_image_grid_of_colour_images_is_rgb():
    grid = image_grid(torch.ones(2, 3, 4, 4), rows=1, cols=2, padding=0, scale=1)
    assert grid.mode == "RGB" and grid.size == (8, 4)


def test_image_grid_rejects_more_images_than_cells():
    with pytest.raises(ValueError, match="5 images do not fit a grid of 2 rows and 2 columns"):
        image_grid(torch.zeros(5, 1, 2, 2), rows=2, cols=2)


# --- fixed latents, prior samples, GIF -----------------------------------------------------------------------------


def test_fixed_latents_are_the_same_for_a_seed_and_leave_the_global_rng_alone():
    state = torch.random.get_rng_state()
    z = fixed_latents(16, 2, seed=3)
    assert z.shape == (16, 2)
    assert torch.equal(z, fixed_latents(16, 2, seed=3))
    assert not torch.equal(z, fixed_latents(16, 2, seed=4))
    assert torch.equal(torch.random.get_rng_state(), state)


@pytest.mark.parametrize(("n", "shape"), [(1, (1, 1)), (10, (3, 4)), (16, (4, 4)), (17, (4, 5)), (100, (10, 10))])
def test_grid_shape_is_the_most_nearly_square_grid(n, shape):
    assert grid_shape(n) == shape


def test_prior_samples_decode_the_given_z_into_a_square_grid_deterministically():
    model, z = tiny_model(2), fixed_latents(16, 2)
    grid = prior_samples(model, z)
    assert grid.mode == "L" and grid.size == (((28 + 2) * 4 + 2) * 2,) * 2
    assert grid.tobytes() == prior_samples(model, z).tobytes()
    with torch.no_grad():
        expected = image_grid(torch.sigmoid(model.decode(z)), 4, 4)
    assert grid.tobytes() == expected.tobytes()


def test_prior_latents_are_the_fixed_latents_under_the_standard_normal_prior():
    assert torch.equal(prior_latents(tiny_model(2), 16, seed=3), fixed_latents(16, 2, seed=3))


def test_prior_latents_of_a_learned_prior_are_the_models_prior_drawn_with_the_seed():
    config = ModelConfig(
        stochastic_layers=2, hidden_dims=(16,), latent_dim=3, top_latent_dim=2, prior="vamp", prior_components=5,
    )
    model = build_model(config, seed=0)
    model.train()
    z = prior_latents(model, 16, seed=3)
    assert z.shape == (16, 5) and model.training  # (z1, z2), drawn in eval mode, the flags put back
    with torch.no_grad():
        expected = model.sample_latents(16, torch.Generator().manual_seed(3))
    assert torch.equal(z, expected)
    assert not torch.equal(z, prior_latents(model, 16, seed=4))
    assert prior_samples(model, z).size == (((28 + 2) * 4 + 2) * 2,) * 2


@pytest.mark.parametrize("training", [True, False])
def test_pictures_leave_every_module_training_flag_as_it_was(training):
    model = tiny_model(2)
    model.train(training)
    model.decoder.train(not training)  # a mixed state must come back as it was, module by module
    flags = [module.training for module in model.modules()]
    prior_samples(model, fixed_latents(4, 2))
    reconstructions(model, images(1), CLASS_NAMES, per_class=1)
    latent_manifold(model, n=3)
    latent_scatter(model, images(1), CLASS_NAMES)
    assert [module.training for module in model.modules()] == flags
    assert all(parameter.grad is None for parameter in model.parameters())


def test_animated_gif_has_one_frame_per_picture_loops_forever_and_keeps_the_pixels():
    frames = [Image.fromarray(np.full((6, 8), 40 * k, dtype=np.uint8)) for k in range(5)]
    gif = Image.open(io.BytesIO(animated_gif(frames, duration_ms=250)))
    assert gif.format == "GIF" and gif.n_frames == 5 and gif.size == (8, 6)
    assert gif.info["loop"] == 0 and gif.info["duration"] == 250
    for k in range(5):
        gif.seek(k)
        np.testing.assert_array_equal(pixels(gif.convert("L")), pixels(frames[k]))


def test_animated_gif_captions_each_frame_in_a_strip_above_it():
    frames = [Image.new("L", (244, 244), 0)] * 3  # identical pictures: only the captions tell them apart
    gif = Image.open(io.BytesIO(animated_gif(frames, captions=["epoch 1", "epoch 2", "epoch 3"])))
    assert gif.n_frames == 3
    assert gif.width == 244 and gif.height > 244
    strip = pixels(gif.convert("L"))[: gif.height - 244]
    assert strip.max() == 255 and strip.min() < 128  # white strip, dark text
    assert (pixels(gif.convert("L"))[gif.height - 244 :] == 0).all()  # the picture itself below, untouched


def test_animated_gif_rejects_no_frames_frames_of_different_sizes_and_miscounted_captions():
    with pytest.raises(ValueError, match="at least one frame"):
        animated_gif([])
    with pytest.raises(ValueError, match="same size"):
        animated_gif([Image.new("L", (4, 4)), Image.new("L", (5, 4))])
    with pytest.raises(ValueError, match="2 captions for 1 frames"):
        animated_gif([Image.new("L", (4, 4))], captions=["a", "b"])


# --- reconstructions -----------------------------------------------------------------------------------------------


def test_class_examples_draws_per_class_indices_of_each_present_class_with_a_seed():
    labels = torch.tensor([3, 1, 3, 3, 1, 7, 3, 1])
    classes, index = class_examples(labels, per_class=2, seed=0)
    assert classes.tolist() == [1, 3, 7]
    assert index.shape == (3, 2)
    assert (labels[index[:2]] == classes[:2, None]).all()
    assert index[2].tolist() == [5, -1]  # class 7 has one image: its row is padded with -1
    assert len(set(index[:2].flatten().tolist())) == 4
    assert torch.equal(index, class_examples(labels, per_class=2, seed=0)[1])
    drawn = {tuple(class_examples(labels, per_class=2, seed=seed)[1][1].tolist()) for seed in range(10)}
    assert len(drawn) > 1  # the draw depends on the seed


def test_reconstructions_show_one_labelled_row_per_class():
    picture = reconstructions(tiny_model(2), images(), CLASS_NAMES, per_class=2)
    assert_readable_figure(picture)
    assert picture.height > picture.width  # ten rows of two original/reconstruction pairs
    fewer = reconstructions(tiny_model(2), images().subset(slice(0, 3)), CLASS_NAMES, per_class=2)
    assert fewer.height < picture.height  # only the classes present get a row


# --- latent space --------------------------------------------------------------------------------------------------


def test_latent_manifold_draws_a_grid_of_decoded_images_for_a_two_dimensional_latent():
    assert_readable_figure(latent_manifold(tiny_model(2), n=5, extent=3.0))


@pytest.mark.parametrize("latent_dim", [1, 5])
def test_latent_manifold_needs_latent_dim_two(latent_dim):
    with pytest.raises(ValueError, match=f"latent_dim == 2, got latent_dim={latent_dim}"):
        latent_manifold(tiny_model(latent_dim))


def test_principal_components_recover_constructed_axes_and_their_variance_fractions():
    a = torch.tensor([3.0, -3.0, 3.0, -3.0, 3.0, -3.0, 3.0, -3.0], dtype=torch.float64)  # variance 9 (per point)
    b = torch.tensor([1.0, 1.0, -1.0, -1.0, 1.0, 1.0, -1.0, -1.0], dtype=torch.float64)  # variance 1, orthogonal to a
    u1 = torch.tensor([0.6, 0.0, 0.8, 0.0, 0.0], dtype=torch.float64)  # largest loading 0.8: kept as is
    u2 = torch.tensor([0.0, -0.8, 0.0, 0.6, 0.0], dtype=torch.float64)  # largest loading -0.8: flipped
    offset = torch.tensor([5.0, -2.0, 1.0, 0.5, 7.0], dtype=torch.float64)
    means = offset + a[:, None] * u1 + b[:, None] * u2
    projected, explained = principal_components(means)
    torch.testing.assert_close(projected, torch.stack([a, -b], dim=1))
    torch.testing.assert_close(explained, torch.tensor([0.9, 0.1], dtype=torch.float64))


def test_principal_components_of_identical_points_explain_nothing():
    projected, explained = principal_components(torch.ones(4, 3))
    assert torch.equal(projected, torch.zeros(4, 2)) and torch.equal(explained, torch.zeros(2))


def test_latent_projection_of_a_two_dimensional_latent_is_the_posterior_means():
    model, data = tiny_model(2), images()
    projection = latent_projection(model, data)
    with torch.no_grad():
        means, _ = model.encode(data.pixels)
    torch.testing.assert_close(projection.points, means)
    assert torch.equal(projection.labels, data.labels)
    assert (projection.xlabel, projection.ylabel) == ("z[0]", "z[1]")


def test_latent_projection_above_two_dimensions_is_on_the_first_two_principal_components():
    model, data = tiny_model(5), images()
    projection = latent_projection(model, data)
    with torch.no_grad():
        means, _ = model.encode(data.pixels)
    points, explained = principal_components(means)
    torch.testing.assert_close(projection.points, points)
    assert projection.xlabel == f"PC 1 ({100 * explained[0]:.1f}% var)"
    assert projection.ylabel == f"PC 2 ({100 * explained[1]:.1f}% var)"


def test_latent_projection_of_a_one_dimensional_latent_is_z_against_the_jittered_class():
    model, data = tiny_model(1), images()
    projection = latent_projection(model, data)
    with torch.no_grad():
        means, _ = model.encode(data.pixels)
    torch.testing.assert_close(projection.points[:, 0], means[:, 0])
    assert ((projection.points[:, 1] - data.labels).abs() <= 0.3).all()
    assert (projection.xlabel, projection.ylabel) == ("z[0]", "class (jittered)")


def test_latent_projection_keeps_a_seeded_subset_of_at_most_max_points():
    model, data = tiny_model(2), images(per_class=20)
    subset = latent_projection(model, data, max_points=50, seed=1)
    assert subset.points.shape == (50, 2)
    assert torch.equal(subset.points, latent_projection(model, data, max_points=50, seed=1).points)
    assert not torch.equal(subset.points, latent_projection(model, data, max_points=50, seed=2).points)
    everything = latent_projection(model, data).points
    assert all((everything == point).all(dim=1).any() for point in subset.points)  # points of the data, not new ones


@pytest.mark.parametrize("latent_dim", [1, 2, 5])
def test_latent_scatter_draws_every_latent_dimensionality(latent_dim):
    assert_readable_figure(latent_scatter(tiny_model(latent_dim), images(), CLASS_NAMES))


# --- loss curves ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "entries",
    [history(5), history(5, validation=False), history(1), history(1, validation=False), history(4, kl_weight=0.5)],
    ids=["with-validation", "without-validation", "one-epoch", "one-epoch-no-validation", "kl-warm-up"],
)
def test_loss_curves_draw_three_panels_for_any_history(entries):
    picture = loss_curves(entries)
    assert_readable_figure(picture, min_width=1000, min_height=300)
    assert picture.width > 2 * picture.height  # three panels side by side


def test_loss_curves_of_an_empty_history_are_an_error():
    with pytest.raises(ValueError, match="history is empty"):
        loss_curves([])


def test_figures_are_not_registered_with_pyplot():
    before = len(_pylab_helpers.Gcf.figs)
    loss_curves(history(2))
    latent_scatter(tiny_model(2), images(1), CLASS_NAMES)
    assert len(_pylab_helpers.Gcf.figs) == before
