"""Small offline fast tokenizers carrying real chat templates (tests/fixtures/chat_templates).

Each has its model's template markers as single special tokens and the model's bos/eos, on
a byte-level BPE trained on a few sentences (so words merge, and a template's space before
a word merges into the word's token, as in the real tokenizers).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

FIXTURES = Path(__file__).parent / "fixtures" / "chat_templates"

CORPUS = [
    "The capital of France is Paris. What is the capital of Spain? Madrid is.",
    "Reverse these words: cat dog bird. bird dog cat. Sort 3 1 2: 1 2 3.",
    "You are a terse assistant. Answer in one word. Think step by step first.",
    "Let me think about it: two plus two is four. The answer is 4. Thanks, bye.",
]


@dataclass(frozen=True)
class Spec:
    template: str  # fixture file stem
    bos: str | None
    eos: str
    specials: tuple[str, ...]  # other special tokens (the template's markers)
    plain: tuple[str, ...] = ()  # added tokens that are not special (Qwen3's <think>)


SPECS = {
    "llama-3.1": Spec(
        "llama-3.1-instruct",
        "<|begin_of_text|>",
        "<|eot_id|>",
        ("<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|end_of_text|>"),
    ),
    "qwen2.5": Spec("qwen2.5-instruct", None, "<|im_end|>", ("<|im_start|>", "<|endoftext|>")),
    "qwen3": Spec(
        "qwen3", None, "<|im_end|>", ("<|im_start|>", "<|endoftext|>"), ("<think>", "</think>")
    ),
    "mistral-v0.3": Spec("mistral-7b-instruct-v0.3", "<s>", "</s>", ("[INST]", "[/INST]")),
    "mistral-nemo": Spec("mistral-nemo-instruct-2407", "<s>", "</s>", ("[INST]", "[/INST]")),
    "gemma-2": Spec("gemma-2-it", "<bos>", "<eos>", ("<start_of_turn>", "<end_of_turn>", "<pad>")),
    "phi-3.5": Spec(
        "phi-3.5-mini-instruct",
        "<s>",
        "<|endoftext|>",
        ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>"),
    ),
}


def template_text(spec: Spec) -> str:
    return (FIXTURES / f"{spec.template}.jinja").read_text()


@cache
def build(name: str) -> Any:
    """A fast tokenizer with the chat template of SPECS[name], built offline."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    spec = SPECS[name]
    specials = [t for t in (spec.bos, spec.eos, *spec.specials) if t]
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(CORPUS, trainer)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=spec.bos,
        eos_token=spec.eos,
        pad_token=spec.eos,
        additional_special_tokens=[t for t in spec.specials],
        chat_template=template_text(spec),
        name_or_path=f"test-{name}",
    )
    if spec.plain:
        tok.add_tokens(list(spec.plain))  # added, not special
    return tok


def save(name: str, folder: Path) -> Path:
    """The tokenizer of SPECS[name] saved as a model folder (what `model.tokenizer` names)."""
    build(name).save_pretrained(folder)
    return folder
