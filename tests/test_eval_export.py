"""`tidpo eval` and `tidpo export` on real runs: numbers against an independent per-pair computation and against
training's own held-out evaluation; final/, checkpoints and LoRA runs; user mistakes."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from helpers import HH_RLHF, QUICK, compose_config, run_tidpo
from tidpo_cli.cli import main
from tidpo_cli.data.splits import load_splits
from tidpo_cli.errors import UserError
from tidpo_cli.tokenizer import build_byte_tokenizer
from tidpo_cli.trainer import train

RUN = [*QUICK, "trainer.max_steps=8", "trainer.save_every=4", "trainer.keep_last=null", "trainer.lr=5e-3",
       "trainer.reference_cache=auto"]


@pytest.fixture(scope="module")
def dpo_run(tmp_path_factory):
    """A short DPO run launched as a user would (so .hydra/overrides.yaml exists), with the reference cache on: the
    evaluations below read the reference's log-probs from it (test_eval_reads_the_runs_reference_cache)."""
    root = tmp_path_factory.mktemp("eval")
    result = run_tidpo(["train", "loss=dpo", *RUN, f"hydra.run.dir={root / 'run'}"], cwd=root)
    assert result.returncode == 0, result.stderr
    return root / "run"


def report(out):
    return json.loads((out / "eval.json").read_text())


def sequence_logp(model, prompt, response):
    """log p(response | prompt), one unpadded row at a time: nothing shared with the batched code."""
    ids = torch.tensor([prompt + response])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, :-1].double()
    logps = torch.log_softmax(logits, -1)[torch.arange(len(ids[0]) - 1), ids[0, 1:]]
    return float(logps[len(prompt) - 1:].sum())


def test_eval_matches_a_per_pair_computation_and_the_runs_own_eval(dpo_run, tmp_path, capsys):
    main(["eval", str(dpo_run), "--out", str(tmp_path / "e")])
    got = report(tmp_path / "e")
    assert got["reference"] == str(dpo_run / "reference") and got["model"] == str(dpo_run / "final")
    assert got["split"] == "eval" and got["pairs"] == 16 and got["loss"]["name"] == "dpo"

    # Independent: each held-out pair scored alone with the saved final/ and reference/ models.
    cfg = compose_config(["loss=dpo", *RUN])
    pairs = load_splits(cfg.data, build_byte_tokenizer(), seed=cfg.seed).eval
    policy = AutoModelForCausalLM.from_pretrained(dpo_run / "final")
    reference = AutoModelForCausalLM.from_pretrained(dpo_run / "reference")
    margins, chosen_logps, tokens = [], [], 0
    for p in pairs:
        rewards = [0.1 * (sequence_logp(policy, p.prompt_ids, r) - sequence_logp(reference, p.prompt_ids, r))
                   for r in (p.chosen_ids, p.rejected_ids)]
        margins.append(rewards[0] - rewards[1])
        chosen_logps.append(sequence_logp(policy, p.prompt_ids, p.chosen_ids))
        tokens += len(p.chosen_ids)
    m = got["metrics"]
    assert m["rewards/accuracies"] == pytest.approx(sum(x > 0 for x in margins) / len(margins))
    assert m["rewards/margins"] == pytest.approx(sum(margins) / len(margins), abs=1e-5)
    assert m["logps/chosen"] == pytest.approx(sum(chosen_logps) / len(pairs), abs=1e-3)
    assert m["logps/chosen_per_token"] == pytest.approx(sum(chosen_logps) / tokens, abs=1e-4)

    # The run's own final held-out evaluation logged the same numbers.
    last_eval = [json.loads(line) for line in (dpo_run / "metrics.jsonl").read_text().splitlines()
                 if "eval/loss" in line][-1]
    assert last_eval["step"] == 8
    for name in ("loss", "rewards/accuracies", "rewards/margins", "logps/rejected"):
        assert m[name] == pytest.approx(last_eval[f"eval/{name}"], abs=1e-5)

    table = (tmp_path / "e" / "eval.md").read_text()
    assert "| rewards/accuracies |" in table and str(dpo_run / "reference") in table
    assert "| rewards/accuracies |" in capsys.readouterr().out


