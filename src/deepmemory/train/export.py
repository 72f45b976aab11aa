"""Loading a trained model, and ``deepmemory export RUN OUT``: a clean Hugging Face folder.

A run directory and each of its ``checkpoints/step-N/`` are Hugging Face model folders already
(``AutoModelForCausalLM.from_pretrained(path)`` loads them once ``deepmemory.models`` is
imported); :func:`export_run` writes only what a published model needs: ``config.json``,
``generation_config.json``, ``model.safetensors``, the tokenizer files when the run used a
Hugging Face tokenizer, and a model card (``README.md``) with the preset, size, data, steps and
validation bits per byte. The folder is ready for ``model.push_to_hub`` / ``huggingface-cli upload``.
"""

from __future__ import annotations

import json
import math
import os

from ..files import plain_mode
from . import checkpoint as ck

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


class ExportError(ck.CheckpointError):
    """A folder that cannot be exported or loaded; one line for the user."""


def _split(path: str) -> tuple[str, str | None]:
    """``(run directory, checkpoint directory or None)`` of a run directory or ``RUN/checkpoints/step-N``."""
    path = os.path.normpath(path)
    if os.path.basename(os.path.dirname(path)) == ck.CHECKPOINTS:
        return os.path.dirname(os.path.dirname(path)), path
    return path, None


def load_run(path: str):
    """``(model, tokenizer, info)`` of a run directory, one of its ``checkpoints/step-N``, or an
    exported folder (a Hugging Face folder of ``model_type`` "deepmemory"). The model is in eval
    mode on the CPU; ``info`` holds ``run_dir``, ``record`` (the run record, ``None`` for an exported
    folder) and ``state`` (the checkpoint's ``state.json``, when there is one).

    Raises:
        CheckpointError: (one line) the folder is none of these, or its files do not fit.
    """
    from ..data import DataError, tokenizer_from_info
    from .trainer import check_config_file, model_from_config

    run_dir, checkpoint = _split(path)
    if not os.path.isdir(path):
        raise ExportError(f"{path} is not a directory")
    if not os.path.isfile(os.path.join(run_dir, ck.RUN)) and _is_hf_folder(path):
        return _load_hf_folder(path)
    record = ck.read_run_config(run_dir)
    weights = os.path.join(path, ck.MODEL)
    if not os.path.isfile(weights):
        raise ExportError(f"{path} has no {ck.MODEL} (has its training saved a checkpoint yet?)")
    model = model_from_config(record["model"]["config"])
    check_config_file(path, record["model"]["config"])
    try:
        model.load_state_dict(ck.read_tensors(weights), strict=True)
    except RuntimeError as err:
        raise ExportError(f"{path}: the weights do not fit the run's model: {str(err).splitlines()[0]}") from err
    _check_finite(model, weights)
    try:
        tokenizer = tokenizer_from_info(record["tokenizer"], run_dir)
    except DataError as err:
        raise ExportError(str(err)) from err
    eos = tokenizer.eos_id
    model.config.eos_token_id = model.config.pad_token_id = eos
    state = None
    state_dir = checkpoint or ck.latest_checkpoint(run_dir)
    if state_dir and os.path.isfile(os.path.join(state_dir, "state.json")):
        state = ck.read_json(os.path.join(state_dir, "state.json"))
        state.pop("optimizer", None)
    _generation_config(model, eos)
    return model.eval(), tokenizer, {"run_dir": run_dir, "record": record, "state": state}


def _check_finite(model, path: str) -> None:
    """``ExportError`` when a weight of ``model`` (read from ``path``) holds NaN or infinity: a
    damaged file, since training never saves such weights (a diverged run stops first)."""
    import torch

    for name, t in model.state_dict().items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise ExportError(
                f"{path}: the weight {name} holds non-finite values (a damaged file: training never saves them)"
            )


def _is_hf_folder(path: str) -> bool:
    try:
        with open(os.path.join(path, ck.CONFIG)) as f:
            return json.load(f).get("model_type") == "deepmemory"
    except (OSError, ValueError, AttributeError, RecursionError):
        return False


def _load_hf_folder(path: str):
    from transformers.utils import logging as hf_logging

    from ..data import ByteTokenizer, DataError, HFTokenizer
    from ..models import DeepMemoryForCausalLM

    bar = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # (a bar over a dozen tensors on stderr, where errors go)
    try:
        model = DeepMemoryForCausalLM.from_pretrained(path, use_safetensors=True)  # never a pickled .bin
    except Exception as err:  # transformers raises many kinds
        raise ExportError(f"{path}: cannot load the model: {ck._one_line(err)}") from err
    finally:
        if bar:
            hf_logging.enable_progress_bar()
    _check_finite(model, path)
    if os.path.isfile(os.path.join(path, "tokenizer.json")):
        try:
            tokenizer = HFTokenizer(path)
        except DataError as err:
            raise ExportError(str(err)) from err
    elif model.config.vocab_size == ByteTokenizer.vocab_size:
        tokenizer = ByteTokenizer()
    else:
        raise ExportError(
            f"{path} has no tokenizer.json and its vocabulary ({model.config.vocab_size}) is not the byte tokenizer's"
        )
    return model.eval(), tokenizer, {"run_dir": path, "record": None, "state": None}


def _generation_config(model, eos: int | None) -> None:
    from transformers import GenerationConfig

    model.generation_config = GenerationConfig(
        eos_token_id=eos, pad_token_id=eos, bos_token_id=model.config.bos_token_id
    )


def _number(mapping, key: str):
    """``mapping[key]`` when it is a finite int or float (not a bool), else None: a model card is
    written from a run record that may be damaged or hand-edited."""
    value = mapping.get(key) if isinstance(mapping, dict) else None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return value


