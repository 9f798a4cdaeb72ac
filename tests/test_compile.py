"""``torch.compile``: the user's parameter names, no graph break added by the guard, missing gradients still found.

The ``eager`` backend keeps compilation fast: Dynamo still traces the forward pass (hooks included) and splits it
into graphs wherever something cannot be traced, which is what the tests count.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch import Callback, LightningModule
from models import HIDDEN, IN_DIM, regression_loader
from torch import nn

from lightning_gradguard import GradGuard

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


class GraphCounter:
    """A torch.compile backend that counts the graphs Dynamo hands it (each graph break makes one more)."""

    def __init__(self) -> None:
        self.graphs = 0

    def __call__(self, gm: torch.fx.GraphModule, example_inputs):
        self.graphs += 1
        return gm.forward


class UnusedLayerMLP(LightningModule):
    """``unused`` is registered and optimized but never called. Nothing depends on ``batch_idx``: Lightning
    compiles ``training_step`` of a compiled LightningModule too, and Dynamo would specialize on its value."""

    def __init__(self) -> None:
        super().__init__()
        self.l1 = nn.Linear(IN_DIM, HIDDEN)
        self.l2 = nn.Linear(HIDDEN, 1)
        self.unused = nn.Linear(HIDDEN, HIDDEN)

    def forward(self, x):
        return self.l2(torch.relu(self.l1(x)))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.mse_loss(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class CompiledEncoderMLP(LightningModule):
    """A compiled submodule: its parameters are registered as ``encoder._orig_mod.*`` by ``nn.Module``."""

    def __init__(self, backend, with_unused: bool = True) -> None:
        super().__init__()
        encoder = nn.Sequential(nn.Linear(IN_DIM, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, HIDDEN))
        if with_unused:
            encoder.unused = nn.Linear(HIDDEN, HIDDEN)  # registered on the Sequential but ...

            def forward(x, _seq=encoder):  # ... the compiled forward only runs the three layers
                return _seq[2](_seq[1](_seq[0](x)))

            encoder.forward = forward
        self.encoder = torch.compile(encoder, backend=backend)
        self.head = nn.Linear(HIDDEN, 1)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.mse_loss(self.head(self.encoder(x)), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class StepGraphs(Callback):
    """Records the backend's graph count at the end of every batch (to see compilations after the first step)."""

    def __init__(self, counter: GraphCounter) -> None:
        self.counter = counter
        self.after_batch: list[int] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.after_batch.append(self.counter.graphs)


def _fit(make_trainer, model, guard=None, n_batches=4, counter=None):
    callbacks = [c for c in (guard, StepGraphs(counter) if counter else None) if c is not None]
    trainer = make_trainer(callbacks=callbacks, max_epochs=1)
    trainer.fit(model, regression_loader(n_batches))
    return callbacks[-1] if counter else None


def test_compiled_lightning_module_keeps_the_users_names_and_finds_the_unused_layer(make_trainer):
    torch._dynamo.reset()
    model = UnusedLayerMLP()
    compiled = torch.compile(model, backend="eager")
    guard = GradGuard(summary=False)
    _fit(make_trainer, compiled, guard)
    report = guard.report()
    assert set(report.params) == {"l1.weight", "l1.bias", "l2.weight", "l2.bias", "unused.weight", "unused.bias"}
    assert report.missing == ["unused.weight", "unused.bias"]
    assert report.params["unused.weight"].none_steps == 4


def test_compiled_submodule_names_drop_orig_mod_and_the_unused_layer_is_found(make_trainer):
    torch._dynamo.reset()
    model = CompiledEncoderMLP(backend="eager")
    assert "encoder._orig_mod.unused.weight" in dict(model.named_parameters())  # what nn.Module calls it
    guard = GradGuard(summary=False)
    _fit(make_trainer, model, guard)
    report = guard.report()
    assert not any("_orig_mod" in name for name in report.params)
    assert report.missing == ["encoder.unused.weight", "encoder.unused.bias"]
    assert report.params["encoder.0.weight"].none_steps == 0


