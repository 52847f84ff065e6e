"""Training one candidate loss in the study's setup, on the models and data that `study_sources` cached.

Training runs in the calling process on one GPU, or on the CPU for tests.
With several GPUs it starts one process per GPU with `accelerate launch`.
Each process runs `main` below on a JSON spec, loads the candidate code
with the sandbox's restricted loader, and trains its shard. DeepSpeed
ZeRO-3 shards parameters, gradients and optimizer state when the deepspeed
package is installed and `StudySettings.deepspeed` is "zero3".
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import logging
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from evaluators.preference.study import StudySettings
from evaluators.preference.study_sources import StudyCache, load_causal_lm, load_pairs, study_cache
from evaluators.task import CandidateRejected, ProgressFn

logger = logging.getLogger(__name__)

SPEC_FILE = "study_spec.json"
RESULT_FILE = "study_result.json"
POLICY_DIR = "policy"


def zero3_active(settings: StudySettings, world_size: int) -> bool:
    """Return whether training shards with DeepSpeed ZeRO-3: requested, installed and more than one process."""
    return settings.deepspeed == "zero3" and world_size > 1 and importlib.util.find_spec("deepspeed") is not None


def zero3_config() -> dict[str, Any]:
    """Return a DeepSpeed ZeRO-3 config whose "auto" values transformers fills from the DPOConfig."""
    return {
        "bf16": {"enabled": "auto"},
        "zero_optimization": {
            "stage": 3,
            "overlap_comm": True,
            "contiguous_gradients": True,
            "reduce_bucket_size": "auto",
            "stage3_prefetch_bucket_size": "auto",
            "stage3_param_persistence_threshold": "auto",
            # gather the shards into one bf16 state dict when the policy is saved for answering
            "stage3_gather_16bit_weights_on_model_save": True,
        },
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
        "train_batch_size": "auto",
        "train_micro_batch_size_per_gpu": "auto",
    }


def study_dpo_config(settings: StudySettings, output_dir: Path, seed: int, world_size: int):
    """Build the DPOConfig of one training in the study's setup, without checkpoints or reporting."""
    import torch
    from trl import DPOConfig

    cuda = torch.cuda.is_available()
    bf16 = settings.bf16 and cuda and torch.cuda.is_bf16_supported()
    if settings.bf16 and not bf16:
        logger.info("bf16 was requested but no CUDA GPU supports it; training in float32")
    return DPOConfig(
        output_dir=str(output_dir),
        beta=settings.beta,
        learning_rate=settings.learning_rate,
        lr_scheduler_type=settings.lr_scheduler,
        warmup_steps=settings.warmup_ratio,  # a float below 1 is a ratio of the total steps in transformers 5
        num_train_epochs=settings.num_train_epochs,
        max_steps=settings.max_steps or -1,
        per_device_train_batch_size=settings.per_device_batch_size,
        per_device_eval_batch_size=settings.per_device_batch_size,
        gradient_accumulation_steps=settings.gradient_accumulation_steps,
        optim=settings.optimizer,
        weight_decay=settings.weight_decay,
        max_grad_norm=settings.max_grad_norm,
        max_length=settings.max_length,
        bf16=bf16,
        # transformers 5 names gradient checkpointing "activation checkpointing"
        activation_checkpointing=settings.gradient_checkpointing,
        activation_checkpointing_kwargs={"use_reentrant": False},
        deepspeed=zero3_config() if zero3_active(settings, world_size) else None,
        precompute_ref_log_probs=False,
        ddp_find_unused_parameters=False,  # every parameter is trained, so DDP need not search for unused ones
        eval_strategy="no",
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=seed,
        data_seed=seed,
        use_cpu=not cuda,
    )


@dataclass
class StudyTrainingResult:
    """Outcome of one training in the study's setup.

    Attributes:
        eval_metrics: trainer.evaluate() on the held-out split, such as
            "eval_rewards/accuracies"; empty without an eval split.
        final_metrics: the last training step's DPO metrics ("rewards/...", "logps/...").
    """

    loss_curve: list[float]
    steps: int
    train_s: float
    pairs: int
    eval_pairs: int
    world_size: int
    eval_metrics: dict[str, float] = field(default_factory=dict)
    final_metrics: dict[str, float] = field(default_factory=dict)


