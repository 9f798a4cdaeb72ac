"""The engine's counts in a checkpoint: by parameter name, so that a resumed run continues them exactly."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional

from lightning_gradguard.core.state import parse_state

if TYPE_CHECKING:
    from lightning_gradguard.core.engine import GradGuardEngine


class SavedCounts:
    """What :meth:`~lightning_gradguard.core.engine.GradGuardEngine.state_dict` saves and
    :meth:`~lightning_gradguard.core.engine.GradGuardEngine.load_state_dict` restores for ``engine``.

    A state loaded before any parameter is bound (a checkpoint restored before the fit binds the model, an unpickled
    guard) waits for the engine's ``bind``, which gives its names indices.
    """

    def __init__(self, engine: GradGuardEngine) -> None:
        self.engine = engine
        self.pending: Optional[Any] = None

    @property
    def unbound(self) -> bool:
        """Counts were loaded but no parameter is bound yet to give them names."""
        return self.pending is not None and not len(self.engine.registry)

    def state_dict(self) -> dict[str, Any]:
        engine = self.engine
        if not len(engine.registry) and self.pending is not None:  # loaded, not bound yet: still those counts
            return self.pending
        engine.sync_size()
        engine.flush()
        steps = engine.state.values("steps")
        allowed = engine.registry.allowed
        return engine.state.state_dict(engine.registry.names, keep=lambda i: bool(steps[i]) and not allowed[i])

    def load(self, state: Any) -> None:
        engine = self.engine
        if not len(engine.registry):
            parsed = parse_state(state)  # fail now, not at bind
            # a state of no run (the Tuner restores the checkpoint it took before lr_find) leaves nothing to name
            held = parsed["steps"] or parsed["backwards"] or parsed["skipped_steps"] or parsed["params"]
            self.pending = state if held else None
            return
        # the checkpoint's counts replace whatever this engine counted before (a guard reused for a resumed fit)
        engine.state.load_state_dict(state, {name: i for i, name in enumerate(engine.registry.names)})
        engine.measurement.reset()
        engine.windows.restart_counts()  # restored backward passes belong to no window here

    def apply_pending(self) -> None:
        """The engine just bound parameters: a state loaded before takes their indices now."""
        if self.pending is not None:
            state, self.pending = self.pending, None
            self.load(state)
