"""Prompt sharing (trainer.share_prompt): the packed layout gives the unpacked rows' numbers."""

import pytest
import torch

from helpers import QUICK, compose_config
from tidpo_cli.data.collate import collate
from tidpo_cli.data.splits import load_splits
from tidpo_cli.losses import token_logps
from tidpo_cli.modeling import frozen_copy, load_policy, load_tokenizer
from tidpo_cli.objective import TokenIds, batch_loss
from tidpo_cli.packing import attention_mask_4d, model_inputs, pack_pairs, packed_token_logps, unpack


def pairs_and_model(attn="sdpa", n=6):
    cfg = compose_config([*QUICK, f"model.attn_implementation={attn}"])
    tokenizer = load_tokenizer(cfg.model)
    pairs = load_splits(cfg.data, tokenizer, seed=0).train[:n]
    torch.manual_seed(0)
    policy = load_policy(cfg.model, tokenizer).double()
    return cfg, tokenizer, pairs, policy


def test_packed_rows_hold_each_pair_once_with_the_rejected_positions_restarting_after_the_prompt():
    # rows as collate lays them out: chosen of pair 0, chosen of pair 1, rejected of pair 0, rejected of pair 1
    ids = torch.tensor([[5, 6, 7, 8, 0], [1, 2, 3, 0, 0], [5, 6, 9, 9, 9], [1, 2, 4, 4, 0]])
    mask = (ids != 0).long()
    packed = pack_pairs(ids, mask, torch.tensor([2, 1, 2, 1]), pad_id=0)
    # pair 0: prompt [5, 6], chosen [7, 8], rejected [9, 9, 9]; pair 1: prompt [1], chosen [2, 3], rejected [2, 4, 4]
    assert packed["packed_ids"].tolist() == [[5, 6, 7, 8, 9, 9, 9], [1, 2, 3, 2, 4, 4, 0]]
    assert packed["packed_positions"].tolist() == [[0, 1, 2, 3, 2, 3, 4], [0, 1, 2, 1, 2, 3, 0]]
    assert packed["packed_segments"].tolist() == [[0, 0, 1, 1, 2, 2, 2], [0, 1, 1, 2, 2, 2, -1]]
    # every unpacked token is found at its packed position
    for row in range(4):
        for t in range(int(mask[row].sum())):
            assert packed["packed_ids"][row % 2, packed["packed_index"][row, t]] == ids[row, t]
    allowed = attention_mask_4d(packed["packed_segments"])[0, 0]
    assert allowed[4].tolist() == [True, True, False, False, True, False, False]  # rejected: prompt and itself
    assert allowed[3].tolist() == [True, True, True, True, False, False, False]   # chosen: causal


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_forward_gives_the_unpacked_log_probs(attn):
    cfg, tokenizer, pairs, policy = pairs_and_model(attn)
    plain = collate(pairs, tokenizer.pad_token_id)
    packed = collate(pairs, tokenizer.pad_token_id, share_prompt=True)
    expected = token_logps(policy(input_ids=plain["input_ids"], attention_mask=plain["attention_mask"]).logits,
                           plain["labels"])
    logits = policy(input_ids=packed["packed_ids"], **model_inputs(policy, packed)).logits
    atol = 1e-10 if attn == "sdpa" else 1e-7  # eager attention takes its softmax in float32, rows of other lengths
    torch.testing.assert_close(packed_token_logps(logits, packed), expected, rtol=0, atol=atol)
    # and the hidden states of every real token, moved back to the unpacked layout
    hidden = unpack(logits, packed)
    real = plain["attention_mask"].bool()
    torch.testing.assert_close(hidden[real], policy(input_ids=plain["input_ids"],
                               attention_mask=plain["attention_mask"]).logits[real], rtol=0, atol=atol)


