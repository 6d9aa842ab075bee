"""`distft chat`: the real CLI on the session's trained runs (tests/reference_runs.py) and
on the tiny base model, against plain transformers/peft `generate()` in this process.

The 8-step reference runs cannot answer their tasks yet (eval loss ~5.6 of a uniform 6.2;
greedy decoding answers every eval prompt with `<|end|>` at once), so the tests check what
holds for any model: the CLI's answer is exactly what plain `generate()` gives on the chat
template's generation prompt, sampled answers stop at `<|end|>`, a conversation keeps its
history, and an adapter answers as the model merged from it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from distft.assets import EOS, TinyAssets
from tests.reference_runs import TrainedRun
from tests.support import run_cli

PROMPT = "Sort the digits in ascending order.\n\n4821"
MAX_NEW = 24


def load(path: Path, base: Path | None = None) -> tuple[Any, Any]:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    if base is None:
        return AutoModelForCausalLM.from_pretrained(path).eval(), tokenizer
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), path)
    return model.eval(), tokenizer


def generate(
    model: Any, tokenizer: Any, messages: list[dict[str, str]], sample: bool
) -> tuple[str, list[int]]:
    """Plain transformers: the template with the generation prompt, stop at `<|end|>`.
    With `sample`: temperature 1, no top-k/top-p cut, from the global torch RNG."""
    inputs = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    end = tokenizer.convert_tokens_to_ids(EOS)
    mode = {"do_sample": True, "temperature": 1.0, "top_p": 1.0, "top_k": 0} if sample else {}
    with torch.inference_mode():
        out = model.generate(
            **inputs,
            **(mode or {"do_sample": False}),
            max_new_tokens=MAX_NEW,
            eos_token_id=end,
            pad_token_id=tokenizer.pad_token_id,
        )
    new = out[0, inputs["input_ids"].shape[1] :].tolist()
    return tokenizer.decode(new, skip_special_tokens=True), new


def sampled(model: Any, tokenizer: Any, seed: int) -> tuple[str, list[int]]:
    torch.manual_seed(seed)
    return generate(model, tokenizer, [{"role": "user", "content": PROMPT}], sample=True)


def a_seed_that_stops_early(model: Any, tokenizer: Any) -> tuple[int, str]:
    """A seed whose sampled answer has text and ends with `<|end|>` before MAX_NEW."""
    end = tokenizer.convert_tokens_to_ids(EOS)
    for seed in range(50):
        text, ids = sampled(model, tokenizer, seed)
        if text.strip() and ids[-1] == end and len(ids) < MAX_NEW:
            return seed, text
    raise AssertionError("no seed in 0..49 gives a non-empty answer ending at <|end|>")


def chat_cli(source: Path, *args: str, stdin: str | None = None) -> str:
    import subprocess

    from tests.support import DISTFT, REPO

    proc = subprocess.run(
        [DISTFT, "chat", str(source), "--max-new-tokens", str(MAX_NEW), *args],
        cwd=REPO, input=stdin or "", capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == "", proc.stderr  # no progress bars or warnings around the answer
    return proc.stdout


@pytest.mark.slow
def test_chat_on_a_fine_tuned_run_is_plain_generate_and_stops_at_end(
    trained: dict[str, TrainedRun],
) -> None:
    run = trained["zero2_full"].out
    model, tokenizer = load(run / "final")
    greedy, _ = generate(model, tokenizer, [{"role": "user", "content": PROMPT}], False)
    assert chat_cli(run, "--prompt", PROMPT) == greedy + "\n"  # greedy is the default

    seed, text = a_seed_that_stops_early(model, tokenizer)
    got = chat_cli(run, "--prompt", PROMPT, "--temperature", "1", "--seed", str(seed))
    assert got == text + "\n"


@pytest.mark.slow
def test_chat_on_a_lora_run_answers_as_the_merged_model(
    trained: dict[str, TrainedRun], tmp_path: Path
) -> None:
    run = trained["zero3_lora"].out
    base = Path(json.loads((run / "final" / "adapter_config.json").read_text())[
        "base_model_name_or_path"
    ])  # fmt: skip
    model, tokenizer = load(run / "final", base)
    seed, text = a_seed_that_stops_early(model, tokenizer)
    merged = tmp_path / "merged"
    model.merge_and_unload().save_pretrained(merged)
    tokenizer.save_pretrained(merged)

    args = ("--prompt", PROMPT, "--temperature", "1", "--seed", str(seed))
    from_adapter = chat_cli(run, *args)
    assert from_adapter == text + "\n"
    assert chat_cli(merged, *args) == from_adapter
    bare = tmp_path / "bare_adapter"  # an adapter folder without tokenizer files
    bare.mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        shutil.copy(run / "final" / name, bare)
    assert chat_cli(bare, *args) == from_adapter  # the base's tokenizer, the same template
    base_model, _ = load(base)
    assert sampled(base_model, tokenizer, seed)[0] + "\n" != from_adapter  # the adapter acts


def test_chat_keeps_the_conversation_over_stdin_turns(tiny: TinyAssets) -> None:
    """One user turn per stdin line; each answer is generated with the history before it
    (the random-init base model answers with MAX_NEW tokens of text, never empty)."""
    model, tokenizer = load(tiny.model_dir)
    turns = ["What is 2 plus 3?", "Write the word in uppercase: bako"]
    messages = [{"role": "system", "content": "Be brief."}]
    want = []
    for turn in turns:
        messages.append({"role": "user", "content": turn})
        answer, _ = generate(model, tokenizer, messages, sample=False)
        messages.append({"role": "assistant", "content": answer})
        want.append(answer)
    alone, _ = generate(model, tokenizer, [messages[0], messages[3]], sample=False)
    assert alone != want[1]  # so the second answer shows the history was kept
    stdin = f"{turns[0]}\n\n{turns[1]}\n/exit\nnever read\n"
    got = chat_cli(tiny.model_dir, "--system", "Be brief.", "--temperature", "0", stdin=stdin)
    assert got == "".join(a + "\n" for a in want)


def test_chat_bad_sources_are_one_line_exit_2(tiny: TinyAssets, tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / ".distft").write_text("{}")
    (tmp_path / "empty").mkdir()
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    missing_base = tmp_path / "gone" / "model"
    (adapter / "adapter_config.json").write_text(
        json.dumps({"base_model_name_or_path": str(missing_base), "peft_type": "LORA"})
    )
    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    shutil.copy(tiny.model_dir / "config.json", no_weights)
    cases = {
        tmp_path / "missing": "no such directory",
        tmp_path / "empty": "no model in it",
        no_weights: "no model in it",
        run: "this run has no final model",
        adapter: f"the adapter's base model {missing_base} is missing",
    }
    runs = [((str(source), "--prompt", "hi"), message) for source, message in cases.items()]
    runs.append(((str(tiny.model_dir), "--top-p", "0"), "--top-p: expected a value in (0, 1]"))
    for args, message in runs:
        proc = run_cli("chat", *args)
        assert proc.returncode == 2, (args, proc.stderr)
        assert "Traceback" not in proc.stderr and proc.stdout == ""
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
        assert message in lines[0], lines[0]