@pytest.mark.parametrize("compile_whole", [True, False], ids=["module", "submodule"])
def test_the_guard_adds_no_graph_break_and_no_recompilation(make_trainer, compile_whole):
    graphs = {}
    for label in ("without", "with"):
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        counter = GraphCounter()
        if compile_whole:
            model = torch.compile(UnusedLayerMLP(), backend=counter)
        else:
            model = CompiledEncoderMLP(backend=counter)
        guard = GradGuard(summary=False) if label == "with" else None
        steps = _fit(make_trainer, model, guard, n_batches=5, counter=counter)
        graph_breaks = sum(torch._dynamo.utils.counters["graph_break"].values())
        graphs[label] = (counter.graphs, graph_breaks, steps.after_batch)
    (without, breaks_without, _), (with_guard, breaks_with, per_batch) = graphs["without"], graphs["with"]
    assert with_guard == without  # the same number of graphs: the guard's instruments trace without a break
    assert breaks_with == breaks_without
    assert per_batch[1:] == [per_batch[0]] * (len(per_batch) - 1)  # steady state: nothing compiled after batch 0


class _Scriptable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(4, 4)
        self.head = nn.Linear(4, 1)
        self.spare = nn.Linear(2, 2)  # planted: never called

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.body(x)))


@pytest.mark.parametrize("with_spare", [False, True])
def test_a_torchscript_model_is_watched_and_nothing_is_guessed(with_spare):
    from lightning_gradguard import watch

    torch.manual_seed(0)
    eager = _Scriptable() if with_spare else nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 1))
    model = torch.jit.script(eager)  # a ScriptModule takes no forward hook: the per-parameter detector stays
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with watch(model, optimizer, summary=False, strict=not with_spare) as guard:
        for _ in range(3):
            F.mse_loss(model(torch.randn(8, 4)), torch.randn(8, 1)).backward()
            optimizer.step()
            optimizer.zero_grad()
    report = guard.report()
    assert report.steps == 3
    if with_spare:
        assert report.missing == ["spare.weight", "spare.bias"]
        spare = report.params["spare.weight"]
        assert spare.none_steps == 3 and spare.cause is None and "compiled code" in spare.detail
    else:
        assert report.ok and report.missing == []


class AuxLeftOut(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(4, 8)
        self.aux = nn.Linear(8, 8)
        self.head = nn.Linear(8, 1)

    def forward(self, x):
        h = torch.tanh(self.body(x))
        aux = self.aux(h)  # planted: computed, never used
        del aux
        return self.head(h)


def test_a_compiled_graph_is_not_called_a_custom_autograd_function_of_the_user():
    """nanoGPT's order: build the optimizer, compile, and watch the module itself. The compiled graph reaches the
    backward pass as a Function of torch.compile's own; its None gradient must not be blamed on a Function the user
    never wrote, nor come with a fix that cannot be applied."""
    from lightning_gradguard import watch

    torch.manual_seed(0)
    model = AuxLeftOut()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    compiled = torch.compile(model, backend="aot_eager")
    guard = watch(model, optimizer, summary=False)
    for _ in range(2):
        F.mse_loss(compiled(torch.randn(8, 4)), torch.randn(8, 1)).backward()
        optimizer.step()
        optimizer.zero_grad()
    report = guard.close()
    assert sorted(report.missing) == ["aux.bias", "aux.weight"]
    detail = report.params["aux.weight"].detail
    assert report.params["aux.weight"].cause is None
    assert "compiled code" in detail and "custom torch.autograd.Function" not in detail


def _compiled_loop(guarded: bool) -> tuple[int, object]:
    from lightning_gradguard import watch

    torch.manual_seed(0)
    counter = GraphCounter()
    model = AuxLeftOut()
    model.spare = nn.Linear(8, 8)  # planted: never called
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    compiled = torch.compile(model, backend=counter)
    guard = watch(compiled, optimizer, summary=False) if guarded else None
    for step in range(4):
        if step == 2:
            with torch.no_grad():  # an evaluation pass inside the diagnosis window
                compiled.eval()
                compiled(torch.randn(8, 4))
                compiled.train()
        F.mse_loss(compiled(torch.randn(8, 4)), torch.randn(8, 1)).backward()
        optimizer.step()
        optimizer.zero_grad()
    return counter.graphs, guard.close() if guard is not None else None


def test_watch_given_the_compiled_model_adds_no_graph_break():
    """The documented order for a plain loop: compile, then watch the compiled model (its hooks stay outside the
    compiled graph). Dynamo hands the backend as many graphs as without the guard (the evaluation pass compiles one
    of its own), and the guard finds the unused layers all the same."""
    graphs, _ = _compiled_loop(guarded=False)
    guarded_graphs, report = _compiled_loop(guarded=True)
    assert guarded_graphs == graphs
    assert sorted(report.missing) == ["aux.bias", "aux.weight", "spare.bias", "spare.weight"]
