"""Fixtures shared by several test files."""

import os

import pytest

from helpers import RUN, run_tidpo

# Every process a test starts (tidpo, torchrun and its ranks) prints its Python stacks if it dies of a signal, so a
# rank that aborts says where: in tidpo's code, in PyTorch's teardown, or with the interpreter already finalizing.
os.environ.setdefault("PYTHONFAULTHANDLER", "1")


@pytest.fixture(scope="session")
def uninterrupted(tmp_path_factory):
    """One uninterrupted run per loss, shared by the tests that compare against it."""
    runs = {}
    for loss in ("dpo", "tidpo"):
        run_dir = tmp_path_factory.mktemp("ref") / loss
        result = run_tidpo(["train", *RUN, f"loss={loss}", f"hydra.run.dir={run_dir}"], cwd=run_dir.parent)
        assert result.returncode == 0, result.stderr[-2000:]
        runs[loss] = run_dir
    return runs
