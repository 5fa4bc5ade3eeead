"""Convert HH-style preference pairs with safety labels into PKU-SafeRLHF columns.

HH-RLHF (Anthropic) stores each pair as two whole dialogues, "chosen" and "rejected", that share
everything up to the assistant's last turn. Give each pair the safety of its two final responses (from
annotators or a safety classifier: ``safedpo eval --generate judge=classifier:...`` scores responses)
and this script writes the rows the trainer reads, so that the effect of SafeDPO can be checked beyond
PKU-SafeRLHF:

    python recipes/convert_hh.py hh_with_safety.jsonl pairs.jsonl
    safedpo train --config run.yaml train_files=pairs.jsonl

Input rows: {"chosen": "\\n\\nHuman: ...\\n\\nAssistant: ...", "rejected": "...", "chosen_safe": bool,
"rejected_safe": bool} (other key names with --chosen-safe / --rejected-safe). Output rows: prompt (the
shared dialogue, without the final "Assistant:"), response_0 (chosen's last turn), response_1
(rejected's), is_response_0_safe, is_response_1_safe, better_response_id = 0 (HH's chosen is the
preferred response), safer_response_id (the safe one; 0 when both or neither are safe).
"""

from __future__ import annotations

import argparse
import json
import sys

ASSISTANT = "\n\nAssistant:"


def split_dialogue(text: str):
    """(prompt, last assistant turn) of an HH dialogue."""
    cut = text.rfind(ASSISTANT)
    if cut < 0:
        raise ValueError("no assistant turn")
    return text[:cut].strip(), text[cut + len(ASSISTANT):].strip()


def convert(row: dict, chosen_safe: str = "chosen_safe", rejected_safe: str = "rejected_safe") -> dict:
    prompt, chosen = split_dialogue(row["chosen"])
    other_prompt, rejected = split_dialogue(row["rejected"])
    if other_prompt != prompt:
        raise ValueError("chosen and rejected do not share their dialogue up to the last assistant turn")
    safe0, safe1 = row[chosen_safe], row[rejected_safe]
    if not isinstance(safe0, bool) or not isinstance(safe1, bool):
        raise ValueError(f"{chosen_safe!r} and {rejected_safe!r} must be true/false")
    return dict(prompt=prompt, response_0=chosen, response_1=rejected, is_response_0_safe=safe0,
                is_response_1_safe=safe1, better_response_id=0, safer_response_id=0 if safe0 or not safe1 else 1)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("input")
    p.add_argument("output")
    p.add_argument("--chosen-safe", default="chosen_safe")
    p.add_argument("--rejected-safe", default="rejected_safe")
    a = p.parse_args(argv)
    n = 0
    with open(a.input) as src, open(a.output, "w") as dst:
        for line_no, line in enumerate(src, 1):
            if not line.strip():
                continue
            try:
                out = convert(json.loads(line), a.chosen_safe, a.rejected_safe)
            except (ValueError, KeyError) as exc:
                print(f"{a.input}, line {line_no}: {type(exc).__name__}: {exc}", file=sys.stderr)
                return 1
            dst.write(json.dumps(out) + "\n")
            n += 1
    print(f"wrote {n} pairs to {a.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
