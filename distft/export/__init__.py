"""Export: a checkpoint or the live engine -> a Hugging Face folder, verified.

`exporter`: `distft export` and the run's `final/` (full weights, a PEFT adapter, or the
adapter merged into the base); `consolidate`: ZeRO-0/1/2/3 shards -> tensors, one output
shard in memory at a time; `hf_folder`: the folder's layout (safetensors shards + index,
config, tokenizer); `verify`: the logits checks of an export against the checkpoint or the
engine.
"""

from distft.export.exporter import (
    ExportError,
    ExportResult,
    export_checkpoint,
    save_final,
    verify_export,
)

__all__ = ["ExportError", "ExportResult", "export_checkpoint", "save_final", "verify_export"]
