"""The Hugging Face Trainer: ``Trainer(..., callbacks=[GradGuardCallback()])`` on tiny models built from a config.

Every test runs a real ``transformers.Trainer`` on the CPU (no download: the models are built from their config)
and checks what a user would: the parameters named, the cause and its fix, the counts of an accumulation window,
strict mode stopping before the weights change, ``gradguard.json`` in ``output_dir``, the norms in
``trainer.state.log_history``, in TensorBoard (read back with its ``EventAccumulator``) and in MLflow (read back
with its client), through ``report_to``.
"""

from __future__ import annotations

import glob
import json
import os
import socket
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

os.environ["HF_HUB_OFFLINE"] = "1"  # nothing is downloaded: every model is built from its config
transformers = pytest.importorskip("transformers", reason="the hf extra: pip install 'lightning-gradguard[hf]'")
pytest.importorskip("accelerate", reason="the hf extra: pip install 'lightning-gradguard[hf]'")

from transformers import (  # noqa: E402 - after the skips
    GPT2Config,
    GPT2LMHeadModel,
    SwinConfig,
    SwinForImageClassification,
    Trainer,
    TrainingArguments,
    ViTConfig,
    ViTForImageClassification,
)

from lightning_gradguard import GradGuardError, GradGuardWarning  # noqa: E402
from lightning_gradguard.config import OPTIONS  # noqa: E402
from lightning_gradguard.hf import GradGuardCallback  # noqa: E402

_CHECKPOINT = ("activation_checkpointing", "activation_checkpointing_kwargs") \
    if "activation_checkpointing" in TrainingArguments.__dataclass_fields__ \
    else ("gradient_checkpointing", "gradient_checkpointing_kwargs")


# ---------------------------------------------------------------------------------------------- tiny models
def vit_config() -> ViTConfig:
    return ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                     image_size=16, patch_size=8, num_labels=3)


def gpt2_config() -> GPT2Config:
    return GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=16, bos_token_id=0, eos_token_id=0)


def vit() -> nn.Module:
    return ViTForImageClassification(vit_config())


def swin() -> nn.Module:
    config = SwinConfig(image_size=16, patch_size=4, embed_dim=16, depths=[1, 1], num_heads=[2, 2], window_size=2,
                        num_labels=3)
    return SwinForImageClassification(config)


def gpt2() -> nn.Module:
    return GPT2LMHeadModel(gpt2_config())


class GPT2WithValueHead(GPT2LMHeadModel):
    """A value head defined for a later stage (RLHF) and never called."""

    def __init__(self, config: GPT2Config) -> None:
        super().__init__(config)
        self.value_head = nn.Linear(config.n_embd, 1)


class ViTWithAuxHeadForImageClassification(ViTForImageClassification):
    """An auxiliary classifier defined and never called (the class name's suffix picks the Trainer's loss)."""

    def __init__(self, config: ViTConfig) -> None:
        super().__init__(config)
        self.aux_classifier = nn.Linear(config.hidden_size, config.num_labels)


class EveryOtherCall(nn.Module):
    """A model whose ``extra`` term joins the loss on every second call only, and whose ``never`` never does."""

    def __init__(self, inner: nn.Module, width: int) -> None:
        super().__init__()
        self.inner = inner
        self.extra = nn.Linear(width, 1)
        self.never = nn.Linear(width, 1)
        self.calls = 0

    def forward(self, **inputs):
        out = self.inner(**inputs)
        self.calls += 1
        if self.calls % 2 == 0:
            out["loss"] = out["loss"] + 0.01 * self.extra(out["logits"][..., :1].expand(*out["logits"].shape[:-1],
                                                                                   self.extra.in_features)).mean()
        return out


def freeze_embeddings(model: nn.Module, module: nn.Module) -> nn.Module:
    for p in module.parameters():
        p.requires_grad_(False)
    return model


