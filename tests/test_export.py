"""A run directory, its checkpoints and `deepmemory export` are Hugging Face model folders:
``AutoModelForCausalLM.from_pretrained`` loads the trainer's exact model, and it generates with a
streamer."""

import json
import os
import stat

import pytest
import torch

import deepmemory  # noqa: F401 (registers model_type "deepmemory" with the Auto classes)
from deepmemory.cli import main

TINY = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64}
MODEL_FILES = {"config.json", "generation_config.json", "model.safetensors"}


def write_corpus(root):
    import random

    r = random.Random(0)
    words = "the memory learns to store keys and values while it reads a long sequence".split()
    for i in range(8):
        (root / f"doc{i}.txt").write_text(" ".join(r.choice(words) for _ in range(100)) + "\n")
    return str(root)


def fit(settings):
    """Train in this process; returns the trainer (its model on the CPU, in eval mode)."""
    from deepmemory.train.config import new_config
    from deepmemory.train.distributed import setup, teardown
    from deepmemory.train.trainer import Trainer

    cfg = new_config(settings)
    env = setup(cfg.device)
    try:
        with Trainer(cfg, env, quiet=True) as trainer:
            trainer.summary = trainer.fit()
    finally:
        teardown(env)
    trainer.model.eval()
    return trainer


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    (root / "data").mkdir()
    data = write_corpus(root / "data")
    run = str(root / "run")
    trainer = fit(
        dict(
            model="titans-mac",
            model_overrides=dict(TINY, segment_size=8, attention_window=8),
            data=[data],
            seq_len=16,
            batch_size=4,
            steps=4,
            eval_every=2,
            eval_tokens=128,
            lr=1e-2,
            out=run,
            device="cpu",
        )
    )
    return trainer, run, root


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


def test_run_directory_and_checkpoints_load_with_from_pretrained(trained):
    from transformers import AutoConfig, AutoModelForCausalLM

    trainer, run, _ = trained
    assert MODEL_FILES | {"run.json", "metrics.jsonl", "loss.png"} <= set(os.listdir(run))
    assert json.load(open(os.path.join(run, "config.json")))["model_type"] == "deepmemory"
    assert json.load(open(os.path.join(run, "generation_config.json")))["eos_token_id"] == 256
    assert AutoConfig.from_pretrained(run).model_type == "deepmemory"
    ids = torch.randint(0, 256, (2, 19), generator=torch.Generator().manual_seed(0))
    want = logits(trainer.model, ids)
    loaded = AutoModelForCausalLM.from_pretrained(run)
    assert type(loaded).__name__ == "DeepMemoryForCausalLM"
    assert torch.equal(logits(loaded.eval(), ids), want)
    step = os.path.join(run, "checkpoints", "step-00000004")
    assert MODEL_FILES <= set(os.listdir(step))
    assert torch.equal(logits(AutoModelForCausalLM.from_pretrained(step).eval(), ids), want)


SCRIPT = """
import sys
{first}
from transformers import AutoModelForCausalLM
{second}
print(type(AutoModelForCausalLM.from_pretrained(sys.argv[1])).__name__)
"""


