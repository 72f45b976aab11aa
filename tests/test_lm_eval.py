"""The lm-evaluation-harness model `deepmemory`: loglikelihood, loglikelihood_rolling and
generate_until against a direct computation from one forward pass, a local YAML task (over a
JSON file written here) and the shipped example (examples/lm_eval) run offline through the harness,
the device it picks and the one line of a failure to reach the Hub. Skipped without `lm-eval`."""

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("lm_eval", reason='needs lm-eval: pip install "deepmemory[eval]"')

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLE = os.path.join(REPO, "examples", "lm_eval")  # the local tasks docs/evaluation.md runs

TINY = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64}


class Request:
    """What the harness hands a model: an object with ``args``."""

    def __init__(self, *args):
        self.args = args


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from deepmemory.models import build

    torch.manual_seed(0)
    folder = str(tmp_path_factory.mktemp("lm") / "titans-lmm")
    build("titans-lmm", size="tiny", vocab_size=257, **TINY).save_pretrained(folder)  # 257: the byte tokenizer
    return folder


@pytest.fixture(scope="module")
def lm(checkpoint):
    from deepmemory.eval.lm_eval import DeepMemoryLM

    return DeepMemoryLM(checkpoint=checkpoint, chunk_size=5)  # small chunks: prompts are read in several pieces


def direct_logprobs(lm, ids):
    """log P(ids[t] | ids[:t]) for t >= 1 from one forward pass without a cache."""
    with torch.no_grad():
        logits = lm.model(input_ids=torch.tensor([ids])).logits[0].float()
    return F.log_softmax(logits[:-1], -1).gather(1, torch.tensor(ids[1:])[:, None])[:, 0], logits[:-1].argmax(-1)


def test_registered():
    from lm_eval.api.registry import get_model, model_registry

    from deepmemory.eval.lm_eval import DeepMemoryLM

    assert get_model("deepmemory") is DeepMemoryLM
    assert "hf" in model_registry and "dummy" in model_registry  # the harness's own models are still found


def test_loglikelihood_equals_one_pass(lm):
    requests = [
        Request("The memory reads", " keys"),
        Request("The memory reads", " values and keys"),
        Request("Another context, longer than one chunk", "!"),
        Request("", "empty context"),
    ]
    got = lm.loglikelihood(requests, disable_tqdm=True)
    for (context, continuation), (total, greedy) in zip([r.args for r in requests], got):
        ctx = lm.tok_encode(context) or [lm.eot_token_id]
        cont = lm.tok_encode(continuation)
        logprobs, argmax = direct_logprobs(lm, ctx + cont)
        assert total == pytest.approx(float(logprobs[-len(cont) :].sum()), rel=1e-4, abs=1e-4)
        assert greedy == bool((argmax[-len(cont) :] == torch.tensor(cont)).all())


def test_batched_loglikelihood_equals_one_at_a_time(checkpoint, lm):
    """batch_size 3: requests that fit chunk_size go in right-padded batches, the long one through
    the cache; every result equals the one-at-a-time path's."""
    from deepmemory.eval.lm_eval import DeepMemoryLM

    batched = DeepMemoryLM(checkpoint=checkpoint, batch_size=3, chunk_size=24)
    requests = [
        Request("The memory reads", " keys"),
        Request("The memory", " reads values and keys"),
        Request("A", "b"),
        Request("Another context, longer than the chunk of the batches", "!"),
        Request("", "empty context"),
        Request("Short", " one"),
    ]
    for (total, greedy), (want, want_greedy) in zip(
        batched.loglikelihood(requests, disable_tqdm=True), lm.loglikelihood(requests, disable_tqdm=True)
    ):
        assert total == pytest.approx(want, rel=1e-4, abs=1e-4)
        assert greedy == want_greedy


