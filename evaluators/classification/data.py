"""Image data of the classification task: preparing it once, then reading it for each evaluation.

`prepare_dataset` runs in the trusted prepare job: it reads the digits from
scikit-learn or CIFAR-10 from its python pickle batches and stores the images
as uint8 tensors under the cache directory. `load_splits` runs inside the
sandbox and reads only that cache file, so an evaluation needs neither
scikit-learn nor the original data directory.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from evaluators.classification.settings import ClassificationSettings

CACHE_SUBDIR = "classification"
_CACHE_VERSION = 1

CIFAR10_TRAIN_BATCHES = tuple(f"data_batch_{index}" for index in range(1, 6))
CIFAR10_TEST_BATCH = "test_batch"
CIFAR10_FOLDER = "cifar-10-batches-py"
CIFAR10_SOURCE = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"

# The only globals a CIFAR-10 batch may name: what numpy needs to rebuild an
# array, and the str-to-bytes conversion that Python 3 writes for bytes under
# pickle protocol 2. Anything else in the pickle stream is rejected before it can run.
_ALLOWED_PICKLE_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),
}


@dataclass(frozen=True)
class Splits:
    """Training and validation images as uint8 (N, C, H, W) with int64 labels (N,).

    `pixel_max` is the largest raw pixel value (16 for the digits, 255 for
    CIFAR-10). `mean` and `std` are per-channel statistics of the training
    images after division by `pixel_max`, used to standardise every batch.
    """

    train_images: torch.Tensor
    train_labels: torch.Tensor
    val_images: torch.Tensor
    val_labels: torch.Tensor
    pixel_max: float
    mean: torch.Tensor
    std: torch.Tensor
    num_classes: int

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """Return uint8 images as standardised float32 on their own device."""
        scaled = images.float() / self.pixel_max
        mean = self.mean.to(images.device).view(1, -1, 1, 1)
        std = self.std.to(images.device).view(1, -1, 1, 1)
        return (scaled - mean) / std

    def to(self, device: torch.device) -> Splits:
        return Splits(
            self.train_images.to(device),
            self.train_labels.to(device),
            self.val_images.to(device),
            self.val_labels.to(device),
            self.pixel_max,
            self.mean,
            self.std,
            self.num_classes,
        )


def cache_path(settings: ClassificationSettings, cache_dir: Path) -> Path:
    """Return the file that `prepare_dataset` writes for the settings' dataset."""
    return Path(cache_dir) / CACHE_SUBDIR / f"{settings.dataset}-v{_CACHE_VERSION}.pt"


def prepare_dataset(settings: ClassificationSettings, cache_dir: Path) -> Path:
    """Write the dataset's images and labels to the cache unless they are there; return the file."""
    path = cache_path(settings, cache_dir)
    if path.exists():
        return path
    if settings.dataset == "digits":
        payload = read_digits()
    else:
        payload = read_cifar10(Path(settings.data_dir).expanduser())
    path.parent.mkdir(parents=True, exist_ok=True)

    # write to a temporary name first, so that a crash never leaves a truncated cache file
    partial = path.with_name(path.name + ".partial")
    torch.save(payload, partial)
    partial.replace(path)
    return path


