"""The loss maths against values computed by hand and against independent formulas."""

import math

import pytest
import torch

from tidpo_cli.losses import IGNORE_INDEX, dpo_loss, response_mask, sft_loss, token_logps


def test_dpo_loss_matches_hand_computed_values():
    # Pair 0: chosen log-ratio (-1) - (-2) = 1, rejected (-3) - (-2.5) = -0.5 -> beta * 1.5 = 0.15
    # Pair 1: chosen -4 - (-3) = -1, rejected -2 - (-2) = 0 -> beta * -1 = -0.1
    policy_chosen = torch.tensor([-1.0, -4.0])
    policy_rejected = torch.tensor([-3.0, -2.0])
    ref_chosen = torch.tensor([-2.0, -3.0])
    ref_rejected = torch.tensor([-2.5, -2.0])
    losses, chosen_rewards, rejected_rewards = dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, 0.1)
    expected = [math.log(1 + math.exp(-0.15)), math.log(1 + math.exp(0.1))]  # -log sigmoid(z) = log(1 + e^-z)
    assert losses.tolist() == pytest.approx(expected, abs=1e-7)
    assert chosen_rewards.tolist() == pytest.approx([0.1, -0.1])
    assert rejected_rewards.tolist() == pytest.approx([-0.05, 0.0])
    assert not chosen_rewards.requires_grad


def test_dpo_loss_label_smoothing_mixes_both_directions():
    z = 0.1 * 2.0
    losses, _, _ = dpo_loss(torch.tensor([0.0]), torch.tensor([-2.0]), torch.tensor([0.0]), torch.tensor([0.0]),
                            0.1, label_smoothing=0.2)
    expected = 0.8 * math.log(1 + math.exp(-z)) + 0.2 * math.log(1 + math.exp(z))
    assert losses.item() == pytest.approx(expected, abs=1e-7)


def test_dpo_loss_gradient_is_beta_times_sigmoid_of_minus_z():
    # d/d(policy_chosen) of -log sigmoid(beta z) = -beta * sigmoid(-beta z), z = 1.5
    policy_chosen = torch.tensor([-1.0], requires_grad=True)
    losses, _, _ = dpo_loss(policy_chosen, torch.tensor([-3.0]), torch.tensor([-2.0]), torch.tensor([-2.5]), 0.1)
    losses.sum().backward()
    assert policy_chosen.grad.item() == pytest.approx(-0.1 / (1 + math.exp(0.15)), abs=1e-7)


def test_token_logps_match_an_explicit_softmax_loop():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 7, dtype=torch.float64)
    labels = torch.tensor([[IGNORE_INDEX, IGNORE_INDEX, 3, 1, 6], [IGNORE_INDEX, 2, 2, IGNORE_INDEX, IGNORE_INDEX]])
    out = token_logps(logits, labels)
    assert out.shape == (2, 5) and out.dtype == torch.float64
    for n in range(2):
        for t in range(5):
            if labels[n, t] == IGNORE_INDEX:
                assert out[n, t] == 0
                continue
            row = logits[n, t - 1]  # position t-1 predicts token t
            expected = row[labels[n, t]].item() - math.log(sum(math.exp(v) for v in row.tolist()))
            assert out[n, t].item() == pytest.approx(expected, abs=1e-12)


def test_token_logps_are_fp32_for_bf16_logits():
    logits = torch.randn(1, 4, 11).to(torch.bfloat16)
    labels = torch.tensor([[IGNORE_INDEX, 1, 2, 3]])
    out = token_logps(logits, labels)
    reference = token_logps(logits.float(), labels)
    assert out.dtype == torch.float32
    assert torch.equal(out, reference)


def test_response_mask_excludes_prompt_padding_and_first_token():
    labels = torch.tensor([[5, IGNORE_INDEX, 7, 8, IGNORE_INDEX]])
    assert response_mask(labels).tolist() == [[False, False, True, True, False]]


def test_sft_loss_is_the_summed_nll_of_masked_tokens():
    logps = torch.tensor([[0.0, -1.0, -2.0], [0.0, -0.5, -9.0]])
    mask = torch.tensor([[False, True, True], [False, True, False]])
    assert sft_loss(logps, mask).item() == pytest.approx(3.5)
