"""The options of `compress finetune`: one typed declaration per flag, named as the library's fields
(`--target-flops` is compress.request.FinetuneOptions.target_flops), so the command stays a signature."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from compress.optim.registry import help_text as optimizer_help

Model = Annotated[
    str | None,
    typer.Option(
        "--model",
        "-m",
        help="Built-in name (see `compress inspect --list`), module:factory, "
        "path/to/file.py:factory, or hf:PATH (a local Hugging Face model folder). \\[default: digits-resnet]",
    ),
]
Out = Annotated[Path | None, typer.Option("--out", "-o", help="Run directory to create.")]
Data = Annotated[
    str | None,
    typer.Option(
        help="module:function returning (train, eval) datasets or loaders. "
        "Built-in models bring their own data. hf: models also take sentences.txt "
        "(embeddings: distillation) or file.jsonl (text/label classification)."
    ),
]
InputShape = Annotated[
    str | None,
    typer.Option(
        help="Example input shape for a custom model, batch first, "
        "e.g. 1,3,32,32 (or give the model an example_input(batch) "
        "method)."
    ),
]
Output = Annotated[
    str | None,
    typer.Option(
        "--output",
        help="For a model whose forward returns a dict, Hugging Face ModelOutput or tuple: the key (or "
        "index) of the logits to train on. \\[default: logits when the dict has it; a tensor output needs none]",
    ),
]
Epochs = Annotated[int | None, typer.Option(help="Training epochs. \\[default: 30]")]
Lr = Annotated[
    float | None,
    typer.Option(
        help="Learning rate (defaults are for fine-tuning a trained model: "
        "ramda 3e-4, rmda/proxsgd 1e-2, proxadam 1e-4; adamw 3e-3)."
    ),
]
Lam = Annotated[
    float | None,
    typer.Option(
        help="Group-lasso strength λ; 0 trains a dense model. Larger λ → more "
        "structures removed. \\[default: 1.5e-2, 0 for adamw]"
    ),
]
Optimizer = Annotated[str | None, typer.Option(help=f"{optimizer_help()} \\[default: ramda]")]
RegSpace = Annotated[
    str | None,
    typer.Option(
        help="ramda/proxadam: group lasso on the parameters (param) or on "
        "the preconditioned variables (preconditioned). \\[default: param]"
    ),
]
DsgdK = Annotated[int | None, typer.Option(help="dsgd: layers updated per step. \\[default: 1]")]
Momentum = Annotated[
    float | None, typer.Option(help="RAMDA/RMDA averaging weight c0 (ramped to 1 in the final stage). \\[default: 0.1]")
]
BatchSize = Annotated[int | None, typer.Option(help="Mini-batch size. \\[default: 64]")]
Milestones = Annotated[
    str | None,
    typer.Option(
        help="Epochs where the learning rate decays by --gamma and RAMDA "
        "restarts, e.g. 15,22. \\[default: half and 3/4 of --epochs]"
    ),
]
Gamma = Annotated[float | None, typer.Option(help="Learning-rate decay factor at milestones. \\[default: 0.1]")]
Schedule = Annotated[
    str | None, typer.Option(help="step (milestones, RAMDA restarts) or cosine (dense training). \\[default: step]")
]
WeightDecay = Annotated[float | None, typer.Option(help="AdamW weight decay (dense training). \\[default: 0]")]
GroupWeight = Annotated[
    str | None,
    typer.Option(
        help="Group weight w_g: size (√entries, the paper's) or flops (∝ the FLOPs removing the group saves: the "
        "regularizer prefers removing the costliest structures). \\[default: size]"
    ),
]
Solver = Annotated[str | None, typer.Option(help="RAMDA subproblem solver: exact or pg. \\[default: exact]")]
Seed = Annotated[int | None, typer.Option(help="Random seed (init, data order). \\[default: 0]")]
Init = Annotated[
    Path | None,
    typer.Option(
        help="Start from these weights (safetensors, a checkpoint, or a "
        "state_dict saved with torch.save; never unpickles code). 'dense': "
        "a built-in model's dense baseline (AdamW, cosine, 30 epochs), "
        "trained once and cached in ~/.cache/compress/dense "
        "($COMPRESS_CACHE). 'random': random weights, on purpose (a sparse "
        "run without --init warns)."
    ),
]
Device = Annotated[str | None, typer.Option(help="auto | cpu | cuda. \\[default: auto]")]
Threads = Annotated[
    int | None,
    typer.Option(
        help="CPU threads for torch. Small models train fastest on 1, "
        "and so does any model on a busy machine. \\[default: torch's]"
    ),
]
Distill = Annotated[
    str | None,
    typer.Option(
        help="Knowledge distillation from the starting model (a frozen copy of the --init weights): kl (classification "
        "logits, with --distill-temperature), cosine or mse (embeddings/outputs), none. \\[default: none]"
    ),
]
DistillTemperature = Annotated[float | None, typer.Option(help="Softmax temperature of --distill kl. \\[default: 4]")]
DistillAlpha = Annotated[
    float | None, typer.Option(help="Weight of the distillation term; the task loss gets 1 − this. \\[default: 0.9]")
]
TargetFlops = Annotated[
    float | None,
    typer.Option(
        help="Budget instead of λ: the exported model's FLOPs as a fraction of the dense model, e.g. 0.5. λ is found "
        "automatically."
    ),
]
TargetParams = Annotated[float | None, typer.Option(help="Budget: parameters as a fraction of the dense model.")]
TargetLatencyMs = Annotated[
    float | None,
    typer.Option(help="Budget: ONNX Runtime CPU latency in ms on this machine, at --bench-batch with --bench-threads."),
]
BenchBatch = Annotated[int | None, typer.Option(help="Batch size of a latency target. \\[default: 1]")]
BenchThreads = Annotated[int | None, typer.Option(help="Intra-op threads of a latency target. \\[default: all cores]")]
FinalOptimizer = Annotated[
    str | None,
    typer.Option(
        help="Target runs: the optimizer of the final phase, which trains the frozen structure (zero groups kept "
        "exactly zero): adamw (lr 1e-3 cosine to 0, wd 1e-4) or same (RAMDA at λ=0; noisier and less accurate on "
        "digits). \\[default: adamw]"
    ),
]
Align = Annotated[
    int | None,
    typer.Option(
        help="Target runs: at the freeze every channel/neuron width keeps a multiple of this many, at the same budget. "
        "ONNX Runtime's CPU convolutions compute channels in blocks of 8 (AVX2) or 16 (AVX-512), so a width of 17 "
        "costs as much as 32: aligned widths turn saved FLOPs into real speed (digits-resnet at half the FLOPs, "
        "batch 1: 1.62× faster than dense aligned, 0.85× unaligned). 1 = off. By default the aligned widths are "
        "measured with ONNX Runtime against the unaligned ones and kept only per layer where they run faster; "
        "a value given here is applied without measuring. \\[default: 16 with AVX-512, else 8, measured]"
    ),
]
FinalLr = Annotated[
    float | None,
    typer.Option(
        help="Target runs: peak learning rate of the final AdamW phase (cosine to 0). Pretrained encoders keep more "
        "with less (all-MiniLM-L6-v2: 1e-4). \\[default: 1e-3]"
    ),
]
FreezeEpoch = Annotated[
    int | None,
    typer.Option(
        help="Target runs: the epoch after which the structure is frozen and the final AdamW phase trains it "
        "(the sparsity phase is the epochs before). With --rewind init an early freeze leaves the chosen structure "
        "most of the epochs (all-MiniLM-L6-v2, 4 epochs, 0.5 FLOPs: cosine 0.80 at 1 vs 0.70 at 3). "
        "\\[default: after the first quarter with --rewind init; else the last --milestones in 60–90% of the epochs, "
        "else the last quarter]"
    ),
]
Rewind = Annotated[
    str | None,
    typer.Option(
        help="Target runs: init restarts the surviving weights from the starting (--init) weights at the freeze, so the "
        "final AdamW phase trains them free of the group lasso's shrinkage, and the freeze comes after the first "
        "quarter of the epochs (the sparsity phase then only chooses the structure); none keeps the trained "
        "survivors. \\[default: init for a pretrained hf: model (with --final-lr = --lr), else none]"
    ),
]
Config = Annotated[Path | None, typer.Option(help="TOML file whose keys mirror these flags (flags win).")]
Resume = Annotated[
    Path | None,
    typer.Option(
        help="Continue an interrupted run directory exactly where it stopped. With --epochs N, make an interrupted or "
        "finished run N epochs long: a step schedule keeps its milestones (the lr stays at its last value, no new "
        "RAMDA restart; the averaging-weight ramp spans the new length), a cosine schedule is stretched over N "
        "epochs (a finished run's lr rises again to its value at the old end on the new curve). Not for target "
        "runs."
    ),
]
Force = Annotated[bool, typer.Option("--force", help="Overwrite the run files in an existing --out directory.")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")]

# compress export
ExportAlign = Annotated[
    int | None,
    typer.Option(
        "--align",
        help="Keep a multiple of this many channels/neurons per layer (extra zero channels are kept: exact). "
        "CPU kernels run 8-aligned widths much faster; 1 removes every zero group. \\[default: 8; 1 for a FLOP or "
        "parameter budget run, whose promise is on FLOPs/params]",
    ),
]
