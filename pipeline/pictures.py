"""The pictures a run produces: samples, reconstructions, latent space, loss curves."""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor, nn

from vae.data import ImageSet
from vae.models import eval_mode

# Figures are drawn on matplotlib.figure.Figure with an Agg canvas of their own: no pyplot, no backend switch, no
# figure kept alive by a global registry.
DPI = 100
PAD_VALUE = 0.5  # mid-grey between grid cells: visible against black backgrounds and white strokes alike
ENCODE_BATCH_SIZE = 1000
# "auto" resamples smoothly when an image is enlarged less than 3x (nearest would alias) and by nearest beyond.
GREY = {"cmap": "gray", "vmin": 0.0, "vmax": 1.0, "interpolation": "auto"}


class LatentProjection(NamedTuple):
    """Points of the latent scatter plot ([N, 2]), their labels ([N]) and the names of the two axes."""

    points: Tensor
    labels: Tensor
    xlabel: str
    ylabel: str


def image_grid(images: Tensor, rows: int, cols: int, *, padding: int = 2, scale: int = 2) -> Image.Image:
    """Images [N, C, H, W] in [0, 1] (C = 1 or 3, N <= rows * cols) tiled row by row into one picture.

    Cells are ``padding`` pixels apart (and from the border), in mid-grey; cells without an image are left grey. The
    picture is then enlarged ``scale`` times by nearest neighbour, so it is ((W + padding) * cols + padding) * scale
    pixels wide and ((H + padding) * rows + padding) * scale high. Grayscale images give an "L" picture.
    """
    tile = _tile(_as_grid_cells(images, rows, cols), padding)
    tile = tile.repeat_interleave(scale, dim=1).repeat_interleave(scale, dim=2)
    return _to_pil(tile)


def fixed_latents(n: int, latent_dim: int, seed: int = 0) -> Tensor:
    """``n`` draws of z ~ N(0, I) [n, latent_dim] made with ``seed`` alone (the global RNG is left as it is).

    Decoding the same z after every epoch shows how the model's samples evolve (TensorFlow's CVAE tutorial: 16 of
    them, a 4x4 grid).
    """
    return torch.randn(n, latent_dim, generator=torch.Generator().manual_seed(seed))


def prior_latents(model: nn.Module, n: int, seed: int = 0) -> Tensor:
    """``n`` draws of z ~ p(z) [n, latent_dim] on the CPU, made with ``seed`` alone: under the standard normal prior of
    one stochastic layer the :func:`fixed_latents`; under a learned prior or two layers, the model's own prior (the
    same noise each call, through the prior as it is now).
    """
    if getattr(model, "has_closed_form_kl", True):
        return fixed_latents(n, _latent_dim(model), seed)
    generator = torch.Generator(device=_parameter(model).device).manual_seed(seed)
    with eval_mode(model), torch.no_grad():
        return model.sample_latents(n, generator).float().cpu()


def prior_samples(model: nn.Module, z: Tensor, *, padding: int = 2, scale: int = 2) -> Image.Image:
    """The mean images decoded from the latents ``z`` [n, latent_dim] as a square-ish grid (16 -> 4x4, 10 -> 3x4)."""
    rows, cols = grid_shape(len(z))
    return image_grid(_decode(model, z), rows, cols, padding=padding, scale=scale)


def grid_shape(n: int) -> tuple[int, int]:
    """Rows and columns of the most nearly square grid for ``n`` pictures: cols = ceil(sqrt(n)), rows to fit."""
    if n <= 0:
        raise ValueError(f"need at least one picture for a grid, got n={n}")
    cols = math.ceil(math.sqrt(n))
    return math.ceil(n / cols), cols


