"""Specification of the VAE networks: the seed tutorials' shapes and sizes, and the model's operations."""

import torch
import pytest

from vae.config import ModelConfig
from vae.models import VAE, ServingVAE, build_model

KERAS_CONV = ModelConfig(
    architecture="conv", latent_dim=2, conv_channels=(32, 64), conv_padding="same", conv_dense_dim=16,
    decoder_start_channels=64, decoder_channels=(64, 32),
)


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_keras_conv_example_has_the_published_parameter_counts():
    model = build_model(KERAS_CONV)
    assert count(model.encoder) == 69_076
    assert count(model.decoder) == 65_089


@pytest.mark.parametrize("convention", ["pytorch", "tensorflow", "matlab"])
def test_padding_conventions_keep_the_keras_example_parameter_counts_and_feature_map_sizes(convention):
    model = build_model(KERAS_CONV.model_copy(update={"padding_convention": convention}))
    assert (count(model.encoder), count(model.decoder)) == (69_076, 65_089)
    x = torch.rand(2, 1, 28, 28)
    conv_outputs = [module for module in model.encoder if isinstance(module, torch.nn.ReLU)]
    sizes = []
    hooks = [module.register_forward_hook(lambda m, i, o: sizes.append(tuple(o.shape[2:]))) for module in conv_outputs[:2]]
    model.encode(x)
    for hook in hooks:
        hook.remove()
    assert sizes == [(14, 14), (7, 7)]
    assert model.decode(torch.zeros(2, 2)).shape == (2, 1, 28, 28)


def _picking_conv(module: torch.nn.Module) -> torch.nn.Module:
    """``module`` with every weight 0 but the kernel's top-left tap (1) and no bias: it picks one pixel."""
    with torch.no_grad():
        for layer in module.modules():
            if isinstance(layer, (torch.nn.Conv2d, torch.nn.ConvTranspose2d)):
                layer.weight.zero_()
                layer.weight[:, :, 0, 0] = 1.0
                layer.bias.zero_()
    return module


def test_tensorflow_same_padding_pads_the_bottom_right_where_pytorch_pads_every_side():
    # A top-left tap reads the first row and column of each window: with PyTorch's padding the window of output
    # (i, j) starts at (2i - 1, 2j - 1), with TensorFlow's (and MATLAB's) at (2i, 2j).
    from vae.models import _strided_conv

    x = torch.arange(28.0 * 28).reshape(1, 1, 28, 28)
    pytorch = _picking_conv(torch.nn.Sequential(*_strided_conv(1, 1, True, "pytorch")))(x)
    tensorflow = _picking_conv(torch.nn.Sequential(*_strided_conv(1, 1, True, "tensorflow")))(x)
    matlab = _picking_conv(torch.nn.Sequential(*_strided_conv(1, 1, True, "matlab")))(x)
    assert torch.equal(tensorflow[0, 0], x[0, 0, 0::2, 0::2])
    assert torch.equal(matlab, tensorflow)
    assert torch.equal(pytorch[0, 0, 1:, 1:], x[0, 0, 1:-1:2, 1:-1:2]) and pytorch[0, 0, 0].eq(0).all()


def test_tensorflow_transposed_convolution_crops_the_last_row_where_pytorch_and_matlab_crop_the_first():
    # A top-left tap writes input pixel (i, j) to row and column 2i, 2j of the uncropped 15x15 output.
    from vae.models import _upsampling_conv

    x = torch.arange(1.0, 50.0).reshape(1, 1, 7, 7)
    tensorflow = _picking_conv(torch.nn.Sequential(*_upsampling_conv(1, 1, "tensorflow")))(x)
    pytorch = _picking_conv(torch.nn.Sequential(*_upsampling_conv(1, 1, "pytorch")))(x)
    matlab = _picking_conv(torch.nn.Sequential(*_upsampling_conv(1, 1, "matlab")))(x)
    assert tensorflow.shape == pytorch.shape == (1, 1, 14, 14)
    assert torch.equal(tensorflow[0, 0, 0::2, 0::2], x[0, 0]) and tensorflow[0, 0, 1::2].eq(0).all()
    assert torch.equal(pytorch[0, 0, 1:-1:2, 1:-1:2], x[0, 0, 1:, 1:]) and pytorch[0, 0, 0::2].eq(0).all()
    assert pytorch[0, 0, -1].eq(0).all()  # the uncropped output's row 14, which no input pixel reaches
    assert torch.equal(matlab, pytorch)


@pytest.mark.parametrize(
    ("hidden", "latent", "encoder_params"),
    [((128,), 10, 784 * 128 + 128 + 128 * 20 + 20), ((128,), 100, 784 * 128 + 128 + 128 * 200 + 200), ((400,), 20, 784 * 400 + 400 + 400 * 40 + 40)],
)
def test_mlp_encoder_is_784_hidden_to_mean_and_log_variance(hidden, latent, encoder_params):
    model = build_model(ModelConfig(architecture="mlp", hidden_dims=hidden, latent_dim=latent))
    assert count(model.encoder) == encoder_params
    mu, logvar = model.encode(torch.rand(5, 1, 28, 28))
    assert mu.shape == logvar.shape == (5, latent)


def test_tf_cvae_encoder_uses_valid_convolutions_to_a_6x6_map():
    model = build_model(ModelConfig(architecture="conv", latent_dim=50, conv_padding="valid", decoder_start_channels=32))
    dense = model.encoder[-1]
    assert (dense.in_features, dense.out_features) == (64 * 6 * 6, 100)
    assert model.decoder[0].out_features == 7 * 7 * 32


