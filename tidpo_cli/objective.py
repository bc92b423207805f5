"""What one micro-batch costs: importance pass -> policy forward -> reference forward -> anchor -> loss.

The maths is in losses.py and importance.py; this module only wires models and batches to it.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass

import torch
from omegaconf import DictConfig

from .anchors import anchor_batch, attached_anchors, uses_anchors, with_anchors
from .distributed import extra_backward
from .importance import (TARGETS, dropout_active, gradient_saliency, importance_pass, last_token, mix_weights,
                         saliency_from_forward, weight_shares, weight_stats)
from .loss_specs import needs_nll, needs_reference, spec_of
from .losses import (IGNORE_INDEX, PairScores, kto_losses, left_align, mean_nll, position_kl, response_mask,
                     sft_loss, token_logps, triplet_terms)
from .layouts import layout_of
from .tracking import MetricSums

Batch = dict[str, torch.Tensor]


@dataclass(frozen=True)
class TokenIds:
    """What the objective needs of the tokenizer and data config (anchors are generated and padded)."""
    pad: int
    eos: int
    max_length: int


def forward(model: torch.nn.Module, batch: Batch, whole: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One forward over every row -> (logits, per-token log-probs [N, T], response mask [N, T]).

    The logits are those of the positions the objective reads only (layouts.Rows.kept: each label's predictor
    and each response's last position), [K, V], where the model's forward takes a boolean `logits_to_keep`
    (`keeps_masked_logits`); else, or with `whole` (a loss that reads the prompt's tokens: ORPO's NLL), the
    whole [N, T, V], or for a packed batch (packing.py: one row per pair, the prompt once) the packed rows'
    [B, S, V]; `unpacked` gives the [N, T, V] view of whole logits.
    """
    return _forward(model, layout_of(batch), embeds=None, whole=whole)[:3]


def forward_from_embeddings(model: torch.nn.Module, batch: Batch, whole: bool = False):
    """`forward`, run from the input embeddings so the graph holds them: (logits, log-probs, mask, embeddings,
    final hidden states [rows, positions, hidden]: what the output layer was given, for `saliency_targets`; zero
    at the positions it was not given, which no target reads)."""
    layout = layout_of(batch)
    embeds = model.get_input_embeddings()(layout.ids())
    if not embeds.requires_grad:  # frozen embeddings (LoRA): the saliency still needs the gradient to them
        embeds = embeds.detach().requires_grad_(True)
    seen = []
    hook = model.get_output_embeddings().register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    try:
        out = _forward(model, layout, embeds=embeds, whole=whole)
    finally:
        hook.remove()
    hidden = seen[-1]
    if hidden.dim() == 2:  # the kept positions' only
        hidden = layout.whole_positions(hidden)
    return (*out, hidden)


def _forward(model, layout, embeds, whole: bool):
    batch = layout.batch
    inputs = {"input_ids": layout.ids()} if embeds is None else {"inputs_embeds": embeds}
    if not whole and keeps_masked_logits(model):
        inputs["logits_to_keep"] = layout.kept()
    logits = model(**inputs, **layout.model_kwargs(model), use_cache=False).logits
    return logits, layout.label_logps(logits), response_mask(batch["labels"]), embeds


@functools.cache
def _slices_by_mask(cls: type) -> bool:
    forward = inspect.unwrap(getattr(cls, "forward", None) or (lambda: None))  # HF's are decorated
    code, helper = getattr(forward, "__code__", None), getattr(forward, "__globals__", {}).get("slice_logits_to_keep")
    if code is None or helper is None or "slice_logits_to_keep" not in code.co_names:
        return False
    try:  # releases before the boolean form read a 2-D tensor as positions, or refuse it
        kept = helper(torch.zeros(1, 3, 1), torch.tensor([[True, False, True]]))
    except (IndexError, RuntimeError, TypeError, ValueError):
        return False
    return tuple(kept.shape) == (2, 1)


def keeps_masked_logits(model) -> bool:
    """Whether the model's forward (a DeepSpeed engine's module) computes logits at the positions of a boolean
    [rows, positions] `logits_to_keep` only, flattened to [K, V]: transformers' own models whose forward slices
    with `slice_logits_to_keep`, from the release whose helper takes a mask (checked on a tiny tensor)."""
    return _slices_by_mask(type(getattr(model, "module", model)))


