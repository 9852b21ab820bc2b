"""Deterministic, cheap stand-ins for a language model: token counts, generated
text, token ids and embeddings, all derived from a hash of the input.

The same prompt, model and seed always give the same output, so tests can assert
on exact text; a different seed gives a different (but again stable) output.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = [
    "WORDS",
    "count_tokens",
    "embedding",
    "generation_rng",
    "json_tokens",
    "natural_length",
    "text_tokens",
    "token_ids",
    "truncate_embedding",
]

_WORD_TEXT = """
    the of and to in is that for it as with was on be by this are from at or an have
    not which but they one all were there their been has more when will would what so
    if can out about up into than them only other new some time could these two may
    first then do any like now over such our also after most made many before must
    through back years where much your way well down should because each just those
    people how too little state good very make world still own see men work long get
    here between both life being under never day same another know while last might
    us great old year off come since against go came right used take three light sky
    blue river stone signal model queue token answer system network memory cloud
    garden morning silver window harbor engine little quiet bright simple careful
"""
WORDS: tuple[str, ...] = tuple(dict.fromkeys(_WORD_TEXT.split()))  # unique, ordered

_VOCAB = 128_000  # token ids stay in a Llama-3-sized vocabulary


def _seed_int(*parts: object) -> int:
    digest = hashlib.blake2b("\x1f".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def generation_rng(key: str, seed: int) -> random.Random:
    """A PRNG fully determined by the request key and seed."""
    return random.Random(_seed_int("gen", key, seed))


def count_tokens(text: str) -> int:
    """Rough tokenizer: about four characters per token, at least one for non-empty text."""
    if not text:
        return 0
    return max(1, (len(text) + 3) // 4)


def natural_length(key: str, seed: int, lo: int, hi: int) -> int:
    """How many tokens the "model" wants to say before it stops by itself."""
    lo, hi = max(0, lo), max(lo, hi)
    return random.Random(_seed_int("len", key, seed)).randint(lo, hi)


def text_tokens(key: str, seed: int, n: int) -> list[str]:
    """``n`` word tokens; sentences start capitalised and end with a period."""
    rng = generation_rng(key, seed)
    out: list[str] = []
    sentence_left = rng.randint(5, 14)
    start = True
    for i in range(n):
        word = rng.choice(WORDS)
        if start:
            word = word.capitalize()
            start = False
        sentence_left -= 1
        if sentence_left == 0 or i == n - 1:
            word += "."
            sentence_left = rng.randint(5, 14)
            start = True
        out.append(word if i == 0 else " " + word)
    return out


def _value_for(schema: Mapping[str, Any], rng: random.Random) -> Any:
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "string")
    if "enum" in schema and isinstance(schema["enum"], list) and schema["enum"]:
        return rng.choice(schema["enum"])
    if kind == "integer":
        return rng.randint(0, 100)
    if kind == "number":
        return round(rng.uniform(0, 100), 2)
    if kind == "boolean":
        return rng.random() < 0.5
    if kind == "array":
        items = schema.get("items")
        if isinstance(items, Mapping):
            return [_value_for(items, rng) for _ in range(rng.randint(1, 3))]
        return []
    if kind == "object":
        props = schema.get("properties")
        if isinstance(props, Mapping):
            return {k: _value_for(v, rng) for k, v in props.items() if isinstance(v, Mapping)}
        return {}
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 4)))


def json_tokens(key: str, seed: int, fmt: object) -> list[str]:
    """Structured output: a JSON document (matching a JSON schema if one is given),
    split into pieces the way a model would stream it."""
    rng = generation_rng(key, seed)
    if isinstance(fmt, Mapping) and fmt.get("type") == "object":
        value = _value_for(fmt, rng)
    else:
        value = {"response": " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 8)))}
    text = json.dumps(value)
    pieces: list[str] = []
    current = ""
    for ch in text:
        current += ch
        if ch in " ,:{}[]" or len(current) >= 6:
            pieces.append(current)
            current = ""
    if current:
        pieces.append(current)
    return pieces


def token_ids(text: str, seed: int = 0) -> list[int]:
    """Stable pseudo token ids for ``text`` (``context`` of /api/generate)."""
    n = count_tokens(text)
    chunk = max(1, math.ceil(len(text) / n)) if n else 1
    return [_seed_int("tok", text[i * chunk : (i + 1) * chunk], seed) % _VOCAB for i in range(n)]


def embedding(text: str, dim: int, seed: int = 0) -> list[float]:
    """A unit-length vector derived from ``text``; identical texts embed identically."""
    rng = random.Random(_seed_int("emb", text, seed))
    vec = [rng.gauss(0.0, 1.0) for _ in range(dim)]
    norm = math.sqrt(sum(v * v for v in vec)) or 1.0
    return [v / norm for v in vec]


def truncate_embedding(vec: Sequence[float], dims: int) -> list[float]:
    """Ollama's ``dimensions``: keep the first ``dims`` values and re-normalise."""
    head = list(vec[:dims])
    norm = math.sqrt(sum(v * v for v in head)) or 1.0
    return [v / norm for v in head]
