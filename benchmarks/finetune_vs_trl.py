"""Fine-tune cost of the preference task's trainer against a stock TRL DPOTrainer run.

Both runs train the same cached model on the same cached pairs for the same
steps with the same loss: evolve's CandidateDPOTrainer with DPO's sigmoid
loss written as a candidate callable, and TRL's DPOTrainer with
`loss_type="sigmoid"` (DPO, Rafailov et al. 2023, eq. 7). The stock trainer
is subclassed only to accept the already tokenized pairs with their reference
log-probs (`_prepare_dataset` and `_precompute_ref_logps` pass the dataset
through), so its loss and training step are TRL's own. Each training runs in a
fresh child process, in an order that flips every repeat, and reports its setup and
training time, its loss per step and its peak RSS. Equal loss curves show that
the two runs did the same work.

Usage: .venv/bin/python -m benchmarks.finetune_vs_trl [--preset cpu] [--repeats 4] [--threads 1]
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

TRAINERS = ("evolve", "trl")


def train_once(trainer_kind: str, preset: str, cache_dir: Path, threads: int, seed: int) -> dict:
    """Train once with one trainer in this process and return its timings, losses and peak RSS."""
    import torch
    import torch.nn.functional as F
    from datasets import Dataset
    from transformers.trainer_callback import PrinterCallback

    from evaluators.preference.data import load_preference_data
    from evaluators.preference.model import freeze_lower_layers, load_model
    from evaluators.preference.settings import PRESETS
    from evaluators.preference.trainer import CandidateDPOTrainer, dpo_config

    torch.set_num_threads(threads)
    settings = PRESETS[preset]
    start = time.monotonic()
    data = load_preference_data(settings, cache_dir)
    policy, tokenizer = load_model(settings.model, cache_dir)
    freeze_lower_layers(policy, settings.trainable_layers, settings.freeze_embeddings)
    columns = ("prompt_ids", "chosen_ids", "rejected_ids", "ref_chosen_logps", "ref_rejected_logps")
    dataset = Dataset.from_list([{column: pair[column] for column in columns} for pair in data.pairs])
    torch.manual_seed(seed)

    with tempfile.TemporaryDirectory(prefix="evolve-bench-trainer-") as output_dir:
        config = dpo_config(settings, Path(output_dir), seed)
        if trainer_kind == "evolve":
            beta = settings.beta

            def dpo_loss(policy_chosen, policy_rejected, reference_chosen, reference_rejected):
                margin = (policy_chosen - reference_chosen) - (policy_rejected - reference_rejected)
                return -F.logsigmoid(beta * margin)

            # evaluate() passes the reference model, which it needs for scoring afterwards
            reference, _ = load_model(settings.model, cache_dir)
            reference.requires_grad_(False)
            trainer = CandidateDPOTrainer(model=policy, ref_model=reference, args=config, train_dataset=dataset,
                                          processing_class=tokenizer, loss_fn=dpo_loss)
        else:
            # sigmoid is DPOConfig's default loss; the reference log-probs come from the dataset's columns
            config.loss_type = ["sigmoid"]
            config.precompute_ref_log_probs = True
            stock_trainer = stock_trainer_class()
            trainer = stock_trainer(model=policy, args=config, train_dataset=dataset, processing_class=tokenizer)
        trainer.remove_callback(PrinterCallback)
        setup_s = time.monotonic() - start

        train_start = time.monotonic()
        trainer.train()
        train_s = time.monotonic() - train_start

    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return {"trainer": trainer_kind, "setup_s": setup_s, "train_s": train_s, "losses": losses,
            "steps": trainer.state.global_step, "peak_rss_mib": vm_hwm_mib()}


def stock_trainer_class():
    """Return TRL's DPOTrainer, subclassed only to take tokenized pairs that carry reference log-probs."""
    from trl import DPOTrainer

    class StockDPOTrainer(DPOTrainer):
        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            return dataset

        def _precompute_ref_logps(self, dataset, name, batch_size):
            return dataset

    return StockDPOTrainer


