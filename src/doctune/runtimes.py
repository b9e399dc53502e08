"""A model as served: transformers (safetensors, NF4) or llama.cpp (GGUF), behind one interface.

Both answer chat messages with greedy decoding through the model's own chat template and score token blocks
for perplexity; quantize measures variants with them, the gate evaluates candidates with them.
"""

from __future__ import annotations

import math
import time
from contextlib import contextmanager
from pathlib import Path

from doctune.devices import cpu_has_amx, torch_dtype, usable_cpus
from doctune.generation import Reply, chat_replies


class RuntimeUnavailable(RuntimeError):
    """The runtime a model format needs is not installed."""


def perplexity_from_scores(blocks: list[list[int]], score_block) -> float:
    """exp(mean next-token NLL); `score_block(ids)` returns log-softmax rows (numpy, len(ids) x vocab)."""
    total, count = 0.0, 0
    for ids in blocks:
        logprobs = score_block(ids)
        total -= sum(float(logprobs[i, ids[i + 1]]) for i in range(len(ids) - 1))
        count += len(ids) - 1
    return math.exp(total / count)


def log_softmax(rows):
    import numpy as np

    rows = np.asarray(rows, dtype=np.float64)
    rows = rows - rows.max(axis=-1, keepdims=True)
    return rows - np.log(np.exp(rows).sum(axis=-1, keepdims=True))


class TransformersRuntime:
    """A transformers model folder (fp32/bf16 weights, or a bitsandbytes checkpoint) on the best device here."""

    def __init__(self, folder: Path, batch_size: int = 8, **load):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        device = "cuda" if torch.cuda.is_available() else "cpu"
        started = time.perf_counter()
        self.model = AutoModelForCausalLM.from_pretrained(folder, device_map=device, **load).eval()
        self.load_s = time.perf_counter() - started
        self.tokenizer = AutoTokenizer.from_pretrained(folder, padding_side="left")
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.batch_size = batch_size

    def chat(
        self, conversations: list[list[dict]], max_tokens: int, continuations: list[tuple[list[int], int]] | None = None
    ) -> list[Reply]:
        """Greedy replies, in batches of prompts padded on the left; with `continuations` (per conversation, its
        prompt's ids followed by a reply to score, and where the reply starts) each carries that reply's mean
        log-probability, scored on the prompt's cache."""
        return chat_replies(self.model, self.tokenizer, conversations, max_tokens, self.batch_size, continuations=continuations)

    def perplexity(self, blocks: list[list[int]]) -> float:
        import torch

        @torch.no_grad()
        def score(ids):
            logits = self.model(input_ids=torch.tensor([ids], device=self.model.device)).logits[0].float()
            return torch.log_softmax(logits, -1).cpu().numpy()

        return perplexity_from_scores(blocks, score)

    def continuation_logprobs(self, sequences: list[tuple[list[int], int]]) -> list[float]:
        """Mean log-probability of the tokens ids[start:] after ids[:start], per (ids, start)."""
        import torch

        out = []
        with torch.no_grad():
            for ids, start in sequences:
                kept = len(ids) - start + 1  # the logits that predict the continuation, not the whole prompt's
                logits = self.model(input_ids=torch.tensor([ids], device=self.model.device), logits_to_keep=kept).logits[0, :-1]
                rows = torch.log_softmax(logits.float(), -1)
                out.append(float(rows.gather(1, torch.tensor(ids[start:], device=rows.device)[:, None]).mean()))
        return out

    def close(self) -> None:
        del self.model


@contextmanager
def llama_cpp_safe_defaults():
    """While active, llama.cpp models load with its extra CPU buffer types (AMX, weight repacking) off on AMX CPUs:
    there a source build of llama-cpp-python 0.3.36 segfaults in quantized matmuls through them. No-op elsewhere."""
    try:
        import llama_cpp.llama_cpp as bindings  # what llama_cpp.Llama calls
    except ImportError:
        raise RuntimeUnavailable(
            "running a GGUF file needs llama-cpp-python (pip install 'doctune[serve]'), which is not installed"
        ) from None
    if not cpu_has_amx():
        yield
        return
    default = bindings.llama_model_default_params

    def params():
        value = default()
        value.use_extra_bufts = False
        return value

    bindings.llama_model_default_params = params  # neither Llama() nor the server has an option for it
    try:
        yield
    finally:
        bindings.llama_model_default_params = default


