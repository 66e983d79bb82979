"""Specification of vae.classifier: the network whose penultimate features FID uses, its seeded training loop, its
accuracy and its weights file (safetensors, loaded without unpickling)."""

from __future__ import annotations

import pickle

import pytest
import torch

from vae.classifier import ARCHITECTURE, Classifier, accuracy, build_classifier, load_classifier, save_classifier, train_classifier
from vae.config import ClassifierConfig

TINY = ClassifierConfig(conv_channels=(4, 8), feature_dim=32, epochs=3, batch_size=25, learning_rate=1e-2)


def squares(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Faint noise with a bright 6x6 square whose place (one of ten) is the image's class: an easy task."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 10
    images = 0.1 * torch.rand(n, 1, 28, 28, generator=generator)
    for label in range(10):
        row, column = 2 + 12 * (label // 5), 2 + 5 * (label % 5)
        images[labels == label, :, row : row + 6, column : column + 6] = 1.0
    return images, labels


def test_the_classifier_maps_images_through_features_of_the_recipe_width_to_ten_logits():
    classifier = build_classifier(ClassifierConfig(conv_channels=(8, 16), feature_dim=32)).eval()
    images = torch.rand(5, 1, 28, 28)
    features = classifier.features(images)
    assert features.shape == (5, 32) and classifier.num_features == 32
    assert bool((features >= 0).all())  # the penultimate layer is a ReLU
    assert classifier(images).shape == (5, 10)
    assert torch.equal(classifier(images), classifier.head(features))


def test_images_whose_side_is_not_a_multiple_of_4_are_refused():
    with pytest.raises(ValueError, match=r"multiples of 4 \(two 2x2 poolings\), got \(1, 30, 30\)"):
        Classifier(TINY, (1, 30, 30))


def test_training_is_seeded_so_a_recipe_and_data_give_one_classifier_and_leave_the_global_generator_alone():
    images, labels = squares(200)
    state = torch.get_rng_state()
    first, history = train_classifier(TINY, images, labels, device="cpu", progress=False)
    assert torch.equal(torch.get_rng_state(), state)
    second, _ = train_classifier(TINY, images, labels, device="cpu", progress=False)
    other, _ = train_classifier(TINY.model_copy(update={"seed": 1}), images, labels, device="cpu", progress=False)
    assert [set(record) for record in history] == [{"train_loss", "train_accuracy", "seconds"}] * 3
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), second.state_dict().values()))
    assert not torch.equal(first.features[0].weight, other.features[0].weight)
    assert not first.training


def test_training_learns_an_easy_task_to_every_held_out_image():
    images, labels = squares(500)
    classifier, history = train_classifier(TINY, images, labels, device="cpu", progress=False)
    held_out, held_out_labels = squares(300, seed=1)
    assert accuracy(classifier, held_out, held_out_labels, batch_size=64) == 1.0
    assert history[-1]["train_loss"] < history[0]["train_loss"]


def test_without_a_terminal_training_reports_its_images_batch_by_batch_over_all_epochs(progress_at_every_update, capsys):
    images, labels = squares(60)  # batches of 25, 25 and 10 images, twice
    train_classifier(TINY.model_copy(update={"epochs": 2}), images, labels, device="cpu")
    assert capsys.readouterr().out.splitlines() == [
        f"classifier training (2 epochs): {done}/120 images ({share}%), 0 s"
        for done, share in [(25, 21), (50, 42), (60, 50), (85, 71), (110, 92), (120, 100)]
    ]


def test_training_with_progress_false_reports_nothing(progress_at_every_update, capsys):
    images, labels = squares(60)
    train_classifier(TINY.model_copy(update={"epochs": 1}), images, labels, device="cpu", progress=False)
    assert capsys.readouterr() == ("", "")


