"""LoRA through PEFT: the reference is the base (adapter off), only adapters train, checkpoints hold the adapters
alone and resume exactly, and final/ is a merged model that loads without PEFT."""

import json

import pytest
import torch
from omegaconf import OmegaConf
from safetensors import safe_open

from helpers import QUICK, REPO, compose_config
from tidpo_cli.errors import UserError
from tidpo_cli.modeling import build_tiny_llama, with_reference
from tidpo_cli.objective import TokenIds
from tidpo_cli.tokenizer import build_byte_tokenizer
from tidpo_cli.trainer import accumulate_gradients, train

LORA = OmegaConf.create({"enabled": True, "r": 4, "alpha": 8, "dropout": 0.0, "target_modules": "all-linear"})
SIZE = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4)


def tiny(seed=0):
    torch.manual_seed(seed)
    return build_tiny_llama(SIZE, build_byte_tokenizer())


def preference_batch(seed=1):
    """Two pairs (chosen rows first) with the response after 4 prompt tokens; shapes as collate makes them."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 250, (4, 10), generator=g)
    labels = ids.clone()
    labels[:, :4] = -100
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels,
            "prompt_lengths": torch.full((4,), 4)}


@pytest.mark.parametrize("loss", ["dpo", "tidpo"])
def test_reference_is_the_base_model_and_only_adapters_train(loss):
    base = tiny()
    original = {n: p.detach().clone() for n, p in base.named_parameters()}
    batch = preference_batch()
    with torch.no_grad():
        base_logits = base(input_ids=batch["input_ids"]).logits
    policy, reference, peft_model = with_reference(base, OmegaConf.create({"lora": LORA}))
    trainable = {n for n, p in policy.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)

    cfg = compose_config([f"loss={loss}", "loss.anchor.max_new_tokens=4"])
    optimizer = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=0.05)
    for step in range(3):
        accumulate_gradients(policy, reference, [batch], cfg.loss, TokenIds(pad=256, eos=258, max_length=16),
                             seed=step)
        optimizer.step()
        optimizer.zero_grad()

    with torch.no_grad():
        ref_logits = reference(input_ids=batch["input_ids"]).logits
        policy_logits = policy(input_ids=batch["input_ids"]).logits
    assert torch.equal(ref_logits, base_logits)          # adapter off == the model we started from
    assert not torch.allclose(policy_logits, base_logits)  # and the adapter did learn something
    for name, p in policy.named_parameters():
        if name not in trainable:
            key = name.replace(".base_layer", "")
            assert torch.equal(p, original[key]), name   # no base weight moved
    assert policy.training  # the reference call restores the policy's mode


def lora_run(tmp_path, name, steps, extra=()):
    cfg = compose_config([*QUICK, "model.lora.enabled=true", "model.lora.r=4", "model.lora.dropout=0.0",
                          f"trainer.max_steps={steps}", "trainer.save_every=3", "trainer.keep_last=null",
                          "trainer.lr=1e-2", "trainer.schedule=constant", "trainer.warmup_steps=0", *extra])
    run_dir = tmp_path / name
    train(cfg, run_dir)
    return run_dir


def test_lora_checkpoint_holds_adapters_resumes_exactly_and_final_is_merged(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    whole = lora_run(tmp_path, "whole", 6)
    part = lora_run(tmp_path, "part", 3)
    resumed = lora_run(tmp_path, "part", 6)  # same run dir, more steps: resumes from step 3
    assert resumed == part

    with safe_open(str(part / "checkpoints" / "step-3" / "model.safetensors"), "pt") as f:
        names = list(f.keys())
    assert names and all("lora_" in n for n in names)  # the frozen base is not copied into checkpoints

    rows = lambda run: [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses = lambda run: [(r["step"], r["loss"]) for r in rows(run) if "loss" in r and "eval/loss" not in r]
    assert [s for s, _ in losses(part)] == [1, 2, 3, 4, 5, 6]
    for (_, a), (_, b) in zip(losses(part), losses(whole)):
        assert a == pytest.approx(b, abs=1e-6)

    final = AutoModelForCausalLM.from_pretrained(whole / "final")
    assert not any("lora" in n for n, _ in final.named_parameters())  # merged: loads without PEFT
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(whole / "reference"), whole / "adapter")
    x = torch.tensor([[257, 65, 66, 67, 10]])
    with torch.no_grad():
        merged, adapted = final(x).logits, reloaded(x).logits
        base = AutoModelForCausalLM.from_pretrained(whole / "reference")(x).logits
    assert torch.allclose(merged, adapted, atol=1e-5)
    assert not torch.allclose(merged, base, atol=1e-4)
    resumed_final = AutoModelForCausalLM.from_pretrained(part / "final")
    with torch.no_grad():
        assert torch.allclose(resumed_final(x).logits, merged, atol=1e-6)


def test_bad_lora_settings_are_one_line():
    with pytest.raises(UserError, match=r"model.lora.r=0 .*> 0"):
        compose_config(["model.lora.r=0"])
    with pytest.raises(UserError, match="model.lora.target_modules"):
        compose_config(["model.lora.target_modules=[]"])
    policy = tiny()
    bad = OmegaConf.merge(LORA, {"target_modules": ["no_such_proj"]})
    with pytest.raises(UserError, match="no_such_proj"):
        with_reference(policy, OmegaConf.create({"lora": bad}))


LOSS_PRESETS = sorted(p.stem for p in (REPO / "conf" / "loss").glob("*.yaml") if p.stem != "base")


@pytest.mark.parametrize("preset", LOSS_PRESETS)
def test_every_loss_preset_trains_its_adapters(preset):
    """Two LoRA steps of every loss: finite, the adapters move and no base weight does; the reference-free losses
    get no reference (not even the adapter-off view). tis_dpo's weights ride in the batch as the pairs give them."""
    from tidpo_cli.loss_specs import needs_reference

    base = tiny()
    original = {n: p.detach().clone() for n, p in base.named_parameters()}
    extra = ["loss.tis.positive_model=p", "loss.tis.negative_model=n"] if preset == "tis_dpo" else []
    cfg = compose_config([f"loss={preset}", "loss.anchor.max_new_tokens=4", *extra])
    policy, reference, _ = with_reference(base, OmegaConf.create({"lora": LORA}), reference=needs_reference(cfg.loss))
    assert (reference is None) == (preset in ("simpo", "cpo", "orpo", "tpo", "sft"))
    batch = preference_batch()
    if preset == "tis_dpo":
        batch["token_weights"] = (batch["labels"] != -100).float() * 1.3
    adapters = [p for p in policy.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in adapters]
    optimizer = torch.optim.AdamW(adapters, lr=0.05)
    for step in range(2):
        sums = accumulate_gradients(policy, reference, [batch], cfg.loss, TokenIds(pad=256, eos=258, max_length=16),
                                    seed=step)
        assert torch.isfinite(torch.tensor(sums.means()["loss"]))
        optimizer.step()
        optimizer.zero_grad()
    assert any(not torch.equal(a, b) for a, b in zip(adapters, before))
    trainable = {n for n, p in policy.named_parameters() if p.requires_grad}
    for name, p in policy.named_parameters():
        if name not in trainable:
            assert torch.equal(p, original[name.replace(".base_layer", "")]), name
