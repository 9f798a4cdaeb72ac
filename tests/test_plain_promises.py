"""``watch()`` keeps its documented promises at the edges: tensors no module registered, optimizers over the wrong
model, and the user's own exceptions, which always come out of ``with watch(...)`` unchanged."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from plain_models import HealthyNet, batches
from torch import nn

from lightning_gradguard import GradGuardError, watch


def train_watched(model: nn.Module, optimizer: torch.optim.Optimizer, steps: int, inputs=None):
    """``steps`` plain steps on random data under ``watch(model, optimizer)``; returns the closed guard.
    ``inputs``: what each backward pass is limited to (``backward(inputs=...)``)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        with watch(model, optimizer, summary=False) as guard:
            for _ in range(steps):
                model(torch.randn(8, 4)).sum().backward(inputs=inputs)
                optimizer.step()
                optimizer.zero_grad()
    return guard


def _optimizer_with_extra(model, extra):
    return torch.optim.SGD([*model.parameters(), extra], lr=0.1)


def test_an_optimizer_tensor_no_module_registered_is_checked_too():
    torch.manual_seed(0)
    model = HealthyNet()
    temperature = torch.ones(1, requires_grad=True)  # in the optimizer, not in the model
    unused = torch.zeros(1, requires_grad=True)  # in the optimizer, never in the loss
    optimizer = torch.optim.SGD([*model.parameters(), temperature, unused], lr=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        with watch(model, optimizer, summary=False) as guard:
            for x, y in batches(3):
                F.mse_loss(model(x) * temperature, y).backward()
                optimizer.step()
                optimizer.zero_grad()
    report = guard.report()
    assert report.steps == 3
    names = set(report.params)
    assert {"encoder.weight", "head.bias"} <= names
    synthetic = sorted(n for n in names if n.startswith("<"))
    assert synthetic == ["<SGD.param_groups[0][4]>", "<SGD.param_groups[0][5]>"]
    assert report.params["<SGD.param_groups[0][4]>"].none_steps == 0  # the temperature got its gradient
    assert report.params["<SGD.param_groups[0][5]>"].none_steps == 3  # the unused tensor did not
    assert report.missing == ["<SGD.param_groups[0][5]>"]


def test_a_layer_replaced_after_the_optimizer_was_built_is_named_as_such():
    # the classic fine-tuning slip: a new head assigned after the optimizer took the old one's parameters
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model[2] = nn.Linear(8, 2)
    guard = train_watched(model, optimizer, 3)
    report = guard.report()
    assert report.missing == ["<SGD.param_groups[0][2]>", "<SGD.param_groups[0][3]>"]
    old_weight = report.params["<SGD.param_groups[0][2]>"]
    assert old_weight.cause == "unused" and old_weight.none_steps == 3
    assert "shape [3, 8]" in old_weight.detail and "not a parameter of the model" in old_weight.detail
    assert "replaced after the optimizer was created" in old_weight.detail
    assert "allow_none" not in old_weight.detail  # silencing it is not the fix
    assert [(f.kind, f.name) for f in report.findings] == [("not_in_optimizer", "2")]  # the new head, not trained


def test_gradients_assigned_from_autograd_grad_are_checked_and_a_forgotten_one_is_named_as_such():
    """Meta-learning and federated code set .grad by hand from torch.autograd.grad: no backward pass runs. The
    parameters whose .grad was set are healthy; the one the loop forgot is named, and the detail says how the
    others got theirs instead of asking for loss.backward() alone."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    params = list(model.parameters())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        with watch(model, optimizer, summary=False) as guard:
            for _ in range(3):
                grads = torch.autograd.grad(model(torch.randn(8, 4)).sum(), params)
                for param, grad in list(zip(params, grads))[:-1]:  # the last one is forgotten
                    param.grad = grad
                optimizer.step()
                optimizer.zero_grad()
    report = guard.report()
    assert report.steps == 3 and report.missing == ["2.bias"]
    bias = report.params["2.bias"]
    assert bias.cause == "no_backward" and bias.none_steps == 3
    assert "other parameters it updates had one: their .grad was set another way" in bias.detail
    assert all(report.params[name].none_steps == 0 for name in ("0.weight", "0.bias", "2.weight"))


class ScaleMadeInForward(nn.Module):
    """A parameter re-created by every forward call: the model's `scale` is new each step, the optimizer's never
    used."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Linear(4, 3)
        self.scale = nn.Parameter(torch.ones(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.scale = nn.Parameter(torch.ones(3))
        return self.encoder(x) * self.scale


class MetaNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(1, 8)
        self.head = nn.Linear(8, 1)
        self.unused = nn.Linear(2, 2)  # planted: never called

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.body(x)))


def test_maml_inner_steps_through_autograd_grad_do_not_count_as_using_a_parameter():
    """MAML: the inner step differentiates with respect to every parameter (``torch.autograd.grad``), the outer loss
    runs the model on the adapted weights. Being differentiated is not being used: a layer the forward never calls is
    named as never called, not as "used, then left out of the loss"."""
    from torch.func import functional_call

    torch.manual_seed(0)
    model = MetaNet()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        guard = watch(model, optimizer, summary=False)
        for _ in range(3):
            optimizer.zero_grad()
            x = torch.randn(10, 1)
            y = torch.sin(x)
            params = dict(model.named_parameters())
            inner = F.mse_loss(functional_call(model, params, (x,)), y)
            grads = torch.autograd.grad(inner, list(params.values()), create_graph=True, allow_unused=True)
            fast = {n: p if g is None else p - 0.01 * g for (n, p), g in zip(params.items(), grads)}
            F.mse_loss(functional_call(model, fast, (x,)), y).backward()
            optimizer.step()
        guard.close()
    report = guard.report()
    assert report.missing == ["unused.weight", "unused.bias"]
    detail = report.params["unused.weight"].detail
    assert report.params["unused.weight"].cause == "unused"
    assert "module `unused` (Linear)" in detail and "was never called in the forward pass" in detail


def test_a_parameter_made_anew_in_forward_is_named_as_replaced_not_as_unused_by_forward():
    torch.manual_seed(0)
    model = ScaleMadeInForward()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    report = train_watched(model, optimizer, 3).report()
    assert report.missing == ["scale"]
    scale = report.params["scale"]
    assert scale.cause == "unused" and scale.none_steps == 3
    assert "`scale` was replaced after GradGuard and the optimizer took it" in scale.detail
    assert "no optimizer updates" in scale.detail and "created in forward" in scale.detail
    assert "never used" not in scale.detail  # forward does use `scale`: the new one


@pytest.mark.parametrize("added_to_optimizer", [False, True])
def test_a_layer_replaced_mid_run_is_named_as_replaced(added_to_optimizer):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        with watch(model, optimizer, summary=False) as guard:
            for step in range(5):
                if step == 2:
                    model[2] = nn.Linear(8, 3)
                    if added_to_optimizer:
                        optimizer.add_param_group({"params": model[2].parameters()})
                model(torch.randn(8, 4)).sum().backward()
                optimizer.step()
                optimizer.zero_grad()
    report = guard.report()
    assert report.missing == ["2.weight", "2.bias"]
    for name in report.missing:
        detail = report.params[name].detail
        assert report.params[name].none_steps == 3 and report.params[name].cause == "unused"
        assert f"`{name}` was replaced after GradGuard and the optimizer took it" in detail
        assert ("which an optimizer also updates" in detail) is added_to_optimizer
        assert ("no optimizer updates" in detail) is not added_to_optimizer


def test_a_layer_added_to_the_model_and_the_optimizer_mid_run_keeps_its_model_name():
    class Growing(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.blocks = nn.ModuleList([nn.Linear(4, 4)])
            self.depth = 1

        def forward(self, x):
            for block in self.blocks[: self.depth]:
                x = block(x)
            return x

    model = Growing()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with watch(model, optimizer, summary=False, strict=True, allow_none="blocks.2.*") as guard:
        for step in range(6):
            if step == 3:  # progressive growing: a new block, and a param group for it
                model.blocks.append(nn.Linear(4, 4))
                model.blocks.append(nn.Linear(4, 4))  # planted: never called, and allowed to be
                model.depth = 2
                optimizer.add_param_group({"params": [*model.blocks[1].parameters(), *model.blocks[2].parameters()]})
            model(torch.randn(8, 4)).sum().backward()
            optimizer.step()
            optimizer.zero_grad()
    report = guard.report()
    assert sorted(report.params) == ["blocks.0.bias", "blocks.0.weight", "blocks.1.bias", "blocks.1.weight"]
    assert report.params["blocks.1.weight"].steps == 3 and report.ok


class GrowingResidual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem, self.blocks, self.head = nn.Linear(4, 8), nn.ModuleList(), nn.Linear(8, 1)
        self.spare = nn.ModuleList()  # blocks added but never called

    def forward(self, x):
        h = torch.tanh(self.stem(x))
        for block in self.blocks:
            h = h + torch.tanh(block(h))
        return self.head(h)


@pytest.mark.parametrize("accumulate", [1, 3])
def test_parameters_that_join_mid_run_are_not_said_to_have_missed_micro_batches_before_they_joined(accumulate):
    """Progressive growing: a block added to the model and to the optimizer (``add_param_group``) right before a
    forward pass got a gradient from every micro-batch it took part in, yet was reported ``intermittent`` (the
    micro-batches counted before the guard saw it join). A block added but never called is still named, and not as
    ``cleared``: it never had a gradient."""
    torch.manual_seed(0)
    model = GrowingResidual()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    guard = watch(model, optimizer, summary=False)
    for step in range(6):
        if step == 3:
            model.blocks.append(nn.Linear(8, 8))
            model.spare.append(nn.Linear(8, 8))  # planted: never called
            optimizer.add_param_group({"params": [*model.blocks[0].parameters(), *model.spare[0].parameters()]})
        for _ in range(accumulate):
            F.mse_loss(model(torch.randn(8, 4)), torch.randn(8, 1)).backward()
        optimizer.step()
        optimizer.zero_grad()
    report = guard.close()
    assert report.intermittent == []
    assert {name: (p.steps, p.none_steps, p.none_micro_batches) for name, p in report.params.items()
            if name.startswith("blocks.")} == dict.fromkeys(["blocks.0.weight", "blocks.0.bias"], (3, 0, 0))
    assert sorted(report.missing) == ["spare.0.bias", "spare.0.weight"]
    assert report.params["spare.0.weight"].none_steps == 3
    assert report.params["spare.0.weight"].cause not in ("cleared", None)


def test_an_unused_parameter_of_the_root_module_is_not_called_an_optimizer_leftover():
    class WithRootParameter(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layer = nn.Linear(4, 1)
            self.scale = nn.Parameter(torch.ones(1))  # planted: never used

        def forward(self, x):
            return self.layer(x)

    model = WithRootParameter()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    guard = train_watched(model, optimizer, 2)
    scale = guard.report().params["scale"]
    assert scale.cause == "unused" and "never used `scale`" in scale.detail
    assert "replaced" not in scale.detail and "not a parameter of the model" not in scale.detail


def test_a_custom_function_that_returns_no_gradient_is_named_in_a_plain_loop():
    class Scale(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, weight):
            return x * weight

        @staticmethod
        def backward(ctx, grad):
            return grad, None  # planted: no gradient for the weight

    class Scaled(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.ones(4))
            self.head = nn.Linear(4, 1)

        def forward(self, x):
            return self.head(Scale.apply(x, self.weight))

    model = Scaled()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    guard = train_watched(model, optimizer, 3)
    weight = guard.report().params["weight"]
    assert weight.none_steps == 3 and weight.cause == "detached"
    assert "custom torch.autograd.Function `" in weight.detail and "Scale` returns None for this input" in weight.detail


def test_a_backward_pass_limited_to_other_inputs_says_so():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    guard = train_watched(model, optimizer, 2, inputs=list(model[1].parameters()))  # planted
    report = guard.report()
    assert report.missing == ["0.weight", "0.bias"]
    detail = report.params["0.bias"].detail
    assert report.params["0.bias"].cause == "detached" and "backward(inputs=...)" in detail
    assert "never reached the loss" not in detail


def test_a_loss_detached_from_the_model_is_no_backward_in_the_words_of_a_plain_loop():
    model = HealthyNet()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        with watch(model, optimizer, summary=False) as guard:
            for x, y in batches(2):
                loss = F.mse_loss(model(x), y).detach().requires_grad_()  # planted: the backward never reaches it
                loss.backward()
                optimizer.step()
                optimizer.zero_grad()
    report = guard.report()
    assert set(report.missing) == set(report.params) and report.steps == 2
    detail = report.params["head.weight"].detail
    assert report.params["head.weight"].cause == "no_backward"
    assert detail.startswith("no backward pass reached the model before this optimizer step (loss.backward()")
    assert "detached tensors" in detail and "training_step" not in detail


@pytest.mark.parametrize("read", ["report", "close"])
def test_report_and_close_work_before_the_first_backward(read):
    model = HealthyNet()
    optimizer = _optimizer_with_extra(model, torch.ones(1, requires_grad=True))
    guard = watch(model, optimizer, summary=False)
    report = guard.report() if read == "report" else guard.close()
    assert report.steps == 0 and report.params == {} and report.ok
    guard.close()


def test_report_after_steps_then_close_with_an_unregistered_tensor():
    model = HealthyNet()
    extra = torch.ones(1, requires_grad=True)
    optimizer = _optimizer_with_extra(model, extra)
    guard = watch(model, optimizer, summary=False)
    x, y = batches(1)[0]
    (F.mse_loss(model(x), y) + extra.sum()).backward()
    optimizer.step()
    assert guard.report().steps == 1
    assert guard.close().missing == []


class Boom(Exception):
    """The user's own exception."""


@pytest.mark.parametrize("when", ["before any backward", "after a backward", "after a step"])
def test_the_users_exception_comes_out_of_with_watch_unchanged(when):
    model = HealthyNet()
    optimizer = _optimizer_with_extra(model, torch.ones(1, requires_grad=True))
    raised = Boom("the user's own error")
    with pytest.raises(Boom) as info:
        with watch(model, optimizer, summary=False):
            x, y = batches(1)[0]
            if when != "before any backward":
                F.mse_loss(model(x), y).backward()
            if when == "after a step":
                optimizer.step()
            raise raised
    assert info.value is raised
    assert info.value.__context__ is None  # nothing of GradGuard's was raised (and swallowed) on the way out


class FailsInBackward(nn.Module):
    """An encoder, a head and an unused layer; ``fail`` makes the next backward pass raise inside the model (as an
    out-of-memory error would), after it reached the model's output."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Linear(4, 8)
        self.head = nn.Linear(8, 1)
        self.unused = nn.Linear(2, 2)
        self.fail = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.encoder(x))
        if self.fail:
            h.register_hook(_raise_boom)
        return self.head(h)


def _raise_boom(grad: torch.Tensor) -> None:
    raise Boom("out of memory (simulated)")


@pytest.mark.parametrize("accumulate", [1, 2])
def test_a_backward_pass_that_raises_and_is_skipped_leaves_the_counts_exact(accumulate):
    """A loop that catches an error in backward and skips the batch (``except OOM: zero_grad(); continue``): the
    failed pass never reaches autograd's end-of-backward callback, and the passes after it still count."""
    torch.manual_seed(0)
    model = FailsInBackward()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        guard = watch(model, optimizer, summary=False)
        done = 0
        for i, (x, y) in enumerate(batches(12)):
            model.fail = i in (1, 6)
            try:
                F.mse_loss(model(x), y).backward()
            except Boom:
                optimizer.zero_grad()
                continue
            done += 1
            if done % accumulate == 0:
                optimizer.step()
                optimizer.zero_grad()
        guard.close()
    report = guard.report()
    steps = 10 // accumulate
    # with k=2 the zero_grad after a failure also discards the window's earlier micro-batch (batches 0 and 5): the
    # steps apply 8 micro-batches' gradients
    applied = 10 if accumulate == 1 else 8
    assert report.steps == steps
    assert report.missing == ["unused.weight", "unused.bias"] and report.intermittent == []
    for name, p in report.params.items():
        unused = name.startswith("unused")
        assert (p.steps, p.micro_batches, p.none_micro_batches) == (steps, applied, applied if unused else 0), name


def test_strict_modes_error_comes_out_of_with_watch_unchanged():
    model = HealthyNet()
    unused = torch.zeros(1, requires_grad=True)
    optimizer = _optimizer_with_extra(model, unused)
    with pytest.raises(GradGuardError) as info:
        with watch(model, optimizer, strict=True, summary=False):
            x, y = batches(1)[0]
            F.mse_loss(model(x), y).backward()
            optimizer.step()
    assert info.value.params == ["<SGD.param_groups[0][4]>"] and info.value.step == 0


def test_an_optimizer_over_another_models_parameters_is_the_documented_value_error():
    model, other = HealthyNet(), HealthyNet()
    with pytest.raises(ValueError, match="the optimizers hold no trainable parameter of `model`"):
        watch(model, torch.optim.SGD(other.parameters(), lr=0.1))


def test_an_optimizer_over_loose_tensors_only_is_the_documented_value_error():
    model = HealthyNet()
    with pytest.raises(ValueError, match="no trainable parameter of `model`"):
        watch(model, torch.optim.SGD([torch.ones(2, requires_grad=True)], lr=0.1))


def test_a_failed_watch_leaves_no_hook_behind():
    model, other = HealthyNet(), HealthyNet()
    optimizer = torch.optim.SGD(other.parameters(), lr=0.1)
    with pytest.raises(ValueError):
        watch(model, optimizer)
    assert not model._forward_hooks and not model._forward_pre_hooks
    assert not optimizer._optimizer_step_pre_hooks and "zero_grad" not in vars(optimizer)
    assert torch._C._len_torch_function_stack() == 0


class _Head(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(4, 4)
        self.head = nn.Linear(4, 1)
        self.spare = nn.Linear(2, 2)  # planted: never called
        self.skip_body = False

    def forward(self, x):
        return self.head(x if self.skip_body else torch.relu(self.body(x)))


def test_an_optimizer_created_after_watch_is_checked_too_and_not_kept_alive():
    import gc
    import weakref

    torch.manual_seed(0)
    model = _Head()
    other = nn.Linear(3, 3)  # another model, with its own optimizer: not this guard's business
    other_optimizer = torch.optim.SGD(other.parameters(), lr=0.1)
    optimizer = torch.optim.Adam(model.parameters())
    created = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        with watch(model, optimizer, summary=False) as guard:
            for _epoch in range(3):
                optimizer = torch.optim.Adam(model.parameters())  # a new optimizer every epoch
                created.append(weakref.ref(optimizer))
                for x, y in batches(4):
                    optimizer.zero_grad()
                    F.mse_loss(model(x), y).backward()
                    optimizer.step()
                    other_optimizer.zero_grad()
                    other(torch.randn(2, 3)).sum().backward()
                    other_optimizer.step()
            del optimizer
            gc.collect()
            assert [ref() is None for ref in created] == [True, True, True]
    report = guard.report()
    assert report.steps == 12 and report.missing == ["spare.weight", "spare.bias"] and report.intermittent == []
    body = report.params["body.weight"]
    assert (body.steps, body.none_steps, body.micro_batches, body.none_micro_batches) == (12, 0, 12, 0)
    assert "weight" not in "".join(n for n in report.params if n.startswith("<"))  # nothing of the other model


def test_a_second_training_stage_with_its_own_optimizer_is_checked_strictly():
    torch.manual_seed(0)
    model = _Head()
    model.body.requires_grad_(False)
    head_only = torch.optim.SGD(model.head.parameters(), lr=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        guard = watch(model, head_only, summary=False, strict=True, allow_none="spare.*")
        for x, y in batches(2):  # stage 1: the head alone
            F.mse_loss(model(x), y).backward()
            head_only.step()
            head_only.zero_grad()
        model.body.requires_grad_(True)
        everything = torch.optim.SGD(model.parameters(), lr=0.01)  # stage 2: fine-tune all of it
        for x, y in batches(2):
            F.mse_loss(model(x), y).backward()
            everything.step()
            everything.zero_grad()
        report = guard.report()
        assert report.steps == 4 and report.params["body.weight"].steps == 2 and report.ok
        model.skip_body = True
        with pytest.raises(GradGuardError) as info:  # a stage-2 step where the body gets nothing
            model(torch.randn(8, 4)).sum().backward()
            everything.step()
        guard.close()
    assert info.value.params == ["body.weight", "body.bias"]


@pytest.mark.parametrize("when", ["after watch", "after a step", "inside the first window"])
def test_a_watched_model_can_be_deep_copied_and_saved_and_the_copy_carries_no_guard(tmp_path, when):
    """An EMA teacher or a best-model snapshot (``copy.deepcopy(model)``) and ``torch.save(model)`` while the model
    is watched: the guard's hooks referenced the guard, its optimizer and autograd nodes, so copying failed and the
    training loop died. The copy must work like the model and carry nothing of the guard."""
    import copy
    import io

    torch.manual_seed(0)
    model = HealthyNet()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    guard = watch(model, optimizer, summary=False)
    copies = []
    for step in range(3):
        if when == "after watch" and step == 0 or when == "after a step" and step == 2:
            copies.append(copy.deepcopy(model))
        out = model(torch.randn(8, 4))
        if when == "inside the first window" and step == 0:
            copies.append(copy.deepcopy(model))  # between forward and backward, instruments in
            torch.save(model, io.BytesIO())
        F.mse_loss(out, torch.randn(8, 1)).backward()
        optimizer.step()
        optimizer.zero_grad()
    buffer = io.BytesIO()
    torch.save(model, buffer)
    report = guard.close()
    assert report.ok and report.steps == 3
    (snapshot,) = copies
    loaded = torch.load(io.BytesIO(buffer.getvalue()), weights_only=False)
    for other in (snapshot, loaded):
        other(torch.randn(2, 4)).sum().backward()  # runs, and reaches no guard
        assert all(p.grad is not None for p in other.parameters())
        assert "zero_grad" not in vars(other)  # no wrapper travels with the copy
    assert report.steps == guard.report().steps == 3
    torch.save(snapshot, io.BytesIO())


@pytest.mark.parametrize("clear", ["model.zero_grad", "p.grad = None"])
def test_a_loop_that_clears_through_the_model_counts_a_parameter_used_only_in_the_loss(clear):
    """A learned temperature used only in the loss gets its gradient before the backward pass reaches the model's
    output, where the guard notices the pass: the gradients it starts from must be read before (at the forward
    call, since no optimizer's zero_grad ran), or the temperature looks like it got nothing."""
    torch.manual_seed(0)
    model = HealthyNet()
    model.temperature = nn.Parameter(torch.ones(()))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    guard = watch(model, optimizer, summary=False)
    for _ in range(4):
        if clear == "model.zero_grad":
            model.zero_grad()
        else:
            for param in model.parameters():
                param.grad = None
        loss = F.mse_loss(model(torch.randn(8, 4)) / model.temperature, torch.randn(8, 1))
        loss.backward()
        optimizer.step()
    report = guard.close()
    assert report.ok and report.missing == [] and report.intermittent == []
    assert report.params["temperature"].micro_batches == 4


def test_a_layer_no_backward_pass_reaches_is_missing_even_when_gradient_noise_fills_its_grad():
    # annealed gradient noise that fills a None .grad with zeros: the dead layer still trains on nothing but noise
    torch.manual_seed(0)
    model = nn.ModuleDict({"a": nn.Linear(4, 8), "b": nn.Linear(8, 1), "dead": nn.Linear(8, 1)})
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        guard = watch(model, optimizer, summary=False)
        for _ in range(3):
            optimizer.zero_grad()
            F.mse_loss(model["b"](torch.tanh(model["a"](torch.randn(8, 4)))), torch.randn(8, 1)).backward()
            for p in model.parameters():
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                p.grad.add_(torch.randn_like(p) * 0.01)
            optimizer.step()
        report = guard.close()
    assert report.missing == ["dead.weight", "dead.bias"] and report.intermittent == []
    assert report.params["dead.weight"].none_steps == 3
