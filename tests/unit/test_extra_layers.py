"""models.add_decoder_layers: new layers start as the identity, and the deeper model saves and loads plainly."""

from __future__ import annotations

import torch
from transformers import AutoModelForSequenceClassification, LlamaConfig, LlamaForSequenceClassification

from alignctl.models.loading import add_decoder_layers


def _tiny() -> LlamaForSequenceClassification:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=32, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                         intermediate_size=32, max_position_embeddings=32, num_labels=1, pad_token_id=0)
    return LlamaForSequenceClassification(config).eval()


def test_new_layers_leave_the_outputs_unchanged_until_trained():
    model = _tiny()
    ids = torch.tensor([[3, 4, 5, 6, 7]])
    before = model(input_ids=ids).logits
    add_decoder_layers(model, 2)
    assert len(model.model.layers) == 4 and model.config.num_hidden_layers == 4
    torch.testing.assert_close(model(input_ids=ids).logits, before)
    # Not a frozen no-op: the new layers have trainable weights that change the output once moved.
    with torch.no_grad():
        model.model.layers[-1].mlp.down_proj.weight.normal_()
    assert not torch.allclose(model(input_ids=ids).logits, before)


def test_deeper_model_saves_and_loads_as_its_own_class(tmp_path):
    model = _tiny()
    add_decoder_layers(model, 1)
    model.save_pretrained(tmp_path)
    loaded = AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
    ids = torch.tensor([[3, 4, 5]])
    assert len(loaded.model.layers) == 3
    torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits)
