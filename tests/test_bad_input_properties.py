"""Property-based tests (hypothesis) of the promises of docs/security.md: malformed command lines,
config files (YAML/JSON with wrong types, NaN/inf, huge numbers, unknown keys) and damaged run
directories (truncated, garbled, missing files) never raise a traceback, are refused with exit
code 2 and one line, and never change a file that was there before.

Cheap by construction: training stops where validation ends (``Trainer.fit`` is replaced by a
stub for the command-line and config properties: everything up to the first step runs, the
model, the data and the memory estimate included), a resumed run asks for a step it has passed
(refused right after its checkpoint is read), and generation makes 2 tokens. The fast tier draws
``FAST`` examples per property; ``pytest --runlong`` runs ``LONG`` (derandomized, so a failure
repeats; ``--hypothesis-show-statistics`` prints the counts).
"""

import collections
import functools
import json
import os
import shutil
import tempfile
from unittest import mock

import pytest
import torch
from bad_input import one_error_line, run_cli, shared_world, tree, unchanged
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from deepmemory.train import trainer as trainer_module
from deepmemory.train.config import FIELDS

FAST, LONG = 25, 400
# ids of the properties' tiers, and the number of examples each draws (reported by the tests below)
TIERS = [pytest.param(FAST, id="fast"), pytest.param(LONG, id="long", marks=pytest.mark.long)]


def _settings(n):
    return settings(
        max_examples=n,
        deadline=None,
        derandomize=True,
        database=None,
        print_blob=True,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
    )


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return shared_world(tmp_path_factory)


def _stub_fit(self):
    return {"stub": True}


def _refused_or_done(code, err, command):
    """Exit code 0, or 2 with one line; never anything else (a traceback would have propagated).
    Returns the outcome: ``"done"`` or the start of the refusal's reason."""
    assert code in (0, 2), (code, err[-2000:])
    if code == 2:
        return "refused: " + one_error_line(err, command).split(": error: ", 1)[1][:24]
    return "done"


def _report(what, outcomes, examples):
    """Print how the examples ended (``pytest -s`` shows it) and check that they were drawn."""
    assert len(outcomes) >= min(examples, 20)
    top = ", ".join(f"{n} {o}" for o, n in collections.Counter(outcomes).most_common(6))
    print(f"\n{what} tried: {len(outcomes)} ({len(set(outcomes))} distinct outcomes; most common: {top})")


def _run_guarded(argv):
    """``run_cli(argv)`` keeping this process's intra-op thread count (``--threads`` sets it)."""
    threads = torch.get_num_threads()
    try:
        return run_cli(argv)
    finally:
        torch.set_num_threads(threads)


# ------------------------------------------------------------------ values
# numbers as the command line spells them: valid, zero, negative, huge, non-finite, not numbers
NUMBER_TEXT = st.one_of(
    st.integers(-3, 70).map(str),
    st.sampled_from(
        [
            "0",
            "-1",
            "1e3",
            "1.5",
            "nan",
            "NaN",
            "inf",
            "-inf",
            "1e400",
            "99999999999999999999999",
            "9223372036854775807",
            "9223372036854775808",
            "-9223372036854775809",
            "",
            " ",
            "abc",
            "0x10",
            "1_000",
            "\u00bd",
            "\x00",
            "--",
            "-",
        ]
    ),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
)
INT_FLAGS = (
    "--seq-len",
    "--batch-size",
    "--grad-accum",
    "--steps",
    "--warmup-steps",
    "--lr-decay-steps",
    "--threads",
    "--seed",
    "--eval-every",
    "--save-every",
    "--log-every",
    "--eval-tokens",
    "--keep-checkpoints",
)
FLOAT_FLAGS = ("--lr", "--weight-decay", "--grad-clip", "--val-fraction")


