"""Every bad input gets one clear line (docs/security.md): a table of malformed command lines,
files and run directories, each refused with its exit code, one line on stderr naming the problem,
no traceback, and every file that was there before left as it was; the Python API's bad input
raises a one-line ``ValueError``/``TypeError``. The command line runs in this process (cheap); two
smoke cases and the two-process DDP run start processes (slow)."""

import errno
import json
import os
import shutil
import subprocess
import sys
from collections import namedtuple

import pytest
import torch
import torch.nn.functional as F
from bad_input import one_error_line, run_cli, shared_world, tree, unchanged, write_tokenizer
from test_cli_fast import _parsers
from torch import nn

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return shared_world(tmp_path_factory)


# ------------------------------------------------------------------ the table
# argv: a list of words, formatted with {run} (a copy of the trained run in the case's folder),
# {tmp} (the case's folder), {corpus}, {tiny} (the tiny config), {tok} (the run's tokenizer);
# setup(tmp) writes the case's files before the hashes are taken; patch(monkeypatch) simulates
# what a test cannot cause (a read-only file system, running out of memory).
Case = namedtuple("Case", "id argv code match setup patch", defaults=(None, None))
TRAIN = [
    "train",
    "--model",
    "transformer",
    "--config",
    "{tiny}",
    "--data",
    "{corpus}",
    "--val-fraction",
    "0.25",
    "--seq-len",
    "16",
    "--batch-size",
    "4",
    "--eval-tokens",
    "64",
    "--steps",
    "1",
    "--out",
    "{tmp}/out",
]
GENERATE = ["generate", "--checkpoint", "{run}", "--prompt", "the memory", "--max-new-tokens", "2"]
RESUME = ["train", "--resume", "{run}", "--steps", "5"]


def files(**contents):
    """A setup writing ``name=content`` files (bytes or text) into the case's folder."""

    def setup(tmp):
        for name, content in contents.items():
            name = name.replace("__", ".")
            (tmp / name).write_bytes(content if isinstance(content, bytes) else content.encode())

    return setup


def edit_json(relative, change):
    """A setup applying ``change(obj)`` to the JSON file ``relative`` of the case's folder."""

    def setup(tmp):
        path = tmp / relative
        obj = json.loads(path.read_text())
        change(obj)
        path.write_text(json.dumps(obj))

    return setup


def raising(target, error):
    """A patch making ``target`` (``module.attr`` path) raise ``error``."""

    def patch(monkeypatch):
        def fail(*args, **kwargs):
            raise error

        monkeypatch.setattr(target, fail)

    return patch


def read_only(monkeypatch):
    """The run directory's file system is read-only: ``os.access(..., W_OK)`` answers no."""
    real = os.access

    def access(path, mode, *args, **kwargs):
        return (
            False
            if mode & os.W_OK and os.path.basename(os.path.normpath(str(path))) == "run"
            else real(path, mode, *args, **kwargs)
        )

    monkeypatch.setattr(os, "access", access)


def other_tokenizer(tmp):
    write_tokenizer(
        tmp / "run" / "tokenizer.json",
        words=[
            "another",
            "valid",
            "tokenizer",
            "with",
            "the",
            "same",
            "size",
            "of",
            "vocabulary",
            "for",
            "this",
            "test",
            "run",
            "x",
        ],
    )


def garbage_weights(tmp):
    (tmp / "run" / "checkpoints" / "step-00000002" / "model.safetensors").write_bytes(b"\x00garbage")


def foreign(tmp):
    (tmp / "foreign").mkdir()
    (tmp / "foreign" / "notes.txt").write_text("mine")


def data_position(cursor):
    return edit_json("run/checkpoints/step-00000002/state.json", lambda s: s["data"].update(cursor=cursor))


CUDA_OOM = getattr(torch, "OutOfMemoryError", RuntimeError)(
    "CUDA out of memory. Tried to allocate 20.00 GiB\nmore text"
)

