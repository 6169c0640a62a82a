"""ReCoRD for fms-dyt's zero-shot evaluation, with its own SQuAD-style exact match and F1.

lm-eval 0.4.13's built-in ``record`` task imports ``transformers.data.metrics.squad_metrics``,
which transformers 5 removed, so the task cannot even be loaded. This module gives the same task
(same prompt, same choices, same per-example scoring) with the two metrics written here.
"""

from __future__ import annotations

import re
import string
from collections import Counter

_PUNCTUATION = frozenset(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)


def doc_to_text(doc: dict) -> str:
    """The news passage, then its highlights as a bulleted list."""
    article, *highlights = doc["passage"].strip().split("\n@highlight\n")
    return article + "\n\n" + "".join(f"  - {h}.\n" for h in highlights)


def _fill(query: str, entity: str) -> str:
    return f"  - {query}".replace("@placeholder", entity)


def doc_to_target(doc: dict) -> str:
    # Several answers may be correct; the first one stands as the target string.
    return _fill(doc["query"], doc["answers"][0])


def doc_to_choice(doc: dict) -> list[str]:
    return [_fill(doc["query"], entity) for entity in doc["entities"]]


def process_docs(dataset):
    """Deduplicate and sort entities and answers (they repeat when an entity occurs twice)."""

    def dedup(doc: dict) -> dict:
        return {
            "passage": doc["passage"],
            "query": doc["query"],
            "entities": sorted(set(doc["entities"])),
            "answers": sorted(set(doc["answers"])),
        }

    return dataset.map(dedup)


def normalize_answer(text: str) -> str:
    """SQuAD normalisation: lower case, no punctuation, no English articles, single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, gold: str) -> int:
    return int(normalize_answer(prediction) == normalize_answer(gold))


def token_f1(prediction: str, gold: str) -> float:
    """Harmonic mean of token precision and recall after normalisation."""
    pred_tokens = normalize_answer(prediction).split()
    gold_tokens = normalize_answer(gold).split()
    if not pred_tokens or not gold_tokens:
        # An empty side scores 1 only when both are empty.
        return float(pred_tokens == gold_tokens)
    overlap = sum((Counter(pred_tokens) & Counter(gold_tokens)).values())
    if overlap == 0:
        return 0.0
    precision, recall = overlap / len(pred_tokens), overlap / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def process_results(doc: dict, results: list) -> dict:
    """Score the most likely entity against every correct answer, keeping the best match."""
    loglikelihoods = [ll for ll, _ in results]
    prediction = doc["entities"][max(range(len(loglikelihoods)), key=loglikelihoods.__getitem__)]
    return {
        "f1": max(token_f1(prediction, gold) for gold in doc["answers"]),
        "em": max(exact_match(prediction, gold) for gold in doc["answers"]),
    }
