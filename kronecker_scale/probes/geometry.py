"""Embedding geometry (paper §6.1): top-k cosine neighbours of probe words in an input-embedding space,
each neighbour classified typographic (same canonical form as the probe: whitespace markers and edge
punctuation stripped, case-folded) or morphological (another form). morphological@k = share of the
k non-self neighbours with another canonical form; typographic@k = 1 - morphological@k.

Spaces:
- `model`: a kscale checkpoint's input table (Kronecker: codec + projection, every id materialised);
- `hf`: an exported (or any) transformers model's input embedding matrix;
- `codec`: the Kronecker code itself (no learned weights), cosine in closed form (below);
- `random`: a Gaussian table (seed 1337), the chance baseline.
A probe that is one token uses its row. Otherwise: in Kronecker spaces the probe string gets its own
code (an out-of-vocabulary string has one), in table spaces the mean of its sub-token rows. Neighbours
are real ids; the probe's own id (or ids with its exact bytes) are excluded.

Codec cosine in closed form: x_t has L_t cells equal to s_t; with z-normalization
z_t = (x_t - mu_t) / sigma_t, so z_a . z_b = (s_a s_b m_ab - D mu_a mu_b) / (sigma_a sigma_b), where m_ab counts
the (byte, position) cells a and b share, and |z_t|^2 = (L_t s_t^2 - D mu_t^2) / sigma_t^2. No [V, D] matrix.
"""

from __future__ import annotations

import statistics
from pathlib import Path

import torch

from ..errors import KScaleError
from .report import markdown_table, write_outputs

PROBE_FAMILIES = {
    "run": ["run", " run", "running", "runs", "runner", "ran"],
    "compute": ["compute", " compute", "computer", "computing", "computed", "computation"],
    "magnet": ["magnet", " magnet", "magnetic", "magnets", "magnetism"],
    "nation": ["nation", " nation", "national", "nations", "nationality"],
    "tion": ["tion", " tion", "tions", "ation", "sion"],
}
WHITESPACE_MARKERS = " \t\n\u0120\u2581\u010a"  # space, tab, newline, GPT-2's Ġ and Ċ, SentencePiece ▁
EDGE_PUNCTUATION = ".,;:!?'\"()[]{}<>-_/\\`*#@&|~^=+"


def canonical(text: str) -> str:
    return text.strip(WHITESPACE_MARKERS).strip(EDGE_PUNCTUATION).strip(WHITESPACE_MARKERS).casefold()


class Space:
    """cosine(probe, every real id) for one embedding space."""

    name: str
    kronecker: bool

    def __init__(self, name: str, token_bytes: list[bytes], encode, table: torch.Tensor | None):
        self.name, self.token_bytes, self.encode = name, token_bytes, encode
        self.table = None if table is None else torch.nn.functional.normalize(table.double(), dim=1)

    def ids_with_bytes(self, raw: bytes) -> list[int]:
        if not hasattr(self, "_by_bytes"):
            self._by_bytes: dict[bytes, list[int]] = {}
            for i, b in enumerate(self.token_bytes):
                self._by_bytes.setdefault(b, []).append(i)
        return self._by_bytes.get(raw, [])

    def probe_ids(self, probe: str) -> list[int]:
        return self.encode(probe)

    def cosines(self, probe: str) -> torch.Tensor:
        ids = self.probe_ids(probe)
        if not ids:
            raise KScaleError(f"probe {probe!r} encodes to no tokens")
        vec = self.table[ids].mean(0)  # type: ignore[index]  # None only in CodecSpace, which overrides cosines
        return self.table @ torch.nn.functional.normalize(vec, dim=0)


