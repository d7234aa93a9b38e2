"""Data pipeline: sources, split, partition, encode, FedML dataset list. No network."""
from __future__ import annotations

import bz2
import json
from collections import Counter

import numpy as np
import pandas as pd
import pytest
import torch

from tiny import tiny_texts, tiny_tokenizer

from fedml_fibec import assets
from fedml_fibec.data import (
    DeviceData,
    EncodedSet,
    FederatedData,
    TextTable,
    build_federated_data,
    encode,
    load_builtin,
    load_files,
    load_hub,
    partition_indices,
    stratified_split,
    stratified_subsample,
    to_fedml_dataset,
)
from fedml_fibec.errors import ConfigError, DataError


def _frame(n=40, seed=0, pair=False, label_fmt=str):
    texts, labels = tiny_texts(n, seed=seed, num_labels=3)
    df = pd.DataFrame({"sentence": texts, "y": [label_fmt(l) for l in labels]})
    if pair:
        df["sentence2"] = [t[::-1] for t in texts]
    return df


def _write(df: pd.DataFrame, path):
    ext = path.name.split(".", 1)[1]
    if ext == "csv":
        df.to_csv(path, index=False)
    elif ext == "tsv":
        df.to_csv(path, sep="\t", index=False)
    elif ext == "jsonl":
        df.to_json(path, orient="records", lines=True)
    elif ext == "json":
        df.to_json(path, orient="records")
    elif ext == "parquet":
        df.to_parquet(path)
    return path


# --------------------------------------------------------------------------- sources


@pytest.mark.parametrize("ext", ["csv", "tsv", "jsonl", "json", "parquet"])
@pytest.mark.parametrize("pair", [False, True])
def test_load_files_every_format(tmp_path, ext, pair):
    fmt = (lambda l: ["neg", "neu", "pos"][l])
    tr_df, te_df = _frame(40, 0, pair, fmt), _frame(12, 1, pair, fmt)
    tr, te = load_files(_write(tr_df, tmp_path / f"train.{ext}"), _write(te_df, tmp_path / f"test.{ext}"),
                        text_column="sentence", label_column="y", text_pair_column="sentence2" if pair else None)
    assert tr.label_names == ["neg", "neu", "pos"]  # sorted unique train labels
    assert len(tr) == 40 and len(te) == 12
    assert tr.texts == tr_df["sentence"].tolist()
    assert [tr.label_names[i] for i in te.labels] == te_df["y"].tolist()
    assert (tr.texts_pair is not None) == pair and (te.texts_pair is not None) == pair
    if pair:
        assert tr.texts_pair == tr_df["sentence2"].tolist()


def test_int_labels_sorted_numerically_and_mixed_types(tmp_path):
    df = pd.DataFrame({"text": ["a", "b", "c", "d"], "label": [10, 2, 2, 10]})
    tr, te = load_files(_write(df, tmp_path / "tr.csv"),
                        _write(pd.DataFrame({"text": ["x"], "label": ["10"]}), tmp_path / "te.jsonl"),
                        text_column="text", label_column="label")
    assert tr.label_names == ["2", "10"] and tr.labels == [1, 0, 0, 1] and te.labels == [1]


def test_missing_column_names_file_and_columns(tmp_path):
    p = _write(_frame(), tmp_path / "train.csv")
    with pytest.raises(DataError) as e:
        load_files(p, text_column="text", label_column="y")
    msg = str(e.value)
    assert str(p) in msg and "'text'" in msg and "text_column" in msg and "sentence" in msg


def test_empty_and_missing_files(tmp_path):
    empty = tmp_path / "train.csv"
    empty.write_text("")
    with pytest.raises(DataError, match=f"train_file.*{empty}.*empty"):
        load_files(empty, text_column="text", label_column="label")
    header_only = tmp_path / "h.csv"
    header_only.write_text("text,label\n")
    with pytest.raises(DataError, match=f"{header_only}.*no rows"):
        load_files(header_only, text_column="text", label_column="label")
    with pytest.raises(DataError, match="test_file.*nope.csv.*does not exist"):
        load_files(_write(_frame(), tmp_path / "ok.csv"), tmp_path / "nope.csv", text_column="sentence", label_column="y")
    with pytest.raises(DataError, match=r"unsupported file extension '\.txt'"):
        (tmp_path / "a.txt").write_text("x")
        load_files(tmp_path / "a.txt", text_column="text", label_column="label")


