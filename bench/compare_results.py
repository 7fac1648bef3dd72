"""Compare two folders of results files run by run: are the rows identical, field for field?

    python bench/compare_results.py results/before results/embedded

Every ``NAME.json`` results file present in both folders is compared: its ``rows`` (every field of every row:
prediction, adapters, weights, scores, ...) and its ``settings`` (but the results path), and of ``meta`` everything but timings, the date,
the commit and the host (LoraHub's learned vectors without their seconds). Exit status 0 when every run matches,
1 otherwise, with the first differences of each run on stdout.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

VOLATILE_META = {"timing_s", "date", "git_commit", "host", "python", "versions", "torch", "platform", "search_seconds", "seconds"}


def strip(obj):
    """``obj`` without the keys that differ between two identical runs (timings, date, commit, host)."""
    if isinstance(obj, dict):
        return {k: strip(v) for k, v in obj.items() if k not in VOLATILE_META}
    if isinstance(obj, list):
        return [strip(v) for v in obj]
    return obj


def differences(a: dict, b: dict, limit: int = 5) -> list[str]:
    out = []
    sa = {k: v for k, v in a.get("settings", {}).items() if k != "res_path"}  # the folders differ by design
    sb = {k: v for k, v in b.get("settings", {}).items() if k != "res_path"}
    if sa != sb:
        out.append(f"settings differ in {sorted(k for k in set(sa) | set(sb) if sa.get(k) != sb.get(k))}")
    if strip(a.get("meta", {})) != strip(b.get("meta", {})):
        ma, mb = strip(a.get("meta", {})), strip(b.get("meta", {}))
        out.append(f"meta differs in {sorted(k for k in set(ma) | set(mb) if ma.get(k) != mb.get(k))}")
    ra, rb = a.get("rows", []), b.get("rows", [])
    if len(ra) != len(rb):
        out.append(f"{len(ra)} rows against {len(rb)}")
    for i, (x, y) in enumerate(zip(ra, rb)):
        if x != y:
            fields = sorted(k for k in set(x) | set(y) if x.get(k) != y.get(k))
            out.append(f"row {i}: {fields}: {[x.get(k) for k in fields]} against {[y.get(k) for k in fields]}")
            if len(out) >= limit:
                break
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("first", help="folder of results files")
    p.add_argument("second", help="folder of results files")
    args = p.parse_args(argv)
    first, second = Path(args.first), Path(args.second)
    names = sorted({f.stem for f in first.glob("*.json")} & {f.stem for f in second.glob("*.json")})
    if not names:
        sys.stdout.write(f"No results file is in both {first} and {second}.\n")
        return 1
    bad = 0
    for name in names:
        a = json.loads((first / f"{name}.json").read_text(encoding="utf-8"))
        b = json.loads((second / f"{name}.json").read_text(encoding="utf-8"))
        if not isinstance(a, dict) or "rows" not in a or not isinstance(b, dict) or "rows" not in b:
            continue  # not a results file (e.g. a summary)
        diff = differences(a, b)
        if diff:
            bad += 1
            sys.stdout.write(f"{name}: DIFFERENT\n" + "".join(f"  {d}\n" for d in diff))
        else:
            sys.stdout.write(f"{name}: identical ({len(a['rows'])} rows)\n")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