CASES = [
    # tracebacks before: undecodable text, overflowing ints, a run record without its model, a
    # read-only file system, running out of memory
    Case(
        "jsonl-latin-1",
        TRAIN + ["--data", "{tmp}/bad.jsonl"],
        2,
        "is not UTF-8 text",
        files(bad__jsonl='{"text": "caf\xe9"}\n'.encode("latin-1")),
    ),
    Case(
        "jsonl-binary",
        TRAIN + ["--data", "{tmp}/bin.jsonl"],
        2,
        "is not UTF-8 text",
        files(bin__jsonl=b"\xff\xfe\x00\x01\x02binary"),
    ),
    Case(
        "jsonl-lone-surrogate",
        TRAIN + ["--data", "{tmp}/s.jsonl"],
        2,
        "lone surrogate",
        files(s__jsonl='{"text": "a\\ud800b"}\n'),
    ),
    Case("threads-huge", TRAIN + ["--threads", "1000000000000"], 2, "--threads must be <= 1024"),
    Case(
        "threads-huge-config",
        ["train", "--config", "{tmp}/c.yaml", "--data", "{corpus}"],
        2,
        "--threads must be <= 1024",
        files(c__yaml="threads: 99999999999999999999999\n"),
    ),
    Case(
        "seed-huge",
        TRAIN + ["--seed", "99999999999999999999999"],
        2,
        "argument --seed: expected an integer below 2**63",
    ),
    Case(
        "seed-huge-config",
        ["train", "--config", "{tmp}/c.json", "--data", "{corpus}"],
        2,
        "--seed must be <=",
        files(c__json='{"seed": 99999999999999999999999}'),
    ),
    Case(
        "generate-seed-huge",
        GENERATE + ["--seed", "99999999999999999999999"],
        2,
        "argument --seed: expected an integer below 2**63",
    ),
    Case("generate-threads-huge", GENERATE + ["--threads", "1000000000000"], 2, "--threads must be in [1, 1024]"),
    Case(
        "resume-run-without-model",
        RESUME,
        2,
        "'model' entry is missing",
        edit_json("run/run.json", lambda r: r.pop("model")),
    ),
    Case(
        "generate-run-without-model",
        GENERATE,
        2,
        "'model' entry is missing",
        edit_json("run/run.json", lambda r: r.pop("model")),
    ),
    Case("resume-read-only", RESUME, 2, "is not writable", patch=read_only),
    Case(
        "train-read-only-write",
        TRAIN,
        2,
        "Read-only file system",
        patch=raising(
            "deepmemory.train.checkpoint.write_text", OSError(errno.EROFS, os.strerror(errno.EROFS), "/mnt/ro/run.json")
        ),
    ),
    Case(
        "export-read-only-write",
        ["export", "{run}", "{tmp}/out"],
        2,
        "Read-only file system",
        patch=raising(
            "deepmemory.train.checkpoint.write_text", OSError(errno.EROFS, os.strerror(errno.EROFS), "/mnt/ro/x")
        ),
    ),
    Case(
        "train-out-of-memory-cuda",
        TRAIN,
        4,
        "out of memory (OutOfMemoryError: CUDA out of memory",
        patch=raising("deepmemory.train.trainer.Trainer.fit", CUDA_OOM),
    ),
    Case(
        "train-out-of-memory-host",
        TRAIN,
        4,
        "out of memory (MemoryError",
        patch=raising("deepmemory.train.trainer.Trainer.fit", MemoryError()),
    ),
    Case(
        "generate-out-of-memory-cpu-allocator",
        GENERATE,
        4,
        "DefaultCPUAllocator: can't allocate memory",
        patch=raising(
            "deepmemory.cli.generate.load_run",
            RuntimeError(
                "[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: you tried "
                "to allocate 1 bytes."
            ),
        ),
    ),
    Case("lr-nan", TRAIN + ["--lr", "nan"], 2, "argument --lr: expected a finite number"),
    Case(
        "lr-nan-config",
        ["train", "--config", "{tmp}/c.yaml", "--data", "{corpus}"],
        2,
        "--lr must be a finite number",
        files(c__yaml="lr: .nan\n"),
    ),
    # NaN slipping past range checks
    Case("grad-clip-nan", TRAIN + ["--grad-clip", "nan"], 2, "argument --grad-clip: expected a finite number"),
    Case(
        "grad-clip-nan-config",
        ["train", "--config", "{tmp}/c.json", "--data", "{corpus}"],
        2,
        "--grad-clip must be a finite number",
        files(c__json='{"grad_clip": NaN}'),
    ),
    Case("temperature-nan", GENERATE + ["--temperature", "nan"], 2, "argument --temperature: expected a finite number"),
    Case("top-p-nan", GENERATE + ["--top-p", "nan"], 2, "argument --top-p: expected a finite number"),
    # unbounded requests
    Case(
        "batch-size-huge",
        TRAIN + ["--batch-size", "1000000000000"],
        2,
        "--batch-size 1000000000000 x --seq-len 16 cannot fit",
    ),
    Case(
        "seq-len-huge",
        TRAIN + ["--batch-size", "1", "--seq-len", "100000000000"],
        2,
        "cannot fit: the run needs at least",
    ),
    Case(
        "model-overrides-huge",
        ["train", "--config", "{tmp}/c.yaml", "--data", "{corpus}"],
        2,
        "more than this machine's",
        files(c__yaml="model_overrides: {num_hidden_layers: 1000000000000}\n"),
    ),
    Case(
        "stored-model-config-huge",
        GENERATE,
        2,
        "more than this machine's",
        edit_json("run/run.json", lambda r: r["model"]["config"].update(num_hidden_layers=10**12)),
    ),
    # silently accepted before
    Case(
        "fsdp-without-torchrun", TRAIN + ["--fsdp"], 2, "--fsdp shards the model over the processes of a torchrun job"
    ),
    Case("out-empty", TRAIN + ["--out", ""], 2, "--out must be a directory path"),
    Case(
        "data-empty-list",
        ["train", "--config", "{tmp}/c.yaml"],
        2,
        "--data must name at least one path",
        files(c__yaml="data: []\n"),
    ),
    Case(
        "run-json-unknown-key",
        RESUME,
        2,
        "unknown key(s) extra in the run record",
        edit_json("run/run.json", lambda r: r.update(extra=1)),
    ),
    Case(
        "run-json-unknown-model-field",
        RESUME,
        2,
        "unknown field(s) foo",
        edit_json("run/run.json", lambda r: r["model"]["config"].update(foo=1)),
    ),
    Case(
        "generate-unknown-model-field",
        GENERATE,
        2,
        "unknown field(s) foo",
        edit_json("run/run.json", lambda r: r["model"]["config"].update(foo=1)),
    ),
    Case("tokenizer-replaced-generate", GENERATE, 2, "is not the tokenizer the run was trained with", other_tokenizer),
    Case("tokenizer-replaced-resume", RESUME, 2, "is not the tokenizer the run was trained with", other_tokenizer),
    Case(
        "tokenizer-record-escapes",
        GENERATE,
        2,
        "expected a file name in the run directory",
        edit_json("run/run.json", lambda r: r["tokenizer"].update(file="../tokenizer.json")),
    ),
    # raw messages before
    Case(
        "out-below-a-file", TRAIN + ["--out", "{tmp}/f.txt/sub"], 2, "f.txt is a file, not a folder", files(f__txt="x")
    ),
    Case(
        "export-below-a-file",
        ["export", "{run}", "{tmp}/f.txt/sub"],
        2,
        "f.txt is a file, not a folder",
        files(f__txt="x"),
    ),
    Case(
        "override-not-a-number",
        ["train", "--config", "{tmp}/c.yaml", "--data", "{corpus}"],
        2,
        "hidden_size must be an int; got str 'abc'",
        files(c__yaml="model_overrides: {hidden_size: abc}\n"),
    ),
    Case(
        "override-hugging-face-field",
        ["train", "--config", "{tmp}/c.yaml", "--data", "{corpus}"],
        2,
        "unknown config field(s) ['chunk_size_feed_forward']",
        files(c__yaml="model_overrides: {chunk_size_feed_forward: 2}\n"),
    ),
    Case("val-fraction-one", TRAIN + ["--val-fraction", "1"], 2, "--val-fraction must be in (0, 1); got 1.0"),
    Case(
        "val-fraction-zero-config",
        ["train", "--config", "{tmp}/c.yaml", "--data", "{corpus}"],
        2,
        "--val-fraction must be in (0, 1); got 0",
        files(c__yaml="val_fraction: 0\n"),
    ),
    # deepmemory bench: every count >= 1, the device and the plot checked before measuring
    *(
        Case(f"bench-{mode}-{flag}-0", ["bench", mode, f"--{flag}", "0"], 2, f"argument --{flag}: must be >= 1; got 0")
        for mode, flag in (
            ("op", "seq"),
            ("op", "chunk"),
            ("op", "batch"),
            ("op", "repeat"),
            ("op", "threads"),
            ("op", "heads"),
            ("op", "head-dim"),
            ("mixer", "batch"),
            ("mixer", "rounds"),
            ("model", "batch"),
            ("model", "repeat"),
            ("decode", "steps"),
            ("decode", "context"),
            ("kernel", "seq"),
        )
    ),
    Case("bench-op-threads-huge", ["bench", "op", "--threads", "100000"], 2, "argument --threads: must be <= 1024"),
    Case(
        "bench-mixer-device",
        ["bench", "mixer", "--device", "foo"],
        2,
        "--device must be cpu, cuda or cuda:N; got 'foo'",
    ),
    Case(
        "bench-mixer-plot-folder",
        ["bench", "mixer", "--plot", "/nonexistent/x.png"],
        2,
        "the folder /nonexistent does not exist",
    ),
    Case(
        "bench-decode-plot-format",
        ["bench", "decode", "--plot", "{tmp}/x.txt"],
        2,
        "the extension must name an image format",
    ),
    # damaged run directories (the property tests draw many more)
    Case("resume-data-position-damaged", RESUME, 2, "is damaged", data_position(10**9)),
    Case(
        "resume-state-without-data",
        RESUME,
        2,
        "state.json is damaged",
        edit_json("run/checkpoints/step-00000002/state.json", lambda s: s.pop("data")),
    ),
    Case(
        "resume-optimizer-record-damaged",
        RESUME,
        2,
        "the optimizer record is damaged",
        edit_json("run/checkpoints/step-00000002/state.json", lambda s: s["optimizer"].pop("param_groups")),
    ),
    Case("generate-run-json-garbled", GENERATE, 2, "cannot read", files(**{"run/run.json": b'{"format": \xff\xfe'})),
    # already handled before; kept so
    Case("data-missing", TRAIN + ["--data", "{tmp}/missing"], 2, "--data: {tmp}/missing does not exist"),
    Case(
        "data-empty-folder", TRAIN + ["--data", "{tmp}/empty"], 2, "holds no text", lambda tmp: (tmp / "empty").mkdir()
    ),
    Case("unknown-preset", TRAIN + ["--model", "no-such-preset"], 2, "unknown preset 'no-such-preset'"),
    Case("batch-not-divisible", TRAIN + ["--batch-size", "3", "--grad-accum", "2"], 2, "not divisible"),
    Case(
        "config-unknown-setting",
        ["train", "--config", "{tmp}/c.yaml"],
        2,
        "unknown settings learning_rate",
        files(c__yaml="learning_rate: 1\n"),
    ),
    Case(
        "config-misspelt-setting",
        ["train", "--config", "{tmp}/c.yaml"],
        2,
        "unknown settings stepz in {tmp}/c.yaml (did you mean 'steps'?)",
        files(c__yaml="stepz: 3\n"),
    ),
    Case("config-unparsable", ["train", "--config", "{tmp}/c.yaml"], 2, "cannot parse", files(c__yaml="a: [1, 2\n")),
    Case(
        "config-not-a-mapping", ["train", "--config", "{tmp}/c.json"], 2, "must hold a mapping", files(c__json="[1, 2]")
    ),
    Case(
        "config-extension",
        ["train", "--config", "{tmp}/c.toml"],
        2,
        "must be a .yaml, .yml or .json file",
        files(c__toml="a = 1"),
    ),
    Case(
        "config-python-object",
        ["train", "--config", "{tmp}/c.yaml"],
        2,
        "cannot parse",
        files(c__yaml="lr: !!python/object/apply:os.system ['echo unsafe']\n"),
    ),
    Case("lr-negative", TRAIN + ["--lr", "-1"], 2, "--lr must be in (0, inf); got -1.0"),
    Case("time-limit", TRAIN + ["--time-limit", "soon"], 2, "argument --time-limit: expected seconds or a duration"),
    Case("report-to", TRAIN + ["--report-to", "carrier-pigeon"], 2, "argument --report-to: invalid choice"),
    Case(
        "tokenizer-missing",
        TRAIN + ["--tokenizer", "{tmp}/none.json"],
        2,
        "--tokenizer: {tmp}/none.json does not exist",
    ),
    Case("resume-foreign", ["train", "--resume", "{tmp}/foreign"], 2, "is not a deepmemory run directory", foreign),
    Case("resume-and-overwrite", RESUME + ["--overwrite"], 2, "--resume and --overwrite exclude each other"),
    Case("resume-at-step-already", ["train", "--resume", "{run}", "--steps", "2"], 2, "the run is at step 2 already"),
    Case("resume-other-seq-len", RESUME + ["--seq-len", "32"], 2, "--seq-len 32 differs from the run's 16"),
    Case("out-exists", TRAIN + ["--out", "{run}"], 2, "already exists; pass --overwrite"),
    Case("overwrite-foreign", TRAIN + ["--out", "{tmp}/foreign", "--overwrite"], 2, "refuses to replace", foreign),
    Case("resume-garbage-weights", RESUME, 2, "cannot read", garbage_weights),
    Case(
        "generate-garbage-weights",
        ["generate", "--checkpoint", "{run}/checkpoints/step-00000002", "--prompt", "x"],
        2,
        "cannot read",
        garbage_weights,
    ),
    Case("generate-top-p", GENERATE + ["--top-p", "0"], 2, "--top-p must be in (0, 1]"),
    Case("generate-no-prompt", ["generate", "--checkpoint", "{run}"], 2, "give a prompt"),
    Case(
        "generate-prompt-file-missing",
        GENERATE + ["--prompt-file", "{tmp}/none.txt"],
        2,
        "--prompt-file {tmp}/none.txt",
    ),
    Case(
        "generate-prompt-file-binary",
        GENERATE + ["--prompt-file", "{tmp}/p.txt"],
        2,
        "--prompt-file",
        files(p__txt=b"\xff\xfe\x00"),
    ),
    Case(
        "generate-foreign",
        ["generate", "--checkpoint", "{tmp}/foreign", "--prompt", "x"],
        2,
        "not a deepmemory run directory",
        foreign,
    ),
    Case("export-out-exists", ["export", "{run}", "{tmp}/foreign"], 2, "already exists; pass --overwrite", foreign),
    Case("export-foreign", ["export", "{tmp}/foreign", "{tmp}/out"], 2, "not a deepmemory run directory", foreign),
    Case("models-unknown", ["models", "no-such-preset"], 2, "unknown preset(s) no-such-preset"),
    Case("unknown-command", ["bogus"], 2, "invalid choice: 'bogus'"),
]


