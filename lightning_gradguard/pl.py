"""GradGuard for code written against the older ``pytorch_lightning`` package namespace.

``pytorch_lightning`` and ``lightning.pytorch`` are two copies of the same framework with distinct classes, so a
callback built on ``lightning.pytorch.Callback`` is not an instance of ``pytorch_lightning.Callback``:
``pl.Trainer(callbacks=GradGuard())`` (a single callback, not a list), ``LightningCLI``'s type checks and
``isinstance`` tests in user code reject it. The class here is the same implementation
(:class:`lightning_gradguard.adapters.lightning.GradGuard`, which reads the Trainer by duck typing) with
``pytorch_lightning.Callback`` added to its bases, so it is an instance of both namespaces' ``Callback``.
Checkpoints are interchangeable: the state key is ``GradGuard{...}`` in both.

Example::

    import pytorch_lightning as pl
    from lightning_gradguard.pl import GradGuard

    trainer = pl.Trainer(callbacks=[GradGuard(strict=True)], accumulate_grad_batches=4)
    trainer.fit(model, datamodule)

Raises:
    ModuleNotFoundError: on import, when ``pytorch_lightning`` is not installed (``pip install pytorch-lightning``).

"""

from __future__ import annotations

try:
    import pytorch_lightning
except ImportError as err:  # pragma: no cover - depends on the environment
    raise ModuleNotFoundError(
        "lightning_gradguard.pl is GradGuard for the `pytorch_lightning` package, which is not installed: "
        "pip install pytorch-lightning, or use `from lightning_gradguard import GradGuard` with `lightning`"
    ) from err

from lightning_gradguard.adapters.lightning import GradGuard as _LightningGradGuard


class GradGuard(_LightningGradGuard, pytorch_lightning.Callback):
    __doc__ = _LightningGradGuard.__doc__


__all__ = ["GradGuard"]
