"""Tokenize a TextTable into fixed-length tensors."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch

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

    def model_inputs(self) -> dict[str, torch.Tensor]:
        """The keyword tensors a HF model takes (labels excluded)."""
        out = {"input_ids": self.input_ids, "attention_mask": self.attention_mask}
        if self.token_type_ids is not None:
            out["token_type_ids"] = self.token_type_ids
        return out

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