class CodecSpace(Space):
    """The Kronecker code (docs/design.md §2) of every id, cosine in closed form."""

    def __init__(
        self,
        token_bytes: list[bytes],
        encode,
        pos_dim: int,
        length_normalize=True,
        z_normalize=True,
        name: str = "codec",
    ):
        from ..embedding import ByteTable

        super().__init__(name, token_bytes, encode, None)
        self.byte_table = ByteTable.from_token_bytes(token_bytes, pos_dim)
        self.P, self.D = pos_dim, 256 * pos_dim
        self.length_normalize, self.z_normalize = length_normalize, z_normalize
        self.L = self.byte_table.lengths.double()
        self._stats_all = self._stats(self.L)

    def _stats(self, L: torch.Tensor):
        s = (
            torch.where(L > 0, L.clamp_min(1).rsqrt(), torch.zeros_like(L))
            if self.length_normalize
            else (L > 0).double()
        )
        mu = L * s / self.D if self.z_normalize else torch.zeros_like(L)
        norm_sq = L * s * s - self.D * mu * mu
        return s, mu, norm_sq

    def cosines(self, probe: str) -> torch.Tensor:
        from ..embedding.byte_table import utf8_safe_truncate

        raw = utf8_safe_truncate(probe.encode("utf-8"), self.P)
        Lp = len(raw)
        if Lp == 0:
            raise KScaleError("empty probe string")
        pb = torch.tensor(list(raw), dtype=torch.uint8)
        valid = torch.arange(Lp)[None, :] < self.byte_table.lengths[:, None].long()
        shared = ((self.byte_table.bytes[:, :Lp] == pb[None, :]) & valid).sum(1).double()
        s, mu, norm_sq = self._stats_all
        sp, mup, nsp = self._stats(torch.tensor([float(Lp)], dtype=torch.float64))
        dot = s * sp * shared - self.D * mu * mup
        return torch.where(norm_sq > 0, dot / (norm_sq * nsp).clamp_min(1e-300).sqrt(), torch.zeros_like(dot))


class KroneckerModelSpace(Space):
    """A Kronecker model's input table; probe strings embed through the codec (their own bytes)."""

    def __init__(self, ck, name: str = "model"):
        super().__init__(name, ck.tokenizer.token_bytes("exact"), ck.tokenizer.encode, ck.input_table())
        self.word_embeddings = ck.model.embedding.word_embeddings

    def cosines(self, probe: str) -> torch.Tensor:
        from ..embedding import kronecker_embed_torch
        from ..embedding.byte_table import utf8_safe_truncate

        e = self.word_embeddings
        raw = utf8_safe_truncate(probe.encode("utf-8"), e.pos_dim)
        row = torch.zeros(1, e.pos_dim, dtype=torch.uint8)
        row[0, : len(raw)] = torch.tensor(list(raw), dtype=torch.uint8)
        vec = kronecker_embed_torch(row, torch.tensor([len(raw)]), e.weight.detach().double(), e.alpha, e.beta)[0]
        return self.table @ torch.nn.functional.normalize(vec, dim=0)


def neighbours(space: Space, probe: str, k: int) -> dict:
    cos = space.cosines(probe).clone()
    for i in space.ids_with_bytes(probe.encode("utf-8")):
        cos[i] = -float("inf")  # the probe itself
    top = torch.topk(cos, k)
    probe_form = canonical(probe)
    rows = []
    for score, i in zip(top.values.tolist(), top.indices.tolist()):
        text = space.token_bytes[i].decode("utf-8", errors="replace")
        rows.append(
            {
                "id": i,
                "token": text,
                "cosine": score,
                "class": "typographic" if canonical(text) == probe_form else "morphological",
            }
        )
    morph = sum(r["class"] == "morphological" for r in rows) / k
    return {"probe": probe, "neighbours": rows, "morphological_at_k": morph, "typographic_at_k": 1 - morph}


def run_geometry(spaces: list[Space], families: dict[str, list[str]], k: int = 5) -> dict:
    results = {}
    for space in spaces:
        per_family = {}
        for fam, probes in families.items():
            per_family[fam] = [neighbours(space, p, k) for p in probes]
        results[space.name] = {
            "families": per_family,
            "morphological_at_k": statistics.fmean(r["morphological_at_k"] for rs in per_family.values() for r in rs),
        }
    return {"k": k, "spaces": [s.name for s in spaces], "families": families, "results": results}


