"""trainer.reference_cache and model.reference: the reference's log-probs computed once and read back (the same
losses cold, warm and off; no reference forward where the cache holds them), keyed so that a stale or foreign
cache is never read, filled by two processes at once; a reference other than the starting policy."""

from __future__ import annotations

import gc
import json
import logging
import subprocess
import sys
import textwrap
import weakref
from pathlib import Path

import numpy as np
import pytest
import torch
import xxhash

from helpers import QUICK, compose_config, run_tidpo, save_tiny_hf_model
from tidpo_cli import trainer
from tidpo_cli.config import validate
from tidpo_cli.data.examples import TokenizedPair
from tidpo_cli.errors import UserError
from tidpo_cli.reference_cache import (ReferenceCache, cache_key, fill, model_fingerprint, sequence_key,
                                      weights_fingerprint)
from tidpo_cli.trainer import train

TINY = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 4, "max_position_embeddings": 128}
COMPARED = ("loss", "grad_norm", "rewards/margins", "logps/chosen", "triplet/loss")


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def counted_run(run_dir: Path, overrides: list[str], base: list[str] = QUICK) -> dict:
    """`tidpo train` in this process, counting the rows every reference forward was given; the log lines go to
    `RUN_DIR.log` beside it."""
    seen = {"forwards": 0, "rows": 0}
    handler = logging.FileHandler(run_dir.parent / f"{run_dir.name}.log")
    logger = logging.getLogger("tidpo")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    shard_reference, accumulate = trainer.shard_reference, trainer.accumulate_gradients

    def watch(reference, cfg, dist):
        reference = shard_reference(reference, cfg, dist)
        seen["reference"] = weakref.ref(reference)

        def count(module, args, kwargs):
            seen["forwards"] += 1
            seen["rows"] += (kwargs.get("input_ids") if kwargs.get("input_ids") is not None
                             else kwargs["inputs_embeds"]).shape[0]
        reference.register_forward_pre_hook(count, with_kwargs=True)
        return reference

    def first_step(*args, **kwargs):  # whether the reference is still alive when training starts
        gc.collect()
        seen.setdefault("kept_for_training", seen["reference"]() is not None)
        return accumulate(*args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(trainer, "shard_reference", watch)
        mp.setattr(trainer, "accumulate_gradients", first_step)
        try:
            train(validate(compose_config([*base, *overrides, f"hydra.run.dir={run_dir}"])), run_dir)
        finally:
            logger.removeHandler(handler)
            logger.setLevel(level)
            handler.close()
    del seen["reference"]
    return seen


@pytest.mark.parametrize("loss", ["dpo", "tidpo"])
def test_cold_warm_and_off_give_the_same_losses_and_warm_runs_no_reference_forward(tmp_path, loss):
    """DPO reads nothing else of the reference: a warm run makes no reference forward at all. TI-DPO's anchors are
    not in the data: its reference scores them alone (B rows per micro-batch, not 3B)."""
    common = [f"loss={loss}", "loss.anchor.max_new_tokens=4"]
    cache = [f"trainer.reference_cache={tmp_path / 'cache'}"]
    off = counted_run(tmp_path / "off", common)
    cold = counted_run(tmp_path / "cold", [*common, *cache])
    warm = counted_run(tmp_path / "warm", [*common, *cache])
    got = {name: metrics(tmp_path / name) for name in ("off", "cold", "warm")}
    assert len(got["off"]) == len(got["cold"]) == len(got["warm"]) == 5  # eval 0, steps 1-3, eval 3
    for a, b, c in zip(got["off"], got["cold"], got["warm"]):
        for name in (*COMPARED, "eval/loss", "eval/rewards/margins"):
            if name in a:
                # rel: the cached log-probs come from the fill's batches, not the step's, so may differ in the last
                # bit, and the policy with them: a summed log-prob of -62 (ulp 3.8e-6) was 1 ulp off at step 2
                assert b[name] == pytest.approx(a[name], rel=1e-6, abs=1e-6), (a["step"], name)
                assert c[name] == b[name], (a["step"], name)  # the same cached numbers
    # 96 train + 16 held-out pairs: 224 sequences. The batches are packed (QUICK: trainer.share_prompt=true), one
    # forward row per pair (its anchor too). Off: 3 steps of 8 pairs and 2 evals of 16.
    pairs_rows = 3 * 8 + 2 * 16
    log_cold, log_warm = ((tmp_path / f"{n}.log").read_text() for n in ("cold", "warm"))
    assert "0 sequences read, 224 computed" in log_cold and "224 sequences read, 0 computed" in log_warm
    # kept_for_training: whether the reference model is still alive at the first step (DPO's is freed after the fill)
    if loss == "dpo":
        assert off == {"forwards": 5, "rows": pairs_rows, "kept_for_training": True}
        assert warm == {"forwards": 0, "rows": 0, "kept_for_training": False}
        # the fill alone: 112 pairs in batches of 16 (eval_batch_size)
        assert cold == {"forwards": 7, "rows": 112, "kept_for_training": False}
        assert "the reference runs no forward from here on" in log_warm
    else:
        assert off == {"forwards": 5, "rows": pairs_rows, "kept_for_training": True}
        # the anchors alone, one row each, in training only
        assert warm == {"forwards": 3, "rows": 3 * 8, "kept_for_training": True}
        assert cold == {"forwards": 7 + 3, "rows": 112 + 3 * 8, "kept_for_training": True}
        assert "the reference still runs for TI-DPO's sampled anchors" in log_warm


MODEL_PARTS = {"weights": "w" * 32, "config": "c" * 32}


def key_of(overrides: list[str]) -> dict:
    cfg = validate(compose_config([*QUICK, *overrides]))
    return cache_key(cfg, MODEL_PARTS, torch.device("cpu"))


def test_every_part_of_the_key_picks_another_folder_and_a_changed_row_is_a_miss(tmp_path):
    base = ReferenceCache(tmp_path, key_of([]))
    variants = [["trainer.precision=bf16"], ["model.attn_implementation=eager"], ["data.max_length=40"],
                ["data.max_prompt_length=20"], ["model.dtype=bfloat16"], ["deepspeed=zero2"]]
    folders = {base.folder}
    for overrides in variants:
        folders.add(ReferenceCache(tmp_path, key_of(overrides)).folder)
    changed = [{"weights": "v" * 32}, {"config": "d" * 32}, {"packages": {"torch": "0.0", "transformers": "0.0"}}]
    for part in changed:
        folders.add(ReferenceCache(tmp_path, {**key_of([]), **part}).folder)
    gpu = cache_key(validate(compose_config(QUICK)), MODEL_PARTS, torch.device("cuda"))
    folders.add(ReferenceCache(tmp_path, gpu).folder)
    assert len(folders) == 1 + len(variants) + len(changed) + 1
    # Within a folder a sequence is found by its token ids and where its response starts.
    base.write([(sequence_key([5, 6, 7, 8], 2), np.array([-1.0, -2.0], dtype=np.float32))], writer="t")
    assert sequence_key([5, 6, 7, 8], 2) in ReferenceCache(tmp_path, key_of([]))
    assert sequence_key([5, 6, 7, 9], 2) not in base and sequence_key([5, 6, 7, 8], 1) not in base
    base.reload()
    assert base.lookup(sequence_key([5, 6, 7, 8], 2)).tolist() == [-1.0, -2.0]


def test_a_foreign_folder_is_refused_and_a_damaged_shard_is_ignored(tmp_path):
    cache = ReferenceCache(tmp_path, key_of([]))
    cache.write([(sequence_key([1, 2, 3], 1), np.array([-0.5, -0.25], dtype=np.float32))], writer="a")
    (cache.folder / "bad.index.npy").write_bytes(b"not numpy")  # a damaged shard (its values are missing too)
    again = ReferenceCache(tmp_path, key_of([]))
    assert len(again.entries) == 1
    key_file = cache.folder / "key.json"
    key_file.write_text(key_file.read_text().replace('"fp32"', '"bf16"'))
    with pytest.raises(UserError, match="holds another key.json than its name says"):
        ReferenceCache(tmp_path, key_of([]))


def test_keys_round_trip_through_the_index():
    """Keys are 128-bit integers stored as two 64-bit halves: every one comes back, whatever its bytes (a bytes
    column would drop trailing zero bytes)."""
    import tempfile

    keys = [0, 1, 1 << 64, (1 << 128) - 1, 255 << 120] + [sequence_key([i], 0) for i in range(200)]
    with tempfile.TemporaryDirectory() as root:
        cache = ReferenceCache(Path(root), key_of([]))
        cache.write([(k, np.full(3, i, dtype=np.float32)) for i, k in enumerate(keys)], writer="k")
        cache.reload()
        assert all(cache.lookup(k).tolist() == [i] * 3 for i, k in enumerate(keys))


FILLER = textwrap.dedent("""
    import json, sys, time
    from pathlib import Path
    import torch
    from contextlib import nullcontext
    from tidpo_cli.data.examples import TokenizedPair
    from tidpo_cli.distributed import Dist
    from tidpo_cli.modeling import frozen_copy
    from tidpo_cli.reference_cache import ReferenceCache, fill
    from transformers import AutoModelForCausalLM

    model_dir, root, out = sys.argv[1:4]
    reference = frozen_copy(AutoModelForCausalLM.from_pretrained(model_dir))
    reference.register_forward_hook(lambda *args: time.sleep(0.2))  # a slow reference: the two fills overlap
    pairs = [TokenizedPair([1 + i % 7, 2, 3], [4 + i % 5, 5, 2], [6, i % 11 + 1, 2], str(i), False) for i in range(60)]
    cache = ReferenceCache(Path(root), {"test": 1})
    found, computed = fill(cache, reference, pairs, batch_size=4, pad_id=0, share_prompt=False,
                           device=torch.device("cpu"), autocast=nullcontext, dist=Dist())
    Path(out).write_text(json.dumps({"found": found, "computed": computed}))
""")


def test_two_processes_fill_one_cache_at_once(tmp_path):
    """Both start at once on an empty folder: one computes every sequence, the other waits for the lock and reads
    them; the folder holds each once, with the values one process alone computes."""
    model_dir = save_tiny_hf_model(tmp_path / "model", TINY, seed=3)
    script = tmp_path / "fill.py"
    script.write_text(FILLER)
    procs = [subprocess.Popen([sys.executable, str(script), str(model_dir), str(tmp_path / "cache"),
                               str(tmp_path / f"out{i}.json")], stderr=subprocess.PIPE, text=True) for i in range(2)]
    for proc in procs:
        assert proc.wait(timeout=300) == 0, proc.stderr.read()[-2000:]
    outs = sorted((json.loads((tmp_path / f"out{i}.json").read_text()) for i in range(2)), key=lambda o: o["found"])
    sequences = len({tuple(s) for s in _sequences()})
    assert outs[0]["computed"] == sequences and outs[0]["found"] == 0
    assert outs[1] == {"found": 120, "computed": 0}
    shared = ReferenceCache(tmp_path / "cache", {"test": 1})
    assert len(list(shared.folder.glob("*.index.npy"))) == 1 and len(shared.entries) == sequences
    # The values: one process alone, into a folder of its own.
    from contextlib import nullcontext
    from transformers import AutoModelForCausalLM
    from tidpo_cli.distributed import Dist
    from tidpo_cli.modeling import frozen_copy
    alone = ReferenceCache(tmp_path / "alone", {"test": 1})
    fill(alone, frozen_copy(AutoModelForCausalLM.from_pretrained(model_dir)), _pairs(), batch_size=60, pad_id=0,
         share_prompt=True, device=torch.device("cpu"), autocast=nullcontext, dist=Dist())
    for key in alone.entries:
        np.testing.assert_allclose(shared.lookup(key), alone.lookup(key), atol=1e-5)


def _pairs() -> list[TokenizedPair]:
    return [TokenizedPair([1 + i % 7, 2, 3], [4 + i % 5, 5, 2], [6, i % 11 + 1, 2], str(i), False) for i in range(60)]


def _sequences():
    for p in _pairs():
        yield (*p.prompt_ids, *p.chosen_ids)
        yield (*p.prompt_ids, *p.rejected_ids)


def test_cached_log_probs_are_the_reference_forward_s(tmp_path):
    """Against log-probs computed here from the model's logits, by the chain rule's definition."""
    from contextlib import nullcontext
    from transformers import AutoModelForCausalLM
    from tidpo_cli.distributed import Dist
    from tidpo_cli.modeling import frozen_copy

    model = frozen_copy(AutoModelForCausalLM.from_pretrained(save_tiny_hf_model(tmp_path / "m", TINY, seed=4)))
    pairs = _pairs()[:5]
    cache = ReferenceCache(tmp_path / "cache", {"test": 2})
    assert fill(cache, model, pairs, batch_size=2, pad_id=0, share_prompt=False, device=torch.device("cpu"),
                autocast=nullcontext, dist=Dist()) == (0, 10)
    for pair in pairs:
        ids = pair.prompt_ids + pair.rejected_ids
        logits = model(input_ids=torch.tensor([ids])).logits[0]
        want = [torch.log_softmax(logits[t - 1], -1)[ids[t]].item() for t in range(len(pair.prompt_ids), len(ids))]
        np.testing.assert_allclose(cache.lookup(sequence_key(ids, len(pair.prompt_ids))), want, atol=1e-5)


def test_fingerprint_follows_the_weights_and_ignores_lora_adapters():
    from tidpo_cli.modeling import add_lora, build_tiny_llama
    from tidpo_cli.tokenizer import build_byte_tokenizer
    from omegaconf import OmegaConf

    tokenizer = build_byte_tokenizer()
    torch.manual_seed(0)
    model = build_tiny_llama(TINY, tokenizer)
    before = weights_fingerprint(model)
    lora = OmegaConf.create({"r": 2, "alpha": 4, "dropout": 0.0, "target_modules": "all-linear"})
    assert weights_fingerprint(add_lora(model, lora)) == before
    with torch.no_grad():
        model.lm_head.weight[0, 0] += 1e-3
    assert weights_fingerprint(model) != before


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_weights_fingerprint_is_the_hash_of_every_weights_bytes_in_order(dtype):
    # An independent statement of the key: one XXH3-128 over each parameter's dtype and shape, then its bytes
    # (copied out here, read in place by the code), so caches written before it read its memory in place keep
    # their folder.
    from tidpo_cli.modeling import build_tiny_llama
    from tidpo_cli.tokenizer import build_byte_tokenizer

    torch.manual_seed(0)
    model = build_tiny_llama(TINY, build_byte_tokenizer(), dtype=dtype)
    text = b"".join(f"{p.dtype}{tuple(p.shape)}".encode() + p.detach().float().to(dtype).contiguous()
                    .view(-1).view(torch.uint8).numpy().tobytes() for _, p in model.named_parameters())
    assert weights_fingerprint(model) == xxhash.xxh3_128(text).hexdigest()


def test_config_fingerprint_follows_what_the_config_computes_not_where_it_came_from(tmp_path):
    from transformers import AutoModelForCausalLM
    from tidpo_cli.modeling import build_tiny_llama
    from tidpo_cli.tokenizer import build_byte_tokenizer

    torch.manual_seed(0)
    model = build_tiny_llama(TINY, build_byte_tokenizer())
    before = model_fingerprint(model)
    model.save_pretrained(tmp_path / "saved")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "saved")  # another _name_or_path, a dtype field
    assert loaded.config._name_or_path != model.config._name_or_path
    assert model_fingerprint(loaded) == before
    loaded.config.rms_norm_eps = 1e-5
    after = model_fingerprint(loaded)
    assert after["weights"] == before["weights"] and after["config"] != before["config"]
    # The key names the versions that compute it.
    import transformers
    assert key_of([])["packages"] == {"torch": torch.__version__, "transformers": transformers.__version__}


