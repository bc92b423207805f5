"""The benchmark driver's pure parts (scripts/bench/): medians, ratios, targets, row fitting and token counting;
those of distributed.py (commands, ratios, checks, table) and gpu_summary.py; and scripts/bench/gpu.sh and
sampling.py, shortened, on the CPU.

No timing is tested here; only the DPOConfig test needs TRL (the `bench` extra).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from helpers import load_script

BENCH = Path(__file__).resolve().parents[1] / "scripts" / "bench"


def _load(name: str, file: str | None = None):
    """scripts/bench/<file or name>.py as the module `name` (distributed.py as bench_distributed: no shadowing)."""
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))  # scaling.py imports trl_vs_tidpo by name
    return load_script(BENCH / f"{file or name}.py", name)


bench = _load("trl_vs_tidpo")
scaling = _load("scaling")
dist = _load("bench_distributed", "distributed")
gpu = _load("gpu_summary")


def n_bytes(text: str) -> int:  # the byte-level tokenizer's count, without BOS / EOS
    return len(text.encode("utf-8"))


def test_summarize_medians_after_warmup():
    # warm-up 1 leaves steps 2-5: times 4, 2, 3, 5 s; tokens 800, 600, 900, 1000 -> 200, 300, 300, 200 tokens/s
    out = bench.summarize([10.0, 4.0, 2.0, 3.0, 5.0], batch=8, tokens=[100, 800, 600, 900, 1000], warmup=1)
    assert out["steps_measured"] == 4
    assert out["step_s"] == pytest.approx(3.5)
    assert out["samples_per_s"] == pytest.approx(8 / 3.5)
    assert out["tokens_per_s"] == pytest.approx(250.0)
    assert out["tokens_per_step"] == pytest.approx(850.0)
    # the whole run, every step: 5 steps of 8 pairs in 24 s; 3400 tokens in 24 s
    assert out["run_samples_per_s"] == pytest.approx(40 / 24)
    assert out["run_tokens_per_s"] == pytest.approx(3400 / 24)
    with pytest.raises(ValueError):
        bench.summarize([1.0, 2.0], batch=8, tokens=[1, 2], warmup=2)


def test_ratios_and_targets():
    results = {
        "trl_dpo": {"samples_per_s": 0.5, "run_samples_per_s": 0.4, "step_s": 16.0, "peak_rss_mb": 1000.0},
        "tidpo_dpo": {"samples_per_s": 0.8, "run_samples_per_s": 0.7, "step_s": 10.0, "peak_rss_mb": 900.0},
        "tidpo_no_triplet": {"samples_per_s": 8 / 13, "step_s": 13.0, "peak_rss_mb": 950.0},
        "tidpo": {"samples_per_s": 8 / 22, "step_s": 22.0, "peak_rss_mb": 990.0},
        "tidpo_dpo_bf16": {"samples_per_s": 1.0, "run_samples_per_s": 0.8, "step_s": 8.0, "peak_rss_mb": 800.0},
    }
    r = bench.ratios(results)
    assert r["tidpo_dpo_vs_trl_dpo_run_samples_per_s"] == pytest.approx(1.75)
    assert r["tidpo_dpo_vs_trl_dpo_median_samples_per_s"] == pytest.approx(1.6)
    assert r["tidpo_dpo_vs_trl_dpo_peak_rss"] == pytest.approx(0.9)
    assert r["tidpo_no_triplet_vs_tidpo_dpo_step_s"] == pytest.approx(1.3)
    assert r["tidpo_vs_tidpo_dpo_step_s"] == pytest.approx(2.2)
    assert r["tidpo_dpo_bf16_vs_trl_dpo_run_samples_per_s"] == pytest.approx(2.0)
    assert r["tidpo_dpo_bf16_vs_tidpo_dpo_step_s"] == pytest.approx(0.8)

    t = bench.targets(results)
    verdicts = {name: (round(v["value"], 6), v["threshold"], v["pass"]) for name, v in t.items()}
    assert verdicts == {
        "tidpo_dpo samples/s >= 1.5 x trl_dpo": (1.75, 1.5, True),  # the whole run's, not the medians' 1.6
        "tidpo_dpo peak RSS <= trl_dpo": (0.9, 1.0, True),
        "tidpo_no_triplet step time <= 1.35 x tidpo_dpo": (1.3, 1.35, True),
        "tidpo step time <= 2.0 x tidpo_dpo": (2.2, 2.0, False),
    }
    # a contender that failed or did not run: no value, no verdict
    missing = bench.targets({"tidpo_dpo": results["tidpo_dpo"], "trl_dpo": {"error": "exit 1"}})
    assert missing["tidpo_dpo samples/s >= 1.5 x trl_dpo"]["pass"] is None
    table = bench.markdown({"trl_dpo": {"error": "exit 1"}}, r, t)
    assert "| `trl_dpo` | failed: exit 1 |" in table
    assert "| tidpo step time <= 2.0 x tidpo_dpo | 2.200 | <= 2.0 | NO |" in table


def test_token_counting_on_rows():
    rows = [
        {"prompt": "Hi?", "chosen": " yes", "rejected": " no"},  # 2 x (1 + 3) + 4 + 3 + 2 EOS = 17
        {"prompt": "é", "chosen": "ü", "rejected": "ab"},       # 2 x (1 + 2) + 2 + 2 + 2 = 12
        {"prompt": "x" * 10, "chosen": "y", "rejected": "zz"},  # 2 x 11 + 1 + 2 + 2 = 27
    ]
    per_row = [bench.row_tokens(r, n_bytes) for r in rows]
    assert per_row == [17, 12, 27]
    assert bench.step_tokens(per_row, 2) == [29]  # a last partial batch is not a step
    assert bench.step_tokens(per_row, 1) == [17, 12, 27]
    assert bench.row_tokens(rows[0], n_bytes, bos=0, eos=0) == 13

    # the byte-level tokenizer the benchmark uses counts the same (BOS in front of text, EOS added by the tools)
    tokenizer = bench.byte_tokenizer()
    n_tokens, bos = bench.token_counter(tokenizer)
    assert bos == 1
    for r in rows:
        assert n_tokens(r["prompt"]) == n_bytes(r["prompt"])
        assert len(tokenizer(r["prompt"] + r["chosen"]).input_ids) == 1 + n_bytes(r["prompt"] + r["chosen"])


def test_fit_row_cuts_like_tidpo_at_character_boundaries():
    row = bench.fit_row("a" * 300, "b" * 50, "c" * 50, n_bytes, max_length=16, max_prompt_length=8)
    # prompt: the last 7 characters (+ BOS = 8); responses: 16 - 1 - 7 - 1 (EOS) = 7 characters
    assert row == {"prompt": "a" * 7, "chosen": "b" * 7, "rejected": "c" * 7}
    assert bench.row_tokens(row, n_bytes) == 2 * 16

    # two-byte characters are never split: a budget of 5 bytes keeps 2 of them
    # (prompt: 6 - 1 BOS = 5 bytes -> "éé"; responses: 11 - 1 - 4 - 1 EOS = 5 bytes -> "üü", "abcde")
    row = bench.fit_row("éééé", "üüüü", "abcdef", n_bytes, max_length=11, max_prompt_length=6)
    assert row == {"prompt": "éé", "chosen": "üü", "rejected": "abcde"}

    assert bench.fit_row("p", "same start x", "same start y", n_bytes, max_length=8, max_prompt_length=2) is None
    assert bench.fit_row("p", "", "y", n_bytes, max_length=8, max_prompt_length=2) is None


def test_split_hh_and_select_rows():
    good = {"chosen": "\n\nHuman: a\n\nAssistant: b\n\nHuman: c\n\nAssistant: yes",
            "rejected": "\n\nHuman: a\n\nAssistant: b\n\nHuman: c\n\nAssistant: no"}
    prompt, chosen, rejected = bench.split_hh(good)
    assert prompt.endswith("c\n\nAssistant:") and chosen == " yes" and rejected == " no"
    other_prompt = {"chosen": "\n\nHuman: a\n\nAssistant: x", "rejected": "\n\nHuman: b\n\nAssistant: y"}
    assert bench.split_hh(other_prompt) is None
    rows, skipped = bench.select_rows([other_prompt, good, good, good], 2, n_bytes, 512, 256)
    assert len(rows) == 2 and skipped == 1


def test_env_knobs_parse():
    assert bench.parse_model_overrides("hidden_size=64,num_attention_heads=4") == {
        "hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 4}
    assert bench.parse_extra("tidpo_dpo_bf16:loss=dpo trainer.precision=bf16; trl_x:trl beta=0.2") == {
        "tidpo_dpo_bf16": "loss=dpo trainer.precision=bf16", "trl_x": "trl beta=0.2"}
    s = bench.Settings.from_env({"BENCH_STEPS": "3", "BENCH_WARMUP": "1", "BENCH_TIDPO_ARGS": "a=1 b=2"})
    assert (s.steps, s.warmup, s.batch, s.max_length, s.tidpo_args) == (3, 1, 8, 512, ["a=1", "b=2"])
    assert s.model["hidden_size"] == 512 and s.model["num_hidden_layers"] == 8


def test_scaling_fill_rows_are_full_length():
    raw = [{"chosen": f"\n\nHuman: {'q' * 40}{i}\n\nAssistant: ok{i}",
            "rejected": f"\n\nHuman: {'q' * 40}{i}\n\nAssistant: no{i}"} for i in range(6)]
    rows, _ = scaling.fill_rows(raw, 4, n_bytes, max_length=64, max_prompt_length=32)
    assert len(rows) == 4
    assert all(bench.row_tokens(r, n_bytes) == 2 * 64 for r in rows)


def test_scaling_checks():
    def cell(length, dpo, tidpo, tokens):
        return {"max_length": length, "batch": 4, "ratio": tidpo / dpo,
                "runs": {"dpo": {"step_s": dpo, "tokens_per_step": tokens},
                         "tidpo": {"step_s": tidpo, "tokens_per_step": tokens}}}
    # doubling length (and tokens): dpo x 3 <= 4 (tokens x length) passes; tidpo x 5 does not; ratio 1.5 -> 2.5
    out = scaling.checks([cell(128, 1.0, 1.5, 1024), cell(256, 3.0, 7.5, 2048)], ["dpo", "tidpo"], 0.1)
    growth, trend = out.values()
    assert [g["pass"] for g in growth["steps"]] == [True, False] and growth["pass"] is False
    assert trend["pass"] is False and trend["per_batch"][0]["threshold"] == pytest.approx(1.65)


def test_dpo_config_kwargs_accepted_by_installed_trl():
    import dataclasses

    import trl  # in the dev extra that `make test` installs: a missing TRL is a broken setup, not a skip

    spec = {"output_dir": "unused", "beta": 0.1, "max_length": 512, "batch": 8, "steps": 3, "lr": 5e-6, "seed": 0,
            "config": {}}
    args = trl.DPOConfig(**bench.dpo_config_kwargs(spec, {f.name for f in dataclasses.fields(trl.DPOConfig)}))
    assert (args.bf16, args.gradient_checkpointing, args.max_length, args.beta) == (False, False, 512, 0.1)
    assert list(args.loss_type) == ["sigmoid"] and args.per_device_train_batch_size == 8


def _distributed_settings(**env: str):
    return bench.Settings.from_env({"BENCH_STEPS": "8", "BENCH_WARMUP": "2", **env}, steps=8, warmup=2,
                                   model=dict(dist.MODEL_CONFIG))


def test_distributed_commands():
    from helpers import compose_config

    s = _distributed_settings(BENCH_TIDPO_ARGS="loss.anchor.max_new_tokens=6")
    argv, threads = dist.command("single", "tidpo", s, Path("/w/runs/single-tidpo"), python="py")
    assert argv[:4] == ["py", "-m", "tidpo_cli.cli", "train"] and threads == 2
    assert argv[-1] == "loss.anchor.max_new_tokens=6" and "hydra.run.dir=/w/runs/single-tidpo" in argv
    for want in ("loss=tidpo", "deepspeed=none", "trainer.micro_batch_size=4", "trainer.grad_accum=2",
                 "trainer.max_steps=8", "++model.config.hidden_size=256", "trainer.save_final=false",
                 "trainer.share_prompt=true"):
        assert want in argv, want
    argv, threads = dist.command("zero3", "dpo", s, Path("/w/r"), python="py")
    assert argv[:9] == ["py", "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
                        "tidpo_cli.cli", "train"] and threads == 1
    assert dist.shell(argv, threads).startswith("OMP_NUM_THREADS=1 py -m torch.distributed.run --standalone")
    # the 2-process runs: one micro-batch of 4 each, so a step holds 8 pairs as in one process
    cfg = compose_config([a for a in argv[9:] if not a.startswith("hydra.")])
    assert (cfg.loss.name, cfg.trainer.micro_batch_size, cfg.trainer.grad_accum) == ("dpo", 4, 1)
    assert cfg.deepspeed.zero_optimization.stage == 3
    assert cfg.deepspeed.zero_optimization.stage3_param_persistence_threshold == 0
    assert (cfg.model.config.hidden_size, cfg.model.config.intermediate_size, cfg.model.config.num_hidden_layers,
            cfg.data.eval_size, cfg.trainer.eval_before, cfg.trainer.save_every) == (256, 688, 4, 0, False, 0)
    assert dist.model_overrides({"tie_word_embeddings": False, "hidden_act": "silu"}) == [
        "++model.config.tie_word_embeddings=false", "++model.config.hidden_act=silu"]
    with pytest.raises(SystemExit):
        dist.command("zero2", "dpo", _distributed_settings(BENCH_BATCH="7"), Path("/w/r"))


def test_distributed_step_times_and_medians():
    rows = [{"perf/samples_per_s": 4.0}, {"eval/loss": 0.7}, {"perf/samples_per_s": 16.0}]
    assert dist.step_times(rows, 8) == [2.0, 0.5]
    # the median of steps 3-8: 1.0, 1.4, 1.2, 1.6, 1.1, 1.3 -> (1.2 + 1.3) / 2
    assert bench.summarize([9.0, 9.0, 1.0, 1.4, 1.2, 1.6, 1.1, 1.3], 8, [1] * 8, 2)["step_s"] == pytest.approx(1.25)
    # a cell: the median of its runs, failed ones left out
    assert dist.cell_step([{"step_s": 3.0}, {"error": "exit 1"}, {"step_s": 1.0}, {"step_s": 2.0}]) == 2.0
    assert dist.cell_step([{"error": "exit 1"}]) is None
    assert dist.cell_step([{"anchor_s": 0.5}, {"anchor_s": None}, {"anchor_s": 0.3}], "anchor_s") == pytest.approx(0.4)
    # sampling: steps 3-4 took 1.0 and 1.4 s, of which 0.2 and 0.8 sampling -> medians 0.5 and (0.8 + 0.6) / 2
    rows = [{"perf/anchor_s": a} for a in (5.0, 5.0, 0.2, 0.8)]
    assert dist.sampling_times(rows, [9.0, 9.0, 1.0, 1.4], 2) == pytest.approx({"anchor_s": 0.5, "rest_s": 0.7})
    assert dist.sampling_times([{}] * 4, [9.0, 9.0, 1.0, 1.4], 2) == {"anchor_s": None, "rest_s": None}  # dpo
    line = ("[2026-12-01 10:14:56,548][INFO] model: tiny Llama (random init), 3.30M parameters (3.30M trainable), "
            "on cpu, 2 processes, DeepSpeed ZeRO-3")
    assert dist.parameters(line) == pytest.approx(3.30)
    assert dist.parameters("pairs: 4096 train") is None


def test_distributed_ratios_checks_and_table():
    steps = {"single": {"dpo": 2.0, "tidpo_no_triplet": 2.5, "tidpo": 3.6},
             "zero2": {"dpo": 1.0, "tidpo_no_triplet": 1.3, "tidpo": 2.2},
             "zero3": {"dpo": 4.0, "tidpo_no_triplet": None, "tidpo": 7.2}}
    r = dist.ratios(steps)
    assert r["single"] == pytest.approx({"tidpo_no_triplet": 1.25, "tidpo": 1.8})
    assert r["zero2"] == pytest.approx({"tidpo_no_triplet": 1.3, "tidpo": 2.2})
    assert r["zero3"]["tidpo_no_triplet"] is None and r["zero3"]["tidpo"] == pytest.approx(1.8)

    c = dist.checks(r)
    verdicts = {k: (None if v["value"] is None else round(v["value"], 4), v["pass"]) for k, v in c.items()}
    assert verdicts == {
        "zero2: tidpo_no_triplet/dpo <= 1.15 x one process's": (1.04, True),   # 1.3 / 1.25
        "zero2: tidpo_no_triplet step <= 1.35 x dpo": (1.3, True),
        "zero2: tidpo/dpo <= 1.15 x one process's": (1.2222, False),           # 2.2 / 1.8
        "zero2: tidpo step <= 2.0 x dpo": (2.2, False),
        "zero3: tidpo_no_triplet/dpo <= 1.15 x one process's": (None, None),   # the run failed
        "zero3: tidpo_no_triplet step <= 1.35 x dpo": (None, None),
        "zero3: tidpo/dpo <= 1.15 x one process's": (1.0, True),
        "zero3: tidpo step <= 2.0 x dpo": (1.8, True),
    }
    # one-sided: a distributed ratio 0.8x one process's passes (distribution made TI-DPO relatively cheaper)
    low = dist.checks({"single": {"tidpo": 2.0}, "zero2": {"tidpo": 1.6}})
    assert low["zero2: tidpo/dpo <= 1.15 x one process's"]["pass"] is True
    assert low["zero2: tidpo step <= 2.0 x dpo"]["pass"] is True

    def cell(step, *runs):
        return {"step_s": step, "runs": [{"step_s": x} if x else {"error": "exit 1"} for x in runs]}
    cells = {"single": {"dpo": cell(2.0, 2.0, 2.1)},
             "zero2": {"dpo": cell(1.0, 1.0, 1.0), "tidpo": {**cell(2.2, 2.1, 2.3), "anchor_s": 0.5, "rest_s": 1.6}},
             "zero3": {"tidpo_no_triplet": cell(None, None, None)}}
    table = dist.markdown(cells, r, c)
    assert ("| setting | `loss=` | step (s) | vs `dpo` | sampling (s) | rest vs `dpo` | run 1 (s) | run 2 (s) |"
            in table)
    assert "| single | `dpo` | 2.000 | 1.000 | - | - | 2.000 | 2.100 |" in table
    assert "| zero2 | `tidpo` | 2.200 | 2.200 | 0.500 | 1.600 | 2.100 | 2.300 |" in table  # 1.6 s over dpo's 1.0
    assert "| zero3 | `tidpo_no_triplet` | failed | - | - | - | failed | failed |" in table
    assert "| zero2: tidpo step <= 2.0 x dpo | 2.200 | <= 2.0 | NO |" in table
    assert "| zero3: tidpo step <= 2.0 x dpo | 1.800 | <= 2.0 | yes |" in table


def test_distributed_same_batches():
    cells = {"single": {"dpo": {"runs": [{"error": "exit 1"}, {"tokens_per_step_logged": [10, 12]}]}},
             "zero2": {"dpo": {"runs": [{"tokens_per_step_logged": [10, 12]}, {"tokens_per_step_logged": [10, 13]},
                                        {"error": "exit 1"}]}}}
    assert dist.same_work(cells) == {"zero2-dpo run 1": True, "zero2-dpo run 2": False, "zero2-dpo run 3": None}
    assert dist.same_work({"zero3": cells["zero2"]}) == {f"zero3-dpo run {i}": None for i in (1, 2, 3)}


def test_finish_writes_the_json_and_keeps_the_work_dir_only_when_asked_or_failed(tmp_path, capsys):
    out, work = tmp_path / "out.json", tmp_path / "work"
    work.mkdir()
    assert bench.finish("x", out, {"a": 1}, "| table |", work, keep=False, failed=False) == 0
    assert json.loads(out.read_text()) == {"a": 1} and not work.exists()
    assert "| table |" in capsys.readouterr().out
    work.mkdir()
    assert bench.finish("x", out, {}, "", work, keep=False, failed=True) == 1 and work.is_dir()
    assert bench.finish("x", out, {}, "", work, keep=True, failed=False) == 0 and work.is_dir()
    assert "[x] kept the work dir" in capsys.readouterr().out


def test_reference_cache_agreement_reads_each_job_s_per_step_losses(tmp_path):
    bench = _load("bench_reference_cache", "reference_cache")

    def job(sweep: str, number: int, losses: list[float]) -> None:
        folder = tmp_path / sweep / str(number)
        folder.mkdir(parents=True)
        rows = [{"step": 0, "eval/loss": 0.7}] + [{"step": i + 1, "loss": v} for i, v in enumerate(losses)]
        (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    job("off", 0, [0.5] * 25)
    job("auto", 0, [0.5] * 20 + [0.5, 0.5002, 0.5, 0.5, 0.5])  # apart by 2e-4 at step 22
    job("off", 1, [0.4] * 25)
    job("auto", 1, [0.4 + 3e-6] + [0.4] * 24)
    got = bench.agreement(tmp_path / "off", tmp_path / "auto")
    assert got["first_step_past_1e-4_per_job"] == [22, None]
    assert got["steps_1_20_max_loss_difference"] == pytest.approx(3e-6, rel=1e-6)


def test_sampling_bench_writes_every_cell(tmp_path):
    """scripts/bench/sampling.py, shortened: a JSON with the four cells (torch's and ZeRO-3's linear, 4 and 8 rows)
    and the draw's six (noise a block or a token at a time, no draw; 4 and 8 rows), every generation of full length
    (the script checks that)."""
    import os
    import subprocess

    out = tmp_path / "sampling.json"
    result = subprocess.run([sys.executable, str(BENCH / "sampling.py")], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "BENCH_TOKENS": "2", "BENCH_REPEATS": "1",
                                 "BENCH_ROUNDS": "1", "BENCH_OUT": str(out)})
    assert result.returncode == 0, result.stderr[-2000:]
    got = json.loads(out.read_text())
    seconds, draws = got["seconds"], got["draw"]["seconds"]
    assert sorted(seconds) == ["torch 4", "torch 8", "zero3 4", "zero3 8"]
    assert sorted(draws) == ["block 4", "block 8", "none 4", "none 8", "token 4", "token 8"]
    assert got["draw"]["warpers"] == {"temperature": 0.8, "top_k": 50, "top_p": 0.95}
    assert all(s > 0 for s in [*seconds.values(), *draws.values()])
    assert "| `F.linear` |" in result.stdout and "\n| warpers and draw |" in result.stdout
    table_lines = [line for line in result.stdout.splitlines() if line.startswith("| ")]  # a rule starts "|-"
    assert len(table_lines) == 2 + 4 + 6  # the two headers and every row



@pytest.mark.slow
def test_autocast_sampling_bench_writes_every_cell_and_the_same_tokens(tmp_path):
    """scripts/bench/autocast_sampling.py, shortened to the bench model (two compiles on the CPU): the three cells
    (eager; compiled with the twin's casts and without), and the same compiled tokens with and without the twin."""
    import os
    import subprocess

    out = tmp_path / "autocast.json"
    result = subprocess.run([sys.executable, str(BENCH / "autocast_sampling.py")], capture_output=True, text=True,
                            timeout=600, env={**os.environ, "BENCH_TOKENS": "3", "BENCH_REPEATS": "1",
                                              "BENCH_ROUNDS": "1", "BENCH_MODELS": "bench", "BENCH_OUT": str(out)})
    assert result.returncode == 0, result.stderr[-2000:]
    got = json.loads(out.read_text())
    assert list(got["seconds"]) == ["bench|eager", "bench|compiled, casts held", "bench|compiled, cast every token"]
    assert all(s > 0 for s in got["seconds"].values())
    assert got["same_tokens"] == {"bench": True}
    assert result.stdout.count("\n| bench (3.3 M) | ") == 3  # a table row for each cell


def test_gpu_summary_medians_mfu_and_ratio(tmp_path):
    """gpu_summary.py on hand-written rows: after a warm-up of 1, dpo's pairs/s 8, 16, 10 give a median step of
    0.8 s (8 pairs over 10 pairs/s) and tokens/s 2000; MFU is 8 x 1.5M parameters x 2000 tokens/s over 1 TFLOP/s.
    A row without metrics (failed or skipped) is left out; the eval rows are not steps. Torch's CUDA-graph
    re-recordings are counted from the row's log."""
    logs, out = tmp_path / "logs", tmp_path / "out"
    logs.mkdir(), out.mkdir()
    (out / "checks.txt").write_text("bench_dpo ok (30 s)\nbench_tidpo skipped (BUDGET_S=1)\n")
    (out / "gpu.txt").write_text("NVIDIA H200, 143771 MiB\n")
    (logs / "dpo.log").write_text("model: a Llama, 1.50M parameters (1.50M trainable), on cuda\n"
                                  "trainer.share_prompt=auto: one row per response\n"
                                  + "V1203 cudagraph_trees.py:2312] [0/1] Re-recording function=forward, mode=...\n" * 2)
    steps = [(4, 500, 3.0), (8, 1000, 2.0), (16, 3000, 2.5), (10, 2000, 2.0)]
    rows = [{"loss": 0.69, "perf/samples_per_s": s, "perf/tokens_per_s": t, "perf/peak_mem_gb": m} for s, t, m in steps]
    rows.insert(2, {"eval/loss": 0.7})
    (logs / "dpo.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (logs / "faster.jsonl").write_text("".join(json.dumps({**r, "perf/samples_per_s": 2 * r["perf/samples_per_s"]})
                                               + "\n" for r in rows if "loss" in r))
    (logs / "sampled.jsonl").write_text("".join(json.dumps({**r, "perf/anchor_s": 0.1 * i}) + "\n"
                                                for i, r in enumerate(x for x in rows if "loss" in x)))
    gpu.main([str(out), str(logs), "1", "1", "dpo", "faster", "tidpo", "sampled"])
    got = json.loads((out / "gpu_bench.json").read_text())
    dpo = got["runs"]["dpo"]
    assert got["parameters"] == 1.5e6 and got["gpu"] == "NVIDIA H200, 143771 MiB"
    assert got["checks"] == ["bench_dpo ok (30 s)", "bench_tidpo skipped (BUDGET_S=1)"]
    assert dpo["steps_measured"] == 3 and dpo["samples_per_s"] == 10 and dpo["tokens_per_s"] == 2000
    assert dpo["step_s"] == pytest.approx(0.8) and dpo["first_step_s"] == pytest.approx(2.0)
    assert dpo["peak_mem_gb"] == 3.0 and dpo["mfu_dpo_flops"] == pytest.approx(8 * 1.5e6 * 2000 / 1e12)
    assert dpo["share_prompt_auto"] == "one row per response" and dpo["step_time_vs_dpo"] == 1.0
    assert dpo["cudagraph_rerecords"] == 2 and got["runs"]["faster"]["cudagraph_rerecords"] == 0  # no log
    assert got["runs"]["faster"]["step_time_vs_dpo"] == pytest.approx(0.5)
    assert "tidpo" not in got["runs"]
    assert "anchor_s" not in dpo  # no anchors sampled
    # steps 2-4: 8/8 - 0.1, 8/16 - 0.2, 8/10 - 0.3 s besides sampling -> median 0.5 s, over dpo's 0.8 s
    sampled = got["runs"]["sampled"]
    assert sampled["anchor_s"] == pytest.approx(0.2) and sampled["rest_s"] == pytest.approx(0.5)
    assert sampled["rest_vs_dpo"] == pytest.approx(0.5 / 0.8)


