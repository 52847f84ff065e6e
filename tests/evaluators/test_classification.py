"""Tests of the classification task: settings, data, candidate checks, training and the sandbox worker.

Candidates are loaded with the sandbox's RestrictedPython loader, as in a run.
"""

from __future__ import annotations

import ast
import dataclasses
import itertools
import math
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from evaluators.classification import PRESETS, ClassificationSettings, ClassificationTask
from evaluators.classification.checks import PROBE_TARGET_LOGITS, probe_logits, run_unit_tests
from evaluators.classification.data import cache_path, load_splits, prepare_dataset, read_cifar10
from evaluators.classification.models import ResNet18
from evaluators.classification.task import SEED_GROUPS
from evaluators.classification.trainer import augment_batch
from evaluators.task import CandidateRejected
from sandbox.loader import load_candidate
from sandbox.protocol import Job, JobKind, Stage
from sandbox.worker import run_job
from seeds import SEEDS_DIR

TASK = ClassificationTask()
TINY = PRESETS["tiny"]
LN10 = math.log(10.0)


def candidate_code(name: str, body: str) -> str:
    return f"import torch\nimport torch.nn.functional as F\n\n\ndef {name}(logits, targets):\n    return {body}\n"


def load(code: str):
    return load_candidate(code, TASK.interface.params, {})


def seed_code(name: str) -> str:
    (seed,) = [seed for seed in TASK.seeds() if seed.name == name]
    return seed.code


@pytest.fixture(scope="module")
def digits_cache(tmp_path_factory) -> Path:
    cache_dir = tmp_path_factory.mktemp("cache")
    TASK.prepare(TINY, cache_dir, lambda step, total, message: None)
    return cache_dir


def write_fake_cifar10(folder: Path, images_per_batch: int) -> None:
    """Write six batches in CIFAR-10's pickle layout; image i of a batch has red = i, green = 2i, blue = 3i."""
    folder.mkdir(parents=True)
    index = np.arange(images_per_batch, dtype=np.uint8)
    planes = [np.repeat((index * k)[:, None], 1024, axis=1) for k in (1, 2, 3)]
    data = np.concatenate(planes, axis=1).astype(np.uint8)  # (N, 3072): red plane, green plane, blue plane
    labels = [int(i) % 10 for i in range(images_per_batch)]
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        filenames = [b"x.png"] * len(labels)
        batch = {b"batch_label": name.encode(), b"data": data, b"labels": labels, b"filenames": filenames}
        with open(folder / name, "wb") as handle:
            pickle.dump(batch, handle, protocol=2)


# --- settings ----------------------------------------------------------------------------------


def test_presets_are_valid_settings():
    presets = TASK.presets()
    assert TASK.default_preset == "cpu"
    assert set(presets) == {"cpu", "tiny", "cifar10-resnet18"}
    assert all(isinstance(settings, ClassificationSettings) for settings in presets.values())
    study = presets["cifar10-resnet18"]
    assert (study.dataset, study.model, study.epochs) == ("cifar10", "resnet18", 5)


def test_settings_report_every_error_at_once():
    with pytest.raises(ValueError) as raised:
        ClassificationSettings(dataset="mnist", epochs=0, learning_rate=-1.0)
    message = str(raised.value)
    assert "dataset='mnist'" in message
    assert "epochs=0" in message
    assert "learning_rate=-1.0" in message


def test_cifar10_settings_need_data_dir():
    with pytest.raises(ValueError, match="data_dir is empty"):
        ClassificationSettings(dataset="cifar10", model="resnet18", data_dir="")


def test_settings_round_trip_through_dict():
    settings = PRESETS["cifar10-resnet18"]
    assert TASK.settings_from_dict(TASK.settings_to_dict(settings)) == settings


def test_seed_index_matches_seed_files():
    on_disk = sorted(path.stem for path in (SEEDS_DIR / "classification").glob("*.py"))
    indexed = [name for group in SEED_GROUPS.values() for name in group]
    assert sorted(indexed) == on_disk


