"""Per-parameter gradient norms: every path (fused, stacked small CPU tensors, sparse, DTensor, mixed dtypes) gives
the norm ``torch.linalg.vector_norm`` gives for each gradient on its own, and the hot path never reads a device value.
"""

from __future__ import annotations

import math
import os

import pytest
import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.loggers import TensorBoardLogger
from models import token_loader
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn

from lightning_gradguard import GradGuard, GradGuardEngine, GuardConfig
from lightning_gradguard.core import norms as norms_module
from lightning_gradguard.core.measure import Measurement
from lightning_gradguard.core.norms import SMALL_NUMEL, STACK_MIN_TENSORS, per_param_norms
from lightning_gradguard.core.state import GuardState
from lightning_gradguard.output.metrics import step_metrics

NORM_TYPES = [1.0, 2.0, 3.0, 0.5, math.inf]


def norms_by_position(grads, norm_type) -> dict[int, float]:
    """Run per_param_norms and check its contract: every position exactly once, float32 results."""
    out: dict[int, float] = {}
    for group in per_param_norms(grads, norm_type):
        assert group.norms.dtype == torch.float32
        assert group.norms.shape == (len(group.positions),)
        for position, value in zip(group.positions, group.norms.tolist()):
            assert position not in out, f"position {position} in two groups"
            out[position] = value
    assert sorted(out) == list(range(len(grads)))
    return out


def reference(grad: torch.Tensor, norm_type: float) -> float:
    """The independent answer: vector_norm of the dense gradient, in float64."""
    dense = grad.to_dense() if grad.layout != torch.strided else grad
    if dense.numel() == 0:
        return 0.0
    return torch.linalg.vector_norm(dense.to(torch.float64), norm_type).item()


def assert_close(actual: float, expected: float, rel: float) -> None:
    if math.isnan(expected):
        assert math.isnan(actual)
    else:
        assert actual == pytest.approx(expected, rel=rel, abs=1e-30)


def mixed_grads(seed: int = 0) -> list[torch.Tensor]:
    """Tiny tensors (the stacked CPU path), large ones (the fused kernel), four dtypes, odd layouts and magnitudes."""
    g = torch.Generator().manual_seed(seed)
    grads = [torch.randn(3, 4, generator=g) * 10.0**k for k in range(-6, 7)]  # small float32 tensors
    grads += [torch.randn(5, generator=g) for _ in range(STACK_MIN_TENSORS)]  # enough for the stacked CPU path
    grads += [torch.randn(SMALL_NUMEL + 1, generator=g), torch.randn(64, 48, generator=g)]  # large float32
    grads += [torch.randn(40, 30, generator=g).t()]  # non-contiguous
    grads += [torch.randn(7, generator=g).to(dtype) for dtype in (torch.float16, torch.bfloat16, torch.float64)]
    grads += [torch.randn(300, generator=g).to(torch.float16) * 100, torch.randn(5000, generator=g).bfloat16()]
    grads += [torch.randn(9, generator=g).double() for _ in range(STACK_MIN_TENSORS)]  # a stacked float64 group
    grads += [torch.empty(0), torch.randn(1, generator=g)]
    # stacked by shape: 0-dim scalars, a small non-contiguous view, an empty 2-D tensor
    grads += [torch.randn((), generator=g) * 10.0**k for k in (-3, 0, 3)]
    grads += [torch.randn(4, 3, generator=g).t(), torch.empty(0, 4)]
    return grads


@pytest.mark.parametrize("norm_type", NORM_TYPES)
def test_each_norm_equals_vector_norm_of_that_gradient(norm_type):
    grads = mixed_grads()
    got = norms_by_position(grads, norm_type)
    for i, grad in enumerate(grads):
        # half-precision inputs: the kernels accumulate in float32, the reference in float64
        rel = 2e-3 if grad.dtype in (torch.float16, torch.bfloat16) else 1e-5
        assert_close(got[i], reference(grad, norm_type), rel)


