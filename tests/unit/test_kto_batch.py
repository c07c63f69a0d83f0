"""KTO's batch layout: the own and the mismatched rows are padded apart, and score exactly what one
batch of both would (the layout this replaced) and what each row scores alone."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM

from alignctl.nn.logprobs import left_padded_batch, response_logps
from alignctl.stages.kto import MISMATCHED, feedback_batch, halves

TOL = 1e-5


def rows() -> dict[str, list]:
    # Own rows of similar length (a length-grouped batch), mismatched completions of other lengths.
    return {
        "prompt_ids": [[5, 6, 7, 8], [9, 10, 11], [12, 13, 14, 15, 16]],
        "completion_ids": [[20, 21, 2], [22, 23, 24, 2], [25, 2]],
        "mismatched_ids": [[30, 31, 32, 33, 34, 35, 36, 37, 2], [38, 2], [39, 40, 41, 42, 43, 44, 2]],
        "label": [True, False, True],
    }


def test_each_half_is_padded_to_its_own_longest_row():
    batch = feedback_batch(rows(), pad_id=0, device=torch.device("cpu"))
    own, mismatched = halves(batch)
    assert own["input_ids"].shape == (3, 7) and mismatched["input_ids"].shape == (3, 13)
    assert batch["num_tokens"] == 7 + 7 + 7 and batch["num_items"] == 3
    assert batch["desirable"].tolist() == [True, False, True]
    assert all(MISMATCHED + k in batch for k in own)


def test_log_probs_equal_one_batch_of_both_halves(tiny_dir):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_dir).eval()
    r = rows()
    batch = feedback_batch(r, pad_id=0, device=torch.device("cpu"))
    split = torch.cat([response_logps(model, half)[0] for half in halves(batch)])
    joint_batch = left_padded_batch(r["prompt_ids"] * 2, r["completion_ids"] + r["mismatched_ids"], 0)
    joint = response_logps(model, joint_batch)[0]
    alone = torch.cat([response_logps(model, left_padded_batch([p], [c], 0))[0]
                       for key in ("completion_ids", "mismatched_ids") for p, c in zip(r["prompt_ids"], r[key])])
    assert (split - joint).abs().max() < TOL, (split, joint)
    assert (split - alone).abs().max() < TOL, (split, alone)
