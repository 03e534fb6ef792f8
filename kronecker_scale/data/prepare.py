"""prepare-data: text -> tokens -> fixed-length uint32 samples -> MDS shards + manifest.json.

Inputs are text files, folders (read recursively), JSON Lines (plain, .gz, .zst) with a text field, and
Parquet. A file without a known extension (LICENSE, README, a folder such as /usr/share/common-licenses) is
read as text when it is UTF-8: its first 64 KiB hold no NUL byte and decode (a multi-byte character cut at
the end of the sample is fine). Every other file is skipped and listed with its reason (binary, invalid UTF-8
at offset N, unsupported format, hidden): in the manifest's skipped_files, in prepare-data's output, and in
the error when no file is left. Inside folders, files and folders whose names start with "." are not sniffed
(one line per hidden entry); files with a known extension are read as before. A file named on the command
line that is not text is an error unless --skip-bad, which also skips files that fail to decode or parse.

--val-fraction F sends each training document to the val split when a hash of (file, index) falls below F,
so the split does not depend on the order of the inputs or the number of workers. When that leaves the val
split empty and there are at least two documents, the smallest training document long enough to fill one
sample (seq_len + 1 tokens with its end-of-document token; failing that, the smallest) is moved there
instead; symmetrically, a train split left empty gets the smallest val document. The document held back for
this is written at the end of its split. Each split's document and token counts are in the manifest. Documents are tokenized in parallel with the run's tokenizer (any format ByteTable reads), an
end-of-document token goes after each, and the stream is cut into samples of seq_len + 1 tokens that
overlap by one token (sample k = stream[k*seq_len : k*seq_len + seq_len + 1]), so every token but the
very first is a target exactly once. Samples are uint32 (vocabularies above 65,535 are the point).

The output is written under a temporary name and renamed when complete: a crash leaves whatever was
there before untouched. The manifest records the size and SHA-256 of every file of each split (index.json and
the shards; integrity.py), which the loader checks before it reads them.

--out is a folder that does not exist, an empty folder, or (with --overwrite) a dataset prepare-data made.
--overwrite replaces only what prepare-data wrote there (manifest.json, and in each split folder index.json
and the shards); any other file in the folder is kept (hard-linked into the new folder before the swap, so
a crash at any moment still leaves every one of them in place). A folder with other files and no dataset, or
with a manifest.json that is not a kscale dataset's, is refused.
"""

from __future__ import annotations

import codecs
import gzip
import hashlib
import io
import json
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path

import numpy as np

from ..errors import KScaleError
from .integrity import INDEX, file_records, split_files

TEXT_SUFFIXES = (".txt", ".md", ".rst", ".text")
JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.zst", ".json.gz", ".ndjson")
PARQUET_SUFFIXES = (".parquet",)
MANIFEST = "manifest.json"
FORMAT = "kscale-tokens-v1"
SPLITS = ("train", "val")
_SHARD_NAME = re.compile(r"^shard\.\d{5}\.mds(\.zstd)?$")  # what streaming's MDSWriter names the shards


@dataclass
class PrepareStats:
    documents: int = 0
    tokens: int = 0
    bytes_read: int = 0
    skipped_files: list = field(default_factory=list)
    dropped_tail_tokens: int = 0


def _kind(path: Path) -> str | None:
    name = path.name.lower()
    if name.endswith(JSONL_SUFFIXES):
        return "jsonl"
    if name.endswith(PARQUET_SUFFIXES):
        return "parquet"
    if name.endswith(TEXT_SUFFIXES):
        return "text"
    return None