@st.composite
def train_command(draw, world):
    """``deepmemory train`` with a random subset of options, each with a random value."""
    root = world["root"]
    words = []
    for flag in draw(st.lists(st.sampled_from(INT_FLAGS + FLOAT_FLAGS), max_size=6, unique=True)):
        words += [flag, draw(NUMBER_TEXT)]
    choices = {
        "--model": ["transformer", "atlas", "titans-mac", "no-such", "", "TRANSFORMER"],
        "--size": ["tiny", "huge", "1.3B", ""],
        "--device": ["cpu", "auto", "cuda", "tpu", ""],
        "--precision": ["fp32", "bf16", "fp16"],
        "--tokenizer": [
            "bytes",
            world["tok"],
            os.path.join(root, "missing.json"),
            world["corpus"],
            os.path.join(root, "binary.bin"),
            "",
        ],
        "--time-limit": ["1h", "0", "-5", "nan", "soon", "1e400s", "90"],
        "--report-to": ["none", "jsonl", "bogus"],
    }
    for flag in draw(st.lists(st.sampled_from(sorted(choices)), max_size=3, unique=True)):
        words += [flag, draw(st.sampled_from(choices[flag]))]
    data = [
        world["corpus"],
        os.path.join(root, "bad.jsonl"),
        os.path.join(root, "empty"),
        os.path.join(root, "missing"),
        os.path.join(root, "binary.bin"),
        "",
    ]
    words += ["--data", *draw(st.lists(st.sampled_from(data), min_size=1, max_size=2))]
    for flag in draw(
        st.lists(
            st.sampled_from(["--fsdp", "--compile", "--grad-checkpointing", "--overwrite"]), max_size=2, unique=True
        )
    ):
        words.append(flag)
    words += [
        "--out",
        draw(
            st.sampled_from(
                [os.path.join(root, "new-run"), world["run"], os.path.join(world["corpus"], "doc00.txt", "x"), ""]
            )
        ),
    ]
    return ["train", *words]


@pytest.mark.parametrize("examples", TIERS)
def test_malformed_command_lines(world, examples):
    tried = []

    @_settings(examples)
    @given(argv=train_command(world))
    def prop(argv):
        before = tree(world["root"])
        code, _, err = _run_guarded(argv)
        tried.append(_refused_or_done(code, err, "train"))
        assert not unchanged(before, tree(world["root"])), argv

    with mock.patch.object(trainer_module.Trainer, "fit", _stub_fit):
        prop()
    _report("malformed command lines", tried, examples)


# ------------------------------------------------------------------ config files
SMALL_OR_HUGE = st.one_of(st.integers(-2, 70), st.sampled_from([10**9, 10**12, 2**63 - 1, 2**63, 10**30, -(10**30)]))
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    SMALL_OR_HUGE,
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12).filter(lambda s: "hf:" not in s),
)
VALUES = st.recursive(
    SCALARS,
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=6), inner, max_size=3)),
    max_leaves=6,
)
OVERRIDE_KEYS = [
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "head_dim",
    "intermediate_size",
    "layer_pattern",
    "memory",
    "kernel",
    "attention_window",
    "segment_size",
    "num_persistent",
    "rope_theta",
    "rms_norm_eps",
    "chunk_size_feed_forward",
    "id2label",
    "bogus",
]


@st.composite
def config_file(draw, world):
    """``(file name, bytes)`` of a config: a mapping of known and unknown keys to values of any
    type, written as YAML or JSON, or not a mapping, or not text at all."""
    keys = draw(
        st.lists(
            st.one_of(
                st.sampled_from(sorted(FIELDS)),
                st.sampled_from(["learning_rate", "Model", "data-", "seq-len"]),
                st.text(max_size=8),
            ),
            max_size=6,
            unique=True,
        )
    )
    settings = {}
    for key in keys:
        if key == "model_overrides":
            settings[key] = draw(
                st.dictionaries(st.sampled_from(OVERRIDE_KEYS), st.one_of(SMALL_OR_HUGE, VALUES), max_size=3)
            )
        elif key == "model":
            settings[key] = draw(st.one_of(st.sampled_from(["transformer", "atlas", "nope"]), VALUES))
        elif key == "size":
            settings[key] = draw(st.one_of(st.sampled_from(["tiny", "huge"]), VALUES))
        elif key == "data":
            settings[key] = draw(st.one_of(st.just([world["corpus"]]), st.just([]), st.just(world["corpus"]), VALUES))
        elif key == "tokenizer":
            settings[key] = draw(st.one_of(st.just("bytes"), st.just(world["tok"]), VALUES))
        else:
            settings[key] = draw(VALUES)
    if "data" not in settings:
        settings["data"] = [world["corpus"]]  # (the default, the standard library, takes seconds to read)
    kind = draw(st.sampled_from(["yaml", "json", "json", "not-a-mapping", "bytes"]))
    if kind == "yaml":
        import yaml

        return "c.yaml", yaml.safe_dump(settings, allow_unicode=True).encode()
    if kind == "json":
        return "c.json", json.dumps(settings).encode()
    if kind == "not-a-mapping":
        return draw(st.sampled_from(["c.yaml", "c.json"])), json.dumps(list(settings.values())).encode()
    return draw(st.sampled_from(["c.yaml", "c.json", "c.yml"])), draw(st.binary(max_size=64))


