"""`tidpo eval`: score a trained model on preference pairs against its reference; write eval.json and eval.md.

The config is the run's own (its `.hydra/overrides.yaml` composed again) with the command line's overrides on
top, so `tidpo eval RUN` scores the run's held-out pairs with its loss and beta, and `data=...` or
`loss.beta=...` change what is scored. A model outside a run has no run config, so its command line must name the
data (`data=OPTION` or `data.KEY=VALUE`) rather than score the default config's synthetic demo task. The numbers
are those of training's held-out evaluation (`trainer.evaluate`: TRL's metric names, no anchors), plus per-token
mean log-probs; with `--samples N`, also the samples' diversity (`samples/*`, defined in `diversity.DEFINITIONS`).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from contextlib import nullcontext
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from .anchors import generate
from .cli import compose_config
from .data.examples import TokenizedPair
from .data.splits import load_splits
from .diversity import DEFINITIONS, distinct_n, self_bleu, token_entropy
from .errors import CommandLineParser, UserError
from .modeling import pick_device
from .objective import TokenIds
from .loss_specs import needs_reference, reference_cacheable
from .outputs import claim_output, write_files
from .trained import Trained, load_hf, load_trained, locate, reference_source

OUTPUTS = ("eval.json", "eval.md")
TABLE = ("rewards/accuracies", "rewards/margins", "rewards/chosen", "rewards/rejected", "logps/chosen",
         "logps/rejected", "logps/chosen_per_token", "logps/rejected_per_token", "loss")


def build_parser() -> argparse.ArgumentParser:
    parser = CommandLineParser(
        prog="tidpo eval",
        description="Preference accuracy, reward margins and log-probs of a trained model on a split, against "
                    "the reference model its run used; optional sample generations. Writes eval.json and eval.md.",
        epilog="MODEL is a run directory (its final/ model), RUN/checkpoints/step-N, or an HF model directory. "
               "OVERRIDES are `tidpo train` overrides (data=hh_rlhf data.path=FILE, loss=dpo, loss.beta=0.05, "
               "trainer.eval_batch_size=8, ...) applied on top of the run's own config.",
    )
    parser.add_argument("model", metavar="MODEL", help="run directory, checkpoint, or HF model directory")
    parser.add_argument("overrides", nargs="*", metavar="OVERRIDE", help="GROUP=OPTION or KEY=VALUE")
    parser.add_argument("--reference", metavar="PATH",
                        help="reference model (HF directory or hub name); default: the one the run used")
    parser.add_argument("--split", choices=("eval", "train"), default="eval",
                        help="the held-out pairs (default) or the training pairs of the data config")
    parser.add_argument("--max-pairs", type=int, metavar="N", help="score only the first N pairs of the split")
    parser.add_argument("--samples", type=int, default=0, metavar="N",
                        help="generate N responses per prompt from the model (default 0)")
    parser.add_argument("--sample-prompts", type=int, default=4, metavar="K",
                        help="... for the first K prompts of the split (default 4)")
    parser.add_argument("--max-new-tokens", type=int, default=128, help="sample length limit (default 128)")
    parser.add_argument("--temperature", type=float, default=0.7, help="sampling temperature (default 0.7)")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    parser.add_argument("--out", metavar="DIR", help="output directory (default: RUN/eval, else ./eval)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace eval.json and eval.md in --out DIR (the default folder is always rewritten)")
    parser.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda, cuda:1, ...")
    return parser


def eval_main(argv: list[str]) -> None:
    args = build_parser().parse_intermixed_args(argv)
    for flag in ("max_pairs", "samples", "sample_prompts", "max_new_tokens"):
        value = getattr(args, flag)
        if value is not None and value < (0 if flag == "samples" else 1):
            raise UserError(f"--{flag.replace('_', '-')} must be at least {0 if flag == 'samples' else 1}, got {value}")
    if not (args.temperature > 0 and math.isfinite(args.temperature)):
        raise UserError(f"--temperature must be a positive number, got {args.temperature:g}")

    _, _, run_dir = locate(args.model)
    if run_dir is None and not picks_data(args.overrides):
        raise UserError(f"'{args.model}' is not inside a tidpo run, so there is no run config to say which pairs to "
                        "score: give the data, e.g. data=preference data.path=pairs.jsonl, data=hh_rlhf "
                        "data.path=FILE, or data=synthetic (the demo task)"
                        + ("; and the reference model with --reference PATH" if args.reference is None else ""))
    cfg = compose_config(combined_overrides(run_overrides(run_dir), args.overrides))  # stops before loading
    out = Path(args.out).expanduser() if args.out else (run_dir / "eval" if run_dir else Path("eval"))
    claim_output(out, OUTPUTS, given=args.out is not None, overwrite=args.overwrite)
    device = pick_device(args.device, key="--device")
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) \
        if cfg.trainer.precision == "bf16" else nullcontext
    trained = load_trained(args.model, device)
    reference, reference_name = (load_reference(args.reference, trained, device) if needs_reference(cfg.loss)
                                 else (None, f"none ({cfg.loss.name} is reference-free)"))

    splits = load_splits(cfg.data, trained.tokenizer, seed=cfg.seed, held_out_only=args.split == "eval")
    pairs = splits.eval if args.split == "eval" else splits.train
    if not pairs:
        raise UserError(f"the {args.split} split of this data config has no pairs: set data.eval_path=FILE (or "
                        "data.eval_size > 0), or use --split train")
    pairs = pairs[: args.max_pairs] if args.max_pairs else pairs
    ids = TokenIds(pad=trained.tokenizer.pad_token_id, eos=trained.tokenizer.eos_token_id,
                   max_length=cfg.data.max_length)

    from .trainer import evaluate  # the same held-out evaluation training runs

    print(f"model {trained.source}; reference {reference_name}; {len(pairs)} {args.split} pairs; "
          f"loss {cfg.loss.name} (beta {cfg.loss.beta:g})", file=sys.stderr)
    cache = run_reference_cache(cfg, run_dir, reference, pairs, ids, device, autocast, trained.model)
    metrics = {k.removeprefix("eval/"): v for k, v in
               evaluate(trained.model, reference, pairs, cfg, ids, device, autocast, cache=cache).items()}
    metrics.update(per_token_logps(metrics, pairs))
    samples, diversity = sample_generations(trained, pairs, args) if args.samples else ([], {})
    undefined = [name for name in DEFINITIONS if args.samples and name not in diversity]
    if undefined:
        print(f"left out {', '.join(undefined)}: not defined on these samples (Self-BLEU needs 2 samples a prompt, "
              "Distinct-n samples of n words or more)", file=sys.stderr)
    metrics.update(diversity)

    report = {
        "model": str(trained.source), "reference": reference_name, "run_dir": str(run_dir) if run_dir else None,
        "split": args.split, "pairs": len(pairs), "data": data_description(cfg.data),
        "loss": OmegaConf.to_container(cfg.loss, resolve=True), "overrides": list(args.overrides),
        "metrics": metrics, "definitions": {k: v for k, v in DEFINITIONS.items() if k in metrics},
        "samples": samples,
    }
    write_report(report, out)


def run_overrides(run_dir: Path | None) -> list[str]:
    """What the run's user typed (`.hydra/overrides.yaml`), without Hydra's own settings: composing them again
    gives the run's config."""
    path = run_dir / ".hydra" / "overrides.yaml" if run_dir else None
    if path is None or not path.is_file():
        return []
    return [o for o in OmegaConf.load(path) if not str(o).lstrip("+~").startswith(("hydra.", "hydra/"))]


