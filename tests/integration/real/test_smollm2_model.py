"""model=smollm2 is the real SmolLM2-135M-Instruct: ChatML, pad = EOS = <|im_end|>, and it answers."""

from __future__ import annotations

import torch
from safetensors import safe_open


def test_the_built_directory_is_a_plain_float32_model(smollm2_dir):
    import json

    config = json.loads((smollm2_dir / "config.json").read_text())
    assert "quantization_config" not in config, "a dequantised model loads without the gguf package"
    assert config["vocab_size"] == 49152 and config["tie_word_embeddings"] is True
    with safe_open(str(smollm2_dir / "model.safetensors"), "pt") as weights:
        assert weights.get_tensor("model.norm.weight").dtype == torch.float32


def test_its_tokenizer_is_chatml_with_pad_equal_to_eos(smollm2):
    _, tok = smollm2
    assert tok.eos_token == tok.pad_token == "<|im_end|>"
    text = tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True)
    assert text.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")


def test_it_answers_and_stops_at_im_end(smollm2):
    model, tok = smollm2
    ids = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                  add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**ids, max_new_tokens=24, do_sample=False)
    answer = tok.decode(out[0, ids["input_ids"].shape[1]:])
    assert "Paris" in answer and answer.endswith("<|im_end|>")


def test_rollouts_of_both_engines_stop_at_im_end(smollm2):
    from alignctl.data.encode import encode_prompt
    from alignctl.rl.rollout import Sampling, sample

    model, tok = smollm2
    prompt = encode_prompt(tok, [{"role": "user", "content": "What is the capital of France?"}])
    for engine in ("native", "hf"):
        torch.manual_seed(0)
        sampling = Sampling(temperature=0.01, top_p=1.0, top_k=0, max_new_tokens=24, engine=engine)
        done = sample(model, [prompt], 2, sampling, tok.pad_token_id, tok.eos_token_id)
        assert done.truncated == [False, False], engine
        for ids in done.completion_ids:
            assert ids[-1] == tok.convert_tokens_to_ids("<|im_end|>") and ids.count(tok.eos_token_id) == 1
            assert "Paris" in tok.decode(ids), (engine, tok.decode(ids))
