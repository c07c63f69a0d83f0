"""Rollouts sampled by vLLM colocated in the training process (rollout engine ``vllm``, GPU only).

vLLM (paged KV cache, continuous batching, CUDA graphs) samples far faster than ``model.generate``.
Here it runs inside the training process, beside the policy it samples for, as TRL's GRPOTrainer
does with ``vllm_mode="colocate"``: no second server or GPU, but vLLM holds its own copy of the
weights, so ``VLLMRollouts.push_weights`` writes the policy's current weights into that copy before
each rollout. A peft policy goes over merged (W + scale * B A, or DoRA's merge): vLLM's copy is a
plain model, with no place for lora_A / lora_B.

How the push reaches vLLM follows TRL 1.x (trl/generation/vllm_generation.py, VLLMGeneration:
``_init_vllm`` and ``sync_weights``; TRL pins vllm>=0.16,<=0.25, the V1 engine): the engine is
built with vLLM's ``external_launcher`` backend, which keeps vLLM's engine core and worker in this
process (it turns VLLM_ENABLE_V1_MULTIPROCESSING off), so vLLM's model object is reachable as
``llm.llm_engine.model_executor.driver_worker.model_runner.model``. Its ``load_weights`` takes
(Hugging Face name, tensor) pairs and copies each into vLLM's own (possibly fused, e.g. qkv_proj)
parameters, in place, so captured CUDA graphs stay valid. The prefix cache is reset afterwards: the
KV blocks it holds were computed with the old weights.

vllm is optional (not a dependency of alignctl): it is imported inside the functions that need it,
so this module imports, and its pure helpers run, on a machine without it.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator, Sequence

import torch
from peft import PeftModel
from peft.tuners.tuners_utils import BaseTunerLayer

from alignctl.core import distributed
from alignctl.core.errors import ConfigError
from alignctl.train.sharding import is_sharded

CONFIG_KEY = "recipe.rollout_engine"


def unavailable_reason() -> str | None:
    """Why the vllm engine cannot run on this machine, in one line; None when it can."""
    try:
        import vllm  # noqa: F401
    except ImportError as error:
        # A missing dependency of an installed vllm is not "vllm is not installed": name it.
        return "vllm is not installed (pip install vllm)" if error.name == "vllm" else f"vllm does not import: {error}"
    if not torch.cuda.is_available():
        return "vLLM needs a CUDA GPU"
    return None


class VLLMRollouts:
    """One vLLM engine for a run: built once from the policy's starting checkpoint, then refreshed
    with `push_weights` before each rollout and sampled with `sample`.

    `seed` seeds vLLM's sampling; processes of a multi-GPU run each hold an engine of their own and
    should pass different seeds (TRL passes the process index), or they sample the same completions
    for the same prompts. `max_model_len` bounds prompt + completion; `gpu_memory_utilization` is the
    share of the GPU vLLM may take (weights and KV cache), the rest staying with training.
    """

    def __init__(self, model_path: str, max_model_len: int, *, seed: int, gpu_memory_utilization: float = 0.3,
                 dtype: str = "auto", enable_prefix_caching: bool = True):
        reason = unavailable_reason()
        if reason is not None:
            raise ConfigError(CONFIG_KEY, f"vllm cannot run here: {reason}; use native, hf or auto")
        from vllm import LLM

        for key, value in rendezvous_defaults(distributed.current()).items():
            os.environ.setdefault(key, value)  # a process started by torchrun keeps its own
        self.llm = LLM(
            model=model_path,
            tensor_parallel_size=1,
            gpu_memory_utilization=gpu_memory_utilization,
            max_model_len=max_model_len,
            enable_sleep_mode=False,
            seed=seed,
            dtype=dtype,
            enable_prefix_caching=enable_prefix_caching,  # then a prompt's K sequences share its KV blocks
            distributed_executor_backend="external_launcher",  # in this process: see the module docstring
        )

    def push_weights(self, model: torch.nn.Module) -> None:
        """Load `model`'s current weights (a peft model's merged) into vLLM's copy of the policy.

        The training model is left exactly as it was (see `merged_parameters`)."""
        if is_sharded(model):
            raise ConfigError(CONFIG_KEY, "vllm takes its weights from an unsharded policy; "
                                          "use hardware=ddp or the hf engine")
        if any(not p.is_floating_point() for p in model.parameters()):
            raise ConfigError(CONFIG_KEY, "vllm cannot take a quantized (4-bit, qlora) base; use lora or the hf engine")
        vllm_model = self.llm.llm_engine.model_executor.driver_worker.model_runner.model
        vllm_model.load_weights(merged_parameters(model))
        self.llm.reset_prefix_cache()

    def sample(self, prompt_ids: Sequence[Sequence[int]], num_generations: int, temperature: float, top_p: float,
               top_k: int, max_new_tokens: int, eos_id: int, with_logps: bool = False) -> list[list[int]] | tuple[list[list[int]], list[list[float]]]:
        """`num_generations` completions per prompt, the K of a prompt consecutive (alignctl.rl.rollout's
        order). A completion that ended keeps its EOS as its last token; one without EOS was truncated
        at `max_new_tokens`. `top_k` 0 means off. `with_logps`: also each sampled token's log-prob
        under the distribution vLLM drew it from (``processed_logprobs``: after temperature, top-p, top-k)."""
        from vllm import SamplingParams

        settings = dict(
            n=num_generations,  # one request per prompt, fanned out into K sequences by vLLM
            temperature=temperature,
            top_p=top_p,
            top_k=vllm_top_k(top_k),
            max_tokens=max_new_tokens,
            # Stop at eos_id and only there, as the native and hf engines do: without ignore_eos vLLM
            # would also stop at the EOS ids of the model's tokenizer and generation_config.
            ignore_eos=True,
            stop_token_ids=[eos_id],
            detokenize=False,  # token ids in, token ids out: no text is read
        )
        if with_logps:
            try:  # logprobs=0: the sampled token's own; processed: of the distribution sampled from
                params = SamplingParams(**settings, logprobs=0, logprobs_mode="processed_logprobs")
            except TypeError:  # vLLM before logprobs_mode: raw log-probs, a mismatch the metric then shows
                params = SamplingParams(**settings, logprobs=0)
        else:
            params = SamplingParams(**settings)
        prompts = [{"prompt_token_ids": list(ids)} for ids in prompt_ids]
        requests = self.llm.generate(prompts, sampling_params=params, use_tqdm=False)
        outputs = [c for request in requests for c in request.outputs]
        completions = [completion_tokens(c.token_ids, c.finish_reason, eos_id) for c in outputs]
        if not with_logps:
            return completions
        return completions, [sampled_logps(c, len(ids)) for c, ids in zip(outputs, completions)]


def vllm_top_k(top_k: int) -> int:
    """alignctl's top_k (0: off) in vLLM's terms, where -1 is off in every version (0 only in recent ones)."""
    return top_k if top_k > 0 else -1


def sampled_logps(output, length: int) -> list[float]:
    """The log-prob vLLM reported for each sampled token of `output` (a CompletionOutput asked for
    logprobs=0), padded with 0 to `length` (an EOS put back by `completion_tokens` has none)."""
    values = [float(step[token].logprob) for token, step in zip(output.token_ids, output.logprobs or [])]
    return (values + [0.0] * length)[:length]


def completion_tokens(token_ids: Sequence[int], finish_reason: str | None, eos_id: int) -> list[int]:
    """A vLLM completion's tokens, ending with eos_id when generation stopped on it.

    vLLM keeps a stop token in ``token_ids`` (it only leaves it out of the text), but the EOS is put
    back if a version drops it: with eos_id as the only stop condition, finish_reason "stop" means
    eos_id was sampled. "length" (max_new_tokens or max_model_len reached) means truncated."""
    tokens = list(token_ids)
    if finish_reason == "stop" and tokens[-1:] != [eos_id]:
        tokens.append(eos_id)
    return tokens


def rendezvous_defaults(group: distributed.Group) -> dict[str, str]:
    """The torch.distributed environment vLLM's external_launcher backend reads (as TRL sets it).

    Under torchrun it is already there; a single process is rank 0 of 1, on a free local port (vLLM
    then starts a process group of one)."""
    return {
        "RANK": str(group.rank),
        "WORLD_SIZE": str(group.world_size),
        "LOCAL_RANK": str(group.local_rank),
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(_free_port()),
    }


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def merged_parameters(model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) for every parameter of the plain model under `model`, with its active adapter merged in.

    The names are the plain model's own, those of its Hugging Face checkpoint, which is what vLLM's
    ``load_weights`` maps: an adapted layer's weights come under the layer's name (``q_proj.weight``,
    not peft's ``base_model.model....q_proj.base_layer.weight``), and the adapter's parameters
    (lora_A, lora_B, DoRA's magnitude) are left out. TRL reaches the same names by rewriting peft's
    (``_fix_param_name_to_vllm`` and the ``base_layer`` / ``lora_`` rules of ``sync_weights``); here
    they come from the module tree, with tied weights once, as ``named_parameters`` gives them.

    Adapted layers are merged one at a time (see `merged_layer`), so the extra memory is a layer's.
    Unadapted parameters are yielded as they are (detached, not copied)."""
    root = model.get_base_model() if isinstance(model, PeftModel) else model
    return _walk(root, "", set())


