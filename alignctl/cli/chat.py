"""`alignctl chat run=<dir>` and `alignctl generate run=<dir> data=<file> out=<file.jsonl>`: try what a
run trained. Both load the run's checkpoint as its next stage would (an adapter folded into its base,
models/loading.py), encode prompts as training did (data/encode.py: the chat template for
conversations) and sample with the rollout engines (rl/rollout.py), batched for `generate`.

Plain commands (not Hydra apps): they take `key=value` arguments of their own, checked before any model
loads; a wrong one stops with one line and exit code 2.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from alignctl.cli.key_values import flag, number, parse
from alignctl.core.errors import UserError
from alignctl.runs.outputs import check_output
from alignctl.runs.runfiles import read_lineage

CHAT_KEYS = {"run": "<run dir>", "system": "", "max_new_tokens": "64", "temperature": "0", "raw": "false"}
GENERATE_KEYS = {"run": "<run dir>", "data": "<file>", "out": "<file.jsonl>", "n": "1", "max_new_tokens": "64", "temperature": "1.0", "top_p": "1.0",
                 "batch_size": "32", "engine": "auto"}
ENGINES = ("auto", "native", "hf", "vllm")
# Stages whose checkpoint is a scorer, not a model that writes text.
NOT_GENERATIVE = ("reward",)


def checked_run(command: str, value: str) -> Path:
    """A finished run directory whose checkpoint writes text, else one line saying why not."""
    run = Path(value).expanduser()
    if not (run / "lineage.json").exists():
        raise UserError(f"{command}: run={run}: not an alignctl run directory (no lineage.json)")
    if not (run / "checkpoint").exists():
        raise UserError(f"{command}: run={run}: has no checkpoint/ (did it finish?)")
    stage = read_lineage(run).get("stage")
    if stage in NOT_GENERATIVE:
        raise UserError(f"{command}: run={run}: is a {stage} model (it scores text, it does not write it); give a policy's run")
    return run


def load_policy(run: Path) -> tuple[Any, Any]:
    """(model, tokenizer) of a run's checkpoint, in eval mode, on the device the run trained on."""
    from omegaconf import OmegaConf

    from alignctl.cli.app import quiet_libraries
    from alignctl.models.loading import load_causal_lm, load_tokenizer

    quiet_libraries()
    cfg = OmegaConf.load(run / "config.yaml")
    checkpoint = str(run / "checkpoint")
    tokenizer = load_tokenizer(checkpoint, cfg.model)
    hardware = OmegaConf.merge(cfg.hardware, {"gradient_checkpointing": False})
    model = load_causal_lm(checkpoint, cfg.model, hardware)  # an adapter is folded into its base
    return model.eval(), tokenizer


# ------------------------------------------------------------------------------------------ chat
def chat_command(args: list[str]) -> None:
    values = parse("chat", args, CHAT_KEYS)
    max_new_tokens = number("chat", values, "max_new_tokens", int, 1)
    temperature = number("chat", values, "temperature", float, 0.0)
    raw = flag("chat", values, "raw")
    run = checked_run("chat", values["run"])

    from transformers import TextStreamer

    from alignctl.data.encode import encode_prompt
    from alignctl.runs.interrupt import Interrupted

    model, tokenizer = load_policy(run)
    templated = bool(getattr(tokenizer, "chat_template", None)) and not raw
    system = values["system"]
    interactive = sys.stdin.isatty()
    greeting = f"chatting with {run} ({'chat template' if templated else 'raw prompts'}); /reset clears the history, /exit or Ctrl-D quits"
    history: list[dict[str, str]] = []
    device = next(model.parameters()).device
    while True:
        # Ctrl-C anywhere from the greeting to a line read quits, as Ctrl-D does (the greeting is inside:
        # whoever saw it may press Ctrl-C at once).
        try:
            if greeting:
                print(greeting, flush=True)
                greeting = ""
            if interactive:
                print("> ", end="", flush=True)
            line = sys.stdin.readline()
        except Interrupted:
            line = ""
        if not line:  # EOF
            print(flush=True)
            return
        text = line.strip()
        if text in ("/exit", "/quit"):
            return
        if text == "/reset":
            history = []
            print("(history cleared)", flush=True)
            continue
        if not text:
            continue
        history.append({"role": "user", "content": text})
        if templated:
            messages = ([{"role": "system", "content": system}] if system else []) + history
            prompt_ids = encode_prompt(tokenizer, messages)
        else:  # the turns so far as one text, the model continuing it
            prompt_ids = encode_prompt(tokenizer, system + "".join(m["content"] for m in history))
        streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
        sampling = {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}
        try:
            output = answer_of(model, tokenizer, prompt_ids, device, max_new_tokens, streamer, sampling)
        except Interrupted:  # Ctrl-C during an answer stops that answer, not the chat
            print("\n(stopped; that turn is forgotten)", flush=True)
            history.pop()
            continue
        answer = tokenizer.decode(output[0, len(prompt_ids):], skip_special_tokens=True)
        history.append({"role": "assistant", "content": answer})
        sys.stdout.flush()