def animated_gif(
    frames: Sequence[Image.Image], *, duration_ms: int = 300, captions: Sequence[str] | None = None
) -> bytes:
    """The frames (of equal size) as a GIF that loops forever, ``duration_ms`` per frame.

    With ``captions`` (one per frame, e.g. ``[f"epoch {e}" for e in epochs]``) each frame gets a white strip above it
    with its caption. Pillow merges consecutive identical frames into one longer frame.
    """
    if not frames:
        raise ValueError("an animated GIF needs at least one frame")
    sizes = sorted({frame.size for frame in frames})
    if len(sizes) > 1:
        raise ValueError(f"frames must all have the same size, got sizes {sizes}")
    if captions is not None and len(captions) != len(frames):
        raise ValueError(f"need one caption per frame: {len(captions)} captions for {len(frames)} frames")
    mode = "L" if all(frame.mode == "L" for frame in frames) else "RGB"
    images = [frame.convert(mode) for frame in frames]
    if captions is not None:
        images = [_captioned(image, caption) for image, caption in zip(images, captions)]
    buffer = io.BytesIO()
    images[0].save(buffer, format="GIF", save_all=True, append_images=images[1:], duration=duration_ms, loop=0)
    return buffer.getvalue()


def class_examples(labels: Tensor, per_class: int, seed: int = 0) -> tuple[Tensor, Tensor]:
    """``per_class`` indices of each class in ``labels``, drawn at random with ``seed``.

    Returns the classes present (sorted) and an index tensor [classes, per_class] whose row k holds positions of
    class k; a class with fewer than ``per_class`` examples has its row padded with -1.
    """
    if per_class <= 0:
        raise ValueError(f"per_class must be positive, got {per_class}")
    labels = labels.cpu()
    permutation = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    grouped = permutation[torch.argsort(labels[permutation], stable=True)]  # by class, at random within one
    classes, counts = torch.unique_consecutive(labels[grouped], return_counts=True)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.arange(per_class)
    position = starts[:, None] + rank
    index = torch.where(rank < counts[:, None], grouped[position.clamp(max=len(grouped) - 1)], -1)
    return classes, index


def reconstructions(
    model: nn.Module, data: ImageSet, class_names: Sequence[str] | None = None, per_class: int = 2, seed: int = 0
) -> Image.Image:
    """For every class in ``data``, ``per_class`` of its images (seeded) beside their reconstructions.

    One row per class, labelled with its name; the columns alternate "original" and "reconstruction". The
    reconstruction is the decoder's mean image at the posterior mean. Originals are ``data.pixels`` as stored.
    """
    return _render(reconstructions_figure(model, data, class_names, per_class, seed))


def first_reconstructions(model: nn.Module, data: ImageSet, n: int, *, padding: int = 2, scale: int = 2) -> Image.Image:
    """The first ``n`` images of ``data`` above their ``n`` reconstructions, as one grid (TensorFlow's Fashion-MNIST
    VAE tutorial shows 50 and 50, a 10x10 grid).

    The grid has the columns of the most nearly square grid for 2n pictures; the originals fill the top rows and the
    reconstructions the bottom ones in the same order, so that an original and its reconstruction share a column;
    a half's last row is padded with empty cells. The reconstruction is the decoder's mean image at the posterior mean.
    """
    if not 0 < n <= len(data):
        raise ValueError(f"n must be between 1 and the {len(data)} images of the set, got n={n}")
    originals = data.pixels[:n]
    with eval_mode(model), torch.no_grad():
        rebuilt = torch.cat([_decode_from(model, batch) for batch in originals.split(ENCODE_BATCH_SIZE)])
    _, cols = grid_shape(2 * n)
    rows = math.ceil(n / cols)
    halves = [_as_grid_cells(half, rows, cols).flatten(0, 1) for half in (originals, rebuilt)]  # each padded to full rows
    return image_grid(torch.cat(halves), 2 * rows, cols, padding=padding, scale=scale)


