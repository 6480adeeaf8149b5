"""Loader for the local tiny multiple-choice task (data next to this file, no Hub access)."""

import json
import os

from datasets import Dataset, DatasetDict

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "loraprune_tiny_mc.json")


def load_tiny_mc(**kwargs) -> DatasetDict:
    with open(DATA, encoding="utf-8") as f:
        rows = json.load(f)
    return DatasetDict({"test": Dataset.from_list(rows)})