@pytest.mark.parametrize("norm_type", [2.0, math.inf])
def test_nan_and_inf_propagate_on_both_cpu_paths(norm_type):
    small = [torch.randn(4) for _ in range(max(STACK_MIN_TENSORS, 8))]
    large = [torch.randn(SMALL_NUMEL * 2) for _ in range(3)]
    small[2][1], small[5][0] = float("nan"), float("inf")
    large[0][7], large[1][3] = float("nan"), float("-inf")
    got = norms_by_position(small + large, norm_type)
    n = len(small)
    assert math.isnan(got[2]) and math.isnan(got[n])
    assert got[5] == math.inf and got[n + 1] == math.inf
    healthy = [i for i in range(n + 3) if i not in (2, 5, n, n + 1)]
    assert all(math.isfinite(got[i]) for i in healthy)


def test_half_precision_norms_are_not_rounded_to_half():
    grad = torch.full((1000,), 3.0).bfloat16() + torch.linspace(0, 0.01, 1000).bfloat16()
    got = norms_by_position([grad], 2.0)[0]
    exact = reference(grad, 2.0)
    assert got == pytest.approx(exact, rel=1e-6)  # a bfloat16 result would be off by up to 0.4%


def test_uncoalesced_sparse_embedding_gradient_is_coalesced_first():
    torch.manual_seed(0)
    emb = nn.Embedding(10, 3, sparse=True)
    tokens = torch.tensor([[1, 2, 1, 1], [2, 7, 1, 0]])  # repeated ids: one index several times in the grad
    (emb(tokens) * torch.arange(1.0, 4.0)).sum().backward()
    grad = emb.weight.grad
    assert grad.is_sparse and not grad.is_coalesced()
    wrong = grad._values().norm().item()  # what a naive sparse path would log
    dense = torch.linalg.vector_norm(grad.to_dense()).item()
    assert wrong != pytest.approx(dense, rel=1e-3)

    others = [torch.randn(4) for _ in range(9)]
    for norm_type in NORM_TYPES:
        got = norms_by_position([*others, grad], norm_type)
        assert_close(got[9], reference(grad, norm_type), 1e-5)
        for i, other in enumerate(others):
            assert_close(got[i], reference(other, norm_type), 1e-5)


def test_dtensor_gradients_give_local_shard_norms_flagged_local(tmp_path):
    dist = pytest.importorskip("torch.distributed")
    if not dist.is_available():
        pytest.skip("torch built without distributed")
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        sharded = nn.Parameter(distribute_tensor(torch.randn(6, 4), mesh, [Shard(0)]))
        replicated = nn.Parameter(distribute_tensor(torch.randn(5), mesh, [Replicate()]))
        x = distribute_tensor(torch.randn(4), mesh, [Replicate()])
        ((sharded @ x).sum() + replicated.square().sum()).backward()
        plain = torch.randn(3)
        grads = [sharded.grad, plain, replicated.grad]
        groups = per_param_norms(grads, 2.0)
        local = {p for g in groups if g.local for p in g.positions}
        assert local == {0, 2}
        got = norms_by_position(grads, 2.0)
        assert got[0] == pytest.approx(torch.linalg.vector_norm(sharded.grad.to_local()).item(), rel=1e-6)
        assert got[2] == pytest.approx(torch.linalg.vector_norm(replicated.grad.to_local()).item(), rel=1e-6)
        assert got[1] == pytest.approx(torch.linalg.vector_norm(plain).item(), rel=1e-6)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("norm_type", [2.0, math.inf, 3.0])
def test_accelerator_split_of_large_tensors_keeps_positions_and_values(monkeypatch, norm_type):
    """The accelerator path (large tensors: a reduction each; the rest: fused), run on CPU tensors."""
    monkeypatch.setattr(norms_module, "LARGE_NUMEL", 100)
    g = torch.Generator().manual_seed(1)
    tensors = [torch.randn(n, generator=g) for n in (5, 300, 7, 100, 99, 1000)]
    positions = [10, 11, 12, 13, 14, 15]
    groups = norms_module._accelerator_groups(tensors, positions, norm_type, local=True)
    assert [g.positions for g in groups] == [[11, 13, 15], [10, 12, 14]]
    assert all(g.local and g.norms.dtype == torch.float32 for g in groups)
    got = {p: v for g in groups for p, v in zip(g.positions, g.norms.tolist())}
    for position, tensor in zip(positions, tensors):
        assert got[position] == pytest.approx(reference(tensor, norm_type), rel=1e-5)
    half = [t.bfloat16() for t in tensors]
    for group in norms_module._accelerator_groups(half, positions, norm_type, local=False):
        assert group.norms.dtype == torch.float32


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_grads_on_two_devices_keep_their_device():
    grads = [torch.randn(5), torch.randn(5, device="cuda"), torch.randn(3, device="cuda").half()]
    groups = per_param_norms(grads, 2.0)
    for group in groups:
        assert {grads[p].device for p in group.positions} == {group.norms.device}
    got = norms_by_position(grads, 2.0)
    for i, grad in enumerate(grads):
        assert got[i] == pytest.approx(reference(grad, 2.0), rel=2e-3)