def reconstructions_figure(
    model: nn.Module, data: ImageSet, class_names: Sequence[str] | None = None, per_class: int = 2, seed: int = 0
) -> Figure:
    """The figure :func:`reconstructions` draws: one image of the pairs' cells, ``padding`` 2 around each cell and a
    white gap of 8 pixels between pairs."""
    classes, index = class_examples(data.labels, per_class, seed)
    flat = index.flatten()
    present = flat >= 0
    originals = data.pixels[flat.clamp(min=0).to(data.device)].cpu()
    with eval_mode(model), torch.no_grad():
        rebuilt = torch.cat([_decode_from(model, batch) for batch in originals.split(ENCODE_BATCH_SIZE)])
    channels, height, width = originals.shape[1:]
    blank = torch.full_like(originals, PAD_VALUE)
    originals = torch.where(present[:, None, None, None], originals, blank)
    rebuilt = torch.where(present[:, None, None, None], rebuilt, blank)
    pairs = torch.stack([originals, rebuilt], dim=1).reshape(len(classes), per_class, 2, channels, height, width)
    gap, padding = 8, 2
    blocks = [_tile(pairs[:, k], padding) for k in range(per_class)]  # [C, rows * (H + p) + p, 2 * (W + p) + p]
    separator = torch.ones(channels, blocks[0].shape[1], gap)
    picture = torch.cat([part for block in blocks for part in (block, separator)][:-1], dim=2)

    cell = 0.95  # inches per image
    fig = Figure(figsize=(2 * per_class * cell + 1.9, len(classes) * cell + 1.0), dpi=DPI, layout="constrained")
    ax = fig.add_subplot()
    _show(ax, picture)
    column_width = 2 * (width + padding) + padding + gap
    x = [k * column_width + padding + j * (width + padding) + (width - 1) / 2 for k in range(per_class) for j in (0, 1)]
    ax.set_xticks(x, ["original", "reconstruction"] * per_class, fontsize=9)
    ax.xaxis.tick_top()
    y = [padding + r * (height + padding) + (height - 1) / 2 for r in range(len(classes))]
    ax.set_yticks(y, [_class_name(class_names, int(c)) for c in classes], fontsize=10)
    ax.tick_params(length=0)
    for spine in ax.spines.values():
        spine.set_visible(False)
    fig.suptitle(f"Reconstructions: {per_class} images per class", fontsize=12)
    return fig


def latent_manifold(model: nn.Module, *, n: int = 15, extent: float = 2.0) -> Image.Image:
    """The images decoded from an n x n grid of z over [-extent, extent]^2, for a model with latent_dim == 2.

    As the Keras VAE example draws it: z[0] grows to the right, z[1] upwards; the axes carry the z values at the
    cell centres.
    """
    return _render(latent_manifold_figure(model, n=n, extent=extent))


def latent_manifold_figure(model: nn.Module, *, n: int = 15, extent: float = 2.0) -> Figure:
    """The figure :func:`latent_manifold` draws."""
    latent_dim = _latent_dim(model)
    if latent_dim != 2:
        raise ValueError(f"latent_manifold needs a model with latent_dim == 2, got latent_dim={latent_dim}")
    if n < 2:
        raise ValueError(f"n must be at least 2, got {n}")
    values = torch.linspace(-extent, extent, n)
    z1, z0 = torch.meshgrid(values.flip(0), values, indexing="ij")  # row 0 on top holds the largest z[1]
    images = _decode(model, torch.stack([z0.flatten(), z1.flatten()], dim=1))
    picture = _tile(images.reshape(n, n, *images.shape[1:]), padding=0)

    half = extent / (n - 1)  # half a cell in z units
    side = min(max(2 * picture.shape[-1] / DPI, 6.0), 11.0)  # about 2 screen pixels per image pixel
    fig = Figure(figsize=(side + 0.8, side + 1.1), dpi=DPI, layout="constrained")
    ax = fig.add_subplot()
    _show(ax, picture, extent=(-extent - half, extent + half, -extent - half, extent + half))
    ax.set_xlabel("z[0]")
    ax.set_ylabel("z[1]")
    ax.set_title(f"Latent manifold: decoder means over a {n}x{n} grid of z in [{-extent:g}, {extent:g}]²")
    return fig


