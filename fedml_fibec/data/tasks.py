"""The paper's ten tasks by name: where each lives on the Hugging Face Hub and which columns it uses.

`--set dataset=rte` reads the hub dataset of the entry below with its columns and splits; MR
without hub access is the embedded asset (sources.load_mr), the other nine need the hub or a
saved copy (`data_args.task_copy`: a folder written by `DatasetDict.save_to_disk`, e.g. made on a
machine with hub access). GLUE's test splits are unlabelled, so GLUE tasks (and BoolQ, which has
no test split) are evaluated on their validation split, as the paper's peers do.

The ids are the hub's current homes of these sets (GLUE under nyu-mll/glue, BoolQ under
google/boolq, TREC under CogComp/trec; MPQA and SUBJ, not on the hub under their authors, from the
LM-BFF-style mirrors jxm/mpqa and SetFit/subj). They were chosen from the hub's listings on a
machine without hub access, so they were not loaded here; a missing column or split stops the run
with the columns and splits the dataset does have.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

from fedml_fibec.errors import DataError


@dataclass(frozen=True)
class Task:
    """One of the paper's tasks: hub id and config, columns, splits, number of classes."""

    name: str
    hub_id: str
    config: Optional[str]
    text_column: str
    label_column: str
    num_classes: int
    text_pair_column: Optional[str] = None
    train_split: str = "train"
    test_split: str = "test"
    what: str = ""


GLUE = "nyu-mll/glue"
PAPER_TASKS: dict[str, Task] = {t.name: t for t in (
    Task("boolq", "google/boolq", None, "question", "answer", 2, "passage", test_split="validation",
         what="yes/no questions about a passage"),
    Task("cola", GLUE, "cola", "sentence", "label", 2, test_split="validation", what="grammatical acceptability"),
    Task("mpqa", "jxm/mpqa", None, "sentence", "label", 2, what="opinion polarity of phrases"),
    Task("mr", "cornell-movie-review-data/rotten_tomatoes", None, "text", "label", 2,
         what="movie review sentiment (embedded offline copy: data_source=builtin)"),
    Task("mrpc", GLUE, "mrpc", "sentence1", "label", 2, "sentence2", test_split="validation",
         what="paraphrase"),
    Task("qnli", GLUE, "qnli", "question", "label", 2, "sentence", test_split="validation",
         what="question-answer entailment"),
    Task("rte", GLUE, "rte", "sentence1", "label", 2, "sentence2", test_split="validation",
         what="textual entailment"),
    Task("sst-2", GLUE, "sst2", "sentence", "label", 2, test_split="validation", what="sentence sentiment"),
    Task("subj", "SetFit/subj", None, "text", "label", 2, what="subjective vs objective sentences"),
    Task("trec", "CogComp/trec", None, "text", "coarse_label", 6, what="question type (6 coarse classes)"),
)}


def load_task(name: str, *, task_copy: Optional[str | os.PathLike] = None, cache_dir=None):
    """(train, test) of a paper task from the hub or from its saved copy; a clear error offline."""
    from .sources import load_hub

    task = PAPER_TASKS[name]
    source = str(task_copy) if task_copy is not None else task.hub_id
    try:
        return load_hub(source, config_name=None if task_copy is not None else task.config,
                        text_column=task.text_column, label_column=task.label_column,
                        text_pair_column=task.text_pair_column, train_split=task.train_split,
                        test_split=task.test_split, cache_dir=cache_dir)
    except DataError as exc:
        if task_copy is not None:
            raise DataError(f"dataset={name}: the copy in task_copy={task_copy} does not hold the task as expected "
                            f"({exc})") from None
        config = f", config {task.config!r}" if task.config else ""
        load = f"datasets.load_dataset({task.hub_id!r}" + (f", {task.config!r}" if task.config else "") + ")"
        raise DataError(
            f"dataset={name} needs the Hugging Face Hub dataset {task.hub_id!r}{config}, which could not be "
            f"loaded ({exc}). Without hub access: on a machine with it run python -c \"import datasets; "
            f"{load}.save_to_disk('{name}')\", copy the folder here and add --set task_copy=PATH/{name}; or, on a "
            "machine with hub access, allow downloads for the run: HF_HUB_OFFLINE=0 HF_DATASETS_OFFLINE=0 (runs "
            "are offline unless told otherwise). MR also runs offline from the embedded asset (data_source=builtin, "
            "dataset=mr).") from None