def test_train_subset_keeps_the_first_images_and_must_not_exceed_them():
    images, labels = squares(200)
    subset, _ = train_classifier(TINY.model_copy(update={"train_subset": 100}), images, labels, device="cpu", progress=False)
    first_100, _ = train_classifier(TINY, images[:100], labels[:100], device="cpu", progress=False)
    assert all(torch.equal(a, b) for a, b in zip(subset.state_dict().values(), first_100.state_dict().values()))
    with pytest.raises(ValueError, match=r"train_subset \(201\) exceeds the 200 training images"):
        train_classifier(TINY.model_copy(update={"train_subset": 201}), images, labels, device="cpu", progress=False)


def test_images_that_are_not_float_batches_with_one_label_each_are_refused():
    with pytest.raises(ValueError, match=r"images must be float \[N, C, H, W\] with labels \[N\], got torch.uint8"):
        train_classifier(TINY, torch.zeros(4, 1, 28, 28, dtype=torch.uint8), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"and labels \(3,\)"):
        train_classifier(TINY, torch.zeros(4, 1, 28, 28), torch.zeros(3, dtype=torch.long))


def test_accuracy_is_the_share_of_images_whose_most_likely_class_is_their_label():
    classifier = build_classifier(TINY)
    images, labels = squares(130)
    predicted = classifier.eval()(images).argmax(1)
    labels[:40] = predicted[:40]  # 40 right for sure; the rest right where the untrained classifier happens to be
    labels[40:] = (predicted[40:] + 1 + torch.arange(90) % 9) % 10  # and these wrong for sure
    classifier.train()
    assert accuracy(classifier, images, labels, batch_size=32) == pytest.approx(40 / 130, abs=1e-7)
    assert classifier.training  # flags put back


def test_saved_weights_load_back_to_the_same_network_in_eval_mode(tmp_path):
    images, labels = squares(100)
    classifier, _ = train_classifier(TINY, images, labels, device="cpu", progress=False)
    save_classifier(classifier, tmp_path / "classifier.safetensors")
    loaded = load_classifier(tmp_path / "classifier.safetensors")
    assert loaded.config == TINY and not loaded.training
    assert torch.equal(loaded(images), classifier(images))


def test_a_pickle_in_place_of_the_weights_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "payload-ran"

    class Payload:
        def __reduce__(self):
            return (marker.touch, ())

    path = tmp_path / "classifier.safetensors"
    path.write_bytes(pickle.dumps({"features.0.weight": Payload()}))
    with pytest.raises(ValueError, match=rf"{path}: not a readable safetensors file"):
        load_classifier(path)
    torch.save({"features.0.weight": Payload()}, path)
    with pytest.raises(ValueError, match=rf"{path}: not a readable safetensors file"):
        load_classifier(path)
    assert not marker.exists()


def test_weights_of_another_layout_or_with_a_bad_recipe_are_refused_by_name(tmp_path):
    from safetensors.torch import save_file

    classifier = build_classifier(TINY)
    state = {name: tensor.contiguous() for name, tensor in classifier.state_dict().items()}
    other = tmp_path / "other.safetensors"
    save_file(state, str(other), metadata={"architecture": "resnet/9", "recipe": TINY.model_dump_json(), "image_shape": "[1, 28, 28]"})
    with pytest.raises(ValueError, match=rf"{other}: a classifier of layout 'resnet/9', expected '{ARCHITECTURE}'"):
        load_classifier(other)
    bad = tmp_path / "bad.safetensors"
    recipe = TINY.model_dump_json().replace('"feature_dim":32', '"feature_dim":-1')
    save_file(state, str(bad), metadata={"architecture": ARCHITECTURE, "recipe": recipe, "image_shape": "[1, 28, 28]"})
    with pytest.raises(ValueError, match=rf"{bad}: not a classifier this code can load \(ValidationError"):
        load_classifier(bad)
    wider = tmp_path / "wider.safetensors"
    recipe = TINY.model_dump_json().replace('"feature_dim":32', '"feature_dim":33')
    save_file(state, str(wider), metadata={"architecture": ARCHITECTURE, "recipe": recipe, "image_shape": "[1, 28, 28]"})
    with pytest.raises(ValueError, match=rf"{wider}: not a classifier this code can load \(RuntimeError: Error\(s\) in loading"):
        load_classifier(wider)
