"""Compare a verdict log from ``ism-edge run`` with the ground truth of make_attack_video.py."""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from fractions import Fraction
from pathlib import Path


def eps_label(e: float) -> str:
    f = Fraction(e).limit_denominator(255)
    return f"{f.numerator}/255" if f.denominator == 255 and abs(float(f) - e) < 1e-9 else f"{e:g}"


def last_run(records: list[dict]) -> list[dict]:
    """The frame lines of the last run in a verdict log (``--log`` appends; each run starts with a header
    line, ``"event": "start"``, and tags its lines with ``"run"``); a log without run ids is one run."""
    runs = [r["run"] for r in records if r.get("event") == "start" and "run" in r]
    frames = [r for r in records if "frame" in r]
    return [r for r in frames if r.get("run") == runs[-1]] if runs else frames


def main(log_path: str, truth_path: str) -> None:
    truth = json.loads(Path(truth_path).read_text())
    attacked = {int(k): float(v) for k, v in truth["attacked"].items()}
    rows = last_run([json.loads(line) for line in Path(log_path).read_text().splitlines() if line.strip()])
    verdicts = {r["frame"]: r for r in rows if not r.get("skipped")}
    clean = [i for i in verdicts if i not in attacked]
    clean_flagged = sum(verdicts[i]["flagged"] for i in clean)
    by_eps: dict[float, list[bool]] = defaultdict(list)
    for i, e in attacked.items():
        if i in verdicts:
            by_eps[e].append(bool(verdicts[i]["flagged"]))
    n_att = sum(len(v) for v in by_eps.values())
    att_flagged = sum(sum(v) for v in by_eps.values())
    print(f"frames in log: {len(rows)} ({len(verdicts)} with a verdict)")
    print(f"attacked frames flagged: {att_flagged}/{n_att} ({100 * att_flagged / max(n_att, 1):.0f} %)   "
          + "  ".join(f"eps {eps_label(e)}: {sum(v)}/{len(v)}" for e, v in sorted(by_eps.items())))
    print(f"clean frames flagged:    {clean_flagged}/{len(clean)} ({100 * clean_flagged / max(len(clean), 1):.0f} %)")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: python scripts/demo_report.py VERDICTS.jsonl truth.json")
    main(sys.argv[1], sys.argv[2])