SNIFF_BYTES = 64 * 1024  # how much of a file without a known extension is checked for UTF-8 text
_UNSUPPORTED_SUFFIXES = {
    ".json": "a JSON document; JSON Lines (one object per line) are read as .jsonl",
    ".gz": "gzip-compressed; only .jsonl.gz and .json.gz (JSON Lines) are read",
    ".zst": "zstd-compressed; only .jsonl.zst (JSON Lines) is read",
}
_MAGIC = (
    (b"\x1f\x8b", "gzip-compressed"),
    (b"\x28\xb5\x2f\xfd", "zstd-compressed"),
    (b"PK\x03\x04", "a zip archive (also .docx, .xlsx, .epub)"),
    (b"%PDF", "PDF"),
    (b"BZh", "bzip2-compressed"),
    (b"\xfd7zXZ\x00", "xz-compressed"),
    (b"PAR1", "Parquet without the .parquet extension"),
    (b"\xff\xfe", "UTF-16 text; convert it to UTF-8"),
    (b"\xfe\xff", "UTF-16 text; convert it to UTF-8"),
)


def not_text_reason(path: Path) -> str | None:
    """None when `path` (a file without a known extension) reads as UTF-8 text, else why it is skipped:
    "binary (NUL byte at offset N)", "invalid UTF-8 at offset N", "unsupported format (...)" or "cannot read"."""
    for suffix, what in _UNSUPPORTED_SUFFIXES.items():
        if path.name.lower().endswith(suffix):
            return f"unsupported format ({what})"
    try:
        with open(path, "rb") as f:
            head = f.read(SNIFF_BYTES)
            more = bool(f.read(1))
    except OSError as e:
        return f"cannot read ({e.strerror})"
    for magic, what in _MAGIC:
        if head.startswith(magic):
            return f"unsupported format ({what})"
    nul = head.find(b"\0")
    if nul >= 0:
        return f"binary (NUL byte at offset {nul})"
    try:  # final=False when the file goes on: a character cut at the end of the sample is not an error
        codecs.getincrementaldecoder("utf-8")().decode(head, final=not more)
    except UnicodeDecodeError as e:
        return f"invalid UTF-8 at offset {e.start}"
    return None


def discover_inputs(inputs: list[str | Path], skip_bad: bool = False) -> tuple[list[Path], list[dict]]:
    """(files to read, skipped files as {"file", "reason"}): folders expanded recursively in sorted order.
    Missing paths are errors; so is a file named here that is not readable text, unless skip_bad."""
    files: list[Path] = []
    skipped: list[dict] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            hidden: dict[Path, int] = {}
            for f in sorted(p.rglob("*")):
                if not f.is_file():
                    continue
                if _kind(f):
                    files.append(f)
                    continue
                parts = f.relative_to(p).parts
                dot = next((i for i, part in enumerate(parts) if part.startswith(".")), None)
                if dot is not None:  # .git/, .DS_Store, .gitignore: never documents
                    top = p.joinpath(*parts[: dot + 1])
                    hidden[top] = hidden.get(top, 0) + 1
                    continue
                reason = not_text_reason(f)
                if reason is None:
                    files.append(f)
                else:
                    skipped.append({"file": str(f), "reason": reason})
            for top, n in hidden.items():
                what = f"{n} file(s) without a known extension inside" if top.is_dir() else "a dot file"
                skipped.append({"file": str(top), "reason": f"hidden ({what}; not read)"})
        elif p.is_file():
            reason = None if _kind(p) else not_text_reason(p)
            if reason is None:
                files.append(p)
            elif skip_bad:
                skipped.append({"file": str(p), "reason": reason})
            else:
                raise KScaleError(
                    f"cannot read {p.name} as text: {reason}",
                    where=str(p),
                    fix="give UTF-8 text (any name), .jsonl(.gz/.zst) with a text field, or .parquet; "
                    "or pass --skip-bad to skip it",
                )
        else:
            raise KScaleError("input not found", where=str(p), fix="check the path")
    return files, skipped


def list_inputs(inputs: list[str | Path]) -> list[Path]:
    """Files to read (discover_inputs without the skipped list)."""
    return discover_inputs(inputs)[0]


