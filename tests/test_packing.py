"""Prompt sharing (trainer.share_prompt): the packed layout gives the unpacked rows' numbers."""

import itertools

import pytest
import torch
import transformers.integrations.flex_attention
from torch.nn.attention import flex_attention

from helpers import QUICK, compose_config
from tidpo_cli.anchors import ANCHOR_KEY, anchor_batch
from tidpo_cli.data.collate import collate
from tidpo_cli.data.splits import load_splits
from tidpo_cli.losses import token_logps
from tidpo_cli.modeling import frozen_copy, load_policy, load_tokenizer
from tidpo_cli.objective import TokenIds, batch_loss
from tidpo_cli.packing import (PAD, PROMPT, attention_mask_4d, block_mask, model_inputs, pack_pairs,
                               packed_token_logps, unpack)


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


AUTO = "trainer.share_prompt=auto"


@pytest.mark.parametrize("overrides, device, expected", [
    (["loss=dpo", AUTO], "cpu", True),                 # auto, untimed (tidpo eval): on the CPU
    (["loss=dpo", AUTO], "cuda", False),               # auto, untimed: not on a GPU (the causal kernels are faster)
    (["loss=dpo", "trainer.share_prompt=true"], "cuda", True),
    (["loss=dpo", "trainer.share_prompt=true", "model.attn_implementation=flex_attention"], "cuda", True),
    (["loss=dpo", "trainer.share_prompt=false"], "cpu", False),
    (["loss=sft", AUTO], "cpu", False),
    (["loss=tidpo_code", AUTO], "cpu", False),         # span=prompt_response needs each row's prompt gradient
    (["loss=dpo", AUTO, "model.attn_implementation=flash_attention_2"], "cpu", False),
])
def test_when_batches_share_the_prompt(overrides, device, expected):
    from tidpo_cli.layout import share_prompt

    cfg = compose_config([*QUICK, *overrides])
    policy = pairs_and_model(n=1)[3]
    # only the setting is read (no flash-attn here; flex attention does not train on the CPU)
    policy.config._attn_implementation = cfg.model.attn_implementation
    assert share_prompt(cfg, policy, torch.device(device)) is expected


# FlexAttention (model.attn_implementation=flex_attention): the packed rows' mask as a BlockMask, which keeps the
# fused kernel on a GPU. On the CPU torch 2.13 has a fused forward only, for float32 and lower precisions.

def segments_of(*rows: list[tuple[int, int]], width: int) -> torch.Tensor:
    """Packed segment ids [B, width] from (segment, length) runs; PAD after them."""
    out = torch.full((len(rows), width), PAD)
    for i, runs in enumerate(rows):
        out[i, :sum(n for _, n in runs)] = torch.cat([torch.full((n,), segment) for segment, n in runs])
    return out


def block_grid(num: torch.Tensor, indices: torch.Tensor, blocks: int) -> torch.Tensor:
    """A BlockMask's (kv_num_blocks, kv_indices) as a boolean [B, H, query blocks, key blocks]."""
    grid = torch.zeros((*num.shape, blocks), dtype=torch.bool)
    for where in itertools.product(*map(range, num.shape)):
        grid[(*where, indices[where][:num[where]].long())] = True
    return grid


def test_the_block_mask_allows_exactly_what_the_dense_mask_allows():
    # wide enough for several 128-token blocks, some of them skipped whole (a rejected query, chosen keys)
    segments = segments_of([(PROMPT, 150), (1, 100), (2, 120)], [(PROMPT, 20), (1, 200), (2, 150)], width=400)
    dense = attention_mask_4d(segments)
    mask = block_mask(segments)
    rows, width = segments.shape
    rule = flex_attention.create_mask(mask.mask_mod, rows, 1, width, width, device="cpu")
    assert torch.equal(rule, dense)
    # What the kernel computes: full blocks whole, partial blocks under the rule, every other block skipped.
    size, blocks = mask.BLOCK_SIZE[0], mask.kv_indices.shape[-1]
    assert mask.BLOCK_SIZE == (size, size)
    grids = [block_grid(mask.kv_num_blocks, mask.kv_indices, blocks),
             block_grid(mask.full_kv_num_blocks, mask.full_kv_indices, blocks)]
    partial, full = (g.repeat_interleave(size, -2).repeat_interleave(size, -1)[..., :width, :width] for g in grids)
    assert torch.equal(full | (partial & rule), dense)
    assert full.any() and not (partial | full).all()


