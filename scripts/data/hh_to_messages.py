"""HH-RLHF dialogues as conversational rows (message lists), for a model's own chat template.

Each `chosen` / `rejected` pair of "\\n\\nHuman: ...\\n\\nAssistant: ..." texts becomes
{"prompt": [user/assistant turns up to the last user turn], "chosen": [the chosen reply], "rejected": [...]},
the layout of UltraFeedback-binarized that `data.format=conversational` reads. Turn texts lose the space after
"Human:" / "Assistant:" and surrounding whitespace; a row whose turns cannot be read is left out and counted.

    python scripts/data/hh_to_messages.py --hh path/to/hh-rlhf/test.jsonl.gz --out runs/data/hh_messages.jsonl --rows 256
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
    parser.add_argument("--out", type=Path, default=Path("runs/data/hh_messages.jsonl"))
    parser.add_argument("--rows", type=int, default=256, help="rows written at most (default: 256)")
    args = parser.parse_args(argv)
    if not args.hh.exists():
        print(f"hh_to_messages: error: no HH-RLHF file at {args.hh}: pass --hh PATH (make data-hh-messages HH=PATH), "
              "e.g. a test.jsonl.gz of Anthropic/hh-rlhf", file=sys.stderr)
        return 2
    written = skipped = 0
    lines = []
    try:
        for where, row in read_rows(str(args.hh), "train"):
            if written >= args.rows:
                break
            try:
                lines.append(json.dumps(to_messages(row, where), ensure_ascii=False) + "\n")
                written += 1
            except BadRow:
                skipped += 1
    except UserError as e:
        print(f"hh_to_messages: error: {e}", file=sys.stderr)
        return 2
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(args.out.name + ".tmp")
    tmp.write_text("".join(lines), encoding="utf-8")
    tmp.replace(args.out)
    print(f"wrote {written} conversational rows to {args.out} ({skipped} HH rows left out)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
