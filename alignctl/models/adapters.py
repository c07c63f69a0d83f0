"""Adapters through peft: none (full fine-tuning), LoRA, DoRA and QLoRA.

LoRA keeps W0 frozen and trains W0 + (alpha / r) * B A with B = 0 at the start (Hu et al., 2021),
so a fresh adapter leaves the model's outputs unchanged until the first optimiser step. It adds
r * (d_in + d_out) parameters per adapted matrix.
DoRA (Liu et al., 2024) writes W = m * V / ||V|| with V = W0 + (alpha / r) B A and trains the
magnitude vector m (d_out more parameters per matrix) beside A and B: peft's use_dora.
QLoRA (Dettmers et al., 2023) is LoRA over a base that models.load_causal_lm loaded in 4 bits;
peft's prepare_model_for_kbit_training keeps the norms in float32 before the adapter goes on.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import peft
import torch
from peft import set_peft_model_state_dict
from peft.utils import load_peft_weights

from alignctl.config.schema import LoraConfig, NoAdapterConfig
from alignctl.core.errors import AdapterError, UserError
from alignctl.models.precision import trainable_in_float32
from alignctl.nn.lm_head import keep_last
from alignctl.nn.lora_linear import FusedLoraLinear, group_projections

HEAD_NAMES = ("lm_head", "score", "classifier")  # output layers: never adapted by all-linear


def _linear_names(model: torch.nn.Module) -> list[str]:
    return sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)})


def check_targets(model: torch.nn.Module, targets: Any) -> str | list[str]:
    """`targets` (all-linear or module names), refused in one line if the model lacks one of them."""
    if isinstance(targets, str):
        return targets
    targets = list(targets)
    present = _linear_names(model)
    missing = [t for t in targets if t not in present]
    if missing:
        raise AdapterError(
            f"adapter.target_modules: the model has no module {', '.join(missing)}; "
            f"its linear layers are {', '.join(present)} (or use all-linear)"
        )
    return targets


def adapted_linears(model: torch.nn.Module, targets: Any) -> list[tuple[str, torch.nn.Linear]]:
    """(name, layer) of the linear layers an adapter with `targets` adapts (all-linear: every linear
    layer but the output head, as peft chooses). Works on a meta-device model (alignctl plan)."""
    chosen = []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            leaf = name.rsplit(".", 1)[-1]
            if (leaf not in HEAD_NAMES) if targets == "all-linear" else (leaf in list(targets)):
                chosen.append((name, module))
    return chosen


def check_rank(model: torch.nn.Module, targets: Any, r: int) -> None:
    """Refuse, naming the narrowest adapted matrix, a rank above min(d_in, d_out): B A could not reach
    it, and the oversized A and B only cost memory (r=100000 on a width-96 model asks for gigabytes)."""
    adapted = adapted_linears(model, targets)
    if not adapted:
        return
    name, layer = min(adapted, key=lambda item: min(item[1].in_features, item[1].out_features))
    limit = min(layer.in_features, layer.out_features)
    if r > limit:
        raise AdapterError(
            f"adapter.r: {r} is more than {name} ({layer.in_features} in, {layer.out_features} out) can use; "
            f"valid: 1 to {limit}, the smaller dimension of the narrowest adapted matrix"
        )


def apply_adapter(model: torch.nn.Module, adapter: NoAdapterConfig | LoraConfig, task_type: str = "CAUSAL_LM") -> torch.nn.Module:
    """Wrap `model` with the configured adapter (or return it unchanged for adapter=none).

    task_type SEQ_CLS (reward and value models) also trains the new scalar head in full.
    """
    if adapter.kind == "none":
        return model
    targets = check_targets(model, adapter.target_modules)
    check_rank(model, targets, adapter.r)
    if adapter.kind == "qlora":
        # Gradient checkpointing, if asked for, was switched on when the model loaded.
        model = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    config = peft.LoraConfig(
        task_type=peft.TaskType[task_type],
        r=adapter.r,
        lora_alpha=adapter.alpha,
        lora_dropout=adapter.dropout,
        target_modules=targets,
        use_rslora=adapter.use_rslora,
        init_lora_weights=adapter.init_lora_weights,
        bias=adapter.bias,
        use_dora=adapter.kind == "dora",
    )
    if adapter.kind == "lora":  # full-precision bases only: a 4-bit layer is an nn.Linear too
        config._register_custom_module({torch.nn.Linear: FusedLoraLinear})
    model = peft.get_peft_model(model, config)
    group_projections(model)
    # Over a bf16 base (alignctl/models/precision.py) every trained weight stays float32.
    return trainable_in_float32(model)


def parameter_counts(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; a 4-bit weight stores two values per byte-sized element,
    so it counts twice its numel (as peft's get_nb_trainable_parameters counts it)."""

    def count(p: torch.nn.Parameter) -> int:
        return p.numel() * 2 if p.__class__.__name__ == "Params4bit" else p.numel()

    trainable = sum(count(p) for p in model.parameters() if p.requires_grad)
    total = sum(count(p) for p in model.parameters())
    return trainable, total


