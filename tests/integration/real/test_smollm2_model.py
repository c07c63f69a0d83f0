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
