"""alignctl.rl.vllm_engine: without vllm or a GPU it says why in one line and imports nothing of vllm; its
pure parts (merged peft weights under the plain model's names, EOS kept, top_k) and its calls into vLLM
(through a stand-in vllm) run on CPU. The last test samples from a real vLLM engine on a CUDA machine."""

from __future__ import annotations

import copy
import importlib
import sys
import types
from types import SimpleNamespace

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import alignctl.rl
from alignctl.config.schema import LoraConfig
from alignctl.core import distributed
from alignctl.core.errors import ConfigError
from alignctl.models.adapters import apply_adapter
from alignctl.rl.vllm_engine import (
    VLLMRollouts,
    completion_tokens,
    merged_parameters,
    rendezvous_defaults,
    unavailable_reason,
    vllm_top_k,
)

TINY = dict(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2)


def tiny_llama(dtype=torch.float32) -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**TINY)).to(dtype).eval()


def adapter(kind: str, targets="all-linear") -> LoraConfig:
    """alignctl's own adapter config; init_lora_weights=False gives a nonzero B, so merging changes W."""
    return LoraConfig(kind=kind, r=4, alpha=8, dropout=0.0, target_modules=targets, use_rslora=False,
                      init_lora_weights=False, bias="none")


def weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


# --- availability -------------------------------------------------------------------------------


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA machine may run vllm")
def test_unavailable_reason_here_is_one_line():
    reason = unavailable_reason()
    assert reason in ("vllm is not installed (pip install vllm)", "vLLM needs a CUDA GPU")


