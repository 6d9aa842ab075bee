"""Writing a Hugging Face folder: safetensors shards + index, config, generation config
and the tokenizer with the run's chat template. Used by `distft export` and at the end of
training, so both write the same layout:

    full model   model.safetensors, or model-0000i-of-0000n.safetensors + the index
                 model.safetensors.index.json; config.json (dtype = the exported dtype),
                 generation_config.json, tokenizer files with the run's chat template
    LoRA         adapter_config.json, adapter_model.safetensors, README.md (peft's card),
                 tokenizer files
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch

from distft import model as model_mod
from distft import quant, vocab
from distft.config import Config
from distft.errors import UserError
from distft.lora import with_lora as _with_lora
from distft.vocab import load_tokenizer

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DEFAULT_SHARD_SIZE = "5GB"
WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"
ADAPTER = "adapter_model.safetensors"
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9}
_UNITS.update(KIB=2**10, MIB=2**20, GIB=2**30)


def parse_size(text: str, flag: str = "--max-shard-size") -> int:
    """'5GB', '500MB', '2GiB', '1000000' -> bytes; a bad size names `flag`."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMG]I?B|B)?\s*", text.upper())
    if not m or float(m.group(1)) <= 0:
        raise UserError(f"{flag}: expected a size like 5GB, 80GiB or 500MB (got {text!r})")
    return int(float(m.group(1)) * _UNITS[m.group(2) or ""])