def images(n: int = 16) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    return [{"pixel_values": torch.randn(3, 16, 16, generator=g), "labels": torch.tensor(i % 3)} for i in range(n)]


def tokens(n: int = 16) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    data = []
    for _ in range(n):
        ids = torch.randint(0, 64, (12,), generator=g)
        data.append({"input_ids": ids, "labels": ids})
    return data


def train(model: nn.Module, data: list, out, guard: GradGuardCallback, **options) -> Trainer:
    settings = dict(output_dir=str(out), per_device_train_batch_size=4, max_steps=3, learning_rate=1e-2,
                    report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True, logging_steps=1, seed=0)
    settings.update(options)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning)  # transformers' own renames
        warnings.filterwarnings("ignore", message=".*None of the inputs have requires_grad=True.*")  # torch's hint
        trainer = Trainer(model=model, args=TrainingArguments(**settings), train_dataset=data, callbacks=[guard])
        trainer.train()
    return trainer


def checkpointing(reentrant: bool) -> dict:
    return {_CHECKPOINT[0]: True, _CHECKPOINT[1]: {"use_reentrant": reentrant}}


def trainable(model: nn.Module) -> list[str]:
    return [n for n, p in model.named_parameters() if p.requires_grad]


def encoder_parameters(model: nn.Module, base: str) -> list[str]:
    """The trainable parameters of the checkpointed layers: all but the final layer norm and the classifier."""
    return [n for n in trainable(model) if not n.startswith(("classifier.", f"{base}.layernorm."))]


# ---------------------------------------------------------------------------------------------- reentrant checkpoints
@pytest.mark.parametrize(
    "build, embeddings, base, expected",
    [
        (vit, lambda m: m.vit.embeddings, "vit", 32),
        (swin, lambda m: m.swin.embeddings, "swin", 37),
    ],
    ids=["vit", "swin"],
)
def test_reentrant_checkpointing_with_frozen_embeddings_names_every_encoder_parameter_and_the_fix(
    tmp_path, build, embeddings, base, expected
):
    torch.manual_seed(0)
    model = build()
    freeze_embeddings(model, embeddings(model))
    guard = GradGuardCallback()
    with pytest.warns(GradGuardWarning, match="received no gradient at global step 0") as caught:
        train(model, images(), tmp_path, guard, **checkpointing(reentrant=True))
    report = guard.report()
    lost = encoder_parameters(model, base)
    assert sorted(report.missing) == sorted(lost) and len(lost) == expected  # 32 tensors of ViT's 2 layers
    assert {n for n in trainable(model) if n not in lost} <= {n for n in report.params if not report.params[n].missing}
    assert any(n.startswith("classifier.") for n in trainable(model) if n not in lost)  # the classifier trains
    for name in lost:
        entry = report.params[name]
        assert (entry.none_steps, entry.steps, entry.cause) == (3, 3, "no_grad")
        assert "inside a reentrant torch.utils.checkpoint segment" in entry.detail
        assert "none of the segment's inputs required grad" in entry.detail
        assert f'{_CHECKPOINT[1]}={{"use_reentrant": False}}' in entry.detail
        assert "model.enable_input_require_grads()" in entry.detail
        assert "pass use_reentrant=False to checkpoint" not in entry.detail  # the generic fix is replaced
    # the warning points at the user's trainer.train() line, not into transformers
    assert all(os.path.basename(w.filename) == "test_hf.py" for w in caught if w.category is GradGuardWarning)
    saved = json.loads((tmp_path / "gradguard.json").read_text())
    assert sorted(n for n, p in saved["params"].items() if p["none_steps"]) == sorted(lost)
    assert guard.report_path == str(tmp_path / "gradguard.json")