def test_gpu_script_on_the_cpu_keeps_to_its_budget_and_packs_its_logs(tmp_path):
    """scripts/bench/gpu.sh as a lent machine runs it (logs outside OUT), on the CPU with the small model
    (DEVICE=cpu SIZE=small) and 40 HH-RLHF-shaped rows written here: with BUDGET_S=1 the first row runs and the
    second is skipped; OUT then holds what comes back from such a machine (four files, the logs packed)."""
    import gzip
    import os
    import subprocess
    import tarfile

    hh = tmp_path / "hh.jsonl.gz"
    with gzip.open(hh, "wt") as f:
        for i in range(40):
            prompt = f"\n\nHuman: question number {i}, how are you?\n\nAssistant:"
            f.write(json.dumps({"chosen": f"{prompt} well, thank you {i}.", "rejected": f"{prompt} no {i}."}) + "\n")
    out, logs = tmp_path / "out", tmp_path / "logs"
    env = {**os.environ, "PYTHON": sys.executable, "DEVICE": "cpu", "SIZE": "small", "CHECKS": "0", "BENCH_STEPS": "3",
           "BENCH_WARMUP": "1", "BUDGET_S": "1", "OUT": str(out), "LOGS": str(logs), "HH": str(hh),
           "GPU_ROWS": "dpo:loss=dpo;tidpo:loss=tidpo"}
    result = subprocess.run(["bash", str(BENCH / "gpu.sh")], capture_output=True, text=True, timeout=300, env=env,
                            cwd=BENCH.parents[1])
    assert result.returncode == 0, result.stderr[-2000:]
    assert sorted(p.name for p in out.iterdir()) == ["checks.txt", "gpu.txt", "gpu_bench.json", "logs.tgz"]
    checks = (out / "checks.txt").read_text().splitlines()
    assert checks[0].startswith("bench_dpo ok (") and checks[1].startswith("bench_tidpo skipped (BUDGET_S=1: ")
    got = json.loads((out / "gpu_bench.json").read_text())
    assert list(got["runs"]) == ["dpo"] and got["runs"]["dpo"]["steps_measured"] == 2
    with tarfile.open(out / "logs.tgz") as tar:
        assert sorted(n.removeprefix("./") for n in tar.getnames() if n != ".") == ["dpo.jsonl", "dpo.log"]