def describe_skipped(skipped: list[dict], limit: int = 10) -> str:
    """One indented line per skipped file, "path: reason", at most `limit` lines and a count of the rest."""
    lines = [f"  {s['file']}: {s['reason']}" for s in skipped[:limit]]
    if len(skipped) > limit:
        lines.append(f"  ... and {len(skipped) - limit} more")
    return "\n".join(lines)


def _decode(raw: bytes, path: Path) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise KScaleError(
            f"not valid UTF-8 at byte offset {e.start}",
            where=str(path),
            fix="convert the file to UTF-8, or pass --skip-bad to skip such files (they are counted)",
        ) from None


def read_documents(path: Path, text_field: str = "text") -> list[str]:
    """All documents of one input file (a text file, or a file without a known extension, is one document)."""
    kind = _kind(path) or "text"
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise KScaleError(f"cannot read input: {e.strerror}", where=str(path)) from None
    name = path.name.lower()
    try:
        if name.endswith(".gz"):
            raw = gzip.decompress(raw)
        elif name.endswith(".zst"):
            import zstd

            raw = zstd.decompress(raw)
    except Exception as e:
        raise KScaleError(f"cannot decompress input ({e})", where=str(path), fix="check the file is complete") from None
    if kind == "text":
        text = _decode(raw, path)
        return [text] if text else []
    if kind == "parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise KScaleError("reading Parquet needs pyarrow", where=str(path), fix="pip install pyarrow") from None
        table = pq.read_table(io.BytesIO(raw), columns=[text_field])
        return [t for t in table.column(text_field).to_pylist() if t]
    docs, offset = [], 0
    for lineno, line in enumerate(raw.split(b"\n"), 1):
        if line.strip():
            try:
                obj = json.loads(line)
                text = obj[text_field]
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise KScaleError(
                    f"line {lineno} (byte offset {offset}) is not valid JSON ({e})",
                    where=str(path),
                    fix="fix the line, or pass --skip-bad",
                ) from None
            except (KeyError, TypeError):
                raise KScaleError(
                    f"line {lineno} (byte offset {offset}) has no {text_field!r} field",
                    where=str(path),
                    fix="pass --text-field NAME",
                ) from None
            if isinstance(text, str) and text:
                docs.append(text)
        offset += len(line) + 1
    return docs


# --- worker side: one tokenizer per process --------------------------------------------------
_TOKENIZER = None


def _init_worker(tokenizer_path: str) -> None:
    global _TOKENIZER
    from ..tokenizer import load_tokenizer

    _TOKENIZER = load_tokenizer(tokenizer_path)


def _tokenize_file(job: tuple[str, str, bool]) -> tuple[str, list[np.ndarray], int, str | None]:
    path, text_field, skip_bad = job
    try:
        docs = read_documents(Path(path), text_field)
    except KScaleError as e:
        if skip_bad:
            return path, [], 0, str(e)
        raise
    assert _TOKENIZER is not None, "the worker initializer loads the tokenizer"
    arrays = [np.asarray(_TOKENIZER.encode(d), dtype=np.uint32) for d in docs]
    return path, arrays, sum(len(d.encode("utf-8")) for d in docs), None


# --- packing and writing ------------------------------------------------------------------------
class SamplePacker:
    """Cuts a token stream into overlapping samples of seq_len + 1 and hands them to a writer."""

    def __init__(self, seq_len: int, write):
        self.seq_len, self.write = seq_len, write
        self.buffer: np.ndarray = np.zeros(0, dtype=np.uint32)
        self.samples = 0

    def add(self, tokens: np.ndarray) -> None:
        self.buffer = np.concatenate([self.buffer, tokens])
        n = (len(self.buffer) - 1) // self.seq_len
        for k in range(n):
            self.write(self.buffer[k * self.seq_len : k * self.seq_len + self.seq_len + 1])
        self.samples += n
        self.buffer = self.buffer[n * self.seq_len :]

    def leftover(self) -> int:
        return max(len(self.buffer) - 1, 0)


