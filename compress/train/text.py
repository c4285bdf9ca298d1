"""Text data for Hugging Face models: sentences to distil an embedding, or labelled jsonl.

* Embeddings (`--data sentences.txt`, one sentence per line; none = the built-in corpus of
  the standard library's docstrings): the target of every sentence is the starting model's
  own embedding, so training is distillation and needs no labels. Held-out metrics: mean
  cosine to the dense embedding and nearest-neighbour agreement.
* Classification (`--data file.jsonl`, one {"text": ..., "label": ...} per line).

Items are (token ids, target); `TextDataset.collate` pads each batch to its own longest
sentence, so short sentences do not pay for the longest one.
"""

from __future__ import annotations

import ast
import json
import sys
import sysconfig
from pathlib import Path

import torch

from compress.errors import UserError

MAX_TOKENS = 128
HELD_OUT = 0.2  # share of a --data file kept for evaluation
BUILTIN = {"train": 2000, "eval": 500}  # the built-in corpus's default split sizes


class TextDataset(torch.utils.data.Dataset):
    """Token id sequences (unpadded) and targets; batches come out as ((ids, mask), targets)."""

    def __init__(self, ids: list[torch.Tensor], targets: torch.Tensor, pad_id: int = 0):
        self.ids, self.targets, self.pad_id = ids, targets, pad_id

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return self.ids[i], self.targets[i]

    def collate(self, items):
        n = max(len(x) for x, _ in items)
        ids = torch.full((len(items), n), self.pad_id, dtype=torch.long)
        mask = torch.zeros(len(items), n, dtype=torch.long)
        for r, (x, _) in enumerate(items):
            ids[r, : len(x)], mask[r, : len(x)] = x, 1
        return (ids, mask), torch.stack([torch.as_tensor(y) for _, y in items])


def stdlib_docstrings(max_words: int = 40) -> list[tuple[str, str]]:
    """(source file, sentence): first paragraphs of the standard library's docstrings (parsed, never imported)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"test", "tests", "idlelib", "site-packages", "lib2to3", "turtledemo", "__pycache__"}
    kinds = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
    seen, out = set(), []
    for f in sorted(root.rglob("*.py")):
        if skip & set(f.relative_to(root).parts):
            continue
        try:
            tree = ast.parse(f.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in ast.walk(tree):
            doc = ast.get_docstring(node) if isinstance(node, kinds) else None
            s = " ".join(doc.split("\n\n")[0].split()) if doc else ""
            if 6 <= len(s.split()) <= max_words and s not in seen:
                seen.add(s)
                out.append((str(f.relative_to(root)), s))
    return out


def builtin_split(n_train: int = BUILTIN["train"], n_eval: int = BUILTIN["eval"], seed: int = 0):
    """Train/held-out sentences of the built-in corpus, split by source file (no module on both sides)."""
    items = stdlib_docstrings()
    g = torch.Generator().manual_seed(seed)
    files = sorted({f for f, _ in items})
    files = [files[i] for i in torch.randperm(len(files), generator=g)]
    by_file: dict[str, list[str]] = {}
    for f, s in items:
        by_file.setdefault(f, []).append(s)
    held, train = [], []
    for f in files:
        (held if len(held) < n_eval else train).extend(by_file[f])
    train = [train[i] for i in torch.randperm(len(train), generator=g)]
    return train[:n_train], held[:n_eval]


def held_out_split(rows: list, seed: int = 0) -> tuple[list, list]:
    """A seeded shuffle; the last HELD_OUT share (at least one row) is held out."""
    if len(rows) < 2:
        raise UserError(f"text data needs at least 2 examples (one to train, one to evaluate), got {len(rows)}")
    perm = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed)).tolist()
    k = max(1, round(len(rows) * HELD_OUT))
    return [rows[i] for i in perm[:-k]], [rows[i] for i in perm[-k:]]


def read_sentences(path: Path) -> list[str]:
    lines = [" ".join(line.split()) for line in path.read_text(encoding="utf-8").splitlines()]
    return [s for s in lines if s]


def read_jsonl(path: Path) -> list[tuple[str, object]]:
    rows = []
    for k, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            r = json.loads(line)
            rows.append((str(r["text"]), r["label"]))
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise UserError(f"{path} line {k}: each line must be a JSON object with text and label ({e})") from e
    return rows


def tokenize(tok, sentences: list[str]) -> list[torch.Tensor]:
    enc = tok(sentences, truncation=True, max_length=MAX_TOKENS)
    return [torch.tensor(x, dtype=torch.long) for x in enc["input_ids"]]


@torch.no_grad()
def embed(model, data: TextDataset, batch: int = 64) -> torch.Tensor:
    """Outputs of `model` on every item, computed in batches of similar length (little padding)."""
    was = model.training
    model.eval()
    order = sorted(range(len(data)), key=lambda i: len(data.ids[i]))
    out = None
    for s in range(0, len(order), batch):
        idx = order[s : s + batch]
        (ids, mask), _ = data.collate([data[i] for i in idx])
        y = model(ids, mask)
        out = out if out is not None else torch.empty(len(data), *y.shape[1:])
        out[idx] = y
    model.train(was)
    return out


def embedding_agreement(student: torch.Tensor, teacher: torch.Tensor) -> dict:
    """Mean cosine to the dense embeddings, and top-1 nearest-neighbour agreement: the share of
    sentences whose nearest other sentence (among the same set) is the dense model's nearest."""
    s, t = torch.nn.functional.normalize(student, dim=-1), torch.nn.functional.normalize(teacher, dim=-1)

    def nearest(e):
        sim = e @ e.T
        sim.fill_diagonal_(-float("inf"))
        return sim.argmax(1)

    return {
        "cosine": float((s * t).sum(-1).mean()),
        "nn_agreement": float((nearest(s) == nearest(t)).float().mean()),
        "sentences": len(s),
    }


def write_corpus(out: str | Path, n: int) -> int:
    """Write n sentences of the built-in corpus, one per line (a ready sentences.txt for the demo)."""
    train, _ = builtin_split(n_train=n, n_eval=0)
    Path(out).write_text("\n".join(train[:n]) + "\n", encoding="utf-8")
    return len(train[:n])


if __name__ == "__main__":  # python -m compress.train.text sentences.txt 600
    print(
        f"wrote {write_corpus(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 600)} sentences to {sys.argv[1]}"
    )
