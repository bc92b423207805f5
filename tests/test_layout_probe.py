"""trainer.share_prompt=auto: the two batch layouts timed on the first micro-batch, the faster kept for the run."""

import copy
import json
import logging
import random
from contextlib import nullcontext

import numpy as np
import pytest
import torch

from helpers import QUICK, compose_config
from tidpo_cli import layout, trainer
from tidpo_cli.data.batches import BatchStream
from tidpo_cli.data.collate import collate
from tidpo_cli.data.splits import load_splits
from tidpo_cli.distributed import Dist
from tidpo_cli.errors import UserError
from tidpo_cli.modeling import load_policy, load_tokenizer
from tidpo_cli.objective import forward
from tidpo_cli.packing import is_packed
from tidpo_cli.layout import time_layouts
from tidpo_cli.manifest import write_manifest

AUTO = "trainer.share_prompt=auto"


def policy_and_stream(overrides=()):
    cfg = compose_config([*QUICK, AUTO, *overrides])
    tokenizer = load_tokenizer(cfg.model)
    pairs = load_splits(cfg.data, tokenizer, seed=0).train
    torch.manual_seed(0)
    policy = load_policy(cfg.model, tokenizer)
    stream = BatchStream(pairs, cfg.trainer.micro_batch_size, tokenizer.pad_token_id, seed=0)
    return cfg, policy, stream


def random_states():
    return random.getstate(), np.random.get_state()[1].tolist(), torch.get_rng_state()


def draw(*args) -> None:
    """A forward hook that draws from the global stream, as dropout would (None: the output stands)."""
    torch.rand(1)


def test_the_probe_leaves_weights_gradients_optimizer_and_random_streams_alone():
    cfg, policy, stream = policy_and_stream()
    policy.train()
    policy.model.register_forward_hook(draw)
    pairs = stream.peek()
    batches = [collate(pairs, stream.pad_id, share_prompt=share) for share in (False, True)]
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-3)
    forward(policy, batches[0])[1].sum().backward()  # a step in progress: gradients and optimizer state
    optimizer.step()
    forward(policy, batches[0])[1].sum().backward()
    before = ([p.detach().clone() for p in policy.parameters()], [p.grad.clone() for p in policy.parameters()],
              copy.deepcopy(optimizer.state_dict()), random_states())
    times = time_layouts(policy, *batches)
    assert len(times) == 2 and all(t > 0 for t in times)
    weights, grads, state, streams = before
    for p, w, g in zip(policy.parameters(), weights, grads):
        assert torch.equal(p, w) and torch.equal(p.grad, g)
    assert repr(optimizer.state_dict()) == repr(state)
    assert random_states()[:2] == streams[:2] and torch.equal(random_states()[2], streams[2])
    assert stream.position == 0  # peeking took nothing from the stream


def layouts_trained(monkeypatch):
    """Records, for each micro-batch the loop scores, whether it came packed."""
    seen = []
    real = trainer.batch_loss

    def spy(policy, reference, batch, *args, **kwargs):
        seen.append(is_packed(batch))
        return real(policy, reference, batch, *args, **kwargs)

    monkeypatch.setattr(trainer, "batch_loss", spy)
    return seen