def test_one_class_and_null_text(tmp_path):
    p = _write(pd.DataFrame({"text": ["a", "b"], "label": ["pos", "pos"]}), tmp_path / "one.csv")
    with pytest.raises(DataError, match=f"{p}.*'label'.*single class.*pos"):
        load_files(p, text_column="text", label_column="label")
    p = _write(pd.DataFrame({"text": ["a", None, "c"], "label": [0, 1, 0]}), tmp_path / "null.parquet")
    with pytest.raises(DataError, match=rf"{p}.*'text'.*null.*\[1\]"):
        load_files(p, text_column="text", label_column="label")


def test_unknown_test_label_is_named(tmp_path):
    tr = _write(pd.DataFrame({"text": ["a", "b"], "label": ["neg", "pos"]}), tmp_path / "tr.csv")
    te = _write(pd.DataFrame({"text": ["c", "d"], "label": ["pos", "meh"]}), tmp_path / "te.csv")
    with pytest.raises(DataError) as e:
        load_files(tr, te, text_column="text", label_column="label")
    msg = str(e.value)
    assert str(te) in msg and "'label'" in msg and "meh" in msg and "neg" in msg


def test_builtin_mr_from_fake_asset(tmp_path, monkeypatch):
    csv = "category,text,movie_name,has_plot_and_reviews\n"
    rows = [("fresh", "a fine film"), ("rotten", "dull, boring"), ("plot", "a man walks"),
            ("fresh", "superb \"acting\""), ("rotten", "weak script")]
    csv += "".join(f'{c},"{t.replace(chr(34), chr(34) * 2)}",m,True\n' for c, t in rows)
    path = tmp_path / "rt.csv.bz2"
    path.write_bytes(bz2.compress(csv.encode()))
    seen = {}

    def fake_asset_path(name, cache_dir=None, *, download=True):
        seen["args"] = (name, cache_dir)
        return path

    monkeypatch.setattr(assets, "asset_path", fake_asset_path)
    tr, te = load_builtin("mr", tmp_path / "cache")
    assert te is None and seen["args"] == ("mr", tmp_path / "cache")
    assert tr.label_names == ["rotten", "fresh"]
    assert tr.texts == ["a fine film", "dull, boring", 'superb "acting"', "weak script"] and tr.labels == [1, 0, 1, 0]
    with pytest.raises(DataError, match="unknown built-in dataset 'sst9'.*mr"):
        load_builtin("sst9")


def test_builtin_stackoverflow_from_fake_asset(tmp_path, monkeypatch):
    """train + dev become train, test stays test; quoted fields with tabs and newlines are one row each."""
    folder = tmp_path / "origin_data"
    folder.mkdir()
    (folder / "train.tsv").write_text('text\tlabel\nHQL count question\thibernate\n"tab\there and a\nnewline"\tbash\n')
    (folder / "dev.tsv").write_text("text\tlabel\nqt signals\tqt\n   \tqt\n")  # a blank text is dropped
    (folder / "test.tsv").write_text("text\tlabel\nbash loop\tbash\n")
    monkeypatch.setattr(assets, "asset_path", lambda name, cache_dir=None, *, download=True: folder)
    tr, te = load_builtin("stackoverflow")
    assert tr.label_names == ["bash", "hibernate", "qt"]  # alphabetical
    assert tr.texts == ["HQL count question", "tab\there and a\nnewline", "qt signals"] and tr.labels == [1, 0, 2]
    assert te.texts == ["bash loop"] and te.labels == [0]
    (folder / "test.tsv").write_text("text\tlabel\nsomething\tcobol\n")
    with pytest.raises(DataError, match="labels \\['cobol'\\] do not occur in train/dev"):
        load_builtin("stackoverflow")