def test_eval_reads_the_runs_reference_cache(dpo_run, tmp_path, capsys, monkeypatch):
    """The run filled reference_cache/ with every pair's sequences: `tidpo eval` reads them and makes no reference
    forward, with the numbers of an evaluation that runs the reference (to float rounding: other batches). Another
    data length is another key: scored once, written, read by the next evaluation."""
    from tidpo_cli import evaluation

    forwards = []
    load = evaluation.load_reference

    def counted(*args):
        reference, name = load(*args)
        reference.register_forward_pre_hook(lambda module, inputs: forwards.append(1))
        return reference, name
    monkeypatch.setattr(evaluation, "load_reference", counted)

    def evaluated(name, *overrides):
        forwards.clear()
        main(["eval", str(dpo_run), *overrides, "--out", str(tmp_path / name)])
        lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("reference cache")]
        return report(tmp_path / name)["metrics"], lines, len(forwards)

    cached, lines, ran = evaluated("cached")
    assert len(lines) == 1 and lines[0].startswith(f"reference cache {dpo_run / 'reference_cache'}/")
    assert lines[0].endswith(": 32 sequences read, 0 computed") and ran == 0  # 16 held-out pairs
    live, lines, ran = evaluated("live", "trainer.reference_cache=off")
    assert lines == [] and ran > 0
    for name in ("loss", "rewards/margins", "rewards/chosen", "rewards/rejected", "rewards/accuracies"):
        assert cached[name] == pytest.approx(live[name], rel=1e-6, abs=1e-6), name

    short = ("data.max_length=40", "--split", "train", "--max-pairs", "6")
    first, lines, ran = evaluated("short1", *short)
    assert lines[0].endswith(": 0 sequences read, 12 computed") and ran > 0
    again, lines, ran = evaluated("short2", *short)
    assert lines[0].endswith(": 12 sequences read, 0 computed") and ran == 0
    assert again["rewards/margins"] == pytest.approx(first["rewards/margins"], rel=1e-6, abs=1e-6)


def test_eval_finds_auto_in_the_run_or_in_its_sweep(tmp_path):
    """`auto` is the run's reference_cache/ or, for a job of a sweep (sweep/0), the sweep's; a DIR is itself."""
    from tidpo_cli.evaluation import cache_root

    job = tmp_path / "sweep" / "0"
    job.mkdir(parents=True)
    assert cache_root("auto", job) is None and cache_root("off", job) is None
    (tmp_path / "sweep" / "reference_cache").mkdir()
    assert cache_root("auto", job) == tmp_path / "sweep" / "reference_cache"
    (job / "reference_cache").mkdir()
    assert cache_root("auto", job) == job / "reference_cache"
    assert cache_root(str(tmp_path / "elsewhere"), job) == tmp_path / "elsewhere"


def test_eval_of_a_checkpoint_overrides_and_samples(dpo_run, tmp_path):
    out = tmp_path / "c"
    main(["eval", str(dpo_run / "checkpoints" / "step-4"), "loss.beta=0.2", "--split", "train", "--max-pairs", "5",
          "--samples", "2", "--sample-prompts", "3", "--max-new-tokens", "6", "--out", str(out)])
    got = report(out)
    assert got["model"] == str(dpo_run / "checkpoints" / "step-4") and got["split"] == "train"
    assert got["pairs"] == 5 and got["loss"]["beta"] == 0.2 and got["overrides"] == ["loss.beta=0.2"]
    assert len(got["samples"]) == 3 and all(len(s["samples"]) == 2 for s in got["samples"])
    assert got["samples"][0]["prompt"] and got["samples"][0]["chosen"]
    assert "Sample 2:" in (out / "eval.md").read_text()
    # beta doubles every reward: the margins of step 4 at beta 0.2 are twice those at beta 0.1.
    main(["eval", str(dpo_run / "checkpoints" / "step-4"), "--split", "train", "--max-pairs", "5",
          "--out", str(tmp_path / "c1")])
    base = report(tmp_path / "c1")["metrics"]["rewards/margins"]
    assert got["metrics"]["rewards/margins"] == pytest.approx(2 * base, rel=1e-4)
    assert base != 0


@pytest.mark.skipif(not HH_RLHF.exists(), reason=f"{HH_RLHF} not found (the shared data sits beside the checkout)")
def test_eval_on_another_data_config(dpo_run, tmp_path):
    main(["eval", str(dpo_run), "data=hh_rlhf", f"data.eval_path={HH_RLHF}", "data.max_length=256",
          "data.max_prompt_length=128", "--max-pairs", "6", "--out", str(tmp_path / "h")])
    got = report(tmp_path / "h")
    assert got["pairs"] == 6 and got["data"]["eval_path"] == str(HH_RLHF)
    assert 0 <= got["metrics"]["rewards/accuracies"] <= 1


