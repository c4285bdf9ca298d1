"""Task 1: digits-resnet on scikit-learn digits (stratified 75/25 split, seed 0).

One dense model (AdamW, cosine, 30 epochs) is the starting point of every method. Then each
method gets the same budget of E epochs (batch 64) on the same training split:

* tp-magnitude: prune to the FLOP target (no training), then E epochs AdamW fine-tuning;
* tp-regularized: E/2 epochs of GroupNormPruner sparse training, prune, E/2 epochs fine-tuning;
* oto-hesso: E epochs of HESSO (prunes during training), then OTO's subnet;
* ours (ramda / proxsgd / proxadam): E epochs of `compress.finetune` with the group lasso,
  then `compress.extract` (zero groups removed, nothing else).

Accuracy and cross-entropy are measured on the 25% held-out split; FLOPs with our counter;
speed with our export + benchmark.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from common import Result, Task, Timer, cosine_lr, measure, tensor_batches, train_loop

from compress.models import get_model
from compress.structure.cost import count_flops, count_params

BATCH = 64


def settings(quick: bool) -> dict:
    """Everything that differs between --quick and the full run, in one place (printed in the report)."""
    if quick:
        return {
            "dense_epochs": 3,
            "epochs": 2,
            "fractions": [0.1],
            "oto_sparsity": [0.7],
            "lams": {"ramda": [1e-3]},
            "bench": {"quick": True},
            "tp_steps": 20,
        }
    return {
        "dense_epochs": 30,
        "epochs": 30,
        "fractions": [0.3, 0.1, 0.04],
        "oto_sparsity": [0.45, 0.6, 0.68],
        # λ grids: one pilot sweep per optimizer at λ ∈ {1e-4, 1e-3, 1e-2} (plus 0.1, 1 for ProxSGD,
        # which made no zero group below 0.1), then values spread over FLOP fractions 1 … 0.05
        "lams": {"ramda": [1e-3, 3e-3, 1e-2, 2e-2], "proxadam": [1e-2, 3e-2, 6e-2], "proxsgd": [0.02, 0.05]},
        "bench": {},
        "tp_steps": 200,
    }


@torch.no_grad()
def evaluate(model, x, y) -> dict:
    model.eval()
    out = model(x)
    return {"accuracy": float((out.argmax(1) == y).float().mean()), "loss": float(F.cross_entropy(out, y))}


class Digits(Task):
    settings = staticmethod(settings)

    def setup(self) -> None:
        spec = get_model("digits-resnet")
        self.spec = spec
        tr, te = spec.data()
        self.xtr, self.ytr = tr.tensors
        self.xte, self.yte = te.tensors
        self.train_ds, self.eval_ds = tr, te
        self.example = spec.example_input(1)
        self.batches = tensor_batches((self.xtr,), self.ytr, BATCH, seed=self.seed)
        self.dense()

    # -- dense starting point -------------------------------------------------------------
    def dense(self) -> None:
        torch.manual_seed(0)
        m = self.spec.build()
        e = self.cfg["dense_epochs"]
        opt = torch.optim.AdamW(m.parameters(), lr=3e-3, weight_decay=1e-4)
        with Timer() as t:
            losses = train_loop(m, self.batches, e, opt, cosine_lr(3e-3, e), F.cross_entropy)
        self.model = m.eval()
        self.flops_dense = count_flops(m, self.example)
        self.params_dense = count_params(m)
        from common import export

        self.dense_onnx = self.out / "dense.onnx"
        export(m, self.example, self.dense_onnx, eval_data=self.eval_ds)
        ev = evaluate(m, self.xte, self.yte)
        self.dense_eval = ev
        self.log(f"dense: {ev['accuracy']:.4f} accuracy, {self.flops_dense} FLOPs, {t.seconds:.1f}s")
        self.rows.append(
            Result(
                "digits",
                "dense",
                f"AdamW {e} ep",
                ev["accuracy"],
                self.flops_dense,
                self.flops_dense,
                self.params_dense,
                self.params_dense,
                1.0,
                1.0,
                extra={
                    "eval_loss": ev["loss"],
                    "train_loss": losses[-1],
                    "seconds": t.seconds,
                    "min_speedup_b1": 1.0,
                    "min_speedup_b32": 1.0,
                },
            )
        )

    def _row(self, method: str, setting: str, model, extra: dict) -> Result:
        ev = evaluate(model, self.xte, self.yte)
        name = f"{method}_{setting}".replace(" ", "_").replace("=", "").replace("/", "")
        meas = measure(
            model,
            self.example,
            self.dense_onnx,
            self.out / "onnx",
            name,
            None,
            self.flops_dense,
            export_kw={"eval_data": self.eval_ds},
            bench_kw=self.cfg["bench"],
        )
        r = Result(
            "digits",
            method,
            setting,
            ev["accuracy"],
            meas["flops"],
            self.flops_dense,
            meas["params"],
            self.params_dense,
            meas["speedup_b1"],
            meas["speedup_b32"],
            meas["ms_b1"],
            meas["ms_b32"],
            extra={
                "eval_loss": ev["loss"],
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
            f"{method:16s} {setting:14s} acc {r.metric:.4f}  FLOPs {r.flop_fraction:.3f}  "
            f"speedup b1 {r.speedup_b1:.2f}× b32 {r.speedup_b32:.2f}×"
        )
        self.rows.append(r)
        return r

    def _finetune_adamw(self, m, epochs: int, after_backward=None) -> list[float]:
        opt = torch.optim.AdamW(m.parameters(), lr=1e-3, weight_decay=1e-4)
        return train_loop(m, self.batches, epochs, opt, cosine_lr(1e-3, epochs), F.cross_entropy, after_backward)

    # -- peers ----------------------------------------------------------------------------
    def tp_magnitude(self) -> None:
        self._tp_magnitude("tp-magnitude")

    def tp_magnitude_r8(self) -> None:
        """tp-magnitude with `round_to=8`: kept channel counts are multiples of 8, which ONNX Runtime's
        blocked (NCHWc) convolutions need to run fast (see the README's alignment note)."""
        self._tp_magnitude("tp-magnitude-r8", round_to=8)

    def _tp_magnitude(self, method: str, **pruner_kw) -> None:
        from tp_peers import make_pruner, prune_to_flops

        E = self.cfg["epochs"]
        for f in self.cfg["fractions"]:
            m = copy.deepcopy(self.model)
            with Timer() as t:
                pr = make_pruner(
                    "magnitude", m, self.example, [m.fc], steps=self.cfg["tp_steps"], max_ratio=0.95, **pruner_kw
                )
                reached = prune_to_flops(m, pr, self.example, f, steps=self.cfg["tp_steps"])
                before = evaluate(m, self.xte, self.yte)["accuracy"]
                losses = self._finetune_adamw(m, E)
            if not reached["target_met"]:
                self.notes.append(
                    f"{method} stopped at FLOP fraction {reached['flop_fraction']:.3f} above its target "
                    f"{f} (pruner's maximum ratio reached)"
                )
            self._row(
                method,
                f"flops≤{f}",
                m,
                {"acc_before_ft": before, "train_loss": losses[-1], "seconds": t.seconds, **reached},
            )

    def tp_regularized(self) -> None:
        from tp_peers import make_pruner, prune_to_flops

        E = self.cfg["epochs"]
        for f in self.cfg["fractions"]:
            m = copy.deepcopy(self.model)
            with Timer() as t:
                pr = make_pruner(
                    "regularized", m, self.example, [m.fc], steps=self.cfg["tp_steps"], max_ratio=0.95, reg=5e-4
                )
                sparse_losses = self._finetune_adamw(m, E // 2 or 1, after_backward=lambda pr=pr, m=m: pr.regularize(m))
                reached = prune_to_flops(m, pr, self.example, f, steps=self.cfg["tp_steps"])
                before = evaluate(m, self.xte, self.yte)["accuracy"]
                losses = self._finetune_adamw(m, E - (E // 2 or 1) or 1)
            self._row(
                "tp-regularized",
                f"flops≤{f}",
                m,
                {
                    "acc_before_ft": before,
                    "train_loss": losses[-1],
                    "sparse_train_loss": sparse_losses[-1],
                    "seconds": t.seconds,
                    **reached,
                },
            )

    def oto(self) -> None:
        import oto_peer

        why = oto_peer.available()
        if why is not None:
            self.log(f"oto-hesso: not run ({why})")
            self.notes.append(f"OTO HESSO could not run: {why}")
            return
        E = self.cfg["epochs"]
        n_steps = -(-len(self.ytr) // BATCH)
        for s in self.cfg["oto_sparsity"]:
            m = copy.deepcopy(self.model)
            try:
                with Timer() as t:
                    sub, st = oto_peer.hesso_train(
                        m,
                        self.example,
                        self.batches,
                        E,
                        n_steps,
                        1e-3,
                        s,
                        F.cross_entropy,
                        cosine_lr(1e-3, E),
                        train_loop,
                    )
            except Exception as e:  # noqa: BLE001 — a peer's failure is a finding, reported in the notes
                self.log(f"oto-hesso: failed at group sparsity {s}: {type(e).__name__}: {e}")
                self.notes.append(f"OTO HESSO failed at target group sparsity {s}: {type(e).__name__}: {e}")
                continue
            if not self.notes or "patches" not in self.notes[0]:
                self.notes.insert(
                    0,
                    "OTO 3.0.1 ran only with three runtime patches applied by the script "
                    "(examples/compare/oto_peer.py): " + "; ".join(oto_peer.PATCHES) + ".",
                )
            self._row(
                "oto-hesso",
                f"group sparsity {s}",
                sub,
                {"train_loss": st["train_losses"][-1], "group_sparsity": st["group_sparsity"], "seconds": t.seconds},
            )

    # -- ours (the shared Task methods) -------------------------------------------------
    def _data(self):
        return self.train_ds, self.eval_ds

    def _train_kw(self, optimizer: str) -> dict:
        return {"batch_size": BATCH, "seed": self.seed}

    def _score(self, model) -> float:
        return evaluate(model, self.xte, self.yte)["accuracy"]

    def _finetune(self, model, epochs: int) -> list[float]:
        return self._finetune_adamw(model, epochs)

    metric_name = "accuracy"
    extra_cols = [
        ("eval loss", "eval_loss", ".3f"),
        ("train loss", "train_loss", ".3f"),
        ("acc before FT", "acc_before_ft", ".3f"),
        ("train s", "seconds", ".0f"),
    ]

    def header(self) -> str:
        c = self.cfg
        lines = [
            f"digits-resnet on scikit-learn digits (1347 train / 450 held-out, stratified, seed 0). Dense start: "
            f"AdamW lr 3e-3, wd 1e-4, cosine, {c['dense_epochs']} epochs, batch {BATCH} → "
            f"{self.dense_eval['accuracy']:.4f}. Budget after the dense model: **{c['epochs']} epochs** for every "
            "method. tp-magnitude(-r8): prune to the FLOP target (Torch-Pruning MagnitudePruner, group L2, global, "
            "small steps; -r8: round_to=8), then all epochs AdamW lr 1e-3 wd 1e-4 cosine. tp-regularized: half "
            "the epochs GroupNormPruner sparse training (reg 5e-4), prune, half fine-tuning. oto-hesso: all epochs "
            "HESSO-AdamW lr 1e-3, target group sparsity as stated, OTO's subnet. ramda / proxadam / proxsgd: all "
            "epochs `compress.finetune` (toolkit defaults, λ as stated) then `compress.extract`. ramda-budget: "
            "`compress.budget.finetune_to_budget` given the FLOP target, then extract. ramda-budget+ft: 2/3 of the "
            "epochs to the budget, extract, 1/3 AdamW fine-tuning (the peers' routine), as tp-regularized splits.",
            "Accuracy and cross-entropy on the held-out 25%. FLOP fraction = compressed / dense FLOPs (torch flop "
            "counter). Speedup = dense / compressed median latency (min-speedup: ratio of the minima), ONNX Runtime "
            "CPU, 1 intra-op thread, our `benchmark` (interleaved), both models exported by our `export_onnx` "
            "(verified against torch and re-scored on the held-out data).",
        ]
        return self.with_notes(lines)

    def meta(self) -> dict:
        import oto_peer

        return {"settings": self.cfg, "batch": BATCH, "notes": self.notes, "oto_patches": oto_peer.PATCHES}