VALUE_ADAPTER = "value"


class SharedBaseValue(torch.nn.Module):
    """A value model that shares the policy's frozen base: its own LoRA adapter (named "value") on
    the policy's peft model, plus a scalar head. One base in memory for both trained models.

    peft activates one adapter at a time and `set_adapter` freezes the others; `values` switches to
    the value adapter for its forward and back, then marks both adapters trainable again, so one
    optimiser keeps training both (each forward only reaches its own adapter's weights).
    """

    def __init__(self, policy: peft.PeftModel):
        super().__init__()
        self.policy = [policy]  # a list: not registered as a submodule (the policy's parameters are its own)
        policy.add_adapter(VALUE_ADAPTER, copy.deepcopy(policy.peft_config["default"]))
        policy.set_requires_grad(["default", VALUE_ADAPTER], True)
        hidden = policy.get_base_model().config.hidden_size
        self.head = torch.nn.Linear(hidden, 1, bias=False)
        torch.nn.init.zeros_(self.head.weight)  # values start at 0: GAE's first advantages are the rewards
        self.head.to(next(policy.parameters()).device)

    def value_parameters(self) -> list[torch.nn.Parameter]:
        names = f".{VALUE_ADAPTER}."
        return [p for n, p in self.policy[0].named_parameters() if names in n] + list(self.head.parameters())

    def values(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """(B, W) values, aligned as ops.response_values aligns them."""
        policy = self.policy[0]
        width = int(batch["response_mask"].sum(-1).max())
        policy.set_adapter(VALUE_ADAPTER)
        try:
            # The policy's own forward (so a sharded model gathers its weights), its LM head on one position only.
            hidden = policy(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], position_ids=batch["position_ids"], use_cache=False,
                output_hidden_states=True, logits_to_keep=keep_last(batch["input_ids"], 1),
            ).hidden_states[-1]
        finally:
            policy.set_adapter("default")
            policy.set_requires_grad(["default", VALUE_ADAPTER], True)
        return self.head(hidden[:, -width - 1 : -1]).squeeze(-1).float()

    def save_pretrained(self, directory, policy_state: dict | None = None, head_state: dict | None = None, **kwargs) -> None:
        """The value adapter (peft layout) and the head, beside the policy's files; from gathered full
        states (`policy_state`, `head_state`) when the live weights are sharded."""
        from safetensors.torch import save_file

        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        state = {"state_dict": policy_state} if policy_state is not None else {}
        self.policy[0].save_pretrained(out, selected_adapters=[VALUE_ADAPTER], **state, **kwargs)
        head = head_state["head.weight"] if head_state is not None else self.head.weight.detach()
        save_file({"weight": head.cpu().contiguous()}, str(out / "value_head.safetensors"))

    def fsdp_roots(self) -> list[torch.nn.Module]:
        """Only the head is this module's own (the adapter lives in the policy's layers)."""
        return [self.head]

    def load_weights(self, directory) -> None:
        """Resume: the value adapter (peft keeps a non-default adapter in a folder of its name) and the head."""
        from safetensors.torch import load_file

        load_adapter(self.policy[0], Path(directory) / VALUE_ADAPTER, VALUE_ADAPTER)
        with torch.no_grad():
            self.head.weight.copy_(load_file(str(Path(directory) / "value_head.safetensors"))["weight"])


def load_adapter(model: Any, directory: Path, adapter_name: str) -> None:
    """Load a saved peft adapter's weights (and modules_to_save, e.g. a reward head) into `adapter_name`."""
    result = set_peft_model_state_dict(model, load_peft_weights(str(directory)), adapter_name=adapter_name)
    unexpected = [k for k in result.unexpected_keys if "lora_" in k or "modules_to_save" in k]
    if unexpected:
        raise UserError(f"{directory}: its adapter does not fit the model this config builds (unexpected {', '.join(unexpected[:3])}); resume with the run's own config")
