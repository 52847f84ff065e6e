"""The study preset: its values, its plan, the dry run, loading errors offline and a short training on the CPU."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from evaluators.preference.study import (
    STUDY_PRESETS,
    ZEPHYR_7B_GEMMA,
    EstimateAssumptions,
    StudySettings,
    format_plan,
    study_plan,
    study_settings,
)
from evaluators.preference.study_sources import SourceUnavailable, load_pairs, prepare_study
from evaluators.preference.study_training import launch_command, train_study_policy, zero3_active
from sandbox.process_backend import network_isolation_available

ROOT = Path(__file__).resolve().parents[2]

# --- the preset -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "value"),
    [
        # recipes/zephyr-7b-gemma/gpo/config_full.yaml of github.com/luchris429/DiscoPOP
        ("model", "HuggingFaceH4/zephyr-7b-gemma-sft-v0.1"),
        ("reference", "HuggingFaceH4/zephyr-7b-gemma-sft-v0.1"),
        ("dataset", "argilla/dpo-mix-7k"),
        ("beta", 0.05),
        ("learning_rate", 5e-7),
        ("num_train_epochs", 2.0),
        ("per_device_batch_size", 2),
        ("gradient_accumulation_steps", 8),
        ("lr_scheduler", "cosine"),
        ("warmup_ratio", 0.1),
        ("optimizer", "adamw_torch"),
        ("bf16", True),
        ("gradient_checkpointing", True),
        ("max_length", 1024),
        ("deepspeed", "zero3"),
        ("seed", 42),
    ],
)
def test_preset_matches_study_recipe(name, value):
    assert getattr(STUDY_PRESETS["zephyr-7b-gemma"], name) == value


def test_settings_report_every_error():
    with pytest.raises(ValueError) as error:
        StudySettings(beta=0, per_device_batch_size=0, warmup_ratio=1.0, deepspeed="zero2", max_steps=-1)
    message = str(error.value)
    for part in ("beta=0", "per_device_batch_size=0", "warmup_ratio=1.0", "deepspeed='zero2'", "max_steps=-1"):
        assert part in message


def test_overrides_convert_and_reject_unknown():
    settings = study_settings("zephyr-7b-gemma", {"num_train_epochs": 1, "beta": 0.1})
    assert settings.num_train_epochs == 1.0 and isinstance(settings.num_train_epochs, float)
    assert settings.beta == 0.1
    with pytest.raises(ValueError, match=r"unknown study setting\(s\) \['epochs'\]"):
        study_settings("zephyr-7b-gemma", {"epochs": 1})
    with pytest.raises(ValueError, match="unknown study preset 'zephyr'"):
        study_settings("zephyr")


# --- the plan -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("gpus", "effective_batch", "steps_per_epoch"),
    [
        # 8 GPUs: ceil(6750 / 8) = 844 pairs per GPU, 422 batches of 2, ceil(422 / 8) = 53 steps
        (8, 128, 53),
        # 4 GPUs: 1688 pairs per GPU, 844 batches, ceil(844 / 8) = 106 steps
        (4, 64, 106),
        # 1 GPU: 3375 batches, ceil(3375 / 8) = 422 steps
        (1, 16, 422),
    ],
)
def test_plan_steps(gpus, effective_batch, steps_per_epoch):
    plan = study_plan(ZEPHYR_7B_GEMMA, gpus)
    assert plan.train_pairs == 6750
    assert plan.effective_batch == effective_batch
    assert plan.steps_per_epoch == steps_per_epoch
    assert plan.total_steps == 2 * steps_per_epoch
    assert plan.warmup_steps == math.ceil(0.1 * 2 * steps_per_epoch)


def test_plan_suggests_accumulation_for_study_batch():
    assert not any("effective batch" in note for note in study_plan(ZEPHYR_7B_GEMMA, 8).notes)
    notes = study_plan(ZEPHYR_7B_GEMMA, 4).notes
    assert any("--set gradient_accumulation_steps=16" in note for note in notes)


def test_plan_time_estimate():
    assumptions = EstimateAssumptions()
    estimate = study_plan(ZEPHYR_7B_GEMMA, 8, assumptions).estimate
    # 106 steps x 128 pairs x 2 sequences x 500 tokens x 10 x 8.5e9 FLOPs / (8 x 312e12 x 0.35 FLOP/s)
    assert estimate.train_s == pytest.approx(106 * 128 * 2 * 500 * 10 * 8.5e9 / (8 * 312e12 * 0.35))
    # 2 turns x ceil(80 / 16) batches x 1024 tokens x (2 x 8.5e9 bytes / 2.0e12 bytes/s)
    assert estimate.answer_s == pytest.approx(2 * 5 * 1024 * (2 * 8.5e9 / 2.0e12))
    # 160 requests of 10 s, 4 at a time
    assert estimate.judge_s == pytest.approx(400.0)
    assert estimate.total_s == pytest.approx(estimate.train_s + estimate.answer_s + 400.0 + 180.0)


def test_plan_without_known_data_size():
    plan = study_plan(study_settings("zephyr-7b-gemma", {"dataset": "/data/my_pairs.jsonl"}), 8)
    assert plan.train_pairs is None
    assert plan.steps_per_epoch is None
    assert plan.estimate is None
    assert "unknown until the size of the training data is known" in format_plan(plan)


def test_plan_rejects_zero_gpus():
    with pytest.raises(ValueError, match="gpus=0 is invalid"):
        study_plan(ZEPHYR_7B_GEMMA, 0)


def test_format_plan_shows_study_values():
    text = format_plan(study_plan(ZEPHYR_7B_GEMMA, 8, preset="zephyr-7b-gemma"))
    for expected in (
        "policy model:     HuggingFaceH4/zephyr-7b-gemma-sft-v0.1",
        "argilla/dpo-mix-7k",
        "training pairs:   6750",
        "loss beta:        0.05",
        "learning rate 5e-07",
        "cosine, warmup ratio 0.1 (11 steps)",
        "epochs:           2",
        "2 per device x 8 accumulation x 8 GPU(s) = 128 pairs per step",
        "53 per epoch, 106 in total",
        "bf16",
        "full-parameter training",
        "(an estimate, not a measurement)",
    ):
        assert expected in text, expected


# --- the dry run ----------------------------------------------------------------------------------

# Runs the dry run with every outgoing connection failing, then checks that no heavy library was imported.
_DRY_RUN = """
import socket, sys
def refuse(*args, **kwargs):
    raise OSError("network access attempted during the dry run")
