"""Text classification sources: the built-in MR asset, local files (CSV/TSV/JSON/JSONL/Parquet), the HF hub."""
from __future__ import annotations

import logging
import numbers
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import pandas as pd

from fedml_fibec.errors import DataError

log = logging.getLogger(__name__)

BUILTIN = ("mr", "stackoverflow")
_COMPRESSION = (".gz", ".bz2", ".xz", ".zip", ".zst")


@dataclass(frozen=True)
class TextTable:
    """Texts (optionally text pairs) with integer labels indexing label_names."""

    texts: list[str]
    labels: list[int]
    label_names: list[str]
    texts_pair: list[str] | None = None

    def __post_init__(self) -> None:
        if len(self.texts) != len(self.labels):
            raise DataError(f"TextTable: {len(self.texts)} texts but {len(self.labels)} labels")
        if self.texts_pair is not None and len(self.texts_pair) != len(self.texts):
            raise DataError(f"TextTable: {len(self.texts)} texts but {len(self.texts_pair)} texts_pair")
        bad = [y for y in self.labels if not 0 <= y < len(self.label_names)]
        if bad:
            raise DataError(f"TextTable: label {bad[0]} outside [0, {len(self.label_names)}) of {self.label_names}")

    def __len__(self) -> int:
        return len(self.texts)

    @property
    def num_classes(self) -> int:
        """Number of classes (len(label_names))."""
        return len(self.label_names)

    def subset(self, idx: Sequence[int]) -> "TextTable":
        """The rows at positions idx, in that order."""
        idx = [int(i) for i in idx]
        return TextTable(
            texts=[self.texts[i] for i in idx],
            labels=[self.labels[i] for i in idx],
            label_names=list(self.label_names),
            texts_pair=None if self.texts_pair is None else [self.texts_pair[i] for i in idx],
        )


# --------------------------------------------------------------------------- built-in


def load_builtin(name: str, cache_dir: str | os.PathLike | None = None) -> tuple[TextTable, TextTable | None]:
    """A built-in dataset as (train, test); test is None when it has no official split."""
    if name == "mr":
        return load_mr(cache_dir), None
    if name == "stackoverflow":
        return load_stackoverflow(cache_dir)
    raise DataError(f"unknown built-in dataset {name!r} (key 'dataset'); built-in datasets: {', '.join(BUILTIN)}")


def load_mr(cache_dir: str | os.PathLike | None = None) -> TextTable:
    """MR (Rotten Tomatoes critic snippets) from the 'mr' asset: 0 = rotten, 1 = fresh; plot rows dropped."""
    from fedml_fibec import assets  # looked up at call time so tests can monkeypatch asset_path

    path = assets.asset_path("mr", cache_dir)
    df = pd.read_csv(path)
    for col in ("category", "text"):
        if col not in df.columns:
            raise DataError(f"{path}: no column {col!r}; columns are {list(df.columns)}")
    df = df[df["category"] != "plot"]
    mapping = {"rotten": 0, "fresh": 1}
    unknown = sorted(set(df["category"].astype(str)) - set(mapping))
    if unknown:
        raise DataError(f"{path}: column 'category' has values {unknown}; expected 'rotten', 'fresh' or 'plot'")
    df = df[df["text"].notna()]  # a review without text carries nothing to learn from
    return TextTable(
        texts=[str(t) for t in df["text"]],
        labels=[mapping[c] for c in df["category"]],
        label_names=["rotten", "fresh"],
    )


STACKOVERFLOW_FILES = ("train.tsv", "dev.tsv", "test.tsv")