def _fill(words, ctx):
    return [w.format(**ctx) for w in words]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_gets_one_line(case, world, tmp_path, monkeypatch):
    """Exit code, one line naming the problem (no traceback), every pre-existing file unchanged."""
    monkeypatch.chdir(tmp_path)
    ctx = dict(world, tmp=str(tmp_path), run=str(tmp_path / "run"))
    if any("{run}" in w for w in case.argv) or case.setup is not None:
        shutil.copytree(world["run"], tmp_path / "run")
    if case.setup is not None:
        case.setup(tmp_path)
    if case.patch is not None:
        case.patch(monkeypatch)
    before = tree(str(tmp_path), world["root"])
    code, _, err = run_cli(_fill(case.argv, ctx))
    line = one_error_line(
        err, case.argv[0] if case.argv[0] in ("train", "generate", "export", "models", "bench") else ""
    )
    assert code == case.code, line
    assert case.match.format(**ctx) in line, line
    assert not unchanged(before, tree(str(tmp_path), world["root"]))


def test_debug_prints_the_traceback_then_the_line(world, tmp_path):
    code, _, err = run_cli(_fill(TRAIN + ["--data", "{tmp}/missing", "--debug"], dict(world, tmp=str(tmp_path))))
    assert code == 2 and err.startswith("Traceback") and "DataError" in err
    assert err.strip().splitlines()[-1].startswith("deepmemory train: error: --data:")