socket.socket.connect = refuse
socket.create_connection = refuse
from evaluators.preference.study import main
code = main(sys.argv[1:])
loaded = sorted(name for name in ("torch", "transformers", "datasets", "trl") if name in sys.modules)
print("LOADED", loaded)
sys.exit(code)
"""


def run_dry(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-c", _DRY_RUN, *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)


def test_dry_run_prints_plan_offline():
    completed = run_dry("--dry-run", "--gpus", "8")
    assert completed.returncode == 0, completed.stderr
    assert "LOADED []" in completed.stdout
    assert "loss beta:        0.05" in completed.stdout
    assert "learning rate 5e-07" in completed.stdout
    assert "= 128 pairs per step" in completed.stdout


def test_dry_run_with_overrides():
    completed = run_dry("--dry-run", "--gpus", "4", "--set", "gradient_accumulation_steps=16")
    assert completed.returncode == 0, completed.stderr
    assert "2 per device x 16 accumulation x 4 GPU(s) = 128 pairs per step" in completed.stdout


def test_study_entry_needs_dry_run():
    completed = run_dry()
    assert completed.returncode == 2
    assert "only --dry-run is available" in completed.stderr


def test_dry_run_reports_invalid_setting():
    completed = run_dry("--dry-run", "--set", "beta=-1")
    assert completed.returncode == 2
    assert "beta=-1.0 is invalid" in completed.stderr


# --- loading --------------------------------------------------------------------------------------

_LOAD_OFFLINE = """
import json, sys
from evaluators.preference.study_sources import SourceUnavailable, load_causal_lm, load_pairs
calls = {
    "hub_model": lambda: load_causal_lm("HuggingFaceH4/zephyr-7b-gemma-sft-v0.1"),
    "hub_data": lambda: load_pairs("argilla/dpo-mix-7k", "train"),
    "local_model": lambda: load_causal_lm("/nonexistent/zephyr"),
}
messages = {}
for name, call in calls.items():
    try:
        call()
        messages[name] = "loaded"
    except SourceUnavailable as error:
        messages[name] = str(error)
