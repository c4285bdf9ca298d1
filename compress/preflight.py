"""The preflight of a command-line run: before the run directory exists, build the model, take one
training batch, run forward, loss and backward, and turn every mistake a new user makes with their
own data or model (float or one-hot labels, labels out of range, inputs of the wrong shape, a forward
returning a dict or tuple) into one line that names the problem and its fix — not a 60-line traceback
after half a run directory was written.

The check leaves the model as it found it: BatchNorm buffers are restored and gradients cleared (the
training loop reseeds the RNG afterwards), so a run with a preflight is bit-identical to one without.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from compress.errors import UserError
from compress.structure.outputs import pick_output, select_output
from compress.structure.tensors import call_model


@dataclass
class Checked:
    """What the preflight learnt: the example input, and the input shape taken from the data (or None)."""

    example: object
    input_shape: str | None = None


def first_batch(train_data, batch_size: int = 8):
    """(inputs, labels) of the first training batch, as the loop will see them."""
    from compress.train.data import iter_batches, split_batch

    try:
        _, batch = next(iter(iter_batches(train_data, 0, 0, batch_size)))
    except StopIteration:
        raise UserError("the training data is empty", field="data") from None
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - the user's data set failing is the user's to fix
        raise UserError(f"reading the first training batch failed: {_one_line(e)}", field="data") from e
    return split_batch(batch)


def example_from(spec, x, input_shape_given: bool) -> Checked:
    """The example input: `input_shape` or the model's own example_input, else one sample of the data."""
    if input_shape_given:
        return Checked(spec.example_input(1))
    try:
        return Checked(spec.example_input(1))
    except UserError as e:
        if e.field != "input_shape" or not (torch.is_tensor(x) and x.is_floating_point()):
            raise
    shape = (1, *x.shape[1:])
    return Checked(torch.rand(shape, dtype=x.dtype), ",".join(str(d) for d in shape))


def preflight(net: torch.nn.Module, x, y, example, output: str | None = None, data=()) -> str | None:
    """Forward the example and the batch, check outputs and labels, loss and backward: UserError on a fault.
    `output` names the entry of a dict/tuple output to train on (a hook on `net` selects it); returned is
    the entry chosen (`logits` by default), None for a tensor output. The labels
    of every TensorDataset in `data` are checked whole (cheap), the others' on the first batch."""
    from compress.train.evaluate import _KeepBatchNormStats

    _check_shape(x, example)
    was = net.training
    with _KeepBatchNormStats(net):
        try:
            net.train()
            out = _forward(net, x, "a training batch" + _shape_text(x))
            net.eval()
            with torch.no_grad():
                _forward(net, example, "its example input" + _shape_text(example), "")
            out, output = _chosen_output(net, out, output)
            task_loss = getattr(net, "compress_loss", None)  # a wrapper's own task (hf embeddings: distillation)
            if task_loss is None:
                _check_labels(out, y)
                for part in data:
                    if isinstance(part, torch.utils.data.TensorDataset) and len(part.tensors) == 2:
                        _check_labels(out, part.tensors[1])
            try:
                loss = (task_loss or F.cross_entropy)(out, y)
                loss.backward()
            except Exception as e:  # noqa: BLE001
                raise UserError(
                    f"the loss (cross-entropy of outputs{_shape_text(out)} against labels"
                    f"{_shape_text(y)}) failed: {_one_line(e)}"
                ) from e
        finally:
            net.zero_grad(set_to_none=True)
            net.train(was)
    return output


def _forward(net, x, what: str, fix: str = "; the data's inputs do not fit the model"):
    try:
        return call_model(net, x)
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - the user's model failing is the user's to fix
        raise UserError(f"the model's forward failed on {what}: {_one_line(e)}{fix}") from e


def _chosen_output(net, out, output: str | None):
    """The tensor to train on; installs the selection on `net` when the model returns a dict or tuple."""
    if torch.is_tensor(out) and output is None:
        return out, None
    if torch.is_tensor(out):
        raise UserError(
            f"`output` {output!r} was given but the model returns a single tensor; leave `output` out", field="output"
        )
    if not isinstance(out, (dict, tuple, list)):
        raise UserError(
            f"the model returns a {type(out).__name__}; it must return a tensor of logits, a dict "
            "(or Hugging Face ModelOutput) or a tuple"
        )
    key = output if output is not None else ("logits" if isinstance(out, dict) and "logits" in out else None)
    if key is None:
        what = (
            f"a dict with keys {', '.join(map(str, out))}"
            if isinstance(out, dict)
            else f"a {type(out).__name__} of {len(out)}"
        )
        hint = "the key of its logits" if isinstance(out, dict) else "the index of its logits (e.g. 0)"
        raise UserError(f"the model returns {what}, not a tensor of logits: give `output` with {hint}", field="output")
    picked = pick_output(out, key)
    select_output(net, key)
    return picked, key


def _check_shape(x, example) -> None:
    if torch.is_tensor(x) and torch.is_tensor(example) and tuple(x.shape[1:]) != tuple(example.shape[1:]):
        data_shape = ",".join(str(d) for d in (1, *x.shape[1:]))
        raise UserError(
            f"the training inputs have shape {_dims(x)} per sample but the model's example input has "
            f"{_dims(example)}: give `input_shape` {data_shape} (or leave it out: the data's shape is "
            "used)",
            field="input_shape",
        )


def _check_labels(out, y) -> None:
    """Cross-entropy wants int64 class indices in [0, classes): name the usual mistakes and their fix."""
    if not torch.is_tensor(y):
        raise UserError(
            f"the labels are a {type(y).__name__}, not a tensor: return (inputs, label tensor) pairs", field="data"
        )
    classes = out.shape[-1] if out.dim() >= 2 else None
    if y.dim() == 2 and classes is not None and y.shape[-1] == classes:
        raise UserError(
            f"the labels are one-hot ({classes} columns): give class indices instead, e.g. y.argmax(1) as int64",
            field="data",
        )
    if y.is_floating_point():
        raise UserError(
            f"the labels are {str(y.dtype).removeprefix('torch.')}: cross-entropy needs int64 class "
            "indices, e.g. y.long()",
            field="data",
        )
    if classes is not None and out.dim() == 2 and y.numel():
        lo, hi = int(y.min()), int(y.max())
        if lo < 0 or hi >= classes:
            raise UserError(
                f"labels range over {lo}..{hi} but the model outputs {classes} classes: labels must "
                f"be in 0..{classes - 1} (or the classifier needs {hi + 1} outputs)",
                field="data",
            )


def _dims(t, skip: int = 1) -> str:
    return "×".join(str(d) for d in t.shape[skip:]) or "scalar"


def _shape_text(t) -> str:
    return f" of shape {tuple(t.shape)}" if torch.is_tensor(t) else ""


def _one_line(e: Exception) -> str:
    first = str(e).splitlines()[0] if str(e) else ""
    return f"{type(e).__name__}: {first}"
