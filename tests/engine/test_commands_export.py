"""`evolve export` on preference losses: the module's loss forms, and its trainer on SmolLM2-135M."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest

from engine.archive import Archive
from engine.candidate import Candidate, Origin, Status
from engine.cli import main as cli
from engine.config import RunConfig, default_cache_dir
from evaluators.preference.settings import PreferenceSettings

ROOT = Path(__file__).resolve().parents[2]
PARAMS = "policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps"
MARGIN = (
    "    rho = (policy_chosen_logps - reference_chosen_logps) - (policy_rejected_logps - reference_rejected_logps)\n"
)

# self passed on to a helper: the export keeps the method and adds a plain wrapper
PASSES_SELF = (
    "def scale(self):\n"
    "    return self.beta\n\n\n"
    f"def passes_self(self, {PARAMS}):\n" + MARGIN + "    return -F.logsigmoid(scale(self) * rho)\n"
)
# plain form without beta, using F without importing it (the sandbox binds torch, F and math)
PLAIN = f"def plain_margin({PARAMS}):\n" + MARGIN + "    return F.softplus(-rho)\n"


def make_run(run_dir: Path, candidates: dict[str, str]) -> None:
    """Write an archive of a preference run holding one evaluated candidate per (name -> code)."""
    archive = Archive(run_dir / "archive.sqlite")
    archive.set_meta("config", RunConfig(task="preference").to_dict())
    archive.set_meta("settings", asdict(PreferenceSettings(beta=0.1)))
    archive.set_meta("run_id", "preference-test")
    for index, (name, code) in enumerate(candidates.items(), start=1):
        archive.insert(Candidate(id=f"g001-a{index:02d}", generation=1, attempt=index, origin=Origin.PROPOSER,
                                 name=name, code=code, thought=f"the idea of {name}", status=Status.EVALUATED,
                                 fitness=0.6))
    archive.close()


def run_child(script: str, cwd: Path, timeout: float = 120) -> list[str]:
    """Run a script in a fresh interpreter that cannot import evolve; return its output lines."""
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    child = subprocess.run([sys.executable, "-c", script], cwd=cwd, env=env, capture_output=True, text=True,
                           timeout=timeout)
    assert child.returncode == 0, child.stderr[-3000:]
    return child.stdout.strip().splitlines()


def load_script(path: Path) -> str:
    return (
        "import importlib.util, json, sys, torch\n"
        f"spec = importlib.util.spec_from_file_location('exported', {str(path)!r})\n"
        "module = importlib.util.module_from_spec(spec)\n"
        "spec.loader.exec_module(module)\n"
    )


def test_export_wraps_and_plain_forms(tmp_path, capsys):
    make_run(tmp_path / "run", {"passes_self": PASSES_SELF, "plain_margin": PLAIN})
    wrapped, plain = tmp_path / "passes_self.py", tmp_path / "plain_margin.py"
    assert cli(["export", str(tmp_path / "run"), "g001-a01", "--out", str(wrapped)]) == 0
    assert cli(["export", str(tmp_path / "run"), "g001-a02", "--out", str(plain)]) == 0
    assert "def passes_self_loss(" in wrapped.read_text()
    assert plain.read_text().count("import torch.nn.functional as F") == 1

    # rho = 0 for both: -log sigmoid(0) = softplus(0) = log 2 = 0.693147 at any beta;
    # rho = 2 with beta 0.1: -log sigmoid(0.2) = 0.598139, and softplus(-2) = 0.126928
    script = load_script(wrapped) + (
        "x = torch.tensor([0.0, 2.0]); zero = torch.zeros(2)\n"
        "print(json.dumps(module.passes_self_loss(x, zero, zero, zero).tolist()))\n"
        "print(sorted({name.split('.')[0] for name in sys.modules} & {'engine', 'sandbox', 'evaluators'}))\n"
    )
    values, ours = run_child(script, tmp_path)[-2:]
    assert json.loads(values) == pytest.approx([0.693147, 0.598139], abs=1e-5)
    assert ours == "[]"
    script = load_script(plain) + (
        "x = torch.tensor([0.0, 2.0]); zero = torch.zeros(2)\n"
        "print(json.dumps(module.plain_margin(x, zero, zero, zero).tolist()))\n"
    )
    assert json.loads(run_child(script, tmp_path)[-1]) == pytest.approx([0.693147, 0.126928], abs=1e-5)


def test_export_rejects_code_without_interface(tmp_path, capsys):
    make_run(tmp_path / "run", {"wrong": "def wrong(x, y):\n    return x - y\n"})
    assert cli(["export", str(tmp_path / "run"), "g001-a01", "--out", str(tmp_path / "x.py")]) == 1
    assert "no function has the interface parameters" in capsys.readouterr().out
    assert not (tmp_path / "x.py").exists()


@pytest.mark.slow
def test_exported_trainer_trains_two_steps(tmp_path, capsys):
    padll = (ROOT / "seeds" / "preference" / "padll.py").read_text()
    make_run(tmp_path / "run", {"padll": padll})
    module_path = tmp_path / "padll_export.py"
    assert cli(["export", str(tmp_path / "run"), "g001-a01", "--out", str(module_path)]) == 0

    # evolve's model cache provides an offline copy of SmolLM2-135M; the child interpreter cannot import evolve
    from evaluators.preference.model import build_model_cache
    from evaluators.preference.settings import DEFAULT_MODEL

    model_dir = build_model_cache(DEFAULT_MODEL, default_cache_dir())
    script = load_script(module_path) + f"""
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import DPOConfig