def fused_pass(policy, imp: DictConfig) -> bool:
    """Whether the saliency comes from the loss's own forward (`loss.importance.grad_pass`: `fused`, or `auto`);
    only while gradients are on (not in evaluation) and no dropout is active, where it gives exactly the separate
    pass's weights."""
    if imp.mode != "gradient" or not torch.is_grad_enabled() or dropout_active(policy):
        return False
    return imp.grad_pass in ("fused", "auto")


def unpacked(values: torch.Tensor, batch: Batch) -> torch.Tensor:
    """Per-position values of a forward (logits [.., V], saliency) in the [N, T, ...] layout of the rows, whatever
    the batch layout (a packed batch's are gathered: a copy)."""
    return layout_of(batch).unpack(values)


def saliency_targets(model, hidden: torch.Tensor, batch: Batch, rows: slice, target: str = "last_max_logit",
                     sides: torch.Tensor | None = None) -> torch.Tensor:
    """[N]: the saliency target `importance.TARGETS[target]` of each of the unpacked rows `rows`, computed anew
    from the final hidden states `hidden` [rows, positions, H] of a forward of `batch` (what its output layer was
    given). `sides` [N]: +1 on a chosen row, -1 on a rejected row; by default the first half of `rows` is chosen
    and the second half rejected, as collated.

    Not read off that forward's logits: a DeepSpeed engine hooks its forward's outputs, and any gradient through
    them (this one too) would start its training backward (gradient scaling, reduction). The output layer on the
    positions a target reads, alone, is what the separate pass computes as well."""
    spec = TARGETS[target]
    values = TARGET_INPUTS[spec.reads](model, hidden, batch, rows)
    if sides is None:
        n = values.shape[0]
        sides = torch.cat([torch.ones(n // 2), -torch.ones(n - n // 2)]).to(values.device)
    return spec.value(values, sides)


def last_logits(model, hidden: torch.Tensor, batch: Batch, rows: slice) -> torch.Tensor:
    """[N, V]: the logits at the last token of the unpacked rows `rows`, from the final hidden states `hidden`."""
    where = tuple(index[rows] for index in layout_of(batch).last_positions())
    return model.get_output_embeddings()(hidden[where])


def response_label_logps(model, hidden: torch.Tensor, batch: Batch, rows: slice) -> torch.Tensor:
    """[N, T]: log p(y_t | x, y_<t) at the response tokens (labels) of the unpacked rows `rows`, 0 elsewhere, from
    the final hidden states `hidden`: the output layer and a log-softmax (fp32 for half-precision logits) at the
    positions that predict a response token only (position t - 1 predicts token t; in a packed batch the prompt's
    last position predicts both responses' first tokens)."""
    states = layout_of(batch).unpack(hidden)[rows]  # [N, T, H]
    labels = batch["labels"][rows]
    row, t = (labels[:, 1:] != IGNORE_INDEX).nonzero(as_tuple=True)
    logits = model.get_output_embeddings()(states[row, t])  # [K, V]
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    picked = logits.log_softmax(dim=-1).gather(-1, labels[row, t + 1].unsqueeze(-1)).squeeze(-1)
    return torch.zeros(labels.shape, dtype=picked.dtype, device=picked.device).index_put((row, t + 1), picked)


TARGET_INPUTS = {"last_logits": last_logits, "label_logps": response_label_logps}  # what a Target reads


def chosen_rows(batch: Batch) -> Batch:
    """The first half of a collated batch: the chosen responses (unpacked)."""
    half = batch["input_ids"].shape[0] // 2
    return {k: v[:half] for k, v in batch.items() if not k.startswith("packed_")}


def loss_items(batch: Batch, loss_name: str) -> int:
    """What one step's loss is averaged over: response tokens for SFT, examples for unpaired data (KTO), pairs
    for preference losses."""
    if "desirable" in batch:
        return batch["input_ids"].shape[0]
    if loss_name == "sft":
        return int(response_mask(chosen_rows(batch)["labels"]).sum())
    return batch["input_ids"].shape[0] // 2


def batch_loss(policy, reference, batch: Batch, loss_cfg: DictConfig, ids: TokenIds, *, seed: int,
               with_anchor: bool = True) -> tuple[torch.Tensor, MetricSums]:
    """The loss of one micro-batch summed over its items (see `loss_items`), and its metric sums.

    `seed` drives the random parts (anchor sampling, random importance) so a step can be replayed.
    `with_anchor=False` leaves the triplet term out (evaluation: no sampling on held-out data).
    What is computed follows what the loss declares (loss_specs.py): no reference forward for a reference-free
    loss, the NLL only where it is read, KTO's mismatched rows only for KTO; token weights and the triplet term
    for any pairwise loss that asks for them.
    """
    if loss_cfg.name == "sft":
        return _sft(policy, batch)
    if "desirable" in batch:
        return _unpaired_kto(policy, reference, batch, loss_cfg, ids)
    spec = spec_of(loss_cfg)
    metrics = MetricSums()
    half = batch["input_ids"].shape[0] // 2
    pairs = slice(0, 2 * half)  # the chosen and rejected rows; anchors, when sampled, follow as rows 2B..3B

    rows = batch
    anchored = uses_anchors(loss_cfg) and with_anchor
    if anchored:
        # Sampled before the loss's forward, from the same weights, so the anchors ride in that forward (after
        # their pair's prompt when it is shared) instead of forwards of their own.
        anchors = attached_anchors(batch) or anchor_batch(batch, policy, loss_cfg.anchor, pad_id=ids.pad,
                                                          eos_id=ids.eos, max_length=ids.max_length, seed=seed)
        rows = with_anchors(batch, anchors, ids.pad)
    width = batch["input_ids"].shape[1]  # the pairs' own width; `rows` may be wider
    whole = needs_nll(loss_cfg) and spec.nll_with_prompt  # logits at every position: the prompt's tokens are read

    weights, forwarded = token_weights(policy, batch, rows, loss_cfg.importance, pairs, width, seed, metrics,
                                       whole=whole)
    logits, logps, mask = forwarded[:3] if forwarded is not None else forward(policy, rows, whole=whole)
    ref_logits = None
    if needs_reference(loss_cfg):
        ref_logits, ref_logps = reference_scores(reference, batch, rows, distributions=bool(loss_cfg.alpha))
    else:
        ref_logps = torch.zeros_like(logps)
    ratios = (logps - ref_logps) * mask  # per-token log-ratios m_t [N, T] (log-probs for a reference-free loss)
    pair_mask = mask[pairs]
    w = weights[:, :ratios.shape[1]] if weights is not None else pair_mask
    policy_sums, ref_sums = (logps[pairs] * w * pair_mask).sum(-1), (ref_logps[pairs] * w * pair_mask).sum(-1)
    lengths = pair_mask.sum(-1)

    delta = (policy_sums[:half] - ref_sums[:half]) - (policy_sums[half:] - ref_sums[half:])
    if loss_cfg.alpha:  # TDPO's sequential KL (both models' distributions at each label's predictor)
        layout = layout_of(rows)
        if ref_logits.dim() != logits.dim():  # one model's forward kept positions, the other's did not
            ref_logits, logits = layout.as_kept(ref_logits), layout.as_kept(logits)
        kl = layout.at_labels(position_kl(ref_logits, logits))[pairs].sum(-1)
        delta = delta - loss_cfg.alpha * (kl[half:] - kl[:half].detach())
        metrics.add({"kl/chosen": kl[:half].sum().item(), "kl/rejected": kl[half:].sum().item()}, count=half)
    del ref_logits
    scores = PairScores(
        chosen=policy_sums[:half], rejected=policy_sums[half:], ref_chosen=ref_sums[:half],
        ref_rejected=ref_sums[half:], chosen_len=lengths[:half], rejected_len=lengths[half:], delta=delta,
        nll=(gold_nll(policy, batch, half) if spec.nll_on_gold and "gold_input_ids" in batch
             else chosen_nll(logits, logps, mask, rows, half, spec.nll_with_prompt) if needs_nll(loss_cfg) else None),
        kto_kl=kto_reference_point(policy, reference, batch, ids.pad) if spec.kto_rows else None)
    out = spec.compute(scores, loss_cfg)
    loss_sum = out.losses.sum()

    if anchored:
        d, d_mask = left_align(ratios[2 * half:], mask[2 * half:])
        b, b_mask = left_align(ratios[:half], pair_mask[:half])
        c, c_mask = left_align(ratios[half:2 * half], pair_mask[half:])
        terms = triplet_terms(d, d_mask, b, b_mask, c, c_mask, loss_cfg.triplet.margin)
        loss_sum = loss_sum + loss_cfg.gamma * terms["loss"].sum()
        metrics.add({
            "triplet/loss": terms["loss"].sum().item(),
            "triplet/dist_pos": terms["dist_pos"].sum().item(),
            "triplet/dist_neg": terms["dist_neg"].sum().item(),
            "triplet/active_frac": (terms["loss"] > 0).float().sum().item(),
            "anchor/length": float(mask[2 * half:].sum()),
        }, count=half)

    chosen_rewards, rejected_rewards = out.chosen_rewards, out.rejected_rewards
    # The log-probs logged: summed (unweighted), token-averaged for the length-normalised losses (as TRL logs them)
    logged = (logps[pairs] * pair_mask).sum(-1) / (lengths.clamp(min=1) if spec.length_normalized else 1)
    metrics.add({
        "loss": loss_sum.item(),
        "rewards/chosen": chosen_rewards.sum().item(),
        "rewards/rejected": rejected_rewards.sum().item(),
        "rewards/accuracies": (chosen_rewards > rejected_rewards).float().sum().item(),
        "rewards/margins": (chosen_rewards - rejected_rewards).sum().item(),
        "logps/chosen": logged[:half].sum().item(),
        "logps/rejected": logged[half:].sum().item(),
        **{name: float(value.detach().sum() if value.dim() else value.detach() * half) for name, value in out.metrics.items()},
    }, count=half)
    add_logit_means(metrics, logits, rows, mask, half)
    return loss_sum, metrics


@torch.no_grad()
def reference_scores(reference, batch: Batch, rows: Batch, *, distributions: bool):
    """(the reference's logits or None, its label log-probs [rows, T]) for the rows of a forward: `batch`'s rows
    then any that follow them in `rows` (anchors). The batch's rows come from `reference_logps`
    (trainer.reference_cache) where it carries them, unless the loss reads the reference's `distributions`
    (TDPO's KL: its logits are returned); the rows after them are scored live, on their own."""
    cached = batch.get("reference_logps")
    if cached is None or distributions:
        logits, logps, _ = forward(reference, rows)
        return logits if distributions else None, logps
    logps = torch.nn.functional.pad(cached, (0, rows["labels"].shape[1] - cached.shape[1]))
    if rows["input_ids"].shape[0] > cached.shape[0]:
        after = {k: rows[k][cached.shape[0]:] for k in ("input_ids", "attention_mask", "labels")}  # unpacked rows
        logps = torch.cat([logps, forward(reference, after)[1].to(logps.dtype)])
    return None, logps


def token_weights(policy, batch: Batch, rows: Batch, imp: DictConfig, pairs: slice, width: int, seed: int,
                  metrics: MetricSums, whole: bool = False):
    """(weights [2B, rows' width] or None, the loss's forward when the fused pass ran it, else None): TI-DPO's
    token weights (loss.importance), for any pairwise loss; the batch's precomputed ones (TIS-DPO) where it has
    them; None with `loss.importance.mode=none`. The saliency differentiates `loss.importance.target` and turns
    gradients into raw importance with `loss.importance.attribution` (importance.TARGETS, ATTRIBUTIONS)."""
    if "token_weights" in batch:
        return torch.nn.functional.pad(batch["token_weights"], (0, rows["input_ids"].shape[1] - width)), None
    if imp.mode == "none":
        return None, None
    response = response_mask(batch["labels"])
    span = response if imp.span == "response" else batch["attention_mask"]
    forwarded = None
    mixing = dict(lam=imp.lam, sigma_div=imp.sigma_div, prior=imp.prior, normalize=imp.normalize,
                  exclude_last=imp.exclude_last)
    if fused_pass(policy, imp):
        # The saliency from the loss's own forward: one forward fewer (exact without dropout). Not in
        # evaluation, whose forwards keep no graph.
        forwarded = forward_from_embeddings(policy, rows, whole=whole)
        with extra_backward(policy):  # the loss's backward follows through the same graph (ZeRO-3 counts it)
            targets = saliency_targets(policy, forwarded[4], rows, pairs, imp.target)
            raw = saliency_from_forward(forwarded[3], targets, imp.attribution)
        result = mix_weights(unpacked(raw, rows)[pairs, :width], span, **mixing)
    elif imp.mode == "gradient":  # the paper's separate pass: its own forward and backward
        layout = layout_of(batch)
        raw = gradient_saliency(policy, layout.ids(), **layout.model_kwargs(policy), attribution=imp.attribution,
                                target_values=lambda hidden: saliency_targets(policy, hidden, batch, slice(None),
                                                                              imp.target))
        result = mix_weights(layout.unpack(raw), span, **mixing)
    else:
        result = importance_pass(policy, batch["input_ids"], batch["attention_mask"], span, mode=imp.mode,
                                 generator=torch.Generator().manual_seed(seed), **mixing)
    add_weight_metrics(metrics, result.weights, span, response, batch)
    metrics.add_total("importance/fallbacks", result.fallbacks)
    return torch.nn.functional.pad(result.weights, (0, rows["input_ids"].shape[1] - width)), forwarded


def add_weight_metrics(metrics: MetricSums, weights: torch.Tensor, span: torch.Tensor, response: torch.Tensor,
                       batch: Batch) -> None:
    """`importance/entropy` and `importance/max` (importance.weight_stats), `importance/last_share` (each response's
    share of its weight on its last token, importance.weight_shares) averaged over the responses, and
    `importance/critical_share` (the share on the tokens the data marks critical, data.collate's `critical_mask`)
    averaged over the responses that are marked: logged with count 0, so left out of the means, where none is
    (every process then logs the same names)."""
    n = weights.shape[0]
    metrics.add(weight_stats(weights, span), count=n)
    metrics.add({"importance/last_share": float(weight_shares(weights, span, last_token(response)).sum())}, count=n)
    critical = batch.get("critical_mask", torch.zeros_like(span, dtype=torch.bool))
    marked = batch.get("critical_rows", torch.zeros(n, dtype=torch.bool, device=span.device))
    shares = weight_shares(weights, span, critical)[marked]
    metrics.add({"importance/critical_share": float(shares.sum())}, count=int(marked.sum()))


def chosen_nll(logits, logps, mask, rows: Batch, half: int, with_prompt: bool) -> torch.Tensor:
    """The chosen responses' mean next-token NLL, expanded to [B]; `with_prompt`: over every attended token of the
    chosen rows after the first, prompt included (ORPO's, as its authors' code and TRL's ORPOTrainer; the batch
    layout is then unpacked: packing.sharing_blocker)."""
    if not with_prompt:
        return mean_nll(logps[:half], mask[:half]).expand(half)
    labels = rows["input_ids"][:half].masked_fill(rows["attention_mask"][:half] == 0, IGNORE_INDEX)
    return mean_nll(token_logps(logits[:half], labels), response_mask(labels)).expand(half)


def gold_nll(policy, batch: Batch, half: int) -> torch.Tensor:
    """The mean next-token NLL of the pairs' gold responses (TPO's third response: `gold_*` rows), expanded to
    [B]: a forward of their own, with gradients."""
    gold = {k.removeprefix("gold_"): v for k, v in batch.items() if k.startswith("gold_")}
    _, logps, mask = forward(policy, gold)
    return mean_nll(logps, mask).expand(half)


def mismatched_rows(batch: Batch, pad_id: int) -> Batch:
    """KTO's rows for its KL estimate: row j's prompt followed by row j-1's response (cyclically over the 2B
    unpacked rows, TRL's +1 shift of completions within a batch) -> input_ids / attention_mask / labels [2B, T']."""
    prompts = [batch["input_ids"][j, :int(batch["prompt_lengths"][j])] for j in range(batch["input_ids"].shape[0])]
    responses = [row[labels != IGNORE_INDEX] for row, labels in zip(batch["input_ids"], batch["labels"])]
    responses = responses[-1:] + responses[:-1]
    width = max(len(p) + len(r) for p, r in zip(prompts, responses))
    input_ids = batch["input_ids"].new_full((len(prompts), width), pad_id)
    attention_mask = torch.zeros_like(input_ids)
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    for j, (prompt, response) in enumerate(zip(prompts, responses)):
        end = len(prompt) + len(response)
        input_ids[j, :end] = torch.cat([prompt, response])
        attention_mask[j, :end] = 1
        labels[j, len(prompt):end] = response
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


@torch.no_grad()
def kto_reference_point(policy, reference, batch: Batch, pad_id: int) -> torch.Tensor:
    """KTO's z0 (scalar, no gradient): the mean over the mismatched rows of log pi(y'|x) - log pi_ref(y'|x), at
    least 0 (TRL's estimate; here from this process's rows, where TRL also averages over processes)."""
    rows = mismatched_rows(batch, pad_id)
    _, logps, mask = forward(policy, rows)
    _, ref_logps, _ = forward(reference, rows)
    return ((logps - ref_logps) * mask).sum(-1).mean().clamp(min=0)


def add_logit_means(metrics: MetricSums, logits: torch.Tensor, rows: Batch, mask: torch.Tensor, half: int) -> None:
    """TRL's `logits/chosen` and `logits/rejected`: the mean over the responses' tokens of the mean logit (over the
    vocabulary) at the position that predicts the token."""
    with torch.no_grad():
        means = layout_of(rows).label_logit_means(logits) * mask
        for name, part in (("logits/chosen", slice(0, half)), ("logits/rejected", slice(half, 2 * half))):
            metrics.add({name: means[part].sum().item()}, count=float(mask[part].sum()))


def _sft(policy, batch: Batch) -> tuple[torch.Tensor, MetricSums]:
    metrics = MetricSums()
    _, logps, mask = forward(policy, chosen_rows(batch))
    loss_sum = sft_loss(logps, mask)
    metrics.add({"loss": loss_sum.item()}, count=int(mask.sum()))
    metrics.add({"logps/chosen": (logps * mask).sum().item()}, count=logps.shape[0])
    return loss_sum, metrics


def _unpaired_kto(policy, reference, batch: Batch, loss_cfg: DictConfig,
                  ids: TokenIds) -> tuple[torch.Tensor, MetricSums]:
    """KTO on unpaired rows (data.format=unpaired): each row's completion is desirable or not (`desirable` [N]);
    the loss summed over the rows, z0 from the rows' mismatched completions as for pairs (TRL's KTOTrainer)."""
    metrics = MetricSums()
    logits, logps, mask = forward(policy, batch)
    _, ref_logps = reference_scores(reference, batch, batch, distributions=False)
    ratio = ((logps - ref_logps) * mask).sum(-1)  # [N]
    kl = kto_reference_point(policy, reference, batch, ids.pad)
    good = batch["desirable"]
    desirable, undesirable = kto_losses(ratio[good], ratio[~good], kl, loss_cfg.beta, loss_cfg.kto.desirable_weight,
                                        loss_cfg.kto.undesirable_weight)
    loss_sum = desirable.sum() + undesirable.sum()
    rewards, sums = loss_cfg.beta * ratio.detach(), (logps * mask).sum(-1).detach()
    metrics.add({"loss": loss_sum.item(), "kl": kl.item() * len(good)}, count=len(good))
    for side, rows in (("chosen", good), ("rejected", ~good)):
        if rows.any():
            metrics.add({f"rewards/{side}": rewards[rows].sum().item(), f"logps/{side}": sums[rows].sum().item()},
                        count=int(rows.sum()))
    means = layout_of(batch).label_logit_means(logits) * mask
    for side, rows in (("chosen", good), ("rejected", ~good)):
        metrics.add({f"logits/{side}": means[rows].sum().item()}, count=float(mask[rows].sum()))
    return loss_sum, metrics