def test_a_sweep_shares_auto_and_tdpo_bypasses_it(tmp_path):
    """`-m` over two betas with `trainer.reference_cache=auto`, both jobs at once (joblib): one computes, the other
    waits for it and reads all of it, from the sweep's directory. TDPO's KL needs whole distributions: no cache, one
    line says so."""
    sweep = tmp_path / "sweep"
    result = run_tidpo(["train", "-m", *QUICK, "loss=dpo", "loss.beta=0.1,0.2", "trainer.reference_cache=auto",
                        "trainer.save_final=false", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2",
                        f"hydra.sweep.dir={sweep}"], cwd=tmp_path, env={"OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    logs = sorted((sweep / str(job) / "train.log").read_text() for job in (0, 1))
    assert "0 sequences read, 224 computed" in logs[0] or "0 sequences read, 224 computed" in logs[1]
    assert sum("224 sequences read, 0 computed" in log for log in logs) == 1
    assert all(str(sweep / "reference_cache") in log for log in logs)
    assert len(list((sweep / "reference_cache").glob("*/*.index.npy"))) == 1
    tdpo = run_tidpo(["train", *QUICK, "loss=tdpo", "trainer.max_steps=1", "trainer.reference_cache=auto",
                      "trainer.save_final=false", f"hydra.run.dir={tmp_path / 'tdpo'}"], cwd=tmp_path)
    assert tdpo.returncode == 0, tdpo.stderr[-3000:]
    assert "trainer.reference_cache: not used, loss.alpha=" in (tmp_path / "tdpo" / "train.log").read_text()
    assert not (tmp_path / "tdpo" / "reference_cache").exists()


def test_a_full_disk_under_the_cache_stops_in_one_line(tmp_path):
    from test_faults import error_line, fill as fill_disk, small_disk

    with small_disk(tmp_path / "disk", size="1m") as disk:
        fill_disk(disk)
        result = run_tidpo(["train", *QUICK, "loss=dpo", f"trainer.reference_cache={disk / 'cache'}",
                            f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path)
    assert result.returncode == 2
    error_line(result.stderr, "cannot write the reference cache", "No space left on device",
                   "trainer.reference_cache")


def test_kto_on_unpaired_rows_reads_its_rows_from_the_cache(tmp_path):
    """Unpaired rows (one sequence each): the rows' log-probs come from the cache, the mismatched rows of KTO's
    reference point still run (one forward per micro-batch); the losses are those of a run without the cache."""
    from test_unpaired import ROWS

    data = tmp_path / "u.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS * 4))
    common = ["loss=kto", "data=preference", "data.format=auto", f"data.path={data}", "data.eval_size=4",
              "trainer.micro_batch_size=4", "trainer.max_steps=3", "trainer.eval_batch_size=4", "logger.progress=off",
              "trainer.warmup_steps=1"]
    off = counted_run(tmp_path / "off", common, base=[])
    cached = [*common, f"trainer.reference_cache={tmp_path / 'c'}"]
    counted_run(tmp_path / "cold", cached, base=[])
    warm = counted_run(tmp_path / "warm", cached, base=[])
    for a, b in zip(metrics(tmp_path / "off"), metrics(tmp_path / "warm")):
        for name in ("loss", "eval/loss", "rewards/chosen"):
            if name in a:
                assert b[name] == pytest.approx(a[name], abs=1e-6), (a["step"], name)
    # Off: per micro-batch the rows and the mismatched rows, 3 steps and 2 evals of one batch. Warm: the latter only.
    assert off["forwards"] == 2 * 5 and warm["forwards"] == 5 and warm["kept_for_training"]
    assert "20 sequences read, 0 computed" in (tmp_path / "warm.log").read_text()
    assert "KTO's mismatched prompt-completion rows" in (tmp_path / "warm.log").read_text()