class LlamaCppRuntime:
    """A GGUF file in llama.cpp (llama-cpp-python), with the chat template the file carries.

    Decoding uses every core this process may run on (llama-cpp-python defaults to half of them); logits for every
    position, which perplexity needs and nothing else does, come from a second context opened only for it."""

    def __init__(self, path: Path, n_ctx: int = 2048, chat: bool = True):
        """`chat=False`: a scorer only (perplexity, continuation log-probabilities): its contexts open on first use."""
        started = time.perf_counter()
        self.path, self.n_ctx = path, n_ctx
        self.scorer = None
        self.llm = self._open(logits_all=False) if chat else None
        self.load_s = time.perf_counter() - started

    def _decoding(self):
        """The context that answers and scores continuations (logits of the last position only)."""
        if self.llm is None:
            self.llm = self._open(logits_all=False)
        return self.llm

    def _scoring(self):
        """The context with logits at every position: opened on first use, kept until close()."""
        if self.scorer is None:
            self.scorer = self._open(logits_all=True)
        return self.scorer

    def _open(self, logits_all: bool):
        with llama_cpp_safe_defaults():
            from llama_cpp import Llama

            threads = usable_cpus()
            return Llama(
                str(self.path), n_ctx=self.n_ctx, logits_all=logits_all, n_threads=threads, n_threads_batch=threads,
                verbose=False, seed=0,
            )  # fmt: skip

    def chat(
        self, conversations: list[list[dict]], max_tokens: int, continuations: list[tuple[list[int], int]] | None = None
    ) -> list[Reply]:
        """Greedy replies with the file's chat template; `continuations` as for TransformersRuntime.chat, each
        scored after its reply, on the prompt's cache."""
        replies = []
        for n, messages in enumerate(conversations):
            self.llm.reset()
            started = time.perf_counter()
            answer = self.llm.create_chat_completion(messages, max_tokens=max_tokens, temperature=0.0, top_k=1, seed=0)
            seconds = time.perf_counter() - started
            scored = self._continuation_on_cache(*continuations[n]) if continuations is not None else None
            text = answer["choices"][0]["message"]["content"] or ""
            replies.append(Reply(text.strip(), answer["usage"]["completion_tokens"], seconds, scored))
        return replies

    def _continuation_on_cache(self, ids: list[int], start: int, keep_prefix: bool = True) -> float:
        """Mean log-probability of ids[start:] in the decoding context, going on from the longest prefix of `ids` it
        holds with `keep_prefix` (after chat: the prompt it just answered). The tail is decoded one token at a time and the last
        position's logits read after each: a few decode steps instead of encoding the prompt again with logits at
        every position. On q8_0 the batched and the one-token kernels differ by up to ~0.7 in a token's
        log-probability, so the gate and serving both score here."""
        import llama_cpp
        import numpy as np

        llm = self._decoding()
        held = llm.input_ids[: llm.n_tokens].tolist() if keep_prefix else []
        common = next((i for i, (a, b) in enumerate(zip(held, ids[: start - 1])) if a != b), min(len(held), start - 1))
        # A recurrent or hybrid model's state cannot be cut back to a prefix: it starts afresh.
        if common == 0 or llm._is_recurrent or llm._is_hybrid or not llm._ctx.kv_cache_seq_rm(-1, common, -1):
            llm.reset()
            common = 0
        llm.n_tokens = common
        if start - 1 > common:
            llm.eval(ids[common : start - 1])
        total = 0.0
        for position in range(start - 1, len(ids) - 1):
            llm.eval([ids[position]])
            logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(llm.n_vocab(),))
            total += float(log_softmax(logits[None, :])[0, ids[position + 1]])
        return total / (len(ids) - start)

    def perplexity(self, blocks: list[list[int]]) -> float:
        scorer = self._scoring()

        def score(ids):
            scorer.reset()
            scorer.eval(ids)
            return log_softmax(scorer.scores[: len(ids)])

        return perplexity_from_scores(blocks, score)

    def continuation_logprobs(self, sequences: list[tuple[list[int], int]]) -> list[float]:
        """Mean log-probability of the tokens ids[start:] after ids[:start], per (ids, start), computed as chat
        computes it for a reply just given (so a threshold the gate calibrates holds where serving scores), each
        from a fresh context: the prompt in one batch, as chat encodes it, whatever the last request was."""
        return [self._continuation_on_cache(ids, start, keep_prefix=False) for ids, start in sequences]

    def close(self) -> None:
        for context in (self.llm, self.scorer):
            if context is not None:
                context.close()


def open_runtime(folder: Path, batch_size: int = 8, n_ctx: int = 2048, precision: str = "fp32"):
    """The runtime for a model folder: its GGUF file when it holds one, else transformers with its weights in
    `precision` (fp32 or bf16; a bitsandbytes checkpoint keeps its own)."""
    ggufs = sorted(Path(folder).glob("*.gguf"))
    if ggufs:
        return LlamaCppRuntime(ggufs[0], n_ctx=n_ctx)
    quantized = "quantization_config" in (Path(folder) / "config.json").read_text()
    dtype = {} if quantized else {"dtype": torch_dtype(precision)}
    return TransformersRuntime(folder, batch_size=batch_size, **dtype)