def load_stackoverflow(cache_dir: str | os.PathLike | None = None) -> tuple[TextTable, TextTable]:
    """Stack Overflow titles in 20 tag classes from the 'stackoverflow' asset: (train + dev, test).

    The set's own split is kept (its dev part joins train: a validation split, when wanted, is drawn
    from train by validation_fraction). Classes are the tags in alphabetical order.
    """
    import csv

    from fedml_fibec import assets

    folder = assets.asset_path("stackoverflow", cache_dir)
    frames = []
    for name in STACKOVERFLOW_FILES:
        path = Path(folder) / name
        if not path.is_file():
            raise DataError(f"{folder}: no {name}; the stackoverflow asset holds {', '.join(STACKOVERFLOW_FILES)}")
        # Quoted fields may hold tabs and newlines: the csv module, not a line split.
        df = pd.read_csv(path, sep="\t", quoting=csv.QUOTE_MINIMAL, dtype=str, keep_default_na=False)
        for col in ("text", "label"):
            if col not in df.columns:
                raise DataError(f"{path}: no column {col!r}; columns are {list(df.columns)}")
        df = df[df["text"].str.strip() != ""]
        frames.append(df)
    train_df = pd.concat(frames[:2], ignore_index=True)
    names = sorted(set(train_df["label"]))
    unknown = sorted(set(frames[2]["label"]) - set(names))
    if unknown:
        raise DataError(f"{folder}/test.tsv: labels {unknown} do not occur in train/dev")
    ids = {n: i for i, n in enumerate(names)}

    def table(df: pd.DataFrame) -> TextTable:
        return TextTable(texts=list(df["text"]), labels=[ids[v] for v in df["label"]], label_names=names)
    return table(train_df), table(frames[2])


# --------------------------------------------------------------------------- local files


def _reader(path: Path) -> Callable[[Path], pd.DataFrame]:
    name = path.name.lower()
    for c in _COMPRESSION:  # pandas infers the compression; the format is the suffix before it
        if name.endswith(c):
            name = name[: -len(c)]
            break
    ext = os.path.splitext(name)[1]
    readers: dict[str, Callable[[Path], pd.DataFrame]] = {
        ".csv": lambda p: pd.read_csv(p),
        ".tsv": lambda p: pd.read_csv(p, sep="\t", quoting=3),  # QUOTE_NONE: TSV texts often hold stray quotes
        ".tab": lambda p: pd.read_csv(p, sep="\t", quoting=3),
        ".json": _read_json,
        ".jsonl": lambda p: pd.read_json(p, lines=True, dtype=False),
        ".ndjson": lambda p: pd.read_json(p, lines=True, dtype=False),
        ".parquet": lambda p: pd.read_parquet(p),
        ".pq": lambda p: pd.read_parquet(p),
    }
    if ext not in readers:
        raise DataError(f"{path}: unsupported file extension {ext or '(none)'!r}; supported: {', '.join(readers)}")
    return readers[ext]


def _read_json(path: Path) -> pd.DataFrame:
    # '.json' is used for both a records array and JSON lines in the wild: accept both.
    try:
        return pd.read_json(path, dtype=False)
    except ValueError:
        return pd.read_json(path, lines=True, dtype=False)


def _read_table(path: str | os.PathLike, key: str) -> tuple[pd.DataFrame, str]:
    p = Path(path).expanduser()
    if not p.is_file():
        raise DataError(f"{key}: file {str(p)!r} does not exist" + (" (it is a directory)" if p.is_dir() else ""))
    if p.stat().st_size == 0:
        raise DataError(f"{key}: file {str(p)!r} is empty")
    reader = _reader(p)
    try:
        df = reader(p)
    except pd.errors.EmptyDataError:
        raise DataError(f"{key}: file {str(p)!r} has no rows") from None
    except Exception as e:  # parse errors of any reader: say which file
        raise DataError(f"{key}: cannot read {str(p)!r}: {type(e).__name__}: {e}") from e
    if len(df) == 0:
        raise DataError(f"{key}: file {str(p)!r} has no rows")
    return df, str(p)


def _column_texts(df: pd.DataFrame, where: str, key: str, column: str) -> list[str]:
    if column not in df.columns:
        raise DataError(f"{where}: no column {column!r} (key {key!r}); available columns: {[str(c) for c in df.columns]}")
    col = df[column]
    nulls = [int(i) for i in col.isna().to_numpy().nonzero()[0]]
    if nulls:
        raise DataError(
            f"{where}: column {column!r} (key {key!r}) has {len(nulls)} empty/null value(s), "
            f"first at row(s) {nulls[:5]} (0-based data rows); every row needs a text"
        )
    return [str(v) for v in col]