class MixedDtypes(nn.Module):
    """One small linear layer per floating dtype; the loss sums them in float32."""

    def __init__(self) -> None:
        super().__init__()
        self.fp16 = nn.Linear(4, 4).half()
        self.bf16 = nn.Linear(4, 4).bfloat16()
        self.fp32 = nn.Linear(4, 4)
        self.fp64 = nn.Linear(4, 4).double()
        self.unused = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        parts = [layer(x.to(layer.weight.dtype)).float() for layer in (self.fp16, self.bf16, self.fp32, self.fp64)]
        return sum(p.square().mean() for p in parts)


def test_engine_measures_mixed_dtype_model_and_counts_nonfinite():
    torch.manual_seed(0)
    model = MixedDtypes()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    engine = GradGuardEngine(GuardConfig.create(norm_type=3.0), warn=lambda message: None)
    engine.bind(model.named_parameters())
    for step in range(2):
        optimizer.zero_grad()
        engine.start_micro_batch()
        loss = model(torch.randn(2, 4))
        engine.before_backward(loss)
        loss.backward()
        engine.after_backward()
        if step == 1:
            model.fp32.weight.grad[0, 0] = float("nan")
        check = engine.check_step(optimizer, step=step, measure=True)
        names = engine.registry.names
        measured = {names[i]: v for indices, g in check.norms for i, v in zip(indices, g.norms.tolist())}
        expected = {name: reference(p.grad, 3.0) for name, p in model.named_parameters() if p.grad is not None}
        assert set(measured) == set(expected) == {f"{m}.{k}" for m in ("fp16", "bf16", "fp32", "fp64")
                                                     for k in ("weight", "bias")}
        for name, value in measured.items():
            assert_close(value, expected[name], 2e-3 if name.startswith(("fp16", "bf16")) else 1e-5)
        metrics = step_metrics(engine, [check])
        assert metrics["gradguard/nonfinite_params"] == float(step)
    report = engine.report().to_dict()["params"]
    assert report["fp32.weight"]["nonfinite_steps"] == 1
    assert sum(p["nonfinite_steps"] for p in report.values()) == 1
    assert report["unused.weight"]["none_steps"] == 2


def test_measurement_counts_exactly_whether_norms_are_read_or_left_waiting():
    """Each step's norms go into a row of a ring buffer whose counts are taken a block of rows at a time; a logging
    step reads its row at once, a reporter may read a step's norms a few steps later. Counts over 150 steps (full
    blocks and a partial one) are exact, every row read holds its own step's norms, and a loss-scaled step (fused
    AMP) is divided by its scale."""
    state = GuardState()
    shapes = [(3, 4), (5,), (2, 2, 2), (7,), (1,), (6, 3), (4,), (9,), (2, 5), (3,), (8,)]
    state.resize(len(shapes))
    measurement = Measurement(state, 2.0)
    indices = list(range(len(shapes)))
    g = torch.Generator().manual_seed(0)
    nan_steps = zero_steps = inf_steps = 0
    kept: dict[int, tuple[list, list[float]]] = {}

    def check_row(groups, expected):
        (registry, group), = groups
        assert group.norms.tolist() == pytest.approx([expected[registry[p]] for p in group.positions], rel=1e-5,
                                                     nan_ok=True)

    for step in range(150):
        grads = [torch.randn(*shape, generator=g) for shape in shapes]
        if step % 7 == 0:
            grads[0][0, 1] = float("nan")
            nan_steps += 1
        if step % 5 == 1:
            grads[3].zero_()
            zero_steps += 1
        if step % 11 == 2:
            grads[10][4] = -float("inf")
            inf_steps += 1
        scale = torch.tensor(4.0) if step == 100 else None
        groups = measurement.measure(indices, grads, scale)
        expected = [reference(grad, 2.0) / (4.0 if scale is not None else 1.0) for grad in grads]
        if step in (60, 70, 120):  # read later, after a whole block was stacked (60) or within one (70, 120)
            kept[step + 5] = (groups, expected)
        if step in kept:
            check_row(*kept.pop(step))
        if step >= 64 and step % 13 == 0 or scale is not None:  # a logging step reads its norms right away
            check_row(groups, expected)
    measurement.flush()
    nonfinite, zero, measured = (state.values(name).tolist() for name in ("nonfinite_steps", "zero_steps",
                                                                           "measured_steps"))
    assert measured == [150] * len(shapes)
    assert nonfinite == [nan_steps] + [0] * 9 + [inf_steps]
    assert zero == [0, 0, 0, zero_steps] + [0] * 7