@pytest.mark.parametrize("examples", TIERS)
def test_malformed_config_files(world, examples):
    tried = []

    @_settings(examples)
    @given(case=config_file(world))
    def prop(case):
        name, content = case
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, name)
            with open(path, "wb") as f:
                f.write(content)
            before = tree(tmp, world["root"])
            code, _, err = _run_guarded(["train", "--config", path])
            tried.append(_refused_or_done(code, err, "train"))
            assert not unchanged(before, tree(tmp, world["root"])), content[:300]

    with mock.patch.object(trainer_module.Trainer, "fit", _stub_fit):
        prop()
    _report("malformed config files", tried, examples)


# ------------------------------------------------------------------ damaged run directories
def _run_files(run):
    return sorted(os.path.relpath(os.path.join(d, f), run) for d, _, fs in os.walk(run) for f in fs)


JSON_VALUES = st.one_of(
    st.none(),
    st.booleans(),
    SMALL_OR_HUGE,
    st.floats(allow_nan=False),
    st.text(max_size=8),
    st.lists(st.integers(), max_size=2),
    st.dictionaries(st.text(max_size=4), st.integers(), max_size=2),
)


@st.composite
def damage(draw, names):
    """A list of ``(file, how, detail)``: truncated, garbled bytes, removed, emptied, or (JSON) a
    value replaced or a key dropped."""
    out = []
    for _ in range(draw(st.integers(1, 3))):
        name = draw(st.sampled_from(names))
        how = draw(st.sampled_from(["truncate", "garble", "remove", "empty", "json-value", "json-drop"]))
        detail = {
            "truncate": st.floats(0, 1),
            "garble": st.tuples(st.floats(0, 1), st.binary(min_size=1, max_size=16)),
            "remove": st.none(),
            "empty": st.none(),
            "json-value": st.tuples(st.integers(0, 50), JSON_VALUES),
            "json-drop": st.integers(0, 50),
        }[how]
        out.append((name, how, draw(detail)))
    return out


def _keys(obj, prefix=()):
    """Every key path of a JSON object (dicts only)."""
    for k, v in obj.items():
        yield prefix + (k,)
        if isinstance(v, dict):
            yield from _keys(v, prefix + (k,))


def _apply(run, name, how, detail):
    path = os.path.join(run, name)
    if not os.path.exists(path):
        return
    if how == "remove":
        os.remove(path)
    elif how == "empty":
        open(path, "wb").close()
    elif how == "truncate":
        os.truncate(path, int(os.path.getsize(path) * detail))
    elif how == "garble":
        where, junk = detail
        with open(path, "r+b") as f:
            f.seek(int(os.path.getsize(path) * where))
            f.write(junk)
    else:
        try:
            with open(path) as f:
                obj = json.load(f)
        except ValueError:
            return
        if not isinstance(obj, dict):
            return
        paths = list(_keys(obj))
        if not paths:
            return
        index = detail[0] if how == "json-value" else detail
        key = paths[index % len(paths)]
        parent = obj
        for k in key[:-1]:
            parent = parent[k]
        if how == "json-value":
            parent[key[-1]] = detail[1]
        else:
            del parent[key[-1]]
        with open(path, "w") as f:
            json.dump(obj, f)


