"""The two small data files of the SmolLM2 experiments, from HH-RLHF rows: the same pairs as text and as messages.

- `hh_rlhf.jsonl` (+experiment=smollm2_hh): the first ROWS usable rows as they are, "\\n\\nHuman: ...\\n\\nAssistant:
  ..." dialogues;
- `hh_messages.jsonl` (+experiment=smollm2_ultrafeedback_demo): each of those pairs as conversational rows,
  {"prompt": [user/assistant turns up to the last user turn], "chosen": [the chosen reply], "rejected": [...]},
  the layout of UltraFeedback-binarized, for the model's own chat template. Turn texts lose the space after
  "Human:" / "Assistant:" and surrounding whitespace.

A row whose turns cannot be read is left out of both, and counted.

    python scripts/data/hh_demo_files.py --hh path/to/hh-rlhf/test.jsonl.gz --out-dir runs/data --rows 256
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from tidpo_cli.data.examples import BadRow
from tidpo_cli.data.formats import to_example
from tidpo_cli.data.readers import read_rows
from tidpo_cli.errors import UserError

DEFAULT_HH = Path(__file__).resolve().parents[3] / "shared" / "data" / "hh-rlhf-harmless-base" / "test.jsonl.gz"
_MARKER = re.compile(r"\n\n(Human|Assistant):")
_ROLE = {"Human": "user", "Assistant": "assistant"}


def turns(text: str) -> list[dict[str, str]]:
    """The messages of one dialogue text; BadRow when it does not alternate from a Human turn."""
    parts = _MARKER.split(text)
    if parts[0].strip():
        raise BadRow("text before the first turn")
    messages = [{"role": _ROLE[role], "content": content.strip()} for role, content in zip(parts[1::2], parts[2::2])]
    roles = [m["role"] for m in messages]
    if not messages or roles != [("user", "assistant")[i % 2] for i in range(len(roles))]:
        raise BadRow("turns do not alternate from a Human turn")
    return messages


def to_messages(row: dict, where: str) -> dict:
    """One HH row as a conversational row (tidpo's own hh_rlhf split finds the prompt and the replies)."""
    example = to_example(row, "hh_rlhf", None, where)
    prompt = turns(example.prompt.removesuffix("\n\nAssistant:"))
    chosen, rejected = example.chosen.strip(), example.rejected.strip()
    if prompt[-1]["role"] != "user" or not chosen or not rejected or chosen == rejected:
        raise BadRow("no reply to tell apart after the last Human turn")
    return {"prompt": prompt, "chosen": [{"role": "assistant", "content": chosen}],
            "rejected": [{"role": "assistant", "content": rejected}]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hh", type=Path, default=DEFAULT_HH, help=f"HH-RLHF rows (default: {DEFAULT_HH})")
    parser.add_argument("--out-dir", type=Path, default=Path("runs/data"), help="where to write (default: runs/data)")
    parser.add_argument("--rows", type=int, default=256, help="pairs written at most (default: 256)")
    parser.add_argument("--optional", action="store_true",
                        help="without an HH file, say so and exit 0 (make model-smollm2 runs it this way)")
    args = parser.parse_args(argv)
    if not args.hh.exists():
        print(f"hh_demo_files: {'note' if args.optional else 'error'}: no HH-RLHF file at {args.hh}: pass HH=PATH "
              "(make data-hh HH=PATH), a .jsonl(.gz) of Anthropic/hh-rlhf rows, for the smollm2 experiments' data",
              file=sys.stderr)
        return 0 if args.optional else 2
    texts, messages, skipped = [], [], 0
    try:
        for where, row in read_rows(str(args.hh), "train"):
            if len(texts) >= args.rows:
                break
            try:
                converted = to_messages(row, where)
            except BadRow:
                skipped += 1
                continue
            texts.append(json.dumps({"chosen": row["chosen"], "rejected": row["rejected"]}, ensure_ascii=False) + "\n")
            messages.append(json.dumps(converted, ensure_ascii=False) + "\n")
    except UserError as e:
        print(f"hh_demo_files: error: {e}", file=sys.stderr)
        return 2
    args.out_dir.mkdir(parents=True, exist_ok=True)
    for name, lines in (("hh_rlhf.jsonl", texts), ("hh_messages.jsonl", messages)):
        out = args.out_dir / name
        tmp = out.with_name(name + ".tmp")
        tmp.write_text("".join(lines), encoding="utf-8")
        tmp.replace(out)
        print(f"wrote {len(lines)} pairs to {out}")
    if skipped:
        print(f"({skipped} HH rows left out: their turns could not be read)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