def test_matlab_decoder_projects_z_with_a_7x7_stride_7_transposed_convolution():
    model = build_model(ModelConfig(architecture="conv", latent_dim=20, decoder_projection="transposed_conv"))
    projection = model.decoder[1]
    assert isinstance(projection, torch.nn.ConvTranspose2d)
    assert (projection.in_channels, projection.out_channels, projection.kernel_size, projection.stride) == (20, 64, (7, 7), (7, 7))
    assert model.decode(torch.zeros(3, 20)).shape == (3, 1, 28, 28)


@pytest.mark.parametrize("config", [ModelConfig(), KERAS_CONV], ids=["mlp", "conv"])
def test_every_model_encodes_decodes_reconstructs_and_samples(config):
    model = build_model(config, seed=0)
    x = torch.rand(4, 1, 28, 28)
    output = model(x)
    assert output.logits.shape == x.shape
    assert output.mu.shape == output.logvar.shape == output.z.shape == (4, config.latent_dim)
    reconstruction = model.reconstruct(x)
    assert reconstruction.shape == x.shape and 0 <= reconstruction.min() and reconstruction.max() <= 1
    samples = model.sample(6, generator=torch.Generator().manual_seed(1))
    assert samples.shape == (6, 1, 28, 28)
    torch.testing.assert_close(samples, model.sample(6, generator=torch.Generator().manual_seed(1)), rtol=0, atol=0)


def test_reparameterization_draws_from_the_posterior_with_the_given_generator():
    model = build_model(ModelConfig(latent_dim=3))
    mu, logvar = torch.tensor([[1.0, -2.0, 0.5]]).expand(200_000, 3), torch.log(torch.tensor([[0.25, 4.0, 1.0]])).expand(200_000, 3)
    z = model.reparameterize(mu, logvar, torch.Generator().manual_seed(0))
    torch.testing.assert_close(z.mean(0), torch.tensor([1.0, -2.0, 0.5]), atol=0.02, rtol=0)
    torch.testing.assert_close(z.std(0), torch.tensor([0.5, 2.0, 1.0]), atol=0.02, rtol=0)


def test_noise_given_as_eps_replaces_the_draw_so_a_shard_of_a_batch_gets_its_rows_of_the_batch_noise():
    model = build_model(ModelConfig(hidden_dims=(32,), latent_dim=4), seed=0)
    x = torch.rand(10, 1, 28, 28)
    drawn = model(x, generator=torch.Generator().manual_seed(7))
    eps = torch.randn(10, 4, generator=torch.Generator().manual_seed(7))  # what the generator draws for the batch
    for given, expected in zip(model(x, eps=eps), drawn):
        assert torch.equal(given, expected)
    for rows in (slice(0, 5), slice(5, 10)):  # the shards of two processes
        for given, expected in zip(model(x[rows], eps=eps[rows]), drawn):
            torch.testing.assert_close(given, expected[rows], rtol=1e-5, atol=1e-6)  # products of 5 rows, not 10


def test_noise_of_the_wrong_shape_is_refused():
    model = build_model(ModelConfig(hidden_dims=(32,), latent_dim=4), seed=0)
    with pytest.raises(ValueError, match=r"eps must have the posterior mean's shape \(3, 4\), got \(3, 2\)"):
        model(torch.rand(3, 1, 28, 28), eps=torch.zeros(3, 2))


def test_same_seed_gives_the_same_weights_and_leaves_the_global_rng_alone():
    torch.manual_seed(123)
    before = torch.get_rng_state()
    a, b = build_model(ModelConfig(), seed=7), build_model(ModelConfig(), seed=7)
    assert torch.equal(torch.get_rng_state(), before)
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)
    c = build_model(ModelConfig(), seed=8)
    assert not torch.equal(next(a.parameters()), next(c.parameters()))


@pytest.mark.parametrize("scheme", ["glorot_uniform", "kaiming_normal"])
def test_initialization_schemes_zero_the_biases(scheme):
    model = build_model(ModelConfig(hidden_dims=(128,), latent_dim=100, init=scheme), seed=0)
    first = model.encoder[1]
    assert torch.count_nonzero(first.bias) == 0
    if scheme == "kaiming_normal":  # std 1 / sqrt(fan_in / 2), as the "Tutorial on VAEs" draws it
        assert first.weight.std().item() == pytest.approx((2 / 784) ** 0.5, rel=0.02)
    else:  # glorot uniform: bound sqrt(6 / (fan_in + fan_out))
        assert first.weight.abs().max().item() <= (6 / (784 + 128)) ** 0.5


def test_vae_is_an_nn_module_with_its_latent_size():
    model = build_model(ModelConfig(latent_dim=5))
    assert isinstance(model, VAE) and model.latent_dim == 5 and model.image_shape == (1, 28, 28)


def test_serving_vae_is_a_cpu_copy_whose_forward_returns_reconstructions():
    model = build_model(ModelConfig(latent_dim=3), seed=0)
    serving = ServingVAE.of(model)
    x = torch.rand(4, 1, 28, 28)
    assert not serving.training and serving.latent_dim == 3
    torch.testing.assert_close(serving(x), model.reconstruct(x), rtol=0, atol=0)
    assert serving.sample(2).shape == (2, 1, 28, 28)
    with torch.no_grad():
        serving.decoder[-2].bias.add_(1.0)
    assert not torch.equal(serving.decoder[-2].bias, model.decoder[-2].bias)
