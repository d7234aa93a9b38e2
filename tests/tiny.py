"""Tiny random-weight models, tokenizers and text sets for the unit tests (no downloads)."""
from __future__ import annotations

import random
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    AutoModelForSequenceClassification,
    BertConfig,
    GPT2Config,
    LlamaConfig,
    PreTrainedTokenizerFast,
    RobertaConfig,
)

WORDS = (
    "good great fine superb lovely moving bad awful dull boring weak poor plot actor film "
    "movie scene story script music the a an and but not very quite rather is was"
).split()
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]
VOCAB = {tok: i for i, tok in enumerate(SPECIALS + WORDS)}


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer over WORDS with BERT-style special tokens."""
    tok = Tokenizer(models.WordLevel(vocab=dict(VOCAB), unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="[PAD]",
        unk_token="[UNK]",
        cls_token="[CLS]",
        sep_token="[SEP]",
    )
    return fast


def tiny_config(family: str, num_labels: int = 2):
    """A 2-block config of the named family ('bert', 'roberta', 'gpt2', 'llama')."""
    vocab = len(VOCAB)
    common = dict(num_labels=num_labels, pad_token_id=0, bos_token_id=2, eos_token_id=3)
    if family == "bert":
        return BertConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                          intermediate_size=64, max_position_embeddings=64, **common)
    if family == "roberta":
        return RobertaConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                             intermediate_size=64, max_position_embeddings=80, **common)
    if family == "gpt2":
        return GPT2Config(vocab_size=vocab, n_embd=32, n_layer=2, n_head=4, n_positions=64, **common)
    if family == "llama":
        return LlamaConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, intermediate_size=64, max_position_embeddings=64, **common)
    raise ValueError(f"unknown tiny family {family!r}")


def tiny_model(family: str, num_labels: int = 2, seed: int = 0):
    """A random-weight sequence classifier of the named family, in eval mode."""
    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_config(tiny_config(family, num_labels))
    return model.eval()


def tiny_model_dir(path: Path, family: str = "bert", num_labels: int = 2, seed: int = 0) -> Path:
    """Save a tiny model and its tokenizer to `path` so it loads like any local HF model."""
    path = Path(path)
    tiny_model(family, num_labels, seed).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


def tiny_texts(n: int, seed: int = 0, num_labels: int = 2) -> tuple[list[str], list[int]]:
    """Synthetic sentences whose label is learnable from their words."""
    rng = random.Random(seed)
    pos, neg, neutral = WORDS[:6], WORDS[6:12], WORDS[12:]
    texts, labels = [], []
    for _ in range(n):
        label = rng.randrange(num_labels)
        cue = pos if label % 2 == 0 else neg
        words = [rng.choice(cue) for _ in range(rng.randint(1, 3))]
        words += [rng.choice(neutral) for _ in range(rng.randint(1, 8))]
        rng.shuffle(words)
        texts.append(" ".join(words))
        labels.append(label)
    return texts, labels


def tiny_batch(tokenizer, texts: list[str], max_length: int = 16, padding_side: str = "right"):
    """Tokenize texts into a padded batch (dict of input_ids, attention_mask)."""
    tokenizer.padding_side = padding_side
    return tokenizer(texts, padding="max_length", truncation=True, max_length=max_length, return_tensors="pt")