@pytest.mark.parametrize("fix", ["use_reentrant=False", "enable_input_require_grads"])
def test_either_fix_makes_the_checkpointed_vit_healthy(tmp_path, fix):
    torch.manual_seed(0)
    model = vit()
    freeze_embeddings(model, model.vit.embeddings)
    if fix == "enable_input_require_grads":
        model.enable_input_require_grads()
    guard = GradGuardCallback()
    with warnings.catch_warnings():
        warnings.simplefilter("error", GradGuardWarning)
        train(model, images(), tmp_path, guard, **checkpointing(reentrant=fix != "use_reentrant=False"))
    report = guard.report()
    assert report.ok and report.steps == 3 and not report.missing
    assert len(report.params) == len(trainable(model)) == 36


# ---------------------------------------------------------------------------------------------- healthy and unused
def test_a_healthy_gpt2_stays_silent_and_logs_its_norms(tmp_path, capsys):
    torch.manual_seed(0)
    model = gpt2()
    guard = GradGuardCallback(log_every_n_steps=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error", GradGuardWarning)
        trainer = train(model, tokens(), tmp_path, guard, max_steps=4)
    report = guard.report()
    assert report.ok and report.steps == 4 and report.micro_batches == 4
    assert set(report.params) == set(trainable(model))
    assert "GradGuard: all 28 trainable parameters received a gradient at each of 4 optimizer steps" in \
        capsys.readouterr().out
    logged = [entry for entry in trainer.state.log_history if "gradguard/total_norm" in entry]
    assert [entry["step"] for entry in logged] == [2, 4]  # the Trainer's numbering: its loss is logged there too
    assert {entry["step"] for entry in trainer.state.log_history if "loss" in entry} >= {2, 4}
    for entry in logged:
        assert entry["gradguard/none_params"] == 0
        assert entry["gradguard/total_norm"] > 0
        assert {f"gradguard/norm/{name}" for name in trainable(model)} <= set(entry)


@pytest.mark.parametrize(
    "build, data, head, defined",
    [
        (lambda: GPT2WithValueHead(gpt2_config()), tokens, "value_head",
         "self.value_head = nn.Linear(config.n_embd, 1)"),
        (lambda: ViTWithAuxHeadForImageClassification(vit_config()), images, "aux_classifier",
         "self.aux_classifier = nn.Linear(config.hidden_size, config.num_labels)"),
    ],
    ids=["gpt2-value-head", "vit-aux-classifier"],
)
def test_an_unused_head_is_named_with_its_cause(tmp_path, build, data, head, defined):
    torch.manual_seed(0)
    model = build()
    guard = GradGuardCallback()
    with pytest.warns(GradGuardWarning, match=head):
        train(model, data(), tmp_path, guard)
    report = guard.report()
    assert sorted(report.missing) == [f"{head}.bias", f"{head}.weight"]
    entry = report.params[f"{head}.weight"]
    assert (entry.cause, entry.none_steps, entry.steps) == ("unused", 3, 3)
    assert f"module `{head}` (Linear)" in entry.detail and "was never called in the forward pass" in entry.detail
    assert "test_hf.py" in entry.detail and defined in entry.detail  # where the head is defined
    assert f"'{head}.*'" in entry.detail  # the allow_none pattern that would silence it


# ---------------------------------------------------------------------------------------------- accumulation
@pytest.mark.parametrize(
    "build, data",
    [(lambda: EveryOtherCall(gpt2(), 64), tokens), (lambda: EveryOtherCall(vit(), 3), images)],
    ids=["gpt2", "vit"],
)
def test_gradient_accumulation_counts_every_micro_batch(tmp_path, build, data):
    torch.manual_seed(0)
    model = build()
    guard = GradGuardCallback(summary=False)
    with pytest.warns(GradGuardWarning, match="never"):
        train(model, data(), tmp_path, guard, gradient_accumulation_steps=2, per_device_train_batch_size=2,
              remove_unused_columns=False)  # the wrapper's forward(**inputs) names no column
    report = guard.report()
    assert (report.steps, report.micro_batches) == (3, 6)
    never, extra = report.params["never.weight"], report.params["extra.weight"]
    assert (never.steps, never.none_steps, never.micro_batches, never.none_micro_batches) == (3, 3, 6, 6)
    # joined the loss on the 2nd, 4th and 6th micro-batch: a gradient at every step, none from half the micro-batches
    assert (extra.steps, extra.none_steps, extra.micro_batches, extra.none_micro_batches) == (3, 0, 6, 3)
    assert report.intermittent == ["extra.weight", "extra.bias"]
    assert sorted(report.missing) == ["never.bias", "never.weight"]
    inner = report.params[next(n for n in trainable(model) if n.startswith("inner."))]
    assert (inner.steps, inner.none_steps, inner.micro_batches, inner.none_micro_batches) == (3, 0, 6, 0)


class LossFromHiddenStates(Trainer):
    """``compute_loss`` from ``out.hidden_states`` (a tuple inside the model's output), with an auxiliary term on
    every other call: the backward passes reach the model through the nested tensors only."""

    calls = 0

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        labels = inputs.pop("labels")
        out = model(**inputs, output_hidden_states=True)
        hidden = out.hidden_states[-1]
        logits = model.lm_head(hidden)
        loss = nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 64), labels[:, 1:].reshape(-1))
        type(self).calls += 1
        if type(self).calls % 2 == 1:
            loss = loss + model.aux(hidden).pow(2).mean()
        return (loss, out) if return_outputs else loss