def test_every_subcommand_has_debug():
    from deepmemory.cli import build_parser

    leaves = [
        (path, p)
        for path, p in _parsers(build_parser())
        if path and not any(a.__class__.__name__ == "_SubParsersAction" for a in p._actions)
    ]
    missing = [" ".join(path) for path, p in leaves if not any("--debug" in a.option_strings for a in p._actions)]
    assert len(leaves) >= 9 and not missing, missing


def test_exit_codes_agree():
    from deepmemory import cli
    from deepmemory.train import command

    assert (
        (cli.EXIT_USER_ERROR, cli.EXIT_OUT_OF_MEMORY) == (command.EXIT_USER_ERROR, command.EXIT_OUT_OF_MEMORY) == (2, 4)
    )
    assert command.EXIT_DIVERGED == 3


def test_footprint_is_a_lower_bound_of_what_a_step_keeps():
    """The estimate that refuses a batch stays below what a training step of the smallest-footprint
    preset (the Transformer) saves for its backward: it never refuses a run that fits."""
    from deepmemory.bench.measure import saved_for_backward_mib
    from deepmemory.models import build
    from deepmemory.train.footprint import training_footprint

    torch.manual_seed(0)
    model = build("transformer", vocab_size=257)
    batch, seq = 2, 64
    ids = torch.randint(0, 257, (batch, seq + 1))

    def step():
        logits = model(input_ids=ids[:, :-1], use_cache=False).logits
        return F.cross_entropy(logits.float().flatten(0, 1), ids[:, 1:].flatten())

    saved = saved_for_backward_mib(step) * 2**20
    c = model.config
    need = training_footprint(
        sum(p.numel() for p in model.parameters()), c.hidden_size, c.num_hidden_layers, c.vocab_size, batch, seq, batch
    )
    assert 0 < need.activations < saved