torch.manual_seed(0)
tokenizer = AutoTokenizer.from_pretrained({str(model_dir)!r})
tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
policy = AutoModelForCausalLM.from_pretrained({str(model_dir)!r}, dtype=torch.float32)
reference = AutoModelForCausalLM.from_pretrained({str(model_dir)!r}, dtype=torch.float32)
policy.requires_grad_(False)
top = policy.model.layers[-1]
top.requires_grad_(True)
before = {{name: value.detach().clone() for name, value in top.named_parameters()}}
pairs = Dataset.from_list([
    {{"prompt": "The film was", "chosen": " a joy from start to end.", "rejected": " a dull mess."}},
    {{"prompt": "I watched it and", "chosen": " loved every scene.", "rejected": " wanted to leave."}},
    {{"prompt": "The acting", "chosen": " is warm and clever.", "rejected": " is wooden."}},
    {{"prompt": "Overall the story", "chosen": " moved me.", "rejected": " bored me."}},
])
args = DPOConfig(output_dir={str(tmp_path / "out")!r}, beta=0.1, max_steps=2, per_device_train_batch_size=2,
                 learning_rate=1e-3, logging_steps=1, save_strategy="no", report_to="none", disable_tqdm=True,
                 seed=0, use_cpu=True)
trainer = module.PadllDPOTrainer(model=policy, ref_model=reference, args=args, train_dataset=pairs,
                                 processing_class=tokenizer)
trainer.train()
changed = any(not torch.equal(before[name], value) for name, value in top.named_parameters())
logs = [entry for entry in trainer.state.log_history if "loss" in entry]
print(json.dumps({{"steps": trainer.state.global_step, "changed": changed, "losses": [e["loss"] for e in logs],
                  "margins": [e["rewards/margins"] for e in logs]}}))
"""
    result = json.loads(run_child(script, tmp_path, timeout=900)[-1])
    assert result["steps"] == 2
    assert result["changed"] is True
    # step 1: policy == reference, so every margin is 0 and PADLL gives 0.9 * (1 - 0 * 0.5) * -log sigmoid(0)
    # = 0.9 * log 2 = 0.623832 (DPO would give 0.693147)
    assert result["losses"][0] == pytest.approx(0.623832, abs=1e-4)
    assert result["margins"][0] == pytest.approx(0.0, abs=1e-6)
    assert all(math.isfinite(value) for value in result["losses"])
