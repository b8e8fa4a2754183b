"""Tokenizers: raw bytes, a byte-level BPE trained here, or GPT-2-style files from disk.

Every tokenizer has the same small interface (:class:`Tokenizer`):

* ``encode(text)`` / ``decode(ids)`` for text. ``encode`` adds no special tokens; a literal
  special-token string inside the text (``"<|endoftext|>"``) is read as that special token,
  exactly as ``transformers`` does, and ``decode`` drops special tokens. Invalid UTF-8 in the
  decoded bytes becomes U+FFFD.
* ``encode_bytes(data)`` / ``decode_bytes(ids)`` for raw bytes: an exact round trip for *any*
  bytes, including non-UTF-8 and bytes that spell a special token (those stay text here).
* ``encode_batch(texts)`` encodes many documents at once (parallel for the BPE kinds).
* ``save(directory)`` writes files that :func:`load_tokenizer` reads back. For the BPE kinds
  the directory also loads with ``transformers.AutoTokenizer.from_pretrained(directory)``
  and encodes identically.

Byte-level BPE round-trips arbitrary bytes because the ByteLevel alphabet (GPT-2's
bytes->unicode table) has one token per byte: ``encode_bytes`` tokenizes valid UTF-8 runs
normally and maps each invalid byte to the token of its ByteLevel character;
``decode_bytes`` maps every token back through the inverse table.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from neuroplastic.errors import UserError

__all__ = [
    "EOS_TOKEN",
    "PAD_TOKEN",
    "BPETokenizer",
    "ByteTokenizer",
    "HFTokenizer",
    "Tokenizer",
    "TransformersTokenizer",
    "as_tokenizer",
    "build_tokenizer",
    "bytes_to_unicode",
    "load_tokenizer",
]

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
META_FILE = "neuroplastic_tokenizer.json"
FORMAT_VERSION = 1

# Texts longer than this are cut (at safe places) into pieces that encode in parallel.
_CHUNK_CHARS = 1 << 16


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable unicode character table (the ByteLevel alphabet)."""
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


_BYTE_TO_CHAR = bytes_to_unicode()
_CHAR_TO_BYTE = {c: b for b, c in _BYTE_TO_CHAR.items()}


def _as_id_list(ids: Any) -> list[int]:
    """Token ids from a list, tuple, numpy array or (CPU/GPU) torch tensor, as Python ints."""
    if hasattr(ids, "detach"):  # torch.Tensor, without importing torch here
        ids = ids.detach().cpu().numpy()
    if isinstance(ids, np.ndarray):
        return ids.reshape(-1).astype(np.int64).tolist()
    return [int(i) for i in ids]


def _as_id_array(ids: Any) -> np.ndarray:
    if hasattr(ids, "detach"):
        ids = ids.detach().cpu().numpy()
    return np.asarray(ids, dtype=np.int64).reshape(-1)