@pytest.mark.parametrize("name", SEED_GROUPS["baselines"])
def test_seed_file_defines_one_plain_function(name):
    tree = ast.parse((SEEDS_DIR / "classification" / f"{name}.py").read_text())
    functions = [node for node in tree.body if isinstance(node, ast.FunctionDef)]
    imports = {alias.name for node in tree.body if isinstance(node, (ast.Import, ast.ImportFrom))
               for alias in node.names}
    assert [function.name for function in functions] == [name]
    assert [arg.arg for arg in functions[0].args.args] == ["logits", "targets"]
    assert imports <= {"torch", "torch.nn.functional"}


# --- data --------------------------------------------------------------------------------------


def test_digits_split_is_fixed(digits_cache):
    first = load_splits(TINY, digits_cache)
    second = load_splits(TINY, digits_cache)
    # 1,797 images; round(1797 * 0.2) = round(359.4) = 359 are held out
    assert first.train_images.shape == (1438, 1, 8, 8)
    assert first.val_images.shape == (359, 1, 8, 8)
    assert torch.equal(first.val_images, second.val_images)
    assert torch.equal(first.train_labels, second.train_labels)
    other_split = load_splits(dataclasses.replace(TINY, split_seed=1), digits_cache)
    assert not torch.equal(first.val_labels, other_split.val_labels)


def test_digits_are_standardised_with_training_statistics(digits_cache):
    splits = load_splits(TINY, digits_cache)
    normalized = splits.normalize(splits.train_images)
    assert splits.pixel_max == 16.0
    assert abs(float(normalized.mean())) < 1e-4
    assert abs(float(normalized.std()) - 1.0) < 1e-3


def test_prepare_keeps_an_existing_cache_file(digits_cache):
    path = cache_path(TINY, digits_cache)
    before = path.stat().st_mtime_ns
    assert prepare_dataset(TINY, digits_cache) == path
    assert path.stat().st_mtime_ns == before


def test_cifar10_reader_decodes_pickle_batches(tmp_path):
    write_fake_cifar10(tmp_path / "cifar-10-batches-py", images_per_batch=6)
    payload = read_cifar10(tmp_path)
    assert payload["train_images"].shape == (30, 3, 32, 32)
    assert payload["test_images"].shape == (6, 3, 32, 32)
    assert payload["train_images"].dtype == torch.uint8
    # image 5 of each batch: red plane 5, green plane 10, blue plane 15
    assert payload["train_images"][5, :, 7, 9].tolist() == [5, 10, 15]
    assert payload["train_labels"][:7].tolist() == [0, 1, 2, 3, 4, 5, 0]


def test_cifar10_missing_data_names_path_and_fix(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError) as raised:
        read_cifar10(missing)
    message = str(raised.value)
    assert str(missing) in message
    assert "cifar-10-python.tar.gz" in message
    assert "--set data_dir=" in message


def test_cifar10_reader_rejects_other_pickled_objects(tmp_path):
    write_fake_cifar10(tmp_path / "cifar", images_per_batch=2)
    with open(tmp_path / "cifar" / "data_batch_3", "wb") as handle:
        pickle.dump({b"data": os.getcwd, b"labels": []}, handle, protocol=2)
    with pytest.raises(pickle.UnpicklingError, match="getcwd is not allowed"):
        read_cifar10(tmp_path / "cifar")


# --- candidate checks ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, uniform_loss",
    [
        # all-equal logits give p = 1/10 for every class
        ("cross_entropy", LN10),  # -log(1/10)
        ("label_smoothing", LN10),  # 0.9 * ln 10 + 0.1 * mean_k(-log 1/10) = ln 10
        ("focal", (1 - 0.1) ** 2 * LN10),  # (1 - p_t)^2 * ln 10 = 0.81 * 2.302585
    ],
)
def test_seeds_pass_unit_tests(name, uniform_loss):
    metrics = TASK.unit_test(load(seed_code(name)), TINY)
    assert metrics["uniform_logits_loss"] == pytest.approx(uniform_loss, rel=1e-6)
    assert len(metrics["probe"]) == 21


def test_probe_of_cross_entropy_matches_hand_values():
    probe = TASK.unit_test(load(seed_code("cross_entropy")), TINY)["probe"]
    # sweep row m: target logit m, nine others 0, so CE = log(e^m + 9) - m
    for value, m in zip(probe, PROBE_TARGET_LOGITS):
        # float32 log-softmax of logits near 6 is accurate to a few units of 6 * 2^-24
        assert value == pytest.approx(math.log(math.exp(m) + 9) - m, abs=2e-6)
    logits, targets = probe_logits()
    expected = F.cross_entropy(logits.double(), targets, reduction="none")
    assert probe[13:] == pytest.approx(expected[13:].tolist(), abs=2e-6)