def test_a_loss_computed_from_nested_outputs_counts_every_backward_pass(tmp_path):
    torch.manual_seed(0)
    model = gpt2()
    model.aux = nn.Linear(32, 1)
    guard = GradGuardCallback(summary=False)
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=2, max_steps=3, report_to=[],
                             use_cpu=True, save_strategy="no", disable_tqdm=True, gradient_accumulation_steps=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        LossFromHiddenStates(model=model, args=args, train_dataset=tokens(), callbacks=[guard]).train()
    report = guard.report()
    assert (report.steps, report.micro_batches) == (3, 6)
    aux = report.params["aux.weight"]
    assert (aux.steps, aux.none_steps, aux.micro_batches, aux.none_micro_batches) == (3, 0, 6, 3)
    assert report.intermittent == ["aux.weight", "aux.bias"]


# ---------------------------------------------------------------------------------------------- strict mode
def test_strict_mode_raises_before_the_weights_change(tmp_path):
    torch.manual_seed(0)
    model = vit()
    freeze_embeddings(model, model.vit.embeddings)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    guard = GradGuardCallback(strict=True, summary=False)
    with pytest.raises(GradGuardError, match="32 trainable parameters received no gradient at global step 0") as err:
        train(model, images(), tmp_path, guard, **checkpointing(reentrant=True))
    assert "use_reentrant" in str(err.value) and "enable_input_require_grads" in str(err.value)
    assert sorted(err.value.params) == sorted(encoder_parameters(model, "vit"))
    for name, p in model.named_parameters():  # the classifier had a gradient, but no step was taken
        assert torch.equal(p, before[name]), name
    # the run stopped: the report is on disk and no hook of the guard is left on the model
    saved = json.loads((tmp_path / "gradguard.json").read_text())
    assert sum(1 for p in saved["params"].values() if p["none_steps"]) == 32
    assert not model._forward_hooks and not model._forward_pre_hooks