# ------------------------------------------------------------------ the Python API
def _tiny_model(preset="titans-mac"):
    from deepmemory.models import build

    torch.manual_seed(0)
    return build(preset, vocab_size=50).eval()


def _cache_of(model, batch):
    out = model(input_ids=torch.randint(0, 50, (batch, 5)), use_cache=True)
    return out[1] if isinstance(out, tuple) else getattr(out, "cache", None) or out.past_key_values


def _moved(cache, device):
    for layer in cache.layers:
        layer._map(lambda t: t.to(device))
    return cache


def _layer_state(kind, batch, device="cpu"):
    from deepmemory.layers import Attention, KernelMemory, NeuralMemory

    torch.manual_seed(0)
    layer = {
        "memory": lambda: NeuralMemory(32, 2, 16, chunk_size=4),
        "attention": lambda: Attention(32, 2, 16),
        "kernel": lambda: KernelMemory(32, 2, 16),
    }[kind]()
    _, state = layer(torch.randn(batch, 5, 32), return_state=True)
    return layer, state.map(lambda t: t.to(device))


API_CASES = [
    (
        "attention-mask-wrong-batch",
        lambda m: m(input_ids=torch.randint(0, 50, (2, 7)), attention_mask=torch.ones(3, 7)),
        ValueError,
        "attention_mask must be [2, 7]",
    ),
    (
        "attention-mask-wrong-length",
        lambda m: m(input_ids=torch.randint(0, 50, (2, 7)), attention_mask=torch.ones(2, 4)),
        ValueError,
        "attention_mask must be [2, 7]",
    ),
    (
        "attention-mask-1d",
        lambda m: m(input_ids=torch.randint(0, 50, (2, 7)), attention_mask=torch.ones(7)),
        ValueError,
        "attention_mask must be",
    ),
    (
        "attention-mask-list",
        lambda m: m(input_ids=torch.randint(0, 50, (2, 7)), attention_mask=[[1] * 7] * 2),
        TypeError,
        "attention_mask must be a torch.Tensor",
    ),
    (
        "attention-mask-not-binary",
        lambda m: m(input_ids=torch.randint(0, 50, (1, 3)), attention_mask=torch.tensor([[0, 3, 1]])),
        ValueError,
        "attention_mask must hold 0 (padding) and 1",
    ),
    (
        "attention-mask-fraction",
        lambda m: m(input_ids=torch.randint(0, 50, (1, 3)), attention_mask=torch.tensor([[0.0, 0.5, 1.0]])),
        ValueError,
        "attention_mask must hold 0 (padding) and 1",
    ),
    (
        "seq-idx-wrong-shape",
        lambda m: m(input_ids=torch.randint(0, 50, (1, 3)), seq_idx=torch.zeros(1, 4, dtype=torch.int32)),
        ValueError,
        "seq_idx must be [1, 3]",
    ),
    (
        "position-ids-float",
        lambda m: m(input_ids=torch.randint(0, 50, (1, 3)), position_ids=torch.zeros(1, 3)),
        TypeError,
        "position_ids must hold integers",
    ),
    (
        "position-ids-wrong-shape",
        lambda m: m(input_ids=torch.randint(0, 50, (1, 3)), position_ids=torch.zeros(1, 4, dtype=torch.long)),
        ValueError,
        "position_ids must be [1, 3]",
    ),
    (
        "document-inside-a-cached-stream",
        lambda m: m(
            input_ids=torch.randint(0, 50, (1, 3)), cache=_cache_of(m, 1), position_ids=torch.tensor([[5, 0, 1]])
        ),
        ValueError,
        "a document cannot begin inside a cached stream",
    ),
    (
        "cache-other-batch",
        lambda m: m(input_ids=torch.randint(0, 50, (3, 1)), cache=_cache_of(m, 2)),
        ValueError,
        "the cache holds 2 sequence(s) but the input has a batch of 3",
    ),
    (
        "cache-other-device",
        lambda m: m(input_ids=torch.randint(0, 50, (2, 1)), cache=_moved(_cache_of(m, 2), "meta")),
        ValueError,
        "the cache is on meta but the input is on cpu",
    ),
    *(
        (
            f"{kind}-state-other-batch",
            lambda m, k=kind: (lambda ls: ls[0](torch.randn(3, 2, 32), state=ls[1]))(_layer_state(k, 2)),
            ValueError,
            "the state holds 2 sequence(s) but the input has a batch of 3",
        )
        for kind in ("memory", "attention", "kernel")
    ),
    *(
        (
            f"{kind}-state-other-device",
            lambda m, k=kind: (lambda ls: ls[0](torch.randn(2, 2, 32), state=ls[1]))(_layer_state(k, 2, "meta")),
            ValueError,
            "the state is on meta but the input is on cpu",
        )
        for kind in ("memory", "attention", "kernel")
    ),
    (
        "build-override-not-a-number",
        lambda m: __import__("deepmemory.models", fromlist=["build"]).build("atlas", hidden_size="abc"),
        TypeError,
        "hidden_size must be an int; got str 'abc'",
    ),
]


