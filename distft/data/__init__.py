"""Data: sources -> records -> samples (formats) -> tokens + labels (chat templates,
masking) -> cached arrays -> splits (mixing, val split) -> per-rank batches (padded,
packed or length-grouped; resumable order) and statistics."""

from distft.data.batch import Batch, collate_rows
from distft.data.formats import Completion, Conversation, Pair, Sample, Text, Tokens
from distft.data.loader import TrainBatches, collate, eval_batches, step_layout
from distft.data.pairs import PairSplit
from distft.data.pipeline import DataSplits, check_records, prepare, read_conversations
from distft.data.records import DataError
from distft.data.stats import describe
from distft.data.store import Split
from distft.data.tokenize import IGNORE, encode

__all__ = [
    "IGNORE",
    "Batch",
    "Completion",
    "Conversation",
    "DataError",
    "DataSplits",
    "Pair",
    "Sample",
    "PairSplit",
    "Split",
    "Text",
    "Tokens",
    "TrainBatches",
    "check_records",
    "collate",
    "collate_rows",
    "describe",
    "encode",
    "eval_batches",
    "prepare",
    "read_conversations",
    "step_layout",
]