def test_probe_separates_the_seeds():
    probes = [tuple(TASK.unit_test(load(seed.code), TINY)["probe"]) for seed in TASK.seeds()]
    assert len(set(probes)) == 3


REJECTED = [
    ("reduced", "F.cross_entropy(logits, targets)", "shape", "expected (1,)"),
    ("python_float", "1.0", "shape", "returned a float"),
    ("integer_loss", "(logits.argmax(dim=-1) != targets).long()", "dtype_device", "torch.int64"),
    ("detached", "F.cross_entropy(logits.detach(), targets, reduction='none')", "zero_gradient", "autograd"),
    ("ignores_labels", "torch.logsumexp(logits, dim=-1)", "ignores_targets", "same values"),
    # bfloat16 logits times a float32 vector
    ("mixed_dtype", "(logits @ torch.ones(10)) * 0 + F.cross_entropy(logits, targets, reduction='none')",
     "dtype_device", "bfloat16 random logits"),
    # softmax of -100 relative logits underflows, and log(0) has an infinite slope
    ("naive_log_softmax", "-torch.log(torch.softmax(logits, dim=-1).gather(1, targets.unsqueeze(1))).squeeze(1)",
     "nan", "magnitude 50"),
    # cross-entropy is exactly 0 for confident correct logits, where sqrt has an infinite slope
    ("sqrt_of_ce", "torch.sqrt(F.cross_entropy(logits, targets, reduction='none'))", "nan",
     "confident correct logits"),
]


@pytest.mark.parametrize("name, body, category, fragment", REJECTED, ids=[case[0] for case in REJECTED])
def test_unit_tests_reject_broken_losses(name, body, category, fragment):
    with pytest.raises(CandidateRejected) as raised:
        run_unit_tests(load(candidate_code(name, body)))
    assert raised.value.category == category
    assert fragment in raised.value.reason


# --- training --------------------------------------------------------------------------------------


def quiet(step: int, total: int, message: str) -> None:
    pass


def test_evaluate_trains_and_reports_metrics(digits_cache):
    events = []
    outcome = TASK.evaluate(load(seed_code("cross_entropy")), TINY, digits_cache, digits_cache,
                            lambda *event: events.append(event), seed=0)
    metrics = outcome.metrics
    # one epoch of an MLP on the digits reaches about 85%; chance is 10%
    assert 0.75 < outcome.fitness <= 1.0
    assert outcome.fitness == metrics["accuracy"]
    assert metrics["accuracy_per_run"] == [outcome.fitness]
    assert len(metrics["train_curve"]) == TINY.epochs
    assert metrics["final_train_loss"] == metrics["train_curve"][-1]
    assert metrics["train_curve"][0] < LN10  # below the loss of a uniform guess
    assert (metrics["num_train"], metrics["num_validation"]) == (1438, 359)
    assert metrics["time_s"] > 0
    assert events[-1][:2] == (1, 1)


def test_evaluate_is_deterministic_for_a_seed(digits_cache):
    settings = dataclasses.replace(TINY, num_runs=2)
    candidate = load(seed_code("label_smoothing"))
    first = TASK.evaluate(candidate, settings, digits_cache, digits_cache, quiet, seed=3)
    second = TASK.evaluate(candidate, settings, digits_cache, digits_cache, quiet, seed=3)
    assert first.metrics["accuracy_per_run"] == second.metrics["accuracy_per_run"]
    assert first.metrics["train_curve"] == second.metrics["train_curve"]
    assert first.fitness == pytest.approx(sum(first.metrics["accuracy_per_run"]) / 2)


def test_evaluate_with_bfloat16_autocast(digits_cache):
    settings = dataclasses.replace(TINY, precision="bfloat16")
    outcome = TASK.evaluate(load(seed_code("focal")), settings, digits_cache, digits_cache, quiet, seed=0)
    assert 0.5 < outcome.fitness <= 1.0


