"""TIS-DPO's token weights from a pair of contrastive models (Liu et al., ICLR 2025, arXiv 2410.04350).

Source read: github.com/exlaw/TIS-DPO at commit cbad7c1 (the only public version). Files and lines below are
that commit's. The paper's own weight formula is *not* what the code computes; see "Paper vs code".

Estimate (what `token_weights` reproduces)
------------------------------------------
1. Both contrastive models (`model_1` = the DPO model = "positive" pi+, `model_2` = the reverse-DPO model =
   "negative" pi-; README.md:102-103, scripts/token_weight_estimation.sh:3-4) run frozen, `torch.no_grad`,
   over prompt + response (token_weight_estimation.py:106-108). No policy and no reference model are involved:
   the score compares the two contrastive models directly.
2. Per response token t, the log-softmax log-prob of the actual token (token_weight_estimation.py:113-114,
   123-129), and the raw score `log pi-(y_t) - log pi+(y_t)`  (`weight = score_2 - score_1`, line 131),
   rounded to 2 decimals (line 133). The appended EOS gets no score (the response is tokenized without it,
   line 56/118).
3. Sign (preference_datasets.py:106-113, 181, 185): chosen scores are negated, rejected ones are not, so the
   signed score is  s_t = log pi+(y_t) - log pi-(y_t)  on the chosen response and
   s_t = log pi-(y_t) - log pi+(y_t)  on the rejected one. Higher s = more weight in every transform.
4. A per-response transform of s (preference_datasets.py:21-73, chosen by config `transform.method`):
   - `rank_based` (lines 54-64; README.md:122, the documented TIS-DPO run): rank the response's scores
     ascending (stable: ties keep position order), w = min_scale + rank/(n-1) * (max_scale - min_scale),
     w = 1 for a one-token response. Defaults min_scale 0.7, max_scale 1.3 (line 54,
     config/transform/default.yaml:28-30).
   - `threshold_and_scale` (43-49): clamp s to [min_val, max_val] = [-1.5, 1.5], map linearly onto
     [min_scale, max_scale] = [0.7, 1.3] (default.yaml:16-20).
   - `threshold` (32-41): clamp s to [lower, upper] = [-1, 1] (default.yaml:11-13); may be negative.
   - `binary` (21-30): 1 for the top `top_percent` % scores, else 0 (ties: every equal score gets the value
     of its last copy in the descending order, a dict quirk kept here). default.yaml:4,8 makes this the
     repo's *default* transform with top_percent 100, i.e. all weights 1 (= plain DPO).
   - `random` (51-52): uniform in [0.7, 1.3] (default.yaml:23-25), ignores s. `origin` (67): w = s.
   No exponentiation and no normalisation (weights do not sum or average to anything) in any of them.
5. EOS: the response's appended EOS token gets weight 0 in training (preference_datasets.py:291, 296:
   `[0]*prompt + weight[:len(response)-1] + [0]`); `estimate(..., eos_id=...)` reproduces that.
Not reproduced: a response cut by the length limit keeps the weights computed on the whole response and its
last kept token gets 0 (same lines); here the transform sees the kept tokens only. The estimation script can
give the two models different prompt templates (token_weight_estimation.py:12-16, 159-160; "normal" = none by
default, the DPO-based setting); here both see the same rows. scripts/token_weight_estimation.sh:17 calls
`predict_score_parallel.py`, which is not in the repository (the script is token_weight_estimation.py).

How the weights enter the loss (authors' trainers.py; for the wiring, not done here)
------------------------------------------------------------------------------------
Weights are constants (data, no gradient), one per response token, aligned with the label they multiply:
`weights[:, 1:]` next to `labels[:, 1:]` (trainers.py:254, 274), i.e. with this project's unshifted layout
weight[t] multiplies the log-probs of labels[t] (`losses.token_logps` entry t).
  M(y) = sum_t w_t * (log pi_theta(y_t) - log pi_ref(y_t))      (trainers.py:273, 281; a sum, not a mean:
                                                                average_log_prob=False at 417)
  default (config/loss/tisdpo.yaml:16 token_level: false):   z = M(y_w) - M(y_l)             (trainers.py:145)
  token_level: true:  z = M(y_w) - M(y_l) - alpha * (K(y_w) - K(y_l))                         (trainers.py:143)
      with K(y) = sum_t w_t * KL(pi_theta || pi_ref) at t (full vocabulary, line 268 -- note: the reverse of
      TDPO's KL(pi_ref || pi_theta) at line 74, no stop-gradient, and chosen-minus-rejected, the opposite sign
      to TDPO2 at line 120), alpha = 0.5 (tisdpo.yaml:18).
  loss = -log sigmoid(beta * z), beta = 0.1 (trainers.py:147, tisdpo.yaml:6); no label smoothing.
  rewards for metrics: beta * M(y) (token_level false) or beta * (M(y) - K(y)) (trainers.py:133-150).
In this project the default is `losses.sigmoid_preference_loss(M_w - M_l, beta)` with M from the weights;
the token-level variant is not `losses.tdpo_loss` (KL direction, sign and stop-gradient differ).

Paper vs code
-------------
Only the released code was read for this module (the paper's text was not available here). The code's weights
are the linear rank/clamp maps above: no exponentiation and no k, mu, L, U. `transform="exp"`
(k * exp(mu * clamp(s, lower, upper)) on the signed score) is an extra option outside the authors' code, with no
defaults for its bounds; check it against the paper before relying on it.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Iterable

import torch

from tidpo_cli.data.examples import TokenizedPair
from tidpo_cli.losses import response_mask

TRANSFORMS = ("rank_based", "threshold_and_scale", "threshold", "binary", "random", "origin", "exp")
CACHE_FORMAT = "tidpo.tis-weights"
CACHE_VERSION = 1


def token_weights(
    positive_logps: torch.Tensor,
    negative_logps: torch.Tensor,
    mask: torch.Tensor,
    *,
    chosen: bool | torch.Tensor,
    transform: str = "rank_based",
    min_scale: float = 0.7,
    max_scale: float = 1.3,
    min_val: float = -1.5,
    max_val: float = 1.5,
    lower_threshold: float = -1.0,
    upper_threshold: float = 1.0,
    top_percent: float = 100,
    random_min: float = 0.7,
    random_max: float = 1.3,
    k: float = 1.0,
    mu: float = 1.0,
    lower: float | None = None,
    upper: float | None = None,
    round_digits: int | None = 2,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """TIS-DPO token weights from the two contrastive models' per-token log-probs (module docstring, 1-4).

    positive_logps, negative_logps [N, T]: `losses.token_logps` of pi+ and pi- on the same rows (aligned with the
    labels); mask [N, T] bool: the tokens to weight (`losses.response_mask(labels)`, minus EOS for the authors'
    EOS rule); chosen: bool for all rows or [N] bool (True = chosen/winning response) -> [N, T] float32 weights,
    0 off the mask. The transform runs per row over that row's masked tokens, in order.

    Signed score s = +-(log pi+ - log pi-) (+ on chosen rows), computed in the inputs' dtype and rounded to
    `round_digits` (2, as the authors; None: no rounding). Transform parameters keep the authors' names and
    defaults: rank_based (min_scale, max_scale), threshold_and_scale (min_val, max_val, min_scale, max_scale),
    threshold (lower_threshold, upper_threshold), binary (top_percent), random (random_min, random_max;
    `generator`), origin; exp = the paper's k * exp(mu * clamp(s, lower, upper)) (lower/upper required).
    """
    if transform not in TRANSFORMS:
        raise ValueError(f"unknown transform {transform!r}; expected one of {', '.join(TRANSFORMS)}")
    if transform == "exp" and (lower is None or upper is None):
        raise ValueError("transform='exp' (the paper's k*exp(mu*clamp(s, L, U))) needs `lower` and `upper`")
    if positive_logps.shape != negative_logps.shape or positive_logps.shape != mask.shape:
        raise ValueError(f"shapes differ: positive {tuple(positive_logps.shape)}, negative "
                         f"{tuple(negative_logps.shape)}, mask {tuple(mask.shape)}")
    rows = positive_logps.shape[0]
    chosen_rows = _chosen_rows(chosen, rows)
    mask = mask.bool()
    # The authors' order: negative - positive, rounded, then negated on chosen responses (round(-x) = -round(x)).
    raw = (negative_logps - positive_logps).detach().cpu()
    weights = torch.zeros(positive_logps.shape, dtype=torch.float32)
    for row in range(rows):
        positions = mask[row].cpu().nonzero().squeeze(-1)
        if positions.numel() == 0:
            continue
        scores = [float(x) for x in raw[row, positions].tolist()]
        if round_digits is not None:
            scores = [round(x, round_digits) for x in scores]
        if chosen_rows[row]:
            scores = [-x for x in scores]
        values = _transform(torch.tensor(scores, dtype=torch.float64), transform, min_scale=min_scale,
                            max_scale=max_scale, min_val=min_val, max_val=max_val, lower_threshold=lower_threshold,
                            upper_threshold=upper_threshold, top_percent=top_percent, random_min=random_min,
                            random_max=random_max, k=k, mu=mu, lower=lower, upper=upper, generator=generator)
        weights[row, positions] = values.float()
    return weights.to(positive_logps.device)


def _chosen_rows(chosen: bool | torch.Tensor, rows: int) -> list[bool]:
    if isinstance(chosen, torch.Tensor):
        if chosen.shape != (rows,):
            raise ValueError(f"chosen must be a bool or a [{rows}] bool tensor, got shape {tuple(chosen.shape)}")
        return [bool(x) for x in chosen.tolist()]
    if not isinstance(chosen, bool):
        raise ValueError(f"chosen must be a bool or a [N] bool tensor, got {type(chosen).__name__}")
    return [chosen] * rows


def _transform(s: torch.Tensor, transform: str, *, min_scale, max_scale, min_val, max_val, lower_threshold,
               upper_threshold, top_percent, random_min, random_max, k, mu, lower, upper, generator) -> torch.Tensor:
    """One response's signed scores s [n] float64 -> weights [n] float64 (preference_datasets.py:21-73)."""
    n = s.numel()
    if transform == "origin":
        return s
    if transform == "rank_based":
        if n == 1:
            return torch.ones(1, dtype=torch.float64)
        order = torch.argsort(s, stable=True)  # Python's sorted(range(n), key=...) is stable too
        ranks = torch.empty(n, dtype=torch.float64)
        ranks[order] = torch.arange(n, dtype=torch.float64)
        return min_scale + (ranks / (n - 1)) * (max_scale - min_scale)
    if transform == "threshold_and_scale":
        clipped = s.clamp(min_val, max_val)
        return min_scale + (clipped - min_val) * (max_scale - min_scale) / (max_val - min_val)
    if transform == "threshold":
        return s.clamp(lower_threshold, upper_threshold)
    if transform == "binary":
        threshold_index = int(n * top_percent / 100)
        # dict {value: 1 if i < threshold_index else 0} over the descending sort: a value's last copy decides.
        at_least = (s.unsqueeze(0) >= s.unsqueeze(1)).sum(dim=1)  # [n]: how many scores are >= s_i
        return (at_least <= threshold_index).to(torch.float64)
    if transform == "random":
        return random_min + (random_max - random_min) * torch.rand(n, dtype=torch.float64, generator=generator)
    # "exp": the paper's form.
    return k * torch.exp(mu * s.clamp(lower, upper))


