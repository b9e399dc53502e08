"""Shared fixtures: the real PDF corpus, a tiny locally trained tokenizer, configs in a temp workdir."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from doctune.config import build_config

REPO = Path(__file__).resolve().parent
CORPUS = (REPO.parent / "shared" / "corpus").resolve()


@pytest.fixture(scope="session")
def corpus() -> Path:
    assert CORPUS.is_dir(), f"the shared corpus is expected at {CORPUS}"
    return CORPUS


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory, corpus) -> Path:
    """A byte-level BPE tokenizer trained in a second on a few pages: a stand-in for a model's tokenizer."""
    import pymupdf
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    with pymupdf.open(corpus / "camlidl-1.04.doc.pdf") as doc:
        text = [doc[i].get_text() for i in range(6)]
    tokenizer.train_from_iterator(text, trainer=trainer)
    folder = tmp_path_factory.mktemp("tiny-tokenizer")
    tokenizer.save(str(folder / "tokenizer.json"))
    return folder


CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}"
    "{{ '\\n' }}{% else %}{{ message['content'] + '<|im_end|>' + '\\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_tokenizer_dir) -> Path:
    """A randomly initialised two-layer Llama with the tiny tokenizer and a ChatML template: a model folder in seconds."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_file=str(tiny_tokenizer_dir / "tokenizer.json"), eos_token="<|im_end|>", pad_token="<|im_end|>",
        bos_token="<|im_start|>", additional_special_tokens=["<|im_start|>", "<|im_end|>"],
    )  # fmt: skip
    tokenizer.chat_template = CHATML
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=1024, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True,
    )  # fmt: skip
    folder = tmp_path_factory.mktemp("tiny-model")
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_vlm_dir(tmp_path_factory) -> Path:
    """`bundled:tiny-random-vlm`: a two-layer SmolVLM-architecture model with a real processor, built once per session."""
    from doctune.models import resolve_model

    return resolve_model("bundled:tiny-random-vlm", tmp_path_factory.mktemp("vlm-cache"))


GENERAL_TEXT = [
    "Water boils at 100 degrees Celsius at sea level; at higher altitudes the lower air pressure lets it boil sooner.",
    "Photosynthesis lets plants turn sunlight, water and carbon dioxide into sugar, releasing oxygen as a by-product.",
    "The Pacific is the largest and deepest of the Earth's oceans, covering about a third of the planet's surface.",
    "A prime number has exactly two divisors, one and itself; 2, 3, 5, 7 and 11 are the first five primes.",
]


@pytest.fixture(scope="session")
def corpus_synth(tmp_path_factory, tiny_model_dir, corpus):
    """ingest and synth on the shared corpus with the tiny model and a general-text replay file: (config, tracker,
    the synth StageResult)."""
    from doctune.stages import execute_stage
    from doctune.tracking import Tracker

    work = tmp_path_factory.mktemp("synth-corpus")
    replay = work / "general.jsonl"
    replay.write_text("".join(json.dumps({"text": text}) + "\n" for text in GENERAL_TEXT))
    config = build_config(
        {"project": {"workdir": str(work)}, "model": {"base_model": str(tiny_model_dir)}, "ingest": {"pdfs": str(corpus)},
         "synth": {"replay": {"dataset": str(replay)}}}
    )  # fmt: skip
    tracker = Tracker(config)
    parent = tracker.open_pipeline_run("synth-test")
    ingest = execute_stage("ingest", config, tracker, parent, {})
    synth = execute_stage(
        "synth", config, tracker, parent, {"chunks": ingest.outputs["chunks"], "pages": ingest.outputs["pages"]}
    )
    return config, tracker, synth


@pytest.fixture
def make_config(tmp_path, tiny_model_dir, corpus):
    """Build a RunConfig in a fresh workdir with the tiny model, over the 2-core demo profile (its step counts and
    learning rates; the library defaults are a GPU run's); extra keys as dotted overrides."""

    def factory(pdfs: Path | None = None, **overrides: object):
        data = {
            "extends": str(REPO / "configs" / "cpu-demo.yaml"),
            "project": {"workdir": str(tmp_path / "work")},
            "model": {"base_model": str(tiny_model_dir)},
            "ingest": {"pdfs": str(pdfs or corpus)},
            "synth": {"replay": {"share": 0.0}},  # a random model's rehearsal is empty: tests opt in
            # Training a random model is a plumbing check: a couple of steps unless a test asks for more.
            "retriever": {"epochs": 1, "max_seq_length": 32},
            "cpt": {"max_steps": 2, "block_size": 64},
            "sft": {"max_steps": 2, "max_length": 256},
            "dpo": {"max_steps": 2, "max_length": 256},
            "quantize": {"eval_blocks": 2, "block_size": 64, "generate_tokens": 8},
            "gate": {
                "max_golden": 6,
                "max_unanswerable": 4,
                "max_new_tokens": 12,
                "perplexity_blocks": 2,
                "block_size": 64,
                # 2 calibration items state only a loose bound: 0.5 at confidence 0.5 (1 item needed)
                "hallucination_alpha": 0.5,
                "hallucination_confidence": 0.5,
                "rules": {"permutations": 1000},
            },
        }
        return build_config(data, [f"{key}={value}" for key, value in overrides.items()])

    return factory


@pytest.fixture
def kfp_outputs(tmp_path):
    """The typed output artifacts of a component, as the KFP executor hands them to its Python function."""
    from kfp import dsl

    kinds = {cls.schema_title: cls for cls in (dsl.Dataset, dsl.Model, dsl.Metrics, dsl.HTML, dsl.Markdown)}

    def make(component) -> dict:
        outputs = {}
        for name, spec in component.component_spec.outputs.items():
            kind = kinds.get(spec.type.split("@")[0])
            if kind is not None:
                path = tmp_path / "kfp-outputs" / component.name / name
                path.parent.mkdir(parents=True, exist_ok=True)
                outputs[name] = kind(name=name, uri=str(path), metadata={})
        return outputs

    return make


@pytest.fixture
def call_component(kfp_outputs):
    """Call a stage component's Python function as its KFP task would; returns its refs JSON."""

    def call(component, **arguments) -> str:
        return component.python_func(**arguments, **kfp_outputs(component)).refs

    return call


CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH, PR_CAPBSET_DROP = 1, 2, 24


def _drop_file_permission_override() -> None:
    """In the child, before exec: give up root's right to ignore file permissions (bounding set, kept over exec).

    Root without CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH meets permission bits as any user does. (Running as
    another uid does not work everywhere: this venv's interpreter lives under /root, which only root may enter.)
    """
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH):
        if libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP) refused")


