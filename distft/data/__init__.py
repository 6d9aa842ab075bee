"""Data: records -> conversations -> tokens + labels -> per-rank batches."""

from distft.data.loader import Batch, TrainBatches, collate, eval_batches, load_split
from distft.data.records import Conversation, DataError, read_conversations
from distft.data.tokenize import IGNORE, encode

__all__ = [
    "IGNORE",
    "Batch",
    "Conversation",
    "DataError",
    "TrainBatches",
    "collate",
    "encode",
    "eval_batches",
    "load_split",
    "read_conversations",
]