def run_child(trainer_kind: str, args: argparse.Namespace, cache_dir: Path, out: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(args.threads),
           "MKL_NUM_THREADS": str(args.threads), "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1"}
    command = [sys.executable, "-m", "benchmarks.finetune_vs_trl", "--child", trainer_kind, "--out", str(out),
               "--preset", args.preset, "--threads", str(args.threads), "--cache-dir", str(cache_dir)]
    completed = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    if completed.returncode != 0:
        raise RuntimeError(f"{trainer_kind} training failed (exit {completed.returncode}):\n{completed.stderr[-4000:]}")
    return json.loads(out.read_text())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="cpu", help="preference preset whose model, pairs and steps are used "
                                                       "(default: cpu)")
    parser.add_argument("--repeats", type=int, default=4,
                        help="trainings per trainer; an even number balances the order (default: 4)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per training (default: 1)")
    parser.add_argument("--cache-dir", type=Path, help="prepared cache (default: the user's evolve cache)")
    parser.add_argument("--child", choices=TRAINERS, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    from engine.config import default_cache_dir

    cache_dir = args.cache_dir or default_cache_dir()
    if args.child:
        result = train_once(args.child, args.preset, cache_dir, args.threads, seed=0)
        args.out.write_text(json.dumps(result))
        return 0

    prepare(args.preset, cache_dir)
    results: dict[str, list[dict]] = {kind: [] for kind in TRAINERS}
    with tempfile.TemporaryDirectory(prefix="evolve-bench-") as scratch, LoadSampler() as load:
        for repeat in range(args.repeats):
            # the order flips every repeat, so a load that rises or falls over the runs favours neither trainer
            order = TRAINERS if repeat % 2 == 0 else tuple(reversed(TRAINERS))
            for kind in order:
                results[kind].append(run_child(kind, args, cache_dir, Path(scratch) / f"{kind}-{repeat}.json"))

    stock_train = statistics.median(r["train_s"] for r in results["trl"])
    rows = []
    for kind, label in (("evolve", "evolve CandidateDPOTrainer, DPO loss as a callable"),
                        ("trl", "stock TRL DPOTrainer, loss_type=sigmoid")):
        runs = results[kind]
        train = [r["train_s"] for r in runs]
        per_step = statistics.median(r["train_s"] / r["steps"] for r in runs)
        rows.append([label, f"{statistics.median(train):.1f} s", f"{min(train):.1f} to {max(train):.1f} s",
                     f"{per_step:.2f} s", f"{statistics.median(r['setup_s'] for r in runs):.1f} s",
                     f"{statistics.median(r['peak_rss_mib'] for r in runs):.0f} MiB",
                     f"{statistics.median(train) / stock_train:.2f}"])
    difference = max(abs(a - b) for a, b in zip(results["evolve"][0]["losses"], results["trl"][0]["losses"]))

    print("## Fine-tune: evolve's trainer against stock TRL DPOTrainer\n")
    print(f"- command: `{command_line()}`")
    for line in machine_lines():
        print(line)
    print(f"- 1-minute load average during the runs: {load.summary()}")
    print(f"- preset {args.preset}: {results['trl'][0]['steps']} steps, {args.threads} torch thread(s), "
          f"{args.repeats} trainings per trainer, each in a fresh process\n")
    print(table(["trainer", "training time (median)", "range", "per step", "setup (load model and data, build "
                 "trainer)", "peak RSS", "ratio to stock TRL"], rows))
    print(f"\nLargest difference between the two loss curves: {difference:.2e} "
          f"(evolve {results['evolve'][0]['losses'][:3]}..., TRL {results['trl'][0]['losses'][:3]}...).")
    print("The evolve run also holds the reference model in memory, because evaluate() scores the policy "
          "against it after training; the stock run reads reference log-probs from the batch only.")
    return 0


def prepare(preset: str, cache_dir: Path) -> None:
    from engine.runner import prepare_task
    from evaluators.registry import get_task

    task = get_task("preference")
    with tempfile.TemporaryDirectory(prefix="evolve-prepare-") as job_dir:
        prepare_task(task, task.presets()[preset], cache_dir, Path(job_dir), task_ref="preference")


if __name__ == "__main__":
    sys.exit(main())