def markdown(res: dict) -> str:
    fams = list(res["families"])
    rows = [
        [
            s,
            *[
                f"{statistics.fmean(r['morphological_at_k'] for r in res['results'][s]['families'][f]):.2f}"
                for f in fams
            ],
            f"{res['results'][s]['morphological_at_k']:.3f}",
        ]
        for s in res["spaces"]
    ]
    text = (
        f"# Embedding geometry: morphological@{res['k']} (1 = no typographic variants among the neighbours)\n\n"
        + markdown_table(["space", *fams, "mean"], rows)
        + "\n## Neighbours\n\n"
    )
    for s in res["spaces"]:
        nb = [
            [
                f"`{r['probe']!r}`",
                ", ".join(f"{n['token']!r}{'*' if n['class'] == 'typographic' else ''}" for n in r["neighbours"]),
            ]
            for f in fams
            for r in res["results"][s]["families"][f]
        ]
        text += f"### {s} (* = typographic variant)\n\n" + markdown_table(["probe", "top-k"], nb) + "\n"
    return text


def plot(res: dict):
    def draw(plt):
        fig, ax = plt.subplots(figsize=(8, 4))
        fams, spaces = list(res["families"]), res["spaces"]
        width = 0.8 / len(spaces)
        for i, s in enumerate(spaces):
            ax.bar(
                [j + i * width for j in range(len(fams))],
                [statistics.fmean(r["morphological_at_k"] for r in res["results"][s]["families"][f]) for f in fams],
                width,
                label=s,
            )
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(fams))], fams)
        ax.set_ylabel(f"morphological@{res['k']}")
        ax.set_ylim(0, 1.05)
        ax.legend()
        return fig

    return draw


def spaces_for(sources: list[str], *, codec: bool, random: bool, pos_dim: int = 32, device: str = "cpu") -> list[Space]:
    """Spaces from kscale checkpoints / HF model folders, plus the codec and random baselines of the
    first source's tokenizer."""
    from ..inference import load_checkpoint

    spaces, first = [], None
    for src in sources:
        if (Path(src) / "config.json").is_file():
            space = _hf_space(src)
        else:
            ck = load_checkpoint(src, device)
            label = f"{Path(ck.path).parent.parent.name}@{ck.step}"
            if ck.model_cfg.input_layer == "kronecker":
                space = KroneckerModelSpace(ck, name=label)
            else:
                table = ck.input_table()
                space = Space(label, ck.tokenizer.token_bytes("exact"), ck.tokenizer.encode, table)
        spaces.append(space)
        first = first or space
    if first is None:
        raise KScaleError("give at least one checkpoint or Hugging Face model folder")
    if codec:
        spaces.append(CodecSpace(first.token_bytes, first.encode, pos_dim, name=f"codec(P={pos_dim})"))
    if random:
        g = torch.Generator().manual_seed(1337)
        width = first.table.shape[1] if first.table is not None else 64
        spaces.append(
            Space(
                "random",
                first.token_bytes,
                first.encode,
                torch.randn(len(first.token_bytes), width, generator=g, dtype=torch.float64),
            )
        )
    return spaces


def _hf_space(folder) -> Space:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..tokenizer.formats import gpt2_byte_to_unicode

    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(str(folder))
    table = model.get_input_embeddings().weight.detach()
    to_byte = {u: b for b, u in gpt2_byte_to_unicode().items()}
    pieces = tok.convert_ids_to_tokens(list(range(table.shape[0])))
    token_bytes = [
        bytes(to_byte[c] for c in p) if p and all(c in to_byte for c in p) else (p or "").encode() for p in pieces
    ]
    return Space(Path(folder).name, token_bytes, lambda s: tok.encode(s, add_special_tokens=False), table)


def geometry_probe(
    sources,
    out_dir,
    *,
    k: int = 5,
    codec: bool = True,
    random: bool = True,
    pos_dim: int = 32,
    families: dict | None = None,
    device: str = "cpu",
) -> dict:
    res = run_geometry(
        spaces_for(sources, codec=codec, random=random, pos_dim=pos_dim, device=device), families or PROBE_FAMILIES, k
    )
    res["paths"] = {k_: str(v) for k_, v in write_outputs(out_dir, "geometry", res, markdown(res), plot(res)).items()}
    return res