def _label_key(v: Any) -> int | str:
    """Canonical label: 1, 1.0 and np.int64(1) are the same label; anything else compares as text."""
    if isinstance(v, numbers.Integral):
        return int(v)
    if isinstance(v, numbers.Real) and float(v).is_integer():
        return int(v)
    return str(v)


def _column_labels(df: pd.DataFrame, where: str, key: str, column: str) -> list[int | str]:
    if column not in df.columns:
        raise DataError(f"{where}: no column {column!r} (key {key!r}); available columns: {[str(c) for c in df.columns]}")
    col = df[column]
    nulls = [int(i) for i in col.isna().to_numpy().nonzero()[0]]
    if nulls:
        raise DataError(
            f"{where}: column {column!r} (key {key!r}) has {len(nulls)} empty/null label(s), first at row(s) {nulls[:5]}"
        )
    return [_label_key(v) for v in col.tolist()]


def _label_vocab(keys: list[int | str], where: str, column: str) -> list[int | str]:
    uniq = set(keys)
    if all(isinstance(k, int) for k in uniq):
        vocab: list[int | str] = sorted(uniq)
    else:  # mixed ints and strings: compare all as text
        vocab = sorted({str(k) for k in uniq})
    if len(vocab) < 2:
        raise DataError(
            f"{where}: column {column!r} (key 'label_column') has a single class {vocab}; "
            f"classification needs at least 2 classes"
        )
    return vocab


def _map_labels(keys: list[int | str], vocab: list[int | str], where: str, column: str, hint: str = "") -> list[int]:
    ids = {k: i for i, k in enumerate(vocab)}
    as_text = {str(k): i for i, k in enumerate(vocab)}
    out, unseen = [], []
    for k in keys:
        i = ids.get(k)
        if i is None:
            i = as_text.get(str(k))  # e.g. '1' in a JSON test file vs 1 in a CSV train file
        if i is None:
            unseen.append(k)
        else:
            out.append(i)
    if unseen:
        shown = sorted({str(u) for u in unseen})[:10]
        raise DataError(
            f"{where}: column {column!r} (key 'label_column') has label value(s) {shown} never seen in the "
            f"training data; training labels are {[str(v) for v in vocab]}{hint}"
        )
    return out


def table_from_frames(
    train: pd.DataFrame,
    test: pd.DataFrame | None,
    *,
    text_column: str,
    label_column: str,
    text_pair_column: str | None = None,
    train_name: str = "train",
    test_name: str = "test",
    test_hint: str = "",
) -> tuple[TextTable, TextTable | None]:
    """Build (train, test) TextTables from data frames; label ids follow the sorted unique train labels."""
    tr_keys = _column_labels(train, train_name, "label_column", label_column)
    vocab = _label_vocab(tr_keys, train_name, label_column)
    names = [str(v) for v in vocab]

    def build(df: pd.DataFrame, where: str, keys: list[int | str], hint: str = "") -> TextTable:
        return TextTable(
            texts=_column_texts(df, where, "text_column", text_column),
            labels=_map_labels(keys, vocab, where, label_column, hint),
            label_names=list(names),
            texts_pair=None if text_pair_column is None
            else _column_texts(df, where, "text_pair_column", text_pair_column),
        )

    tr = build(train, train_name, tr_keys)
    te = None
    if test is not None:
        te = build(test, test_name, _column_labels(test, test_name, "label_column", label_column), test_hint)
    return tr, te


def load_files(
    train_file: str | os.PathLike,
    test_file: str | os.PathLike | None = None,
    *,
    text_column: str,
    label_column: str,
    text_pair_column: str | None = None,
) -> tuple[TextTable, TextTable | None]:
    """Load (train, test|None) from CSV/TSV/JSON/JSONL/Parquet files, chosen by extension."""
    train_df, train_name = _read_table(train_file, "train_file")
    test_df, test_name = (None, "test") if test_file is None else _read_table(test_file, "test_file")
    return table_from_frames(train_df, test_df, text_column=text_column, label_column=label_column,
                             text_pair_column=text_pair_column, train_name=train_name, test_name=test_name)


