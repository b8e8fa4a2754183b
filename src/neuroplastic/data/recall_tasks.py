"""Synthetic recall tasks as text: needle-in-a-haystack and multi-query associative recall.

Both tasks come as *examples* (a prompt and the answer a model should continue it with,
for evaluation) and as *documents* (prompt + answer as one text, for training). Everything
is a pure function of the seed (or of the ``random.Random`` passed in).

Needle in a haystack (:func:`needle_example`, :func:`needle_documents`)
------------------------------------------------------------------------

A haystack of filler sentences (the synthetic curriculum's training documents by
default, or any text given) with the needle sentence ``"The secret key is 4821."``
inserted at a sentence boundary at relative depth ``depth`` (0 = before the first filler
sentence, 1 = after the last), then the query::

    <filler ...> The secret key is 4821. <filler ...>
    Question: What is the secret key?
    Answer: The secret key is

and the answer ``" 4821"`` (keys are random 4-digit numbers, 1000..9999). ``n_bytes`` is
the UTF-8 length of the whole example, prompt + answer: it never exceeds ``n_bytes`` and
falls short of it by at most a few bytes for the default filler (filler sentences are
chosen to fill the room), so with the byte tokenizer a ``n_bytes``-long example fits a
model whose ``block_size`` is ``n_bytes``. A training document is ``prompt + answer + "."``
(the data pipeline adds the end-of-text token after each document).

Multi-query associative recall, MQAR (:func:`mqar_example`, :func:`mqar_documents`)
-----------------------------------------------------------------------------------

``num_pairs`` distinct keys with their values, written ``key:value`` and separated by
spaces, then ``" |"``, then ``num_queries`` distinct keys of those pairs in random order,
each written ``" key?"`` and followed by ``" value"``::

    a3:7k b9:2x q0:m4 zz:81 | b9? 2x zz? 81

Keys and values are strings of ``key_len`` / ``value_len`` characters from ``a-z0-9``
(default 2 each). :func:`mqar_example` returns the context ``"a3:7k b9:2x q0:m4 zz:81 |"``
and the ``(key, value)`` pairs queried, in order; :func:`mqar_text` writes the document or
the prompt for the i-th query (the context plus the earlier queries with their right
answers, ending ``" key?"``); the expected continuation is ``" " + value``.
"""

from __future__ import annotations

import functools
import random
import re
import string
from collections.abc import Sequence

from neuroplastic.errors import UserError

__all__ = [
    "MQAR_ALPHABET",
    "NEEDLE_QUERY",
    "NEEDLE_TEMPLATE",
    "default_filler",
    "mqar_documents",
    "mqar_example",
    "mqar_text",
    "needle_documents",
    "needle_example",
    "NEEDLE_SUBJECTS",
    "multi_needle_document",
    "needle_query",
    "needle_sentence",
    "random_key",
]

NEEDLE_TEMPLATE = "The secret key is {key}."
NEEDLE_QUERY = "\nQuestion: What is the secret key?\nAnswer: The secret key is"
MQAR_ALPHABET = string.ascii_lowercase + string.digits

# Filler sentences longer than this are cut at spaces, so that a needle can sit close to
# any depth and the haystack can be filled close to its length.
_MAX_UNIT = 160
# How many following sentences to try when topping the haystack up to its length.
_TOPUP_TRIES = 200

Filler = str | Sequence[str] | None


# =========================================================================== helpers


def _rng(rng: random.Random | int | None) -> random.Random:
    if isinstance(rng, random.Random):
        return rng
    if rng is None:
        return random.Random(0)
    if isinstance(rng, bool) or not isinstance(rng, int):
        raise UserError(f"rng must be a random.Random or an integer seed, got {rng!r}.")
    return random.Random(rng)