def _validation_doc(path: str, index: int, fraction: float) -> bool:
    h = hashlib.blake2b(f"{path}\0{index}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") / 2**64 < fraction


# --- the output folder ------------------------------------------------------------------------------
def _own_files(out_dir: Path, manifest: dict) -> set[str]:
    """The paths (relative, POSIX) in out_dir that a previous prepare-data wrote: manifest.json and, in each
    split folder, index.json, the files the manifest records, the shards index.json lists, and files with
    the MDS shard names (so a dataset whose index is damaged can still be replaced)."""
    own = {MANIFEST}
    for split in {*SPLITS, *(manifest.get("splits") or {})}:
        if not isinstance(split, str) or not split or "/" in split or split in (".", ".."):
            continue
        split_dir = out_dir / split
        if not split_dir.is_dir() or split_dir.is_symlink():
            continue
        names = {INDEX} | {
            r["file"]
            for r in (manifest.get("splits") or {}).get(split, {}).get("files", [])
            if isinstance(r, dict) and isinstance(r.get("file"), str)
        }
        try:
            names |= set(split_files(split_dir))
        except (OSError, ValueError, KeyError, TypeError):
            pass
        names |= {f.name for f in split_dir.iterdir() if _SHARD_NAME.match(f.name)}
        own |= {f"{split}/{n}" for n in names if "/" not in n}
    return own


def _foreign(folder: Path, manifest: dict):
    """(relative path, path, is an empty folder) of everything in a dataset folder that prepare-data did not
    write, folders only when empty (a folder with content is recreated for its files)."""
    own = _own_files(folder, manifest)
    splits = {*SPLITS, *(manifest.get("splits") or {})}
    for dirpath, dirnames, filenames in os.walk(folder):
        rel_dir = Path(dirpath).relative_to(folder)
        for name in sorted(dirnames + filenames):
            path, rel = Path(dirpath) / name, (rel_dir / name).as_posix()
            if rel in own:
                continue
            if path.is_dir() and not path.is_symlink():
                if not (rel_dir == Path(".") and name in splits) and not any(path.iterdir()):
                    yield rel, path, True
                continue
            yield rel, path, False


def foreign_files(out_dir: str | Path) -> list[str]:
    """What `--overwrite` keeps in a dataset folder: the files (and empty folders, with a trailing /) that
    prepare-data did not write, as relative paths. Empty when out_dir holds no dataset."""
    out_dir = Path(out_dir)
    try:
        manifest = read_manifest(out_dir)
    except KScaleError:
        return []
    return [rel + "/" if empty else rel for rel, _, empty in _foreign(out_dir, manifest)]


def _check_out(out_dir: Path, overwrite: bool) -> None:
    """--out must be a new folder, an empty one, or (with --overwrite) a dataset of ours."""
    if out_dir.exists() and not out_dir.is_dir():
        raise KScaleError(
            "--out is a file, not a folder",
            where=str(out_dir),
            fix="give a folder for the dataset (created if missing), or move the file away",
        )
    if os.path.lexists(out_dir) and not out_dir.exists():
        raise KScaleError(
            "--out is a symbolic link to nothing",
            where=f"{out_dir} -> {os.readlink(out_dir)}",
            fix="give a folder for the dataset (created if missing), or remove the link",
        )
    for parent in out_dir.parents:
        if parent.exists():
            if not parent.is_dir():
                raise KScaleError(
                    f"--out lies under {parent}, which is a file, not a folder",
                    where=str(out_dir),
                    fix="give a folder path whose parents are folders",
                )
            break
    if not out_dir.exists():
        return
    if (out_dir / MANIFEST).exists():
        if not overwrite:
            raise KScaleError(
                "the output folder already holds a dataset",
                where=str(out_dir),
                fix="choose another --out, or pass --overwrite to replace it (only the dataset's own "
                "files are replaced; other files in the folder are kept)",
            )
        try:
            read_manifest(out_dir)
        except KScaleError as e:
            raise KScaleError(
                f"--overwrite refused: the folder's manifest.json is not a kscale dataset's ({e.what})",
                where=str(out_dir / MANIFEST),
                fix="choose another --out; if it is an old dataset you no longer need, delete the folder yourself",
            ) from None
        return
    try:
        names = sorted(p.name for p in out_dir.iterdir())
    except OSError as e:
        raise KScaleError(f"cannot list the output folder ({e.strerror})", where=str(out_dir)) from None
    if names:
        shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
        raise KScaleError(
            f"the output folder is not empty and is not a dataset (it holds {shown})",
            where=str(out_dir),
            fix="choose an empty or new --out; prepare-data never deletes files it did not write",
        )