@pytest.mark.parametrize("examples", TIERS)
def test_damaged_run_directories(world, examples):
    # the files a damaged run is read from first (hypothesis leans on the first choices)
    first = ("run.json", "checkpoints/step-00000002/state.json", "model.safetensors", "tokenizer.json")
    names = sorted((n for n in _run_files(world["run"]) if not n.endswith(".png")), key=lambda n: (n not in first, n))
    commands = {
        "generate": lambda run, out: [
            "generate",
            "--checkpoint",
            run,
            "--prompt",
            "the memory",
            "--max-new-tokens",
            "2",
            "--no-stream",
        ],
        "generate-checkpoint": lambda run, out: [
            "generate",
            "--checkpoint",
            os.path.join(run, "checkpoints", "step-00000002"),
            "--prompt",
            "the memory",
            "--max-new-tokens",
            "2",
            "--temperature",
            "0",
        ],
        "resume": lambda run, out: ["train", "--resume", run, "--steps", "1"],  # refused after the checkpoint is read
        "export": lambda run, out: ["export", run, out],
    }
    tried = []

    @_settings(examples)
    @given(hits=damage(names), command=st.sampled_from(["resume", "generate", "generate-checkpoint", "export"]))
    def prop(hits, command):
        with tempfile.TemporaryDirectory() as tmp:
            run = os.path.join(tmp, "run")
            shutil.copytree(world["run"], run)
            for hit in hits:
                _apply(run, *hit)
            before = tree(tmp, world["root"])
            argv = commands[command](run, os.path.join(tmp, "out"))
            code, _, err = _run_guarded(argv)
            tried.append(f"{command} {_refused_or_done(code, err, argv[0])}")
            if command == "resume" and code == 0:
                return  # (a damaged step could make the run resumable again: then it trains, and writes)
            assert not unchanged(before, tree(tmp, world["root"])), (hits, command)

    prop()
    _report("damaged run directories", tried, examples)


# ------------------------------------------------------------------ safe loading and atomic writes
@functools.lru_cache(maxsize=1)
def _package_sources():
    """``(path relative to the package, source, syntax tree)`` of every module of the installed package."""
    import ast

    import deepmemory

    root, out = os.path.dirname(deepmemory.__file__), []
    for d, _, fs in os.walk(root):
        for f in sorted(fs):
            if f.endswith(".py"):
                path = os.path.join(d, f)
                with open(path) as fh:
                    source = fh.read()
                out.append((os.path.relpath(path, root).replace(os.sep, "/"), source, ast.parse(source)))
    return tuple(out)


INTERESTING = {
    "eval",
    "exec",
    "load",
    "unsafe_load",
    "full_load",
    "load_all",
    "from_pretrained",
    "open",
    "savefig",
    "save_file",
    "copyfile",
    "copy",
    "copy2",
    "copytree",
    "save",
    "write_bytes",
    "write_text",
}


def _call_name(node):
    """``(called name, owner source)`` of a call: ``torch.load(x)`` -> ``("load", "torch")`` (the
    owner is left empty for names no check looks at)."""
    import ast

    func = node.func
    if isinstance(func, ast.Attribute):
        return func.attr, ast.unparse(func.value) if func.attr in INTERESTING else "?"
    return (func.id, "") if isinstance(func, ast.Name) else ("", "")


def unsafe_loads(name, source, tree=None):
    """Where ``source`` could run code from a file: pickle-family imports, ``torch.load``,
    ``numpy.load``, ``eval``/``exec``, unsafe YAML loaders, ``allow_pickle``, and ``from_pretrained``
    without ``use_safetensors=True``."""
    import ast

    found = []
    for node in ast.walk(tree or ast.parse(source)):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            mods = [a.name for a in node.names] + (
                [node.module] if isinstance(node, ast.ImportFrom) and node.module else []
            )
            found += [
                f"{name}:{node.lineno} imports {m}"
                for m in mods
                if m.split(".")[0] in ("pickle", "marshal", "shelve", "dill", "cloudpickle", "joblib")
            ]
        if not isinstance(node, ast.Call):
            continue
        called, owner = _call_name(node)
        keywords = {k.arg: k.value for k in node.keywords}
        if called not in INTERESTING and "allow_pickle" not in keywords:
            continue
        safetensors = (
            isinstance(keywords.get("use_safetensors"), ast.Constant) and keywords["use_safetensors"].value is True
        )
        if (
            (called in ("eval", "exec") and not owner)
            or (called == "load" and owner in ("torch", "pickle", "np", "numpy"))
            or (owner == "yaml" and called in ("load", "unsafe_load", "full_load", "load_all"))
            or "allow_pickle" in keywords
            or (called == "from_pretrained" and not safetensors)
        ):
            found.append(f"{name}:{node.lineno} {owner + '.' if owner else ''}{called}()")
    return found


def test_no_unsafe_loader_in_the_package():
    """No pickle on any file: safetensors + JSON/YAML ``safe_load`` only (docs/security.md)."""
    assert unsafe_loads("x.py", "import torch\nw = torch.load(p)\nm.eval()\nyaml.safe_load(f)") == [
        "x.py:2 torch.load()"
    ]
    assert len(unsafe_loads("x.py", "import pickle\neval(s)\nyaml.load(f)\nM.from_pretrained(p)")) == 4
    found = [hit for name, source, tree in _package_sources() for hit in unsafe_loads(name, source, tree)]
    assert not found, found