def picks_data(overrides: list[str]) -> bool:
    """Whether the command line says which data to score: `data=OPTION` or any `data.KEY=VALUE`. Without a run's
    config the default would be the demo's synthetic task, which is rarely what a model from elsewhere is for."""
    keys = {o.split("=", 1)[0].lstrip("+~") for o in overrides if "=" in o}
    return any(k == "data" or k.startswith("data.") for k in keys)


def combined_overrides(run: list[str], given: list[str]) -> list[str]:
    """The run's overrides, then the given ones. A group the command line picks anew (`data=hh_rlhf`) drops the
    run's settings of that group, which belonged to the option it replaces."""
    def key(override: str) -> str:
        return override.split("=", 1)[0].lstrip("+~")

    groups = {key(o) for o in given if "=" in o and "." not in key(o)}
    kept = [o for o in run if key(o) not in groups and key(o).split(".", 1)[0] not in groups]
    return kept + list(given)


def load_reference(given: str | None, trained: Trained, device: torch.device):
    """(reference model, its name): `--reference`, else the reference the run used."""
    source = given or reference_source(trained)
    if source is None:
        raise UserError(f"the reference model of {trained.source} is not known (it is not inside a tidpo run "
                        "directory): give it with --reference PATH_OR_HUB_NAME (usually the model you started from)")
    model, _ = load_hf(source, device)
    return model, str(source)