def _check_eod(tok, eod: int, model_vocab: int, given: bool, tokenizer) -> None:
    """The end-of-document id must be a real token: 0 <= id < the tokenizer's ids (and the model's)."""
    real = tok.vocab_size
    top = min(real, model_vocab)
    name = f"--eod-id {eod}" if given else f"the end-of-document token id {eod}"
    fix = (
        f"pass an id in 0..{top - 1}: the tokenizer's end-of-document token"
        + (f" ({tok.eos_id})" if tok.eos_id is not None and tok.eos_id < top else "")
        + " or another real token such as the newline"
    )
    if eod < 0:
        raise KScaleError(f"{name} is negative; valid ids are 0..{top - 1}", where="--eod-id", fix=fix)
    if eod >= real:
        what = (
            f"{name} is not a token: the tokenizer has {real:,} ids (valid: 0..{real - 1}); ids from {real:,} "
            f"up are only the model's vocabulary padding (rows that never train) or outside its table"
        )
        raise KScaleError(what, where=f"--eod-id, tokenizer {tokenizer}", fix=fix)
    if eod >= model_vocab:
        raise KScaleError(
            f"{name} is >= the model's vocabulary size {model_vocab} (--vocab-size); valid ids are 0..{top - 1}",
            where="--eod-id" if given else "--vocab-size",
            fix=fix,
        )
    if not tok.exact_bytes()[eod]:
        raise KScaleError(
            f"{name} is an unused id of the tokenizer (it has no bytes); valid ids are 0..{top - 1}, except such holes",
            where=f"--eod-id, tokenizer {tokenizer}",
            fix=fix,
        )


def _keep_foreign(old: Path, new: Path, manifest: dict) -> list[str]:
    """Hard-link every file of the dataset folder `old` that prepare-data did not write into the same place
    under `new` (folders recreated, symbolic links copied as links); returns the relative paths kept."""
    kept = []
    for rel, src, empty in _foreign(old, manifest):
        dst = new / rel
        if empty:
            if not dst.exists():
                dst.mkdir(parents=True)
                shutil.copystat(src, dst)
            kept.append(rel + "/")
            continue
        if os.path.lexists(dst):
            raise KScaleError(
                f"--overwrite refused: {rel} in the output folder is not part of the old dataset and "
                f"has the name of a file of the new one; nothing was changed",
                where=str(src),
                fix="move the file out of the folder, then run again",
            )
        try:
            if not dst.parent.exists():
                dst.parent.mkdir(parents=True)
                shutil.copystat(src.parent, dst.parent)
            if src.is_symlink():
                os.symlink(os.readlink(src), dst)
            else:
                os.link(src, dst)
        except OSError as e:
            raise KScaleError(
                f"--overwrite cannot keep {rel}, a file in the output folder that prepare-data did not "
                f"write (hard link: {e.strerror}); nothing was changed",
                where=str(src),
                fix="move the other files out of the folder, then run again",
            ) from None
        kept.append(rel)
    return kept


