"""Quality filters over generated QA. Each returns what it kept; the caller counts what it dropped."""

from __future__ import annotations

import re
from collections.abc import Callable

import numpy as np
from datasketch import MinHash, MinHashLSH

from doctune.synth.extractive import QA

_WORD = re.compile(r"\w+")


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def exact_dedup(items: list[QA]) -> list[QA]:
    seen: set[tuple[str, ...]] = set()
    kept = []
    for qa in items:
        key = (*words(qa.question), "||", *words(qa.answer))
        if key not in seen:
            seen.add(key)
            kept.append(qa)
    return kept


def minhash_dedup(items: list[QA], threshold: float, permutations: int, seed: int = 1) -> list[QA]:
    """Drop near-duplicates by Jaccard similarity of word 3-gram shingles of question and answer."""
    lsh = MinHashLSH(threshold=threshold, num_perm=permutations)
    kept = []
    for i, qa in enumerate(items):
        tokens = [*words(qa.question), "||", *words(qa.answer)]
        shingles = {" ".join(tokens[j : j + 3]).encode() for j in range(max(1, len(tokens) - 2))}
        signature = MinHash(num_perm=permutations, seed=seed)
        signature.update_batch(list(shingles))
        if lsh.query(signature):
            continue
        lsh.insert(str(i), signature)
        kept.append(qa)
    return kept


def embedding_dedup(items: list[QA], vectors: np.ndarray, threshold: float, seed: int = 1) -> list[QA]:
    """Drop questions whose embedding is within `threshold` cosine of a kept one.

    Candidates come from random-hyperplane LSH (several tables of sign bits), so the work grows near-linearly;
    each candidate pair is then checked exactly.
    """
    if len(items) == 0:
        return []
    rng = np.random.default_rng(seed)
    tables, bits = 8, 10
    planes = rng.standard_normal((tables, bits, vectors.shape[1])).astype(np.float32)
    codes = ((np.einsum("tbd,nd->tnb", planes, vectors) > 0) * (1 << np.arange(bits))).sum(axis=2)  # (tables, n)
    buckets: list[dict[int, list[int]]] = [{} for _ in range(tables)]
    kept_idx: list[int] = []
    for i in range(len(items)):
        candidates = {j for t in range(tables) for j in buckets[t].get(int(codes[t, i]), ())}
        if candidates:
            idx = np.fromiter(candidates, dtype=np.int64)
            if float((vectors[idx] @ vectors[i]).max()) >= threshold:
                continue
        kept_idx.append(i)
        for t in range(tables):
            buckets[t].setdefault(int(codes[t, i]), []).append(i)
    return [items[i] for i in kept_idx]


def length_filter(items: list[QA]) -> list[QA]:
    """Drop empty or truncated answers and the longest 1% of questions and of answers (outliers)."""
    if not items:
        return []
    q_cap = np.percentile([len(qa.question) for qa in items], 99)
    a_cap = np.percentile([len(qa.answer) for qa in items], 99)
    return [
        qa
        for qa in items
        if qa.answer.strip()
        and not qa.answer.rstrip().endswith(("...", "…"))
        and len(qa.question) <= q_cap
        and len(qa.answer) <= a_cap
    ]


def leakage_filter(items: list[QA]) -> list[QA]:
    """Drop items whose question already states the answer."""
    kept = []
    for qa in items:
        answer, question = words(qa.answer), words(qa.question)
        joined_a, joined_q = " ".join(answer), " ".join(question)
        if answer and joined_a in joined_q:
            continue
        if len(answer) >= 4 and sum(w in set(question) for w in answer) >= 0.8 * len(answer):
            continue
        kept.append(qa)
    return kept


def language_filter(items: list[QA], chunk_lang: Callable[[str], str], languages: list[str] | None) -> list[QA]:
    """Items of documents in `languages` (None: every language)."""
    return [qa for qa in items if languages is None or chunk_lang(qa.chunk_id) in languages]


def answer_language_filter(
    items: list[QA],
    chunk_lang: Callable[[str], str],
    probabilities: Callable[[str], dict[str, float]],
    function_words: dict[str, frozenset[str]],
) -> list[QA]:
    """Drop answers in another language than their question, which is asked in its document's: a Spanish manual's
    untranslated English paragraph. Only prose is judged: the detector must be sure (p >= 0.9) of another language
    the teacher writes (a key of `function_words`), on an answer of five words or more that holds at least two of
    that language's function words and more of them than of its question's. Names and lists of field names
    ("Source, Section, Priority, Maintainer") fool the detector and hold none."""
    kept = []
    for qa in items:
        lang, answer = chunk_lang(qa.chunk_id), words(qa.answer)
        if lang in function_words and len(answer) >= 5:
            found = probabilities(qa.answer)
            top = max(found, key=found.get, default=lang)
            if top != lang and top in function_words and found[top] >= 0.9 and found.get(lang, 0.0) < 0.1:
                theirs = sum(w in function_words[top] for w in answer)
                if theirs >= 2 and theirs > sum(w in function_words[lang] for w in answer):
                    continue
        kept.append(qa)
    return kept


# A question whose subject is a pronoun names nothing once it leaves its passage ("What does it do?").
_PRONOUN_SUBJECT = re.compile(
    r"^(?:what|how|why|when|where|which|who)\s+(?:is|are|was|were|does|do|did|can|could|should|will|would|has|have)\s+"
    r"(?:it|this|that|they|these|those|he|she|them)\b"
    r"|^(?:que|qu'|comment|pourquoi|quand|où|quel|quelle)\s*(?:fait|est|sont|font|signifie)[- ](?:il|elle|ils|elles|cela"
    r"|ce(?! que| qu'))\b"  # "Qu'est-ce que X ?" names X
    r"|^(?:was|wie|warum|wann|wo|welche[rs]?)\s+(?:ist|sind|macht|tut|bedeutet|bewirkt)\s+(?:es|er|sie|dies|das)\b"
    r"(?!\s+(?-i:[A-ZÄÖÜ]))"  # "Was ist das Thema ...": an article before a noun
    r"|^¿?(?:qué|cómo|por qué|cuándo|dónde|cuál)\s+(?:es|son|hace|significa)\s+(?:esto|eso|él|ella|ello)\b",
    re.I,
)
# Fragments of markup or cloze blanks pasted into a question.
_QUESTION_MARKUP = re.compile(r"___|</?[a-z][\w:-]*[ >]|[{}]|=\s*[\"']|\.\s?\.\s?\.\s?\.")


def self_contained_filter(items: list[QA]) -> list[QA]:
    """Drop questions that name no subject (a pronoun where the subject goes) or carry markup or a blank."""
    return [qa for qa in items if not _PRONOUN_SUBJECT.search(qa.question.strip()) and not _QUESTION_MARKUP.search(qa.question)]


def answer_form_filter(items: list[QA]) -> list[QA]:
    """Drop answers a person would not accept as an answer: a bare number, a single token, under three words."""
    return [qa for qa in items if len(words(qa.answer)) >= 3 and not re.fullmatch(r"[\W\d_]*", qa.answer)]


def specific(items: list[QA], ranked: list[list[int]], holders: Callable[[QA], set[int]]) -> list[bool]:
    """Whether each question, alone as a retrieval query, finds a chunk that holds its answer among `ranked`
    (its top-k): a question that finds it not is too vague to be asked out of its passage."""
    return [bool(holders(qa) & set(top)) for qa, top in zip(items, ranked)]