def test_unavailable_reason_names_the_missing_piece(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "vllm", None)  # `import vllm` raises ModuleNotFoundError(name="vllm")
    assert unavailable_reason() == "vllm is not installed (pip install vllm)"

    monkeypatch.setitem(sys.modules, "vllm", types.ModuleType("vllm"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert unavailable_reason() == "vLLM needs a CUDA GPU"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert unavailable_reason() is None

    # An installed vllm whose own import fails is reported as such, not as "not installed".
    monkeypatch.delitem(sys.modules, "vllm")
    (tmp_path / "vllm").mkdir()
    (tmp_path / "vllm" / "__init__.py").write_text("import a_dependency_vllm_lacks_here\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert unavailable_reason() == "vllm does not import: No module named 'a_dependency_vllm_lacks_here'"


def test_module_import_does_not_import_vllm(monkeypatch):
    class RecordVllmLookups:
        def __init__(self):
            self.names: list[str] = []

        def find_spec(self, name, path=None, target=None):
            if name == "vllm" or name.startswith("vllm."):
                self.names.append(name)
            return None

    finder = RecordVllmLookups()
    monkeypatch.setattr(sys, "meta_path", [finder, *sys.meta_path])
    monkeypatch.setattr(alignctl.rl, "vllm_engine", sys.modules["alignctl.rl.vllm_engine"])  # both put back afterwards
    monkeypatch.delitem(sys.modules, "alignctl.rl.vllm_engine")
    module = importlib.import_module("alignctl.rl.vllm_engine")
    assert module.VLLMRollouts and finder.names == [] and "vllm" not in sys.modules


def test_construction_without_vllm_is_a_config_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)
    with pytest.raises(ConfigError, match="recipe.rollout_engine: vllm cannot run here: vllm is not installed"):
        VLLMRollouts("some/model", 64, seed=0)


# --- pure helpers -------------------------------------------------------------------------------


def test_top_k_zero_is_vllm_off():
    assert vllm_top_k(0) == -1 and vllm_top_k(5) == 5


@pytest.mark.parametrize(
    ("token_ids", "finish_reason", "expected"),
    [
        ((5, 6, 2), "stop", [5, 6, 2]),  # vLLM kept the stop token: unchanged
        ((5, 6), "stop", [5, 6, 2]),  # a version that drops it: put back
        ((2,), "stop", [2]),  # EOS first
        ((5, 6, 7), "length", [5, 6, 7]),  # truncated: no EOS
        ((), "length", []),
    ],
)
def test_a_finished_completion_keeps_its_eos(token_ids, finish_reason, expected):
    assert completion_tokens(token_ids, finish_reason, eos_id=2) == expected


def test_rendezvous_defaults_name_the_rank():
    env = rendezvous_defaults(distributed.Group(rank=1, world_size=2, local_rank=1))
    assert {k: env[k] for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")} == {
        "RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_ADDR": "127.0.0.1"}
    assert 0 < int(env["MASTER_PORT"]) < 65536


# --- merged weights -----------------------------------------------------------------------------


def test_a_plain_model_pushes_its_own_parameters():
    model = tiny_llama()
    pushed = list(merged_parameters(model))
    assert [name for name, _ in pushed] == [name for name, _ in model.named_parameters()]
    params = [param for _, param in model.named_parameters()]
    assert all(tensor is not param and torch.equal(tensor, param) for (_, tensor), param in zip(pushed, params))


def test_lora_pushes_the_base_names_with_w_plus_scaled_ba():
    plain_names = [name for name, _ in tiny_llama().named_parameters()]
    model = apply_adapter(tiny_llama(), adapter("lora", ["q_proj", "v_proj", "down_proj"]))
    before = weights(model)
    pushed = dict(merged_parameters(model))

    assert list(pushed) == plain_names  # no base_model.model. / base_layer / lora_ names, nothing missing
    scale = 8 / 4
    for name, value in pushed.items():
        peft_name = f"base_model.model.{name}"
        if any(f".{target}." in name for target in ("q_proj", "v_proj", "down_proj")):
            layer = peft_name.removesuffix(".weight")
            a, b = before[f"{layer}.lora_A.default.weight"], before[f"{layer}.lora_B.default.weight"]
            w = before[f"{layer}.base_layer.weight"]
            assert not torch.allclose(b @ a, torch.zeros_like(w))
            torch.testing.assert_close(value, w + scale * b @ a, rtol=0, atol=1e-6)
        else:
            assert torch.equal(value, before[peft_name])

    after = weights(model)
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    assert not any(getattr(module, "merged", False) for module in model.modules())


@pytest.mark.parametrize("kind", ["lora", "dora"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merged_weights_are_peft_merge_and_the_model_is_left_bit_exact(kind, dtype):
    """Against peft's own merge_and_unload (on a copy), for alignctl's fused LoRA layer and DoRA; in bf16 too,
    where peft's merge-then-unmerge alone would not give the base weights back."""
    model = apply_adapter(tiny_llama(dtype), adapter(kind))
    before = weights(model)
    expected = dict(copy.deepcopy(model).merge_and_unload().named_parameters())
    for _ in range(3):  # repeated pushes, as over a run's rollouts
        pushed = dict(merged_parameters(model))
    assert pushed.keys() == expected.keys()
    for name, value in pushed.items():
        assert value.dtype == dtype
        torch.testing.assert_close(value, expected[name].detach(), rtol=0, atol=0 if dtype == torch.bfloat16 else 1e-6)
    after = weights(model)
    assert all(torch.equal(after[k], before[k]) for k in before)


def test_merged_weights_merge_the_active_adapter_only():
    """PPO's shared base carries a second adapter ("value"); the policy's ("default") is the active one."""
    model = apply_adapter(tiny_llama(), adapter("lora"))
    default_merged = dict(merged_parameters(model))
    model.add_adapter("value", copy.deepcopy(model.peft_config["default"]))
    pushed = dict(merged_parameters(model))
    assert pushed.keys() == default_merged.keys()
    assert all(torch.equal(pushed[k], default_merged[k]) for k in pushed)


# --- the calls into vLLM, through a stand-in vllm -----------------------------------------------


class FakeLLM:
    """Records what VLLMRollouts asks of vllm.LLM; generate answers as vLLM's RequestOutput is shaped."""

    def __init__(self, **kwargs):
        self.kwargs = kwargs
        self.calls: list[str] = []
        self.loaded: dict[str, torch.Tensor] = {}
        model = SimpleNamespace(load_weights=self._load_weights)
        self.llm_engine = SimpleNamespace(model_executor=SimpleNamespace(driver_worker=SimpleNamespace(
            model_runner=SimpleNamespace(model=model))))

    def _load_weights(self, pairs):
        self.calls.append("load_weights")
        self.loaded.update((name, tensor.clone()) for name, tensor in pairs)

    def reset_prefix_cache(self):
        self.calls.append("reset_prefix_cache")

    def generate(self, prompts, sampling_params, use_tqdm):
        self.prompts, self.params = prompts, sampling_params
        outputs = [  # per prompt: one that stopped on EOS 2 (kept), one truncated, one with the EOS left out
            [SimpleNamespace(token_ids=(10 + i, 2), finish_reason="stop"),
             SimpleNamespace(token_ids=(10 + i, 11, 12), finish_reason="length"),
             SimpleNamespace(token_ids=(10 + i,), finish_reason="stop")]
            for i in range(len(prompts))
        ]
        return [SimpleNamespace(outputs=o) for o in outputs]


@pytest.fixture
def fake_vllm(monkeypatch):
    module = types.ModuleType("vllm")
    module.LLM = FakeLLM
    module.SamplingParams = lambda **kwargs: kwargs
    monkeypatch.setitem(sys.modules, "vllm", module)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.setenv(key, "set by the launcher")  # and restored after the test
    return module


def test_engine_is_built_in_process_as_asked(fake_vllm):
    engine = VLLMRollouts("path/to/policy", 96, seed=7, gpu_memory_utilization=0.25, dtype="bfloat16")
    assert engine.llm.kwargs == dict(
        model="path/to/policy", tensor_parallel_size=1, gpu_memory_utilization=0.25, max_model_len=96,
        enable_sleep_mode=False, seed=7, dtype="bfloat16", enable_prefix_caching=True,
        distributed_executor_backend="external_launcher")


def test_push_weights_loads_the_merged_weights_then_resets_the_prefix_cache(fake_vllm):
    engine = VLLMRollouts("path/to/policy", 96, seed=0)
    model = apply_adapter(tiny_llama(), adapter("lora"))
    expected = dict(copy.deepcopy(model).merge_and_unload().named_parameters())
    engine.push_weights(model)
    assert engine.llm.calls == ["load_weights", "reset_prefix_cache"]
    assert engine.llm.loaded.keys() == expected.keys()
    assert all(torch.allclose(engine.llm.loaded[k], expected[k], rtol=0, atol=1e-6) for k in expected)


def test_push_weights_refuses_a_quantized_base(fake_vllm):
    engine = VLLMRollouts("path/to/policy", 96, seed=0)
    model = tiny_llama()
    model.register_parameter("packed", torch.nn.Parameter(torch.zeros(4, dtype=torch.uint8), requires_grad=False))
    with pytest.raises(ConfigError, match="quantized"):
        engine.push_weights(model)
    assert engine.llm.calls == []


def test_sample_asks_for_k_per_prompt_stopping_at_eos_only(fake_vllm):
    engine = VLLMRollouts("path/to/policy", 96, seed=0)
    completions = engine.sample([[1, 5], [1, 6, 7]], num_generations=3, temperature=0.7, top_p=0.9, top_k=0,
                                max_new_tokens=3, eos_id=2)
    assert engine.llm.prompts == [{"prompt_token_ids": [1, 5]}, {"prompt_token_ids": [1, 6, 7]}]
    assert engine.llm.params == dict(n=3, temperature=0.7, top_p=0.9, top_k=-1, max_tokens=3, ignore_eos=True,
                                     stop_token_ids=[2], detokenize=False)
    assert completions == [[10, 2], [10, 11, 12], [10, 2], [11, 2], [11, 11, 12], [11, 2]]


# --- a real engine ------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(unavailable_reason() is not None, reason=f"vllm engine: {unavailable_reason()}")
def test_vllm_samples_from_pushed_weights_on_gpu(tmp_path, tok, monkeypatch):
    """A tiny Llama saved with the char tokenizer (head_dim 64, which vLLM's attention kernels take).
    Pushing weights that make EOS certain makes every completion exactly [EOS]: the push reached vLLM's
    model and the EOS is kept. With the random weights back, completions follow the EOS convention."""
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.setenv(key, "")
        monkeypatch.delenv(key)  # whatever the engine sets is undone after the test
    config = LlamaConfig(vocab_size=len(tok), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=128, tie_word_embeddings=False,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.save_pretrained(tmp_path, safe_serialization=True)
    tok.save_pretrained(tmp_path)
    eos = tok.eos_token_id
    prompts = [tok("ab")["input_ids"], tok("hello")["input_ids"]]
    engine = VLLMRollouts(str(tmp_path), max_model_len=64, seed=0, gpu_memory_utilization=0.2)

    certain_eos = copy.deepcopy(model)
    with torch.no_grad():
        certain_eos.model.embed_tokens.weight.fill_(1.0)  # every position's residual stream: all ones
        for layer in certain_eos.model.layers:  # the layers add nothing to it
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        certain_eos.lm_head.weight.zero_()
        certain_eos.lm_head.weight[eos] = 10.0  # EOS logit 10 * 128 after the final (ones) norm, others 0
    engine.push_weights(certain_eos.cuda())
    sampling = dict(num_generations=4, temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=8, eos_id=eos)
    sampled = engine.sample(prompts, **sampling)
    assert sampled == [[eos]] * 8

    engine.push_weights(model.cuda())
    sampled = engine.sample(prompts, **sampling)
    assert len(sampled) == 8 and all(sampled)
    for completion in sampled:
        assert eos not in completion[:-1]
        assert completion[-1] == eos or len(completion) == 8