class WeightWriter:
    """Safetensors shards named as transformers names them, plus the index if sharded.
    Tensor names are put back into the checkpoint format of the architecture (transformers
    renames or fuses some weights on load and reverts that on save; so do we)."""

    def __init__(self, out: Path, n_shards: int, model: Any):
        self.out, self.n, self.model = out, n_shards, model
        self.written, self.total = 0, 0
        self.weight_map: dict[str, str] = {}

    def write(self, tensors: dict[str, torch.Tensor]) -> None:
        from safetensors.torch import save_file

        try:
            from transformers.core_model_loading import revert_weight_conversion

            tensors = revert_weight_conversion(self.model, tensors)
        except ImportError:  # transformers < 5 converts nothing
            pass
        self.written += 1
        name = WEIGHTS if self.n == 1 else f"model-{self.written:05d}-of-{self.n:05d}.safetensors"
        save_file(
            {k: t.contiguous() for k, t in tensors.items()}, self.out / name, {"format": "pt"}
        )
        self.weight_map.update(dict.fromkeys(tensors, name))
        self.total += sum(t.nbytes for t in tensors.values())

    def close(self) -> None:
        if self.written != self.n:
            raise RuntimeError(f"wrote {self.written} of {self.n} shards")
        if self.n > 1:
            index = {"metadata": {"total_size": self.total}, "weight_map": self.weight_map}
            (self.out / INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def hf_config(cfg: Config) -> Any:
    """The base model's transformers config."""
    return model_mod.hf_config(cfg)


def write_metadata(out: Path, cfg: Config, tokenizer: Any, dtype: torch.dtype | None) -> None:
    """Tokenizer files and, for full models (`dtype` given), config.json and
    generation_config.json of the base model, whose `eos_token_id` also stops at the
    end-of-turn token of the chat template the run trained with."""
    from transformers import GenerationConfig

    if dtype is not None:
        config = hf_config(cfg)
        config.dtype = dtype
        config.vocab_size = vocab_rows(cfg, config, tokenizer)
        if cfg.objective.method == "reward":  # loads as the sequence classifier it is
            config.architectures = [type(meta_model(cfg, lora=False)).__name__]
            config.pad_token_id = tokenizer.pad_token_id  # scored at the last other token
        config.save_pretrained(out)
        try:
            gen = GenerationConfig.from_pretrained(
                cfg.model.name_or_path, revision=cfg.model.revision or "main"
            )
        except OSError:  # the base model ships none
            gen = GenerationConfig.from_model_config(config)
        gen.eos_token_id = stop_ids(gen.eos_token_id, end_of_turn_id(tokenizer))
        gen.save_pretrained(out)
    tokenizer.save_pretrained(out)


def end_of_turn_id(tokenizer: Any) -> int | None:
    """The id of the token that ends an assistant turn in the tokenizer's chat template
    (`distft.data.templates.end_of_turn`: the one label masking trains), or None."""
    from distft.data.templates import end_of_turn

    token = end_of_turn(tokenizer)
    return None if token is None else int(tokenizer.convert_tokens_to_ids(token))


def stop_ids(eos: int | list[int] | None, end_of_turn: int | None) -> int | list[int] | None:
    """The base's eos id(s) plus the end-of-turn id, as a list when there are several."""
    if end_of_turn is None:
        return eos
    ids = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    if end_of_turn in ids:
        return eos
    return [*ids, end_of_turn] if ids else end_of_turn


def training_tokenizer(cfg: Config, tokenizer: Any | None = None) -> Any:
    """The run's tokenizer, carrying the chat template its data was rendered with."""
    from distft.data.templates import chat_template

    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(cfg)
    tokenizer.chat_template = chat_template(tokenizer, cfg.data.chat_template)
    return tokenizer


def vocab_rows(cfg: Config, config: Any, tokenizer: Any) -> int:
    """The trained model's vocabulary size: the base's, grown for added tokens."""
    rows = int(config.get_text_config().vocab_size)
    return vocab.embedding_rows(cfg, len(tokenizer), rows) if vocab.customised(cfg) else rows


def added_ids(cfg: Config, tokenizer: Any) -> list[int]:
    """The ids of `model.add_special_tokens` (verification probes them)."""
    return vocab.token_ids(cfg, tokenizer)


def meta_model(cfg: Config, lora: bool) -> Any:
    """The architecture without weights (meta device): names, shapes, the LoRA layout."""
    model = model_mod.meta_model(cfg)
    if vocab.customised(cfg):
        with torch.device("meta"):
            vocab.resize(model, cfg, load_tokenizer(cfg))
    return _with_lora(model, cfg) if lora else model


def base_model(cfg: Config, dtype: torch.dtype = torch.float32, trained: bool = False) -> Any:
    """The base model's weights, as training started from them. `trained`: the base the
    adapters trained on; for a 4-bit base (`lora.quantize_base`) that is the base quantised
    from the training dtype as the workers quantised it (`dtype` is then ignored). Without
    it, the full-precision base (what `--merge-lora` folds the adapter into)."""
    m = cfg.model
    q = quant.bnb_config(cfg, model_mod.load_dtype(cfg)) if trained else None
    model = model_mod.auto_class(cfg).from_pretrained(
        m.name_or_path,
        **model_mod.task_kwargs(cfg),
        dtype=model_mod.load_dtype(cfg) if q is not None else dtype,
        trust_remote_code=m.trust_remote_code,
        revision=m.revision,
        quantization_config=q,
    )
    if vocab.customised(cfg):  # the embeddings grown as training grew them
        vocab.resize(model, cfg, load_tokenizer(cfg))
    if q is not None:
        quant.keep_packed_layout(model)  # the layout and kernels training used
    return model


def with_lora(model: Any, cfg: Config) -> Any:
    """`model` with the run's (freshly initialised) LoRA adapters: the same code as training."""
    return _with_lora(model, cfg)


TRAINED = (".lora_", ".trainable_tokens_delta.", ".modules_to_save.")


def lora_names(model: torch.nn.Module) -> list[str]:
    """The parameters a LoRA run trains: adapters, added tokens' rows, modules to save."""
    return [n for n, _ in model.named_parameters() if any(t in n for t in TRAINED)]


def weights_of(model: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    """Parameters (tied ones once) and persistent buffers, in module order."""
    persistent = set(model.state_dict().keys())
    params = list(model.named_parameters())
    return params + [(n, b) for n, b in model.named_buffers() if n in persistent]


def max_positions(config: Any) -> int:
    return int(getattr(config, "max_position_embeddings", None) or 64)
