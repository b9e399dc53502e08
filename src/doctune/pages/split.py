"""Train / validation / test by document: each document's pages on one side only.

Documents are ordered by the sha256 of (seed, name) and cut by the configured shares, so the split depends on the
seed and the set of names only. With three documents or more, test gets at least one (and validation one, from four
documents, when its share is above zero). One or two documents cannot be split that way: their pages are split
instead, the same way, and the report says so.
"""

from __future__ import annotations

import hashlib

SPLITS = ("train", "validation", "test")


def _order(keys: list[str], seed: int) -> list[str]:
    return sorted(keys, key=lambda key: (hashlib.sha256(f"{seed}\0{key}".encode()).hexdigest(), key))


def counts(n: int, train: float, validation: float) -> tuple[int, int, int]:
    """How many of n items go to train, validation and test."""
    n_validation = round(n * validation)
    n_test = n - round(n * train) - n_validation
    if n >= 3 and n_test < 1:
        n_test = 1
    if n >= 4 and validation > 0 and n_validation < 1:
        n_validation = 1
    n_train = n - n_validation - n_test
    while n_train < 1 and n > 0:  # training needs something: take it back from validation, then test
        if n_validation > 0:
            n_validation -= 1
        else:
            n_test -= 1
        n_train += 1
    return n_train, n_validation, n_test


def assign(keys: list[str], train: float, validation: float, seed: int) -> dict[str, str]:
    """key -> split name."""
    ordered = _order(sorted(set(keys)), seed)
    n_train, n_validation, _ = counts(len(ordered), train, validation)
    result = {}
    for position, key in enumerate(ordered):
        result[key] = "train" if position < n_train else "validation" if position < n_train + n_validation else "test"
    return result


def split_pages(pages: list[tuple[str, int]], train: float, validation: float, seed: int) -> tuple[dict, str]:
    """(document, page) -> split, and the mode: "document" with three documents or more, else "page"."""
    documents = sorted({document for document, _ in pages})
    if len(documents) >= 3:
        by_document = assign(documents, train, validation, seed)
        return {key: by_document[key[0]] for key in pages}, "document"
    names = {f"{document}#p{page}": (document, page) for document, page in pages}
    by_page = assign(list(names), train, validation, seed)
    return {names[name]: side for name, side in by_page.items()}, "page"