@pytest.mark.parametrize("name, call, error, match", API_CASES, ids=[c[0] for c in API_CASES])
def test_api_bad_input_is_one_line(name, call, error, match):
    model = _tiny_model()
    with pytest.raises(error) as info:
        call(model)
    message = str(info.value)
    assert "\n" not in message and match in message, message


def test_unknown_override_lists_only_our_fields():
    from deepmemory.models import DeepMemoryConfig, build

    with pytest.raises(ValueError) as info:
        build("atlas", chunk_size_feed_forward=2)
    listed = str(info.value).split("valid fields: ")[1].split(", ")
    assert listed == list(DeepMemoryConfig.own_fields()) and "hidden_size" in listed
    assert not {"chunk_size_feed_forward", "id2label", "problem_type", "dtype"} & set(listed)


def test_a_cache_continues_under_generate_with_its_mask():
    """``generate`` passes a mask over the cache's tokens and the new ones: accepted."""
    model = _tiny_model()
    ids = torch.randint(0, 50, (2, 6))
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert out.shape == (2, 9)


@pytest.mark.parametrize(
    "architecture, chunk_size, length", [("mlp", 4, 7), ("mlp", 1, 1), ("linear", 3, 7), ("gated_mlp", 4, 9)]
)
@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
def test_reference_with_parameters_without_grad(architecture, chunk_size, length, mode):
    """``impl="reference"`` with ``nn.Parameter`` initial weights under ``torch.no_grad()`` (or
    inference mode) gives the outputs and final state of a call with gradients, detached."""
    from deepmemory.ops import neural_memory

    torch.manual_seed(0)
    b, h, d, hidden = 2, 2, 4, 8
    dt = torch.float64
    q, k = (F.normalize(torch.randn(b, length, h, d, dtype=dt), dim=-1) for _ in range(2))
    v = torch.randn(b, length, h, d, dtype=dt)
    lr, mom, dec = (torch.rand(b, length, h, dtype=dt) * s for s in (0.1, 0.9, 0.1))
    shapes = {
        "linear": {"w0": (d, d)},
        "mlp": {"w0": (hidden, d), "w1": (d, hidden)},
        "gated_mlp": {"w_gate": (hidden, d), "w_up": (hidden, d), "w_out": (d, hidden)},
    }[architecture]
    weights = {n: nn.Parameter(torch.randn(h, *s, dtype=dt) / s[1] ** 0.5) for n, s in shapes.items()}
    kwargs = dict(architecture=architecture, chunk_size=chunk_size, impl="reference", output_final_state=True)
    expected, expected_state = neural_memory(q, k, v, lr, mom, dec, weights, **kwargs)
    with getattr(torch, mode)():
        got, state = neural_memory(q, k, v, lr, mom, dec, weights, **kwargs)
    assert not got.requires_grad
    torch.testing.assert_close(got, expected.detach(), rtol=0, atol=0)
    for name, w in state.weights.items():
        torch.testing.assert_close(w, expected_state.weights[name].detach(), rtol=0, atol=0)


