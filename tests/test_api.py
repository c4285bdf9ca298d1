"""The top-level API: every public name of `compress` means the same object on every access, also after
every submodule has been imported (importing a submodule binds its name on the parent package, which once
turned `compress.extract` from the function into the module on its second access). Fresh interpreters,
so the import order is the one under test and not whatever the rest of the suite left behind."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Named by the redesign issue: the optimizers, budgets, run-level deployment and BatchNorm recalibration.
REQUIRED = {
    "RAMDA",
    "RMDA",
    "ProxSGD",
    "ProxAdam",
    "ASGO",
    "DASGO",
    "DSGD",
    "Budget",
    "finetune_to_budget",
    "export_run",
    "bench_run",
    "recalibrate_batchnorm",
    "extract",
    "export_onnx",
    "benchmark",
    "finetune",
    "find_groups",
    "UserError",
}


def all_modules():
    """Every module of the installed package, from the files: compress/…, and cli/… installed as compress.cli."""
    names = []
    for top, pkg in ((ROOT / "compress", "compress"), (ROOT / "cli", "compress.cli")):
        for p in sorted(top.rglob("*.py")):
            parts = list(p.relative_to(top).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            names.append(".".join([pkg, *parts]))
    return names


SCRIPT = r"""
import importlib, inspect, json, sys, types
import compress

order, modules = sys.argv[1], json.loads(sys.argv[2])
def load_all():
    for m in modules:
        importlib.import_module(m)
def describe(v):
    return {"module": isinstance(v, types.ModuleType), "callable": callable(v), "id": id(v),
            "kind": "class" if inspect.isclass(v) else type(v).__name__}
first = {}
if order == "access-first":
    first = {n: describe(getattr(compress, n)) for n in compress.__all__}
load_all()
seen = {n: [describe(getattr(compress, n)), describe(getattr(compress, n))] for n in compress.__all__}
ns = {}
exec("from compress import " + ", ".join(compress.__all__), ns)
# the original failure, as a user met it: the second call of compress.extract raised
# "'module' object is not callable"
import torch
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3)).eval()
x = torch.rand(2, 6)
calls = []
for _ in range(2):
    small, _info = compress.extract(model, compress.find_groups(model, x), x)
    calls.append(bool(torch.allclose(small(x), model(x), atol=1e-6)))
print(json.dumps({"all": compress.__all__, "first": first, "seen": seen,
                  "from_import": {n: id(ns[n]) for n in compress.__all__},
                  "loaded": sorted(m for m in modules if m in sys.modules), "extract_calls": calls}))
"""


@pytest.fixture(scope="module", params=["access-first", "import-first"])
def api(request):
    mods = all_modules()
    res = subprocess.run(
        [sys.executable, "-c", SCRIPT, request.param, json.dumps(mods)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["loaded"] == sorted(mods)  # every submodule really was imported before the accesses
    return out


def test_required_names_are_public(api):
    assert REQUIRED <= set(api["all"]), REQUIRED - set(api["all"])


def test_every_name_is_the_same_object_on_every_access(api):
    for name, (a, b) in api["seen"].items():
        assert not a["module"] and (a["callable"] or name not in REQUIRED), (name, a)
        assert a == b, name  # same object (id), still no module, on the second access
        assert api["from_import"][name] == a["id"], name
        if name in api["first"]:
            assert api["first"][name] == a, name  # importing the submodules did not rebind it


def test_classes_stay_classes_and_functions_stay_functions(api):
    kinds = {n: a["kind"] for n, (a, _) in api["seen"].items()}
    for name in ("RAMDA", "RMDA", "ProxSGD", "ProxAdam", "ASGO", "DASGO", "DSGD", "Budget", "UserError"):
        assert kinds[name] == "class", (name, kinds[name])
    for name in (
        "extract",
        "finetune",
        "finetune_to_budget",
        "export_run",
        "bench_run",
        "recalibrate_batchnorm",
        "export_onnx",
        "benchmark",
        "find_groups",
        "evaluate",
    ):
        assert kinds[name] == "function", (name, kinds[name])


def test_extract_can_be_called_twice(api):
    assert api["extract_calls"] == [True, True]
