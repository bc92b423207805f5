"""End-to-end parity with TRL 1.16's DPOTrainer: the same tiny model, rows and optimizer settings, a few steps,
and per step the same loss, log-probs, rewards, mean logits and gradient norm, for each loss type of TRL's DPO
family.

Both tools load ONE model directory (a tiny Llama with random weights and tidpo's byte-level tokenizer, written
with save_pretrained) as policy and reference, and train on the same rows file in file order:

  tokens    byte-level tokenizer, no merges, so tokenizing prompt and completion apart (tidpo) or together (TRL)
            gives the same ids; one BOS in front of the prompt (both), one EOS after each response (tidpo appends
            the id, TRL the EOS text, which parses to the same id); no row reaches a length limit, so neither tool
            truncates. `test_both_tools_see_the_same_token_ids` checks every micro-batch, padding included.
  order     TRL: train_sampling_strategy="sequential"; tidpo: data.shuffle=false, data.group_by_length=0,
            data.eval_size=0 (no rows held out). Step k sees rows [k*B*A, (k+1)*B*A) in both.
  layout    right padding, chosen rows then rejected rows, attention mask on the padding (both); tidpo's
            trainer.share_prompt=false (the two-row layout TRL uses), attn_implementation=sdpa in both.
  optimizer torch AdamW (TRL optim="adamw_torch", not the fused default; betas 0.9/0.999, eps 1e-8: tidpo's
            torch defaults), weight decay 0, constant lr without warm-up, gradient clipping at norm 1.0 in both,
            fp32 (TRL bf16=False: its DPOConfig defaults to bf16), no activation checkpointing (TRL's default is
            on), dropout 0 (LlamaConfig's attention_dropout 0; TRL's disable_dropout as well).
  logging   TRL logging_steps=1 and tidpo logger.log_every=1: one row per optimizer step, from the forward
            before that step's update. TRL's row is the MEAN OVER THE STEP'S MICRO-BATCHES of each micro-batch's
            batch mean (its logged loss is the sum of micro-batch losses / gradient_accumulation_steps); tidpo's is
            the mean over the step's pairs. They agree because every micro-batch holds the same number of pairs
            (tidpo drops an incomplete last batch; TRL would not, so the rows file is a whole number of steps);
            not for logits/*, averaged over tokens (see the accumulation case).
            `logps/*` are batch means of summed response log-probs in both; `rewards/*` are beta * summed
            log-ratios in both, whatever the loss (also for IPO, whose loss uses token averages).

Known differences, left out of the table (checked by hand with this file's setup):
  - label smoothing on the sigmoid loss: TRL 1.16's loss_type="sigmoid" ignores label_smoothing (only robust,
    exo_pair, aot and aot_unpaired read it); tidpo's applies it as conservative DPO (cDPO). Same loss at step 1,
    gradient (1 - 2 eps) times TRL's.
  - tidpo's loss=sft with grad accumulation: tidpo divides by the response tokens of the whole step (exact
    accumulation), TRL's "sft" term by each micro-batch's tokens, then averages the micro-batches (tidpo's
    loss=dpo loss.type=sft does as TRL does).

The TRL side runs once per case (module-scope cache), and so does the tidpo side.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import datasets
import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer, PrinterCallback
from transformers.utils import logging as hf_logging
from trl import DPOConfig, DPOTrainer

from helpers import aligned_overrides, compose_config, save_tiny_hf_model
from tidpo_cli.data.batches import BatchStream
from tidpo_cli.data.splits import load_splits
from tidpo_cli.losses import IGNORE_INDEX
from tidpo_cli.modeling import load_tokenizer
from tidpo_cli.trainer import train

STEPS, BATCH, LR, BETA, SEED = 3, 2, 1e-3, 0.1, 0
MAX_LENGTH, MAX_PROMPT_LENGTH = 256, 128  # far above every row: nothing is truncated
RTOL = ATOL = 1e-5
MODEL = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
             max_position_embeddings=MAX_LENGTH, tie_word_embeddings=False, attention_dropout=0.0)
METRICS = ("loss", "logps/chosen", "logps/rejected", "rewards/chosen", "rewards/rejected", "rewards/margins",
           "rewards/accuracies", "logits/chosen", "logits/rejected",
           "grad_norm")

# 12 pairs = 3 steps x 2 pairs x grad accum 2 (the accumulation case); the other cases read the first 6.
# Lengths differ within each pair and across pairs, so every micro-batch is padded.
ROWS = [
    {"prompt": "Copy: a b c\nAnswer:", "chosen": " a b c", "rejected": " a x c"},
    {"prompt": "Name a colour.\nAnswer:", "chosen": " Blue, like the sky.", "rejected": " Seven."},
    {"prompt": "What is 2 + 2?\nAnswer:", "chosen": " 4", "rejected": " It is 5, I think."},
    {"prompt": "Say hello.\nAnswer:", "chosen": " Hello there!", "rejected": " Go away."},
    {"prompt": "Copy: q r s t u\nAnswer:", "chosen": " q r s t u", "rejected": " q r z t"},
    {"prompt": "Spell cat.\nAnswer:", "chosen": " c-a-t", "rejected": " k-a-t-t"},
    {"prompt": "Is ice cold?\nAnswer:", "chosen": " Yes.", "rejected": " No, ice is hot."},
    {"prompt": "Count to three.\nAnswer:", "chosen": " 1, 2, 3", "rejected": " 1, 3"},
    {"prompt": "Reverse: x y z\nAnswer:", "chosen": " z y x", "rejected": " x y z z"},
    {"prompt": "Pick a fruit.\nAnswer:", "chosen": " An apple.", "rejected": " A rock."},
    {"prompt": "Copy: m n\nAnswer:", "chosen": " m n", "rejected": " n m o p"},
    {"prompt": "Finish: good ...\nAnswer:", "chosen": " good morning", "rejected": " bad"},
]

@dataclass(frozen=True)
class Case:
    id: str
    trl: dict                          # DPOConfig fields
    tidpo: tuple[str, ...]             # `tidpo train` overrides
    grad_accum: int = 1
    metrics: tuple[str, ...] = field(default=METRICS)


def dpo_type(name: str, trl_extra: dict | None = None, tidpo_extra: tuple[str, ...] = (), **kw) -> Case:
    """TRL loss_type [name] <-> `loss=dpo loss.type=name`."""
    return Case(kw.pop("id", name), {"loss_type": [name], **(trl_extra or {})},
                ("loss=dpo", f"loss.type={name}", *tidpo_extra), **kw)


CASES = [
    # The presets.
    Case("sigmoid", {"loss_type": ["sigmoid"]}, ("loss=dpo",)),
    Case("ipo", {"loss_type": ["ipo"]}, ("loss=ipo",)),
    # Two micro-batches a step. logits/* left out: tidpo averages them over the step's response tokens, TRL over
    # each micro-batch's tokens and then over the micro-batches (equal pairs per micro-batch, unequal tokens).
    Case("sigmoid_grad_accum", {"loss_type": ["sigmoid"]}, ("loss=dpo",), grad_accum=2,
         metrics=tuple(m for m in METRICS if not m.startswith("logits/"))),
    # TRL's SFT term alone (mean NLL over the chosen tokens of the batch) is tidpo's loss=sft at grad accum 1;
    # tidpo's SFT runs no reference and logs no rewards.
    Case("sft_alone", {"loss_type": ["sft"]}, ("loss=sft",), metrics=("loss", "logps/chosen", "grad_norm")),
    # TRL's whole DPO loss family as `loss=dpo loss.type=NAME`.
    dpo_type("sigmoid", id="type_sigmoid"),
    dpo_type("ipo", id="type_ipo"),
    dpo_type("hinge"),
    dpo_type("robust", {"label_smoothing": 0.1}, ("loss.label_smoothing=0.1",)),
    dpo_type("exo_pair", {"label_smoothing": 1e-3}, ("loss.label_smoothing=0.001",)),  # TRL refuses eps = 0
    dpo_type("nca_pair"),
    dpo_type("bco_pair"),
    dpo_type("sppo_hard"),
    dpo_type("aot", {"label_smoothing": 0.1}, ("loss.label_smoothing=0.1",)),
    dpo_type("aot_unpaired"),
    dpo_type("apo_zero"),
    dpo_type("apo_down"),
    dpo_type("discopop"),  # TRL's default discopop_tau 0.05: tidpo's default must be the same
    dpo_type("discopop", {"discopop_tau": 0.2}, ("loss.discopop_tau=0.2",), id="discopop_tau"),
    dpo_type("sigmoid_norm"),
    dpo_type("sft", id="type_sft"),
    # MPO's combination (TRL's docs example): loss_type list + loss_weights; and a list without weights (all 1).
    Case("mpo", {"loss_type": ["sigmoid", "bco_pair", "sft"], "loss_weights": [0.8, 0.2, 1.0]},
         ("loss=dpo", "loss.type=[sigmoid,bco_pair,sft]", "loss.weights=[0.8,0.2,1.0]")),
    Case("sigmoid_plus_sft", {"loss_type": ["sigmoid", "sft"]}, ("loss=dpo", "loss.type=[sigmoid,sft]")),
]
BY_ID = {c.id: c for c in CASES}
assert len(BY_ID) == len(CASES), "case ids must be unique"


# ---------------------------------------------------------------------------------------------------------------
# Shared, built once per module


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("trl_parity")


@pytest.fixture(scope="module")
def model_dir(work):
    """A tiny Llama (random init, seed 0) and the byte-level tokenizer, as a plain HF model directory."""
    hf_logging.disable_progress_bar()
    return save_tiny_hf_model(work / "model", MODEL, SEED)


@pytest.fixture(scope="module")
def rows_file(work):
    path = work / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return path


def tidpo_overrides(case: Case, model_dir, rows_file) -> list[str]:
    return [*case.tidpo, f"loss.beta={BETA}",
            *aligned_overrides(model_dir, rows_file, max_length=MAX_LENGTH, max_prompt_length=MAX_PROMPT_LENGTH,
                               batch=BATCH, grad_accum=case.grad_accum, steps=STEPS, lr=LR, seed=SEED)]


@pytest.fixture(scope="module")
def tidpo_run(work, model_dir, rows_file):
    """case -> tidpo's metrics.jsonl training rows, one per step (each case trained once per module)."""
    cache: dict[str, list[dict]] = {}

    def run(case: Case) -> list[dict]:
        if case.id not in cache:
            cfg = compose_config(tidpo_overrides(case, model_dir, rows_file))  # UserError: override not accepted
            run_dir = work / "tidpo" / case.id
            run_dir.mkdir(parents=True)
            train(cfg, run_dir)
            rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
            cache[case.id] = [r for r in rows if "loss" in r]
        return cache[case.id]

    return run