@pytest.mark.parametrize("loss", [
    ["loss=dpo"], ["loss=ipo"], ["loss=tdpo"],
    ["loss=tidpo", "loss.gamma=0"], ["loss=tidpo", "loss.gamma=0", "loss.importance.grad_pass=fused"],
    ["loss=tidpo_code", "loss.gamma=0", "loss.importance.span=response"],
    ["loss=tidpo"], ["loss=tidpo", "loss.importance.grad_pass=fused"],  # with anchors: a third response per row
])
def test_loss_weights_metrics_and_gradients_equal_the_unpacked_ones(loss):
    cfg, tokenizer, pairs, policy = pairs_and_model()
    cfg = compose_config([*QUICK, *loss])
    reference = frozen_copy(policy)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.02 * torch.randn_like(p))
    ids = TokenIds(tokenizer.pad_token_id, tokenizer.eos_token_id, cfg.data.max_length)
    results = []
    for share in (False, True):
        batch = collate(pairs, tokenizer.pad_token_id, share_prompt=share)
        policy.zero_grad(set_to_none=True)
        total, metrics = batch_loss(policy, reference, batch, cfg.loss, ids, seed=0)
        total.backward()
        results.append((total.detach(), [p.grad.clone() for p in policy.parameters()], metrics.means()))
    (l0, g0, m0), (l1, g1, m1) = results
    torch.testing.assert_close(l1, l0, rtol=0, atol=1e-9)
    assert m1.keys() == m0.keys()
    for name in m0:
        assert m1[name] == pytest.approx(m0[name], abs=1e-8), name
    for a, b in zip(g1, g0):  # the attention kernels' backwards round differently: compare to each tensor's scale
        assert (a - b).abs().max() <= 1e-6 * b.abs().max()


def test_a_full_tidpo_step_runs_one_policy_forward_and_one_reference_forward():
    """Anchors ride in the loss's forward (after their pair's prompt) and the fused pass shares it too."""
    cfg, tokenizer, pairs, policy = pairs_and_model()
    cfg = compose_config([*QUICK, "loss=tidpo", "loss.importance.grad_pass=fused"])
    reference = frozen_copy(policy)
    calls = {"policy": [], "reference": []}
    for name, model in (("policy", policy), ("reference", reference)):
        model.model.register_forward_hook(
            lambda m, args, out, name=name: calls[name].append(tuple(out.last_hidden_state.shape[:2])))
    ids = TokenIds(tokenizer.pad_token_id, tokenizer.eos_token_id, cfg.data.max_length)
    batch = collate(pairs, tokenizer.pad_token_id, share_prompt=True)
    policy.train()
    _, metrics = batch_loss(policy, reference, batch, cfg.loss, ids, seed=0)
    assert metrics.means()["anchor/length"] > 0
    *generation, loss_forward = calls["policy"]  # sampling the anchors: a prefill, then one call per token
    packed_width = loss_forward[1]
    assert loss_forward[0] == len(pairs) and calls["reference"] == [loss_forward]  # one packed row per pair
    assert len(generation) >= 2 and all(rows == len(pairs) for rows, _ in generation)
    assert packed_width > batch["input_ids"].shape[1]  # the anchors' tokens sit in the packed rows


@pytest.mark.parametrize("overrides, device, expected", [
    (["loss=dpo"], "cpu", True),                       # auto: on the CPU
    (["loss=dpo"], "cuda", False),                     # auto: not on a GPU (the causal kernels are faster)
    (["loss=dpo", "trainer.share_prompt=true"], "cuda", True),
    (["loss=dpo", "trainer.share_prompt=false"], "cpu", False),
    (["loss=sft"], "cpu", False),
    (["loss=tidpo_code"], "cpu", False),               # span=prompt_response needs each row's prompt gradient
    (["loss=dpo", "model.attn_implementation=flash_attention_2"], "cpu", False),
])
def test_when_batches_share_the_prompt(overrides, device, expected):
    from tidpo_cli.trainer import share_prompt

    cfg = compose_config([*QUICK, *overrides])
    policy = pairs_and_model(n=1)[3]
    if cfg.model.attn_implementation == "flash_attention_2":  # no flash-attn here: only the setting is read
        policy.config._attn_implementation = "flash_attention_2"
    assert share_prompt(cfg, policy, torch.device(device)) is expected