# the append-only logs: a line cut by a crash is dropped by their readers (and metrics.jsonl is
# rewritten atomically when a run resumes)
APPEND_ONLY = {("train/trainer.py", "restore"), ("train/loggers.py", "__init__")}
RAW_WRITERS = {"savefig", "save_file", "copyfile", "copy2", "copytree", "write_bytes"}
RENAMES = ("os.replace(", "_replace(", "os.rename(", "TemporaryDirectory(", "atomic_path(")


def non_atomic_writes(name, source, tree=None):
    """The file writes of ``source`` (``open`` for writing, ``savefig``, ``save_file``, copies,
    ``torch.save``, pathlib's ``write_text``/``write_bytes``) in a function that renames nothing
    (``os.replace``, ``_replace``, ``os.rename``, ``files.atomic_path``) and writes into no temporary folder, other than
    the append-only logs of ``APPEND_ONLY``."""
    import ast

    lines, found = source.splitlines(), []
    for fn in ast.walk(tree or ast.parse(source)):
        if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        renames = any(r in "\n".join(lines[fn.lineno - 1 : fn.end_lineno]) for r in RENAMES)
        for node in ast.walk(fn):
            if not isinstance(node, ast.Call):
                continue
            called, owner = _call_name(node)
            if called == "open" and not owner:
                mode = (
                    node.args[1]
                    if len(node.args) > 1
                    else next((k.value for k in node.keywords if k.arg == "mode"), None)
                )
                text = mode.value if isinstance(mode, ast.Constant) and isinstance(mode.value, str) else "r"
                writes = any(c in text for c in "wax+") and not ("a" in text and (name, fn.name) in APPEND_ONLY)
            else:
                writes = (
                    (owner and called in RAW_WRITERS)
                    or (called, owner) in (("save", "torch"), ("copy", "shutil"))
                    or (called == "write_text" and owner and owner != "ck" and name != "train/checkpoint.py")
                )
            if writes and not renames:
                found.append(f"{name}:{node.lineno} {fn.name}() writes with {called}() and renames nothing")
    return found


def test_every_file_is_written_atomically():
    """Every file the package writes is written as a hidden temporary renamed over the target in
    the same function, or inside a temporary folder, or is an append-only log; everything else goes
    through those writers (``deepmemory.files``, ``checkpoint.write_json``/``write_tensors``/``write_dir``)."""
    bad = "def f(p):\n    with open(p, 'w') as fh:\n        fh.write('x')\n"
    good = "def f(p):\n    with open(p + '.tmp', 'w') as fh:\n        fh.write('x')\n    os.replace(p + '.tmp', p)\n"
    assert len(non_atomic_writes("x.py", bad)) == 1 and not non_atomic_writes("x.py", good)
    assert len(non_atomic_writes("x.py", "def g(fig, p):\n    fig.savefig(p)\n")) == 1
    found = [hit for name, source, tree in _package_sources() for hit in non_atomic_writes(name, source, tree)]
    assert not found, found


@pytest.mark.slow
def test_export_killed_at_a_random_write_leaves_no_partial_folder(world, tmp_path):
    """``deepmemory export`` SIGKILLed at a random one of its atomic writes (the trainer's own
    test: tests/test_train.py): OUT does not exist (or is the complete old one), the run is
    unchanged, and exporting again succeeds."""
    import random
    import signal
    import subprocess
    import sys

    from test_train import KILLER  # the trainer's: SIGKILL at the KILL_NTH write ending in KILL_AT ("": any)

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.path.join(repo, "src"))
    run = str(tmp_path / "run")
    shutil.copytree(world["run"], run)
    before = tree(run)
    nth = random.Random(17).randint(1, 5)  # config, generation config, tokenizer config, weights, model card
    out = str(tmp_path / "out")
    proc = subprocess.run(
        [sys.executable, "-c", KILLER, "export", run, out],
        env=dict(env, KILL_AT="", KILL_NTH=str(nth)),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert not os.path.exists(out) and tree(run) == before
    code, _, err = run_cli(["export", run, out])
    assert code == 0, err
    assert {"config.json", "model.safetensors", "README.md", "tokenizer.json"} <= set(os.listdir(out))