@pytest.mark.slow
@pytest.mark.parametrize("deepmemory_first", [True, False], ids=["deepmemory-first", "transformers-first"])
def test_bare_import_deepmemory_registers_the_auto_classes(trained, deepmemory_first):
    # a fresh interpreter: `import deepmemory` alone (no torch) is enough, before or after transformers
    import subprocess
    import sys

    first, second = ("import deepmemory", "") if deepmemory_first else ("", "import deepmemory")
    code = SCRIPT.format(first=first, second=second)
    out = subprocess.run([sys.executable, "-c", code, trained[1]], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "DeepMemoryForCausalLM"
    light = subprocess.run(
        [sys.executable, "-c", "import sys, deepmemory; print('torch' in sys.modules)"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert light.stdout.strip() == "False"  # the command line's fast start-up depends on it


def test_export_is_a_clean_hugging_face_folder(trained, capsys):
    from transformers import AutoModelForCausalLM, TextStreamer

    trainer, run, root = trained
    out = str(root / "exported")
    assert main(["export", run, out]) == 0
    assert set(os.listdir(out)) == MODEL_FILES | {"README.md"}  # bytes: no tokenizer files
    card = open(os.path.join(out, "README.md")).read()
    for text in (
        "`titans-mac`",
        "`tiny`",
        "| steps | 4 |",
        "bits/byte",
        "library_name: deepmemory",
        str(trainer.n_params // 1000),
    ):
        assert text in card, text
    val_bpb = trainer.summary["val_bpb"]
    assert f"{val_bpb:.3f} bits/byte" in card
    ids = torch.randint(0, 256, (1, 23), generator=torch.Generator().manual_seed(1))
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    assert torch.equal(logits(model, ids), logits(trainer.model, ids))

    # generate() streams through Hugging Face's TextStreamer (our tokenizers have its decode())
    capsys.readouterr()
    prompt = torch.tensor([list(b"the memory ")])
    streamer = TextStreamer(trainer.tokenizer, skip_prompt=True)
    with torch.no_grad():
        out_ids = model.generate(prompt, max_new_tokens=12, do_sample=False, streamer=streamer)
    streamed = capsys.readouterr().out
    assert streamed.rstrip("\n") == trainer.tokenizer.decode(out_ids[0, prompt.shape[1] :]).rstrip("\n")
    assert torch.equal(out_ids, trainer.model.generate(prompt, max_new_tokens=12, do_sample=False))

    # exporting over it again needs --overwrite; a bad source is one line
    assert main(["export", run, out]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main(["export", run, out, "--overwrite"]) == 0
    assert main(["export", str(root / "nothing"), str(root / "x")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("deepmemory export: error: "), err


def test_files_have_one_mode(trained):
    _, run, _ = trained
    mask = os.umask(0)
    os.umask(mask)
    modes = {}
    for d, _, files in os.walk(run):
        for f in files:
            modes[os.path.relpath(os.path.join(d, f), run)] = stat.S_IMODE(os.stat(os.path.join(d, f)).st_mode)
    assert set(modes.values()) == {0o666 & ~mask}, modes


def test_run_json_records_what_was_used(trained):
    _, run, _ = trained
    record = json.load(open(os.path.join(run, "run.json")))
    assert record["format"] == "deepmemory-run" and record["version"] == 2
    assert record["train"]["device"] == "cpu"
    assert record["resolved"]["device"] == "cpu" and record["resolved"]["precision"] == "fp32"
    assert record["resolved"]["processes"] == 1 and record["resolved"]["threads"] >= 1


def test_generate_cli_on_exported_folder_and_checkpoint(trained, capsys):
    _, run, root = trained
    out = str(root / "exported-2")
    assert main(["export", run, out]) == 0
    capsys.readouterr()
    for path in (out, os.path.join(run, "checkpoints", "step-00000004")):
        assert (
            main(["generate", "--checkpoint", path, "--prompt", "the ", "--max-new-tokens", "8", "--temperature", "0"])
            == 0
        )
        text = capsys.readouterr().out
        assert text.startswith("the ") and len(text) > 4


def test_config_json_edited_apart_from_the_run_record_is_refused(trained, capsys):
    """run.json holds the run's model; config.json (what AutoModel reads) is written from it. An edit
    of one and not the other is refused in one line by everything that loads the run (generate,
    export, eval, resume), instead of generate building one model and AutoModel another."""
    import shutil

    from deepmemory.train import CheckpointError, load_run

    _, run, root = trained
    copy = str(root / "edited")
    shutil.copytree(run, copy)
    load_run(copy)  # the untouched copy loads
    for folder in (copy, os.path.join(copy, "checkpoints", "step-00000004")):
        path = os.path.join(folder, "config.json")
        config = json.load(open(path))
        config["attention_window"] = 4  # a model AutoModel builds, not the trained one
        json.dump(config, open(path, "w"))
        with pytest.raises(
            CheckpointError,
            match=r"config\.json describes another model than run\.json \(attention_window: 4 against 8\)",
        ):
            load_run(folder)
    capsys.readouterr()
    assert main(["generate", "--checkpoint", copy, "--prompt", "a", "--max-new-tokens", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "describes another model than run.json" in err[0], err
    assert main(["train", "--resume", copy, "--steps", "6"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "describes another model than run.json" in err[0], err
