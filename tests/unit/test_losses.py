import math

import pytest
import torch

from alignctl.nn.losses import IGNORE, sft_loss

LN2 = math.log(2)


def _logits_from_probs(*rows: list[float]) -> torch.Tensor:
    """(1, T, V) logits whose softmax is exactly the given (unnormalised) probability rows."""
    return torch.tensor([[[math.log(p) for p in row] for row in rows]], requires_grad=True)


@pytest.fixture
def worked():
    """Vocab 3, T = 4. Position t scores label t + 1:

    t=0: probs (1/2, 1/4, 1/4) score label[1] = 0 -> -log p = ln 2, argmax 0 is right
    t=1: probs (1/4, 1/4, 1/2) score label[2] = 1 -> -log p = ln 4, argmax 2 is wrong
    t=2: scores label[3] = IGNORE; t=3 scores nothing; label[0] is never a target.
    Loss over N = 2 items: (ln 2 + ln 4) / 2 = 1.5 ln 2; accuracy 1/2. (Unshifted scoring, label t
    by logits t, would give (ln 4 + ln 4 + ln 1.25) / 3 instead.)
    """
    logits = _logits_from_probs([2, 1, 1], [1, 1, 2], [1, 8, 1], [8, 1, 1])
    labels = torch.tensor([[1, 0, 1, IGNORE]])
    return logits, labels


def test_hand_worked_loss_scores_logits_at_t_against_label_t_plus_1(worked):
    logits, labels = worked
    loss, metrics = sft_loss(logits, labels, num_items=2)
    assert loss.item() == pytest.approx(1.5 * LN2, rel=1e-6)
    assert metrics["mean_token_accuracy"].item() == pytest.approx(0.5)
    assert metrics["num_loss_tokens"].item() == 2


def test_ignored_positions_carry_no_loss_and_no_gradient(worked):
    logits, labels = worked
    loss, _ = sft_loss(logits, labels, num_items=2)
    loss.backward()
    grad_norm_per_position = logits.grad[0].abs().sum(-1)
    assert (grad_norm_per_position[:2] > 0).all()
    assert grad_norm_per_position[2:].tolist() == [0.0, 0.0]  # target IGNORE, and the last position


def test_first_label_is_never_a_target(worked):
    logits, labels = worked
    other_first = labels.clone()
    other_first[0, 0] = 2
    assert sft_loss(logits, other_first, 2)[0].item() == sft_loss(logits, labels, 2)[0].item()


def test_all_ignored_micro_batch_gives_zero_not_nan():
    loss, metrics = sft_loss(torch.randn(1, 3, 5), torch.full((1, 3), IGNORE), num_items=4)
    assert loss.item() == 0.0
    assert metrics["mean_token_accuracy"].item() == 0.0
    assert metrics["num_loss_tokens"].item() == 0


def _right_pad(logits: torch.Tensor, labels: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    extra = length - logits.size(1)
    return (
        torch.cat([logits, torch.randn(logits.size(0), extra, logits.size(2))], dim=1),
        torch.cat([labels, torch.full((labels.size(0), extra), IGNORE)], dim=1),
    )


def test_micro_batch_shares_sum_to_the_full_batch_mean_despite_different_padding():
    gen = torch.Generator().manual_seed(0)
    vocab = 7
    # Micro-batch A: one row of 6 positions, 4 targets. Micro-batch B: two rows of 3, padded (1 + 2 targets).
    logits_a, labels_a = torch.randn(1, 6, vocab, generator=gen), torch.tensor([[IGNORE, IGNORE, 3, 1, 4, 1]])
    logits_b = torch.randn(2, 3, vocab, generator=gen)
    labels_b = torch.tensor([[IGNORE, 5, IGNORE], [IGNORE, 2, 6]])
    num_items = 4 + 3

    share_a = sft_loss(logits_a, labels_a, num_items)
    share_b = sft_loss(logits_b, labels_b, num_items)
    padded_logits_b, padded_labels_b = _right_pad(logits_b, labels_b, 6)
    full = sft_loss(torch.cat([logits_a, padded_logits_b]), torch.cat([labels_a, padded_labels_b]), num_items)

    torch.testing.assert_close(share_a[0] + share_b[0], full[0])
    for key in ("mean_token_accuracy", "num_loss_tokens"):
        torch.testing.assert_close(share_a[1][key] + share_b[1][key], full[1][key])
    assert full[1]["num_loss_tokens"].item() == num_items
    # The full-batch loss is the plain mean over the 7 targets.
    targets = [(logits_a[0, t - 1], labels_a[0, t]) for t in range(2, 6)]
    targets += [(logits_b[0, 0], 5), (logits_b[1, 0], 2), (logits_b[1, 1], 6)]
    mean = sum(-torch.log_softmax(lg, -1)[int(y)] for lg, y in targets) / num_items
    torch.testing.assert_close(full[0], mean)


def test_accuracy_share_counts_argmax_hits_over_num_items():
    # Three targets, of which the argmax gets two; normalised by num_items = 6 (a bigger step).
    logits = torch.zeros(1, 4, 3)
    logits[0, 0, 1] = logits[0, 1, 2] = logits[0, 2, 0] = 5.0
    labels = torch.tensor([[IGNORE, 1, 2, 2]])
    _, metrics = sft_loss(logits, labels, num_items=6)
    assert metrics["mean_token_accuracy"].item() == pytest.approx(2 / 6)
    assert metrics["num_loss_tokens"].item() == 3
