"""`tidpo eval`, `export`, `explain` and `benchmark` on a model that is missing, truncated or changed on disk, into
an output that exists already, and onto a full disk: each ends in one line `tidpo: error: ...` naming the file,
exit code 2, no traceback, and leaves nothing half-written behind.

One short run (final/, reference/, two checkpoints), trained in a process of its own, is shared; a test that
damages it works on a copy. The commands run through `tidpo_cli.cli.main` in this process, their stderr taken at
the file descriptor (so transformers' and lm-eval's own lines count too); a fresh process costs seconds of imports,
so one test runs the real entry point in one. An exception of ours would fail the test with its traceback. The
full disk is a small tmpfs (we are root here; elsewhere those tests skip).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from contextlib import contextmanager
from pathlib import Path

import pytest

from helpers import QUICK, run_tidpo
from tidpo_cli.cli import main

RUN = [*QUICK, "loss=dpo", "trainer.max_steps=4", "trainer.save_every=2", "trainer.keep_last=null"]
DISK = 512 << 10  # smaller than the model (660 kB of weights)
PAGE = 4096
TASK = "tidpo_fault_mc"


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A DPO run with final/, reference/ and checkpoints step-2 and step-4 (each with its manifest). Not to be
    damaged: copy it first (`copy_run`)."""
    root = tmp_path_factory.mktemp("faults")
    result = run_tidpo(["train", *RUN, f"hydra.run.dir={root / 'run'}"], cwd=root)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (root / "run" / "checkpoints" / "step-4" / "manifest-rank0.json").is_file()
    return root / "run"


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory) -> Path:
    """A two-question multiple-choice task in local files, so that `tidpo benchmark` needs no hub."""
    root = tmp_path_factory.mktemp("tasks")
    rows = [{"question": "Copy: a b", "choices": ["a b", "b a"], "label": 0},
            {"question": "Copy: x", "choices": ["y", "x"], "label": 1}]
    (root / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    (root / f"{TASK}.yaml").write_text(
        f"task: {TASK}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {root / 'rows.jsonl'}\n"
        "test_split: test\noutput_type: multiple_choice\n"
        'doc_to_text: "Question: {{question}}\\nAnswer:"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: label\n'
        "metric_list:\n  - metric: acc\nmetadata:\n  version: 1.0\n", encoding="utf-8")
    return root


@pytest.fixture(params=["eval", "export", "explain", "benchmark"])
def command(request) -> str:
    if request.param == "benchmark":
        pytest.importorskip("lm_eval", reason='tidpo benchmark needs lm-eval (pip install "tidpo[benchmark]")')
    return request.param


def copy_run(run: Path, where: Path) -> Path:
    return Path(shutil.copytree(run, where, symlinks=True))


def argv(command: str, model: Path, out: Path, task_dir: Path, *extra: str) -> list[str]:
    """The command on `model`, writing to `out` (export's OUT, else --out)."""
    if command == "export":
        return ["export", str(model), str(out), *extra]
    if command == "explain":
        return ["explain", str(model), "--prompt", "Copy: a b", "--response", "a b", "--device", "cpu",
                "--out", str(out), *extra]
    if command == "benchmark":
        return ["benchmark", str(model), "--tasks", TASK, "--include-path", str(task_dir), "--device", "cpu",
                "--batch-size", "2", "--out", str(out), *extra]
    return ["eval", str(model), "--device", "cpu", "--out", str(out), *extra]


def tidpo(args: list[str], capfd) -> tuple[int, str]:
    """(exit code, stderr) of `tidpo ARGS`."""
    capfd.readouterr()
    try:
        main(args)
        code = 0
    except SystemExit as e:
        code = e.code
    return code, capfd.readouterr().err


def one_line_error(code: int, err: str, *words: str) -> str:
    """The single `tidpo: error: ` line of a failed command, checked: exit code 2, no traceback, `words` in it."""
    assert code == 2, (code, err[-3000:])
    assert "Traceback" not in err, err[-3000:]
    errors = [line for line in err.splitlines() if line.startswith("tidpo: error: ")]
    assert len(errors) == 1, err[-3000:]
    for word in words:
        assert word in errors[0], (word, errors[0])
    return errors[0]


def left_in(directory: Path) -> list[str]:
    return sorted(str(p.relative_to(directory)) for p in directory.rglob("*"))


# ------------------------------------------------------------------------------------------------ the model

def test_a_missing_model_is_one_line(command, task_dir, tmp_path, capfd):
    missing = tmp_path / "no-such-run"
    one_line_error(*tidpo(argv(command, missing, tmp_path / "out", task_dir), capfd),
                   str(missing), "does not exist", "RUN/checkpoints/step-N")
    assert left_in(tmp_path) == []


def test_a_truncated_final_model_is_one_line_naming_the_file(command, run, task_dir, tmp_path, capfd):
    damaged = copy_run(run, tmp_path / "run")
    weights = damaged / "final" / "model.safetensors"
    os.truncate(weights, weights.stat().st_size // 2)  # a copy that stopped half-way
    line = one_line_error(*tidpo(argv(command, damaged, tmp_path / "out", task_dir), capfd),
                          str(weights), "truncated or damaged")
    # The fix: the run's newest checkpoint written over final/ (and that works).
    fix = f"tidpo export {damaged / 'checkpoints' / 'step-4'} {damaged / 'final'} --overwrite"
    assert fix in line, line
    assert not (tmp_path / "out").exists()
    if command == "eval":
        assert tidpo(fix.split()[1:], capfd)[0] == 0
        assert tidpo(argv("eval", damaged, tmp_path / "out", task_dir), capfd)[0] == 0


def test_a_checkpoint_with_one_byte_changed_is_one_line_suggesting_another(command, run, task_dir, tmp_path,
                                                                           capfd):
    damaged = copy_run(run, tmp_path / "run")
    checkpoint = damaged / "checkpoints" / "step-4"
    weights = checkpoint / "model.safetensors"
    with open(weights, "r+b") as f:  # one bit of one weight, past the header: the file still loads
        f.seek(weights.stat().st_size // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0x01]))
    one_line_error(*tidpo(argv(command, checkpoint, tmp_path / "out", task_dir), capfd),
                   str(checkpoint), "model.safetensors does not match its checksum",
                   f"older checkpoint {damaged / 'checkpoints' / 'step-2'}", str(damaged / "final"))
    assert not (tmp_path / "out").exists()


def test_a_damaged_optimizer_state_does_not_refuse_the_checkpoint_s_model(run, tmp_path, capfd):
    """Only a resumed run reads a plain checkpoint's optimizer state: export loads the model from its weights."""
    damaged = copy_run(run, tmp_path / "run")
    checkpoint = damaged / "checkpoints" / "step-4"
    os.truncate(checkpoint / "optimizer.pt", 10)
    code, err = tidpo(["export", str(checkpoint), str(tmp_path / "out")], capfd)
    assert code == 0, err[-3000:]
    assert (tmp_path / "out" / "model.safetensors").is_file()


def test_a_final_model_of_another_shape_than_its_config_is_one_line(run, tmp_path, capfd):
    """config.json and model.safetensors of different models: loading would leave a layer with random weights
    (transformers only warns); it is refused, without transformers' table of every key above the line."""
    damaged = copy_run(run, tmp_path / "run")
    config = json.loads((damaged / "final" / "config.json").read_text())
    config["num_hidden_layers"] += 1
    (damaged / "final" / "config.json").write_text(json.dumps(config))
    code, err = tidpo(["export", str(damaged), str(tmp_path / "out")], capfd)
    one_line_error(code, err, str(damaged / "final"), "do not fit its config.json", "weights missing",
                   "model.layers.2.")
    assert "MISSING" not in err and not (tmp_path / "out").exists()


def test_a_checkpoint_of_another_shape_than_its_config_is_one_line(run, tmp_path, capfd):
    """An intact checkpoint (its manifest written anew) whose config.yaml describes another model."""
    from tidpo_cli.manifest import write_manifest

    damaged = copy_run(run, tmp_path / "run")
    checkpoint = damaged / "checkpoints" / "step-4"
    config = checkpoint / "config.yaml"
    config.write_text(config.read_text().replace("hidden_size: 64", "hidden_size: 32"))
    (checkpoint / "manifest-rank0.json").unlink()
    write_manifest(checkpoint, 0, 1)
    one_line_error(*tidpo(["export", str(checkpoint), str(tmp_path / "out")], capfd),
                   str(checkpoint / "model.safetensors"), "does not fit the model its config.yaml describes",
                   "size mismatch")


def test_the_real_entry_point_prints_the_one_line(run, tmp_path):
    """`python -m tidpo_cli.cli`, as a user runs it: a truncated weights file is one line there too."""
    damaged = copy_run(run, tmp_path / "run")
    os.truncate(damaged / "final" / "model.safetensors", 1000)
    result = run_tidpo(["eval", str(damaged), "--out", str(tmp_path / "out")], cwd=tmp_path)
    one_line_error(result.returncode, result.stderr, str(damaged / "final" / "model.safetensors"))
    assert result.stderr.strip().splitlines()[-1].startswith("tidpo: error: ")


# ----------------------------------------------------------------------------------------------- the output

OUTPUT = {"eval": "eval.json", "export": "model.safetensors", "explain": "explain.png", "benchmark": "benchmark.md"}


def test_an_existing_output_is_refused_without_overwrite_and_replaced_with_it(command, run, task_dir, tmp_path,
                                                                              capfd):
    out = tmp_path / "out"
    out.mkdir()
    (out / OUTPUT[command]).write_text("an earlier result\n")
    one_line_error(*tidpo(argv(command, run, out, task_dir), capfd), str(out), "--overwrite")
    assert left_in(out) == [OUTPUT[command]] and (out / OUTPUT[command]).read_text() == "an earlier result\n"

    code, err = tidpo(argv(command, run, out, task_dir, "--overwrite"), capfd)
    assert code == 0, err[-3000:]
    assert (out / OUTPUT[command]).read_bytes() != b"an earlier result\n"
    assert not [name for name in left_in(out) if name.startswith(".")]  # no temporary file stays
    if command == "eval":
        assert json.loads((out / "eval.json").read_text())["pairs"] == 16
    if command in ("eval", "explain", "benchmark"):
        assert f"replaced the earlier {OUTPUT[command]} in {out}" in err


def test_a_run_s_own_report_folder_is_rewritten(run, tmp_path, capfd):
    """RUN/eval (the default) holds the latest report: a second eval replaces it, saying so."""
    own = copy_run(run, tmp_path / "run")
    assert tidpo(["eval", str(own), "--max-pairs", "4"], capfd)[0] == 0
    code, err = tidpo(["eval", str(own), "--max-pairs", "6"], capfd)
    assert code == 0, err[-3000:]
    assert json.loads((own / "eval" / "eval.json").read_text())["pairs"] == 6
    assert f"replaced the earlier eval.json, eval.md in {own / 'eval'}" in err


# ---------------------------------------------------------------------------------------------- a full disk

@contextmanager
def small_disk(where: Path, size: int = DISK):
    """A tmpfs of `size` bytes mounted at `where`, unmounted afterwards whatever happened."""
    where.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                            capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs to fill (root needed): {result.stderr.strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", str(where)], check=False)


def fill(disk: Path, leave: int) -> None:
    """Fill `disk` up to `leave` bytes of free space."""
    stat = os.statvfs(disk)
    with open(disk / "filler", "wb") as f:
        f.write(b"\0" * max(0, stat.f_bavail * stat.f_frsize - leave))


# What is left free for each command: past the small write test made before the model loads, export's model does
# not fit; eval's second file finds no room, nor explain's picture; benchmark's checkpoint, written as an HF
# directory for lm-eval inside --out, does not fit.
ROOM = {"eval": PAGE, "export": None, "explain": 3 * PAGE, "benchmark": None}


def test_a_full_disk_is_one_line_and_leaves_nothing_half_written(command, run, task_dir, tmp_path, capfd):
    with small_disk(tmp_path / "disk") as disk:
        if ROOM[command] is not None:
            fill(disk, leave=ROOM[command])
        source = run / "checkpoints" / "step-4" if command == "benchmark" else run
        one_line_error(*tidpo(argv(command, source, disk / "out", task_dir), capfd),
                       str(disk / "out"), "No space left on device", "free space there")
        assert left_in(disk) == (["filler"] if ROOM[command] is not None else [])


def test_a_full_disk_stops_eval_before_the_model_loads(run, task_dir, tmp_path, capfd):
    with small_disk(tmp_path / "disk") as disk:
        fill(disk, leave=0)
        code, err = tidpo(argv("eval", run, disk / "reports" / "eval", task_dir), capfd)
        one_line_error(code, err, str(disk / "reports" / "eval"), "No space left on device", "--out")
        assert "model " not in err  # nothing was loaded or scored
        assert left_in(disk) == ["filler"]
