"""The token-weight study's script (scripts/experiments/token_weights/run.py): the shares of the weightings that need
no model by hand, reading a run's point back from its directory, a tiny sweep end to end with a rerun that resumes,
and the published report matching its own data."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import REPO, load_script

SCRIPT = REPO / "scripts" / "experiments" / "token_weights" / "run.py"
RESULTS = REPO / "docs" / "results"


def study():
    return load_script(SCRIPT, "token_weights_run")


def test_uniform_and_prior_shares_by_hand():
    from tidpo_cli.data.examples import TokenizedPair

    # one pair, 4-token responses; chosen marks position 1, rejected positions 1 and 2
    pair = TokenizedPair([7, 8], [1, 2, 3, 4], [1, 5, 6, 4], "row 0", False, critical=((1,), (1, 2)))
    shares = study().weighting_shares([pair], pad_id=0, sigma_div=4.0)
    uniform = shares["uniform weights"]
    assert uniform["critical_share"] == pytest.approx((1 / 4 + 2 / 4) / 2)
    assert uniform["last_share"] == pytest.approx(1 / 4)
    # Gaussian over t = 0..3, mu = 1.5, sigma = 4 / 4 = 1: weights exp(-(t - 1.5)^2 / 2)
    g = [math.exp(-((t - 1.5) ** 2) / 2) for t in range(4)]
    prior = shares["Gaussian prior alone"]
    assert prior["critical_share"] == pytest.approx((g[1] / sum(g) + (g[1] + g[2]) / sum(g)) / 2)
    assert prior["last_share"] == pytest.approx(g[3] / sum(g))


def test_a_run_directory_names_its_point():
    point = study().point
    assert point(Path("target=margin,attribution=grad_x_input,exclude_last=True,data.flip_labels=0.4,seed=2")) == {
        "noise": 0.4, "seed": 2, "method": "margin · grad_x_input · exclude_last", "target": "margin",
        "attribution": "grad_x_input", "exclude_last": True}
    assert point(Path("loss=dpo,data.flip_labels=0.0,seed=1"))["method"] == "dpo (uniform weights)"


def test_a_tiny_sweep_runs_end_to_end_and_scoring_again_reads_its_caches(tmp_path):
    """One invocation (warm-up, both multiruns, scoring, report); then the scoring again, in process, from the files
    the first left (that `tidpo train` skips finished runs is the noise study's test: a rerun costs a process start
    per multirun)."""
    out = tmp_path / "study"
    args = [sys.executable, str(SCRIPT), "--out", str(out), "--targets", "sequence_logp,margin",
            "--attributions", "grad_x_input", "--exclude-last", "true", "--noise", "0.5", "--seeds", "0",
            "--steps", "3", "--warmup-steps", "4", "--eval-size", "16"]
    first = subprocess.run(args, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    payload = json.loads((out / "token_weights.json").read_text())
    assert list(payload["summary"]) == ["sequence_logp · grad_x_input · exclude_last",
                                        "margin · grad_x_input · exclude_last", "dpo (uniform weights)"]
    runs = {r["target"]: r for r in payload["runs"]}
    for run in runs.values():
        assert 0 <= run["accuracy"] <= 1 and 0 <= run["critical"] <= 1
        assert 0 < run["critical_share_start"] < 1 and 0 < run["last_share_end"] < 1
    for run in (runs["margin"], runs["sequence_logp"]):
        assert 0 < run["raw_critical_start"] < 1 and 0 < run["raw_before_end"] < 1
    # the flipped runs trained on swapped labels: their logs say so
    log = out / "sweep" / "target=margin,attribution=grad_x_input,exclude_last=True,data.flip_labels=0.5,seed=0"
    assert "with chosen and rejected swapped" in (log / "train.log").read_text()
    # exclude_last: the last token weighs exactly 1 of n, so its share is the uniform one
    uniform = payload["references"]["uniform weights"]
    assert runs["margin"]["last_share_start"] == pytest.approx(uniform["last_share"]["mean"], rel=1e-5)
    assert runs[None]["critical_share_end"] == uniform["critical_share"]["mean"]  # DPO's weights are uniform
    # with an absolute attribution the margin's weights are sequence_logp's: the two runs are the same
    assert payload["identical_targets"] == {"pairs": 1, "max_abs_difference": 0.0}
    assert payload["summary"] == study().summarize(payload["runs"])  # the summary is that of its own runs
    assert (out / "token_weights.png").stat().st_size > 0
    caches = sorted(out.rglob("*.json"))
    stamps = [path.stat().st_mtime_ns for path in caches]
    records, references, warmup = study().score(out, out / "warmup" / "final", jobs=1)
    assert records == payload["runs"] and references == payload["reference_runs"] and warmup == payload["warmup"]
    assert [path.stat().st_mtime_ns for path in sorted(out.rglob("*.json"))] == stamps  # nothing recomputed


def test_the_published_report_shows_its_own_data():
    payload = json.loads((RESULTS / "token_weights.json").read_text())
    module = study()
    assert payload["summary"] == module.summarize(payload["runs"])  # the summary is that of its own runs
    assert payload["references"] == module.reference_summary(payload["reference_runs"])
    assert payload["identical_targets"] == module.identical_targets(payload["runs"])
    table = module.markdown(payload["summary"], payload["references"], payload["warmup"])
    assert (RESULTS / "token_weights_table.md").read_text() == table
    assert table.strip() in (RESULTS / "token_weights.md").read_text()
    assert len(payload["runs"]) == 78
