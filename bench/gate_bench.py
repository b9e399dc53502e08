"""The gate's cost per RAG item: answering a prompt and scoring the abstention sentence as its reply (the
abstention bound's risk score), in one pass over the prompt against two (score, then answer: the baseline), in one
run, for the bundled SmolLM2-135M-Instruct in transformers (fp32, the merged model's runtime) and its GGUF in
llama.cpp (a gated variant's runtime). Prompts are two passages of the corpus's text and a question, as the gate
asks them; replies and scores of the two ways are compared too. Writes bench/results/gate.json and gate.md.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import pymupdf
from results_io import write_results

from doctune.chat import conversation, rag_user_message, reply_sequences
from doctune.models import bundled_gguf, resolve_model
from doctune.runtimes import LlamaCppRuntime, TransformersRuntime

REPO = Path(__file__).resolve().parents[1]
SYSTEM = "Answer from the numbered passages; say so when they do not hold the answer."
ABSTENTION = "I cannot answer that from the provided documentation."


def passages(pdfs: Path, words: int, count: int) -> list[str]:
    """`count` passages of `words` words from the corpus's text layer, in file and page order."""
    out = []
    for pdf in sorted(pdfs.glob("*.pdf")):
        with pymupdf.open(pdf) as document:
            text = " ".join(page.get_text() for page in document).split()
        out += [" ".join(text[i : i + words]) for i in range(0, len(text) - words, words)]
        if len(out) >= count:
            break
    return out[:count]


def conversations(pdfs: Path, items: int, words: int) -> list[list[dict]]:
    texts = passages(pdfs, words, 2 * items)
    return [
        conversation(rag_user_message(f"What does the documentation say about {texts[2 * i].split()[3]}?",
                                      [f"[1] {texts[2 * i]}", f"[2] {texts[2 * i + 1]}"]), SYSTEM)
        for i in range(items)
    ]  # fmt: skip


def compare(runtime, sequences, chats, max_new_tokens: int) -> dict:
    """Seconds of the baseline (scores, then replies) and of one pass, and how far their results differ."""
    started = time.perf_counter()
    scores = runtime.continuation_logprobs(sequences)
    replies = runtime.chat(chats, max_new_tokens)
    separate = time.perf_counter() - started
    started = time.perf_counter()
    shared = runtime.chat(chats, max_new_tokens, sequences)
    one_pass = time.perf_counter() - started
    return {
        "items": len(chats),
        "separate_s": round(separate, 1),
        "one_pass_s": round(one_pass, 1),
        "speedup": round(separate / one_pass, 2),
        "same_replies": sum(a.text == b.text for a, b in zip(replies, shared)),
        "max_score_difference": round(max(abs(s - r.continuation_logprob) for s, r in zip(scores, shared)), 5),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pdfs", type=Path, default=REPO.parent / "shared" / "corpus")
    parser.add_argument("--items", type=int, default=16)
    parser.add_argument("--words", type=int, default=250, help="words per passage (two per prompt)")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    args = parser.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    chats = conversations(args.pdfs, args.items, args.words)
    gguf = bundled_gguf("smollm2-135m-instruct")
    with tempfile.TemporaryDirectory(prefix="doctune-gate-bench-") as tmp:
        folder = resolve_model("bundled:smollm2-135m-instruct", Path(tmp))
        transformers_runtime = TransformersRuntime(folder, batch_size=args.batch_size)
        sequences = reply_sequences(transformers_runtime.tokenizer, chats, [ABSTENTION] * len(chats))
        prompt_tokens = sum(start for _, start in sequences) / len(sequences)
        try:
            runs = {"transformers fp32": compare(transformers_runtime, sequences, chats, args.max_new_tokens)}
        finally:
            transformers_runtime.close()
    llama = LlamaCppRuntime(gguf, n_ctx=4096)
    try:
        runs["llama.cpp GGUF (Q4_1)"] = compare(llama, sequences, chats, args.max_new_tokens)
    finally:
        llama.close()
    result = {"items": args.items, "prompt_tokens_mean": round(prompt_tokens), "max_new_tokens": args.max_new_tokens,
              "batch_size": args.batch_size, "runs": runs}  # fmt: skip
    lines = [
        f"{args.items} RAG prompts of {result['prompt_tokens_mean']} tokens on average, up to {args.max_new_tokens} "
        f"reply tokens; transformers in batches of {args.batch_size}.",
        "",
        "| runtime | score, then answer (s) | one pass (s) | speed-up | same replies | largest score difference |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    lines += [f"| {name} | {r['separate_s']} | {r['one_pass_s']} | {r['speedup']} | {r['same_replies']} of {r['items']} | "
              f"{r['max_score_difference']} |" for name, r in runs.items()]  # fmt: skip
    write_results(args.out, "gate", result, lines)


if __name__ == "__main__":
    main()
