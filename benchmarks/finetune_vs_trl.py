"""Fine-tune cost of the preference task's trainer against stock TRL DPOTrainer runs.

All runs train the same cached model (its top layers, as the preset sets) on
the same cached, tokenized pairs for the same steps, learning rate, batch,
beta, clipping and seed, with DPO's loss (Rafailov et al. 2023, eq. 7):

- evolve: the engine's own fine-tune, `train_candidate` with DPO written as a
  candidate callable. Reference log-probs come from the task cache, and
  activation checkpointing is off (the preset's `gradient_checkpointing`).
- trl-defaults, the peer: TRL's `DPOTrainer` with `loss_type="sigmoid"` and
  TRL's defaults for everything the preset does not set. It runs the
  reference model on every batch and recomputes activations in the backward
  pass (DPOConfig turns activation checkpointing on by default).
- trl-same-work: TRL's `DPOTrainer` given the cached reference log-probs and
  checkpointing off, the same work as evolve, to show where the gain comes from.

The stock trainer is subclassed only so that it takes the tokenized pairs as
they are (`_prepare_dataset`, and `_precompute_ref_logps` for the cached
log-probs). Its loss and training step are TRL's own. Each training runs in a
fresh child process, in an order that rotates every repeat, and reports its
setup and training time, its loss per step and its peak RSS. The first
training of each kind is also scored with the task's fitness (held-out
reward minus the KL penalty), the number a candidate would get.

Usage: .venv/bin/python -m benchmarks.finetune_vs_trl [--preset cpu] [--repeats 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import ROOT, LoadSampler, command_line, machine_lines, table, vm_hwm_mib  # noqa: E402

TRAINERS = ("evolve", "trl-defaults", "trl-same-work")
LABELS = {
    "evolve": "evolve `train_candidate`, DPO as a candidate callable",
    "trl-defaults": "stock TRL DPOTrainer, TRL defaults (the peer)",
    "trl-same-work": "stock TRL DPOTrainer, cached reference log-probs, no checkpointing",
}


def train_once(trainer_kind: str, preset: str, cache_dir: Path, threads: int, seed: int, score: bool) -> dict:
    """Train once with one trainer in this process and return timings, losses, peak RSS and, with `score`, fitness."""
    import torch
    import torch.nn.functional as F
    from datasets import Dataset
    from transformers.trainer_callback import PrinterCallback

    from evaluators.preference.data import load_preference_data
    from evaluators.preference.fitness import score_policy
    from evaluators.preference.model import freeze_lower_layers, load_model
    from evaluators.preference.settings import PRESETS
    from evaluators.preference.trainer import dpo_config, train_candidate

    torch.set_num_threads(threads)
    settings = PRESETS[preset]
    start = time.monotonic()
    data = load_preference_data(settings, cache_dir)
    policy, tokenizer = load_model(settings.model, cache_dir)
    # every run loads the reference model, because evolve and trl-defaults train with it and scoring needs it
    reference, _ = load_model(settings.model, cache_dir)
    reference.requires_grad_(False)
    torch.manual_seed(seed)

    with tempfile.TemporaryDirectory(prefix="evolve-bench-trainer-") as output_dir:
        if trainer_kind == "evolve":
            beta = settings.beta

            def dpo_loss(policy_chosen, policy_rejected, reference_chosen, reference_rejected):
                margin = (policy_chosen - reference_chosen) - (policy_rejected - reference_rejected)
                return -F.logsigmoid(beta * margin)

            result = train_candidate(dpo_loss, policy, reference, tokenizer, data.pairs, settings,
                                     Path(output_dir), seed, lambda *progress: None)
            # train_candidate builds its dataset and trainer before it trains, and that time counts as setup
            setup_s = time.monotonic() - start - result.train_s
            train_s, losses, steps = result.train_s, result.loss_curve, result.steps
        else:
            freeze_lower_layers(policy, settings.trainable_layers, settings.freeze_embeddings)
            config = dpo_config(settings, Path(output_dir), seed)
            config.loss_type = ["sigmoid"]
            columns = ["prompt_ids", "chosen_ids", "rejected_ids"]
            if trainer_kind == "trl-defaults":
                # DPOConfig's own default, which dpo_config overrides with the preset's setting
                config.activation_checkpointing = config.gradient_checkpointing = True
                ref_model = reference
            else:
                columns += ["ref_chosen_logps", "ref_rejected_logps"]
                config.precompute_ref_log_probs = True
                ref_model = None
            dataset = Dataset.from_list([{column: pair[column] for column in columns} for pair in data.pairs])
            trainer = stock_trainer_class()(model=policy, ref_model=ref_model, args=config, train_dataset=dataset,
                                            processing_class=tokenizer)
            trainer.remove_callback(PrinterCallback)
            setup_s = time.monotonic() - start
            train_start = time.monotonic()
            trainer.train()
            train_s = time.monotonic() - train_start
            losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
            steps = trainer.state.global_step

    outcome = {"trainer": trainer_kind, "setup_s": setup_s, "train_s": train_s, "losses": losses, "steps": steps,
               "peak_rss_mib": vm_hwm_mib()}
    if score:
        policy.eval()
        fitness, metrics = score_policy(policy, reference, tokenizer, data.heldout_prompt_ids, settings,
                                        lambda *progress: None)
        outcome.update({"fitness": fitness, "reward": metrics["reward"], "kl": metrics["kl"]})
    return outcome


def stock_trainer_class():
    """Return TRL's DPOTrainer, subclassed only to take tokenized pairs that carry reference log-probs."""
    from trl import DPOTrainer

    class StockDPOTrainer(DPOTrainer):
        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            return dataset

        def _precompute_ref_logps(self, dataset, name, batch_size):
            if "ref_chosen_logps" in dataset.column_names:
                return dataset
            return super()._precompute_ref_logps(dataset, name, batch_size)

    return StockDPOTrainer


