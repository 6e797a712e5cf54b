"""Stanford Sentiment Treebank (SST-5), sentence level, read from its PTB-tree files.

Provenance and licence.  ``tasks/data/sst/{train,dev,test}.txt.gz`` are ``gzip -9 -n`` copies of
``trainDevTestTrees_PTB.zip`` -> ``trees/{train,dev,test}.txt`` from the Stanford Sentiment Treebank
(nlp.stanford.edu/sentiment), taken from GitHub ``probabll/dgm4nlp`` commit
301929e5bdb1f1efc8316d292e9c92af48367ea3, paths ``notebooks/sst/data/sst/{train,dev,test}.txt``
(sha256 of the uncompressed files: train e2f3f41b..., dev 0e9336ae..., test 6e54806d...; 8544 / 1101 /
2210 lines).  Citation: R. Socher, A. Perelygin, J. Wu, J. Chuang, C. D. Manning, A. Ng, C. Potts,
"Recursive Deep Models for Semantic Compositionality Over a Sentiment Treebank", EMNLP 2013; the
sentences are Rotten Tomatoes snippets from Pang & Lee (2005).  Licence: none stated by the
distributors ("No known license" in the TFDS community catalog); dgm4nlp's MIT licence covers its code,
not this data.  Research-use data: do not relicense.

Format: one binarised constituency tree per line, every node labelled 0-4 (0 very negative ...
4 very positive).  A sentence is its leaves (lower-cased here) and its label is the root's label.
"""
from __future__ import annotations

import gzip
import re
from collections import Counter
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Optional, Union

from . import find_split_file

#: the shipped copy
DEFAULT_DIR = Path(__file__).resolve().parent / "sst"
SPLITS = ("train", "dev", "test")
N_CLASSES = 5
PAD, UNK = "<pad>", "<unk>"

#: split on ASCII blanks only: one leaf ("8\xa01\/2", train line 4342) holds a no-break space
_TOKEN = re.compile(r"\(|\)|[^ \t\r\n()]+")


class TreeError(ValueError):
    """A line that is not a well-formed SST tree."""


@dataclass(frozen=True)
class Sentence:
    tokens: tuple[str, ...]
    label: int


def parse_tree(line: str, lower: bool = True) -> Sentence:
    """Parse one PTB-style tree ``(3 (2 The) (4 (2 is) ...))`` into its leaves and root label.

    A node is ``( label child+ )`` and a leaf ``( label word )``; labels are integers 0-4.  Raises
    :class:`TreeError` (without location; :func:`load_split` adds file and line) when malformed.
    """
    toks = _TOKEN.findall(line)
    if not toks:
        raise TreeError("empty line")
    leaves: list[str] = []
    depth, i, n = 0, 0, len(toks)
    root_label: Optional[int] = None
    done = False  # the root has closed
    while i < n:
        t = toks[i]
        if done:
            raise TreeError(f"text after the end of the tree (token {i}: {t!r})")
        if t == "(":
            if i + 1 >= n or not toks[i + 1].isdigit():
                got = toks[i + 1] if i + 1 < n else "end of line"
                raise TreeError(f"expected a label 0-{N_CLASSES - 1} after '(' at token {i}, got {got!r}")
            label = int(toks[i + 1])
            if not 0 <= label < N_CLASSES:
                raise TreeError(f"label {label} out of range 0-{N_CLASSES - 1} at token {i + 1}")
            if depth == 0:
                root_label = label
            if i + 2 < n and toks[i + 2] not in "()":  # a leaf: ( label word )
                if i + 3 >= n or toks[i + 3] != ")":
                    raise TreeError(f"leaf {toks[i + 2]!r} at token {i + 2} is not closed by ')'")
                leaves.append(toks[i + 2].lower() if lower else toks[i + 2])
                i += 4
                done = depth == 0
            else:
                depth += 1
                i += 2
        elif t == ")":
            if depth == 0:
                raise TreeError(f"unbalanced ')' at token {i}")
            depth -= 1
            i += 1
            done = depth == 0
        else:
            raise TreeError(f"stray word {t!r} at token {i} (words must be leaves '(label word)')")
    if depth != 0:
        raise TreeError(f"unbalanced brackets: {depth} '(' left open at the end of the line")
    if root_label is None or not leaves:
        raise TreeError("a tree without leaves")
    return Sentence(tuple(leaves), root_label)


def split_path(split: str, data_dir: Union[str, Path, None] = None) -> Path:
    """The file of ``split`` in ``data_dir`` (``<split>.txt.gz``, else ``<split>.txt``)."""
    if split not in SPLITS:
        raise ValueError(f"SST split must be one of {SPLITS}, got {split!r}")
    d = Path(data_dir) if data_dir else DEFAULT_DIR
    return find_split_file(d, f"{split}.txt", "SST", split, DEFAULT_DIR)


@lru_cache(maxsize=16)
def _load(path: str, lower: bool) -> tuple[Sentence, ...]:
    p = Path(path)
    try:
        if p.suffix == ".gz":
            with gzip.open(p, "rt", encoding="utf-8") as fh:
                lines = fh.read().splitlines()
        else:
            lines = p.read_text(encoding="utf-8").splitlines()
    except (OSError, EOFError, UnicodeDecodeError) as exc:
        raise ValueError(f"cannot read SST file {p}: {type(exc).__name__}: {exc}") from None
    out = []
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            out.append(parse_tree(line, lower=lower))
        except TreeError as exc:
            raise ValueError(f"{p}:{lineno}: malformed SST tree: {exc}") from None
    if not out:
        raise ValueError(f"SST file {p} contains no trees")
    return tuple(out)


def load_split(split: str, data_dir: Union[str, Path, None] = None, lower: bool = True) -> tuple[Sentence, ...]:
    """All sentences of ``split`` ("train", "dev" or "test"), in file order (cached per path)."""
    return _load(str(split_path(split, data_dir)), lower)


class Vocab:
    """Token <-> id map built from training sentences: id 0 is <pad>, 1 is <unk>, then the tokens
    seen at least ``min_count`` times, most frequent first (ties alphabetical, so it is deterministic)."""

    def __init__(self, sentences, min_count: int = 1):
        if min_count < 1:
            raise ValueError(f"min_count must be >= 1, got {min_count}")
        counts = Counter(t for s in sentences for t in s.tokens)
        kept = sorted((w for w, c in counts.items() if c >= min_count), key=lambda w: (-counts[w], w))
        self.itos = [PAD, UNK] + kept
        self.stoi = {w: i for i, w in enumerate(self.itos)}
        self.pad_id, self.unk_id = 0, 1

    def __len__(self) -> int:
        return len(self.itos)

    def encode(self, tokens) -> list[int]:
        return [self.stoi.get(t, self.unk_id) for t in tokens]

    def decode(self, ids) -> list[str]:
        return [self.itos[int(i)] for i in ids]