def train_study_policy(loss_fn, settings: StudySettings, cache: StudyCache, output_dir: Path, seed: int,
                       progress: ProgressFn, world_size: int = 1):
    """Fine-tune the cached policy with `loss_fn`; return the trainer (its `model` is the policy) and the result."""
    import torch
    from transformers import TrainerCallback
    from transformers.trainer_callback import PrinterCallback

    from evaluators.preference.trainer import CandidateDPOTrainer

    # The config comes first: with ZeRO-3 it must exist before from_pretrained,
    # so that the weights are loaded straight into their shards.
    config = study_dpo_config(settings, output_dir, seed, world_size)
    sharded = zero3_active(settings, world_size)
    # DeepSpeed keeps float32 master weights itself; otherwise AdamW needs
    # float32 weights, because bf16 cannot hold updates of 5e-7 relative size.
    policy, tokenizer = load_causal_lm(str(cache.policy), dtype=torch.bfloat16 if sharded else torch.float32)
    reference, _ = load_causal_lm(str(cache.reference), dtype=torch.bfloat16 if config.bf16 else torch.float32)
    reference.requires_grad_(False)
    train_pairs = load_pairs(str(cache.train_data), "train")
    eval_pairs = load_pairs(str(cache.eval_data), "train") if cache.eval_data is not None else None

    class _Progress(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            progress(state.global_step, state.max_steps, "training")

    trainer = CandidateDPOTrainer(
        model=policy,
        ref_model=reference,
        args=config,
        train_dataset=train_pairs,
        eval_dataset=eval_pairs,
        processing_class=tokenizer,
        callbacks=[_Progress()],
        loss_fn=loss_fn,
    )
    trainer.remove_callback(PrinterCallback)
    start = time.monotonic()
    trainer.train()
    train_s = time.monotonic() - start
    eval_metrics = trainer.evaluate() if eval_pairs is not None else {}

    step_logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    final = {k: v for k, v in step_logs[-1].items() if k.startswith(("rewards/", "logps/"))} if step_logs else {}
    result = StudyTrainingResult(
        loss_curve=[entry["loss"] for entry in step_logs],
        steps=trainer.state.global_step,
        train_s=train_s,
        pairs=len(train_pairs),
        eval_pairs=len(eval_pairs) if eval_pairs is not None else 0,
        world_size=world_size,
        eval_metrics={k: float(v) for k, v in eval_metrics.items() if isinstance(v, (int, float))},
        final_metrics=final,
    )
    return trainer, result


def candidate_code(work_dir: Path) -> str:
    """Return the candidate's source from the sandbox job file next to `work_dir`.

    NOTE: Task.evaluate receives the loaded function, not its code, so the
    processes that `accelerate launch` starts read the code from the job that
    the sandbox worker runs (JOB_DIR/job.json, with work_dir = JOB_DIR/work).
    """
    from sandbox.protocol import JOB_FILE, Job

    job_dir = Path(work_dir).parent
    if not (job_dir / JOB_FILE).is_file():
        raise RuntimeError(
            f"training on several GPUs needs the candidate's code in {job_dir / JOB_FILE}, which the sandbox worker "
            "writes; run the evaluation through the sandbox, or set gpus=1"
        )
    return Job.read(job_dir).code


# ioctl requests and the interface flag of Linux's <linux/sockios.h> and <net/if.h>
_SIOCGIFFLAGS, _SIOCSIFFLAGS, _IFF_UP = 0x8913, 0x8914, 0x1


def ensure_loopback_up() -> None:
    """Bring the loopback interface up if it is down, so that the training processes can meet on 127.0.0.1.

    The process sandbox runs jobs in a new network namespace (`unshare -rn`)
    whose loopback starts down. torch.distributed then retries a rendezvous
    that cannot happen until its store times out (900 s with torch 2.13). The job is root in that namespace,
    so it may bring the loopback up, which opens no route out of the namespace.
    """
    import fcntl
    import struct

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        request = struct.pack("16sH22x", b"lo", 0)  # struct ifreq: name, flags, padding to 40 bytes
        flags = struct.unpack("16sH22x", fcntl.ioctl(probe, _SIOCGIFFLAGS, request))[1]
        if flags & _IFF_UP:
            return
        try:
            fcntl.ioctl(probe, _SIOCSIFFLAGS, struct.pack("16sH22x", b"lo", flags | _IFF_UP))
        except PermissionError as error:
            raise RuntimeError(
                "the loopback interface is down and this process may not bring it up, so the training processes "
                f"cannot meet on 127.0.0.1 ({error}); run the job with a loopback interface, or set gpus=1"
            ) from error
    logger.info("brought the loopback interface up for the training processes")


def _unused_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def launch_command(spec_path: Path, world_size: int, bf16: bool) -> list[str]:
    """Return the `accelerate launch` command that trains on `world_size` GPUs of this machine."""
    return [
        sys.executable, "-m", "accelerate.commands.launch",
        "--multi_gpu",  # torch.distributed processes; without CUDA they fall back to the gloo backend on the CPU
        "--num_processes", str(world_size),
        "--num_machines", "1",
        "--mixed_precision", "bf16" if bf16 else "no",
        "--main_process_port", str(_unused_port()),
        "--module", "evaluators.preference.study_training",
        str(spec_path),
    ]  # fmt: skip


def launch_training(code: str, settings: StudySettings, cache_dir: Path, work_dir: Path, seed: int,
                    world_size: int, progress_file: Path | None = None) -> StudyTrainingResult:
    """Train on `world_size` GPUs in child processes and save the policy to work_dir/policy; return the result.

    Raises:
        CandidateRejected: when a process rejected the candidate (for example a non-finite loss).
        RuntimeError: when the processes failed without a result.
    """
    spec = {
        "code": code,
        "settings": dataclasses.asdict(settings),
        "cache_dir": str(cache_dir),
        "work_dir": str(work_dir),
        "seed": seed,
        "progress_file": str(progress_file) if progress_file else "",
    }
    ensure_loopback_up()
    spec_path = Path(work_dir) / SPEC_FILE
    spec_path.write_text(json.dumps(spec), encoding="utf-8")
    for stale in (Path(work_dir) / RESULT_FILE, *Path(work_dir).glob("study_rejected.rank*.json")):
        stale.unlink(missing_ok=True)
    log_path = Path(work_dir) / "ranks.log"
    project_root = Path(__file__).resolve().parents[2]
    with open(log_path, "ab") as log:
        completed = subprocess.run(
            launch_command(spec_path, world_size, settings.bf16), cwd=project_root, stdout=log, stderr=subprocess.STDOUT
        )
    result_path = Path(work_dir) / RESULT_FILE
    rejections = sorted(Path(work_dir).glob("study_rejected.rank*.json"))
    if not result_path.is_file() and rejections:
        # a rank other than 0 rejected the candidate, and rank 0 failed waiting for it
        result_path = rejections[0]
    if not result_path.is_file():
        raise RuntimeError(f"training on {world_size} GPUs failed with exit status {completed.returncode} and no "
                           f"result; log: {log_path}")
    outcome = json.loads(result_path.read_text(encoding="utf-8"))
    if not outcome["ok"]:
        raise CandidateRejected(outcome["reason"], outcome.get("category", ""), stage="train")
    return StudyTrainingResult(**outcome["result"])


def main(argv: list[str] | None = None) -> int:
    """Train one rank of a multi-GPU run from the JSON spec that `launch_training` wrote."""
    from evaluators.preference import PreferenceTask
    from sandbox.loader import load_candidate

    argv = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    spec = json.loads(Path(argv[0]).read_text(encoding="utf-8"))
    settings = StudySettings(**spec["settings"])
    work_dir = Path(spec["work_dir"])
    rank, world_size = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))

    def progress(step: int, total: int, message: str) -> None:
        if rank == 0 and spec["progress_file"]:
            with open(spec["progress_file"], "a") as handle:
                handle.write(json.dumps({"t": time.time(), "step": step, "total": total, "message": message}) + "\n")

    outcome: dict[str, Any]
    try:
        candidate = load_candidate(spec["code"], PreferenceTask.interface.params, {"beta": settings.beta})
        cache = study_cache(settings, Path(spec["cache_dir"]))
        trainer, result = train_study_policy(candidate, settings, cache, work_dir / "trainer", spec["seed"],
                                             progress, world_size)
        # every rank takes part, because ZeRO-3 gathers the shards to save them
        trainer.save_model(str(work_dir / POLICY_DIR))
        trainer.processing_class.save_pretrained(str(work_dir / POLICY_DIR))
        outcome = {"ok": True, "result": dataclasses.asdict(result)}
    except CandidateRejected as rejection:
        outcome = {"ok": False, "reason": rejection.reason, "category": rejection.category}
    if rank == 0:
        (work_dir / RESULT_FILE).write_text(json.dumps(outcome), encoding="utf-8")
    elif not outcome["ok"]:
        (work_dir / f"study_rejected.rank{rank}.json").write_text(json.dumps(outcome), encoding="utf-8")
    return 0 if outcome["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
