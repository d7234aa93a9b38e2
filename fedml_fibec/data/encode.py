"""Tokenize a TextTable into fixed-length tensors."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from fedml_fibec.atomic import atomic_write, file_lock
from fedml_fibec.data.sources import TextTable
from fedml_fibec.errors import ConfigError, DataError


@dataclass
class EncodedSet:
    """Padded token ids, attention masks and labels of N examples (token_type_ids only for pair tasks)."""

    input_ids: torch.Tensor  # LongTensor [N, T]
    attention_mask: torch.Tensor  # LongTensor [N, T]
    labels: torch.Tensor  # LongTensor [N]
    token_type_ids: torch.Tensor | None = None  # LongTensor [N, T]; segment ids matter for BERT pair inputs

    def __post_init__(self) -> None:
        n = self.labels.shape[0]
        shapes = [self.input_ids.shape, self.attention_mask.shape]
        if self.token_type_ids is not None:
            shapes.append(self.token_type_ids.shape)
        if any(s[0] != n or s != shapes[0] for s in shapes) or self.labels.dim() != 1:
            raise DataError(f"EncodedSet: inconsistent shapes {[tuple(s) for s in shapes]} and labels {tuple(self.labels.shape)}")

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def seq_len(self) -> int:
        """Padded sequence length T."""
        return int(self.input_ids.shape[1])

    def subset(self, idx: Sequence[int] | torch.Tensor) -> "EncodedSet":
        """The rows at positions idx, in that order (copies)."""
        i = torch.as_tensor(idx, dtype=torch.long)
        return EncodedSet(
            input_ids=self.input_ids[i],
            attention_mask=self.attention_mask[i],
            labels=self.labels[i],
            token_type_ids=None if self.token_type_ids is None else self.token_type_ids[i],
        )

    @staticmethod
    def concat(sets: Sequence["EncodedSet"]) -> "EncodedSet":
        """Rows of all sets, in order."""
        if not sets:
            raise DataError("EncodedSet.concat: nothing to concatenate")
        tt = [s.token_type_ids for s in sets]
        return EncodedSet(
            input_ids=torch.cat([s.input_ids for s in sets]),
            attention_mask=torch.cat([s.attention_mask for s in sets]),
            labels=torch.cat([s.labels for s in sets]),
            token_type_ids=None if any(t is None for t in tt) else torch.cat(tt),
        )


def ensure_pad_token(tokenizer: Any) -> Any:
    """Give a tokenizer without a pad token its eos token as pad (in place); the model must use the same id."""
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ConfigError(
                f"tokenizer {type(tokenizer).__name__} ({getattr(tokenizer, 'name_or_path', '?')!r}) has neither "
                f"a pad token nor an eos token to pad with; set tokenizer.pad_token first"
            )
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def encode(table: TextTable, tokenizer: Any, *, max_length: int, batch_size: int = 4096) -> EncodedSet:
    """Tokenize texts (or text pairs) with truncation and padding to max_length."""
    if int(max_length) < 2:
        raise ConfigError(f"max_length must be >= 2, got {max_length!r}")
    ensure_pad_token(tokenizer)
    pairs = table.texts_pair is not None
    if len(table) == 0:
        empty = torch.zeros((0, int(max_length)), dtype=torch.long)
        return EncodedSet(empty, empty.clone(), torch.zeros(0, dtype=torch.long))
    ids, masks, types = [], [], []
    # Batches bound the peak memory of the tokenizer's Python-side encodings on big tables.
    for s in range(0, len(table), batch_size):
        kw: dict[str, Any] = dict(padding="max_length", truncation=True, max_length=int(max_length),
                                  return_tensors="pt", return_token_type_ids=pairs)
        texts = table.texts[s:s + batch_size]
        enc = tokenizer(texts, table.texts_pair[s:s + batch_size], **kw) if pairs else tokenizer(texts, **kw)
        ids.append(enc["input_ids"].long())
        masks.append(enc["attention_mask"].long())
        if pairs and "token_type_ids" in enc:
            types.append(enc["token_type_ids"].long())
    return EncodedSet(
        input_ids=torch.cat(ids),
        attention_mask=torch.cat(masks),
        labels=torch.tensor(table.labels, dtype=torch.long),
        token_type_ids=torch.cat(types) if types else None,
    )


CACHE_VERSION = 1


def _fingerprint(table: TextTable, tokenizer: Any, max_length: int) -> str:
    """What determines an encoding: the texts and labels, the whole tokenizer, the length, this code."""
    h = hashlib.sha256(f"v{CACHE_VERSION}:{int(max_length)}:{type(tokenizer).__name__}".encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:  # a fast tokenizer: its full JSON (vocab, normalizer, post-processor)
        spec = json.loads(backend.to_str())
        # A call sets these on the backend; the encoding's own padding/truncation is fixed by max_length.
        spec.pop("truncation", None)
        spec.pop("padding", None)
        h.update(json.dumps(spec, sort_keys=True).encode())
    else:
        h.update(repr(sorted(tokenizer.get_vocab().items())).encode())
    h.update(repr((tokenizer.pad_token, tokenizer.padding_side, tokenizer.truncation_side)).encode())
    for column in (table.texts, table.texts_pair or []):
        h.update(b"\x1e".join(t.encode() for t in column))
        h.update(b"\x1d")
    h.update(repr(list(table.labels)).encode())
    return h.hexdigest()[:32]


def encode_cached(table: TextTable, tokenizer: Any, *, max_length: int,
                  cache_dir: str | os.PathLike | None) -> EncodedSet:
    """`encode`, done once per (data, tokenizer, max_length) and read back by every later caller.

    Every MPI rank builds the same data set; on a small machine eleven ranks tokenising at once
    cost start-up time. The first caller encodes under a file lock and writes the tensors
    atomically; the others wait for the lock and load them. cache_dir None: no cache.
    """
    if cache_dir is None:
        return encode(table, tokenizer, max_length=max_length)
    path = Path(cache_dir) / "encoded" / f"{_fingerprint(table, tokenizer, max_length)}.pt"
    with file_lock(path.with_suffix(".lock")):
        if not path.exists():
            enc = encode(table, tokenizer, max_length=max_length)
            atomic_write(path, lambda fh: torch.save(dataclasses.asdict(enc), fh))
            return enc
    return EncodedSet(**torch.load(path, map_location="cpu", weights_only=True))