def principal_components(means: Tensor) -> tuple[Tensor, Tensor]:
    """The rows of ``means`` [N, D] (D >= 2) projected on their first two principal components, and the fraction of
    the total variance each component explains.

    Each component's sign is chosen so that its largest loading (in absolute value) is positive.
    """
    if means.ndim != 2 or means.shape[1] < 2:
        raise ValueError(f"means must have shape [N, D] with D >= 2, got {tuple(means.shape)}")
    x = means.detach().cpu().double()
    centred = x - x.mean(dim=0)
    _, singular, components = torch.linalg.svd(centred, full_matrices=False)
    components = components[:2]
    largest = components.gather(1, components.abs().argmax(dim=1, keepdim=True))
    components = components * torch.sign(largest)
    variance = singular.square()
    total = variance.sum()
    explained = variance[:2] / total if total > 0 else torch.zeros(2, dtype=x.dtype)
    if len(explained) < 2:  # a single point has one singular value
        explained = F.pad(explained, (0, 2 - len(explained)))
    return (centred @ components.T).to(means.dtype), explained.to(means.dtype)


def latent_projection(model: nn.Module, data: ImageSet, *, max_points: int = 5000, seed: int = 0) -> LatentProjection:
    """The posterior means of (at most ``max_points``, drawn with ``seed``) images of ``data``, in two dimensions.

    latent_dim 2: the means themselves. Above 2: their first two principal components. latent_dim 1: z[0] against the
    class label plus a seeded jitter in [-0.3, 0.3].
    """
    generator = torch.Generator().manual_seed(seed)
    count = len(data)
    index = torch.randperm(count, generator=generator)[:max_points] if count > max_points else torch.arange(count)
    labels = data.labels.cpu()[index]
    means = _posterior_means(model, data.pixels[index.to(data.device)])
    latent_dim = means.shape[1]
    if latent_dim == 1:
        jitter = (torch.rand(len(labels), generator=generator) - 0.5) * 0.6
        points = torch.stack([means[:, 0], labels.float() + jitter], dim=1)
        return LatentProjection(points, labels, "z[0]", "class (jittered)")
    if latent_dim == 2:
        return LatentProjection(means, labels, "z[0]", "z[1]")
    points, explained = principal_components(means)
    pc1, pc2 = (100 * explained).tolist()
    return LatentProjection(points, labels, f"PC 1 ({pc1:.1f}% var)", f"PC 2 ({pc2:.1f}% var)")


def latent_scatter(
    model: nn.Module, data: ImageSet, class_names: Sequence[str] | None = None, *, max_points: int = 5000, seed: int = 0
) -> Image.Image:
    """The posterior means of (a seeded subset of) ``data``, coloured by class, with the class names in a legend.

    Shown as :func:`latent_projection` places them: z[0] and z[1], the first two principal components of the means
    for latent_dim > 2, or z[0] against the class for latent_dim 1.
    """
    return _render(latent_scatter_figure(model, data, class_names, max_points=max_points, seed=seed))