def dpo_config(case: Case, output_dir) -> DPOConfig:
    return DPOConfig(
        output_dir=str(output_dir), beta=BETA, max_length=MAX_LENGTH,
        per_device_train_batch_size=BATCH, gradient_accumulation_steps=case.grad_accum, max_steps=STEPS,
        learning_rate=LR, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
        optim="adamw_torch", adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8, max_grad_norm=1.0,
        activation_checkpointing=False, bf16=False, fp16=False, use_cpu=True, disable_dropout=True,
        train_sampling_strategy="sequential", dataloader_num_workers=0,
        eval_strategy="no", save_strategy="no", report_to="none", logging_steps=1, disable_tqdm=True, seed=SEED,
        **case.trl,
    )


class RecordingDPOTrainer(DPOTrainer):
    """DPOTrainer that keeps each micro-batch it trains on (to check the tokens against tidpo's)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.seen: list[dict[str, torch.Tensor]] = []

    def training_step(self, model, inputs, *args, **kwargs):
        self.seen.append({k: inputs[k].detach().cpu().clone()
                          for k in ("input_ids", "attention_mask", "completion_mask")})
        return super().training_step(model, inputs, *args, **kwargs)


@pytest.fixture(scope="module")
def trl_run(work, model_dir):
    """case -> {"logs": TRL's per-step log rows, "seen": its micro-batches} (each case trained once per module)."""
    cache: dict[str, dict] = {}

    datasets.disable_progress_bars()  # TRL's dataset.map calls

    def run(case: Case) -> dict:
        if case.id not in cache:
            load = dict(dtype=torch.float32, attn_implementation="sdpa")
            policy = AutoModelForCausalLM.from_pretrained(model_dir, **load)
            reference = AutoModelForCausalLM.from_pretrained(model_dir, **load)
            tokenizer = AutoTokenizer.from_pretrained(model_dir)
            trainer = RecordingDPOTrainer(
                model=policy, ref_model=reference, args=dpo_config(case, work / "trl" / case.id),
                train_dataset=Dataset.from_list(ROWS), processing_class=tokenizer)
            trainer.remove_callback(PrinterCallback)  # disable_tqdm=True prints every log row otherwise
            trainer.train()
            cache[case.id] = {"logs": [h for h in trainer.state.log_history if "loss" in h], "seen": trainer.seen}
        return cache[case.id]

    return run


# ---------------------------------------------------------------------------------------------------------------
# The comparison


def mismatches(tidpo_rows: list[dict], trl_logs: list[dict], metrics) -> list[str]:
    """Every (step, metric) where the two differ by more than ATOL + RTOL * |TRL's|; also missing steps or names."""
    problems = []
    if len(tidpo_rows) != STEPS or len(trl_logs) != STEPS:
        problems.append(f"steps logged: tidpo {len(tidpo_rows)}, TRL {len(trl_logs)}, expected {STEPS}")
    for step, (ours, theirs) in enumerate(zip(tidpo_rows, trl_logs), start=1):
        for name in metrics:
            if name not in ours or name not in theirs:
                problems.append(f"step {step} {name}: missing in {'tidpo' if name not in ours else 'TRL'}")
                continue
            a, b = float(ours[name]), float(theirs[name])
            if not abs(a - b) <= ATOL + RTOL * abs(b):
                problems.append(f"step {step} {name}: tidpo {a:.8g} vs TRL {b:.8g} (diff {a - b:.3g})")
    return problems


def assert_same(tidpo_rows, trl_logs, metrics):
    problems = mismatches(tidpo_rows, trl_logs, metrics)
    assert not problems, "tidpo and TRL differ:\n  " + "\n  ".join(problems)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_matches_trl(case, tidpo_run, trl_run):
    ours = tidpo_run(case)  # first: overrides tidpo refuses fail here, before TRL spends any time
    assert_same(ours, trl_run(case)["logs"], case.metrics)


def test_the_comparison_catches_another_loss(tidpo_run, trl_run):
    """tidpo's DPO against TRL's hinge loss fails the check above. At step 1 (policy = reference, every reward 0)
    the loss is log 2 against 1 and the gradient exactly half as large; clipping to norm 1 and Adam's m / sqrt(v)
    both remove that scale, so the log-probs and rewards of step 2 still agree to float rounding and part ways only
    at step 3. Hence loss and grad_norm in the comparison: log-probs alone miss a loss off by a constant factor."""
    problems = mismatches(tidpo_run(BY_ID["sigmoid"]), trl_run(BY_ID["hinge"])["logs"], METRICS)
    for expected in ("step 1 loss", "step 1 grad_norm", "step 3 logps/chosen", "step 3 rewards/margins"):
        assert any(p.startswith(expected + ":") for p in problems), (expected, problems)


def test_both_tools_see_the_same_token_ids(model_dir, rows_file, trl_run):
    """Every micro-batch TRL trained on (accumulation case: 6 micro-batches, all 12 rows) is the one tidpo's
    stream gives in that place: the same ids, padding, attention mask and response tokens."""
    case = BY_ID["sigmoid_grad_accum"]
    cfg = compose_config(tidpo_overrides(case, model_dir, rows_file))
    tokenizer = load_tokenizer(cfg.model)
    splits = load_splits(cfg.data, tokenizer, seed=cfg.seed)
    assert len(splits.train) == len(ROWS) and not splits.eval
    assert not any(r.truncated for r in splits.reports.values()), "a row was truncated: raise MAX_LENGTH"
    stream = iter(BatchStream(splits.train, cfg.trainer.micro_batch_size, tokenizer.pad_token_id, seed=cfg.seed,
                              shuffle=cfg.data.shuffle, group_by_length=cfg.data.group_by_length))
    seen = trl_run(case)["seen"]
    assert len(seen) == STEPS * case.grad_accum
    for index, theirs in enumerate(seen):
        ours = next(stream)
        assert torch.equal(ours["input_ids"], theirs["input_ids"]), f"micro-batch {index}: input ids differ"
        assert torch.equal(ours["attention_mask"], theirs["attention_mask"]), f"micro-batch {index}: masks differ"
        assert torch.equal((ours["labels"] != IGNORE_INDEX).long(), theirs["completion_mask"]), \
            f"micro-batch {index}: response tokens differ"
    first = seen[0]["input_ids"][0]
    assert first[0] == tokenizer.bos_token_id and (first == tokenizer.bos_token_id).sum() == 1
    assert (seen[0]["input_ids"] == tokenizer.eos_token_id).sum(dim=1).tolist() == [1] * (2 * BATCH)