# ------------------------------------------------------------ no host reads on steps that do not log
def test_non_logging_steps_never_read_a_device_value(monkeypatch):
    """Gradients on the ``meta`` device have no data: any host read (``.item()``, ``.tolist()``, ``.cpu()``,
    ``bool()``, ``nonzero()``) raises. The engine runs whole accumulation windows on them, norms and non-finite
    counts included, with a parameter that never gets a gradient and one that gets it only sometimes; only the
    logging step's single copy (``step_metrics``) may touch the values, and it does.
    """

    class Branchy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.trunk = nn.Linear(4, 4)
            self.branch = nn.Linear(4, 4)
            self.unused = nn.Linear(4, 4)

        def forward(self, x: torch.Tensor, use_branch: bool) -> torch.Tensor:
            h = self.trunk(x)
            return self.branch(h) if use_branch else h

    monkeypatch.setattr(norms_module, "LARGE_NUMEL", 16)  # the per-tensor reduction path runs too
    model = Branchy().to("meta")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    engine = GradGuardEngine(GuardConfig.create(), warn=lambda message: None)
    engine.bind(model.named_parameters(), module=model)
    micro = 0
    for step in range(4):
        for _ in range(3):
            engine.start_micro_batch()
            loss = model(torch.randn(2, 4, device="meta"), use_branch=micro % 2 == 0).square().mean()
            engine.before_backward(loss)
            loss.backward()
            engine.after_backward()
            micro += 1
        check = engine.check_step(optimizer, step=step, accumulate=3, measure=True)
        optimizer.zero_grad()
        assert check.norms and all(g.norms.device.type == "meta" for _, g in check.norms)
        assert engine.names(check.missing) == ["unused.weight", "unused.bias"]
    with pytest.raises((RuntimeError, NotImplementedError)):
        step_metrics(engine, [check])  # proves the device values are unreadable: the log step is the one copy


# ------------------------------------------------------------ end to end: sparse gradients in a real Trainer
class SparseEmbeddingClassifier(LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(11, 4, sparse=True)
        self.head = nn.Linear(4, 2)
        self.seen: dict[int, dict[str, float]] = {}

    def training_step(self, batch, batch_idx):
        tokens, labels = batch
        return nn.functional.cross_entropy(self.head(self.emb(tokens).mean(1)), labels)

    def on_before_optimizer_step(self, optimizer) -> None:  # runs after the callbacks' hook, before the update
        step = self.trainer.fit_loop.epoch_loop._batches_that_stepped
        self.seen[step] = {n: reference(p.grad, 2.0) for n, p in self.named_parameters()}

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)  # SGD accepts sparse gradients


def test_sparse_embedding_norm_in_tensorboard_is_the_dense_norm(make_trainer, tmp_path):
    model = SparseEmbeddingClassifier()
    logger = TensorBoardLogger(str(tmp_path), name="sparse")
    trainer = make_trainer(callbacks=[GradGuard(summary=False)], logger=logger, log_every_n_steps=1)
    trainer.fit(model, token_loader(4))
    accumulator = EventAccumulator(logger.log_dir, size_guidance={"scalars": 0})
    accumulator.Reload()
    logged = {e.step: e.value for e in accumulator.Scalars("gradguard/norm/emb.weight")}
    assert sorted(logged) == sorted(model.seen) == [0, 1, 2, 3]
    for step, value in logged.items():
        assert value == pytest.approx(model.seen[step]["emb.weight"], rel=1e-5)
    assert os.path.exists(os.path.join(logger.log_dir, "gradguard.json"))