print(json.dumps(messages))
"""


def test_loading_offline_names_source_and_fix(tmp_path):
    # an empty Hugging Face home and HF_HUB_OFFLINE: nothing cached, no download attempted
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "PYTHONPATH": str(ROOT)}
    completed = subprocess.run([sys.executable, "-c", _LOAD_OFFLINE], cwd=ROOT, env=env, capture_output=True,
                               text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr
    messages = json.loads(completed.stdout.strip().splitlines()[-1])
    model = messages["hub_model"]
    assert "model 'HuggingFaceH4/zephyr-7b-gemma-sft-v0.1' is not a local path" in model
    assert "HF_HUB_OFFLINE is set" in model
    assert "hf download HuggingFaceH4/zephyr-7b-gemma-sft-v0.1 --local-dir DIR" in model
    assert "--set model=DIR" in model
    data = messages["hub_data"]
    assert "dataset 'argilla/dpo-mix-7k' (split 'train')" in data
    assert "hf download argilla/dpo-mix-7k --repo-type dataset --local-dir DIR" in data
    assert messages["local_model"] == (
        "model '/nonexistent/zephyr' is not an existing directory; pass a directory written by save_pretrained "
        "or a Hugging Face Hub id"
    )


def conversation_pair(question: str, good: str, bad: str) -> dict:
    return {
        "chosen": [{"role": "user", "content": question}, {"role": "assistant", "content": good}],
        "rejected": [{"role": "user", "content": question}, {"role": "assistant", "content": bad}],
        "dataset": "handwritten",
    }


@pytest.fixture
def pairs_file(tmp_path) -> Path:
    rows = [
        conversation_pair("Name a colour.", "Blue.", "I do not know."),
        conversation_pair("Say hello.", "Hello!", "No."),
        conversation_pair("What is 2 + 2?", "4", "5"),
        conversation_pair("Capital of France?", "Paris.", "Rome."),
    ]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_load_local_pairs(pairs_file):
    pairs = load_pairs(str(pairs_file), "train", limit=3)
    assert len(pairs) == 3
    assert pairs.column_names == ["chosen", "rejected"]  # the extra "dataset" column is dropped
    with pytest.raises(SourceUnavailable, match="has only a 'train' split, not 'test'"):
        load_pairs(str(pairs_file), "test")


def test_load_pairs_names_missing_columns(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"question": "q", "answer": "a"}\n')
    with pytest.raises(SourceUnavailable, match=r"has no column\(s\) \['chosen', 'rejected'\]"):
        load_pairs(str(path), "train")


# --- launching ------------------------------------------------------------------------------------


def test_launch_command_starts_one_process_per_gpu(tmp_path):
    command = launch_command(tmp_path / "spec.json", 8, bf16=True)
    assert command[:4] == [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu"]
    assert command[command.index("--num_processes") + 1] == "8"
    assert command[command.index("--mixed_precision") + 1] == "bf16"
    assert command[-3:] == ["--module", "evaluators.preference.study_training", str(tmp_path / "spec.json")]


def test_zero3_needs_deepspeed_and_several_gpus():
    import importlib.util

    installed = importlib.util.find_spec("deepspeed") is not None
    assert zero3_active(ZEPHYR_7B_GEMMA, 8) is installed
    assert zero3_active(ZEPHYR_7B_GEMMA, 1) is False
    assert zero3_active(study_settings("zephyr-7b-gemma", {"deepspeed": "none"}), 8) is False


# --- training -------------------------------------------------------------------------------------


def test_training_on_cpu_changes_policy(preference_tiny_cache, pairs_file, tmp_path):
    """The study's training path with SmolLM2-135M and four hand-written pairs, full-parameter, 2 steps."""
    import torch
    import torch.nn.functional as F

    from evaluators.preference.model import model_cache_path

    torch.set_num_threads(1)
    settings = study_settings("zephyr-7b-gemma", {
        "model": str(model_cache_path("gguf:smollm2-135m", preference_tiny_cache)),
        "dataset": str(pairs_file),
        "eval_split": "train",
        "max_eval_pairs": 2,
        "num_train_epochs": 1,
        "gradient_accumulation_steps": 1,
        "warmup_ratio": 0.0,
        "learning_rate": 1e-4,
        "max_length": 64,
        "gradient_checkpointing": False,
        "deepspeed": "none",
    })
    cache = prepare_study(settings, tmp_path / "cache", lambda step, total, message: None)
    assert cache.policy == cache.reference
    assert (cache.policy / "config.json").is_file()

    def dpo(chosen, rejected, reference_chosen, reference_rejected):
        return -F.logsigmoid(0.05 * ((chosen - reference_chosen) - (rejected - reference_rejected)))

    steps = []
    trainer, result = train_study_policy(dpo, settings, cache, tmp_path / "out", 0,
                                         lambda step, total, message: steps.append((step, total)))
    assert result.steps == 2  # 4 pairs in batches of 2, one epoch
    assert steps == [(1, 2), (2, 2)]
    assert result.pairs == 4
    assert result.eval_pairs == 2
    assert len(result.loss_curve) == 2
    # the first step starts at the reference (loss ln 2); its update moves the policy before the second
    assert result.loss_curve[0] == pytest.approx(math.log(2), abs=1e-4)
    assert result.final_metrics["rewards/margins"] != 0.0
    assert "eval_rewards/accuracies" in result.eval_metrics
    policy = trainer.accelerator.unwrap_model(trainer.model)
    changed = [
        name for (name, p), (_, r) in zip(policy.named_parameters(), trainer.ref_model.named_parameters())
        if not torch.equal(p.detach().float(), r.detach().float())
    ]
    assert changed, "no parameter of the policy changed"
    assert all(p.requires_grad for p in policy.parameters())  # full-parameter training