def cache_root(setting: str, run_dir: Path) -> Path | None:
    """Where the run's `trainer.reference_cache` is, if anywhere: a directory given; `auto`'s `reference_cache/` in
    the run directory or, for a job of a sweep, in the sweep's directory above it (Hydra's subdir is one level
    unless set otherwise; a cache not found is no error: the reference then runs). `off` and a DIR as training
    reads them (reference_cache.cache_dir)."""
    from .reference_cache import cache_dir

    if setting != "auto":
        return cache_dir(setting, run_dir)
    return next((d for d in (run_dir / "reference_cache", run_dir.parent / "reference_cache") if d.is_dir()), None)


def run_reference_cache(cfg: DictConfig, run_dir: Path | None, reference, pairs: list, ids: TokenIds, device,
                        autocast, policy):
    """The run's reference cache, holding every sequence of `pairs` (those it lacked scored now and written, so
    the next evaluation reads them), or None: no run, the cache off, a loss it cannot serve (no reference, TDPO's
    KL). Keyed as training keys it (reference_cache.cache_key) for this process: no DeepSpeed, this device."""
    from .distributed import Dist
    from .layout import share_prompt
    from .reference_cache import ReferenceCache, cache_key, fill, model_fingerprint

    root = cache_root(cfg.trainer.reference_cache, run_dir) if run_dir is not None else None
    if root is None or reference is None or not reference_cacheable(cfg.loss):
        return None
    plain = OmegaConf.merge(cfg, {"deepspeed": {"enabled": False}})  # eval runs without DeepSpeed
    cache = ReferenceCache(root, cache_key(plain, model_fingerprint(reference), device))
    found, computed = fill(cache, reference, pairs, batch_size=cfg.trainer.eval_batch_size, pad_id=ids.pad,
                           share_prompt=share_prompt(cfg, policy, device), device=device, autocast=autocast,
                           dist=Dist(device=device))
    print(f"reference cache {cache.folder}: {found} sequences read, {computed} computed", file=sys.stderr)
    return cache


def per_token_logps(metrics: dict[str, float], pairs: list[TokenizedPair]) -> dict[str, float]:
    """Mean log-prob per response token, from the per-pair sums and the pairs' response lengths."""
    out = {}
    for side, lengths in (("chosen", [len(p.chosen_ids) for p in pairs]),
                          ("rejected", [len(p.rejected_ids) for p in pairs])):
        if f"logps/{side}" in metrics:
            out[f"logps/{side}_per_token"] = metrics[f"logps/{side}"] * len(pairs) / max(1, sum(lengths))
    return out


def sample_generations(trained: Trained, pairs: list[TokenizedPair],
                       args: argparse.Namespace) -> tuple[list[dict], dict[str, float]]:
    """`--samples` responses for each of the first `--sample-prompts` prompts, with the pair's own responses; and
    the samples' diversity metrics (`diversity_metrics`)."""
    tokenizer, device = trained.tokenizer, next(trained.model.parameters()).device
    chosen = pairs[: args.sample_prompts]
    contexts = [torch.tensor(p.prompt_ids, device=device) for p in chosen for _ in range(args.samples)]
    outputs = generate(trained.model, contexts, pad_id=tokenizer.pad_token_id, eos_id=tokenizer.eos_token_id,
                       max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=0, top_p=1.0,
                       seed=args.seed)

    def text(ids) -> str:
        return tokenizer.decode(list(ids), skip_special_tokens=True)

    items = [{"where": p.where, "prompt": text(p.prompt_ids), "chosen": text(p.chosen_ids),
              "rejected": text(p.rejected_ids),
              "samples": [text(o) for o in outputs[i * args.samples:(i + 1) * args.samples]]}
             for i, p in enumerate(chosen)]
    entropy = sample_entropy(trained.model, contexts, outputs)
    return items, diversity_metrics([item["samples"] for item in items], entropy)


