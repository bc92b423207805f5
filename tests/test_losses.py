"""The loss maths against values computed by hand and against independent formulas."""

import math

import pytest
import torch

from tidpo_cli.losses import (
    IGNORE_INDEX, dpo_loss, ipo_loss, left_align, response_mask, sft_loss, tdpo_loss, token_kl, token_logps,
    triplet_loss, triplet_terms,
)


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


def test_tdpo_by_hand_and_stop_gradient_on_the_chosen_kl():
    # M_w = 2, M_l = 0.5, K_w = 0.3, K_l = 0.9, alpha = 0.5: z = 1.5 - 0.5 * (0.9 - 0.3) = 1.2
    chosen_margin = torch.tensor([2.0], requires_grad=True)
    chosen_kl = torch.tensor([0.3], requires_grad=True)
    rejected_kl = torch.tensor([0.9], requires_grad=True)
    losses, chosen_rewards, rejected_rewards = tdpo_loss(chosen_margin, torch.tensor([0.5]), chosen_kl, rejected_kl,
                                                         beta=0.1, alpha=0.5)
    assert losses.item() == pytest.approx(math.log(1 + math.exp(-0.12)), abs=1e-7)
    assert chosen_rewards.item() == pytest.approx(0.2) and rejected_rewards.item() == pytest.approx(0.05)
    losses.sum().backward()
    assert chosen_kl.grad is None  # sg[K(y_w)]
    # d loss / d K_l = -sigmoid(-beta z) * beta * (-alpha)
    assert rejected_kl.grad.item() == pytest.approx(0.1 * 0.5 / (1 + math.exp(0.12)), abs=1e-7)


def test_tdpo_with_alpha_zero_is_the_paper_form():
    torch.manual_seed(0)
    mw, ml, kw, kl = torch.randn(4), torch.randn(4), torch.rand(4), torch.rand(4)
    tdpo, _, _ = tdpo_loss(mw, ml, kw, kl, beta=0.1, alpha=0.0)
    paper = -torch.nn.functional.logsigmoid(0.1 * (mw - ml))
    assert torch.equal(tdpo, paper)
    dpo, _, _ = dpo_loss(mw, ml, torch.zeros(4), torch.zeros(4), 0.1)
    assert torch.equal(tdpo, dpo)


def test_ipo_by_hand():
    # z = 0.4 - (-0.2) = 0.6, beta 0.5 -> (0.6 - 1)^2 = 0.16
    assert ipo_loss(torch.tensor([0.4]), torch.tensor([-0.2]), 0.5).item() == pytest.approx(0.16)


def test_token_kl_matches_the_definition_and_is_aligned_with_labels():
    torch.manual_seed(1)
    ref, pol = torch.randn(1, 4, 5, dtype=torch.float64), torch.randn(1, 4, 5, dtype=torch.float64)
    labels = torch.tensor([[IGNORE_INDEX, IGNORE_INDEX, 2, 3]])
    out = token_kl(ref, pol, labels)
    assert out[0, :2].tolist() == [0.0, 0.0]
    for t in (2, 3):
        p = torch.softmax(ref[0, t - 1], -1)
        q = torch.softmax(pol[0, t - 1], -1)
        assert out[0, t].item() == pytest.approx(sum(p[v] * math.log(p[v] / q[v]) for v in range(5)).item(), abs=1e-12)


def test_left_align_packs_masked_entries_in_order():
    values = torch.tensor([[9.0, 1.0, 2.0, 0.0], [9.0, 9.0, 3.0, 0.0]])
    mask = torch.tensor([[0, 1, 1, 0], [0, 0, 1, 0]], dtype=torch.bool)
    aligned, aligned_mask = left_align(values, mask)
    assert aligned_mask.tolist() == [[True, True], [True, False]]
    assert aligned[0].tolist() == [1.0, 2.0] and aligned[1, 0].item() == 3.0


def test_triplet_loss_by_hand_for_ragged_lengths():
    # Pair 0: anchor 3 tokens, chosen 2, rejected 4 -> overlaps of 2 and 3 positions.
    #   d_pos = (1-0)^2 + (2-1)^2 = 2 ; d_neg = (1-1)^2 + (2-0)^2 + (0.5-0.5)^2 = 4 ; hinge(2 - 4 + 0.5) = 0
    # Pair 1: anchor 1 token, chosen 3, rejected 2 -> overlap 1 each.
    #   d_pos = (2-(-1))^2 = 9 ; d_neg = (2-1.5)^2 = 0.25 ; hinge(9 - 0.25 + 0.5) = 9.25
    anchor = torch.tensor([[1.0, 2.0, 0.5, 0.0], [2.0, 7.0, 7.0, 7.0]], requires_grad=True)
    anchor_mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]], dtype=torch.bool)
    chosen = torch.tensor([[0.0, 1.0, 5.0], [-1.0, 4.0, 4.0]])
    chosen_mask = torch.tensor([[1, 1, 0], [1, 1, 1]], dtype=torch.bool)
    rejected = torch.tensor([[1.0, 0.0, 0.5, 3.0], [1.5, 8.0, 0.0, 0.0]])
    rejected_mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]], dtype=torch.bool)
    loss = triplet_loss(anchor, anchor_mask, chosen, chosen_mask, rejected, rejected_mask, margin=0.5)
    assert loss.item() == pytest.approx((0 + 9.25) / 2)
    terms = triplet_terms(anchor, anchor_mask, chosen, chosen_mask, rejected, rejected_mask, 0.5)
    assert terms["dist_pos"].tolist() == pytest.approx([2.0, 9.0])
    assert terms["dist_neg"].tolist() == pytest.approx([4.0, 0.25])
    loss.backward()
    # Only pair 1 is active: d/d anchor[1,0] = (2 (2 - (-1)) - 2 (2 - 1.5)) / 2 = 2.5 ; masked positions get 0
    assert anchor.grad[1].tolist() == pytest.approx([2.5, 0.0, 0.0, 0.0])
    assert anchor.grad[0].tolist() == pytest.approx([0.0, 0.0, 0.0, 0.0])