def answer_of(model: Any, tokenizer: Any, prompt_ids: list[int], device: Any, max_new_tokens: int, streamer: Any, sampling: dict) -> Any:
    """One reply's token ids (prompt included), printed through `streamer` as they are produced."""
    import torch

    with torch.no_grad():
        return model.generate(input_ids=torch.tensor([prompt_ids], device=device), attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long, device=device),
                              max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                              streamer=streamer, **sampling)


# -------------------------------------------------------------------------------------- generate
def read_prompts(path: Path) -> list[Any]:
    """The `prompt` column of a JSON-lines file: a string or a conversation (a list of messages)."""
    if not path.is_file():
        raise UserError(f"generate: data={path}: no such file (give a .jsonl file with a prompt column)")
    prompts = []
    for number_, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise UserError(f"generate: data={path}: line {number_} is not JSON ({err.msg})") from None
        prompt = row.get("prompt") if isinstance(row, dict) else None
        if not isinstance(prompt, (str, list)) or not prompt:
            raise UserError(f"generate: data={path}: line {number_} has no prompt column (a string or a list of messages)")
        prompts.append(prompt)
    if not prompts:
        raise UserError(f"generate: data={path}: holds no rows")
    return prompts


def generate_command(args: list[str]) -> None:
    values = parse("generate", args, GENERATE_KEYS)
    n = number("generate", values, "n", int, 1)
    max_new_tokens = number("generate", values, "max_new_tokens", int, 1)
    temperature = number("generate", values, "temperature", float, 0.0)
    top_p = number("generate", values, "top_p", float, 0.0, 1.0)
    batch_size = number("generate", values, "batch_size", int, 1)
    if values["engine"] not in ENGINES:
        raise UserError(f"generate: engine={values['engine']!r}; valid: {', '.join(ENGINES)}")
    if temperature == 0 and n > 1:
        raise UserError("generate: temperature=0 is greedy, so n>1 would repeat one completion; give temperature>0")
    run = checked_run("generate", values["run"])
    prompts = read_prompts(Path(values["data"]).expanduser())
    out = Path(values["out"]).expanduser()
    check_output(out, "out")

    import torch

    from alignctl.core.console import console
    from alignctl.data.encode import encode_prompt
    from alignctl.rl.rollout import Sampling, sample

    model, tokenizer = load_policy(run)
    # temperature 0: greedy, the rollout engines' sampling at a vanishing temperature would divide by 0.
    sampling = Sampling(temperature=temperature or 1.0, top_p=top_p, top_k=1 if temperature == 0 else 0, max_new_tokens=max_new_tokens,
                        engine=values["engine"])
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + ".partial")  # a stopped run leaves no half-written file under the real name
    written = 0
    with partial.open("w") as file, torch.no_grad():
        for start in range(0, len(prompts), batch_size):
            batch = prompts[start : start + batch_size]
            completions = sample(model, [encode_prompt(tokenizer, p) for p in batch], n, sampling, tokenizer.pad_token_id, tokenizer.eos_token_id)
            for i, ids in enumerate(completions.completion_ids):
                text = tokenizer.decode(ids, skip_special_tokens=True)
                record = {"prompt": batch[i // n], "completion": text, "sample": i % n, "truncated": completions.truncated[i]}
                file.write(json.dumps(record) + "\n")
                written += 1
    partial.replace(out)
    console.print(f"{written} completions of {len(prompts)} prompts ({n} each, {completions.engine} engine) -> {out}")