def test_unused_parameters_of_a_sequence_shorter_than_a_chunk():
    """A memory updated once per chunk gets no gradient into its key/value/step projections from
    a sequence that ends with its first chunk: what DDP is told of (and the probe leaves the RNG
    and the gradients as they were)."""
    from deepmemory.models import build
    from deepmemory.train.distributed import unused_parameters

    torch.manual_seed(0)
    model = build("atlas", vocab_size=50, memory={"granularity": "chunk"}, num_persistent=0)
    chunk = model.config.memory.get("chunk_size", 16)
    rng = torch.get_rng_state()
    short = unused_parameters(model, chunk, torch.device("cpu"))
    assert short and all(".mixer." in n for n in short) and any("k_proj" in n for n in short)
    assert torch.equal(torch.get_rng_state(), rng) and all(p.grad is None for p in model.parameters())
    assert unused_parameters(model, 2 * chunk + 1, torch.device("cpu")) == []


# ------------------------------------------------------------------ processes
@pytest.mark.slow
@pytest.mark.parametrize(
    "argv, code, match",
    [
        (
            ["-m", "deepmemory", "train", "--seed", "99999999999999999999999"],
            2,
            "argument --seed: expected an integer below 2**63",
        ),
        (["-m", "deepmemory", "bench", "op", "--heads", "0"], 2, "argument --heads: must be >= 1; got 0"),
        (["-m", "deepmemory.train", "--fsdp", "--data", "/nonexistent"], 2, "--fsdp shards the model"),
    ],
)
def test_smoke_in_a_process(argv, code, match, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.path.join(REPO, "src"))
    proc = subprocess.run([sys.executable, *argv], capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert proc.returncode == code, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and match in lines[0] and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert not os.listdir(tmp_path)


@pytest.mark.long  # two processes of torchrun: a minute on the 2-core CI machine
def test_ddp_with_parameters_unused_in_a_step(world, tmp_path):
    """``torchrun --nproc-per-node 2 -m deepmemory.train`` of a per-chunk memory on sequences no
    longer than a chunk (its key/value/step projections get no gradient): the run completes."""
    cfg = tmp_path / "chunk.json"
    cfg.write_text(
        json.dumps(
            {
                "model_overrides": {
                    "hidden_size": 32,
                    "num_hidden_layers": 1,
                    "num_attention_heads": 2,
                    "intermediate_size": 64,
                    "num_persistent": 0,
                    "memory": {"granularity": "chunk"},
                }
            }
        )
    )
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.path.join(REPO, "src"))
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        "-m",
        "deepmemory.train",
        "--model",
        "atlas",
        "--config",
        str(cfg),
        "--data",
        world["corpus"],
        "--val-fraction",
        "0.25",
        "--seq-len",
        "16",
        "--batch-size",
        "4",
        "--steps",
        "2",
        "--eval-every",
        "2",
        "--eval-tokens",
        "64",
        "--out",
        str(tmp_path / "run"),
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "get no gradient at --seq-len 16" in proc.stdout + proc.stderr