def test_load_hub_local_dirs_and_error_wrapping(tmp_path, monkeypatch):
    import datasets

    d = tmp_path / "ds"
    d.mkdir()
    _write(pd.DataFrame({"text": ["a", "b", "c"], "label": ["pos", "neg", "pos"]}), d / "train.csv")
    _write(pd.DataFrame({"text": ["d"], "label": ["neg"]}), d / "test.csv")
    tr, te = load_hub(str(d), text_column="text", label_column="label", cache_dir=tmp_path / "hf")
    assert tr.label_names == ["neg", "pos"] and tr.labels == [1, 0, 1] and te.labels == [0]

    # A save_to_disk dir with a ClassLabel keeps the dataset's ids and names; no test split -> None.
    feats = datasets.Features({"s": datasets.Value("string"), "y": datasets.ClassLabel(names=["bad", "ok", "good"])})
    dsd = datasets.DatasetDict(train=datasets.Dataset.from_dict({"s": ["x", "y", "z"], "y": [2, 0, 2]}, features=feats))
    dsd.save_to_disk(str(tmp_path / "saved"))
    tr, te = load_hub(str(tmp_path / "saved"), text_column="s", label_column="y")
    assert te is None and tr.label_names == ["bad", "ok", "good"] and tr.labels == [2, 0, 2]
    with pytest.raises(DataError, match=r"no split 'dev' \(key 'test_split'\)"):
        load_hub(str(tmp_path / "saved"), text_column="s", label_column="y", test_split="dev")

    def offline(*a, **k):
        raise ConnectionError("no route to huggingface.co")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataError, match="(?s)'glue'.*no route.*Hugging Face Hub"):
        load_hub("glue", config_name="sst2", text_column="sentence", label_column="label")


# --------------------------------------------------------------------------- split


def _table(n=300, seed=0, num_labels=3) -> TextTable:
    texts, labels = tiny_texts(n, seed=seed, num_labels=num_labels)
    return TextTable(texts, labels, [f"c{i}" for i in range(num_labels)])


def test_stratified_split_keeps_ratios_and_is_seeded():
    t = TextTable(*(lambda tl: (tl[0], [0] * 200 + [1] * 100))(tiny_texts(300)), ["a", "b"])
    tr, te = stratified_split(t, test_fraction=0.2, seed=3)
    assert Counter(te.labels) == {0: 40, 1: 20} and Counter(tr.labels) == {0: 160, 1: 80}
    tr2, te2 = stratified_split(t, test_fraction=0.2, seed=3)
    assert te2.texts == te.texts and tr2.texts == tr.texts
    _, te3 = stratified_split(t, test_fraction=0.2, seed=4)
    assert te3.texts != te.texts
    assert sorted(tr.texts + te.texts) == sorted(t.texts)
    with pytest.raises(ConfigError, match="test_fraction"):
        stratified_split(t, test_fraction=1.0, seed=0)


def test_stratified_subsample_exact_size():
    t = _table(300)
    s = stratified_subsample(t, 50, seed=0)
    assert len(s) == 50
    full, sub = Counter(t.labels), Counter(s.labels)
    assert all(abs(sub[c] - 50 * full[c] / 300) <= 1 for c in full)
    assert stratified_subsample(t, 50, seed=0).texts == s.texts
    assert len(stratified_subsample(t, 10_000, seed=0)) == 300


# --------------------------------------------------------------------------- partition


def _mean_label_entropy(parts, labels, k):
    ents = []
    for p in parts:
        c = np.bincount(labels[p], minlength=k) / max(len(p), 1)
        c = c[c > 0]
        ents.append(-(c * np.log(c)).sum())
    return float(np.mean(ents))