def test_flex_attention_packed_forward_gives_the_unpacked_log_probs():
    """The fused CPU kernel (compiled on first use for each shape: a C++ compiler is needed), float32."""
    cfg, tokenizer, pairs, policy = pairs_and_model(n=4)
    policy.float()
    plain = collate(pairs, tokenizer.pad_token_id)
    packed = collate(pairs, tokenizer.pad_token_id, share_prompt=True)
    with torch.no_grad():
        expected = token_logps(policy(input_ids=plain["input_ids"], attention_mask=plain["attention_mask"]).logits,
                               plain["labels"])
        policy.config._attn_implementation = "flex_attention"
        unpacked = token_logps(policy(input_ids=plain["input_ids"], attention_mask=plain["attention_mask"]).logits,
                               plain["labels"])
        logits = policy(input_ids=packed["packed_ids"], **model_inputs(policy, packed)).logits
    assert isinstance(model_inputs(policy, packed)["attention_mask"], flex_attention.BlockMask)
    torch.testing.assert_close(unpacked, expected, rtol=0, atol=1e-5)  # float32 rounding in other orders
    torch.testing.assert_close(packed_token_logps(logits, packed), expected, rtol=0, atol=1e-5)


@pytest.fixture
def flex_attention_with_a_cpu_backward(monkeypatch):
    """FlexAttention's CPU kernel has no backward (torch 2.13 refuses inputs that need a gradient) and takes no
    float64: for the gradients, transformers' flex attention runs through `flex_attention`'s own unfused
    implementation (eager, which has one), given the same BlockMask through the same transformers code."""
    monkeypatch.setattr(flex_attention, "_validate_device", lambda *tensors: None)
    monkeypatch.setattr(transformers.integrations.flex_attention, "compile_friendly_flex_attention",
                        lambda q, k, v, training=False, **kwargs: flex_attention.flex_attention(q, k, v, **kwargs))


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")  # the fixture's doing
@pytest.mark.parametrize("loss", [["loss=dpo"], ["loss=tidpo"]])  # tidpo: anchors (a third response per row)
def test_flex_attention_losses_metrics_and_gradients_equal_the_unpacked_ones(flex_attention_with_a_cpu_backward,
                                                                              loss):
    cfg, tokenizer, pairs, policy = pairs_and_model(n=4)
    cfg = compose_config([*QUICK, *loss])
    ids = TokenIds(tokenizer.pad_token_id, tokenizer.eos_token_id, cfg.data.max_length)
    batches = [collate(pairs, tokenizer.pad_token_id, share_prompt=share) for share in (False, True)]
    if cfg.loss.gamma:  # the same anchors for both layouts, sampled with SDPA (not what is compared here)
        anchors = anchor_batch(batches[0], policy, cfg.loss.anchor, pad_id=ids.pad, eos_id=ids.eos,
                               max_length=ids.max_length, seed=0)
        for batch in batches:
            batch.update({ANCHOR_KEY + k: v for k, v in anchors.items()})
    reference = frozen_copy(policy)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.02 * torch.randn_like(p))
    for model in (policy, reference):
        model.config._attn_implementation = "flex_attention"
    results = []
    for batch in batches:
        policy.zero_grad(set_to_none=True)
        total, metrics = batch_loss(policy, reference, batch, cfg.loss, ids, seed=0)
        total.backward()
        results.append((total.detach(), [p.grad.clone() for p in policy.parameters()], metrics.means()))
    assert isinstance(model_inputs(policy, batches[1])["attention_mask"], flex_attention.BlockMask)
    (l0, g0, m0), (l1, g1, m1) = results
    assert ("anchor/length" in m0) == bool(cfg.loss.gamma)
    torch.testing.assert_close(l1, l0, rtol=0, atol=1e-9)
    assert m1.keys() == m0.keys()
    for name in m0:
        assert m1[name] == pytest.approx(m0[name], abs=1e-8), name
    for a, b in zip(g1, g0):  # as with SDPA (above): the layouts' backwards round differently, float64
        assert (a - b).abs().max() <= 1e-6 * b.abs().max()