# Trains with `accelerate launch` on 2 CPU processes (the gloo backend) in a new network namespace whose
# loopback starts down, as in the process sandbox; then once more with a loss that is NaN everywhere.
_LAUNCH = """
import json, sys
from pathlib import Path
from evaluators.preference.study import study_settings
from evaluators.preference.study_training import launch_training
from evaluators.task import CandidateRejected
settings = study_settings("zephyr-7b-gemma", json.loads(sys.argv[1]))
cache_dir, work_dir = Path(sys.argv[2]), Path(sys.argv[3])
outcome = {}
result = launch_training(Path(sys.argv[4]).read_text(), settings, cache_dir, work_dir / "good", 0, 2)
outcome["good"] = {"world_size": result.world_size, "steps": result.steps, "losses": result.loss_curve}
try:
    launch_training(sys.argv[5], settings, cache_dir, work_dir / "nan", 0, 2)
    outcome["nan"] = "trained"
except CandidateRejected as rejection:
    outcome["nan"] = {"category": rejection.category, "reason": rejection.reason}
print(json.dumps(outcome))
"""

NAN_LOSS = """import torch


def nan_loss(self, policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps):
    return torch.log(policy_chosen_logps - policy_chosen_logps - 1.0)
"""


@pytest.mark.skipif(not network_isolation_available(), reason="unshare -rn is not permitted here")
def test_launch_trains_across_processes(preference_tiny_cache, pairs_file, tmp_path):
    from evaluators.preference.model import model_cache_path
    from seeds import SEEDS_DIR

    overrides = {
        "model": str(model_cache_path("gguf:smollm2-135m", preference_tiny_cache)),
        "dataset": str(pairs_file),
        "eval_split": "",
        "num_train_epochs": 1,
        "per_device_batch_size": 1,
        "gradient_accumulation_steps": 1,
        "warmup_ratio": 0.0,
        "learning_rate": 1e-4,
        "max_length": 64,
        "gradient_checkpointing": False,
        "deepspeed": "none",
        "bf16": False,
    }
    cache_dir = tmp_path / "cache"
    prepare_study(study_settings("zephyr-7b-gemma", overrides), cache_dir, lambda step, total, message: None)
    for name in ("good", "nan"):
        (tmp_path / "work" / name).mkdir(parents=True)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    command = ["unshare", "-rn", sys.executable, "-c", _LAUNCH, json.dumps(overrides), str(cache_dir),
               str(tmp_path / "work"), str(SEEDS_DIR / "preference" / "dpo.py"), NAN_LOSS]
    completed = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert completed.returncode == 0, completed.stderr[-3000:]
    outcome = json.loads(completed.stdout.strip().splitlines()[-1])

    # 4 pairs, 1 per process and step, 2 processes: 2 steps
    assert outcome["good"]["world_size"] == 2
    assert outcome["good"]["steps"] == 2
    assert outcome["good"]["losses"][0] == pytest.approx(math.log(2), abs=1e-4)
    policy = tmp_path / "work" / "good" / "policy"
    assert (policy / "model.safetensors").is_file()
    assert (policy / "tokenizer_config.json").is_file()
    assert outcome["nan"]["category"] == "nan"
    assert "non-finite" in outcome["nan"]["reason"]