def read_digits() -> dict[str, Any]:
    """Return scikit-learn's bundled 8x8 digits as uint8 images (1797, 1, 8, 8) with pixels 0..16."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as error:
        raise ImportError(
            f"the digits dataset comes from scikit-learn, which cannot be imported ({error}); "
            "install it with `pip install scikit-learn`"
        ) from None
    digits = load_digits()
    images = torch.as_tensor(digits.images).round().to(torch.uint8).unsqueeze(1)  # (N, 1, 8, 8)
    labels = torch.as_tensor(digits.target, dtype=torch.int64)
    return {"images": images, "labels": labels, "pixel_max": 16.0, "num_classes": 10}


def read_cifar10(data_dir: Path) -> dict[str, Any]:
    """Read CIFAR-10's python pickle batches into uint8 tensors (N, 3, 32, 32).

    Raises:
        FileNotFoundError: when a batch file is missing; the message names the
            directory searched and where to get the data.
    """
    folder = find_cifar10_folder(data_dir)
    train = [_read_cifar10_batch(folder / name) for name in CIFAR10_TRAIN_BATCHES]
    test_images, test_labels = _read_cifar10_batch(folder / CIFAR10_TEST_BATCH)
    return {
        "train_images": torch.cat([images for images, _ in train]),
        "train_labels": torch.cat([labels for _, labels in train]),
        "test_images": test_images,
        "test_labels": test_labels,
        "pixel_max": 255.0,
        "num_classes": 10,
    }


def find_cifar10_folder(data_dir: Path) -> Path:
    """Return `data_dir` or its cifar-10-batches-py subdirectory, whichever contains all six batches."""
    expected = (*CIFAR10_TRAIN_BATCHES, CIFAR10_TEST_BATCH)
    for folder in (data_dir, data_dir / CIFAR10_FOLDER):
        if all((folder / name).is_file() for name in expected):
            return folder
    present = sorted(p.name for p in data_dir.iterdir()) if data_dir.is_dir() else []
    found = f"it contains {present[:8]}" if data_dir.is_dir() else "it does not exist"
    raise FileNotFoundError(
        f"CIFAR-10 not found in {data_dir.resolve()} ({found}): expected the python pickle batches "
        f"{', '.join(expected)} there or in its subdirectory {CIFAR10_FOLDER}. "
        f"Download {CIFAR10_SOURCE}, extract it with `tar xzf cifar-10-python.tar.gz -C {data_dir}`, "
        "or point the task at another copy with --set data_dir=PATH."
    )


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickler that rebuilds numpy arrays and rejects every other global."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _ALLOWED_PICKLE_GLOBALS:
            raise pickle.UnpicklingError(
                f"{module}.{name} is not allowed in a CIFAR-10 batch; only numpy arrays, lists and numbers are"
            )
        return super().find_class(module, name)


def _read_cifar10_batch(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    # The batches were written by Python 2's cPickle, so byte strings stay bytes.
    with open(path, "rb") as handle:
        batch = _ArrayUnpickler(handle, encoding="bytes").load()
    if not isinstance(batch, dict) or b"data" not in batch or b"labels" not in batch:
        keys = sorted(batch) if isinstance(batch, dict) else type(batch).__name__
        raise ValueError(f"{path} is not a CIFAR-10 batch: expected a dict with b'data' and b'labels', got {keys}")
    data = torch.as_tensor(batch[b"data"], dtype=torch.uint8)
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise ValueError(f"{path}: data has shape {tuple(data.shape)}; expected (N, 3072)")
    # each row contains the red, then the green, then the blue 32x32 plane
    images = data.reshape(-1, 3, 32, 32)
    labels = torch.as_tensor(batch[b"labels"], dtype=torch.int64)
    if labels.shape != (images.shape[0],):
        raise ValueError(f"{path}: {labels.numel()} labels for {images.shape[0]} images")
    return images, labels


def load_splits(settings: ClassificationSettings, cache_dir: Path) -> Splits:
    """Read the prepared dataset and split it into training and validation images."""
    path = cache_path(settings, cache_dir)
    if not path.exists():
        raise FileNotFoundError(
            f"prepared dataset {path} is missing; run the task's prepare step first "
            "(evolve does so before the first candidate)"
        )
    payload = torch.load(path, weights_only=True)
    if settings.dataset == "digits":
        train_images, train_labels, val_images, val_labels = _split(
            payload["images"], payload["labels"], settings.validation_fraction, settings.split_seed
        )
    else:
        train_images, train_labels = payload["train_images"], payload["train_labels"]
        val_images, val_labels = payload["test_images"], payload["test_labels"]
    if settings.train_subset:
        train_images = train_images[: settings.train_subset]
        train_labels = train_labels[: settings.train_subset]

    # per-channel statistics of the training images only, so validation stays unseen
    scaled = train_images.float() / payload["pixel_max"]
    mean = scaled.mean(dim=(0, 2, 3))
    std = scaled.std(dim=(0, 2, 3)).clamp_min(1e-6)
    return Splits(
        train_images, train_labels, val_images, val_labels, float(payload["pixel_max"]), mean, std,
        int(payload["num_classes"]),
    )


def _split(
    images: torch.Tensor, labels: torch.Tensor, validation_fraction: float, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(images.shape[0], generator=generator)
    num_val = round(images.shape[0] * validation_fraction)
    val, train = order[:num_val], order[num_val:]
    return images[train], labels[train], images[val], labels[val]