@pytest.fixture
def as_a_user():
    """subprocess.run arguments for a process that permission bits apply to (root gives up overriding them), with
    a writable HOME and TMPDIR under `home`."""

    def kwargs_for(home: Path) -> dict:
        (home / "tmp").mkdir(parents=True, exist_ok=True)
        env = os.environ | {"HOME": str(home), "TMPDIR": str(home / "tmp"), "HF_HUB_OFFLINE": "1",
                            "TOKENIZERS_PARALLELISM": "false", "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}  # fmt: skip
        kwargs: dict = {"env": env, "capture_output": True, "text": True, "timeout": 600}
        if os.geteuid() == 0:
            kwargs["preexec_fn"] = _drop_file_permission_override
        return kwargs

    return kwargs_for


@pytest.fixture
def small_corpus(tmp_path, corpus) -> Path:
    """Two short real PDFs: enough for pipeline plumbing tests in seconds."""
    folder = tmp_path / "pdfs"
    folder.mkdir()
    for name in ("camlidl-1.04.doc.pdf", "sample-plain.pdf"):
        (folder / name).write_bytes((corpus / name).read_bytes())
    return folder


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def start_server(tmp_path):
    """Start a real server process on 127.0.0.1 and wait until `ready_url` answers 200; stopped after the test."""
    started = []

    def start(command: list[str], ready_url: str, timeout: float = 120) -> None:
        log = tmp_path / f"server-{len(started)}.log"
        with open(log, "w") as handle:
            process = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT)
        started.append(process)
        deadline = time.monotonic() + timeout
        while True:
            try:
                with urllib.request.urlopen(ready_url, timeout=2) as response:
                    if response.status == 200:
                        return
            except OSError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                raise RuntimeError(f"{command[:4]} did not come up at {ready_url}: {log.read_text()[-2000:]}")
            time.sleep(0.5)

    yield start
    for process in started:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
