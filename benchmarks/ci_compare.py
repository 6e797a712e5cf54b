"""Fail a CI job when an asv benchmark got worse (``asv compare`` itself always exits 0).

    python benchmarks/ci_compare.py BASE_SHA HEAD_SHA [--factor 1.25] [-E existing:same] [--machine M]
    asv compare --factor 1.25 BASE HEAD > cmp.txt && python benchmarks/ci_compare.py --input cmp.txt

Runs ``asv compare --factor F BASE HEAD`` (or reads its saved output), prints the rows that got
worse, and exits 1 if there is any, 2 if the comparison holds no benchmark at all (a misconfigured
job must not pass silently), else 0.

A row is worse when asv marks it ``+`` (slower / more memory / larger track value beyond the
factor, and statistically different where asv has the samples) or ``!`` (it failed on HEAD but
not on BASE).  asv's rule ``after > before * factor`` is meaningless for negative values (a
negative final ELBO of a task whose ELBO is positive, say), so rows whose BASE value is negative
are judged here instead: worse when ``after - before > (factor - 1) * |before|``.
"""
from __future__ import annotations

import argparse
import re
import subprocess
import sys

_NUM = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")


def _plain(text: str):
    """A plain number (track_* values), or None for 'n/a', 'failed', '1.0±0.1ms' and the like."""
    text = text.strip()
    return float(text) if _NUM.match(text) else None


def parse(output: str) -> list[dict]:
    """The rows of ``asv compare``'s tables: mark, before, after, ratio, benchmark."""
    rows = []
    for line in output.splitlines():
        line = line.strip()
        if not line.startswith("|") or set(line) <= set("|-: "):
            continue
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) < 5 or cells[0] == "Change":
            continue
        mark, before, after, ratio, name = cells[0], cells[1], cells[2], cells[3], "|".join(cells[4:])
        rows.append({"mark": mark, "before": before, "after": after, "ratio": ratio, "name": name})
    return rows


def worse(row: dict, factor: float) -> bool:
    if row["mark"] == "!":
        return True
    b, a = _plain(row["before"]), _plain(row["after"])
    if b is not None and a is not None and b < 0:
        return a - b > (factor - 1) * abs(b)
    return row["mark"] == "+"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("base", nargs="?", help="base commit (e.g. the merge base with main)")
    ap.add_argument("head", nargs="?", help="commit under test")
    ap.add_argument("--factor", type=float, default=1.25, help="tolerated ratio (default 1.25)")
    ap.add_argument("-E", "--environment", help="asv environment, e.g. existing:same")
    ap.add_argument("--machine", help="asv machine name (default: this machine)")
    ap.add_argument("--config", help="asv.conf.json (default: asv's own lookup)")
    ap.add_argument("--input", help="saved 'asv compare' output instead of running it ('-': stdin)")
    args = ap.parse_args(argv)
    if args.factor <= 1:
        ap.error("--factor must be > 1")
    if args.input:
        output = sys.stdin.read() if args.input == "-" else open(args.input).read()
    else:
        if not (args.base and args.head):
            ap.error("give BASE and HEAD commits, or --input")
        cmd = ["asv", "compare", "--factor", str(args.factor)]
        for flag, value in [("--config", args.config), ("-E", args.environment),
                            ("--machine", args.machine)]:
            if value:
                cmd += [flag, value]
        cmd += [args.base, args.head]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        output = proc.stdout
        if proc.returncode != 0:
            print(proc.stdout + proc.stderr, file=sys.stderr)
            print(f"ci_compare: '{' '.join(cmd)}' failed with status {proc.returncode}", file=sys.stderr)
            return 2
    rows = parse(output)
    compared = [r for r in rows if r["before"] not in ("n/a", "") and r["after"] not in ("n/a", "")
                or r["mark"] == "!"]
    if not compared:
        print("ci_compare: no benchmark has results on both commits; did both asv runs happen "
              "(same machine name, --set-commit-hash)?", file=sys.stderr)
        print(output, file=sys.stderr)
        return 2
    bad = [r for r in rows if worse(r, args.factor)]
    print(f"ci_compare: {len(compared)} benchmarks compared, factor {args.factor}: "
          f"{len(bad)} worse")
    for r in bad:
        print(f"  WORSE  {r['name']}: {r['before']} -> {r['after']} (ratio {r['ratio']})")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
