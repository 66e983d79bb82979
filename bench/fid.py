"""Benchmark of sample quality: the default classifier recipe's time and test accuracy per data set, reference FIDs
(the training set, binarized copies of the test set), and each preset's FID after a given number of epochs.

    VAE_DATA_MIRROR=../shared/data .venv/bin/python bench/fid.py --epochs 10 --conv-epochs 3

Trains with the engine alone (no Prefect, no MLflow): the figures are those a training run logs as test_fid,
test_reconstruction_fid and test_reconstruction_accuracy, on a classifier of the (default) recipe as a run registers it.
"""

from __future__ import annotations

import argparse
import time

import torch

from pipeline import data, training
from pipeline.config import PRESETS, load_config
from vae.classifier import accuracy, train_classifier
from vae.config import ClassifierConfig
from vae.data import binarize
from vae.sample_quality import frechet_distance, sample_quality


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=10, help="epochs of the MLP presets (default: %(default)s)")
    parser.add_argument("--conv-epochs", type=int, default=3, help="epochs of the conv presets (default: %(default)s)")
    parser.add_argument("--presets", nargs="*", default=list(PRESETS), help="which presets (default: all)")
    parser.add_argument("--datasets", nargs="*", default=["mnist", "fashion-mnist"], help="which data sets (default: both)")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    parser.add_argument("--recipe", default="{}", help='classifier recipe fields over the default, as JSON: \'{"epochs": 5}\'')
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    recipe = ClassifierConfig.model_validate_json(args.recipe)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; classifier recipe {recipe}", flush=True)
    classifiers, grayscale = {}, {}
    for dataset in args.datasets:
        raw = data.load(dataset)
        train = binarize(raw.train_images, raw.train_labels, "none")
        test = binarize(raw.test_images, raw.test_labels, "none")
        wall, cpu = time.perf_counter(), time.process_time()
        classifier, history = train_classifier(recipe, train.pixels, train.labels, device="cpu", progress=False)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        test_accuracy = accuracy(classifier, test.pixels, test.labels)
        epochs = ", ".join(f"{record['seconds']:.1f}" for record in history)
        print(f"\n{dataset} classifier: test accuracy {test_accuracy:.2%}, {wall:.1f} s wall ({epochs} per epoch), {cpu:.1f} s CPU", flush=True)
        generator = torch.Generator().manual_seed(0)
        references = {
            "training images (last 10k)": train.pixels[-10_000:],
            "test images thresholded at 0.5": (test.pixels >= 0.5).float(),
            "test images, one dynamic binarization": (torch.rand(test.pixels.shape, generator=generator) < test.pixels).float(),
        }
        for name, images in references.items():
            print(f"  FID of {name} against the test images: {frechet_distance(classifier, test.pixels, images):.3f}", flush=True)
        classifiers[dataset], grayscale[dataset] = classifier, test.pixels

    print("\n| preset | epochs | test_fid | test_reconstruction_fid | test_reconstruction_accuracy | training s |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |", flush=True)
    for preset in [name for name in args.presets if PRESETS[name]["data"]["dataset"] in args.datasets]:
        epochs = args.conv_epochs if PRESETS[preset]["model"]["architecture"] == "conv" else args.epochs
        config = load_config(preset, {"train.epochs": epochs, "train.device": "cpu"})
        prepared = data.prepare_configured(config.data, data.fetch(config.data.dataset))
        started = time.perf_counter()
        model, _ = training.train(config, prepared, progress=False)
        seconds = time.perf_counter() - started
        quality = sample_quality(
            model, classifiers[config.data.dataset], grayscale[config.data.dataset], prepared.test,
            samples=config.eval.fid_samples, batch_size=config.eval.batch_size, seed=config.eval.seed,
        )
        print(
            f"| `{preset}` | {epochs} | {quality['fid']:.2f} | {quality['reconstruction_fid']:.2f} | "
            f"{quality['reconstruction_accuracy']:.2%} | {seconds:.0f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
