"""Specification of the run's pictures: grids, fixed-z samples, GIFs, reconstructions, latent plots, loss curves."""

import io

import numpy as np
import pytest
import torch
from matplotlib import _pylab_helpers, colormaps
from matplotlib.figure import Figure
from PIL import Image

from pipeline.pictures import (
    DPI,
    PAD_VALUE,
    animated_gif,
    class_examples,
    first_reconstructions,
    fixed_latents,
    grid_shape,
    image_grid,
    latent_manifold,
    latent_manifold_figure,
    latent_projection,
    latent_scatter,
    latent_scatter_figure,
    loss_curves,
    loss_curves_figure,
    principal_components,
    prior_latents,
    prior_samples,
    reconstructions,
    reconstructions_figure,
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


def assert_rendered(image: Image.Image, figure: Figure, min_width: int = 400, min_height: int = 400) -> None:
    """``image`` is ``figure`` drawn at the pictures' resolution, large enough to read."""
    width, height = figure.get_size_inches() * DPI
    assert image.mode == "RGB" and image.size == (round(width), round(height))
    assert image.width >= min_width and image.height >= min_height


def shown_image(figure: Figure) -> np.ndarray:
    """The array that the figure's one axes shows as an image."""
    (ax,) = figure.axes
    (image,) = ax.images
    return np.asarray(image.get_array())


def tick_labels(ticks) -> list[str]:
    return [tick.get_text() for tick in ticks]


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


def test_reconstructions_show_each_class_row_its_originals_beside_their_reconstructions():
    model, data = tiny_model(2), images()
    figure = reconstructions_figure(model, data, CLASS_NAMES, per_class=2)
    classes, index = class_examples(data.labels, per_class=2)
    with torch.no_grad():
        originals = data.pixels[index.flatten()]
        rebuilt = torch.sigmoid(model.decode(model.encode(originals)[0]))
    panel = shown_image(figure)
    # cells of 28 pixels with 2 of grey around each; a pair is 2 * 30 + 2 = 62 wide, then a white gap of 8
    assert panel.shape == (10 * 30 + 2, 2 * 62 + 8)
    for row in range(10):
        for k in range(2):
            top, left = 2 + 30 * row, 70 * k + 2
            np.testing.assert_array_equal(panel[top : top + 28, left : left + 28], originals[2 * row + k, 0])
            np.testing.assert_allclose(panel[top : top + 28, left + 30 : left + 58], rebuilt[2 * row + k, 0], rtol=1e-6)
    (ax,) = figure.axes
    assert tick_labels(ax.get_yticklabels()) == [CLASS_NAMES[c] for c in classes.tolist()] == list(CLASS_NAMES)
    assert tick_labels(ax.get_xticklabels()) == ["original", "reconstruction"] * 2
    assert figure.get_suptitle() == "Reconstructions: 2 images per class"
    assert_rendered(reconstructions(model, data, CLASS_NAMES, per_class=2), figure)


def test_reconstructions_give_a_row_only_to_the_classes_present():
    data = images().subset(slice(0, 3))  # one image each of classes 0, 1 and 2
    figure = reconstructions_figure(tiny_model(2), data, CLASS_NAMES, per_class=2)
    panel = shown_image(figure)
    assert panel.shape == (3 * 30 + 2, 2 * 62 + 8)
    np.testing.assert_array_equal(panel[2:30, 72:100], np.full((28, 28), PAD_VALUE))  # no second image: grey
    assert tick_labels(figure.axes[0].get_yticklabels()) == list(CLASS_NAMES[:3])


def test_first_reconstructions_put_the_first_n_images_above_their_reconstructions_column_by_column():
    model, data = tiny_model(2), images()
    with torch.no_grad():
        rebuilt = torch.sigmoid(model.decode(model.encode(data.pixels[:7])[0]))
    grid = pixels(first_reconstructions(model, data, 7, padding=1, scale=1))
    # 14 pictures: 4 columns; 7 originals take 2 rows (one cell grey), then 2 rows of reconstructions
    assert grid.shape == (4 * 29 + 1, 4 * 29 + 1)
    for k in range(7):
        row, column = divmod(k, 4)
        top, left = 1 + 29 * row, 1 + 29 * column
        expected_original = (data.pixels[k, 0] * 255).round().numpy()
        expected_rebuilt = (rebuilt[k, 0] * 255).round().numpy()
        np.testing.assert_array_equal(grid[top : top + 28, left : left + 28], expected_original)
        np.testing.assert_allclose(grid[top + 58 : top + 86, left : left + 28], expected_rebuilt, atol=1)
    np.testing.assert_array_equal(grid[30:58, 88:116], np.full((28, 28), GREY))  # after the 7th original
    np.testing.assert_array_equal(grid[88:116, 88:116], np.full((28, 28), GREY))  # after the 7th reconstruction


def test_first_reconstructions_of_fifty_images_are_a_ten_by_ten_grid_as_the_tensorflow_tutorial_shows():
    grid = first_reconstructions(tiny_model(2), images(), 50, padding=2, scale=1)
    assert grid.size == (10 * 30 + 2, 10 * 30 + 2)


@pytest.mark.parametrize("n", [0, 51])
def test_first_reconstructions_need_between_one_and_all_the_images(n):
    with pytest.raises(ValueError, match=f"n must be between 1 and the 50 images of the set, got n={n}"):
        first_reconstructions(tiny_model(2), images(), n)


# --- latent space --------------------------------------------------------------------------------------------------


def test_latent_manifold_shows_the_images_decoded_from_a_grid_of_z_with_z1_growing_upwards():
    model = tiny_model(2)
    figure = latent_manifold_figure(model, n=5, extent=3.0)
    values = [-3.0, -1.5, 0.0, 1.5, 3.0]
    z = torch.tensor([[z0, z1] for z1 in reversed(values) for z0 in values])  # row by row from the top
    with torch.no_grad():
        decoded = torch.sigmoid(model.decode(z))[:, 0]
    panel = shown_image(figure)
    assert panel.shape == (5 * 28, 5 * 28)
    for cell, expected in enumerate(decoded):
        row, column = divmod(cell, 5)
        np.testing.assert_allclose(panel[28 * row : 28 * (row + 1), 28 * column : 28 * (column + 1)], expected, rtol=1e-6)
    (ax,) = figure.axes
    # each cell centred on its z: half a step (0.75) beyond the extent on every side; z[1] at the top of the axes
    assert figure.axes[0].images[0].get_extent() == [-3.75, 3.75, -3.75, 3.75]
    assert figure.axes[0].images[0].origin == "upper"
    assert (ax.get_xlabel(), ax.get_ylabel()) == ("z[0]", "z[1]")
    assert_rendered(latent_manifold(model, n=5, extent=3.0), figure)


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
def test_latent_scatter_places_each_image_at_its_projection_in_its_class_colour(latent_dim):
    model, data = tiny_model(latent_dim), images()
    figure = latent_scatter_figure(model, data, CLASS_NAMES)
    projection = latent_projection(model, data)
    (ax,) = figure.axes
    (points,) = ax.collections
    np.testing.assert_array_equal(points.get_offsets(), projection.points.numpy())
    tab10 = np.asarray(colormaps["tab10"].colors)
    np.testing.assert_array_equal(points.get_facecolors(), np.c_[tab10[projection.labels.numpy()], np.full(50, 0.6)])
    legend = ax.get_legend()
    assert tick_labels(legend.get_texts()) == list(CLASS_NAMES)
    assert [tuple(handle.get_color()) for handle in legend.legend_handles] == [tuple(colour) for colour in tab10]
    assert (ax.get_xlabel(), ax.get_ylabel()) == (projection.xlabel, projection.ylabel)
    assert_rendered(latent_scatter(model, data, CLASS_NAMES), figure)


def test_latent_scatter_of_a_one_dimensional_latent_names_the_classes_on_its_vertical_axis():
    data = images().subset(slice(0, 4))  # classes 0 to 3
    (ax,) = latent_scatter_figure(tiny_model(1), data, CLASS_NAMES).axes
    assert list(ax.get_yticks()) == [0, 1, 2, 3]
    assert tick_labels(ax.get_yticklabels()) == list(CLASS_NAMES[:4])
    assert tick_labels(ax.get_legend().get_texts()) == list(CLASS_NAMES[:4])


# --- loss curves ---------------------------------------------------------------------------------------------------


PANELS = [  # title, then (legend label, history key, sign) of each curve
    ("negative ELBO", [("train", "train_elbo_nats", -1.0), ("validation", "val_elbo_nats", -1.0)]),
    ("reconstruction (negative log-likelihood)", [
        ("train", "train_reconstruction_nats", 1.0), ("validation", "val_reconstruction_nats", 1.0),
    ]),
    ("KL divergence", [("train", "train_kl_nats", 1.0), ("validation", "val_kl_nats", 1.0)]),
]


def curves(ax) -> dict[str, tuple[list[float], list[float], str]]:
    """Each line of the panel by its legend label: epochs, values and line style."""
    return {line.get_label(): (list(line.get_xdata()), list(line.get_ydata()), line.get_linestyle()) for line in ax.lines}


@pytest.mark.parametrize(
    "entries",
    [history(5), history(5, validation=False), history(1), history(1, validation=False)],
    ids=["with-validation", "without-validation", "one-epoch", "one-epoch-no-validation"],
)
def test_loss_curves_draw_each_term_per_epoch_train_against_validation(entries):
    figure = loss_curves_figure(entries)
    epochs = list(range(1, len(entries) + 1))
    assert len(figure.axes) == 3
    for ax, (title, lines) in zip(figure.axes, PANELS):
        assert ax.get_title() == title
        assert curves(ax) == {
            label: (epochs, [sign * entry[key] for entry in entries], "-") for label, key, sign in lines if key in entries[0]
        }
    assert figure.get_suptitle() == f"Training curves over {len(entries)} epoch{'s' if len(entries) > 1 else ''}"
    assert_rendered(loss_curves(entries), figure, min_width=1000, min_height=300)


def test_loss_curves_of_one_epoch_put_one_tick_at_it():
    for ax in loss_curves_figure(history(1)).axes:
        assert (list(ax.get_xticks()), ax.get_xlim()) == ([1], (0.0, 2.0))


def test_loss_curves_add_the_weighted_training_loss_dashed_when_the_kl_weight_is_not_one():
    entries = history(4, kl_weight=0.5)
    (elbo, *others) = loss_curves_figure(entries).axes
    assert curves(elbo)["train loss (KL weighted)"] == ([1, 2, 3, 4], [entry["train_loss"] for entry in entries], "--")
    assert all("train loss (KL weighted)" not in curves(ax) for ax in others)
    assert "train loss (KL weighted)" not in curves(loss_curves_figure(history(4)).axes[0])


def test_loss_curves_of_an_empty_history_are_an_error():
    with pytest.raises(ValueError, match="history is empty"):
        loss_curves([])


def test_figures_are_not_registered_with_pyplot():
    before = len(_pylab_helpers.Gcf.figs)
    loss_curves(history(2))
    latent_scatter(tiny_model(2), images(1), CLASS_NAMES)
    assert len(_pylab_helpers.Gcf.figs) == before