wheels = _load("gpu_wheels")
TORCH_CLOSURE = ("torch", "numpy")


def test_gpu_wheels_carry_what_transformers_requires_and_not_what_torch_does():
    """gpu_prepare.sh's list: transformers 5.25 requires huggingface-hub 2.4, which the GPU image (1.33) lacks, and
    huggingface-hub requires httpx2, which it lacks too; a list of names by hand carried neither."""
    from importlib.metadata import requires, version

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    carried = wheels.carried("3.12", ["transformers", "deepspeed", "hydra-core", "omegaconf", "typing-extensions"],
                             list(TORCH_CLOSURE))
    for name in ("transformers", "deepspeed", "hydra-core", "omegaconf", "huggingface-hub", "tokenizers"):
        assert carried[name] == version(name), name
    left = wheels.closure(list(TORCH_CLOSURE), wheels.marker_environment("3.12"))
    assert "torch" not in carried and "sympy" not in carried and "sympy" in left  # PyTorch's own stay on the image
    assert carried["typing-extensions"] == version("typing-extensions")  # a root, though PyTorch requires it too
    # Closed: every requirement of a carried package that applies on CPython 3.12 and is installed is carried or is
    # PyTorch's (what the image holds).
    environment = wheels.marker_environment("3.12")
    for name in carried:
        for text in requires(name) or []:
            requirement = Requirement(text)
            needed = canonicalize_name(requirement.name)
            if requirement.marker is not None and not requirement.marker.evaluate(environment):
                continue
            if wheels.closure([needed], environment):  # installed here
                assert needed in carried or needed in left, (name, needed)


def test_gpu_wheels_markers_are_the_target_pythons():
    from packaging.markers import Marker

    old, new = wheels.marker_environment("3.10"), wheels.marker_environment("3.12")
    assert Marker('python_version < "3.11"').evaluate(old) and not Marker('python_version < "3.11"').evaluate(new)
    assert Marker('platform_machine == "x86_64" and sys_platform == "linux"').evaluate(new)
    assert not Marker('extra == "dev"').evaluate(new)


def test_gpu_wheels_cli_names_a_root_that_is_not_installed(capsys):
    with pytest.raises(SystemExit) as stop:
        wheels.main(["3.12", "transformers no-such-package-here", "torch"])
    assert stop.value.code == 2
    assert "not installed here: no-such-package-here" in capsys.readouterr().err
