"""find_groups' dependency graph maps reshapes once (torch-pruning remapped them in every
get_pruning_group): the groups are the same as with remapping, and the mapping runs once."""

from unittest import mock

import pytest
import torch
from torch import nn

from compress.structure import depgraph
from compress.structure.find import find_groups


class _Windows(nn.Module):
    """conv → window partition (view/permute/reshape) → linear per token → back, then a conv head:
    chained reshapes whose index mappings torch-pruning infers."""

    def __init__(self):
        super().__init__()
        self.c1, self.fc1, self.fc2, self.c2 = (
            nn.Conv2d(3, 8, 1),
            nn.Linear(8, 16),
            nn.Linear(16, 8),
            nn.Conv2d(8, 4, 1),
        )

    def forward(self, x):
        h = torch.relu(self.c1(x))  # (B, 8, 4, 4)
        b, c, hh, ww = h.shape
        t = h.permute(0, 2, 3, 1).reshape(b, hh // 2, 2, ww // 2, 2, c).permute(0, 1, 3, 2, 4, 5).reshape(-1, 4, c)
        t = t + self.fc2(torch.relu(self.fc1(t)))
        h = t.reshape(b, hh // 2, ww // 2, 2, 2, c).permute(0, 5, 1, 3, 2, 4).reshape(b, c, hh, ww)
        return self.c2(torch.relu(h)).mean((2, 3))


def _key(groups):
    return [(g.name, g.slices, g.dependents) for g in groups], list(groups.not_prunable)


def _find_counting_reshape_maps(m, x, frozen=True):
    """(groups, calls of torch-pruning's reshape index mapping) of one find_groups."""
    from torch_pruning.dependency import index_mapping as im

    calls, inner, orig_build = [], im.update_reshape_index_mapping, depgraph.build_graph

    def counting(graph, node):
        calls.append(node)
        return inner(graph, node)

    build = lambda *a, frozen=False, _f=frozen, **k: orig_build(*a, frozen=_f, **k)  # noqa: E731
    with (
        mock.patch.object(im, "update_reshape_index_mapping", counting),
        mock.patch("compress.structure.find.build_graph", build),
    ):
        return find_groups(m, x, check=False), len(calls)


def test_frozen_graph_maps_once_and_finds_the_same_groups():
    torch.manual_seed(0)
    m, x = _Windows().eval(), torch.randn(2, 3, 4, 4)
    find_groups(m, x, check=False)  # installs the guards
    frozen, n_frozen = _find_counting_reshape_maps(m, x, frozen=True)
    remapped, n_remapped = _find_counting_reshape_maps(m, x, frozen=False)
    assert len(frozen) and _key(frozen) == _key(remapped)
    assert 0 < n_frozen and 2 * n_frozen < n_remapped  # one pass, instead of one per get_pruning_group


class _Adds(nn.Module):
    """A conv stream through adds that read each tensor twice, then flattened into a Linear:
    torch-pruning infers the flatten's width by walking every input of every add (2^depth walks),
    the walks the shape memo shortens."""

    def __init__(self, depth=6):
        super().__init__()
        self.c1, self.fc = nn.Conv2d(3, 8, 1), nn.Linear(8 * 2 * 2, 3)
        self.convs = nn.ModuleList(nn.Conv2d(8, 8, 1) for _ in range(depth))

    def forward(self, x):
        t = torch.relu(self.c1(x))
        for conv in self.convs:
            t = t + conv(torch.relu(t)) + t
        return self.fc(t.flatten(1))


@pytest.mark.parametrize("max_depth", [500, 12])
def test_shape_memo_answers_as_torch_prunings_walks(max_depth):
    """Every node's inferred width and the depth budget the walk uses are torch-pruning's own, also
    where a walk gives up at the depth limit (12 here); with far fewer channel look-ups."""
    import torch_pruning as tp
    from torch_pruning.dependency import constants
    from torch_pruning.dependency import shape_infer as si

    torch.manual_seed(0)
    m, x = _Adds().eval(), torch.randn(2, 3, 2, 2)
    DG = depgraph.build_graph(m, (x,), {})  # installs the memo
    names = ("infer_out_channels_recursively", "infer_in_channels_recursively")
    plain = {f: getattr(si, f).__wrapped__ for f in names}
    looked_up, lookup = [], tp.DependencyGraph.get_out_channels

    def counting(self, node):
        looked_up.append(node)
        return lookup(self, node)

    def walks(memo):
        out = []
        with mock.patch.object(depgraph, "_SHAPE_MEMO", memo):
            for start in (0, max_depth - 20, max_depth - 3):
                for node in DG.module2node.values():
                    for f in names:
                        depth = [start]
                        out.append((getattr(si, f)(DG, node, depth), depth[0]))
        return out

    with (
        mock.patch.object(constants, "MAX_RECURSION_DEPTH", max_depth),
        mock.patch.object(tp.DependencyGraph, "get_out_channels", counting),
    ):
        with mock.patch.multiple(si, **plain):
            reference = walks(None)
        n_plain = len(looked_up)
        memoised = walks({})
    assert memoised == reference
    assert any(w is None for w, _ in reference) and any(w == 8 for w, _ in reference)
    if max_depth == 500:  # at 12 most walks give up, and a walk that gave up is not stored
        assert 4 * (len(looked_up) - n_plain) < n_plain


class _TwoFlattens(nn.Module):
    """One conv's 8 channels flattened (8 x 4 x 4 = 128 indices) twice, into two classifiers."""

    def __init__(self):
        super().__init__()
        self.c, self.fc1, self.fc2 = nn.Conv2d(3, 8, 1), nn.Linear(128, 2), nn.Linear(128, 2)

    def forward(self, x):
        h = torch.relu(self.c(x))
        return self.fc1(h.flatten(1)) + self.fc2(h.reshape(h.shape[0], -1))


@pytest.mark.parametrize("limit, offered", [(1200, True), (600, False), (100, False)])
def test_flatten_indices_are_capped_per_call_and_per_group(limit, offered):
    """Building the conv's group maps 128 indices through a flatten 8 times (each reshape forward
    and back, twice): at a limit of 600 each call passes but the group's 1,024 do not, so the root
    is refused as at 100 (one call past the limit); 1,200 lets it through."""
    m, x = _TwoFlattens().eval(), torch.rand(1, 3, 4, 4)
    with mock.patch.object(depgraph, "FLATTEN_LIMIT", limit):
        gl = find_groups(m, x, check=False)
    assert any(g.layer == "c" for g in gl) == offered
    if not offered:
        why = dict(gl.not_prunable)["c"]
        assert "IndexExplosion" in why and ("give its group over" in why) == (limit == 600)
