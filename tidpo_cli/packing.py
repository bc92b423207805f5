"""Prompt sharing: one row per pair, `prompt + chosen + rejected`, so the prompt is run through the model once.

A collated batch holds 2B rows (chosen rows, then rejected rows), each `prompt + response`, so every prompt is
computed twice. The packed layout puts a pair in one row, `[prompt, chosen, rejected, padding]`, with an attention
mask under which the rejected tokens see the prompt and themselves but not the chosen ones, and position ids
that restart the rejected response right after the prompt. Every token then sees exactly what it sees in its own
row, so logits, log-probs and input gradients are those of the unpacked rows (up to float rounding).

The packed tensors travel in the batch beside the unpacked ones (`packed_*` keys); everything downstream keeps
the unpacked [2B, T] layout: `unpack` moves per-position values across, `packed_token_logps` picks label
log-probs without building unpacked logits.

The mask goes to the attention kernel in the form it takes: boolean for SDPA, additive for eager attention, and
for FlexAttention a `BlockMask` (`block_mask`): SDPA given any explicit mask leaves its fused causal kernels,
while FlexAttention's fused kernel takes the mask as a rule and skips the blocks it rules out.
"""

from __future__ import annotations

import torch
from torch.nn.attention.flex_attention import create_block_mask

from .losses import indexed_token_logps

PROMPT, PAD = 0, -1  # segment ids; responses are 1, 2, ...
SHAREABLE_ATTENTION = ("sdpa", "eager", "flex_attention")  # flash_attention_2 takes no custom mask


def pack_pairs(input_ids: torch.Tensor, attention_mask: torch.Tensor, prompt_lengths: torch.Tensor,
               pad_id: int, groups: int = 2) -> dict[str, torch.Tensor]:
    """The packed layout of a collated batch: `groups` blocks of B right-padded rows (chosen rows, rejected rows,
    and with anchors a third block), row i of every block sharing prompt i.

    Returns
      packed_ids       [B, S] long  prompt, the responses of each block in order, then `pad_id`
      packed_positions [B, S] long  position ids: every response continues from the prompt's end
      packed_segments  [B, S] long  PROMPT, then 1, 2, ... for the responses of blocks 0, 1, ...; PAD
      packed_index     [G*B, T] long packed position of each unpacked (row, t); 0 beyond the row's tokens
    """
    pairs, device = input_ids.shape[0] // groups, input_ids.device
    lengths = attention_mask.sum(dim=1).tolist()
    prompts = prompt_lengths.tolist()
    spans = [[(g * pairs + i, prompts[i], lengths[g * pairs + i]) for g in range(groups)] for i in range(pairs)]
    width = max(p + sum(end - start for _, start, end in rows) for p, rows in zip(prompts, spans))
    ids = torch.full((pairs, width), pad_id, dtype=torch.long, device=device)
    positions = torch.zeros((pairs, width), dtype=torch.long, device=device)
    segments = torch.full((pairs, width), PAD, dtype=torch.long, device=device)
    index = torch.zeros(input_ids.shape, dtype=torch.long, device=device)
    for i, rows in enumerate(spans):
        p = prompts[i]
        ids[i, :p], positions[i, :p], segments[i, :p] = input_ids[i, :p], torch.arange(p, device=device), PROMPT
        at = p
        for segment, (row, start, end) in enumerate(rows, start=1):
            n = end - start
            ids[i, at:at + n] = input_ids[row, start:end]
            positions[i, at:at + n] = torch.arange(start, end, device=device)
            segments[i, at:at + n] = segment
            index[row, :p] = torch.arange(p, device=device)
            index[row, start:end] = torch.arange(at, at + n, device=device)
            at += n
    return {"packed_ids": ids, "packed_positions": positions, "packed_segments": segments, "packed_index": index}


def sharing_blocker(loss_cfg, attn_implementation: str) -> str | None:
    """Why prompt sharing cannot be used for this loss and attention kernel (None: it can)."""
    if loss_cfg.name == "sft":
        return "SFT scores the chosen responses only"
    from .loss_specs import SPECS

    if SPECS[loss_cfg.name].nll_with_prompt:
        return f"loss={loss_cfg.name}'s NLL scores each chosen row's own prompt tokens"
    if attn_implementation not in SHAREABLE_ATTENTION:
        return (f"model.attn_implementation={attn_implementation} takes no custom attention mask (use sdpa or "
                "flex_attention)")
    if loss_cfg.importance.mode == "gradient" and loss_cfg.importance.span != "response":
        return ("loss.importance.span=prompt_response needs each row's own prompt gradient, which a shared prompt "
                "mixes")
    return None


