"""Parsing of benchopt-style names with options: ``gumbel_softmax[temperature=0.5]``.

The string (stripped of spaces) is the display name of that configuration in every table.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

from estbench.core.errors import SpecError, UsageError

_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.\-]*$")
_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


@dataclass(frozen=True)
class Spec:
    name: str
    options: dict = field(default_factory=dict, hash=False, compare=False)
    text: str = ""

    def __str__(self) -> str:
        return self.text or self.name


def split_list(text: str) -> list[str]:
    """Split a comma-separated list at bracket depth 0: ``a[x=1,y=2],b`` -> ``['a[x=1,y=2]', 'b']``."""
    items, depth, cur = [], 0, []
    for ch in text:
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise SpecError(f"unbalanced ']' in {text!r}")
        if ch == "," and depth == 0:
            items.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    if depth:
        raise SpecError(f"unbalanced '[' in {text!r}")
    items.append("".join(cur))
    items = [i.strip() for i in items]
    if any(not i for i in items):
        raise SpecError(f"empty item in list {text!r}")
    return items


def parse(text: str) -> Spec:
    """``name`` or ``name[key=value,...]`` -> Spec; values stay strings (options coerce them)."""
    raw = "".join(text.split())
    if not raw:
        raise SpecError("empty name")
    m = re.match(r"^([^\[\]]+)(?:\[(.*)\])?$", raw)
    if not m:
        raise SpecError(f"cannot parse {text!r}: expected name or name[key=value,...]")
    name, body = m.group(1), m.group(2)
    if not _NAME.match(name):
        raise SpecError(f"invalid name {name!r} in {text!r}")
    options = {}
    if body:
        for part in split_list(body):
            if "=" not in part:
                raise SpecError(f"option {part!r} in {text!r} is not key=value")
            k, v = part.split("=", 1)
            if not _KEY.match(k):
                raise SpecError(f"invalid option name {k!r} in {text!r}")
            if k in options:
                raise SpecError(f"option {k!r} given twice in {text!r}")
            options[k] = v
    return Spec(name, options, raw)


def parse_list(text: str) -> list[Spec]:
    specs = [parse(t) for t in split_list(text)]
    seen = set()
    for s in specs:
        if s.text in seen:
            raise SpecError(f"{s.text!r} listed twice")
        seen.add(s.text)
    return specs


# ----------------------------------------------------------------------------- lists of integers

#: the most cells one command plans (seeds x tasks x estimators x devices): a typo such as
#: ``--seeds 0-100000000`` is refused at once instead of building the plan for minutes
MAX_CELLS = 100_000
#: the largest seed: every stream a cell derives from it still fits torch's 64-bit seeds
MAX_SEED = 2 ** 32 - 1


def _ints(text: str, what: str, limit: int = MAX_CELLS) -> list[int]:
    """Comma-separated integers and ranges ``a-b``, each a 64-bit integer; at most ``limit`` values,
    counted from the range bounds before any range is expanded."""
    try:
        parts = []
        for part in split_list(text):
            if "-" in part[1:]:
                lo, hi = part.split("-", 1) if not part.startswith("-") else (part, "")
                parts.append((int(lo), int(hi)))
            else:
                parts.append((int(part), int(part)))
    except (ValueError, SpecError):
        raise UsageError(f"{what} must be comma-separated integers (or ranges a-b), got {text!r}") from None
    for lo, hi in parts:
        for v in (lo, hi):
            if not -2 ** 63 <= v < 2 ** 63:
                raise UsageError(f"{what}: {v} does not fit in a 64-bit integer")
    for lo, hi in parts:
        if hi < lo:
            raise UsageError(f"{what}: the range {lo}-{hi} is empty (a range a-b needs a <= b)")
    n = sum(max(0, hi - lo + 1) for lo, hi in parts)
    if n > limit:
        raise UsageError(f"{what} {text!r} has {n} values, more than the limit of {limit}; "
                         "split the sweep")
    out = [v for lo, hi in parts for v in range(lo, hi + 1)]
    if not out:
        raise UsageError(f"{what} is empty")
    if len(set(out)) != len(out):
        raise UsageError(f"{what} lists a value twice: {text!r}")
    return out


def parse_seeds(text: str, what: str = "--seeds") -> list[int]:
    """Seeds as ``--seeds`` takes them (``0,1,2``, ``0-4``, ``7``), each from 0 to MAX_SEED;
    UsageError naming ``what`` otherwise.  ``estbench.run(seeds="0-4")`` parses its strings here."""
    seeds = _ints(text, what)
    if any(s < 0 or s > MAX_SEED for s in seeds):
        # a cell derives its random streams from its seed (cell.seed * 7919 + step for the
        # measurements), which torch takes as a 64-bit integer
        raise UsageError(f"{what} must be integers from 0 to {MAX_SEED}")
    return seeds