def test_evaluate_rejects_a_reduced_loss(digits_cache):
    candidate = load(candidate_code("reduced", "F.cross_entropy(logits, targets)"))
    with pytest.raises(CandidateRejected) as raised:
        TASK.evaluate(candidate, TINY, digits_cache, digits_cache, quiet, seed=0)
    assert (raised.value.category, raised.value.stage) == ("shape", "train")
    assert "batch of 32" in raised.value.reason


def test_evaluate_rejects_an_overflowing_loss(digits_cache):
    # cross-entropy above 3.4 times 1e38 exceeds float32's maximum of 3.4e38
    candidate = load(candidate_code("huge", "F.cross_entropy(logits, targets, reduction='none') * 1e38"))
    with pytest.raises(CandidateRejected) as raised:
        TASK.evaluate(candidate, TINY, digits_cache, digits_cache, quiet, seed=0)
    assert (raised.value.category, raised.value.stage) == ("nan", "train")
    assert "step 0" in raised.value.reason


def test_resnet18_shape_and_size():
    model = ResNet18(num_classes=10)
    # the parameter count usually reported for the CIFAR form of ResNet-18
    assert sum(p.numel() for p in model.parameters()) == 11_173_962
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 10)


def test_augment_batch_shifts_and_flips_each_image():
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(6, 3, 32, 32, generator=generator) + 1.0  # no pixel is 0, so padding is visible
    augmented = augment_batch(images, generator)
    assert augmented.shape == images.shape
    padded = F.pad(images, (4, 4, 4, 4))
    for index in range(6):
        candidates = [
            view
            for dy, dx in itertools.product(range(9), range(9))
            for view in (padded[index, :, dy : dy + 32, dx : dx + 32],
                         padded[index, :, dy : dy + 32, dx : dx + 32].flip(2))
        ]
        assert any(torch.equal(augmented[index], view) for view in candidates)


def test_cifar10_resnet18_trains_on_a_small_fake_copy(tmp_path):
    data_dir = tmp_path / "cifar"
    write_fake_cifar10(data_dir / "cifar-10-batches-py", images_per_batch=12)
    settings = dataclasses.replace(
        PRESETS["cifar10-resnet18"], data_dir=str(data_dir), train_subset=16, batch_size=8, epochs=1,
        device="cpu", precision="float32", num_threads=1,
    )
    TASK.prepare(settings, tmp_path / "cache", quiet)
    outcome = TASK.evaluate(load(seed_code("cross_entropy")), settings, tmp_path / "cache", tmp_path, quiet, seed=0)
    assert (outcome.metrics["num_train"], outcome.metrics["num_validation"]) == (16, 12)
    assert 0.0 <= outcome.fitness <= 1.0
    assert math.isfinite(outcome.metrics["final_train_loss"])


# --- the sandbox worker ---------------------------------------------------------------------------


def run_worker(tmp_path: Path, kind: JobKind, code: str, cache_dir: Path):
    job_dir = tmp_path / kind.value
    job_dir.mkdir()
    job = Job(kind=kind, task="classification", settings=TASK.settings_to_dict(TINY), cache_dir=str(cache_dir),
              code=code)
    return run_job(job, job_dir)


def test_worker_runs_unit_test_and_evaluate(tmp_path, digits_cache):
    code = seed_code("label_smoothing")
    unit = run_worker(tmp_path, JobKind.UNIT_TEST, code, digits_cache)
    assert unit.ok, unit.reason
    assert len(unit.metrics["probe"]) == 21
    evaluated = run_worker(tmp_path, JobKind.EVALUATE, code, digits_cache)
    assert evaluated.ok, evaluated.reason
    assert evaluated.stage is Stage.EVALUATE
    assert evaluated.fitness == evaluated.metrics["accuracy"]


def test_worker_rejects_the_preference_interface(tmp_path, digits_cache):
    code = (
        "import torch.nn.functional as F\n\n\n"
        "def dpo(self, policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps):\n"
        "    return -F.logsigmoid(policy_chosen_logps - policy_rejected_logps)\n"
    )
    result = run_worker(tmp_path, JobKind.UNIT_TEST, code, digits_cache)
    assert not result.ok
    assert result.stage is Stage.STATIC
    assert "logits" in result.reason