@pytest.mark.parametrize("method", ["iid", "dirichlet"])
def test_partition_uses_every_sample_once_and_is_deterministic(method):
    labels = np.random.default_rng(0).integers(0, 4, size=1000)
    parts = partition_indices(labels, 20, method=method, alpha=0.5, min_samples=10, seed=7)
    assert len(parts) == 20 and min(len(p) for p in parts) >= 10
    allidx = np.concatenate(parts)
    assert len(allidx) == 1000 and np.array_equal(np.sort(allidx), np.arange(1000))
    again = partition_indices(labels, 20, method=method, alpha=0.5, min_samples=10, seed=7)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again))
    other = partition_indices(labels, 20, method=method, alpha=0.5, min_samples=10, seed=8)
    assert not all(np.array_equal(a, b) for a, b in zip(parts, other))


def test_iid_sizes_near_equal():
    parts = partition_indices(np.zeros(103, dtype=int) + np.arange(103) % 2, 10, method="iid", alpha=1, min_samples=0, seed=0)
    assert {len(p) for p in parts} == {10, 11}


def test_dirichlet_small_alpha_is_skewed():
    labels = np.random.default_rng(1).integers(0, 5, size=2000)
    iid = partition_indices(labels, 20, method="iid", alpha=0.1, min_samples=5, seed=0)
    dir_ = partition_indices(labels, 20, method="dirichlet", alpha=0.1, min_samples=5, seed=0)
    e_iid, e_dir = _mean_label_entropy(iid, labels, 5), _mean_label_entropy(dir_, labels, 5)
    assert e_iid > 1.5 and e_dir < 0.75 * e_iid


def test_min_samples_top_up_when_resampling_fails():
    labels = np.random.default_rng(2).integers(0, 2, size=200)
    # 19 samples each out of 200 over 10 devices with alpha=0.01 essentially never happens by chance.
    parts = partition_indices(labels, 10, method="dirichlet", alpha=0.01, min_samples=19, seed=0)
    assert min(len(p) for p in parts) >= 19
    assert np.array_equal(np.sort(np.concatenate(parts)), np.arange(200))
    again = partition_indices(labels, 10, method="dirichlet", alpha=0.01, min_samples=19, seed=0)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again))


def test_partition_errors():
    labels = np.zeros(50, dtype=int)
    with pytest.raises(DataError, match="num_devices=10.*min_samples_per_device=6.*60 > 50"):
        partition_indices(labels, 10, method="iid", alpha=1, min_samples=6, seed=0)
    with pytest.raises(ConfigError, match="partition_method.*'zipf'"):
        partition_indices(labels, 2, method="zipf", alpha=1, min_samples=0, seed=0)
    with pytest.raises(ConfigError, match="partition_alpha"):
        partition_indices(labels, 2, method="dirichlet", alpha=0, min_samples=0, seed=0)
    assert len(partition_indices(labels, 2, method="hetero", alpha=1, min_samples=1, seed=0)) == 2


# --------------------------------------------------------------------------- encode


def test_encode_single_and_pair():
    tok = tiny_tokenizer()
    t = TextTable(["good film", "bad plot and the script was awful"], [0, 1], ["a", "b"])
    enc = encode(t, tok, max_length=6)
    assert enc.input_ids.shape == (2, 6) and enc.attention_mask.shape == (2, 6) and enc.labels.tolist() == [0, 1]
    assert enc.input_ids.dtype == torch.long and enc.token_type_ids is None
    assert enc.attention_mask[0].tolist() == [1, 1, 0, 0, 0, 0] and enc.attention_mask[1].sum() == 6
    assert len(enc) == 2 and len(enc.subset([1])) == 1 and enc.subset([1]).labels.tolist() == [1]
    p = TextTable(["good film", "bad"], [0, 1], ["a", "b"], texts_pair=["the plot", "dull"])
    ep = encode(p, tok, max_length=8)
    assert ep.input_ids.shape == (2, 8)
    assert ep.input_ids[0, :2].tolist() == [tok.convert_tokens_to_ids(w) for w in ["good", "film"]]
    assert tok.convert_tokens_to_ids("plot") in ep.input_ids[0].tolist()
    from fedml_fibec.core.local import model_inputs

    assert set(model_inputs(ep, [0, 1], torch.device("cpu"))) >= {"input_ids", "attention_mask"}
    both = EncodedSet.concat([enc.subset([0]), enc.subset([1])])
    assert torch.equal(both.input_ids, enc.input_ids)