def _check_int(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise UserError(f"{name} must be an integer >= {minimum}, got {value!r}.")
    return value


def _nbytes(text: str) -> int:
    return len(text.encode("utf-8"))


def random_key(rng: random.Random) -> str:
    """A random 4-digit key, ``"1000"`` .. ``"9999"``."""
    return str(rng.randint(1000, 9999))


def needle_sentence(key: str | int) -> str:
    """``"The secret key is {key}."``"""
    return NEEDLE_TEMPLATE.format(key=key)


@functools.lru_cache(maxsize=1)
def default_filler() -> str:
    """The default haystack text: the synthetic curriculum's training documents (seed 0,
    all three stages), one per line."""
    from neuroplastic.data.synthetic import STAGES, SyntheticCurriculum

    cur = SyntheticCurriculum(seed=0)
    return "\n".join(d for s in STAGES for d in cur.documents(s))


_SENTENCE_END = re.compile(r"(?<=[.!?])[ \t]+|\n+")


def _split_long(sentence: str) -> list[str]:
    if len(sentence) <= _MAX_UNIT:
        return [sentence]
    out: list[str] = []
    words = sentence.split(" ")
    cur = ""
    for w in words:
        if cur and len(cur) + 1 + len(w) > _MAX_UNIT:
            out.append(cur)
            cur = w
        else:
            cur = f"{cur} {w}" if cur else w
    if cur:
        out.append(cur)
    return out


@functools.lru_cache(maxsize=8)
def _units(text: str) -> tuple[tuple[str, ...], tuple[int, ...]]:
    """Filler split into sentence units (each with its trailing separator, ``" "`` or
    ``"\\n"``) and their UTF-8 lengths. Units that mention a needle subject (:data:`NEEDLE_SUBJECTS`) are dropped."""
    units: list[str] = []
    pos = 0
    for m in _SENTENCE_END.finditer(text + "\n"):
        sentence = text[pos : m.start()].strip()
        sep = "\n" if "\n" in m.group() else " "
        pos = m.end()
        if not sentence or any(s in sentence.lower() for s in NEEDLE_SUBJECTS):
            continue
        pieces = _split_long(sentence)
        units.extend(p + " " for p in pieces[:-1])
        units.append(pieces[-1] + sep)
    return tuple(units), tuple(_nbytes(u) for u in units)


def _filler_text(filler: Filler) -> str:
    if filler is None:
        return default_filler()
    if isinstance(filler, str):
        return filler
    if isinstance(filler, Sequence) and all(isinstance(t, str) for t in filler):
        return "\n".join(filler)
    raise UserError(
        f"filler must be a text, a list of texts or None (the synthetic curriculum), "
        f"got {type(filler).__name__}."
    )


def _haystack(
    room: int, rng: random.Random, filler: Filler, inserts: Sequence[tuple[float, str]]
) -> list[str]:
    """Filler sentence units filling at most ``room`` bytes, with each ``(depth, text)`` of
    ``inserts`` put at the sentence boundary nearest ``depth`` of the filler's length (in
    the order given when two land on the same boundary)."""
    units, sizes = _units(_filler_text(filler))
    if not units:
        raise UserError("the needle filler has no text; give a non-empty filler.")

    # Take sentences from a random start, cycling, while they fit the room; then top up the
    # gap with later sentences short enough to fit (a filler sentence may be skipped).
    chosen: list[int] = []
    used = 0
    i = rng.randrange(len(units))
    skipped = 0
    while skipped < _TOPUP_TRIES and used < room:
        if used + sizes[i] <= room:
            chosen.append(i)
            used += sizes[i]
        else:
            skipped += 1
        i = (i + 1) % len(units)

    bounds = [0]
    for j in chosen:
        bounds.append(bounds[-1] + sizes[j])
    parts: list[list[str]] = [[units[j]] for j in chosen] + [[]]
    slots: list[list[str]] = [[] for _ in bounds]
    for depth, text in inserts:
        target = depth * used
        at = min(range(len(bounds)), key=lambda b: (abs(bounds[b] - target), b))
        slots[at].append(text)
    out: list[str] = []
    for slot, part in zip(slots, parts):
        out.extend(slot)
        out.extend(part)
    return out


# =========================================================================== needle


def needle_example(
    n_bytes: int,
    depth: float,
    key: str | int | None = None,
    rng: random.Random | int | None = None,
    filler: Filler = None,
) -> tuple[str, str]:
    """One needle-in-a-haystack example ``(prompt, answer)``; see the module docstring.

    ``n_bytes``: UTF-8 length of prompt + answer (an upper bound, filled up closely).
    ``depth``: where the needle goes, 0 (start of the haystack) .. 1 (end), at the sentence
    boundary nearest ``depth * haystack length``. ``key``: the digits to hide (default: a
    random 4-digit key from ``rng``). ``rng``: a ``random.Random`` or a seed (the filler's
    starting sentence and the key). ``filler``: the haystack text (default: the synthetic
    curriculum); shorter texts are cycled.
    """
    _check_int("n_bytes", n_bytes, 1)
    if isinstance(depth, bool) or not isinstance(depth, int | float) or not 0.0 <= depth <= 1.0:
        raise UserError(f"depth must be a number in [0, 1], got {depth!r}.")
    rng = _rng(rng)
    key = random_key(rng) if key is None else str(key)
    if not key.isdigit():
        raise UserError(f"the needle key must be digits, got {key!r}.")
    needle = needle_sentence(key) + " "
    answer = " " + key
    room = n_bytes - _nbytes(NEEDLE_QUERY) - _nbytes(answer) - _nbytes(needle)
    if room < 0:
        raise UserError(
            f"n_bytes={n_bytes} is too small for the needle and the question "
            f"({n_bytes - room} bytes); use at least {n_bytes - room}."
        )
    parts = _haystack(room, rng, filler, [(depth, needle)])
    haystack = "".join(parts).rstrip()
    return haystack + NEEDLE_QUERY, answer


def needle_documents(
    count: int = 1000,
    min_bytes: int = 256,
    max_bytes: int = 2048,
    seed: int = 0,
    filler: Filler = None,
) -> list[str]:
    """``count`` needle training documents, ``prompt + answer + "."``, each with a length drawn
    uniformly from ``[min_bytes, max_bytes]``, a uniform depth in [0, 1] and a random key."""
    _check_int("count", count, 0)
    _check_int("min_bytes", min_bytes, 1)
    _check_int("max_bytes", max_bytes, 1)
    if max_bytes < min_bytes:
        raise UserError(f"max_bytes ({max_bytes}) must be >= min_bytes ({min_bytes}).")
    rng = random.Random(f"neuroplastic-needle-train:{seed}")
    docs = []
    for _ in range(count):
        n = rng.randint(min_bytes, max_bytes)
        prompt, answer = needle_example(n - 1, rng.random(), rng=rng, filler=filler)
        docs.append(prompt + answer + ".")
    return docs


#: What multi-needle documents hide; "secret key" is the evaluation's needle. Several share
#: words ("key", "code", "number") so that recalling one needs more than the last word.
NEEDLE_SUBJECTS = (
    "secret key", "door code", "room number", "safe code", "ticket number", "locker number",
    "bus number", "house number", "gate code", "order number", "lucky number", "secret code",
    "train number", "key number", "phone code", "box number",
)


def needle_query(subject: str) -> str:
    """The question for a needle about ``subject``, ending ``"... The {subject} is"``."""
    return f"\nQuestion: What is the {subject}?\nAnswer: The {subject} is"


def multi_needle_document(
    n_bytes: int,
    num_needles: int,
    rng: random.Random | int | None = None,
    filler: Filler = None,
) -> tuple[str, list[tuple[int, int]]]:
    """A training document with ``num_needles`` needles about distinct subjects of
    :data:`NEEDLE_SUBJECTS` (``"The door code is 7730."``) at random depths of one haystack,
    then a question for each, in random order, answered as the evaluation expects::

        <filler> The door code is 7730. <filler> The secret key is 4821. <filler>
        Question: What is the secret key?
        Answer: The secret key is 4821.
        Question: What is the door code?
        Answer: The door code is 7730.

    Returns the document (at most ``n_bytes`` UTF-8 bytes) and the ``(start, end)`` byte
    offsets of each answer's ``" 4821"``: the positions that only recall can predict. Every
    question is a recall target, so a document teaches ``num_needles`` times what a
    single-needle document teaches."""
    _check_int("n_bytes", n_bytes, 1)
    _check_int("num_needles", num_needles, 1)
    if num_needles > len(NEEDLE_SUBJECTS):
        raise UserError(
            f"num_needles must be at most {len(NEEDLE_SUBJECTS)} (the distinct subjects), "
            f"got {num_needles}."
        )
    rng = _rng(rng)
    subjects = rng.sample(NEEDLE_SUBJECTS, num_needles)
    keys = [random_key(rng) for _ in subjects]
    needles = [f"The {s} is {k}. " for s, k in zip(subjects, keys)]
    order = rng.sample(range(num_needles), num_needles)
    questions = [(needle_query(subjects[j]), f" {keys[j]}", ".") for j in order]
    fixed = sum(_nbytes(n) for n in needles) + sum(_nbytes("".join(q)) for q in questions)
    room = n_bytes - fixed
    if room < 0:
        raise UserError(
            f"n_bytes={n_bytes} is too small for {num_needles} needles and their questions "
            f"({fixed} bytes); use at least {fixed}."
        )
    inserts = sorted((rng.random(), n) for n in needles)
    doc = "".join(_haystack(room, rng, filler, inserts)).rstrip()
    spans: list[tuple[int, int]] = []
    for query, answer, end in questions:
        doc += query
        start = _nbytes(doc)
        doc += answer + end
        spans.append((start, start + _nbytes(answer)))
    return doc, spans


# =========================================================================== MQAR


def _draw(rng: random.Random, length: int, avoid: set[str] | None = None) -> str:
    while True:
        s = "".join(rng.choice(MQAR_ALPHABET) for _ in range(length))
        if avoid is None or s not in avoid:
            return s


def mqar_example(
    num_pairs: int = 8,
    num_queries: int = 4,
    rng: random.Random | int | None = None,
    key_len: int = 2,
    value_len: int = 2,
) -> tuple[str, list[tuple[str, str]]]:
    """One MQAR example: the context ``"k1:v1 k2:v2 ... |"`` and the queried ``(key, value)``
    pairs in query order (distinct keys drawn from the context's pairs). Values may repeat;
    keys do not. Use :func:`mqar_text` for the document or the per-query prompts."""
    _check_int("num_pairs", num_pairs, 1)
    _check_int("num_queries", num_queries, 1)
    _check_int("key_len", key_len, 1)
    _check_int("value_len", value_len, 1)
    if num_queries > num_pairs:
        raise UserError(
            f"num_queries ({num_queries}) cannot exceed num_pairs ({num_pairs}): each query "
            "asks for a different key."
        )
    if len(MQAR_ALPHABET) ** key_len < num_pairs:
        raise UserError(
            f"key_len={key_len} gives fewer than num_pairs={num_pairs} distinct keys; "
            "raise key_len."
        )
    rng = _rng(rng)
    keys: list[str] = []
    seen: set[str] = set()
    for _ in range(num_pairs):
        k = _draw(rng, key_len, seen)
        seen.add(k)
        keys.append(k)
    values = [_draw(rng, value_len) for _ in keys]
    context = " ".join(f"{k}:{v}" for k, v in zip(keys, values)) + " |"
    asked = rng.sample(range(num_pairs), num_queries)
    return context, [(keys[j], values[j]) for j in asked]


def mqar_text(context: str, queries: Sequence[tuple[str, str]], upto: int | None = None) -> str:
    """The MQAR document ``context + " k? v" ...`` for all queries (``upto=None``), or the
    prompt for query ``upto``: the earlier queries with their answers, then ``" key?"``
    (its expected continuation is ``" " + value``)."""
    if upto is None:
        return context + "".join(f" {k}? {v}" for k, v in queries)
    if not 0 <= upto < len(queries):
        raise UserError(f"query index {upto} is out of range 0..{len(queries) - 1}.")
    done = "".join(f" {k}? {v}" for k, v in queries[:upto])
    return f"{context}{done} {queries[upto][0]}?"


def mqar_documents(
    count: int = 1000,
    num_pairs: int = 8,
    num_queries: int = 4,
    seed: int = 0,
    key_len: int = 2,
    value_len: int = 2,
) -> list[str]:
    """``count`` MQAR training documents (:func:`mqar_text` of :func:`mqar_example`)."""
    _check_int("count", count, 0)
    rng = random.Random(f"neuroplastic-mqar-train:{seed}")
    return [
        mqar_text(*mqar_example(num_pairs, num_queries, rng, key_len, value_len))
        for _ in range(count)
    ]
