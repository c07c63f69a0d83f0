"""On-policy distillation's loss: the generalized Jensen-Shannon divergence between the student's and
the teacher's next-token distributions, per token over the whole vocabulary.

Agarwal et al. 2024, "On-Policy Distillation of Language Models: Learning from Self-Generated
Mistakes" (GKD), eq. 1 and section 3.1. Convention of TRL's GKDTrainer, which this module follows:

    M = beta * P_teacher + (1 - beta) * P_student
    JSD_beta = beta * KL(P_teacher || M) + (1 - beta) * KL(P_student || M)

at the two ends the interpolation is replaced by the limit it tends to once divided by the mixture
weights' vanishing factor, as TRL does: beta = 0 is the forward KL(teacher || student) (mode
covering, SFT-like), beta = 1 the reverse KL(student || teacher) (mode seeking, alignctl's default).
Both distributions are the logits divided by the temperature.
"""

from __future__ import annotations

import math

import torch
from torch.utils.checkpoint import checkpoint


def token_jsd(student_logits: torch.Tensor, teacher_logits: torch.Tensor, beta: float, temperature: float = 1.0) -> torch.Tensor:
    """Generalized JSD (GKD, eq. 1, TRL's beta convention) at each position: (..., V) logits -> (...).

    beta = 0: KL(teacher || student); beta = 1: KL(student || teacher); between: JSD_beta.
    Differentiable in the student's logits; the teacher's are detached."""
    student = torch.log_softmax(student_logits.float() / temperature, dim=-1)
    teacher = torch.log_softmax(teacher_logits.detach().float() / temperature, dim=-1)
    if beta == 0:
        return (teacher.exp() * (teacher - student)).sum(-1)
    if beta == 1:
        return (student.exp() * (student - teacher)).sum(-1)
    mixture = torch.logsumexp(torch.stack([student + math.log(1 - beta), teacher + math.log(beta)]), dim=0)
    # Where both agree the mixture is that same value; taken as is, the divergence is exactly 0 there, not rounding noise.
    mixture = torch.where(student == teacher, student, mixture)
    kl_teacher = (teacher.exp() * (teacher - mixture)).sum(-1)
    kl_student = (student.exp() * (student - mixture)).sum(-1)
    return beta * kl_teacher + (1 - beta) * kl_student


def distill_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor, beta: float, temperature: float, num_items: int
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """GKD's objective on a batch: the sum over masked positions of `token_jsd`, divided by `num_items`
    (the optimiser step's completion tokens, so micro-batches add up to the step's token mean).

    Args: (B, W, V) student and teacher logits at the positions that predict the completion's tokens,
    (B, W) mask of those tokens. Metrics: ``distill/divergence`` (the same sum, detached) and
    ``distill/teacher_agreement`` (share of positions where both argmaxes agree)."""
    per_token = token_jsd(student_logits, teacher_logits, beta, temperature) * mask
    agree = (student_logits.argmax(-1) == teacher_logits.argmax(-1)).float() * mask
    loss = per_token.sum() / num_items
    return loss, {"distill/divergence": loss.detach(), "distill/teacher_agreement": agree.sum() / num_items}


def _chunk_sums(student_hidden, student_weight, teacher_hidden, teacher_weight, beta: float, temperature: float) -> torch.Tensor:
    return token_jsd(student_hidden @ student_weight.T, teacher_hidden @ teacher_weight.T, beta, temperature).sum()


def chunked_jsd_sum(
    student_hidden: torch.Tensor, student_weight: torch.Tensor, teacher_hidden: torch.Tensor, teacher_weight: torch.Tensor,
    beta: float, temperature: float, chunk: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`token_jsd` summed over N positions from the (N, H) hidden states the two output layers read
    (weights (V, H)), `chunk` positions at a time: each chunk's (chunk, V) logits are recomputed in
    backward (activation checkpointing), so a large vocabulary never holds N x V logits (nor their
    softmaxes) at once. Returns the sum (differentiable in the student's side) and how many positions'
    argmaxes agree (no gradient)."""
    total = student_hidden.new_zeros((), dtype=torch.float32)
    agree = torch.zeros((), dtype=torch.float32, device=student_hidden.device)
    teacher_hidden, teacher_weight = teacher_hidden.detach(), teacher_weight.detach()
    for start in range(0, student_hidden.size(0), chunk):
        part, teacher_part = student_hidden[start : start + chunk], teacher_hidden[start : start + chunk]
        total = total + checkpoint(_chunk_sums, part, student_weight, teacher_part, teacher_weight, beta, temperature, use_reentrant=False)
        with torch.no_grad():
            agree += ((part @ student_weight.T).argmax(-1) == (teacher_part @ teacher_weight.T).argmax(-1)).sum()
    return total, agree
