"""`--model hf:PATH`: a local Hugging Face model folder as a plain-tensor module.

The folder (config.json + weights, a tokenizer where there is one) is loaded with
`from_pretrained` and the hub switched off. Its task decides the wrapper:

* ``embedding`` — an encoder (BERT-like) with no task head: (input_ids, attention_mask) →
  the pooled sentence embedding, pooled as the folder's sentence-transformers config says
  (mean / cls / max; L2-normalised when a Normalize module is listed). Trained by
  distillation from the starting model (compress.train.text).
* ``classification`` — a ``*ForSequenceClassification`` folder: (input_ids, attention_mask) →
  logits; trained on labelled text with cross-entropy.
* ``image`` — a ``*ForImageClassification`` folder (ViT-like): pixel_values → logits.

The wrapper speaks compress's small task protocol (`compress_config`, and for embeddings
`compress_loss` / `compress_score`), so the training loop, evaluation and export use the
right objective without the caller passing it, and config.json names the wrapper.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from compress.errors import UserError
from compress.models import ModelSpec
from compress.train.text import TextDataset, builtin_split, embed, held_out_split, read_jsonl, read_sentences, tokenize

PREFIX = "hf:"
SEQ_LEN = 128  # example inputs (FLOPs, groups, export) use the bench's default sequence length


def is_hf(spec: str | None) -> bool:
    return isinstance(spec, str) and spec.startswith(PREFIX)


_TV_LIB = None


def _torchvision_importable() -> None:
    """transformers imports torchvision's Python parts when it is installed; a torchvision whose C++
    ops do not load against this torch fails on its fake-op registrations. Then define those two op
    schemas (no kernels: transformers' text and ViT models never call them) and import again."""
    global _TV_LIB
    import importlib.util
    import sys

    if "torchvision" in sys.modules or importlib.util.find_spec("torchvision") is None:
        return
    try:
        import torchvision
    except RuntimeError as e:
        if "torchvision::" not in str(e):
            raise
        for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[name]
        _TV_LIB = torch.library.Library("torchvision", "DEF")  # kept alive: the schemas live with it
        for op in ("nms", "qnms"):
            if not torch._C._jit_get_schemas_for_operator(f"torchvision::{op}"):
                _TV_LIB.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        import torchvision  # noqa: F401


def import_transformers():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach the network
    _torchvision_importable()
    try:
        import transformers
    except ModuleNotFoundError:
        raise UserError("Hugging Face models need the `transformers` package (pip install transformers)") from None
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    return transformers


def read_pooling(folder: Path) -> dict:
    """Pooling of a sentence-transformers folder (modules.json → Pooling, Normalize); mean + normalise otherwise."""
    pooling, normalize = "mean", True
    modules = folder / "modules.json"
    if modules.is_file():
        mods = json.loads(modules.read_text())
        normalize = any(m.get("type", "").endswith("Normalize") for m in mods)
        pool = next((m for m in mods if m.get("type", "").endswith("Pooling")), None)
        cfg = folder / (pool or {}).get("path", "1_Pooling") / "config.json"
        if cfg.is_file():
            c = json.loads(cfg.read_text())
            modes = [m for m in ("cls_token", "max_tokens", "mean_tokens") if c.get(f"pooling_mode_{m}")]
            if c.get("pooling_mode_mean_sqrt_len_tokens") or len(modes) > 1:
                raise UserError(f"{cfg}: only one of mean, cls or max pooling is supported")
            pooling = {"cls_token": "cls", "max_tokens": "max", "mean_tokens": "mean"}.get(
                modes[0] if modes else "", "mean"
            )
    return {"pooling": pooling, "normalize": normalize}


def task_of(config) -> str:
    archs = " ".join(getattr(config, "architectures", None) or [])
    if "ForSequenceClassification" in archs:
        return "classification"
    if "ForImageClassification" in archs:
        return "image"
    return "embedding"


def pool(h: torch.Tensor, mask: torch.Tensor, how: str) -> torch.Tensor:
    """Token states (B, T, D) → one vector per sequence, ignoring padding."""
    if how == "cls":
        return h[:, 0]
    m = mask.unsqueeze(-1).to(h.dtype)
    if how == "max":
        return h.masked_fill(m == 0, torch.finfo(h.dtype).min).amax(1)
    return (h * m).sum(1) / m.sum(1).clamp_min(1e-9)


def distill_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Mean (1 − cosine) between the student's and the starting model's embeddings."""
    return (1 - F.cosine_similarity(student, teacher, dim=-1)).mean()


def cosine_sum(student: torch.Tensor, teacher: torch.Tensor) -> float:
    """The embedding task's score per batch: the sum of cosines (evaluation reports its mean)."""
    return float(F.cosine_similarity(student, teacher, dim=-1).sum())


class HFModule(nn.Module):
    """A transformers model behind a plain-tensor forward (what tracing, DepGraph and ONNX need)."""

    def __init__(self, model: nn.Module, path: str, task: str, pooling: str = "mean", normalize: bool = True):
        super().__init__()
        self.model = model
        self.path, self.task, self.pooling, self.normalize = path, task, pooling, normalize

    def forward(self, input_ids, attention_mask=None):
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        out = self.model(input_ids=input_ids, attention_mask=attention_mask)
        if self.task == "classification":
            return out.logits
        e = pool(out.last_hidden_state, attention_mask, self.pooling)
        return F.normalize(e, dim=-1) if self.normalize else e

    def compress_config(self) -> dict:
        """What config.json records about this wrapper (a run dir says how its model was built)."""
        return {
            "class": f"compress.models.hf.{type(self).__name__}",
            "path": self.path,
            "task": self.task,
            "pooling": self.pooling if self.task == "embedding" else None,
            "normalize": self.normalize if self.task == "embedding" else None,
            "architecture": type(self.model).__name__,
        }

    def compress_loss(self, out, y):
        return distill_loss(out, y) if self.task == "embedding" else F.cross_entropy(out, y)

    def compress_score(self, out, y) -> float:
        if self.task == "embedding":
            return cosine_sum(out, y)
        return float((out.argmax(-1) == y).sum())

    def compress_report(self, dense: nn.Module, small: nn.Module, eval_data) -> dict:
        """Heads and neurons per layer (dense → kept) and, for embeddings, held-out cosine and NN agreement."""
        rep = {
            "task": self.task,
            "layers": [
                {"layer": d["layer"], "heads": [d["heads"], c["heads"]], "neurons": [d["neurons"], c["neurons"]]}
                for d, c in zip(structure(dense), structure(small))
            ],
        }
        if self.task == "embedding" and eval_data is not None:
            from compress.train.text import embedding_agreement

            rep.update(embedding_agreement(embed(small, eval_data), eval_data.targets))
        return rep


class HFImageModule(HFModule):
    """An image classifier: pixel_values → logits (the ONNX input keeps that name)."""

    def forward(self, pixel_values):
        return self.model(pixel_values=pixel_values).logits


def auto_config(path: str | Path):
    """The folder's transformers config; a folder whose config.json is not a model's (e.g. a
    sentence-transformers `1_Pooling/` subfolder) is a user error, not a traceback."""
    try:
        return import_transformers().AutoConfig.from_pretrained(str(path))
    except (ValueError, OSError, KeyError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(
            f"hf:{path} is not a Hugging Face model folder transformers can load ({first}); give the folder that "
            "holds the model's config.json and weights"
        ) from None


def load(path: str | Path) -> HFModule:
    """The folder's model in its wrapper, eval mode, eager attention (traceable, exact head removal)."""
    folder = Path(path)
    if not (folder / "config.json").is_file():
        raise UserError(f"hf:{path} is not a Hugging Face model folder (no config.json)")
    tf = import_transformers()
    config = auto_config(folder)
    task = task_of(config)
    # dropout off for embeddings: the target is the starting model's deterministic embedding
    kw = {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0} if task == "embedding" else {}
    auto = {
        "embedding": tf.AutoModel,
        "classification": tf.AutoModelForSequenceClassification,
        "image": tf.AutoModelForImageClassification,
    }[task]
    try:
        model = auto.from_pretrained(str(folder), attn_implementation="eager", **kw)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load hf:{path}: {e}") from e
    if task == "embedding" and getattr(model, "pooler", None) is not None:
        model.pooler = None  # unused by sentence pooling; keeps it out of the graph and the ONNX file
    pool_cfg = read_pooling(folder) if task == "embedding" else {}
    return (HFImageModule if task == "image" else HFModule)(model, str(folder), task, **pool_cfg).eval()


def tokenizer(path: str | Path):
    tf = import_transformers()
    try:
        return tf.AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError) as e:
        raise UserError(f"hf:{path} has no usable tokenizer for text data: {e}") from e


def example_input(config, batch: int = 1, seq_len: int = SEQ_LEN, task: str = "embedding"):
    """Deterministic inputs: token ids (avoiding the special ids at the bottom of the vocabulary) + a full mask."""
    g = torch.Generator().manual_seed(0)
    if task == "image":
        size = getattr(config, "image_size", 224)
        return torch.rand(batch, getattr(config, "num_channels", 3), size, size, generator=g)
    vocab = getattr(config, "vocab_size", 1000)
    seq_len = min(seq_len, getattr(config, "max_position_embeddings", seq_len))
    ids = torch.randint(min(1000, vocab // 2), vocab, (batch, seq_len), generator=g)
    return ids, torch.ones(batch, seq_len, dtype=torch.long)


def hf_spec(spec: str) -> ModelSpec:
    """The ModelSpec of `hf:PATH`: build, example input, the built-in data and `data_from(--data)`."""
    path = spec[len(PREFIX) :]
    if not path or not Path(path).is_dir():
        raise UserError(f"{spec}: PATH must be a local folder with config.json and weights (nothing is downloaded)")
    config = auto_config(path)
    task = task_of(config)

    def data_from(data_spec: str | None):
        return task_data(path, task, data_spec)

    return ModelSpec(
        name=spec,
        build=lambda: load(path),
        example_input=lambda b=1: example_input(config, b, task=task),
        data=(lambda: data_from(None)) if task == "embedding" else None,
        description=f"Hugging Face {getattr(config, 'model_type', '?')} folder ({task})",
        data_from=data_from,
    )


def structure(model: nn.Module) -> list[dict]:
    """Attention heads and MLP neurons per encoder layer (what the report and inspect show)."""
    from compress.structure.attention import attention_units

    rows = []
    for u in attention_units(model):
        holder = model.get_submodule(u.holder)
        layer = model.get_submodule(u.name)
        parent = u.name.rsplit(".", 1)[0] if "." in u.name else ""
        inter = getattr(model.get_submodule(parent), "intermediate", None) if parent else None
        dense = getattr(inter, "dense", None) or getattr(getattr(layer, "mlp", None), "fc1", None)
        rows.append(
            {
                "layer": parent or u.name,
                "heads": getattr(holder, u.heads_attr),
                "neurons": dense.out_features if isinstance(dense, nn.Linear) else None,
            }
        )
    return rows


def embedding_data(path: str, sentences: tuple[list[str], list[str]]):
    """(train, eval) datasets whose targets are the starting model's embeddings."""
    tok, teacher = tokenizer(path), load(path)
    out = []
    for part in sentences:
        ds = TextDataset(tokenize(tok, part), torch.zeros(len(part)), tok.pad_token_id or 0)
        ds.targets = embed(teacher, ds)
        ds.sentences = part
        out.append(ds)
    return tuple(out)


def classification_data(path: str, file: Path):
    rows = read_jsonl(file)
    tok = tokenizer(path)
    label2id = getattr(auto_config(path), "label2id", None) or {}
    names = sorted({lab for _, lab in rows if not isinstance(lab, int)})
    ids = {**{n: i for i, n in enumerate(names)}, **{k: int(v) for k, v in label2id.items() if k in names}}
    parts = []
    for part in held_out_split(rows):
        labels = torch.tensor([lab if isinstance(lab, int) else ids[lab] for _, lab in part])
        parts.append(TextDataset(tokenize(tok, [t for t, _ in part]), labels, tok.pad_token_id or 0))
    return tuple(parts)


def task_data(path: str, task: str, data_spec: str | None):
    """The (train, eval) data of `hf:PATH` for its task from the --data string (None: built-in)."""
    if task == "image":
        raise UserError("an image model takes tensor data: give a module:function returning (train, eval) datasets")
    if task == "classification":
        if data_spec is None or not data_spec.endswith(".jsonl"):
            raise UserError('a sequence-classification model needs a .jsonl file of {"text": ..., "label": ...} lines')
        return classification_data(path, _existing(data_spec))
    if data_spec is None:
        return embedding_data(path, builtin_split())
    return embedding_data(path, held_out_split(read_sentences(_existing(data_spec))))


def _existing(spec: str) -> Path:
    p = Path(spec)
    if not p.is_file():
        raise UserError(f"data file {p} does not exist")
    return p
