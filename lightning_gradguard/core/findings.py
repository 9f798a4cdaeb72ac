"""The run's findings about its set-up: who adds them, and that each warning is warned about once.

A finding (:class:`~lightning_gradguard.report.Finding`) comes from looking at the model and the optimizers rather
than at gradients. Three checks make them, each replacing its own kinds through :meth:`Findings.replace`, and
nothing else writes the list:

* the audit at the start of training (:meth:`Findings.audit`): trainable tensors the model does not register
  (``unregistered``) and parameters in no optimizer (``not_in_optimizer``), see
  :mod:`~lightning_gradguard.core.audit`;
* the optimizer audit that follows the run (:meth:`Findings.follow`), taken again by the step check when the param
  groups or the parameters that receive gradients change;
* the check for weights that never move, at the end of the run (``zero_lr``, ``skipped_by_optimizer``, see
  :mod:`~lightning_gradguard.core.updates`), which warns in its own words.

The report adds a note of its own, made each time it is (:meth:`Findings.never_stepped`): parameters that only
optimizers which never stepped in the run update.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import Callable, Optional

import torch

from lightning_gradguard.core.audit import AUDIT_KINDS, NOT_IN_OPTIMIZER, OptimizerAudit, find_unregistered
from lightning_gradguard.core.messages import never_stepped_note, unmatched_pattern_message
from lightning_gradguard.core.registry import ParamRegistry
from lightning_gradguard.isolation import internal_error
from lightning_gradguard.report import NOTE, Finding


class Findings:
    """The findings of the run so far (:attr:`items`), and the audits that make the set-up's findings.

    Args:
        registry: the engine's registry (names, ``allow_none`` patterns).
        optimizer_audit: the ``not_in_optimizer`` check that follows the run.
        warn: how a new warning reaches the user.

    Example::

        findings = Findings(registry, OptimizerAudit(registry), warn=print)
        findings.audit(model, [optimizer])           # at the start of training
        findings.follow(optimizer)                   # when the optimizers' layout changed
        [f.kind for f in findings.items]

    """

    def __init__(self, registry: ParamRegistry, optimizer_audit: OptimizerAudit, warn: Callable[[str], None]) -> None:
        self.registry = registry
        self.optimizer_audit = optimizer_audit
        self.warn = warn
        self.items: list[Finding] = []
        self._warned: set[tuple[str, str]] = set()
        self._checked_patterns = False

    def replace(self, kinds: Collection[str], found: Sequence[Finding], warn: bool = True) -> None:
        """The findings of ``kinds`` become ``found``; with ``warn``, the warnings among them not warned about
        before are warned now (notes never are)."""
        self.items[:] = [f for f in self.items if f.kind not in kinds] + list(found)
        if not warn:
            return
        new = [f for f in found if f.severity != NOTE and (f.kind, f.name) not in self._warned]
        if not new:
            return
        self._warned.update((f.kind, f.name) for f in new)
        lines = [f"GradGuard found {len(new)} problem{'s' if len(new) != 1 else ''} in the training set-up:"]
        lines += [f"  [{f.kind}] {f.name}: {f.detail}" for f in new]
        self.warn("\n".join(lines))

    def audit(self, module: Optional[torch.nn.Module], optimizers: Sequence[torch.optim.Optimizer]) -> list[Finding]:
        """Look at ``module`` and ``optimizers`` (see :meth:`GradGuardEngine.audit`); returns the new findings."""
        found = find_unregistered(module) if module is not None else []
        found += self.optimizer_audit.start(optimizers) if optimizers else []
        self.optimizer_audit.following = bool(optimizers)
        self.replace(AUDIT_KINDS, found)
        if not self._checked_patterns:  # a typo in allow_none silences nothing: said once, at the first audit
            self._checked_patterns = True
            for pattern in self.registry.unmatched_patterns():
                self.warn(unmatched_pattern_message(pattern, self.registry.names))
        return found

    def never_stepped(
        self, idle: Sequence[tuple[int, torch.optim.Optimizer]], checked: Collection[str], total: int
    ) -> Optional[Finding]:
        """The note for the trainable parameters that only optimizers which never stepped in this run update
        (``idle``: their positions among the run's optimizers, and themselves), in a run of ``total`` checked steps
        (``checked``: the names of the parameters a step checked). Made when the report is, never kept."""
        if not idle or not total:
            return None
        labels: list[str] = []
        names: list[str] = []
        seen: set[int] = set()
        with_grad = 0
        registered = self.registry.names
        for k, optimizer in idle:
            indices, params = self.registry.optimizer_params(optimizer)
            mine = [(i, p) for i, p in zip(indices, params)
                    if p.requires_grad and i not in seen and registered[i] not in checked]
            if not mine:  # (every parameter also in an optimizer that stepped)
                continue
            labels.append(f"{type(optimizer).__name__} (optimizer {k})")
            for i, param in mine:
                seen.add(i)
                names.append(registered[i])
                with_grad += param.grad is not None
        return never_stepped_note(labels, names, with_grad, total) if names else None

    def follow(self, optimizer: Optional[torch.optim.Optimizer] = None) -> None:
        """Take the ``not_in_optimizer`` check again (``optimizer``: the one about to step)."""
        try:
            found = self.optimizer_audit.follow(optimizer)
        except Exception as err:  # noqa: BLE001 - the audit must never stop the step check
            self.optimizer_audit.following = False
            self.warn(internal_error(
                f"GradGuard: internal error in the optimizer audit ({type(err).__name__}: {err}); it is turned off "
                "for the rest of this run, training continues. Please report this at the project's issue tracker."
            ))
            return
        self.replace((NOT_IN_OPTIMIZER,), found)


__all__ = ["Findings"]