def is_packed(batch: dict[str, torch.Tensor]) -> bool:
    return "packed_ids" in batch


def attention_mask_4d(segments: torch.Tensor, *, additive_dtype: torch.dtype | None = None) -> torch.Tensor:
    """[B, 1, S, S] mask: causal, and a response attends to the prompt and to its own segment only.

    Boolean (True: attend) for SDPA; with `additive_dtype`, 0 / most negative value in that dtype (eager
    attention adds it to the scores). Padding attends to itself only, so no row of the softmax is empty.
    """
    s = segments.shape[1]
    query, key = segments.unsqueeze(2), segments.unsqueeze(1)
    causal = torch.ones(s, s, dtype=torch.bool, device=segments.device).tril()
    allowed = causal & ((key == PROMPT) | (key == query)) & (query != PAD)
    allowed |= torch.eye(s, dtype=torch.bool, device=segments.device)
    allowed = allowed.unsqueeze(1)
    if additive_dtype is None:
        return allowed
    return torch.zeros(allowed.shape, dtype=additive_dtype, device=segments.device).masked_fill(
        ~allowed, torch.finfo(additive_dtype).min)


def segment_mask_mod(segments: torch.Tensor):
    """The rule of `attention_mask_4d` as a FlexAttention mask_mod: (row, head, query, key) -> may attend."""
    def mask_mod(b, h, q, kv):
        query, key = segments[b, q], segments[b, kv]
        return ((kv <= q) & ((key == PROMPT) | (key == query)) & (query != PAD)) | (q == kv)
    return mask_mod


def block_mask(segments: torch.Tensor):
    """The FlexAttention `BlockMask` of the packed rows [B, S]: `segment_mask_mod`, one mask for every head.

    A 4-D `BlockMask` as the attention mask goes through transformers untouched (masking_utils'
    `_preprocess_mask_arguments` returns any 4-D mask as it is) to its flex_attention_forward, which hands it
    to `flex_attention` as `block_mask`. Built eagerly: it evaluates the rule once per (row, query, key), the
    work of the dense mask, with nothing to compile for each new width."""
    rows, width = segments.shape
    return create_block_mask(segment_mask_mod(segments), B=rows, H=None, Q_LEN=width, KV_LEN=width,
                             device=segments.device)


def model_inputs(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> dict:
    """Keyword arguments for a forward of the packed rows: the mask in the form the attention kernel takes
    (eager attention: additive; flex_attention: a BlockMask), and the position ids."""
    impl = attention_implementation(model)
    if impl == "flex_attention":
        mask = block_mask(batch["packed_segments"])
    else:
        dtype = next(model.parameters()).dtype if impl == "eager" else None
        mask = attention_mask_4d(batch["packed_segments"], additive_dtype=dtype)
    return {"attention_mask": mask, "position_ids": batch["packed_positions"]}


def attention_implementation(model: torch.nn.Module) -> str:
    """The attention kernel of the (possibly wrapped: DeepSpeed, PEFT) transformers model inside `model`."""
    for module in model.modules():
        impl = getattr(getattr(module, "config", None), "_attn_implementation", None)
        if isinstance(impl, str):
            return impl
    return "sdpa"


def unpack(values: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Per-position values of the packed rows [B, S, ...] in the unpacked layout [2B, T, ...]."""
    index = batch["packed_index"]
    rows = torch.arange(index.shape[0], device=index.device) % values.shape[0]
    return values[rows.unsqueeze(1), index]


def last_positions_packed(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(packed row, packed position) of each unpacked row's last token: [2B] each."""
    index, mask = batch["packed_index"], batch["attention_mask"]
    last = mask.sum(dim=1) - 1
    rows = torch.arange(index.shape[0], device=index.device)
    return rows % batch["packed_ids"].shape[0], index[rows, last]


def packed_token_logps(logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """`losses.token_logps` of the unpacked rows, read off the packed logits [B, S, V] -> [2B, T].

    Entry t is log p(labels[t] | tokens < t), taken at the packed position that predicts it (for the first
    rejected token that is the prompt's last position, shared with the first chosen token). No unpacked copy of
    the logits is made: one log-sum-exp per packed position, one gathered logit per label.
    """
    index = batch["packed_index"]
    rows = (torch.arange(index.shape[0], device=index.device) % logits.shape[0]).unsqueeze(1)
    return indexed_token_logps(logits.flatten(0, 1), rows * logits.shape[1] + index[:, :-1], batch["labels"])
