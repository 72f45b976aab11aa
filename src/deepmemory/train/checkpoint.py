"""Run directories and checkpoints: safetensors + JSON only, every write atomic.

A file is written as ``.NAME.tmp``, fsynced, then renamed over ``NAME``; a checkpoint is
written as the directory ``checkpoints/.tmp-step-N``, fsynced, then renamed to
``checkpoints/step-N``. A crash therefore leaves either the old file or the new one, and a
checkpoint directory without the ``.tmp-`` prefix is always complete.

Layout (the run directory, and every checkpoint in it, is also a Hugging Face model folder:
``AutoModelForCausalLM.from_pretrained(path)`` loads it once ``deepmemory.models`` is imported)::

    RUN/run.json                 run format, model config, train settings, tokenizer info, resolved settings
    RUN/config.json              the Hugging Face config (model_type "deepmemory"), written from run.json's model
    RUN/generation_config.json   end-of-document / padding ids
    RUN/model.safetensors        the latest weights (what ``deepmemory generate`` reads)
    RUN/tokenizer.json           for Hugging Face tokenizers only (with tokenizer_config.json)
    RUN/metrics.jsonl            one JSON object per step / evaluation
    RUN/loss.png                 refreshed at every evaluation
    RUN/checkpoints/step-N/      the model files above, optimizer.safetensors, rng.safetensors, state.json

Run directories of format version 1 kept the run record in ``config.json``; they are read as
they are, and a resumed one is rewritten in the current layout.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ..files import atomic_path, fsync_path, write_text_atomic

if TYPE_CHECKING:  # (torch stays unimported until tensors are written: the CLI starts fast)
    from torch import Tensor

FORMAT = "deepmemory-run"
VERSION = 2
LEGACY_VERSION = 1  # the run record in config.json, no Hugging Face files
RUN = "run.json"
CONFIG = "config.json"  # the Hugging Face model config
GENERATION_CONFIG = "generation_config.json"
METRICS = "metrics.jsonl"
MODEL = "model.safetensors"
CHECKPOINTS = "checkpoints"
TMP_PREFIX = ".tmp-"
STEP_DIR = re.compile(r"^step-(\d+)$")
# the top level of a run record: anything else is refused (a damaged or foreign file)
RUN_KEYS = ("format", "version", "created", "train", "resolved", "model", "tokenizer", "data")


class CheckpointError(ValueError):
    """A run directory or checkpoint that cannot be used; the message is one line for the user."""


def write_dir(out: str, write: Callable[[str], None]) -> None:
    """Build a folder with ``write(tmp)`` beside ``out`` and rename it to ``out``, replacing what is
    there only once it is complete: an error in ``write`` leaves ``out`` as it was."""
    parent, name = os.path.split(os.path.abspath(out))
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{name}.tmp-{os.getpid()}")
    if os.path.exists(tmp):
        shutil.rmtree(tmp)
    os.makedirs(tmp)
    try:
        write(tmp)
        fsync_path(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = os.path.join(parent, f".{name}.old-{os.getpid()}")
    if os.path.exists(out):
        os.rename(out, old)
    os.rename(tmp, out)
    fsync_path(parent)
    if os.path.exists(old):
        shutil.rmtree(old)


def check_writable_parent(path: str, flag: str, error: type = CheckpointError) -> None:
    """Raise ``error`` (one line naming ``flag`` and ``path``) when ``path`` cannot be created:
    the nearest existing folder above it is a file, or is not writable (a read-only file system
    or no permission)."""
    parent = os.path.dirname(os.path.abspath(path))
    while not os.path.lexists(parent):  # (the root exists)
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise error(f"{flag} {path}: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK):
        raise error(f"{flag} {path}: cannot write in {parent} (a read-only file system or no permission)")


def strict_json(obj, **kwargs) -> str:
    """``obj`` as strict JSON (RFC 8259, what every parser reads): ``json.dumps`` with
    ``allow_nan=False``, so a NaN or infinity raises ``ValueError`` instead of becoming a bare
    ``NaN``/``Infinity`` token. Values that may be non-finite go through :func:`finite_or_none` first."""
    return json.dumps(obj, allow_nan=False, **kwargs)


def finite_or_none(row: dict[str, Any]) -> dict[str, Any]:
    """``row`` with every non-finite float replaced by ``None`` (JSON ``null``): how a metrics row
    records a diverged loss or gradient norm."""
    return {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in row.items()}


def write_json(path: str, obj) -> None:
    """Write ``obj`` as strict JSON (:func:`strict_json`; raises ``ValueError`` on a non-finite
    float, before anything is written), atomically."""
    text = strict_json(obj, indent=2, sort_keys=True) + "\n"
    write_text(path, text)


def write_text(path: str, text: str) -> None:
    """Write ``text`` to ``path`` atomically and durably (:func:`deepmemory.files.atomic_path`)."""
    write_text_atomic(path, text)


def plain_tensors(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """CPU, contiguous, no two sharing storage (safetensors refuses tied weights)."""
    out, seen = {}, set()
    for name, t in tensors.items():
        t = t.detach().cpu().contiguous()
        key = (t.untyped_storage().data_ptr(), t.storage_offset()) if t.numel() else None
        out[name] = t.clone() if key in seen else t
        seen.add(key)
    return out


def write_tensors(path: str, tensors: dict[str, Tensor], metadata: dict[str, str] | None = None) -> None:
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file(plain_tensors(tensors), tmp, metadata=metadata)


def read_tensors(path: str) -> dict[str, Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(path)
    except Exception as err:  # safetensors raises its own and OS errors
        raise CheckpointError(f"cannot read {path}: {_one_line(err)}") from err


def read_json(path: str) -> dict:
    try:
        with open(path) as f:
            obj = json.load(f)
    except (OSError, ValueError, RecursionError) as err:  # (a decode error is a ValueError; nesting too deep)
        raise CheckpointError(f"cannot read {path}: {_one_line(err)}") from err
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} does not hold a JSON object")
    return obj


def _one_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0]}" if text else type(err).__name__


# ---------------------------------------------------------------- optimizer state
def flatten_optimizer(state: dict) -> tuple[dict[str, Tensor], dict]:
    """Split an optimizer state dict keyed by parameter name into tensors and JSON."""
    from torch import Tensor

    tensors, scalars = {}, {}
    for pname, slots in state["state"].items():
        for slot, value in slots.items():
            if isinstance(value, Tensor):
                tensors[f"{pname}/{slot}"] = value
            else:
                scalars[f"{pname}/{slot}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def unflatten_optimizer(tensors: dict[str, Tensor], meta: dict) -> dict:
    """The optimizer state dict of :func:`flatten_optimizer`'s parts; ``CheckpointError`` when
    they are malformed (a key without ``PARAMETER/SLOT``, no ``param_groups`` list)."""
    scalars = meta.get("scalars", {}) if isinstance(meta, dict) else None
    if not isinstance(scalars, dict) or not isinstance(meta.get("param_groups"), list):
        raise CheckpointError("the optimizer record is damaged (no 'param_groups' list or 'scalars' object)")
    state: dict[str, dict] = {}
    for key, value in list(tensors.items()) + list(scalars.items()):
        if "/" not in key:
            raise CheckpointError(f"the optimizer record is damaged: {key[:60]!r} names no PARAMETER/SLOT")
        pname, slot = key.rsplit("/", 1)
        state.setdefault(pname, {})[slot] = value
    return {"state": state, "param_groups": meta["param_groups"]}


# ---------------------------------------------------------------- run directory
MODEL_METADATA = {"format": "pt"}  # what Hugging Face's loader expects of a safetensors file


def read_run_config(run_dir: str) -> dict:
    """The run record of a run directory (``run.json``, or ``config.json`` of a format-1 run
    directory); a clear error for anything else."""
    if not os.path.isdir(run_dir):
        raise CheckpointError(f"{run_dir} is not a directory")
    path = os.path.join(run_dir, RUN)
    expected = (VERSION,)
    if not os.path.isfile(path):
        path, expected = os.path.join(run_dir, CONFIG), (LEGACY_VERSION,)
        if not os.path.isfile(path):
            raise CheckpointError(f"{run_dir} is not a deepmemory run directory (no {RUN})")
    config = read_json(path)
    name = os.path.basename(path)
    if config.get("format") != FORMAT:
        missing = f"no {RUN}, and its {CONFIG}" if name == CONFIG else name
        raise CheckpointError(f"{run_dir} was not written by `deepmemory train` ({missing} has no format {FORMAT!r})")
    if config.get("version") not in expected:
        raise CheckpointError(
            f"{run_dir} has run format version {config.get('version')}; this deepmemory reads "
            f"{LEGACY_VERSION} and {VERSION}"
        )
    check_run_record(config, path)
    return config


def check_run_record(record: dict, path: str) -> None:
    """``CheckpointError`` (one line naming ``path``) unless the run record ``record`` has only the
    keys of ``RUN_KEYS`` and the entries a run is rebuilt from: ``train``, ``model`` (with its
    ``config``) and ``tokenizer`` JSON objects (``resolved`` and ``data`` objects when present)."""
    unknown = sorted(str(k) for k in set(record) - set(RUN_KEYS))
    if unknown:
        raise CheckpointError(
            f"{path}: unknown key(s) {', '.join(unknown)} in the run record; its keys are {', '.join(RUN_KEYS)}"
        )
    for key in ("train", "model", "tokenizer", "resolved", "data"):
        if key in ("train", "model", "tokenizer") or key in record:
            if not isinstance(record.get(key), dict):
                shown = "missing" if key not in record else f"a {type(record[key]).__name__}, not a JSON object"
                raise CheckpointError(f"{path} is damaged: its {key!r} entry is {shown}")
    if not isinstance(record["model"].get("config"), dict):
        raise CheckpointError(f"{path} is damaged: its 'model' entry has no 'config' object")


def is_run_dir(path: str) -> bool:
    try:
        read_run_config(path)
    except CheckpointError:
        return False
    return True


def checkpoints(run_dir: str) -> list[tuple[int, str]]:
    """Complete checkpoints ``(step, path)``, oldest first."""
    root = os.path.join(run_dir, CHECKPOINTS)
    if not os.path.isdir(root):
        return []
    found = [(int(m.group(1)), os.path.join(root, name)) for name in os.listdir(root) if (m := STEP_DIR.match(name))]
    return sorted(found)


def remove_partial(run_dir: str) -> None:
    """Delete what an interrupted write left: ``.tmp-*`` checkpoint dirs and ``.*.tmp`` files."""
    for root in (run_dir, os.path.join(run_dir, CHECKPOINTS)):
        if os.path.isdir(root):
            for name in os.listdir(root):
                path = os.path.join(root, name)
                if name.startswith(TMP_PREFIX) and os.path.isdir(path):
                    shutil.rmtree(path)
                elif name.startswith(".") and name.endswith(".tmp") and os.path.isfile(path):
                    os.remove(path)


def save_checkpoint(
    run_dir: str,
    step: int,
    model: dict[str, Tensor],
    optimizer: dict,
    rng: dict[str, Tensor],
    state: dict,
    keep: int,
    model_files: Callable[[str], None] | None = None,
) -> str:
    """Write ``checkpoints/step-N`` atomically, refresh ``model.safetensors``, keep the newest ``keep``.
    ``model_files(directory)`` writes the rest of a Hugging Face folder (config, tokenizer) into the checkpoint."""
    root = os.path.join(run_dir, CHECKPOINTS)
    os.makedirs(root, exist_ok=True)
    final = os.path.join(root, f"step-{step:08d}")
    tmp = os.path.join(root, f"{TMP_PREFIX}step-{step:08d}")
    if os.path.exists(tmp):
        shutil.rmtree(tmp)
    os.makedirs(tmp)
    opt_tensors, opt_meta = flatten_optimizer(optimizer)
    write_tensors(os.path.join(tmp, MODEL), model, MODEL_METADATA)
    if model_files is not None:
        model_files(tmp)
    write_tensors(os.path.join(tmp, "optimizer.safetensors"), opt_tensors)
    write_tensors(os.path.join(tmp, "rng.safetensors"), rng)
    write_json(
        os.path.join(tmp, "state.json"),
        {"format": FORMAT, "version": VERSION, "step": step, "optimizer": opt_meta, **state},
    )
    fsync_path(tmp)
    if os.path.exists(final):  # a checkpoint of the same step from an earlier attempt
        shutil.rmtree(final)
    os.rename(tmp, final)
    fsync_path(root)
    write_tensors(os.path.join(run_dir, MODEL), model, MODEL_METADATA)
    for _, old in checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old)
    return final


def load_checkpoint(path: str) -> tuple[dict[str, Tensor], dict, dict[str, Tensor], dict]:
    """``(model tensors, optimizer state dict, rng tensors, state)`` of a checkpoint directory."""
    state = read_json(os.path.join(path, "state.json"))
    if state.get("format") != FORMAT or not isinstance(state.get("step"), int) or isinstance(state["step"], bool):
        raise CheckpointError(f"{path} is not a deepmemory checkpoint")
    if state["step"] < 0 or not isinstance(state.get("data"), dict) or not isinstance(state.get("optimizer"), dict):
        raise CheckpointError(f"{path}/state.json is damaged (a negative step, or no 'data' or 'optimizer' object)")
    for key in ("elapsed", "train_loss", "val_loss"):
        value = state.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise CheckpointError(f"{path}/state.json is damaged: {key} is {value!r}, not a number")
    model = read_tensors(os.path.join(path, MODEL))
    try:
        optimizer = unflatten_optimizer(
            read_tensors(os.path.join(path, "optimizer.safetensors")), state.pop("optimizer")
        )
    except CheckpointError as err:
        raise CheckpointError(f"{path}: {err}") from err
    rng = read_tensors(os.path.join(path, "rng.safetensors"))
    return model, optimizer, rng, state


def latest_checkpoint(run_dir: str) -> str | None:
    found = checkpoints(run_dir)
    return found[-1][1] if found else None