# --------------------------------------------------------------------------- hub


def load_hub(
    dataset_id: str,
    *,
    config_name: str | None = None,
    text_column: str,
    label_column: str,
    text_pair_column: str | None = None,
    train_split: str = "train",
    test_split: str | None = "test",
    cache_dir: str | os.PathLike | None = None,
) -> tuple[TextTable, TextTable | None]:
    """Load (train, test|None) with datasets.load_dataset (hub id or local data dir) or a save_to_disk dir."""
    try:
        import datasets
    except ImportError as e:  # pragma: no cover
        raise DataError(f"source 'hub' needs the `datasets` package: {e}") from e
    try:
        local = Path(dataset_id).expanduser()
        if (local / "dataset_dict.json").is_file():  # a DatasetDict.save_to_disk dir: load_dataset cannot read it
            dsd = datasets.load_from_disk(str(local))
        else:
            dsd = datasets.load_dataset(dataset_id, config_name, cache_dir=None if cache_dir is None else str(cache_dir))
    except Exception as e:
        raise DataError(
            f"cannot load dataset {dataset_id!r} (config {config_name!r}) with datasets.load_dataset: "
            f"{type(e).__name__}: {e}. If this machine has no access to the Hugging Face Hub, use a local "
            f"dataset dir, source 'files', or a built-in dataset ({', '.join(BUILTIN)})"
        ) from e
    splits = list(dsd.keys())
    if train_split not in dsd:
        raise DataError(f"dataset {dataset_id!r}: no split {train_split!r} (key 'train_split'); splits: {splits}")
    test_ds = None
    if test_split is not None:
        if test_split in dsd:
            test_ds = dsd[test_split]
        elif test_split == "test":  # the default: a dataset without a test split gets a seeded split later
            log.info("dataset %r has no 'test' split (splits: %s); a stratified split of train is used", dataset_id, splits)
        else:
            raise DataError(f"dataset {dataset_id!r}: no split {test_split!r} (key 'test_split'); splits: {splits}")
    train_ds = dsd[train_split]
    feature = train_ds.features.get(label_column)
    train_df = train_ds.to_pandas()
    test_df = None if test_ds is None else test_ds.to_pandas()
    tr_name, te_name = f"{dataset_id}[{train_split}]", f"{dataset_id}[{test_split}]"
    hint = "; hub test splits of GLUE-style sets are unlabelled (-1): use test_split='validation'"
    if isinstance(feature, datasets.ClassLabel):
        # Keep the dataset's own ids and names so results read the same as elsewhere.
        return _table_from_classlabel(train_df, test_df, feature.names, text_column, label_column,
                                      text_pair_column, tr_name, te_name, hint)
    return table_from_frames(train_df, test_df, text_column=text_column, label_column=label_column,
                             text_pair_column=text_pair_column, train_name=tr_name, test_name=te_name,
                             test_hint=hint)


def _table_from_classlabel(
    train_df: pd.DataFrame,
    test_df: pd.DataFrame | None,
    names: list[str],
    text_column: str,
    label_column: str,
    text_pair_column: str | None,
    tr_name: str,
    te_name: str,
    hint: str,
) -> tuple[TextTable, TextTable | None]:
    """(train, test|None) whose label ids are the datasets.ClassLabel ids and names."""
    vocab = list(range(len(names)))

    def build(df: pd.DataFrame, where: str, h: str = "") -> TextTable:
        keys = _column_labels(df, where, "label_column", label_column)
        return TextTable(
            texts=_column_texts(df, where, "text_column", text_column),
            labels=_map_labels(keys, vocab, where, label_column, h),
            label_names=[str(n) for n in names],
            texts_pair=None if text_pair_column is None
            else _column_texts(df, where, "text_pair_column", text_pair_column),
        )

    tr = build(train_df, tr_name)
    if len(set(tr.labels)) < 2:
        raise DataError(f"{tr_name}: column {label_column!r} (key 'label_column') has a single class; need at least 2")
    return tr, None if test_df is None else build(test_df, te_name, hint)
