"""GradGuard for the Hugging Face ``Trainer``: ``Trainer(..., callbacks=[GradGuardCallback()])``.

The implementation is :class:`lightning_gradguard.adapters.hf.GradGuardCallback` (a ``transformers.TrainerCallback``
on the same engine and reporter as the other adapters); this module is its public name, imported only by code that
uses the Hugging Face Trainer, so that ``transformers`` stays an optional dependency.

Example::

    from transformers import Trainer, TrainingArguments
    from lightning_gradguard.hf import GradGuardCallback

    args = TrainingArguments("out", gradient_accumulation_steps=4, report_to=["tensorboard"])
    trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[GradGuardCallback()])
    trainer.train()                     # the report is printed, and written to out/gradguard.json

Raises:
    ModuleNotFoundError: on import, when ``transformers`` (or ``accelerate``, which its Trainer needs) is not
        installed: ``pip install 'lightning-gradguard[hf]'``.

"""

from __future__ import annotations

try:
    import accelerate  # noqa: F401 - the Trainer needs it; say so here rather than at Trainer(...)
    import transformers  # noqa: F401
except ImportError as err:  # pragma: no cover - depends on the environment
    raise ModuleNotFoundError(
        f"lightning_gradguard.hf is GradGuard for the Hugging Face Trainer, which needs `transformers` and "
        f"`accelerate` ({err}): pip install 'lightning-gradguard[hf]'"
    ) from err

from lightning_gradguard.adapters.hf import GradGuardCallback

__all__ = ["GradGuardCallback"]
