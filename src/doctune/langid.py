"""The language of a text, as ingest records it per document and serving needs it per request (langdetect, seeded)."""

from __future__ import annotations

UNDETERMINED = "und"


def warm_up() -> None:
    """Load langdetect's language profiles once, before workers fork and inherit them."""
    from langdetect.detector_factory import init_factory

    init_factory()


def detect_language(text: str, sample_chars: int = 2000) -> str:
    """langdetect's code for the first `sample_chars` of `text` ("en", "fr", "zh-cn"), "und" when it cannot tell."""
    if not text.strip():
        return UNDETERMINED
    from langdetect import DetectorFactory, LangDetectException, detect

    DetectorFactory.seed = 0  # langdetect is randomized; fix it so reruns agree
    try:
        return detect(text[:sample_chars])
    except LangDetectException:
        return UNDETERMINED


def passages_language(langs: list[str | None], texts: list[str]) -> str:
    """The language most of a prompt's passages are in (the first one's on a tie): each passage's recorded language
    where it carries one (chunks do), else detected from its text."""
    found = [lang if lang and lang != UNDETERMINED else detect_language(text) for lang, text in zip(langs, texts)]
    return max(found, key=lambda lang: (found.count(lang), -found.index(lang))) if found else UNDETERMINED


def language_probabilities(text: str) -> dict[str, float]:
    """langdetect's languages for `text` with their probabilities (empty when it cannot tell)."""
    if not text.strip():
        return {}
    from langdetect import DetectorFactory, LangDetectException, detect_langs

    DetectorFactory.seed = 0
    try:
        return {found.lang: found.prob for found in detect_langs(text)}
    except LangDetectException:
        return {}
