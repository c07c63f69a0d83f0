"""Build or load the models a stage needs: the tiny local model, any causal LM, run checkpoints.

`model=tiny` writes a small Llama-family model and its character tokenizer to a cache directory once
(keyed by a hash of its shape and init seed) and then loads it like any Hugging Face directory, so
the same loading code serves the tiny model, hub ids, local directories and alignctl run dirs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path

import torch
from peft import PeftModel
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerBase,
)

from alignctl.config.schema import HardwareConfig, ModelConfig, TinyModelConfig
from alignctl.core import bitsandbytes_gate, distributed
from alignctl.core.errors import AdapterError, ModelLoadError
from alignctl.models.cache import cache_dir
from alignctl.models.gguf import build_from_gguf
from alignctl.models.pread_loading import reads_not_mapped
from alignctl.models.tokenizer import build_char_tokenizer
from alignctl.nn import cpu_attention
from alignctl.nn.model_parts import backbone

# Inside a run directory: the merged weights an adapter trained on, when they exist nowhere else (anchor_base).
BASE_DIR = "base_model"
# "auto" is settled by each stage's start (alignctl/models/precision.py); a caller that loads a model without
# a stage (export, a library user) gets float32, the dtype a plain checkpoint is written in.
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "auto": torch.float32}


def build_tiny(tiny: TinyModelConfig) -> Path:
    """Write the tiny model + tokenizer once to the cache and return the directory."""
    spec = json.dumps(dataclasses.asdict(tiny), sort_keys=True)
    out = cache_dir() / "models" / f"tiny-{hashlib.sha256(spec.encode()).hexdigest()[:12]}"
    if (out / "config.json").exists():
        return out
    import fcntl

    out.parent.mkdir(parents=True, exist_ok=True)
    # Several processes (the ranks of one run, parallel sweep jobs) may need it at once: one builds.
    with open(out.parent / f".{out.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (out / "config.json").exists():
            _write_tiny(tiny, out)
    return out


def _write_tiny(tiny: TinyModelConfig, out: Path) -> None:
    tokenizer = build_char_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=tiny.hidden_size,
        num_hidden_layers=tiny.num_layers,
        num_attention_heads=tiny.num_heads,
        num_key_value_heads=tiny.num_heads,
        intermediate_size=tiny.intermediate_size,
        max_position_embeddings=tiny.max_position_embeddings,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    # Its own RNG: the run's seeded stream must not depend on whether the cache was warm.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(tiny.init_seed)
        model = LlamaForCausalLM(config)
    # Write to a private temporary directory and rename: a reader never sees half a model.
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    tmp.rename(out)


def resolve_checkpoint(path: str) -> str:
    """An alignctl run dir stands for its checkpoint/; anything else is passed through."""
    if path.startswith(("/", ".", "~")) and not Path(path).expanduser().exists():
        raise ModelLoadError(f"model path {path!r} does not exist (give a local directory, a run directory or a hub id)")
    path = str(Path(path).expanduser()) if path.startswith("~") else path
    run_checkpoint = Path(path) / "checkpoint"
    if (Path(path) / "lineage.json").exists():
        if not run_checkpoint.exists():
            raise ModelLoadError(f"run directory {path} has no checkpoint/ yet (did the run finish?)")
        return str(run_checkpoint)
    return path


def model_path(model: ModelConfig, policy_run: str | None = None) -> str:
    if policy_run:
        return resolve_checkpoint(policy_run)
    if model.name_or_path:
        return resolve_checkpoint(model.name_or_path)
    if model.gguf_file:
        return str(build_from_gguf(model.gguf_file, model.gguf_package))
    assert model.tiny is not None  # validated: source == "tiny" has a tiny section
    return str(build_tiny(model.tiny))


def device_type(hardware: HardwareConfig) -> str:
    if hardware.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if hardware.device == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError("hardware.device=cuda but no CUDA device is visible; use hardware=cpu")
    return hardware.device


def device_of(hardware: HardwareConfig) -> torch.device:
    """The device of this process: with several processes on CUDA, the GPU of its local rank."""
    kind = device_type(hardware)
    return torch.device(kind, distributed.current().local_rank) if kind == "cuda" else torch.device(kind)


def load_tokenizer(path: str, model: ModelConfig) -> PreTrainedTokenizerBase:
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=model.trust_remote_code, revision=model.revision)
    except (OSError, ValueError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        if "trust_remote_code" in reason:
            reason = "it ships its own code; set model.trust_remote_code=true if you trust it"
        raise ModelLoadError(f"cannot load a tokenizer from {path!r}: {reason}") from None
    if tokenizer.pad_token is None:
        # Causal LMs often ship without a pad token; EOS is safe because padding is always masked.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def four_bit_config(adapter, path: str, model: ModelConfig, hardware: HardwareConfig):
    """The bitsandbytes 4-bit config for adapter=qlora (None for any other adapter); refuses, in one
    line, a machine without bitsandbytes."""
    if adapter is None or adapter.kind != "qlora":
        return None
    import importlib.util

    bitsandbytes_gate.release()
    if importlib.util.find_spec("bitsandbytes") is None:
        raise AdapterError("adapter=qlora needs bitsandbytes (pip install bitsandbytes): 4-bit runs on CUDA GPUs and, from bitsandbytes 0.45, on CPU")
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=adapter.quant_type,
        bnb_4bit_use_double_quant=adapter.double_quant,
        bnb_4bit_compute_dtype=DTYPES[adapter.compute_dtype],
    )


def keep_4bit_trainable(model: torch.nn.Module) -> torch.nn.Module:
    """Keep bitsandbytes' 4-bit layers on the path that backpropagates.

    On CPUs with AVX512-BF16, a Linear4bit that runs once in eval mode without gradients (an
    evaluation, a rollout) repacks its weight for a fast inference kernel and keeps using that kernel
    afterwards; it has no backward, so the gradient to earlier layers would silently vanish in the
    next training step (and the repacking fails outright on widths that are not multiples of 64).
    """
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    return model


def _requantized(model: torch.nn.Module, quantization, hardware: HardwareConfig) -> torch.nn.Module:
    """A model built in memory (an adapter merged into its base, a classifier grown from a causal
    LM), reloaded in 4 bits through from_pretrained: written aside first, so bitsandbytes quantises
    it the one way it quantises any checkpoint."""
    import tempfile

    from safetensors.torch import save_model

    with tempfile.TemporaryDirectory(prefix="alignctl-4bit-") as tmp:
        # Written by every process for itself: save_pretrained writes on rank 0 only once a process
        # group exists. save_model drops the second name of a tied weight, as save_pretrained does.
        model.config.save_pretrained(tmp)
        save_model(model, str(Path(tmp) / "model.safetensors"))
        reloaded = type(model).from_pretrained(tmp, quantization_config=quantization, device_map={"": device_of(hardware)})
    reloaded.name_or_path = reloaded.config._name_or_path = model.name_or_path  # not the temporary directory
    return keep_4bit_trainable(reloaded)


def base_dir_of(cfg, run_dir: Path, *parts: str) -> Path | None:
    """Where a run keeps the base its adapter names (anchor_base); None for an evaluation
    (recipe.max_steps=0, alignctl eval), which saves no adapter and so needs no base on disk."""
    return run_dir.joinpath(BASE_DIR, *parts) if getattr(cfg.recipe, "max_steps", 0) else None


def anchor_base(built: torch.nn.Module, adapter, base_dir: Path | None) -> None:
    """Give an adapter a base that exists on disk.

    A model built in memory (a parent run's adapter merged into its base, a classifier grown from a
    causal LM) is what the new adapter trains on, but its config still names the original base, so
    peft would record that one and a plain AutoPeftModel load would silently drop the merged weights.
    Write the built model once to `base_dir` (atomically) and let the adapter name it.
    """
    if base_dir is None or adapter is None or adapter.kind == "none":
        return
    import shutil

    if distributed.current().is_main:  # one writer; the other processes wait for it
        tmp = base_dir.with_name(f".{base_dir.name}.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        built.save_pretrained(tmp, safe_serialization=True)
        shutil.rmtree(base_dir, ignore_errors=True)
        os.replace(tmp, base_dir)
    distributed.barrier()
    built.name_or_path = built.config._name_or_path = str(base_dir.resolve())  # peft records name_or_path


def anchor_4bit(lm: torch.nn.Module, source: str, model: ModelConfig, quantization, base_dir: Path | None) -> None:
    """QLoRA over a model read from disk or the hub: the adapter trains on its 4-bit version, so that
    (NF4 weights, quantization_config in config.json) is the base its checkpoint names, written once
    to the cache per source and quantisation. Plain peft (AutoPeftModelForCausalLM) then loads the
    model that trained, not the full-precision one, and `export merge=true` dequantises the same values.
    Nothing for an evaluation (`base_dir` None): it saves no adapter."""
    if base_dir is None:
        return
    import fcntl

    root = Path(source)
    weights = sorted(root.glob("*.safetensors")) + sorted(root.glob("*.bin")) if root.is_dir() else []
    identity = {"source": str(root.resolve()) if root.is_dir() else source, "revision": model.revision,
                "files": [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in weights], "quantization": quantization.to_dict()}
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:12]
    out = cache_dir() / "models" / f"{root.name}-4bit-{digest}"
    if distributed.current().is_main and not (out / "config.json").exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        with open(out.parent / f".{out.name}.lock", "w") as lock:  # parallel runs from one base: one writes
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not (out / "config.json").exists():
                tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
                lm.save_pretrained(tmp, safe_serialization=True)
                tmp.rename(out)
    distributed.barrier()
    lm.name_or_path = lm.config._name_or_path = str(out)  # peft records name_or_path


def quantized_on_disk(base: str) -> bool:
    """Whether the model directory `base` holds quantised weights (quantization_config in its config.json)."""
    config = Path(base) / "config.json"
    return config.exists() and "quantization_config" in json.loads(config.read_text())


@reads_not_mapped
def merged_checkpoint(path: str, auto, **kwargs) -> torch.nn.Module:
    """A run's adapter checkpoint folded into the base it names (what AutoPeftModel + merge_and_unload
    gives). A QLoRA checkpoint names its 4-bit base (anchor_4bit): the adapter goes into that base's
    dequantised values, the model it trained as, not into NF4 weights that would be quantised again."""
    base = json.loads((Path(path) / "adapter_config.json").read_text())["base_model_name_or_path"]
    if quantized_on_disk(base):
        bitsandbytes_gate.release()
        # Not repacked for bitsandbytes' CPU inference kernel: dequantize() reads the trained layout.
        loaded = keep_4bit_trainable(auto.from_pretrained(base, device_map={"": "cpu"}, **kwargs)).dequantize()
    else:
        loaded = auto.from_pretrained(base, **kwargs)
    return PeftModel.from_pretrained(loaded, path).merge_and_unload()


@reads_not_mapped
def load_causal_lm(path: str, model: ModelConfig, hardware: HardwareConfig, adapter=None, base_dir: Path | None = None) -> torch.nn.Module:
    """Load a causal LM from safetensors (trust_remote_code only if asked), on the configured device;
    in 4 bits when `adapter` is qlora (the model that trains under the adapter). A run checkpoint
    holding an adapter is merged into its base, which `base_dir` then keeps (see anchor_base)."""
    quantization = four_bit_config(adapter, path, model, hardware)
    kwargs = dict(
        dtype=DTYPES[adapter.compute_dtype] if quantization else DTYPES[hardware.dtype],
        trust_remote_code=model.trust_remote_code,
        revision=model.revision,
        use_safetensors=None,  # prefer safetensors; .bin files are read with weights_only=True by transformers
    )
    if model.attn_implementation:
        kwargs["attn_implementation"] = model.attn_implementation
    try:
        if (Path(path) / "adapter_config.json").exists():
            # A LoRA run's checkpoint: fold the adapter into its base so the next stage starts from
            # the trained weights (and may put an adapter of its own on top).
            lm = merged_checkpoint(path, AutoModelForCausalLM, **kwargs)
            if quantization:
                lm = _requantized(lm, quantization, hardware)
            anchor_base(lm, adapter, base_dir)  # QLoRA: in 4 bits, the model the adapter trains on
        elif quantization:
            lm = keep_4bit_trainable(AutoModelForCausalLM.from_pretrained(path, quantization_config=quantization, device_map={"": device_of(hardware)}, **kwargs))
            anchor_4bit(lm, path, model, quantization, base_dir)
        else:
            lm = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except ValueError as err:
        if "trust_remote_code" in str(err):
            raise ModelLoadError(
                f"{path} ships its own modelling code; set model.trust_remote_code=true if you trust it"
            ) from None
        raise
    except OSError as err:
        raise ModelLoadError(f"cannot load a model from {path!r}: {str(err).splitlines()[0]}") from None
    if hardware.gradient_checkpointing:
        # transformers 5.2x renamed it (the old name warns until v6); older versions know only the old one.
        if hasattr(lm, "activation_checkpointing_enable"):
            lm.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        lm.config.use_cache = False
    return cpu_attention.use_on_cpu(lm if quantization else lm.to(device_of(hardware)))


def check_reward_model(path: str, model: ModelConfig, culprit: str) -> None:
    """Refuse a path that holds no trained reward model (a one-label sequence classifier), which
    load_reward_model would otherwise quietly turn into one with an untrained head."""
    from transformers import AutoConfig

    adapter = Path(path) / "adapter_config.json"
    if adapter.exists():
        kind = json.loads(adapter.read_text()).get("task_type")
        if kind != "SEQ_CLS":
            raise ModelLoadError(f"{culprit}: {path} holds a {kind} adapter, not a reward model; give the run directory of a recipe=reward run")
        return
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=model.trust_remote_code, revision=model.revision)
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"{culprit}: cannot read a model config from {path!r}: {str(err).splitlines()[0]}") from None
    architectures = getattr(config, "architectures", None) or []
    if not any(a.endswith("ForSequenceClassification") for a in architectures) or config.num_labels != 1:
        found = ", ".join(architectures) or "no architecture"
        raise ModelLoadError(
            f"{culprit}: {path} is not a reward model ({found}, {config.num_labels} labels); give the run directory "
            "of a recipe=reward run (a one-label sequence classifier)"
        )


@reads_not_mapped
def load_reward_model(path: str, model: ModelConfig, hardware: HardwareConfig, pad_token_id: int, adapter=None,
                      base_dir: Path | None = None) -> torch.nn.Module:
    """A one-label sequence classifier: a reward model, or a new one whose backbone comes from a causal LM.

    From a causal LM (or a LoRA run's checkpoint), the backbone weights are kept and a fresh scalar
    head is added, so a reward model initialised from an SFT run starts out knowing the task.
    """
    adapter_file = Path(path) / "adapter_config.json"
    if adapter_file.exists() and json.loads(adapter_file.read_text()).get("task_type") == "SEQ_CLS":
        scorer = merged_checkpoint(path, AutoModelForSequenceClassification, num_labels=1, dtype=DTYPES[hardware.dtype])
    elif adapter_file.exists():
        causal = load_causal_lm(path, model, hardware)
        scorer = AutoModelForSequenceClassification.from_config(causal.config, num_labels=1, dtype=DTYPES[hardware.dtype])
        scorer.base_model.load_state_dict(causal.base_model.state_dict())
    quantization = four_bit_config(adapter, path, model, hardware)  # qlora: the scorer trains under the adapter
    if adapter_file.exists():
        scorer.config.pad_token_id = pad_token_id
        if not quantization:
            anchor_base(scorer, adapter, base_dir)
    else:
        try:
            scorer = AutoModelForSequenceClassification.from_pretrained(
                path, num_labels=1, dtype=DTYPES[hardware.dtype], trust_remote_code=model.trust_remote_code, revision=model.revision
            )
        except OSError as err:
            raise ModelLoadError(f"cannot load a reward model from {path!r}: {str(err).splitlines()[0]}") from None
    # The classifier pools the last non-padding token, which it finds through the pad id.
    scorer.config.pad_token_id = pad_token_id
    if not quantization:
        return cpu_attention.use_on_cpu(scorer.to(device_of(hardware)))
    scorer = _requantized(scorer, quantization, hardware)
    anchor_base(scorer, adapter, base_dir)  # the 4-bit scorer (its head still fresh) is the base the adapter names
    return scorer


def add_decoder_layers(model: torch.nn.Module, count: int) -> None:
    """Stack `count` new decoder layers on top of a (Llama-style) backbone, in place.

    Each new layer's output projections (attention o_proj, MLP down_proj) start at zero, so it adds
    nothing to the residual stream and the model computes exactly what it did before; training then
    grows them. The saved config counts the layers, so the result loads like any model of its class.
    """
    layers = getattr(backbone(model), "layers", None)
    if not isinstance(layers, torch.nn.ModuleList) or not len(layers):
        raise ModelLoadError(f"recipe.extra_layers: {type(model).__name__} has no list of decoder layers at .{model.base_model_prefix}.layers; use extra_layers=0")
    template, config = layers[0], model.config
    reference = next(template.parameters())
    for _ in range(count):
        layer = type(template)(config, len(layers)).to(dtype=reference.dtype, device=reference.device)
        outputs = [m for name, m in layer.named_modules() if name.endswith(("o_proj", "down_proj")) and isinstance(m, torch.nn.Linear)]
        if len(outputs) != 2:
            raise ModelLoadError(f"recipe.extra_layers: {type(template).__name__} is not a Llama-style layer (o_proj, down_proj); use extra_layers=0")
        for module in layer.modules():
            if isinstance(module, torch.nn.Linear):
                torch.nn.init.normal_(module.weight, std=getattr(config, "initializer_range", 0.02))
        for module in outputs:
            torch.nn.init.zeros_(module.weight)
        layers.append(layer)
    config.num_hidden_layers = len(layers)
    if getattr(config, "layer_types", None):
        config.layer_types = list(config.layer_types) + [config.layer_types[-1]] * count