def test_encode_pad_fallback_to_eos_and_error():
    tok = tiny_tokenizer()
    tok.pad_token = None
    tok.eos_token = "[SEP]"
    enc = encode(TextTable(["good", "bad film"], [0, 1], ["a", "b"]), tok, max_length=4)
    assert tok.pad_token == "[SEP]" and enc.input_ids[0, -1].item() == tok.convert_tokens_to_ids("[SEP]")
    tok2 = tiny_tokenizer()
    tok2.pad_token = None
    tok2.eos_token = None
    with pytest.raises(ConfigError, match="neither a pad token nor an eos token"):
        encode(TextTable(["good", "bad"], [0, 1], ["a", "b"]), tok2, max_length=4)


# --------------------------------------------------------------------------- federated


def _fd(tmp_path, **kw) -> FederatedData:
    texts, labels = tiny_texts(240, seed=0)
    p = _write(pd.DataFrame({"text": texts, "label": labels}), tmp_path / "train.jsonl")
    args = dict(source="files", dataset="tiny", tokenizer=tiny_tokenizer(), max_length=12, num_devices=8,
                partition_method="dirichlet", partition_alpha=0.5, min_samples_per_device=5,
                test_fraction=0.25, seed=0, train_file=p)
    args.update(kw)
    return build_federated_data(**args)


def test_build_federated_data_and_fedml_list(tmp_path):
    fd = _fd(tmp_path)
    assert len(fd.train) == 8 and [d.device_id for d in fd.train] == list(range(8))
    assert fd.num_classes == 2 and fd.label_names == ["0", "1"]
    assert len(fd.test) == 60 and fd.train_num == 180 and min(len(d) for d in fd.train) >= 5
    st = fd.stats()
    assert st["train_num"] == 180 and sum(st["device_sizes"]) == 180 and len(st["device_label_counts"]) == 8
    json.dumps(st)  # loggable as is

    lst = to_fedml_dataset(fd)
    assert len(lst) == 8
    train_num, test_num, train_g, test_g, num_dict, train_d, test_d, class_num = lst
    assert (train_num, test_num, class_num) == (180, 60, 2)
    assert isinstance(train_g, DeviceData) and train_g.device_id == -1 and len(train_g) == 180
    assert test_g.device_id == -1 and test_g.data is fd.test
    assert set(num_dict) == set(train_d) == set(test_d) == set(range(8))
    assert all(num_dict[i] == len(train_d[i]) and train_d[i].device_id == i for i in range(8))
    assert all(test_d[i].device_id == i and test_d[i].data is fd.test for i in range(8))

    again = _fd(tmp_path)
    assert all(torch.equal(a.data.input_ids, b.data.input_ids) for a, b in zip(fd.train, again.train))
    small = _fd(tmp_path, max_train_samples=80, num_devices=4, partition_method="iid")
    assert small.train_num == 80 and len(small.test) == 60  # the test set does not shrink