def sample_entropy(model, contexts: list[torch.Tensor], continuations: list[torch.Tensor]) -> float:
    """The policy's mean per-token entropy (nats) on its samples: each context + continuation run through the model
    alone (no padding, dropout off, no grad), and `token_entropy` of the logits at the positions that predict the
    continuation's tokens, averaged over all those tokens. `generate` cuts a continuation after its first EOS, so
    the EOS it sampled counts and nothing after it exists."""
    was_training, total, count = model.training, 0.0, 0
    model.eval()
    try:
        with torch.no_grad():
            for context, continuation in zip(contexts, continuations):
                ids = torch.cat([context, continuation.to(context.device)])[None]
                logits = model(input_ids=ids).logits[0, len(context) - 1:-1]
                total, count = total + float(token_entropy(logits).sum()), count + len(continuation)
    finally:
        model.train(was_training)
    return total / max(1, count)


def diversity_metrics(groups: list[list[str]], entropy: float) -> dict[str, float]:
    """`samples/distinct_2` and `samples/distinct_4` over all samples pooled, `samples/self_bleu` among each
    prompt's samples, and `samples/entropy` (see DEFINITIONS); a metric the samples leave undefined (no sample of
    n words, one sample a prompt) is left out."""
    pooled = [s for group in groups for s in group]
    values = {"samples/distinct_2": distinct_n(pooled, 2), "samples/distinct_4": distinct_n(pooled, 4),
              "samples/self_bleu": self_bleu(groups), "samples/entropy": entropy}
    return {name: value for name, value in values.items() if value is not None}


def data_description(data_cfg: DictConfig) -> dict:
    keys = ("format", "path", "split", "eval_path", "eval_split", "eval_size", "max_length", "max_prompt_length")
    return {k: data_cfg[k] for k in keys}


def render_markdown(report: dict) -> str:
    loss = report["loss"]
    lines = [
        "# tidpo eval", "",
        f"- model: `{report['model']}`",
        f"- reference: `{report['reference']}`",
        f"- data: {report['pairs']} pairs of the {report['split']} split of "
        f"`{report['data']['eval_path'] or report['data']['path'] or report['data']['format']}`",
        f"- loss: `{loss['name']}`, beta {loss['beta']:g}"
        + (" (rewards use the importance-weighted margins)" if loss["name"] == "tidpo" else ""),
        "", "| metric | value |", "|---|---:|",
    ]
    metrics, definitions = report["metrics"], report.get("definitions", {})
    names = [n for n in TABLE if n in metrics] + sorted(n for n in metrics if n not in TABLE and n not in definitions)
    lines += [f"| {name} | {metrics[name]:.4f} |" for name in names]
    if definitions:
        lines += ["", f"Diversity of the {sum(len(item['samples']) for item in report['samples'])} samples:", "",
                  "| metric | value | definition |", "|---|---:|---|"]
        lines += [f"| {name} | {metrics[name]:.4f} | {text} |" for name, text in definitions.items()]
    for i, item in enumerate(report["samples"]):
        lines += ["", f"## Samples for prompt {i + 1} ({item['where']})", "", "Prompt:", "", _quoted(item["prompt"]),
                  "", "Chosen:", "", _quoted(item["chosen"]), "", "Rejected:", "", _quoted(item["rejected"])]
        for j, sample in enumerate(item["samples"]):
            lines += ["", f"Sample {j + 1}:", "", _quoted(sample)]
    return "\n".join(lines) + "\n"


def _quoted(text: str) -> str:
    return "\n".join("    " + line for line in (text or "(empty)").splitlines() or [""])


def write_report(report: dict, out: Path) -> None:
    table = render_markdown(report)
    text = json.dumps(report, indent=1, ensure_ascii=False) + "\n"
    writers = {"eval.json": lambda path: path.write_text(text, encoding="utf-8"),
               "eval.md": lambda path: path.write_text(table, encoding="utf-8")}
    paths = write_files(out, writers, "the eval report", "tidpo eval")
    print(table.split("\n## ")[0].rstrip())
    print("\n" + "\n".join(f"wrote {path}" for path in paths))