@torch.no_grad()
def estimate(positive_model: torch.nn.Module, negative_model: torch.nn.Module, batches: Iterable[dict], *,
             eos_id: int | None, **hparams) -> list[tuple[list[float], list[float]]]:
    """Weights of every pair in `batches` (dicts from `data.collate.collate`: B chosen rows, then B rejected).

    Both models run frozen (eval mode, no grad; their modes are restored) on input_ids / attention_mask; their
    `token_logps` go to `token_weights(..., **hparams)`. Returns, per pair in batch order, (chosen weights,
    rejected weights): lists of floats, one per `response_mask(labels)` entry of the row, in order. With
    `eos_id`, a response whose last token is `eos_id` has that token left out of the transform and weighted 0
    (the authors' rule); `eos_id=None` weights it like any other token.
    """
    results: list[tuple[list[float], list[float]]] = []
    modes = positive_model.training, negative_model.training
    positive_model.eval()
    negative_model.eval()
    try:
        for batch in batches:
            labels = batch["labels"]
            rows = labels.shape[0]
            if rows % 2:
                raise ValueError(f"a collated batch has chosen rows then rejected rows; got {rows} rows")
            pairs = rows // 2
            positive = _logps(positive_model, batch)
            negative = _logps(negative_model, batch)
            mask = response_mask(labels)
            weighted = mask & ~_final_eos(labels, mask, eos_id)
            chosen = torch.arange(rows) < pairs
            weights = token_weights(positive, negative, weighted, chosen=chosen, **hparams)
            per_row = [weights[row][mask[row]].tolist() for row in range(rows)]
            results.extend((per_row[i], per_row[pairs + i]) for i in range(pairs))
    finally:
        positive_model.train(modes[0])
        negative_model.train(modes[1])
    return results