def _walk(module: torch.nn.Module, prefix: str, seen: set[int]) -> Iterator[tuple[str, torch.Tensor]]:
    if isinstance(module, BaseTunerLayer):
        for name, tensor in merged_layer(module).items():
            yield prefix + name, tensor
        return
    for name, param in module.named_parameters(recurse=False):
        if id(param) not in seen:
            seen.add(id(param))
            yield prefix + name, param.detach()
    for name, child in module.named_children():
        yield from _walk(child, f"{prefix}{name}.", seen)


@torch.no_grad()
def merged_layer(layer: BaseTunerLayer) -> dict[str, torch.Tensor]:
    """The parameters of `layer`'s base layer with its active adapters merged in, as copies.

    peft merges into the base weights in place, as TRL's merge_adapter() / unmerge_adapter() does,
    but unmerging subtracts what merging added, which gives the original weights back only up to
    rounding: in bf16 that drift would build up in the frozen base over a run's rollouts (TRL issue
    #6688). So the base layer's values are saved before the merge and written back after it."""
    params = dict(layer.get_base_layer().named_parameters())
    originals = {name: param.detach().clone() for name, param in params.items()}
    layer.merge()
    merged = {name: param.detach().clone() for name, param in params.items()}
    if layer.merged:  # False when none of the active adapters lives in this layer
        layer.unmerge()
    for name, param in params.items():
        param.copy_(originals[name])
    return merged