def prepare_data(
    tokenizer: str | Path,
    inputs: list,
    out_dir: str | Path,
    seq_len: int,
    *,
    val_inputs: list | None = None,
    val_fraction: float = 0.0,
    text_field: str = "text",
    workers: int | None = None,
    overwrite: bool = False,
    skip_bad: bool = False,
    vocab_size: int | None = None,
    shard_size: str = "64mb",
    eod_id: int | None = None,
    progress=None,
) -> dict:
    """Tokenize `inputs` into MDS shards under out_dir/{train,val}; returns the manifest."""
    from ..tokenizer import load_tokenizer
    from .streaming_adapter import import_streaming

    out_dir = Path(out_dir).absolute()
    if out_dir.is_symlink() and out_dir.is_dir():
        out_dir = out_dir.resolve()  # write where the link points; the link stays
    if seq_len < 1:
        raise KScaleError(f"seq_len must be >= 1, got {seq_len}", where="--seq-len")
    _check_out(out_dir, overwrite)
    tok = load_tokenizer(tokenizer)
    eod = tok.eos_id if eod_id is None else eod_id
    if eod is None:
        raise KScaleError("the tokenizer has no end-of-document token", where=str(tokenizer), fix="pass --eod-id ID")
    model_vocab = vocab_size or tok.vocab_size
    _check_eod(tok, int(eod), model_vocab, eod_id is not None, tokenizer)
    train_files, skipped = discover_inputs(inputs, skip_bad)
    splits = {"train": train_files}
    if val_inputs:
        splits["val"], val_skipped = discover_inputs(val_inputs, skip_bad)
        skipped += val_skipped
    if not splits["train"]:
        raise KScaleError(
            "no input files found"
            + (f": every file was skipped\n{describe_skipped(skipped)}" if skipped else " (the folders hold no files)"),
            where=", ".join(map(str, inputs)),
            fix="give UTF-8 text files (any name), folders of them, .jsonl(.gz/.zst) or .parquet",
        )
    streaming = import_streaming()
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
    except OSError as e:
        raise KScaleError(
            f"cannot create a folder next to the output folder ({e.strerror})",
            where=str(tmp),
            fix="give an --out in a folder you can write",
        ) from None
    stats = PrepareStats(skipped_files=list(skipped))
    t0 = time.perf_counter()
    columns = {"tokens": f"ndarray:uint32:{seq_len + 1}"}
    writers = {
        name: streaming.MDSWriter(out=str(tmp / name), columns=columns, compression="zstd", size_limit=shard_size)
        for name in ("train", "val")
    }
    packers = {name: SamplePacker(seq_len, lambda s, w=w: w.write({"tokens": s})) for name, w in writers.items()}
    tokens_per_split = {"train": 0, "val": 0}
    documents_per_split = {"train": 0, "val": 0}
    # with --val-fraction, the smallest document each split got from the hash is held back (written last), so
    # a split the hash left empty can take the other split's (see the module docstring)
    held: dict[str, tuple | None] = {"train": None, "val": None}
    moved = None

    def place(split: str, doc: np.ndarray) -> None:
        packers[split].add(doc)
        tokens_per_split[split] += len(doc)
        documents_per_split[split] += 1

    def hold(split: str, doc: np.ndarray, path: str, index: int) -> None:
        def key(d: np.ndarray) -> tuple[bool, int]:  # long enough for one sample first, then the smallest
            return len(d) < seq_len + 1, len(d)

        current = held[split]
        if current is None:
            held[split] = (doc, path, index)
        elif key(doc) < key(current[0]):
            held[split] = (doc, path, index)
            place(split, current[0])
        else:
            place(split, doc)

    sources = []
    workers = workers or max(1, min(len(splits["train"]), os.cpu_count() or 1))
    try:
        with get_context("spawn").Pool(workers, initializer=_init_worker, initargs=(str(tok.path),)) as pool:
            for split_name, files in splits.items():
                jobs = [(str(f), text_field, skip_bad) for f in files]
                for path, arrays, nbytes, error in pool.imap(_tokenize_file, jobs):
                    if error:
                        stats.skipped_files.append({"file": path, "reason": error.split("\n")[0], "error": error})
                        continue
                    for i, ids in enumerate(arrays):
                        if len(ids) and int(ids.max()) >= model_vocab:
                            raise KScaleError(
                                f"token id {int(ids.max())} is >= the model's vocabulary size {model_vocab}",
                                where=f"{path}, document {i}",
                                fix="use the model's tokenizer, or raise --vocab-size",
                            )
                        doc: np.ndarray = np.append(ids, np.uint32(eod))
                        if split_name == "val":
                            place("val", doc)
                        elif val_fraction:
                            hold("val" if _validation_doc(path, i, val_fraction) else "train", doc, path, i)
                        else:
                            place("train", doc)
                        stats.documents += 1
                        stats.tokens += len(doc)
                    stats.bytes_read += nbytes
                    sources.append({"file": path, "split": split_name, "bytes": nbytes})
                    if progress:
                        progress(path, stats)
        for split, other in (("val", "train"), ("train", "val")):
            candidate = held[other]
            if documents_per_split[split] == 0 and held[split] is None and candidate is not None:
                if documents_per_split[other] >= 1:  # the other split keeps at least one document
                    doc, path, index = candidate
                    held[other] = None
                    place(split, doc)
                    moved = {"to": split, "file": path, "document": index, "tokens": len(doc)}
        for split, candidate in held.items():
            if candidate is not None:
                place(split, candidate[0])
        for w in writers.values():
            w.finish()
        records = {name: file_records(tmp / name) for name in packers}  # sizes and SHA-256: the loader checks them
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if stats.documents == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        raise KScaleError(
            "the inputs hold no text"
            + (f"; skipped:\n{describe_skipped(stats.skipped_files)}" if stats.skipped_files else ""),
            where=", ".join(map(str, inputs)),
        )
    seconds = time.perf_counter() - t0
    manifest = {
        "format": FORMAT,
        "tokenizer": str(tok.path),
        "tokenizer_format": tok.format,
        "tokenizer_fingerprint": tok.fingerprint,
        "vocab_size": tok.vocab_size,
        "eod_id": int(eod),
        "seq_len": seq_len,
        "sample_tokens": seq_len + 1,
        "dtype": "uint32",
        "splits": {
            name: {
                "documents": documents_per_split[name],
                "samples": packers[name].samples,
                "tokens": tokens_per_split[name],
                "dropped_tail_tokens": packers[name].leftover(),
                "files": records[name],
            }
            for name in packers
        },
        "documents": stats.documents,
        "val_fraction": val_fraction,
        "val_moved_document": moved,
        "bytes_read": stats.bytes_read,
        "sources": sources,
        "skipped_files": stats.skipped_files,
        "seconds": round(seconds, 3),
        "tokens_per_second": round(stats.tokens / max(seconds, 1e-9)),
        "workers": workers,
    }
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
    old = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}"
    try:
        if out_dir.exists():
            # the swap replaces the whole folder: what prepare-data did not write comes along as hard links
            previous = read_manifest(out_dir) if (out_dir / MANIFEST).exists() else {"splits": {}}
            _keep_foreign(out_dir, tmp, previous)
            out_dir.rename(old)
        try:
            tmp.rename(out_dir)
        except BaseException:
            if old.exists() and not out_dir.exists():
                old.rename(out_dir)  # put the previous folder back
            raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)
    return manifest


def read_manifest(data_dir: str | Path) -> dict:
    path = Path(data_dir) / MANIFEST
    if not path.is_file():
        raise KScaleError(
            "no manifest.json: not a prepared dataset", where=str(data_dir), fix="create it with `kscale prepare-data`"
        )
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise KScaleError(f"corrupt manifest ({e})", where=str(path)) from None
    if manifest.get("format") != FORMAT:
        raise KScaleError(f"unknown dataset format {manifest.get('format')!r}", where=str(path))
    return manifest