def test_export_from_final_and_checkpoint_load_with_from_pretrained(dpo_run, tmp_path):
    main(["export", str(dpo_run), str(tmp_path / "a")])
    main(["export", str(dpo_run / "checkpoints" / "step-8"), str(tmp_path / "b"), "--dtype", "bfloat16"])
    a = AutoModelForCausalLM.from_pretrained(tmp_path / "a")
    b = AutoModelForCausalLM.from_pretrained(tmp_path / "b")
    final = AutoModelForCausalLM.from_pretrained(dpo_run / "final")
    assert b.dtype == torch.bfloat16
    for (name, p), (_, q), (_, r) in zip(a.state_dict().items(), b.state_dict().items(), final.state_dict().items()):
        assert torch.equal(p, r), name
        assert torch.equal(q, r.to(torch.bfloat16)), name
    assert (tmp_path / "a" / "tokenizer.json").is_file()


def test_export_of_a_lora_run_is_merged(tmp_path):
    cfg = compose_config([*RUN, "model.lora.enabled=true", "model.lora.r=4", "loss=dpo"])
    train(cfg, tmp_path / "lora")
    main(["export", str(tmp_path / "lora" / "checkpoints" / "step-8"), str(tmp_path / "out")])
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    final = AutoModelForCausalLM.from_pretrained(tmp_path / "lora" / "final")
    assert not any("lora" in n for n in exported.state_dict())
    x = torch.tensor([[257, 65, 66, 67]])
    with torch.no_grad():
        assert torch.allclose(exported(x).logits, final(x).logits, atol=1e-6)
    # eval of the LoRA run uses the base (the run's reference/) as the reference
    main(["eval", str(tmp_path / "lora"), "--out", str(tmp_path / "e")])
    assert report(tmp_path / "e")["reference"] == str(tmp_path / "lora" / "reference")


@pytest.mark.parametrize("argv, words", [
    (["eval", "{missing}"], ["does not exist", "run directory"]),
    (["eval", "{run}", "loss.beta=-1"], ["loss.beta=-1.0", "> 0"]),
    (["eval", "{run}", "data=nope"], ["data", "nope"]),
    (["eval", "{bare}", "data=synthetic"], ["reference model", "--reference"]),
    # a model outside a run has no data config of its own: not the default config's demo pairs, but a request
    (["eval", "{bare}"], ["not inside a tidpo run", "data=preference data.path=", "data=synthetic", "--reference"]),
    (["eval", "{bare}", "--reference", "{run}/reference"], ["not inside a tidpo run", "data="]),
    (["eval", "{run}", "--samples", "-1"], ["--samples"]),
    (["export", "{run}", "{run}"], ["already holds files", "--overwrite"]),
    (["export", "{run}/metrics.jsonl", "{tmp}/x"], ["is a file"]),
])
def test_user_mistakes_are_one_clear_line(dpo_run, tmp_path, capsys, argv, words):
    bare = tmp_path / "bare"
    if "{bare}" in argv:
        main(["export", str(dpo_run), str(bare)])
    names = {"missing": tmp_path / "nope", "run": dpo_run, "bare": bare, "tmp": tmp_path}
    with pytest.raises(SystemExit) as caught:
        main([a.format(**names) for a in argv])
    assert caught.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("tidpo: error:")
    for word in words:
        assert word in err, err


def test_bare_model_with_a_given_reference(dpo_run, tmp_path):
    main(["export", str(dpo_run), str(tmp_path / "m")])
    main(["eval", str(tmp_path / "m"), "loss=dpo", *RUN[:2], "--reference", str(dpo_run / "reference"),
          "--out", str(tmp_path / "e")])
    got = report(tmp_path / "e")
    main(["eval", str(dpo_run), "--out", str(tmp_path / "r")])
    assert got["metrics"]["rewards/margins"] == pytest.approx(report(tmp_path / "r")["metrics"]["rewards/margins"])


def test_compose_errors_are_user_errors():
    with pytest.raises(UserError):
        compose_config(["no_such_group=x"])
