"""Parsing of benchopt-style names with options: ``gumbel_softmax[temperature=0.5]``.

The string (stripped of spaces) is the display name of that configuration in every table.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

from estbench.core.errors import SpecError

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