class _RaisesOnce(nn.Module):
    """Wraps a model whose second forward call raises (an out-of-memory error, say) the first time it is trained."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.calls = 0
        self.fail_at: int | None = 2

    def forward(self, input_ids=None, labels=None):
        self.calls += 1
        if self.calls == self.fail_at:
            raise RuntimeError("out of memory (planted)")
        return self.model(input_ids=input_ids, labels=labels)


def _hooks(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_a_retry_after_train_raised_gets_a_working_guard_and_no_hook_is_left(tmp_path):
    # the Trainer calls no callback when train() raises: a notebook retry with a new Trainer and a new callback on
    # the same model and output directory must not be refused, and the earlier guard's hooks must come off
    from torch.overrides import _get_current_function_mode_stack

    torch.manual_seed(0)
    model = _RaisesOnce(gpt2())
    with pytest.raises(RuntimeError, match="out of memory"):
        train(model, tokens(), tmp_path, GradGuardCallback(summary=False))
    model.fail_at = None
    retry = GradGuardCallback(summary=False)
    train(model, tokens(), tmp_path, retry)
    report = retry.report()
    assert report.steps == 3 and report.ok
    assert json.loads((tmp_path / "gradguard.json").read_text())["steps"] == 3
    assert _hooks(model) == 0 and _get_current_function_mode_stack() == []


class _TwoHeads(nn.Module):
    """A classifier whose second head is computed and left out of the loss."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(8, 16)
        self.head = nn.Linear(16, 3)
        self.new_head = nn.Linear(16, 3)

    def forward(self, features=None, labels=None):
        hidden = torch.tanh(self.body(features))
        logits = self.head(hidden)
        self.new_head(hidden)  # planted: computed, left out
        return {"loss": nn.functional.cross_entropy(logits, labels), "logits": logits}


def test_torch_compile_in_the_training_arguments_adds_no_graph_break_and_guesses_no_cause(tmp_path):
    # the Trainer calls torch.compile(model): the guard watches that module, so its hooks stay outside the compiled
    # code, and what happens inside it is not guessed (as for watch() on a compiled model)
    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    data = [{"features": torch.randn(8), "labels": torch.tensor(i % 3)} for i in range(16)]
    guard = GradGuardCallback(summary=False)
    counters.clear()
    train(_TwoHeads(), data, tmp_path, guard, torch_compile=True, torch_compile_backend="aot_eager")
    assert sum(counters["graph_break"].values()) == 0, dict(counters["graph_break"])
    report = guard.report()
    assert report.missing == ["new_head.weight", "new_head.bias"]
    assert report.params["new_head.weight"].cause is None
    assert "inside compiled code" in report.params["new_head.weight"].detail


class _LossThroughTheHeadAlone(Trainer):
    """A compute_loss that calls a submodule directly, past the model's forward (and cuts the body off, planted)."""

    def compute_loss(self, model, inputs, return_outputs=False, **kwargs):
        hidden = torch.tanh(model.body(inputs["features"])).detach()
        return nn.functional.cross_entropy(model.head(hidden), inputs["labels"])


