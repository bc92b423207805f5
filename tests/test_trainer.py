"""The training loop, run in-process on the tiny model: exact accumulation, repeatability, the run dir."""

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from helpers import QUICK, compose_config
from tidpo_cli import trainer
from tidpo_cli.data.collate import collate
from tidpo_cli.data.splits import load_splits
from tidpo_cli.modeling import frozen_copy, load_policy, load_tokenizer
from tidpo_cli.objective import TokenIds
from tidpo_cli.trainer import accumulate_gradients, train


def run(tmp_path, name, overrides):
    run_dir = tmp_path / name
    run_dir.mkdir()
    metrics = train(compose_config([*QUICK, *overrides]), run_dir)
    return run_dir, metrics


def checkpointing(model) -> bool:
    """Whether activation checkpointing is on (transformers 5 renamed the flag; the old name warns)."""
    if hasattr(model, "is_activation_checkpointing"):
        return model.is_activation_checkpointing
    return model.is_gradient_checkpointing


def watched_run(tmp_path, name, overrides):
    """`run`, keeping what the loop built and used: `policy` and `optimizer` as built, `references` (every reference
    model the loss was given) with the first one's weights as they were at the first loss (`reference_at_start`),
    the dtypes of the policy forwards' logits, and how often the MLP of the policy's first decoder layer was called
    (inside the layer's forward, which activation checkpointing replays in the backward)."""
    seen = {"references": [], "logits_dtypes": set(), "layer_calls": 0}
    build_optimizer, batch_loss = trainer.build_optimizer, trainer.batch_loss

    def watch_optimizer(policy, trainer_cfg):
        seen["policy"], seen["optimizer"] = policy, build_optimizer(policy, trainer_cfg)
        policy.register_forward_hook(lambda module, args, out: seen["logits_dtypes"].add(out.logits.dtype))
        policy.model.layers[0].mlp.register_forward_pre_hook(  # a pre-hook: a replay may stop inside the MLP
            lambda module, args: seen.__setitem__("layer_calls", seen["layer_calls"] + 1))
        return seen["optimizer"]

    def watch_loss(policy, reference, *args, **kwargs):
        if not seen["references"] and reference is not None:  # SFT runs none
            seen["reference_at_start"] = {k: v.clone() for k, v in reference.state_dict().items()}
        seen["references"].append(reference)
        return batch_loss(policy, reference, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(trainer, "build_optimizer", watch_optimizer)
        mp.setattr(trainer, "batch_loss", watch_loss)
        run_dir, metrics = run(tmp_path, name, overrides)
    return run_dir, metrics, seen


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    """One run with QUICK's settings (fp32, AdamW, no activation checkpointing), read by several tests."""
    return watched_run(tmp_path_factory.mktemp("plain"), "r", [])


def weights(run_dir):
    return load_file(str(run_dir / "final" / "model.safetensors"))


def rows(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("loss", ["dpo", "sft", "tidpo_no_triplet"])
def test_grad_accumulation_gives_the_gradient_of_one_large_batch(loss):
    """Also for TI-DPO: its importance pass between micro-batches must leave the accumulated gradient alone."""
    cfg = compose_config([*QUICK, f"loss={loss}"])
    tokenizer = load_tokenizer(cfg.model)
    pairs = load_splits(cfg.data, tokenizer, seed=0).train[:8]
    torch.manual_seed(0)
    policy = load_policy(cfg.model, tokenizer)
    reference = frozen_copy(policy)
    ids = TokenIds(tokenizer.pad_token_id, tokenizer.eos_token_id, cfg.data.max_length)
    with torch.no_grad():  # make the policy differ from the reference so DPO's gradient is not trivial
        for p in policy.parameters():
            p.add_(0.01 * torch.randn_like(p))

    def grads(groups):
        policy.zero_grad(set_to_none=True)
        accumulate_gradients(policy, reference, [collate(g, tokenizer.pad_token_id) for g in groups], cfg.loss,
                             ids, seed=0)
        return [p.grad.clone() for p in policy.parameters()]

    whole = grads([pairs])
    # Uneven split: the micro-batches hold different numbers of pairs and of response tokens.
    split = grads([pairs[:3], pairs[3:]])
    assert max(g.abs().max().item() for g in whole) > 1e-3
    for a, b in zip(whole, split):  # float32 sums in another order: 1 element of a 16,768-element grad was 2.6e-5 off
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_same_seed_same_run_other_seed_other_run(tmp_path, plain):
    a = plain[0]
    b, _ = run(tmp_path, "b", [])
    c, _ = run(tmp_path, "c", ["seed=1"])
    strip = lambda rs: [{k: v for k, v in r.items() if not k.startswith("perf/")} for r in rs]
    assert strip(rows(a)) == strip(rows(b))
    assert strip(rows(a)) != strip(rows(c))


def test_run_dir_metrics_use_trl_names_and_eval_prefix(tmp_path):
    run_dir, after = run(tmp_path, "r", ["trainer.eval_every=2"])
    logged = rows(run_dir)
    train_rows = [r for r in logged if "loss" in r]
    eval_rows = [r for r in logged if "eval/loss" in r]
    assert [r["step"] for r in train_rows] == [1, 2, 3]
    assert [r["step"] for r in eval_rows] == [0, 2, 3]
    for name in ["loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
                 "logps/chosen", "logps/rejected", "perf/samples_per_s", "perf/tokens_per_s", "lr", "grad_norm"]:
        assert name in train_rows[0], name
    assert set(after) == {k for k in eval_rows[-1] if k != "step"}
    # Before training the policy is the reference: every implicit reward is exactly zero.
    assert eval_rows[0]["eval/rewards/margins"] == 0.0 and eval_rows[0]["eval/rewards/accuracies"] == 0.0


def test_final_model_loads_with_from_pretrained_and_generates(plain):
    run_dir, _, seen = plain
    model = AutoModelForCausalLM.from_pretrained(run_dir / "final")
    trained = seen["policy"].state_dict()
    assert model.state_dict().keys() == trained.keys()
    for name, value in model.state_dict().items():  # final/ holds the weights the loop trained, bit for bit
        assert torch.equal(value, trained[name]), name
    assert any(not torch.equal(trained[name], value) for name, value in seen["reference_at_start"].items())
    tokenizer = AutoTokenizer.from_pretrained(run_dir / "final")
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Copy: a b c d"}], tokenize=False,
                                           add_generation_prompt=True)
    inputs = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
    out = model.generate(**inputs, max_new_tokens=5, do_sample=False)
    assert out.shape[1] > inputs["input_ids"].shape[1]
    assert list((run_dir / "final").glob("*.safetensors"))
    assert not list((run_dir / "final").glob("*.bin"))


def test_reference_stays_fixed_while_policy_moves(plain):
    run_dir, _, seen = plain
    logged = rows(run_dir)
    train_rows = [r for r in logged if "loss" in r]
    # The reward is beta * (policy - reference) log-ratio: it moves away from 0 only if the two differ.
    assert train_rows[0]["rewards/margins"] == 0.0
    assert train_rows[-1]["rewards/margins"] != 0.0
    # One reference throughout, its weights after training those it started with, which are the initial policy's
    # (the random init the run kept in reference/); the policy's are not.
    (reference,) = {id(r): r for r in seen["references"]}.values()
    assert reference is not seen["policy"]
    start, initial = seen["reference_at_start"], load_file(str(run_dir / "reference" / "model.safetensors"))
    assert all(torch.equal(value, start[name]) for name, value in reference.state_dict().items())
    assert all(torch.equal(value, start[name]) for name, value in initial.items())
    assert any(not torch.equal(value, start[name]) for name, value in seen["policy"].state_dict().items())


@pytest.mark.parametrize("overrides", [
    ["trainer.precision=bf16"],
    ["trainer.optimizer=rmsprop", "trainer.schedule=linear"],
    ["trainer.gradient_checkpointing=true", "trainer.schedule=constant"],
    ["loss=sft"],
    ["trainer.max_steps=null", "trainer.epochs=0.25"],
])
def test_loop_options_train_to_finite_losses(tmp_path, overrides, plain):
    run_dir, after, seen = watched_run(tmp_path, "r", overrides)
    train_rows = [r for r in rows(run_dir) if "loss" in r]
    assert train_rows and all(torch.isfinite(torch.tensor(r["loss"])) for r in train_rows)
    assert torch.isfinite(torch.tensor(after["eval/loss"]))
    cfg = compose_config([*QUICK, *overrides]).trainer
    expected = {"adamw": torch.optim.AdamW, "rmsprop": torch.optim.RMSprop}[cfg.optimizer]
    assert type(seen["optimizer"]) is expected
    assert checkpointing(seen["policy"]) == cfg.gradient_checkpointing
    # bf16: the policy's forwards ran under bf16 autocast (the weights stay fp32), so its numbers are not fp32's.
    assert (torch.bfloat16 in seen["logits_dtypes"]) == (cfg.precision == "bf16")
    assert next(seen["policy"].parameters()).dtype == torch.float32
    if cfg.precision == "bf16":
        fp32_rows = [r for r in rows(plain[0]) if "loss" in r]
        assert train_rows[0]["logps/chosen"] != fp32_rows[0]["logps/chosen"]
        assert [r["loss"] for r in train_rows] != [r["loss"] for r in fp32_rows]
        assert [r["loss"] for r in train_rows] == pytest.approx([r["loss"] for r in fp32_rows], rel=0.05)


def test_epochs_set_the_number_of_steps(tmp_path):
    # 96 + 16 synthetic rows, 16 held out -> 96 train pairs; micro 8 -> 12 batches an epoch; 0.5 epoch = 6
    run_dir, _ = run(tmp_path, "r", ["trainer.max_steps=null", "trainer.epochs=0.5"])
    assert [r["step"] for r in rows(run_dir) if "loss" in r] == [1, 2, 3, 4, 5, 6]


def test_gradient_checkpointing_gives_the_same_losses(tmp_path, plain):
    plain_dir, _, plain_seen = plain
    ckpt, _, ckpt_seen = watched_run(tmp_path, "ckpt", ["trainer.gradient_checkpointing=true"])
    assert [r.get("loss") for r in rows(plain_dir)] == pytest.approx([r.get("loss") for r in rows(ckpt)], abs=1e-5)
    assert checkpointing(ckpt_seen["policy"]) and not checkpointing(plain_seen["policy"])
    # Checkpointing replays each training forward's layers in the backward: the first layer's MLP runs once more
    # per training forward; the evaluations and anchor sampling (no gradient) run alike.
    assert ckpt_seen["layer_calls"] >= plain_seen["layer_calls"] + 3