def _fmt(value, spec: str = ",") -> str:
    return "n/a" if value is None else format(value, spec)


def model_card(name: str, record: dict, state: dict | None, tokenizer_kind: str) -> str:
    """The ``README.md`` of an exported model: what it is, what it was trained on, how it scored."""
    from .. import __version__
    from ..data import bits_per_byte

    model, data, train = (record.get(k) if isinstance(record.get(k), dict) else {} for k in ("model", "data", "train"))
    preset, size = model.get("preset", "?"), model.get("size", "?")
    steps, val_loss = _number(state, "step"), _number(state, "val_loss")
    val_tokens, val_bytes = _number(data, "val_tokens"), _number(data, "val_bytes")
    val_bpb = (
        bits_per_byte(val_loss, val_tokens / val_bytes) if None not in (val_loss, val_tokens) and val_bytes else None
    )
    batch, seq = _number(train, "batch_size"), _number(train, "seq_len")
    tokens = steps * batch * seq if None not in (steps, batch, seq) else None
    tokenizer = (
        "raw UTF-8 bytes: ids 0-255 are the byte values, 256 ends a document (no tokenizer files; "
        "`list(text.encode())` tokenizes)"
        if tokenizer_kind == "bytes"
        else "`tokenizer.json` (Hugging Face tokenizers)"
    )
    # a tokenizer other than bytes: the unigram token entropy (the byte entropy is no baseline there)
    baseline, baseline_key = (
        ("unigram token entropy", "token_entropy_bpb")
        if "token_entropy_bpb" in data
        else ("unigram byte entropy", "byte_entropy")
    )
    rows = [
        ("preset", f"`{preset}`"),
        ("size", f"`{size}`"),
        ("parameters", _fmt(_number(model, "parameters"))),
        ("data", data.get("source", "?")),
        ("training tokens (data)", f"{_fmt(_number(data, 'train_tokens'))} train / {_fmt(val_tokens)} validation"),
        ("steps", _fmt(steps)),
        ("tokens seen", _fmt(tokens)),
        ("sequence length, batch", f"{train.get('seq_len', '?')} tokens, {train.get('batch_size', '?')} sequences"),
        (
            "validation",
            f"{_fmt(val_bpb, '.3f')} bits/byte ({baseline} {_fmt(_number(data, baseline_key), '.3f')})",
        ),
        ("tokenizer", tokenizer),
    ]
    table = "\n".join(["| | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows])
    encode = (
        'ids = torch.tensor([list("def main():".encode())])'
        if tokenizer_kind == "bytes"
        else "tokenizer = AutoTokenizer.from_pretrained(path)\n"
        'ids = tokenizer("def main():", return_tensors="pt").input_ids'
    )
    decode = (
        'print(bytes(i for i in out[0].tolist() if i < 256).decode(errors="replace"))'
        if tokenizer_kind == "bytes"
        else "print(tokenizer.decode(out[0]))"
    )
    imports = "import torch\n" if tokenizer_kind == "bytes" else ""
    auto = "AutoModelForCausalLM" if tokenizer_kind == "bytes" else "AutoModelForCausalLM, AutoTokenizer"
    return f"""---
library_name: deepmemory
pipeline_tag: text-generation
tags:
- deepmemory
- {preset}
- test-time-memorization
---

# {name}

A `{preset}` model at size `{size}` trained with deepmemory
{__version__} (`deepmemory train`): a test-time-memorization language model (Titans / ATLAS family).

{table}

## Use

```python
{imports}import deepmemory.models  # registers model_type "deepmemory" with the Auto classes
from transformers import {auto}

path = "{name}"  # this folder, or its Hub id
model = AutoModelForCausalLM.from_pretrained(path)
{encode}
out = model.generate(ids, max_new_tokens=64, do_sample=True, top_p=0.9)
{decode}
```

or `deepmemory generate --checkpoint {name} --prompt "def main():"`.
"""


def export_run(src: str, out: str, overwrite: bool = False) -> str:
    """Write the model of ``src`` (a run directory or one of its checkpoints) to ``out`` as a
    clean Hugging Face folder with a model card; built beside ``out`` and renamed in. Returns ``out``.

    Raises:
        CheckpointError: ``src`` cannot be loaded, or ``out`` exists (and is not empty) without ``overwrite``.
    """
    ck.check_writable_parent(out, "OUT", ExportError)
    model, tokenizer, info = load_run(src)
    if info["record"] is None:
        raise ExportError(
            f"{src} is an exported folder already; export reads a run directory or one of its checkpoints"
        )
    if os.path.exists(out) and not (os.path.isdir(out) and not os.listdir(out)):
        if not overwrite:
            raise ExportError(f"{out} already exists; pass --overwrite to replace it")
        if not os.path.isdir(out) or ck.is_run_dir(out):
            raise ExportError(
                f"--overwrite refuses to replace {out}: it is not a folder written by `deepmemory export`"
            )
    from .trainer import model_files

    folder = os.path.basename(os.path.abspath(out))

    def write(tmp: str) -> None:
        model.config.architectures = [type(model).__name__]
        model_files(model.config, tokenizer)(tmp)  # config.json, generation_config.json, the tokenizer
        weights = model.state_dict()
        if model.config.tie_word_embeddings:  # stored once, as save_pretrained does
            for key in getattr(model, "_tied_weights_keys", None) or ():
                weights.pop(key, None)
        ck.write_tensors(os.path.join(tmp, ck.MODEL), weights, ck.MODEL_METADATA)
        ck.write_text(os.path.join(tmp, "README.md"), model_card(folder, info["record"], info["state"], tokenizer.kind))
        for root, _, files in os.walk(tmp):
            for f in files:
                os.chmod(os.path.join(root, f), plain_mode())

    ck.write_dir(out, write)
    return out
