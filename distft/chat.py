"""`distft chat`: talk to a trained model with plain transformers/peft.

The source is a run directory (its `final/`: a full model or a PEFT adapter), a Hugging
Face model folder, or a PEFT adapter folder whose base model `adapter_config.json` names.
Nothing of distft's training code runs: the model is loaded with
`AutoModelForCausalLM.from_pretrained` (plus `PeftModel.from_pretrained` for an adapter),
`trust_remote_code` off. Each turn is the tokenizer's chat template rendered with
`add_generation_prompt=True`, answered by `generate()`, streamed by a `TextStreamer` and
stopped at the end of the assistant's turn: the tokenizer's EOS, the model's generation
config EOS and the template's end-of-turn token (`<|eot_id|>`, `<|im_end|>`, `<|end|>` ...),
found as label masking finds it (`distft.data.templates.end_of_turn`).
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from distft.errors import UserError
from distft.model_files import is_reward_model
from distft.rundir import is_run

ADAPTER_CONFIG = "adapter_config.json"
_WEIGHT_PATTERNS = ("*.safetensors", "pytorch_model*.bin")
COMMANDS = "/reset: new conversation; /exit or Ctrl-D: quit"
Message = dict[str, str]


@dataclass(frozen=True)
class ModelSource:
    path: Path  # the folder with the model or adapter and the tokenizer
    base: str | None  # an adapter's base model (local folder or hub name); None: full model


@dataclass(frozen=True)
class Sampling:
    max_new_tokens: int = 256
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    seed: int | None = None  # sampling only; None: not reproducible

    def generate_kwargs(self) -> dict[str, Any]:
        """What `generate()` gets; explicit, so a model's generation config (which may
        ask for sampling) never changes greedy decoding."""
        if self.temperature == 0:
            return {"max_new_tokens": self.max_new_tokens, "do_sample": False}
        return {
            "max_new_tokens": self.max_new_tokens,
            "do_sample": True,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": 0,  # no top-k cut unless asked (transformers' default is 50)
        }


def find_model(path: Path) -> ModelSource:
    """Where the model is, from files alone; a UserError naming what is missing."""
    if not path.exists():
        raise UserError(f"{path}: no such directory")
    if not path.is_dir():
        raise UserError(f"{path}: not a directory (a run, a model or an adapter folder)")
    if is_run(path):
        final = path / "final"
        if not final.is_dir():
            raise UserError(
                f"{path}: this run has no final model ({final} is missing); "
                f"export a checkpoint with `distft export {path} --out DIR` and chat with DIR"
            )
        path = final
    if is_reward_model(path):
        raise UserError(
            f"{path}: a reward model (a sequence classifier) scores text, it does not "
            "generate; load it with AutoModelForSequenceClassification"
        )
    if (path / ADAPTER_CONFIG).is_file():
        return ModelSource(path, _adapter_base(path / ADAPTER_CONFIG))
    weights = any(any(path.glob(p)) for p in _WEIGHT_PATTERNS)
    if (path / "config.json").is_file() and weights:
        return ModelSource(path, None)
    raise UserError(
        f"{path}: no model in it (neither config.json with weights nor {ADAPTER_CONFIG})"
    )


def _adapter_base(config: Path) -> str:
    try:
        base = json.loads(config.read_text(encoding="utf-8")).get("base_model_name_or_path")
    except (OSError, ValueError, AttributeError) as e:
        raise UserError(f"{config}: not a readable adapter config ({e})") from None
    if not isinstance(base, str) or not base:
        raise UserError(f"{config}: base_model_name_or_path is not set")
    local = os.path.isabs(base) or base.startswith((".", "~")) or base.count("/") > 1
    if local and not Path(base).expanduser().is_dir():
        raise UserError(f"{config}: the adapter's base model {base} is missing")
    return base


def load(source: ModelSource, device: str) -> tuple[Any, Any]:
    """(model in eval mode on `device`, tokenizer) with plain transformers/peft."""
    import logging
    import warnings

    # peft imports bitsandbytes when it is installed; on CPUs with AVX512-BF16 it warns that
    # its optional hub kernel package is missing (nothing is downloaded here)
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # stderr holds errors only; stdout the answers
    hf_logging.set_verbosity_error()
    warnings.filterwarnings("ignore", category=FutureWarning)  # deprecations inside peft
    own_tokenizer = source.base is None or (source.path / "tokenizer_config.json").is_file()
    try:  # an adapter folder without tokenizer files: the base model's tokenizer
        tokenizer = AutoTokenizer.from_pretrained(
            source.path if own_tokenizer else source.base, trust_remote_code=False
        )
        model: Any
        if source.base is None:
            model = AutoModelForCausalLM.from_pretrained(
                source.path, dtype="auto", trust_remote_code=False
            )
        else:
            from peft import PeftModel

            base = AutoModelForCausalLM.from_pretrained(
                source.base, dtype="auto", trust_remote_code=False
            )
            model = PeftModel.from_pretrained(base, source.path)
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"{source.path}: cannot load the model: {first}") from None
    if not getattr(tokenizer, "chat_template", None):
        raise UserError(f"{source.path}: the tokenizer has no chat template")
    return model.to(device).eval(), tokenizer


def stop_ids(model: Any, tokenizer: Any) -> list[int]:
    """Token ids that end the assistant's turn: EOS (tokenizer and generation config) and
    the chat template's end-of-turn token."""
    from distft.data.templates import end_of_turn

    ids: list[int] = []
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for eos in (tokenizer.eos_token_id, gen_eos):
        ids += [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    token = end_of_turn(tokenizer)
    if token is not None:
        ids.append(int(tokenizer.convert_tokens_to_ids(token)))
    return list(dict.fromkeys(ids))


def prompt_inputs(tokenizer: Any, messages: list[Message]) -> Any:
    """The conversation as the template renders it for the assistant's next turn."""
    import jinja2

    try:
        return tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
    except jinja2.TemplateError as e:
        raise UserError(f"the chat template refuses this conversation: {e}") from None


class Chat:
    """One conversation with a loaded model; `say` answers a user turn and keeps both."""

    def __init__(self, model: Any, tokenizer: Any, sampling: Sampling, system: str | None):
        self.model, self.tokenizer, self.sampling = model, tokenizer, sampling
        self.system = system
        self.stops = stop_ids(model, tokenizer)
        self.messages: list[Message] = []
        self.reset()
        if sampling.temperature > 0 and sampling.seed is not None:
            import torch

            torch.manual_seed(sampling.seed)

    def reset(self) -> None:
        self.messages = [{"role": "system", "content": self.system}] if self.system else []

    def say(self, text: str) -> str:
        """Stream the answer to `text` on stdout (a newline after it) and return it."""
        import torch
        from transformers import TextStreamer

        turn = [*self.messages, {"role": "user", "content": text}]
        inputs = prompt_inputs(self.tokenizer, turn).to(self.model.device)
        pad = self.tokenizer.pad_token_id
        if pad is None and self.stops:
            pad = self.stops[0]
        streamer = TextStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        with torch.inference_mode():
            out = self.model.generate(
                **inputs,
                **self.sampling.generate_kwargs(),
                eos_token_id=self.stops or None,  # none known: max_new_tokens ends it
                pad_token_id=pad,
                streamer=streamer,
            )
        new = out[0, inputs["input_ids"].shape[1] :]
        answer = str(self.tokenizer.decode(new, skip_special_tokens=True))
        self.messages = [*turn, {"role": "assistant", "content": answer}]
        return answer


def user_turns(interactive: bool) -> Iterator[str]:
    """User turns: from a terminal with a prompt (readline editing), else one per line of
    stdin. Ends at EOF, Ctrl-C at the prompt, or /exit."""
    if interactive:
        import readline  # noqa: F401  (line editing and history for input())

        print(f"distft chat ({COMMANDS})", file=sys.stderr)
    lines: Iterable[str] = _terminal_lines() if interactive else sys.stdin
    for line in lines:
        text = line.strip()
        if text in ("/exit", "/quit"):
            return
        if text:
            yield text


def _terminal_lines() -> Iterator[str]:
    while True:
        try:
            yield input("you> ")
        except (EOFError, KeyboardInterrupt):
            print(file=sys.stderr)
            return


def converse(chat: Chat, turns: Iterable[str], interactive: bool) -> None:
    for text in turns:
        if text == "/reset":
            chat.reset()
            continue
        if not interactive:
            chat.say(text)
            continue
        print("assistant> ", end="", flush=True)
        try:
            chat.say(text)
        except KeyboardInterrupt:  # Ctrl-C stops this answer; the turn is not kept
            print("\n(interrupted)", file=sys.stderr)


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"