def test_greedy_flag_is_true_for_the_greedy_continuation(lm):
    ids = lm.tok_encode("Recall:")
    with torch.no_grad():
        for _ in range(3):
            ids.append(int(lm.model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
    continuation = lm.tok_decode(ids[-3:])
    if lm.tok_encode(continuation) != ids[-3:] or continuation[:1].isspace():
        pytest.skip("the greedy bytes do not decode to text and back")
    [(_, greedy)] = lm.loglikelihood([Request("Recall:", continuation)], disable_tqdm=True)
    assert greedy


def test_loglikelihood_rolling_equals_one_pass(lm):
    text = "a document longer than several chunks of five tokens"
    [got] = lm.loglikelihood_rolling([Request(text)], disable_tqdm=True)
    logprobs, _ = direct_logprobs(lm, [lm.eot_token_id] + lm.tok_encode(text))
    assert got == pytest.approx(float(logprobs.sum()), rel=1e-4)


def test_generate_until_is_greedy_and_stops(lm):
    prompt = "The special magic number is"
    [free] = lm.generate_until([Request(prompt, {"until": [], "max_gen_toks": 8})], disable_tqdm=True)
    ids = lm.tok_encode(prompt)
    with torch.no_grad():
        for _ in range(8):
            ids.append(int(lm.model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
    want = lm.tok_decode(ids[-8:])
    assert free == want
    stop = want[2:4] if len(want) >= 4 else None
    if stop:
        [cut] = lm.generate_until([Request(prompt, {"until": [stop], "max_gen_toks": 8})], disable_tqdm=True)
        assert cut == want[: want.find(stop)]
    with pytest.raises(ValueError, match="greedily"):
        lm.generate_until([Request(prompt, {"do_sample": True})], disable_tqdm=True)


def test_bad_model_args(checkpoint, tmp_path):
    from deepmemory.eval.lm_eval import DeepMemoryLM

    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        DeepMemoryLM(checkpoint=checkpoint, batch_size="0")
    assert DeepMemoryLM(checkpoint=checkpoint, batch_size="auto").batch_size == 32
    with pytest.raises(ValueError, match="chunk_size"):
        DeepMemoryLM(checkpoint=checkpoint, chunk_size=0)
    with pytest.raises(ValueError, match="is not a directory"):
        DeepMemoryLM(checkpoint=str(tmp_path / "missing"))


def test_device_asked_for_or_left_to_the_harness(checkpoint, monkeypatch, recwarn):
    import deepmemory.eval.lm_eval as adapter

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    harness = {"batch_size": 1, "max_batch_size": None, "device": "cuda:0"}  # what the command passes
    # the command line named no --device: the harness's default cuda:0 was not asked for
    monkeypatch.setattr(adapter, "_harness_chose_device", True)
    lm = adapter.DeepMemoryLM.create_from_arg_string(f"checkpoint={checkpoint}", harness)
    assert lm.device.type == "cpu" and not [w for w in recwarn if "CUDA" in str(w.message)]
    # --device cuda:0 named: the fallback is said
    monkeypatch.setattr(adapter, "_harness_chose_device", False)
    with pytest.warns(UserWarning, match="no CUDA device is available; running on the CPU"):
        adapter.DeepMemoryLM.create_from_arg_string(f"checkpoint={checkpoint}", harness)
    # device in --model_args wins over --device (they used to clash: a TypeError)
    lm = adapter.DeepMemoryLM.create_from_arg_string(f"checkpoint={checkpoint},device=cpu", harness)
    assert lm.device.type == "cpu"
    assert adapter.DeepMemoryLM(checkpoint=checkpoint, device="auto").device.type == "cpu"
    with pytest.raises(adapter.DeepMemoryLMError, match="device must be"):
        adapter.DeepMemoryLM(checkpoint=checkpoint, device="tpu:x")


def write_tasks(folder):
    """Two YAML tasks over one local JSON-lines file: multiple choice and generation."""
    os.makedirs(folder, exist_ok=True)
    data = os.path.join(folder, "sums.jsonl")
    with open(data, "w") as f:
        for a, b in ((1, 2), (3, 4), (2, 2)):
            f.write(
                json.dumps(
                    {"question": f"{a}+{b}=", "choices": [str(a + b), str(a * b + 5)], "label": 0, "answer": str(a + b)}
                )
                + "\n"
            )
    common = (
        f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\ntest_split: test\n"
        'doc_to_text: "{{question}}"\n'
    )
    with open(os.path.join(folder, "dm_choice.yaml"), "w") as f:
        f.write(
            "task: dm_choice\n" + common + 'output_type: multiple_choice\ndoc_to_choice: "{{choices}}"\n'
            "doc_to_target: label\nmetric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
        )
    with open(os.path.join(folder, "dm_generate.yaml"), "w") as f:
        f.write(
            "task: dm_generate\n" + common + 'output_type: generate_until\ndoc_to_target: "{{answer}}"\n'
            'generation_kwargs:\n  until: ["\\n"]\n  max_gen_toks: 4\n  do_sample: false\n'
            "metric_list:\n  - metric: exact_match\n    aggregation: mean\n    higher_is_better: true\n"
        )


@pytest.mark.slow
def test_local_yaml_tasks_through_the_harness(checkpoint, lm, tmp_path, monkeypatch):
    import lm_eval
    from lm_eval.tasks import TaskManager

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    write_tasks(str(tmp_path / "tasks"))
    results = lm_eval.simple_evaluate(
        model="deepmemory",
        model_args=f"checkpoint={checkpoint}",
        tasks=["dm_choice", "dm_generate"],
        log_samples=True,
        task_manager=TaskManager(include_path=str(tmp_path / "tasks")),
    )
    choice, generate = results["samples"]["dm_choice"], results["samples"]["dm_generate"]
    assert len(choice) == len(generate) == 3
    # each choice's score is the model's loglikelihood; the accuracy is whether the right one scores highest
    for sample in choice:
        doc = sample["doc"]
        want = lm.loglikelihood([Request(doc["question"], " " + c) for c in doc["choices"]], disable_tqdm=True)
        got = [r[0] for r in sample["resps"]]
        assert [g[0] for g in got] == pytest.approx([w[0] for w in want], rel=1e-5)
    acc = sum(max(range(2), key=lambda i: s["resps"][i][0][0]) == 0 for s in choice) / 3
    assert results["results"]["dm_choice"]["acc,none"] == pytest.approx(acc)
    for sample in generate:
        [want] = lm.generate_until(
            [Request(sample["doc"]["question"], {"until": ["\n"], "max_gen_toks": 4})], disable_tqdm=True
        )
        assert sample["resps"][0][0] == want


@pytest.mark.long  # minutes: a process importing the harness and its datasets
def test_the_command(checkpoint, tmp_path):
    write_tasks(str(tmp_path / "tasks"))
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "deepmemory.eval.lm_eval",
            "--model",
            "deepmemory",
            "--model_args",
            f"checkpoint={checkpoint}",
            "--include_path",
            str(tmp_path / "tasks"),
            "--tasks",
            "dm_choice",
            "--output_path",
            str(tmp_path / "out"),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env=dict(os.environ, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1"),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "dm_choice" in proc.stdout and "acc" in proc.stdout


@pytest.mark.slow
def test_the_shipped_example_runs_offline(checkpoint, lm, monkeypatch):
    """examples/lm_eval (docs/evaluation.md) through the harness, offline: the accuracy is the share of
    lines whose right ending scores highest, the bits per byte those of each function read whole."""
    import math

    import lm_eval
    from lm_eval.tasks import TaskManager

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(os.path.dirname(REPO))  # the data is found from any working directory
    results = lm_eval.simple_evaluate(
        model="deepmemory",
        model_args=f"checkpoint={checkpoint}",
        tasks=["deepmemory_python"],
        log_samples=True,
        task_manager=TaskManager(include_path=EXAMPLE),
    )
    with open(os.path.join(EXAMPLE, "python_syntax.jsonl")) as f:
        lines = [json.loads(line) for line in f]
    with open(os.path.join(EXAMPLE, "python_text.jsonl")) as f:
        texts = [json.loads(line)["text"] for line in f]
    assert len(lines) == 40 and all(len(d["choices"]) == 3 and d["label"] == 0 for d in lines) and len(texts) == 6
    right = 0
    for doc in lines:
        scores = [
            r[0] for r in lm.loglikelihood([Request(doc["context"], c) for c in doc["choices"]], disable_tqdm=True)
        ]
        right += max(range(3), key=lambda i: scores[i]) == 0
    assert results["results"]["deepmemory_python_syntax"]["acc,none"] == pytest.approx(right / 40)
    nats = -sum(lm.loglikelihood_rolling([Request(t) for t in texts], disable_tqdm=True))
    want = nats / math.log(2) / sum(len(t.encode()) for t in texts)
    assert results["results"]["deepmemory_python_bpb"]["bits_per_byte,none"] == pytest.approx(want, rel=1e-5)


def run_module(*args, **env):
    return subprocess.run(
        [sys.executable, "-m", "deepmemory.eval.lm_eval", *args],
        capture_output=True,
        text=True,
        timeout=600,
        env=dict(os.environ, OMP_NUM_THREADS="1", **env),
    )


@pytest.mark.slow
def test_a_hub_task_offline_ends_in_one_line(checkpoint):
    proc = run_module(
        "--model", "deepmemory", "--model_args", f"checkpoint={checkpoint}", "--tasks", "hellaswag",
        HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1",
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "CUDA" not in proc.stderr  # --device was left to the harness
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("python -m deepmemory.eval.lm_eval: error: cannot reach the Hugging Face Hub"), last
    assert "hellaswag" in last and "--include_path examples/lm_eval --tasks deepmemory_python" in last
    # a bad model argument: one line too; --debug adds the traceback
    bad = ("--model", "deepmemory", "--model_args", f"checkpoint={checkpoint},chunk_size=0", "--tasks", "hellaswag")
    proc = run_module(*bad)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1] == (
        "python -m deepmemory.eval.lm_eval: error: --model_args: chunk_size must be a positive integer; got 0"
    )
    assert "Traceback" not in proc.stderr and "Traceback" in run_module(*bad, "--debug").stderr
