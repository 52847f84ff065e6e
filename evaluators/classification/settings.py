"""Settings of the classification task and its named presets."""

from __future__ import annotations

from dataclasses import dataclass

DATASETS = ("digits", "cifar10")
MODELS = ("mlp", "resnet18")
OPTIMIZERS = ("sgd", "adam")
DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("float32", "bfloat16")


@dataclass(frozen=True)
class ClassificationSettings:
    """Settings of one training run with a candidate classification loss.

    Attributes:
        dataset: "digits" is the 8x8 handwritten digits set bundled with
            scikit-learn (1,797 images, 10 classes), split into train and
            validation by `split_seed`. "cifar10" is CIFAR-10 read from
            `data_dir`; its 10,000 test images are the validation split.
        data_dir: directory that contains CIFAR-10's python pickle batches
            (data_batch_1 ... data_batch_5 and test_batch), either directly or
            in its subdirectory cifar-10-batches-py. Only read by `prepare`,
            and only for dataset "cifar10".
        validation_fraction: share of the digits images held out for
            validation. Ignored for CIFAR-10.
        split_seed: seed of the digits train/validation split, fixed so that
            every candidate is scored on the same images.
        train_subset: train on only the first this many training images
            (after the split), 0 for all of them.
        model: "mlp" is one hidden ReLU layer of `hidden_size` units on the
            flattened image; "resnet18" is ResNet-18 in its CIFAR form (3x3
            stem, no max-pooling).
        hidden_size: width of the MLP's hidden layer.
        epochs: passes over the training images.
        batch_size: images per optimizer step.
        optimizer: "sgd" (with Nesterov momentum 0.9) or "adam".
        learning_rate: peak learning rate.
        weight_decay: L2 penalty added by the optimizer.
        lr_schedule: "constant", or "linear" warm-up over the first 20% of
            steps followed by linear decay to zero (a one-cycle schedule).
        augment: random 4-pixel-padded crops and horizontal flips of each
            training batch (only sensible for CIFAR-10).
        num_runs: independent trainings per evaluation, each with its own
            initialisation and batch order. The fitness is their mean
            validation accuracy, whose seed noise falls as 1/sqrt(num_runs).
        device: "auto" picks CUDA when available, else the CPU.
        num_threads: CPU threads torch may use during an evaluation, 0 for
            torch's default (OMP_NUM_THREADS). The MLP's matrices are too
            small to split: on a loaded 2-core machine its cpu preset took
            0.4 s with one thread and 9 to 27 s with two.
        precision: "bfloat16" runs the forward pass and the loss under
            autocast (on the GPU or the CPU), so the candidate receives
            bfloat16 logits. "float32" runs everything in float32.
    """

    dataset: str = "digits"
    data_dir: str = ""
    validation_fraction: float = 0.2
    split_seed: int = 0
    train_subset: int = 0
    model: str = "mlp"
    hidden_size: int = 128
    epochs: int = 5
    batch_size: int = 32
    optimizer: str = "sgd"
    learning_rate: float = 0.05
    weight_decay: float = 0.0
    lr_schedule: str = "constant"
    augment: bool = False
    num_runs: int = 3
    device: str = "auto"
    num_threads: int = 1
    precision: str = "float32"

    def __post_init__(self) -> None:
        errors = []
        choices = (
            ("dataset", DATASETS),
            ("model", MODELS),
            ("optimizer", OPTIMIZERS),
            ("lr_schedule", ("constant", "linear")),
            ("device", DEVICES),
            ("precision", PRECISIONS),
        )
        for name, allowed in choices:
            value = getattr(self, name)
            if value not in allowed:
                errors.append(f"{name}={value!r} is invalid; expected one of {', '.join(allowed)}")
        for name in ("hidden_size", "epochs", "batch_size", "num_runs"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                errors.append(f"{name}={value!r} is invalid; expected an integer >= 1")
        for name in ("split_seed", "train_subset", "num_threads"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                errors.append(f"{name}={value!r} is invalid; expected an integer >= 0")
        if not isinstance(self.learning_rate, (int, float)) or not self.learning_rate > 0:
            errors.append(f"learning_rate={self.learning_rate!r} is invalid; expected a number > 0")
        if not isinstance(self.weight_decay, (int, float)) or self.weight_decay < 0:
            errors.append(f"weight_decay={self.weight_decay!r} is invalid; expected a number >= 0")
        if not isinstance(self.validation_fraction, (int, float)) or not 0 < self.validation_fraction < 1:
            errors.append(f"validation_fraction={self.validation_fraction!r} is invalid; expected a number in (0, 1)")
        if self.dataset == "cifar10" and not self.data_dir:
            errors.append(
                "data_dir is empty but dataset is 'cifar10'; set it to the directory holding "
                "cifar-10-batches-py, e.g. --set data_dir=/data/cifar10"
            )
        if self.dataset == "digits" and self.model == "resnet18":
            errors.append("model 'resnet18' needs 32x32 RGB images; use model='mlp' with dataset 'digits'")
        if errors:
            raise ValueError("invalid classification settings:\n  " + "\n  ".join(errors))


# "cpu": an MLP 64-128-10 on the digits, 5 epochs of SGD, three runs. On the
# 2-core development machine training and scoring took 0.2 to 0.4 s when run
# directly, and 2 to 5 s inside the process sandbox while other jobs kept the
# load average near 5. Each sandbox job also spends seconds importing torch.
CPU_PRESET = ClassificationSettings()

# "tiny": one run of one epoch, for tests.
TINY_PRESET = ClassificationSettings(epochs=1, num_runs=1)

# "cifar10-resnet18": the setting of the DiscoPOP study's classification case
# study (Lu et al. 2024, arXiv:2406.08414): ResNet-18 trained on CIFAR-10 for
# 5 epochs. The optimizer, schedule and augmentation are the common CIFAR-10
# ResNet-18 recipe (SGD with momentum, one-cycle learning rate, crops and
# flips), not values taken from the study. It needs a GPU to be practical:
# on a CPU one run takes hours. Set data_dir with --set data_dir=PATH.
CIFAR10_RESNET18_PRESET = ClassificationSettings(
    dataset="cifar10",
    data_dir="data/cifar10",
    model="resnet18",
    epochs=5,
    batch_size=128,
    optimizer="sgd",
    learning_rate=0.1,
    weight_decay=5e-4,
    lr_schedule="linear",
    augment=True,
    num_runs=1,
    num_threads=0,
    precision="bfloat16",
)

PRESETS: dict[str, ClassificationSettings] = {
    "cpu": CPU_PRESET,
    "tiny": TINY_PRESET,
    "cifar10-resnet18": CIFAR10_RESNET18_PRESET,
}