def run_child(trainer_kind: str, args: argparse.Namespace, cache_dir: Path, out: Path, score: bool) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(args.threads),
           "MKL_NUM_THREADS": str(args.threads), "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1"}
    command = [sys.executable, "-m", "benchmarks.finetune_vs_trl", "--child", trainer_kind, "--out", str(out),
               "--preset", args.preset, "--threads", str(args.threads), "--cache-dir", str(cache_dir)]
    if score:
        command.append("--score")
    completed = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    if completed.returncode != 0:
        raise RuntimeError(f"{trainer_kind} training failed (exit {completed.returncode}):\n{completed.stderr[-4000:]}")
    return json.loads(out.read_text())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="cpu", help="preference preset whose model, pairs and steps are used "
                                                       "(default: cpu)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="trainings per trainer; the order rotates every repeat (default: 3)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads per training (default: 2)")
    parser.add_argument("--cache-dir", type=Path, help="prepared cache (default: the user's evolve cache)")
    parser.add_argument("--child", choices=TRAINERS, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--score", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error(f"--repeats {args.repeats} is invalid; use 1 or more")

    from engine.config import default_cache_dir

    cache_dir = args.cache_dir or default_cache_dir()
    if args.child:
        result = train_once(args.child, args.preset, cache_dir, args.threads, seed=0, score=args.score)
        args.out.write_text(json.dumps(result))
        return 0

    prepare(args.preset, cache_dir)
    results: dict[str, list[dict]] = {kind: [] for kind in TRAINERS}
    with tempfile.TemporaryDirectory(prefix="evolve-bench-") as scratch, LoadSampler() as load:
        for repeat in range(args.repeats):
            # the order rotates, so a load that rises or falls over the runs favours no trainer
            order = TRAINERS[repeat % len(TRAINERS):] + TRAINERS[:repeat % len(TRAINERS)]
            for kind in order:
                out = Path(scratch) / f"{kind}-{repeat}.json"
                results[kind].append(run_child(kind, args, cache_dir, out, score=repeat == 0))

    peer_train = statistics.median(r["train_s"] for r in results["trl-defaults"])
    rows = []
    for kind in TRAINERS:
        runs = results[kind]
        train = [r["train_s"] for r in runs]
        per_step = statistics.median(r["train_s"] / r["steps"] for r in runs)
        first = runs[0]
        rows.append([LABELS[kind], f"{statistics.median(train):.1f} s", f"{min(train):.1f} to {max(train):.1f} s",
                     f"{per_step:.2f} s", f"{statistics.median(r['setup_s'] for r in runs):.1f} s",
                     f"{statistics.median(r['peak_rss_mib'] for r in runs):.0f} MiB",
                     f"{first['fitness']:.4f} (reward {first['reward']:.4f}, KL {first['kl']:.2f})",
                     f"{peer_train / statistics.median(train):.2f}x"])
    reference_losses = results["evolve"][0]["losses"]
    differences = {kind: max(abs(a - b) for a, b in zip(reference_losses, results[kind][0]["losses"]))
                   for kind in TRAINERS[1:]}

    print("## Fine-tune: evolve's trainer against stock TRL DPOTrainer\n")
    print(f"- command: `{command_line()}`")
    for line in machine_lines():
        print(line)
    print(f"- 1-minute load average during the runs: {load.summary()}")
    print(f"- preset {args.preset}: {results['evolve'][0]['steps']} steps, {args.threads} torch thread(s), "
          f"{args.repeats} trainings per trainer, each in a fresh process\n")
    print(table(["trainer", "training time (median)", "range", "per step", "setup (load model and data, build "
                 "trainer)", "peak RSS", "fitness of the first training", "speed-up over the peer"], rows))
    print("\nLargest difference of a per-step loss from evolve's loss curve: "
          + ", ".join(f"{kind} {difference:.2e}" for kind, difference in differences.items())
          + f" (evolve's first losses {[round(x, 4) for x in reference_losses[:3]]}).")
    return 0


def prepare(preset: str, cache_dir: Path) -> None:
    from engine.runner import prepare_task
    from evaluators.registry import get_task

    task = get_task("preference")
    with tempfile.TemporaryDirectory(prefix="evolve-prepare-") as job_dir:
        prepare_task(task, task.presets()[preset], cache_dir, Path(job_dir), task_ref="preference")


if __name__ == "__main__":
    sys.exit(main())