def _unique_rows(tmp_path, n: int = 300) -> str:
    """n texts with distinct token sequences (index i written in WORDS as digits), 3 classes (i mod 3)."""
    from tiny import WORDS

    def text(i: int) -> str:
        return " ".join(WORDS[(i // len(WORDS) ** k) % len(WORDS)] for k in range(3))
    df = pd.DataFrame({"text": [text(i) for i in range(n)], "label": [i % 3 for i in range(n)]})
    return _write(df, tmp_path / "unique.jsonl")


def _rows(encoded) -> list[tuple]:
    return [tuple(r.tolist()) for r in encoded.input_ids]


def test_validation_split_is_held_out_of_train_test_and_every_device(tmp_path):
    path = _unique_rows(tmp_path)
    fd = _fd(tmp_path, train_file=path, validation_fraction=0.2, test_fraction=0.2, min_samples_per_device=3)
    val, test = _rows(fd.validation), _rows(fd.test)
    devices = [set(_rows(d.data)) for d in fd.train]
    assert len(set(val)) == len(val) == 48  # round(0.2 * 80) per class, from the 240 left after the test split
    assert not set(val) & set(test)
    assert all(not set(val) & dev for dev in devices)
    assert len(set().union(*devices)) + len(val) + len(test) == 300  # every row somewhere, once
    assert torch.bincount(fd.validation.labels, minlength=3).tolist() == [16, 16, 16]  # stratified
    assert fd.stats()["validation_num"] == 48
    # seeded: the same set again; another seed another set; the test set does not move
    assert _rows(_fd(tmp_path, train_file=path, validation_fraction=0.2, test_fraction=0.2,
                     min_samples_per_device=3).validation) == val
    other = _fd(tmp_path, train_file=path, validation_fraction=0.2, test_fraction=0.2, min_samples_per_device=3,
                seed=1)
    assert set(_rows(other.validation)) != set(val)
    # no validation split: nothing held out, the devices' data as before
    plain = _fd(tmp_path, train_file=path, test_fraction=0.2, min_samples_per_device=3)
    assert plain.validation is None and plain.train_num == 240 and _rows(plain.test) == test


def test_personal_held_out_samples_come_from_the_device_and_are_not_trained_on(tmp_path):
    path = _unique_rows(tmp_path)
    plain = _fd(tmp_path, train_file=path, min_samples_per_device=3)
    held = _fd(tmp_path, train_file=path, min_samples_per_device=3, personal_eval_fraction=0.25)
    for a, b in zip(plain.train, held.train):
        whole, train, out = set(_rows(a.data)), set(_rows(b.data)), set(_rows(b.heldout))
        assert not train & out and train | out == whole  # the device's own samples, split
        assert len(out) == min(len(whole) - 1, max(1, round(0.25 * len(whole))))
    again = _fd(tmp_path, train_file=path, min_samples_per_device=3, personal_eval_fraction=0.25)
    assert all(_rows(a.heldout) == _rows(b.heldout) for a, b in zip(held.train, again.train))  # seeded
    assert all(d.heldout is None for d in plain.train) and _rows(plain.test) == _rows(held.test)


def test_build_federated_data_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="train_file"):
        _fd(tmp_path, train_file=None)
    with pytest.raises(ConfigError, match="'source'.*'ftp'"):
        _fd(tmp_path, source="ftp")
    with pytest.raises(DataError, match="min_samples_per_device"):
        _fd(tmp_path, min_samples_per_device=100)


def test_encode_cached_encodes_once_and_reads_the_same_tensors(tmp_path, monkeypatch):
    import importlib

    encode_module = importlib.import_module("fedml_fibec.data.encode")  # the module; the package exports a function

    tok = tiny_tokenizer()
    table = TextTable(["good film", "bad plot and the script was awful", "good"], [0, 1, 0], ["a", "b"])
    calls = []
    real = encode_module.encode
    monkeypatch.setattr(encode_module, "encode", lambda *a, **k: calls.append(1) or real(*a, **k))
    first = encode_module.encode_cached(table, tok, max_length=6, cache_dir=tmp_path)
    second = encode_module.encode_cached(table, tok, max_length=6, cache_dir=tmp_path)
    assert len(calls) == 1 and len(list((tmp_path / "encoded").glob("*.pt"))) == 1
    reference = real(table, tok, max_length=6)
    for enc in (first, second):
        assert torch.equal(enc.input_ids, reference.input_ids) and torch.equal(enc.labels, reference.labels)
        assert torch.equal(enc.attention_mask, reference.attention_mask) and enc.token_type_ids is None
    # another length, other texts or other labels are other encodings
    encode_module.encode_cached(table, tok, max_length=8, cache_dir=tmp_path)
    encode_module.encode_cached(TextTable(["good film", "bad"], [0, 1], ["a", "b"]), tok, max_length=6,
                                cache_dir=tmp_path)
    encode_module.encode_cached(TextTable(table.texts, [1, 1, 0], ["a", "b"]), tok, max_length=6, cache_dir=tmp_path)
    assert len(calls) == 4 and len(list((tmp_path / "encoded").glob("*.pt"))) == 4