def test_auto_keeps_the_faster_layout_logs_and_stores_it_and_a_resume_reuses_it(tmp_path, monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger="tidpo")
    seen = layouts_trained(monkeypatch)
    trainer.train(compose_config([*QUICK, AUTO, "loss=dpo"]), tmp_path)
    timed = [r.getMessage() for r in caplog.records if "trainer.share_prompt=auto" in r.getMessage()]
    assert len(timed) == 1 and "with one row per response" in timed[0], timed
    chosen = timed[0].endswith(": the prompt shared")
    assert set(seen) == {chosen}  # every training and evaluation batch
    state = json.loads((tmp_path / "checkpoints" / "step-3" / "state.json").read_text())
    assert state["share_prompt"] is chosen

    # The resumed run does not time again: it trains in the layout of the run it continues.
    (tmp_path / "checkpoints" / "step-3" / "state.json").write_text(json.dumps({**state, "share_prompt": not chosen}))
    write_manifest(tmp_path / "checkpoints" / "step-3", 0, 1)  # sealed again: an edit is otherwise a damaged file
    monkeypatch.setattr(layout, "time_layouts", lambda *args, **kwargs: pytest.fail("timed again on resume"))
    caplog.clear()
    seen.clear()
    trainer.train(compose_config([*QUICK, AUTO, "loss=dpo", "trainer.max_steps=5"]), tmp_path)
    assert set(seen) == {not chosen}
    assert any("as in the run resumed" in r.getMessage() for r in caplog.records)
    state = json.loads((tmp_path / "checkpoints" / "step-5" / "state.json").read_text())
    assert state["share_prompt"] is (not chosen)


@pytest.mark.parametrize("times, expected", [((2.0, 1.0), True), ((1.0, 2.0), False)])
def test_auto_keeps_the_layout_that_took_less_time(monkeypatch, times, expected):
    cfg, policy, stream = policy_and_stream(["loss=dpo"])
    monkeypatch.setattr(layout, "time_layouts", lambda *args, **kwargs: times)
    assert layout.training_layout(cfg, policy, stream, torch.device("cpu"), nullcontext, Dist(), None) is expected


class OtherRank(Dist):
    """Rank 1 of 2, whose all-reduce brings rank 0's finding: shared."""

    def sum(self, values):
        return [values[0] + 1.0]


def test_every_rank_takes_rank_0s_choice_and_only_rank_0_times(monkeypatch):
    cfg, policy, stream = policy_and_stream(["loss=dpo"])
    monkeypatch.setattr(layout, "time_layouts", lambda *args, **kwargs: pytest.fail("rank 1 timed"))
    assert layout.training_layout(cfg, policy, stream, torch.device("cpu"), torch.no_grad,
                                   OtherRank(rank=1, world=2), None) is True


@pytest.mark.parametrize("overrides", [["loss=sft"], ["loss=tidpo_code"]])  # nothing to share / a blocker
def test_auto_does_not_time_where_sharing_is_blocked(monkeypatch, overrides):
    cfg, policy, stream = policy_and_stream(overrides)
    monkeypatch.setattr(layout, "time_layouts", lambda *args, **kwargs: pytest.fail("timed"))
    assert layout.training_layout(cfg, policy, stream, torch.device("cpu"), nullcontext, Dist(), None) is False


def test_a_probe_out_of_gpu_memory_keeps_one_row_per_response(monkeypatch, caplog):
    cfg, policy, stream = policy_and_stream(["loss=dpo"])

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(layout, "time_layouts", out_of_memory)
    assert layout.training_layout(cfg, policy, stream, torch.device("cpu"), nullcontext, Dist(), None) is False
    assert "ran out of GPU memory" in caplog.text


@pytest.mark.parametrize("device, expected", [("cpu", True), ("cuda", False)])
def test_a_checkpoint_from_before_the_probe_resumes_in_the_layout_auto_then_gave(tmp_path, monkeypatch, device,
                                                                                 expected):
    cfg, policy, stream = policy_and_stream(["loss=dpo"])
    (tmp_path / "state.json").write_text(json.dumps({"step": 3, "epoch": 0, "position": 24}))
    monkeypatch.setattr(layout, "time_layouts", lambda *args, **kwargs: pytest.fail("timed on resume"))
    assert layout.training_layout(cfg, policy, stream, torch.device(device), nullcontext, Dist(),
                                   tmp_path) is expected


def test_flex_attention_does_not_train_on_the_cpu():
    cfg = compose_config([*QUICK, "model.attn_implementation=flex_attention"])
    with pytest.raises(UserError, match="model.attn_implementation=flex_attention cannot train on the cpu"):
        layout.check_attention(cfg, torch.device("cpu"))
    layout.check_attention(cfg, torch.device("cuda"))