class Tokenizer:
    """Base class. Subclasses set ``kind``, ``vocab_size``, ``eos_id`` and ``pad_id``."""

    kind: str = ""
    vocab_size: int = 0
    eos_id: int = 0
    pad_id: int = 0

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def decode(self, ids: Any) -> str:
        raise NotImplementedError

    def encode_bytes(self, data: bytes) -> list[int]:
        raise NotImplementedError

    def decode_bytes(self, ids: Any) -> bytes:
        raise NotImplementedError

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Encode many documents; same result as ``[self.encode(t) for t in texts]``."""
        return [self.encode(t) for t in texts]

    @property
    def prefix_id(self) -> int:
        """The token that stands in for an empty context: ``eos_id`` (no bos here)."""
        return self.eos_id

    def save(self, directory: str | Path) -> None:
        raise NotImplementedError

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return f"{type(self).__name__}(vocab_size={self.vocab_size}, eos_id={self.eos_id})"

    def _write_meta(self, directory: Path, **extra: Any) -> None:
        meta = {"kind": self.kind, "format_version": FORMAT_VERSION, "vocab_size": self.vocab_size}
        meta.update(extra)
        (directory / META_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")


class ByteTokenizer(Tokenizer):
    """One id per byte (0-255), then ``<|endoftext|>`` = 256 and ``<|pad|>`` = 257."""

    kind = "byte"
    vocab_size = 258
    eos_id = 256
    pad_id = 257
    special_tokens = {EOS_TOKEN: 256, PAD_TOKEN: 257}
    _SPECIAL_RE = re.compile("(" + "|".join(re.escape(t) for t in special_tokens) + ")")

    def encode(self, text: str) -> list[int]:
        if "<|" not in text:
            return self.encode_bytes(text.encode("utf-8", "surrogatepass"))
        ids: list[int] = []
        for i, part in enumerate(self._SPECIAL_RE.split(text)):
            if i % 2:  # odd parts are the captured special tokens
                ids.append(self.special_tokens[part])
            elif part:
                ids.extend(self.encode_bytes(part.encode("utf-8", "surrogatepass")))
        return ids

    def decode(self, ids: Any) -> str:
        arr = _as_id_array(ids)
        arr = arr[(arr >= 0) & (arr < 256)]  # drops specials (and ids outside the vocabulary)
        return arr.astype(np.uint8).tobytes().decode("utf-8", "replace")

    def encode_bytes(self, data: bytes) -> list[int]:
        return np.frombuffer(bytes(data), dtype=np.uint8).astype(np.int64).tolist()

    def decode_bytes(self, ids: Any) -> bytes:
        arr = _as_id_array(ids)
        if arr.size and (arr.min() < 0 or arr.max() >= self.vocab_size):
            bad = int(arr[(arr < 0) | (arr >= self.vocab_size)][0])
            raise ValueError(f"token id {bad} is outside the byte vocabulary (0..{self.vocab_size - 1})")
        return arr[arr < 256].astype(np.uint8).tobytes()

    def save(self, directory: str | Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self._write_meta(directory, eos_id=self.eos_id, pad_id=self.pad_id)


class _TokenizersBackend(Tokenizer):
    """Shared code for tokenizers backed by a Hugging Face ``tokenizers.Tokenizer``."""

    def __init__(self, tokenizer: Any, eos_token: str = EOS_TOKEN, pad_token: str | None = None):
        self._tk = tokenizer
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
        eos = tokenizer.token_to_id(eos_token)
        if eos is None:
            raise UserError(f"the tokenizer has no end-of-text token {eos_token!r}; add it to its vocabulary or name its eos_token in tokenizer_config.json")
        self.eos_token = eos_token
        self.eos_id = eos
        pad = tokenizer.token_to_id(pad_token) if pad_token else None
        self.pad_token = pad_token if pad is not None else eos_token
        self.pad_id = pad if pad is not None else eos
        added = tokenizer.get_added_tokens_decoder()
        self._special_ids = {i for i, t in added.items() if t.special}
        self.special_tokens = {t.content: i for i, t in added.items() if t.special}
        spec = tokenizer.to_str()
        # A twin that reads special-token strings as plain text, for the exact byte round trip.
        self._tk_plain = type(tokenizer).from_str(spec)
        self._tk_plain.encode_special_tokens = True
        self._byte_ids = self._find_byte_ids()
        self._chunkable = self._can_chunk(json.loads(spec), added)
        self._id_bytes: list[bytes] | None = None

    # -- structure checks -------------------------------------------------------------------
    def _find_byte_ids(self) -> list[int] | None:
        """Token id of each byte's ByteLevel character, or None when not byte-level."""
        ids = [self._tk.token_to_id(_BYTE_TO_CHAR[b]) for b in range(256)]
        return None if any(i is None for i in ids) else ids

    @staticmethod
    def _can_chunk(spec: dict, added: dict) -> bool:
        """Whether cutting long text after a newline between non-spaces leaves the ids unchanged.

        True for GPT-2's ByteLevel pre-tokenizer (regex pieces never span such a newline and the
        lookahead at a cut sees the same result) without normalizer or stripping added tokens.
        """
        pre = spec.get("pre_tokenizer") or {}
        if spec.get("normalizer") is not None or pre.get("type") != "ByteLevel":
            return False
        if pre.get("add_prefix_space") or not pre.get("use_regex", True):
            return False
        return not any(t.lstrip or t.rstrip or t.single_word or "\n" in t.content for t in added.values())

    @property
    def byte_level(self) -> bool:
        return self._byte_ids is not None

    # -- text -------------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        return self._encode(self._tk, text)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        texts = list(texts)
        try:
            return [e.ids for e in self._tk.encode_batch(texts, add_special_tokens=False)]
        except TypeError:  # a text with lone surrogates; encode one by one
            return [self.encode(t) for t in texts]

    def _encode(self, tk: Any, text: str) -> list[int]:
        try:
            if len(text) <= _CHUNK_CHARS or not self._chunkable:
                return tk.encode(text, add_special_tokens=False).ids
            ids: list[int] = []
            for enc in tk.encode_batch(_safe_chunks(text, _CHUNK_CHARS), add_special_tokens=False):
                ids.extend(enc.ids)
            return ids
        except TypeError:
            # Lone surrogates cannot cross into Rust; encode their (surrogatepass) bytes instead.
            return self.encode_bytes(text.encode("utf-8", "surrogatepass"))

    def decode(self, ids: Any) -> str:
        ids = [i for i in _as_id_list(ids) if 0 <= i < self.vocab_size]
        return self._tk.decode(ids, skip_special_tokens=True)

    # -- bytes ------------------------------------------------------------------------------
    def encode_bytes(self, data: bytes) -> list[int]:
        data = bytes(data)
        try:
            return self._encode(self._tk_plain, data.decode("utf-8"))
        except UnicodeDecodeError:
            pass
        if self._byte_ids is None:
            raise ValueError("this tokenizer is not byte-level, so it cannot encode bytes that are not valid UTF-8")
        text = data.decode("utf-8", "surrogateescape")  # invalid bytes -> U+DC80..U+DCFF
        ids: list[int] = []
        for i, part in enumerate(_SURROGATE_RUNS.split(text)):
            if not part:
                continue
            if i % 2:
                ids.extend(self._byte_ids[b] for b in part.encode("utf-8", "surrogateescape"))
            else:
                ids.extend(self._encode(self._tk_plain, part))
        return ids

    def decode_bytes(self, ids: Any) -> bytes:
        table = self._id_to_bytes()
        ids = _as_id_list(ids)
        if ids and (min(ids) < 0 or max(ids) >= len(table)):
            bad = next(i for i in ids if not 0 <= i < len(table))
            raise ValueError(f"token id {bad} is outside the vocabulary (0..{len(table) - 1})")
        return b"".join([table[i] for i in ids])

    def _id_to_bytes(self) -> list[bytes]:
        """Bytes of every token id, as the ByteLevel decoder produces them (specials -> b"")."""
        if self._id_bytes is None:
            table = []
            for i in range(self.vocab_size):
                tok = self._tk.id_to_token(i)
                if tok is None or i in self._special_ids:
                    table.append(b"")
                elif self._byte_ids is not None and all(c in _CHAR_TO_BYTE for c in tok):
                    table.append(bytes(_CHAR_TO_BYTE[c] for c in tok))
                elif self._byte_ids is not None:
                    table.append(tok.encode("utf-8"))  # an added token kept as raw text
                else:
                    table.append(self._tk.decode([i], skip_special_tokens=True).encode("utf-8"))
            self._id_bytes = table
        return self._id_bytes

    # -- files ------------------------------------------------------------------------------
    def _save_files(self, directory: Path) -> None:
        self._tk.save(str(directory / "tokenizer.json"))
        specials = {"eos_token": self.eos_token, "bos_token": self.eos_token, "pad_token": self.pad_token}
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            **specials,
            "model_max_length": 1_000_000_000,
            "clean_up_tokenization_spaces": False,
            "add_prefix_space": False,
        }
        (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        (directory / "special_tokens_map.json").write_text(json.dumps(specials, indent=2) + "\n", encoding="utf-8")


_SURROGATE_RUNS = re.compile("([\udc80-\udcff]+)")
_SAFE_CUT = re.compile(r"(?<=\S\n)(?=\S)")


def _safe_chunks(text: str, size: int) -> list[str]:
    """Cut ``text`` into pieces of about ``size`` chars, only right after a newline that sits
    between two non-space characters (a place where byte-level BPE pieces always break)."""
    chunks = []
    start = 0
    n = len(text)
    while n - start > size:
        m = _SAFE_CUT.search(text, start + size)
        if m is None:
            break
        chunks.append(text[start : m.start()])
        start = m.start()
    chunks.append(text[start:])
    return chunks


class BPETokenizer(_TokenizersBackend):
    """Byte-level BPE (GPT-2 style) trained with Hugging Face ``tokenizers``.

    Special tokens: ``<|endoftext|>`` = 0 (eos, the document separator), ``<|pad|>`` = 1.
    """

    kind = "bpe"

    def __init__(self, tokenizer: Any):
        super().__init__(tokenizer, eos_token=EOS_TOKEN, pad_token=PAD_TOKEN)

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int = 2048, min_frequency: int = 2) -> BPETokenizer:
        from tokenizers import Tokenizer as HFTok
        from tokenizers import decoders, models, pre_tokenizers, trainers

        if vocab_size < 258:
            raise UserError(f"the BPE vocab_size must be at least 258 (256 bytes + 2 special tokens), got {vocab_size}; raise it")
        tk = HFTok(models.BPE())
        tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tk.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=min_frequency,
            special_tokens=[EOS_TOKEN, PAD_TOKEN],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        seen = {"chars": 0, "docs": 0}

        def counted() -> Iterable[str]:
            for t in texts:
                seen["chars"] += len(t)
                seen["docs"] += 1
                yield t

        tk.train_from_iterator(counted(), trainer=trainer)
        got = tk.get_vocab_size(with_added_tokens=True)
        if got < vocab_size:
            from neuroplastic.data.sources import warn_data

            warn_data(
                f"the BPE tokenizer has {got:,} tokens, not the {vocab_size:,} asked for: its training text "
                f"({seen['chars']:,} characters in {seen['docs']:,} document{'s' if seen['docs'] != 1 else ''}) is too small to hold more merges "
                f"that occur at least {min_frequency} times; give it more text, or ask for a vocabulary of "
                f"{got:,} or less (data.bpe_vocab_size / --bpe-vocab-size) to silence this"
            )
        return cls(tk)

    @classmethod
    def from_file(cls, path: str | Path) -> BPETokenizer:
        return cls(_read_tokenizer_json(Path(path)))

    def save(self, directory: str | Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self._save_files(directory)
        self._write_meta(directory, eos_id=self.eos_id, pad_id=self.pad_id)


class HFTokenizer(_TokenizersBackend):
    """A pretrained GPT-2-style tokenizer from local files.

    ``path`` is a directory with ``tokenizer.json`` (or ``vocab.json`` + ``merges.txt``), or a
    ``tokenizer.json`` file. The end-of-text token comes from ``tokenizer_config.json`` or
    ``special_tokens_map.json`` (``eos_token``), else ``<|endoftext|>``.
    """

    kind = "hf"

    def __init__(self, path: str | Path):
        path = Path(path)
        self.path = path
        directory = path if path.is_dir() else path.parent
        config = _read_json_if(directory / "tokenizer_config.json")
        smap = _read_json_if(directory / "special_tokens_map.json")
        eos = _token_content(config.get("eos_token")) or _token_content(smap.get("eos_token"))
        pad = _token_content(config.get("pad_token")) or _token_content(smap.get("pad_token"))
        if path.is_file():
            tk = _read_tokenizer_json(path)
        elif (path / "tokenizer.json").is_file():
            tk = _read_tokenizer_json(path / "tokenizer.json")
        elif (path / "vocab.json").is_file() and (path / "merges.txt").is_file():
            tk = _gpt2_from_vocab_merges(path / "vocab.json", path / "merges.txt", eos or EOS_TOKEN)
        else:
            raise UserError(f"no tokenizer files in {path}; it needs tokenizer.json, or vocab.json and merges.txt")
        self._source_dir = directory
        super().__init__(tk, eos_token=eos or EOS_TOKEN, pad_token=pad)

    def save(self, directory: str | Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self._save_files(directory)
        for name in ("tokenizer_config.json", "special_tokens_map.json"):
            src = self._source_dir / name
            if src.is_file() and src.resolve() != (directory / name).resolve():
                shutil.copyfile(src, directory / name)  # keep the original (chat template, ...)
        self._write_meta(directory, eos_id=self.eos_id, pad_id=self.pad_id)


class TransformersTokenizer:
    """A ``transformers`` tokenizer behind our tokenizer interface
    (:class:`~neuroplastic.models.api.TokenizerAdapter`): ``encode`` adds no special
    tokens, ``decode`` drops them (and every ``eos_id``); ``pad_id`` is the pad token, else
    eos, else bos, else 0; ``prefix_id`` bos, else eos, else 0. The wrapped tokenizer is
    ``.tokenizer``."""

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        eos = getattr(tokenizer, "eos_token_id", None)
        bos = getattr(tokenizer, "bos_token_id", None)
        pad = getattr(tokenizer, "pad_token_id", None)
        self.eos_id = None if eos is None else int(eos)
        self.pad_id = next((int(i) for i in (pad, eos, bos) if i is not None), 0)
        self.prefix_id = next((int(i) for i in (bos, eos) if i is not None), 0)

    @property
    def vocab_size(self) -> int:
        return len(self.tokenizer)

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def decode(self, ids: Sequence[int]) -> str:
        ids = [int(i) for i in ids if self.eos_id is None or int(i) != self.eos_id]
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def __repr__(self) -> str:
        return f"TransformersTokenizer({type(self.tokenizer).__name__}, eos_id={self.eos_id})"


def as_tokenizer(tokenizer: Any) -> Tokenizer | TransformersTokenizer:
    """``tokenizer`` behind our interface: one of ours (or one already wrapped) as it is,
    anything else (a ``transformers`` tokenizer) in a :class:`TransformersTokenizer`."""
    if isinstance(tokenizer, Tokenizer | TransformersTokenizer):
        return tokenizer
    return TransformersTokenizer(tokenizer)


def _token_content(value: Any) -> str | None:
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) and value else None


def _read_json_if(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read {path} ({e}); fix or delete that file") from e
    return data if isinstance(data, dict) else {}


def _read_tokenizer_json(path: Path) -> Any:
    from tokenizers import Tokenizer as HFTok

    try:
        return HFTok.from_file(str(path))
    except Exception as e:  # the Rust side raises plain Exception subclasses
        raise UserError(f"cannot load tokenizer file {path} ({e}); re-save it or point to another tokenizer") from e


def _gpt2_from_vocab_merges(vocab: Path, merges: Path, eos_token: str) -> Any:
    from tokenizers import Tokenizer as HFTok
    from tokenizers import decoders, models, pre_tokenizers

    try:
        model = models.BPE.from_file(str(vocab), str(merges))
    except Exception as e:
        raise UserError(f"cannot load GPT-2 tokenizer files {vocab} and {merges} ({e}); check that they are intact") from e
    tk = HFTok(model)
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    if tk.token_to_id(eos_token) is not None:
        tk.add_special_tokens([eos_token])
    return tk


def load_tokenizer(directory: str | Path) -> Tokenizer:
    """Load what :meth:`Tokenizer.save` wrote, or GPT-2-style tokenizer files."""
    path = Path(directory)
    if not path.exists():
        raise UserError(f"tokenizer path {path} does not exist; give a directory written by a training run or with tokenizer.json")
    if path.is_file():
        if path.suffix == ".json":
            return HFTokenizer(path)
        raise UserError(f"{path} is not a tokenizer; give a directory or a tokenizer.json file")
    meta_path = path / META_FILE
    if meta_path.is_file():
        meta = _read_json_if(meta_path)
        kind = meta.get("kind")
        if kind == "byte":
            return ByteTokenizer()
        if kind == "bpe":
            return BPETokenizer.from_file(path / "tokenizer.json")
        if kind == "hf":
            return HFTokenizer(path)
        raise UserError(f"{meta_path} names an unknown tokenizer kind {kind!r}; expected 'byte', 'bpe' or 'hf'")
    if (path / "tokenizer.json").is_file() or (path / "vocab.json").is_file():
        return HFTokenizer(path)
    raise UserError(f"no tokenizer in {path}; expected {META_FILE}, tokenizer.json, or vocab.json and merges.txt")


def build_tokenizer(
    spec: str, texts: Callable[[], Iterable[str]] | None, vocab_size: int = 2048
) -> Tokenizer:
    """``"byte"``, ``"bpe"`` (trained on ``texts()``) or a path to a saved tokenizer."""
    if spec == "byte":
        return ByteTokenizer()
    if spec == "bpe":
        if texts is None:
            raise UserError("a 'bpe' tokenizer must be trained on text, but no training data was given; set the data source or use tokenizer 'byte'")
        return BPETokenizer.train(texts(), vocab_size=vocab_size)
    if not Path(spec).exists():
        raise UserError(f"tokenizer {spec!r} is neither 'byte', 'bpe' nor an existing path; fix the name or the path")
    return load_tokenizer(spec)
