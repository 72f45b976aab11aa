"""The data of the lm-eval tasks in this folder, read from the JSON-lines files beside this file
(from any working directory, with no network): ``custom_dataset: !function utils.NAME``."""

import json
import os

import datasets

HERE = os.path.dirname(os.path.abspath(__file__))


def _load(name: str) -> datasets.DatasetDict:
    with open(os.path.join(HERE, name), encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})


def python_syntax(**kwargs) -> datasets.DatasetDict:
    """40 Python lines cut short, each with three endings: the first is valid Python, the others not."""
    return _load("python_syntax.jsonl")


def python_text(**kwargs) -> datasets.DatasetDict:
    """Six short Python functions, scored whole (bits per byte)."""
    return _load("python_text.jsonl")