def test_a_loss_that_reaches_only_a_submodule_called_directly_counts_its_backward_pass(tmp_path):
    # the backward pass never reaches the model's output: it is found at the step from the gradients it left
    torch.manual_seed(0)
    model = _TwoHeads()
    data = [{"features": torch.randn(8), "labels": torch.tensor(i % 3)} for i in range(16)]
    guard = GradGuardCallback(summary=False)
    settings = dict(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=3, report_to=[], use_cpu=True,
                    save_strategy="no", disable_tqdm=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        _LossThroughTheHeadAlone(model=model, args=TrainingArguments(**settings), train_dataset=data,
                                 callbacks=[guard]).train()
    report = guard.report()
    assert sorted(report.missing) == ["body.bias", "body.weight", "new_head.bias", "new_head.weight"]
    assert (report.params["head.weight"].none_steps, report.params["head.weight"].micro_batches) == (0, 3)
    assert "set another way" in report.params["body.weight"].detail


def test_strict_mode_on_a_healthy_gpt2_trains_normally(tmp_path):
    torch.manual_seed(0)
    model = gpt2()
    before = model.transformer.h[0].mlp.c_fc.weight.detach().clone()
    guard = GradGuardCallback(strict=True, summary=False)
    trainer = train(model, tokens(), tmp_path, guard)
    assert trainer.state.global_step == 3 and guard.report().ok
    assert not torch.equal(model.transformer.h[0].mlp.c_fc.weight, before)


# ---------------------------------------------------------------------------------------------- report_to
def test_tensorboard_gets_the_norms_the_dashboard_and_the_report_next_to_the_trainers_scalars(tmp_path, capsys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    torch.manual_seed(0)
    model = GPT2WithValueHead(gpt2_config())
    guard = GradGuardCallback(histogram_every_n_steps=2, gradient_flow_every_n_steps=2, summary=False)
    with pytest.warns(GradGuardWarning):
        train(model, tokens(), tmp_path, guard, max_steps=4, logging_steps=2, report_to=["tensorboard"])
    (run,) = glob.glob(str(tmp_path / "runs" / "*"))  # the Trainer's TensorBoard run directory
    events = EventAccumulator(run, size_guidance={"scalars": 0, "tensors": 0, "histograms": 0})
    events.Reload()
    scalars = events.Tags()["scalars"]
    assert [e.step for e in events.Scalars("gradguard/total_norm")] == [e.step for e in events.Scalars("train/loss")]
    assert [e.step for e in events.Scalars("gradguard/none_params")] == [2, 4]
    assert [e.value for e in events.Scalars("gradguard/none_params")] == [2, 2]  # the value head's two tensors
    assert [e.value for e in events.Scalars("gradguard/none_steps/value_head.weight")] == [2, 4]
    assert {f"gradguard/norm/{n}" for n in trainable(model) if not n.startswith("value_head")} <= set(scalars)
    tensors = events.Tags()["tensors"]
    assert "custom_scalars__config__" in tensors  # the dashboard's layout
    assert "gradguard/report/text_summary" in tensors
    histograms = [tag for tag in events.Tags()["histograms"] if tag.startswith("gradguard/grad_hist/")]
    assert histograms and [e.step for e in events.Histograms(histograms[0])] == [2, 4]
    # the gradient-flow picture at the first missing gradient (the first step) and every second step
    assert [e.step for e in events.Images("gradguard/gradient_flow")] == [1, 2, 4]
    from lightning_gradguard.cli import main

    capsys.readouterr()
    assert main(["report", run, "--fail-on-missing"]) == 1  # `gradguard report` reads the run back
    assert "value_head.weight, value_head.bias (unused)" in capsys.readouterr().out


def test_mlflow_in_report_to_gets_the_norms_through_the_trainers_callback(tmp_path, monkeypatch):
    mlflow = pytest.importorskip("mlflow", reason="the mlflow extra: pip install 'lightning-gradguard[mlflow]'")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "gradguard-hf")
    torch.manual_seed(0)
    model = gpt2()
    guard = GradGuardCallback(summary=False)
    trainer = train(model, tokens(), tmp_path / "out", guard, max_steps=2, report_to=["mlflow"])
    client = mlflow.tracking.MlflowClient(tracking_uri=uri)
    (run,) = client.search_runs([client.get_experiment_by_name("gradguard-hf").experiment_id])
    history = client.get_metric_history(run.info.run_id, "gradguard/total_norm")
    logged = [e for e in trainer.state.log_history if "gradguard/total_norm" in e]
    expected = [(e["step"], pytest.approx(e["gradguard/total_norm"])) for e in logged]
    assert [(m.step, m.value) for m in history] == expected and len(expected) == 2
    assert client.get_metric_history(run.info.run_id, f"gradguard/norm/{trainable(model)[0]}")


# ---------------------------------------------------------------------------------------------- DDP
@pytest.mark.slow
def test_ddp_counts_are_global_and_rank_zero_alone_writes(tmp_path):
    """Two gloo ranks started as torchrun starts them; ``rank_head`` joins the loss on rank 0 only."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    script = Path(__file__).with_name("hf_ddp_scenario.py")
    procs = []
    for rank in range(2):
        env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", RANK=str(rank),
                   LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2", OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore",
                   PYTHONPATH=os.pathsep.join(sys.path))
        procs.append(subprocess.Popen([sys.executable, str(script), str(tmp_path)], env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True, start_new_session=True))
    logs = []
    for proc in procs:
        try:
            logs.append(proc.communicate(timeout=180)[0])
        except subprocess.TimeoutExpired:
            for other in procs:
                other.kill()
            pytest.fail("a rank did not finish within 180 s:\n" + "\n".join(p.communicate()[0][-3000:] for p in procs))
    assert all(proc.returncode == 0 for proc in procs), "\n".join(log[-3000:] for log in logs)
    results = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(2)]
    for result in results:  # every rank holds the global counts
        report = result["report"]
        assert (report["steps"], report["micro_batches"]) == (3, 3)
        assert sorted(n for n, p in report["params"].items() if p["none_steps"]) == ["value_head.bias",
                                                                                      "value_head.weight"]
        assert report["params"]["value_head.weight"]["cause"] == "unused"
        distributed = report["distributed"]
        assert (distributed["strategy"], distributed["world_size"]) == ("ddp", 2)
        # DDP's all-reduce gives rank 1 a gradient for rank_head; its own backward passes gave it none
        assert distributed["rank_dependent"]["rank_head.weight"] == {"ranks": [1], "micro_batches": 3}
    assert results[0]["report_path"] == str(tmp_path / "run" / "gradguard.json") and results[1]["report_path"] is None
    assert results[0]["logged_steps"] == [1, 2, 3] and results[1]["logged_steps"] == []
    assert json.loads((tmp_path / "run" / "gradguard.json").read_text()) == results[0]["report"]


# ---------------------------------------------------------------------------------------------- set-up
def test_the_callback_takes_every_option_validated_at_construction():
    import inspect

    assert tuple(inspect.signature(GradGuardCallback).parameters) == OPTIONS
    with pytest.raises(ValueError, match="`norm_type` must be a positive float or 'inf'"):
        GradGuardCallback(norm_type=0)
    with pytest.raises(TypeError, match="`strict` must be True or False"):
        GradGuardCallback(strict="yes")
    with pytest.raises(TypeError, match="unexpected keyword argument 'stric'"):
        GradGuardCallback(stric=True)
    assert GradGuardCallback(allow_none="value_head.*").config.allow_none == ("value_head.*",)


def test_a_named_guard_writes_its_own_report_file(tmp_path):
    torch.manual_seed(0)
    guard = GradGuardCallback(name="lm", summary=False)
    train(gpt2(), tokens(), tmp_path, guard, max_steps=2)
    assert guard.report_path == str(tmp_path / "gradguard-lm.json")
    assert json.loads((tmp_path / "gradguard-lm.json").read_text())["steps"] == 2
    assert not (tmp_path / "gradguard.json").exists()


def test_without_transformers_the_import_says_which_extra_to_install():
    code = "import sys; sys.modules['transformers'] = None; import lightning_gradguard.hf"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                            env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert result.returncode == 1
    assert "ModuleNotFoundError" in result.stderr
    assert "pip install 'lightning-gradguard[hf]'" in result.stderr


def test_the_overhead_benchmark_runs_and_reports_both_variants(tmp_path, capsys):
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "hf_overhead.py"
    spec = importlib.util.spec_from_file_location("benchmark_hf_overhead", path)
    benchmark = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(benchmark)
    assert benchmark.main(["--smoke", "--json", str(tmp_path / "hf.json")]) == 0
    result = json.loads((tmp_path / "hf.json").read_text())
    assert set(result["median_ms"]) == {"no callback", "GradGuardCallback()"}
    assert result["steps"] == {"no callback": 2, "GradGuardCallback()": 2} and result["ratio"] > 0
    assert "GradGuardCallback()" in capsys.readouterr().out