def latent_scatter_figure(
    model: nn.Module, data: ImageSet, class_names: Sequence[str] | None = None, *, max_points: int = 5000, seed: int = 0
) -> Figure:
    """The figure :func:`latent_scatter` draws."""
    projection = latent_projection(model, data, max_points=max_points, seed=seed)
    points, labels = projection.points.numpy(), projection.labels.numpy()
    n_classes = max(len(class_names or ()), int(labels.max()) + 1 if len(labels) else 0)
    palette = _class_colours(n_classes)
    latent_dim = _latent_dim(model)

    fig = Figure(figsize=(9.0, 6.8), dpi=DPI, layout="constrained")
    ax = fig.add_subplot()
    ax.scatter(points[:, 0], points[:, 1], c=palette[labels], s=6, alpha=0.6, linewidths=0, rasterized=True)
    ax.set_xlabel(projection.xlabel)
    ax.set_ylabel(projection.ylabel)
    present = sorted(set(labels.tolist()))
    if latent_dim == 1:
        ax.set_yticks(present, [_class_name(class_names, c) for c in present])
    handles = [
        Line2D([], [], linestyle="", marker="o", markersize=7, color=palette[c], label=_class_name(class_names, c))
        for c in present
    ]
    ax.legend(handles=handles, title="class", loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    how = {1: "z[0] (latent_dim 1) by class", 2: "z (latent_dim 2)"}.get(
        latent_dim, f"projected on their first two principal components (latent_dim {latent_dim})"
    )
    ax.set_title(f"Latent space: posterior means of {len(labels)} images\n{how}")
    return fig


CURVES = (
    # panel title, [(history key, legend label, sign, style)]; the ELBO keys hold the ELBO, the panel its negative
    ("negative ELBO", [
        ("train_elbo_nats", "train", -1.0, {"color": "C0"}),
        ("val_elbo_nats", "validation", -1.0, {"color": "C1"}),
    ]),
    ("reconstruction (negative log-likelihood)", [
        ("train_reconstruction_nats", "train", 1.0, {"color": "C0"}),
        ("val_reconstruction_nats", "validation", 1.0, {"color": "C1"}),
    ]),
    ("KL divergence", [
        ("train_kl_nats", "train", 1.0, {"color": "C0"}),
        ("val_kl_nats", "validation", 1.0, {"color": "C1"}),
    ]),
)


def loss_curves(history: Sequence[Mapping[str, float]]) -> Image.Image:
    """Per-epoch curves of the negative ELBO, the reconstruction term and the KL term, train against validation.

    ``history`` is :attr:`vae.engine.TrainingState.history`; a curve whose key no epoch has is left out, and an epoch
    without a value leaves a gap. When the KL weight differed from 1 (beta, warm-up) the optimized training loss is
    drawn dashed in the first panel.
    """
    return _render(loss_curves_figure(history))


def loss_curves_figure(history: Sequence[Mapping[str, float]]) -> Figure:
    """The figure :func:`loss_curves` draws."""
    if not history:
        raise ValueError("history is empty: there are no epochs to plot")
    epochs = [entry.get("epoch", number) for number, entry in enumerate(history, start=1)]
    fig = Figure(figsize=(14.0, 4.4), dpi=DPI, layout="constrained")
    axes = fig.subplots(1, 3)
    for ax, (title, curves) in zip(axes, CURVES):
        for key, label, sign, style in curves:
            if any(key in entry for entry in history):
                values = [sign * entry.get(key, math.nan) for entry in history]
                ax.plot(epochs, values, marker="o", markersize=4, label=label, **style)
        if title == "negative ELBO" and any(entry.get("kl_weight", 1.0) != 1.0 for entry in history):
            values = [entry.get("train_loss", math.nan) for entry in history]
            ax.plot(epochs, values, marker="o", markersize=3, linestyle="--", color="C0", alpha=0.6,
                    label="train loss (KL weighted)")
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.set_ylabel("nats per image")
        if len(set(epochs)) == 1:  # one point: a tick at its epoch, not a fractional axis around it
            ax.set_xticks([epochs[0]])
            ax.set_xlim(epochs[0] - 1, epochs[0] + 1)
        else:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend()
        else:
            ax.text(0.5, 0.5, "no data", transform=ax.transAxes, ha="center", va="center", color="grey")
    fig.suptitle(f"Training curves over {len(history)} epoch{'s' if len(history) != 1 else ''}", fontsize=13)
    return fig


# --- helpers -------------------------------------------------------------------------------------------------------


def _parameter(model: nn.Module) -> Tensor | None:
    return next(iter(model.parameters()), None)


def _latent_dim(model: nn.Module) -> int:
    return int(model.latent_dim)


def _to_model(model: nn.Module, x: Tensor) -> Tensor:
    parameter = _parameter(model)
    if parameter is None:
        return x
    return x.to(device=parameter.device, dtype=parameter.dtype if parameter.is_floating_point() else x.dtype)


def _decode(model: nn.Module, z: Tensor) -> Tensor:
    """Mean images sigmoid(decode(z)) on the CPU, decoded in batches in eval mode."""
    with eval_mode(model), torch.no_grad():
        batches = z.split(ENCODE_BATCH_SIZE)
        return torch.cat([torch.sigmoid(model.decode(_to_model(model, b))).float().cpu() for b in batches])


def _decode_from(model: nn.Module, x: Tensor) -> Tensor:
    mu, _ = model.encode(_to_model(model, x))
    return torch.sigmoid(model.decode(mu)).float().cpu()


def _posterior_means(model: nn.Module, pixels: Tensor) -> Tensor:
    with eval_mode(model), torch.no_grad():
        return torch.cat([model.encode(_to_model(model, b))[0].float().cpu() for b in pixels.split(ENCODE_BATCH_SIZE)])


def _as_grid_cells(images: Tensor, rows: int, cols: int) -> Tensor:
    """Images [N, C, H, W] as cells [rows, cols, C, H, W], clamped to [0, 1], empty cells filled with PAD_VALUE."""
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"images must have shape [N, 1 or 3, H, W], got {tuple(images.shape)}")
    if rows <= 0 or cols <= 0 or len(images) > rows * cols:
        raise ValueError(f"{len(images)} images do not fit a grid of {rows} rows and {cols} columns")
    x = images.detach().float().cpu().clamp(0.0, 1.0)
    missing = rows * cols - len(x)
    if missing:
        x = torch.cat([x, torch.full((missing, *x.shape[1:]), PAD_VALUE)])
    return x.reshape(rows, cols, *x.shape[1:])


