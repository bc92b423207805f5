"""logger=wandb for real, in offline mode: the offline run's history read back from its .wandb file."""

import json
import struct

from wandb.proto import wandb_internal_pb2

from helpers import QUICK, run_tidpo

SECRET = "wandb-key-that-must-not-leak-0123456789"
ENV = {"WANDB_API_KEY": SECRET, "WANDB_SILENT": "true"}


def wandb_records(path):
    """Records of a .wandb file: a 7-byte header, then 32 KiB blocks of LevelDB-log records
    (checksum u32, length u16, type u8: 1 full, 2 first, 3 middle, 4 last)."""
    data, block, pos, chunks = path.read_bytes(), 32768, 7, []
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if length == 0 and kind == 0:
            pos += left
            continue
        chunks.append(data[pos + 7:pos + 7 + length])
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(b"".join(chunks))
            chunks = []
            yield record


def offline_runs(run_dir):
    return sorted((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))


def history(path):
    rows = []
    for record in wandb_records(path):
        if record.WhichOneof("record_type") == "history":
            items = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            rows.append({k: v for k, v in items.items() if not k.startswith("_")})
    return rows


def run_info(path):
    for record in wandb_records(path):
        if record.WhichOneof("record_type") == "run":
            return record.run


def test_offline_run_has_the_history_of_metrics_jsonl_and_no_key(tmp_path):
    run_dir = tmp_path / "run"
    result = run_tidpo(["train", *QUICK, "logger=wandb", "logger.wandb.mode=offline", "logger.wandb.tags=[a,b]",
                        f"hydra.run.dir={run_dir}"], cwd=tmp_path, env=ENV)
    assert result.returncode == 0, result.stderr[-2000:]
    (offline,) = offline_runs(run_dir)
    jsonl = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    logged = history(offline)
    assert [r["step"] for r in logged] == [r["step"] for r in jsonl]
    for ours, theirs in zip(jsonl, logged):
        assert set(ours) == set(theirs)
        assert theirs["loss" if "loss" in ours else "eval/loss"] == ours["loss" if "loss" in ours else "eval/loss"]
    info = run_info(offline)
    assert info.display_name == f"train-{run_dir.name}"
    assert list(info.tags) == ["a", "b"]
    config = json.loads(next(i.value_json for i in info.config.update if i.key == "loss"))
    assert config["name"] == "tidpo" and config["beta"] == 0.1
    # The API key is nowhere: not printed, not in any file of the run dir.
    assert SECRET not in result.stdout + result.stderr
    for path in run_dir.rglob("*"):
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), path


def test_resume_continues_the_same_wandb_run(tmp_path):
    run_dir = tmp_path / "run"
    args = ["train", *QUICK, "logger=wandb", "logger.wandb.mode=offline", "trainer.save_every=2",
            f"hydra.run.dir={run_dir}"]
    assert run_tidpo([*args, "trainer.max_steps=2"], cwd=tmp_path, env=ENV).returncode == 0
    result = run_tidpo([*args, "trainer.max_steps=4"], cwd=tmp_path, env=ENV)
    assert result.returncode == 0 and "resumed from" in result.stdout
    first, second = offline_runs(run_dir)
    assert first.name == second.name  # run-<id>.wandb: one wandb run id for both starts
    assert [r["step"] for r in history(second) if "loss" in r] == [3, 4]


def test_sweep_jobs_share_a_group_and_number_their_names(tmp_path):
    result = run_tidpo(["train", "-m", "loss.beta=0.05,0.1", *QUICK, "logger=wandb", "logger.wandb.mode=offline"],
                       cwd=tmp_path, env=ENV)
    assert result.returncode == 0, result.stderr[-2000:]
    infos = [run_info(p) for p in sorted((tmp_path / "runs" / "multirun").rglob("run-*.wandb"))
             if "offline-run" in p.parent.name]
    assert len(infos) == 2
    assert infos[0].run_group == infos[1].run_group and infos[0].run_group.startswith("train-")
    assert sorted(i.display_name for i in infos) == [f"{infos[0].run_group}-0", f"{infos[0].run_group}-1"]
