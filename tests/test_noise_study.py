"""The label-noise study's script (scripts/experiments/noise_robustness/run.py): its scoring, its summary, a tiny
sweep end to end with a rerun that resumes, and the published report matching its own data."""

import json
import subprocess
import sys

import pytest

from helpers import REPO, load_script

SCRIPT = REPO / "scripts" / "experiments" / "noise_robustness" / "run.py"
RESULTS = REPO / "docs" / "results"


def study():
    return load_script(SCRIPT, "noise_robustness_run")


def test_critical_tokens_are_the_positions_where_chosen_and_rejected_differ():
    right = study().critical_tokens_right
    chosen, rejected = [5, 1, 6, 1, 7, 0], [5, 1, 9, 1, 7, 0]   # position 2 is the critical one
    assert right([5, 1, 6, 1, 8, 0], chosen, rejected)          # wrong elsewhere: still right where it counts
    assert not right([5, 1, 9, 1, 7, 0], chosen, rejected)      # the rejected token
    assert not right([5, 1], chosen, rejected)                  # stopped before it


def test_summary_is_mean_and_sample_std_over_seeds():
    records = [{"method": "dpo", "noise": 0.1, "seed": s, "accuracy": a, "critical": c, "chosen_logp_change": -s}
               for s, a, c in ((0, 0.5, 0.2), (1, 0.7, 0.4), (2, 0.9, 0.9))] + [{"method": "sft_warmup", "critical": 0.3}]
    cell = study().summarize(records)["dpo"]["0.1"]
    assert cell["accuracy"]["mean"] == pytest.approx(0.7) and cell["accuracy"]["std"] == pytest.approx(0.2)
    assert cell["critical"]["mean"] == pytest.approx(0.5) and cell["critical"]["n"] == 3
    assert cell["critical"]["std"] == pytest.approx(((0.09 + 0.01 + 0.16) / 2) ** 0.5)
    assert cell["chosen_logp_change"]["mean"] == pytest.approx(-1.0)


def test_a_tiny_sweep_runs_end_to_end_and_a_rerun_resumes(tmp_path):
    args = [sys.executable, str(SCRIPT), "--out", str(tmp_path / "study"), "--methods", "dpo,tidpo_no_triplet",
            "--noise", "0,0.5", "--seeds", "0", "--steps", "4", "--warmup-steps", "6", "--eval-size", "16"]
    first = subprocess.run(args, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    payload = json.loads((tmp_path / "study" / "noise_robustness.json").read_text())
    assert set(payload["summary"]) == {"dpo", "tidpo_no_triplet"}
    assert set(payload["summary"]["dpo"]) == {"0.0", "0.5"}
    runs = [r for r in payload["runs"] if r["method"] != "sft_warmup"]
    assert len(runs) == 4 and all(0 <= r["accuracy"] <= 1 and 0 <= r["critical"] <= 1 for r in runs)
    assert payload["summary"] == study().summarize(payload["runs"])  # the summary is that of its own runs
    # the flipped run trained on swapped labels: its log says so
    log = (tmp_path / "study" / "sweep" / "loss=dpo,data.flip_labels=0.5,seed=0" / "train.log").read_text()
    assert "with chosen and rejected swapped" in log
    assert (tmp_path / "study" / "noise_robustness.png").stat().st_size > 0
    again = subprocess.run(args, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert (again.stdout + again.stderr).count("already finished") == 5  # the warm-up and the 4 runs
    assert json.loads((tmp_path / "study" / "noise_robustness.json").read_text())["runs"] == payload["runs"]


def test_the_published_report_shows_its_own_data():
    payload = json.loads((RESULTS / "noise_robustness.json").read_text())
    assert payload["summary"] == study().summarize(payload["runs"])  # the summary is that of its own runs
    assert [r for r in payload["runs"] if r["method"] == "sft_warmup"] == [payload["warmup"]]
    table = study().markdown(payload["summary"], payload["warmup"])
    assert (RESULTS / "noise_robustness_table.md").read_text() == table
    assert table.strip() in (RESULTS / "noise_robustness.md").read_text()
    assert len([r for r in payload["runs"] if r["method"] != "sft_warmup"]) == 60