def _tile(cells: Tensor, padding: int) -> Tensor:
    """Cells [rows, cols, C, H, W] as one picture [C, rows * (H + p) + p, cols * (W + p) + p], p = padding."""
    rows, cols, channels, height, width = cells.shape
    padded = F.pad(cells, (padding, 0, padding, 0), value=PAD_VALUE)  # a border left of and above every cell
    picture = padded.permute(2, 0, 3, 1, 4).reshape(channels, rows * (height + padding), cols * (width + padding))
    return F.pad(picture, (0, padding, 0, padding), value=PAD_VALUE)  # and the right and bottom border


def _to_pil(picture: Tensor) -> Image.Image:
    """A picture [C, H, W] in [0, 1] as an "L" (C = 1) or "RGB" (C = 3) image."""
    pixels = picture.mul(255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    return Image.fromarray(pixels[:, :, 0] if pixels.shape[2] == 1 else pixels)


def _show(ax: Axes, picture: Tensor, **kwargs) -> None:
    if picture.shape[0] == 1:
        ax.imshow(picture[0].numpy(), **GREY, **kwargs)
    else:
        ax.imshow(picture.permute(1, 2, 0).numpy(), interpolation="auto", **kwargs)


def _render(fig: Figure) -> Image.Image:
    """The figure drawn by Agg as an RGB image; the figure is cleared afterwards."""
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    pixels = np.array(canvas.buffer_rgba())[:, :, :3]
    fig.clear()
    return Image.fromarray(pixels)


def _class_name(class_names: Sequence[str] | None, label: int) -> str:
    if class_names is not None and 0 <= label < len(class_names):
        return class_names[label]
    return str(label)


def _class_colours(n: int) -> np.ndarray:
    """n distinguishable RGBA colours: tab10, tab20 up to 20 classes, then a sweep of hues."""
    from matplotlib import colormaps

    if n <= 10:
        return np.asarray(colormaps["tab10"].colors)[: max(n, 1)]
    if n <= 20:
        return np.asarray(colormaps["tab20"].colors)[:n]
    return colormaps["hsv"](np.linspace(0, 1, n, endpoint=False))


def _captioned(image: Image.Image, caption: str) -> Image.Image:
    """``image`` under a white strip carrying ``caption`` in black, in Pillow's default font."""
    size = max(10, min(24, image.width // 14))
    font = ImageFont.load_default(size=size)
    strip = size + 8
    out = Image.new(image.mode, (image.width, image.height + strip), "white")
    out.paste(image, (0, strip))
    ImageDraw.Draw(out).text((image.width / 2, strip / 2), caption, fill="black", font=font, anchor="mm")
    return out
