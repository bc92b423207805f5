"""DeepSpeed for real: 2 processes under torchrun with the gloo backend on the CPU, against one process with the
same global batch; ZeRO-3 save, resume and the gathered final model; the launch environment."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import compose_config, run_tidpo
from tidpo_cli.distributed import deepspeed_config, first_host, launch_env, read_engine_weights
from tidpo_cli.errors import UserError

# 5 steps of 8 pairs: one process takes 2 micro-batches of 4, two processes take one each. The importance gradient
# takes the fused pass (grad_pass=auto) in both, and under ZeRO-3 the anchors are sampled with the weights gathered
# (zero3_weights=auto, which fits here); test_zero3_separate_pass_and_per_layer_sampling covers the other paths.
BASE = ["data.synthetic.num_train=96", "data.eval_size=16", "trainer.micro_batch_size=4", "trainer.eval_batch_size=8",
        "trainer.schedule=constant", "trainer.warmup_steps=1", "trainer.save_every=5", "logger.progress=off",
        "loss.anchor.max_new_tokens=6", "trainer.share_prompt=true"]  # one layout for all (auto would time them)
# ZeRO-3 keeps tensors below the persistence threshold whole on every rank, which is every tensor of the tiny
# model: 0 partitions them all, so the gathers, the synced generation and the sharded reference are exercised.
ZERO = {"zero2": ["deepspeed=zero2"],
        "zero3": ["deepspeed=zero3", "deepspeed.zero_optimization.stage3_param_persistence_threshold=0"]}
COMPARED = ("loss", "grad_norm", "rewards/margins", "logps/chosen", "logps/rejected", "importance/max",
            "triplet/loss", "anchor/length")


def torchrun(args: list[str], cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "tidpo_cli.cli", "train", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "PYTHONUNBUFFERED": "1"})


def rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def train_rows(run_dir: Path) -> list[dict]:
    return [r for r in rows(run_dir) if "loss" in r]


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """One process, 2 micro-batches of 4 per step, for each loss."""
    root = tmp_path_factory.mktemp("single")
    out = {}
    for loss in ("dpo", "tidpo"):
        result = run_tidpo(["train", f"loss={loss}", *BASE, "trainer.max_steps=5", "trainer.grad_accum=2",
                            f"hydra.run.dir={root / loss}"], cwd=root)
        assert result.returncode == 0, result.stderr[-3000:]
        out[loss] = root / loss
    return out


@pytest.mark.parametrize("loss", ["dpo", "tidpo"])
@pytest.mark.parametrize("zero", ["zero2", "zero3"])
def test_two_processes_match_one_process(single, tmp_path, loss, zero):
    result = torchrun([f"loss={loss}", *BASE, *ZERO[zero], "trainer.max_steps=5", "trainer.grad_accum=1",
                       f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    got, want = train_rows(tmp_path / "run"), train_rows(single[loss])
    assert [r["step"] for r in got] == [1, 2, 3, 4, 5]
    for a, b in zip(got, want):
        for name in COMPARED:
            if name in b:  # rel: ZeRO-3 sums the gradients in another order, and AdamW carries that rounding on,
                # about tenfold a step: at step 5 a summed log-prob of -66 was 1.1e-4 off on a 2-core AMD EPYC
                assert a[name] == pytest.approx(b[name], rel=1e-5, abs=1e-4), (a["step"], name)
    if loss == "tidpo":
        assert all(r["anchor/length"] > 0 and r["importance/max"] > 1 for r in got)
        # Every step samples (refresh_every=1): the ranks' mean seconds, a part of the step's own time.
        assert all(0 < r["perf/anchor_s"] < 8 / r["perf/samples_per_s"] for r in got)
    else:
        assert not any("perf/anchor_s" in r for r in got)  # no anchors, no figure
    evals = [r for r in rows(tmp_path / "run") if "eval/loss" in r]
    assert [r["step"] for r in evals] == [0, 5]
    assert evals[-1]["eval/loss"] == pytest.approx(rows(single[loss])[-1]["eval/loss"], abs=1e-4)
    log = (tmp_path / "run" / "train.log").read_text()
    assert f"2 processes, DeepSpeed ZeRO-{zero[-1]}" in log
    assert ("weights gathered once per generation" in log) == (loss == "tidpo" and zero == "zero3")
    assert log.count("held-out rewards/accuracies") == 1  # rank 0 speaks; rank 1 stays quiet


def test_zero3_separate_pass_and_per_layer_sampling(single, tmp_path):
    """The other two ZeRO-3 paths of a TI-DPO step: the importance from its own forward and backward
    (grad_pass=separate) and anchors sampled with every forward gathering each layer, the processes stepping
    generation together (zero3_weights=per_layer). Same anchors and, at the first step (same weights), the fused
    pass's weights and update to float rounding; the two passes then drift by rounding only."""
    result = torchrun(["loss=tidpo", *BASE, *ZERO["zero3"], "trainer.max_steps=2", "trainer.grad_accum=1",
                       "loss.importance.grad_pass=separate", "loss.anchor.zero3_weights=per_layer",
                       f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    got, want = train_rows(tmp_path / "run"), train_rows(single["tidpo"])
    for name in COMPARED:
        assert got[0][name] == pytest.approx(want[0][name], abs=1e-5), name
    assert got[1]["anchor/length"] == want[1]["anchor/length"]
    assert got[1]["loss"] == pytest.approx(want[1]["loss"], abs=1e-4)
    log = (tmp_path / "run" / "train.log").read_text()
    assert "gathered per layer" in log and "gathered once" not in log


def test_zero3_resume_continues_exactly_and_final_is_the_gathered_model(tmp_path):
    from transformers import AutoModelForCausalLM

    common = ["loss=tidpo", *BASE, *ZERO["zero3"], "trainer.grad_accum=1", "trainer.save_every=3",
              "trainer.keep_last=null"]
    whole = torchrun([*common, "trainer.max_steps=5", f"hydra.run.dir={tmp_path / 'whole'}"], cwd=tmp_path)
    assert whole.returncode == 0, whole.stderr[-3000:]
    first = torchrun([*common, "trainer.max_steps=3", f"hydra.run.dir={tmp_path / 'part'}"], cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    step3 = tmp_path / "part" / "checkpoints" / "step-3"
    assert (step3 / "engine").is_dir() and (step3 / "rng-rank1.json").is_file()
    resumed = torchrun([*common, "trainer.max_steps=5", f"hydra.run.dir={tmp_path / 'part'}"], cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in (tmp_path / "part" / "train.log").read_text()

    got, want = train_rows(tmp_path / "part"), train_rows(tmp_path / "whole")
    assert [r["step"] for r in got] == [1, 2, 3, 4, 5]
    for a, b in zip(got[3:], want[3:]):
        for name in COMPARED:
            if name in b:
                assert a[name] == pytest.approx(b[name], abs=1e-5), (a["step"], name)

    # final/ is a whole HF model, written by rank 0 from the ZeRO-3 partitions: it loads in a plain process
    # and holds the trained weights (those of the last checkpoint, merged from its shards on the CPU).
    final = AutoModelForCausalLM.from_pretrained(tmp_path / "part" / "final").state_dict()
    trained = read_engine_weights(tmp_path / "part" / "checkpoints" / "step-5")
    assert set(trained) <= set(final)
    for name, tensor in trained.items():
        assert torch.equal(final[name], tensor), name
    start = AutoModelForCausalLM.from_pretrained(tmp_path / "part" / "reference").state_dict()
    assert any(not torch.equal(final[n], start[n]) for n in trained)


def test_launch_env_from_srun_and_torchrun():
    srun = {"SLURM_STEP_NUM_TASKS": "8", "SLURM_PROCID": "5", "SLURM_LOCALID": "1", "SLURM_JOB_ID": "4242",
            "SLURM_STEP_NODELIST": "gpu[07-10]", "SLURM_JOB_NODELIST": "gpu[07-10]"}
    env = launch_env(srun)
    assert (env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"]) == ("5", "8", "1")
    assert env["MASTER_ADDR"] == "gpu07" and env["MASTER_PORT"] == str(20000 + 4242)
    torchrun_env = {**srun, "RANK": "3", "WORLD_SIZE": "16", "LOCAL_RANK": "3"}
    assert launch_env(torchrun_env)["RANK"] == "3"  # torchrun inside an srun task: torchrun's numbers win
    batch_shell = {k: v for k, v in srun.items() if k != "SLURM_STEP_NUM_TASKS"}
    assert "RANK" not in launch_env(batch_shell)  # the batch script itself is one process


@pytest.mark.parametrize("nodes, first", [("vm", "vm"), ("gpu[03-05,9],cpu1", "gpu03"), ("a1,b2", "a1")])
def test_first_host_of_a_nodelist(nodes, first, monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")  # no scontrol: the fallback parser
    assert first_host(nodes) == first


def test_deepspeed_config_comes_from_the_trainer_config():
    cfg = compose_config(["deepspeed=zero3_offload", "trainer.micro_batch_size=2", "trainer.grad_accum=8",
                          "trainer.max_grad_norm=0.5", "trainer.precision=bf16"])
    ds = deepspeed_config(cfg, world=16)
    assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"], ds["train_batch_size"]) == (2, 8, 256)
    assert ds["gradient_clipping"] == 0.5 and ds["bf16"] == {"enabled": True}
    assert ds["zero_optimization"]["stage"] == 3
    assert ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert "optimizer" not in ds and "scheduler" not in ds  # the loop's own, passed to deepspeed.initialize
    reference = deepspeed_config(cfg, world=16, optimizer=False)
    assert reference["zero_optimization"]["offload_param"]["device"] == "cpu"
    assert "offload_optimizer" not in reference["zero_optimization"]


def test_distributed_config_mistakes(tmp_path):
    with pytest.raises(UserError, match="lora"):
        compose_config(["deepspeed=zero3", "model.lora.enabled=true"])
    with pytest.raises(UserError, match="stage"):
        compose_config(["deepspeed=zero2", "deepspeed.zero_optimization.stage=4"])
    with pytest.raises(UserError, match="zero3_weights"):
        compose_config(["deepspeed=zero3", "loss.anchor.zero3_weights=some"])
    # Several processes without a shared run id: told to name the run directory, before anything runs.
    result = run_tidpo(["train"], cwd=tmp_path, env={"WORLD_SIZE": "2", "RANK": "0", "TORCHELASTIC_RUN_ID": "none"})
    assert result.returncode == 2 and "hydra.run.dir" in result.stderr
    assert not (tmp_path / "runs").exists()


def test_lora_under_zero2_resumes_and_matches_one_process(tmp_path):
    """LoRA adapters on 2 processes (ZeRO-2): the same losses as one process, a checkpoint without the frozen
    base, and an exact resume from it."""
    from transformers import AutoModelForCausalLM

    lora = ["loss=tidpo", *BASE, "model.lora.enabled=true", "model.lora.r=4", "model.lora.dropout=0.0",
            "trainer.lr=1e-2", "trainer.save_every=3"]
    single = run_tidpo(["train", *lora, "trainer.max_steps=5", "trainer.grad_accum=2",
                        f"hydra.run.dir={tmp_path / 'single'}"], cwd=tmp_path)
    assert single.returncode == 0, single.stderr[-3000:]
    for steps in (3, 5):  # stop after the checkpoint at step 3, then resume to 5
        result = torchrun([*lora, "deepspeed=zero2", f"trainer.max_steps={steps}", "trainer.grad_accum=1",
                           f"hydra.run.dir={tmp_path / 'dist'}"], cwd=tmp_path)
        assert result.returncode == 0, result.stderr[-3000:]
    assert "resumed from" in (tmp_path / "dist" / "train.log").read_text()
    got, want = train_rows(tmp_path / "dist"), train_rows(tmp_path / "single")
    assert [r["step"] for r in got] == [1, 2, 3, 4, 5]
    for a, b in zip(got, want):
        for name in COMPARED:
            if name in b:
                assert a[name] == pytest.approx(b[name], abs=1e-4), (a["step"], name)
    saved = torch.load(tmp_path / "dist" / "checkpoints" / "step-3" / "engine" / "mp_rank_00_model_states.pt",
                       weights_only=False)["module"]
    assert saved and all("lora_" in name for name in saved)  # the frozen base stays out of checkpoints
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "dist" / "final").state_dict()
    reference = AutoModelForCausalLM.from_pretrained(tmp_path / "single" / "final").state_dict()
    assert max((merged[n] - reference[n]).abs().max().item() for n in reference) < 1e-4


POISON = '''
import sys
import torch
import tidpo_cli.trainer as trainer

real, calls = trainer.batch_loss, {"n": 0}

def poisoned(*args, **kwargs):  # the training micro-batch of step 3 gives a NaN gradient on every rank
    loss, metrics = real(*args, **kwargs)
    if torch.is_grad_enabled():
        calls["n"] += 1
    return (loss * float("nan") if calls["n"] == 3 and torch.is_grad_enabled() else loss), metrics

trainer.batch_loss = poisoned
from tidpo_cli.cli import main
main(sys.argv[1:])
'''


@pytest.mark.parametrize("zero", ["zero2", "zero3"])
def test_a_non_finite_step_is_skipped_under_deepspeed(tmp_path, zero):
    script = tmp_path / "poisoned_train.py"
    script.write_text(POISON)
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             str(script), "train", "loss=dpo", *BASE, *ZERO[zero], "trainer.max_steps=5",
                             f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path, capture_output=True, text=True,
                            timeout=600, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    got = train_rows(tmp_path / "run")
    # The metrics are those of the unpoisoned loss; the NaN reached only the gradient, where DeepSpeed's own
    # check skipped the update, and the loop counted it.
    assert [r["train/skipped_steps"] for r in got] == [0, 0, 1, 1, 1]
    assert all(r["loss"] == r["loss"] and r["grad_norm"] == r["grad_norm"] for r in got[3:])  # weights unharmed
    assert "step 3: non-finite loss or gradient" in (tmp_path / "run" / "train.log").read_text()


# One preset per shape of the loss family's declarations (loss_specs.py): KTO's mismatched rows, a reference-free
# length-normalised loss, a weighted list of TRL's DPO types with an NLL term.
FAMILY = {"kto": ["loss=kto"], "simpo": ["loss=simpo"],
          "mix": ["loss=dpo", "loss.type=[sigmoid,bco_pair,sft]", "loss.weights=[0.8,0.2,1.0]"]}


@pytest.mark.parametrize("name", sorted(FAMILY))
def test_loss_family_under_zero2_matches_one_process(tmp_path, name):
    """ZeRO-2 on 2 processes against one process with the same global batch, 2 steps: the same losses and
    log-probs. KTO's reference point and the NLL term are means over a micro-batch, and a process's micro-batch is
    the one process's (4 pairs), so they agree too. The reference-free loss loads no reference on any rank."""
    common = [*FAMILY[name], *BASE, "trainer.max_steps=2"]
    one = run_tidpo(["train", *common, "trainer.grad_accum=2", f"hydra.run.dir={tmp_path / 'one'}"], cwd=tmp_path)
    assert one.returncode == 0, one.stderr[-3000:]
    two = torchrun([*common, *ZERO["zero2"], "trainer.grad_accum=1", f"hydra.run.dir={tmp_path / 'two'}"],
                   cwd=tmp_path)
    assert two.returncode == 0, two.stderr[-3000:]
    got, want = train_rows(tmp_path / "two"), train_rows(tmp_path / "one")
    assert [r["step"] for r in got] == [1, 2]
    for a, b in zip(got, want):
        for metric in ("loss", "grad_norm", "logps/chosen", "logps/rejected", "rewards/margins", "kl", "nll_loss"):
            if metric in b:
                assert a[metric] == pytest.approx(b[metric], abs=1e-4), (a["step"], metric)
    log = (tmp_path / "two" / "train.log").read_text()
    assert ("reference: none" in log) == (name == "simpo")


def test_ctrl_c_under_torchrun_stops_every_rank_at_the_same_step_and_resume_checks_the_process_count(tmp_path):
    """A terminal's Ctrl-C reaches torchrun and both workers (one process group); torchrun forwards it once more.
    Both ranks checkpoint at the same step and exit 130; the launcher's own report of the signal is torch's, not
    ours (no traceback runs through tidpo_cli). The checkpoint names its 2 processes: one process may not resume it."""
    import signal
    import time

    from tidpo_cli.checkpoint import list_checkpoints
    from tidpo_cli.manifest import Layout, check_files

    run_dir = tmp_path / "run"
    args = ["loss=dpo", *BASE, *ZERO["zero2"], "trainer.max_steps=200", "trainer.grad_accum=1",
            "trainer.save_every=0", f"hydra.run.dir={run_dir}"]
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             "-m", "tidpo_cli.cli", "train", *args], cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    deadline = time.time() + 300
    while not ((run_dir / "metrics.jsonl").exists() and len(train_rows(run_dir)) >= 3):
        assert proc.poll() is None and time.time() < deadline, proc.stdout.read()[-3000:]
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGINT)
    output, _ = proc.communicate(timeout=120)
    traceback_files = [line for line in output.splitlines() if line.strip().startswith('File "')]
    assert not [line for line in traceback_files if "tidpo_cli" in line], output[-3000:]
    assert output.count("tidpo: Ctrl-C: saving a checkpoint") == 1  # said once, by rank 0
    saved = list_checkpoints(run_dir)
    assert len(saved) == 1 and check_files(saved[0]) is None, output[-3000:]
    step = int(saved[0].name.split("-")[1])
    assert (saved[0] / "rng-rank0.json").is_file() and (saved[0] / "rng-rank1.json").is_file()
    assert train_rows(run_dir)[-1]["step"] == step  # both ranks stopped after the same step
    assert Layout.read(saved[0]).world == 2 and Layout.read(saved[0]).engine == "deepspeed-zero2"
    assert not (run_dir / "run.lock").exists()

    alone = run_tidpo(["train", *args], cwd=tmp_path)
    assert alone.returncode == 2 and "Traceback" not in alone.stderr
    assert "written by 2 processes, this run has 1" in alone.stderr and "--nproc_per_node" in alone.stderr
    resumed = torchrun([*args[:-2], f"trainer.max_steps={step + 2}", args[-1]], cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert [r["step"] for r in train_rows(run_dir)] == list(range(1, step + 3))


# One process under ZeRO-3 (gloo): two training steps record ZeRO-3's fetch trace; anchors sampled with the weights
# gathered must leave that trace, the hooks and the partitioning as they were, and equal the plain model's anchors.
ZERO3_ENGINE = r"""
import json, torch, deepspeed
from transformers import LlamaConfig, LlamaForCausalLM
from tidpo_cli.anchors import generate
from tidpo_cli.distributed import setup
setup(torch.device("cpu"), deepspeed_enabled=True)
torch.manual_seed(0)
model = LlamaForCausalLM(LlamaConfig(vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                     num_attention_heads=2, num_key_value_heads=2, pad_token_id=0, eos_token_id=1))
contexts = [torch.tensor([5, 6, 7]), torch.tensor([8, 9])]
sample = dict(pad_id=0, eos_id=1, max_new_tokens=8, temperature=1.0, top_k=0, top_p=1.0, seed=3)
want = generate(model, contexts, **sample)
config = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1,
          "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}
engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=0.0), config=config)
offload = engine.optimizer.parameter_offload
coordinator = offload.get_param_coordinator()
ids = torch.tensor([[5, 6, 7, 8], [8, 9, 10, 11]])
def train_step():
    engine.backward(engine(input_ids=ids, labels=ids).loss)
    engine.step()
train_step(); train_step()
"""

ZERO3_GENERATION = ZERO3_ENGINE + r"""
hooks = [h.id for h in offload.forward_hooks + offload.backward_hooks]
out = {"trace_before": coordinator.is_complete_trace()}
linear = torch.nn.functional.linear  # ZeRO-3's own since deepspeed.initialize; torch's during the generation only
got = generate(engine, contexts, **sample, zero3_weights="gathered")
out["linear_back"] = torch.nn.functional.linear is linear and linear is not torch._C._nn.linear
out["trace_after_generation"] = coordinator.is_complete_trace()
out["hooks_kept"] = hooks == [h.id for h in offload.forward_hooks + offload.backward_hooks]
out["partitioned"] = all(p.numel() == 0 for p in engine.module.parameters())
train_step()
out["trace_after_step"] = coordinator.is_complete_trace()
out["same_anchors"] = [g.tolist() for g in got] == [w.tolist() for w in want]
print("RESULT" + json.dumps(out))
"""


def test_zero3_gathered_sampling_keeps_the_fetch_trace(tmp_path):
    """DeepSpeed's `unwrap_model_for_generation` registers ZeRO-3's hooks anew after the generation, which
    invalidates the trace, and every training step after a generation ran without it."""
    result = subprocess.run([sys.executable, "-c", ZERO3_GENERATION], cwd=tmp_path, capture_output=True, text=True,
                            timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.split("RESULT")[-1])
    assert out == {"trace_before": True, "trace_after_generation": True, "linear_back": True, "hooks_kept": True,
                   "partitioned": True, "trace_after_step": True, "same_anchors": True}


ZERO3_COMPILED = ZERO3_ENGINE + r"""
from torch._dynamo.utils import counters
def compiled(contexts):
    return generate(engine, contexts, **sample, zero3_weights="gathered", compile=True)
out = {"same_anchors": [g.tolist() for g in compiled(contexts)] == [w.tolist() for w in want]}
graphs = counters["stats"]["unique_graphs"]
out["compiled"] = graphs > 0
train_step()  # the weights partitioned again, and gathered anew into other storage for the next generation
others = [torch.tensor([7, 6]), torch.tensor([9, 8, 7])]
out["same_anchors_after_a_step"] = ([g.tolist() for g in compiled(others)]
                                    == [w.tolist() for w in generate(model, others, **sample)])
out["no_recompile"] = counters["stats"]["unique_graphs"] == graphs
train_step()
out["trace_after_step"] = coordinator.is_complete_trace()
out["partitioned"] = all(p.numel() == 0 for p in engine.module.parameters())
print("RESULT" + json.dumps(out))
"""


@pytest.mark.slow
def test_zero3_compiled_sampling_on_the_twin_draws_the_eager_anchors_and_compiles_once(tmp_path):
    """`loss.anchor.compile` under ZeRO-3 (on by default on CUDA): HF's static cache and compiled decode step on the
    gathered twin, compiled for real on the CPU. The same anchors as the plain model eager; after a training step
    (weights partitioned, then gathered again into new storage) a generation in the same buckets compiles nothing
    new, and ZeRO-3's trace and partitioning are as they were."""
    result = subprocess.run([sys.executable, "-c", ZERO3_COMPILED], cwd=tmp_path, capture_output=True, text=True,
                            timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.split("RESULT")[-1])
    assert out == {"same_anchors": True, "compiled": True, "same_anchors_after_a_step": True, "no_recompile": True,
                   "trace_after_step": True, "partitioned": True}


def test_a_command_leaves_its_process_group_before_the_process_ends(tmp_path):
    """`tidpo train` under DeepSpeed joins a process group (one of one here, gloo); the command destroys it at its
    end, rather than leaving it to the interpreter's exit (distributed.close)."""
    from helpers import QUICK

    code = ("import sys, torch; from tidpo_cli.cli import main; main(sys.argv[1:]); "
            "print('GROUP', torch.distributed.is_initialized())")
    args = ["train", "loss=dpo", *QUICK, "deepspeed=zero2", "trainer.save_final=false", "trainer.eval_before=false",
            f"hydra.run.dir={tmp_path / 'run'}"]
    result = subprocess.run([sys.executable, "-c", code, *args], cwd=tmp_path, capture_output=True, text=True,
                            timeout=300, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "DeepSpeed ZeRO-2" in (tmp_path / "run" / "train.log").read_text()  # it did join a group
    assert "GROUP False" in result.stdout

    # and when the command ends on an error after it joined the group: exit 2, the group gone all the same
    code = ("import sys, torch; from tidpo_cli.cli import main\ntry:\n    main(sys.argv[1:])\n"
            "finally:\n    print('GROUP', torch.distributed.is_initialized())")
    missing = tmp_path / "no-such-checkpoint"
    result = subprocess.run([sys.executable, "-c", code, *args[:-1], f"trainer.resume={missing}",
                             f"hydra.run.dir={tmp_path / 'again'}"], cwd=tmp_path, capture_output=True, text=True,
                            timeout=300, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert result.returncode == 2, result.stderr[-3000:]
    assert str(missing) in result.stderr and "Traceback" not in result.stderr
    assert "GROUP False" in result.stdout


def test_a_command_that_joined_a_group_ends_without_the_interpreters_teardown(tmp_path):
    """The process entry (`tidpo`, `python -m tidpo_cli.cli`) ends a command that joined a process group with
    os._exit after the exit handlers, so gloo's threads, which outlive the group under DeepSpeed, are never torn
    down with the interpreter (cli.entry): the command's status (0, or 2 on a clean error), its output flushed
    (stdout is a pipe, block-buffered), the exit handlers run, and no object destroyed at teardown. A command
    that joined no group ends as any Python program does."""
    from helpers import QUICK

    code = ("import atexit, sys\n"
            "class Teardown:\n"
            "    def __del__(self): print('TEARDOWN', flush=True)\n"
            "sentinel = Teardown()\n"
            "atexit.register(lambda: print('EXITFUNC'))\n"
            "from tidpo_cli.cli import entry\n"
            "entry()\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-c", code, *args], cwd=tmp_path, capture_output=True, text=True,
                              timeout=300, env=env)

    train = ["train", "loss=dpo", *QUICK, "deepspeed=zero2", "trainer.save_final=false", "trainer.eval_before=false"]
    done = run(*train, f"hydra.run.dir={tmp_path / 'run'}")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "DeepSpeed ZeRO-2" in (tmp_path / "run" / "train.log").read_text()  # it joined a group (of one)
    assert "done." in done.stdout and "run dir:" in done.stdout and "EXITFUNC" in done.stdout
    assert "TEARDOWN" not in done.stdout
    assert [r["step"] for r in train_rows(tmp_path / "run")] == [1, 2, 3]  # every row written, whole

    missing = tmp_path / "no-such-checkpoint"
    failed = run(*train, f"trainer.resume={missing}", f"hydra.run.dir={tmp_path / 'again'}")
    assert failed.returncode == 2 and str(missing) in failed.stderr and "Traceback" not in failed.stderr
    assert "EXITFUNC" in failed.stdout and "TEARDOWN" not in failed.stdout

    plain = run("--version")  # no group: the interpreter's own end
    assert plain.returncode == 0 and "tidpo " in plain.stdout
    assert "EXITFUNC" in plain.stdout and "TEARDOWN" in plain.stdout
