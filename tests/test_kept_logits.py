"""Logits at the positions the objective reads only (objective.forward, layouts.Rows.kept): HF's boolean
`logits_to_keep` runs the output layer on each label's predictor and each response's last position, so a
forward's logits are [K, V]. Its log-probs, logit means and the fused saliency's hidden states are the whole
forward's; K is counted here from the pairs' lengths; a model whose forward does not slice by a mask gets whole
logits.
"""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaForCausalLM

from tidpo_cli.data.collate import collate
from tidpo_cli.data.examples import TokenizedPair
from tidpo_cli.layouts import layout_of
from tidpo_cli.modeling import build_tiny_llama
from tidpo_cli.objective import _slices_by_mask, forward, forward_from_embeddings, keeps_masked_logits
from tidpo_cli.tokenizer import build_byte_tokenizer

TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
# (prompt, chosen, rejected) ids: prompts and responses of different lengths, so rows pad differently
PAIRS = [([5, 6, 7, 8, 9], [10, 11, 12], [13, 14]), ([5, 6], [20, 21, 22, 23, 24], [30]),
         ([40, 41, 42], [43], [44, 45, 46, 47])]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_tiny_llama(TINY, build_byte_tokenizer())


def batch_of(share_prompt: bool):
    pad = build_byte_tokenizer().pad_token_id
    return collate([TokenizedPair(p, c, r, f"row {i}", False) for i, (p, c, r) in enumerate(PAIRS)], pad,
                   share_prompt=share_prompt)


def kept_count(share_prompt: bool) -> int:
    """The positions a loss reads, from the lengths alone: a response of n tokens is predicted from n positions
    and ends at one more; a shared prompt's last position predicts both responses' first tokens."""
    per_pair = [len(c) + 1 + len(r) + 1 for _, c, r in PAIRS]
    return sum(per_pair) - (len(PAIRS) if share_prompt else 0)


@pytest.mark.parametrize("share_prompt", [False, True], ids=["rows", "packed"])
def test_kept_logits_give_the_whole_forwards_numbers(model, share_prompt):
    batch = batch_of(share_prompt)
    assert keeps_masked_logits(model)
    kept, whole = forward(model, batch), forward(model, batch, whole=True)
    rows = batch["packed_ids" if share_prompt else "input_ids"].shape
    assert whole[0].shape == (*rows, model.config.vocab_size)
    assert kept[0].shape == (kept_count(share_prompt), model.config.vocab_size)
    assert kept[0].shape[0] < rows[0] * rows[1]
    layout = layout_of(batch)
    torch.testing.assert_close(kept[1], whole[1], rtol=0, atol=1e-6)
    assert torch.equal(kept[2], whole[2])
    assert (kept[1] != 0).sum() == sum(len(c) + len(r) for _, c, r in PAIRS)  # every label read, nothing else
    torch.testing.assert_close(layout.label_logit_means(kept[0]), layout.label_logit_means(whole[0]),
                               rtol=0, atol=1e-6)
    # The fused saliency's hidden states: the same at every kept position, zero elsewhere.
    hidden_kept, hidden_whole = forward_from_embeddings(model, batch)[4], forward_from_embeddings(model, batch, True)[4]
    keep = layout.kept()
    assert hidden_kept.shape == hidden_whole.shape
    torch.testing.assert_close(hidden_kept[keep], hidden_whole[keep], rtol=0, atol=1e-6)
    assert not hidden_kept[~keep].any()


def test_kept_log_probs_carry_the_whole_forwards_gradient(model):
    batch = batch_of(False)
    grads = []
    for whole in (False, True):
        model.zero_grad(set_to_none=True)
        forward(model, batch, whole=whole)[1].sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    model.zero_grad(set_to_none=True)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-7)


class OwnForward(LlamaForCausalLM):
    """A model whose forward is not transformers' own (remote code, a wrapper): it may not read the mask."""

    def forward(self, *args, **kwargs):
        return super().forward(*args, **kwargs)


def slice_logits_to_keep(hidden, keep):  # the helper of releases before the mask: positions only
    return hidden[:, keep, :]


class OldRelease(LlamaForCausalLM):
    def forward(self, input_ids=None, logits_to_keep=0, **kwargs):
        slice_logits_to_keep  # noqa: B018  (named, as an old release's forward names its helper)
        return super().forward(input_ids=input_ids, logits_to_keep=logits_to_keep, **kwargs)


def test_a_forward_that_does_not_slice_by_a_mask_gets_whole_logits(model):
    assert not _slices_by_mask(OwnForward) and not _slices_by_mask(OldRelease)
    other = OwnForward(model.config)
    other.load_state_dict(model.state_dict())
    batch = batch_of(True)
    logits, logps, _ = forward(other, batch)
    assert logits.dim() == 3
    torch.testing.assert_close(logps, forward(model, batch)[1], rtol=0, atol=1e-6)


@pytest.mark.parametrize("share_prompt", [False, True], ids=["rows", "packed"])
def test_tdpo_kl_from_kept_logits_is_the_whole_rows_kl(model, share_prompt):
    from tidpo_cli.losses import position_kl, token_kl
    from tidpo_cli.objective import unpacked

    torch.manual_seed(1)
    reference = build_tiny_llama(TINY, build_byte_tokenizer())
    batch = batch_of(share_prompt)
    layout = layout_of(batch)
    pol_kept, ref_kept = forward(model, batch)[0], forward(reference, batch)[0]
    pol_whole, ref_whole = forward(model, batch, whole=True)[0], forward(reference, batch, whole=True)[0]
    want = token_kl(unpacked(ref_whole, batch), unpacked(pol_whole, batch), batch["labels"])  # [N, T] unpacked rows
    assert (want > 0).sum() == sum(len(c) + len(r) for _, c, r in PAIRS)
    torch.testing.assert_close(layout.at_labels(position_kl(ref_kept, pol_kept)), want, rtol=1e-5, atol=1e-7)
    # One model kept, the other whole (a model.reference whose forward takes no mask): both read at the kept ones.
    torch.testing.assert_close(layout.at_labels(position_kl(layout.as_kept(ref_whole), pol_kept)), want,
                               rtol=1e-5, atol=1e-7)


def test_tdpo_loss_with_a_reference_whose_forward_keeps_no_positions(model):
    from helpers import compose_config
    from tidpo_cli.objective import TokenIds, batch_loss

    cfg = compose_config(["loss=tdpo"])
    assert cfg.loss.alpha
    torch.manual_seed(1)
    reference = build_tiny_llama(TINY, build_byte_tokenizer())
    other = OwnForward(reference.config)  # the same weights; its logits come whole
    other.load_state_dict(reference.state_dict())
    tokenizer = build_byte_tokenizer()
    ids = TokenIds(tokenizer.pad_token_id, tokenizer.eos_token_id, 64)
    batch = batch_of(False)
    (kept, kept_metrics), (mixed, mixed_metrics) = (batch_loss(model, r, batch, cfg.loss, ids, seed=0)
                                                    for r in (reference, other))
    torch.testing.assert_close(mixed, kept, rtol=1e-6, atol=1e-7)
    means = kept_metrics.means(), mixed_metrics.means()
    assert means[0]["kl/chosen"] > 0
    for name in ("kl/chosen", "kl/rejected", "loss"):
        assert means[1][name] == pytest.approx(means[0][name], rel=1e-6, abs=1e-9), name