def _logps(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    """`token_logps` of the rows, from the logits at the positions that predict a label only (objective.forward)."""
    from tidpo_cli.objective import forward

    device = next(model.parameters()).device
    return forward(model, {k: batch[k].to(device) for k in ("input_ids", "attention_mask", "labels")})[1].cpu()


def _final_eos(labels: torch.Tensor, mask: torch.Tensor, eos_id: int | None) -> torch.Tensor:
    """[N, T] bool: each row's last masked position when its label is `eos_id` (none if eos_id is None)."""
    final = torch.zeros_like(mask)
    if eos_id is None:
        return final
    positions = torch.arange(mask.shape[1])
    last = (mask.long() * positions).argmax(dim=1)
    rows = torch.arange(mask.shape[0])
    hit = mask.any(dim=1) & (labels[rows, last] == eos_id)
    final[rows[hit], last[hit]] = True
    return final


def estimate_by_key(positive_model: torch.nn.Module, negative_model: torch.nn.Module, pairs: list[TokenizedPair],
                    pad_id: int, *, batch_size: int = 8, eos_id: int | None,
                    **hparams) -> dict[str, tuple[list[float], list[float]]]:
    """`estimate` over `pairs`, collated `batch_size` at a time, keyed by `pair_key` (the cache's layout)."""
    from tidpo_cli.data.collate import collate

    batches = (collate(pairs[i:i + batch_size], pad_id) for i in range(0, len(pairs), batch_size))
    weights = estimate(positive_model, negative_model, batches, eos_id=eos_id, **hparams)
    return {pair_key(pair): w for pair, w in zip(pairs, weights)}


def pair_key(pair: TokenizedPair) -> str:
    """Stable key of a pair's token ids (sha256 hex of prompt, chosen and rejected ids; `where` not included)."""
    payload = json.dumps([list(pair.prompt_ids), list(pair.chosen_ids), list(pair.rejected_ids)],
                         separators=(",", ":"))
    return hashlib.sha256(payload.encode("ascii")).hexdigest()


def cache_meta(positive_model_path: str | os.PathLike, negative_model_path: str | os.PathLike, *,
               eos_id: int | None, **hparams) -> dict:
    """The `meta` a cache is made and checked with: both model paths (resolved when they exist locally),
    eos_id, and every `token_weights` hyper-parameter (defaults filled in, so changing any one refuses a cache)."""
    params = inspect.signature(token_weights).parameters
    unknown = (set(hparams) - set(params)) | (set(hparams) & {"chosen", "generator"})
    if unknown:
        raise ValueError(f"not token_weights hyper-parameters: {', '.join(sorted(unknown))}")
    resolved = {name: hparams.get(name, p.default) for name, p in params.items()
                if p.kind is inspect.Parameter.KEYWORD_ONLY and name not in ("chosen", "generator")}
    return {"method": "tis-dpo", "positive_model": _model_id(positive_model_path),
            "negative_model": _model_id(negative_model_path), "eos_id": eos_id, "hparams": resolved}


def _model_id(path: str | os.PathLike) -> str:
    p = Path(path)
    return str(p.resolve()) if p.exists() else str(path)


def save_cache(path: str | os.PathLike, weights_by_key: dict[str, tuple[list[float], list[float]]],
               meta: dict) -> None:
    """Write one JSON file {format, version, meta, weights: {key: [chosen, rejected]}}: to a temporary file in
    the same directory, fsynced, then renamed over `path` (a crash leaves the old file or none, never half)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    document = {"format": CACHE_FORMAT, "version": CACHE_VERSION, "meta": _canonical(meta),
                "weights": {key: [list(map(float, c)), list(map(float, r))] for key, (c, r) in weights_by_key.items()}}
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(document, f, separators=(",", ":"))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def load_cache(path: str | os.PathLike, meta: dict) -> dict[str, tuple[list[float], list[float]]] | None:
    """The weights saved at `path` if it was made with this `meta` (and this cache version); None when there
    is no file, or it was made with other models or settings. A file that is not a cache raises ValueError."""
    path = Path(path)
    if not path.exists():
        return None
    try:
        with open(path, encoding="utf-8") as f:
            document = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: not a readable TIS weight cache ({e})") from e
    if not isinstance(document, dict) or document.get("format") != CACHE_FORMAT:
        raise ValueError(f"{path}: not a TIS weight cache (format {document.get('format') if isinstance(document, dict) else None!r})")
    if document.get("version") != CACHE_VERSION or document.get("meta") != _canonical(meta):
        return None
    return {key: (list(c), list(r)) for key, (c, r) in document["weights"].items()}


def _canonical(meta: dict) -> dict:
    """meta as JSON would give it back (tuples -> lists, keys -> str), so equal settings compare equal."""
    text = json.dumps(meta, sort_keys=True, allow_nan=True)
    value = json.loads(text)
    if not isinstance(value, dict):
        raise ValueError("meta must be a dict")
    return value


def with_weights(pairs: list[TokenizedPair], weights_by_key: dict) -> list[TokenizedPair]:
    """The pairs with their responses' weights attached (`TokenizedPair.token_weights`, read by data.collate)."""
    import dataclasses

    out = []
    for pair in pairs:
        chosen, rejected = weights_by_key[pair_key(pair)]
        out.append(dataclasses.replace(pair, token_weights=(tuple(chosen), tuple(rejected))))
    return out


def prepare(tis_cfg, splits, run_dir: Path, *, pad_id: int, eos_id: int | None, device: torch.device, dist,
            log) -> None:
    """TIS-DPO's weights of every training and held-out pair, estimated once per run before training and cached
    in RUN/tis_weights.json or `loss.tis.cache` (a resume, or any run with the same models and settings, reads them
    back; missing pairs are estimated anew), attached
    to `splits` in place. The main process estimates; the others wait and read the cache."""
    from .trained import load_hf

    hparams = {"transform": tis_cfg.transform, "min_scale": tis_cfg.min_scale, "max_scale": tis_cfg.max_scale}
    meta = cache_meta(tis_cfg.positive_model, tis_cfg.negative_model, eos_id=eos_id, **hparams)
    path = Path(tis_cfg.cache) if tis_cfg.cache else Path(run_dir) / "tis_weights.json"
    pairs = splits.train + splits.eval
    cached = load_cache(path, meta) if dist.main else None
    if dist.main and (cached is None or any(pair_key(p) not in cached for p in pairs)):
        started = time.perf_counter()
        positive, _ = load_hf(tis_cfg.positive_model, device)
        negative, _ = load_hf(tis_cfg.negative_model, device)
        cached = estimate_by_key(positive, negative, pairs, pad_id, batch_size=tis_cfg.batch_size, eos_id=eos_id,
                                 **hparams)
        del positive, negative
        save_cache(path, cached, meta)
        log.info("TIS-DPO token weights of %d pairs from %s (+) and %s (-) in %.1f s: %s", len(pairs),
                 tis_cfg.positive_model, tis_cfg.negative_model, time.perf_counter() - started, path)
    dist.barrier()
    if cached is None:
        cached = load_cache(path, meta)
    splits.train, splits.eval = with_weights(splits.train, cached), with_weights(splits.eval, cached)


__all__ = ["TRANSFORMS", "token_weights", "estimate", "estimate_by_key", "pair_key", "cache_meta", "save_cache",
           "load_cache"]

