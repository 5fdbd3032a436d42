"""trainer.full_token_steps: the last steps of a run train with every tower's token reduction off (DTP
towers: every token its own segment; patch dropout: every patch; ToMe: r = 0; EViT: keep 1), as FLIP
and CLIPA close their reduced-token training with a short full-token fine-tune (CLIPA: +3.5 points
for 0.36 epoch). The phase's steps are counted in the run's training compute (they cost a vanilla
step), and its final evaluation runs at full tokens. Just before the phase, the model as reduced is
measured once: its quality numbers are logged as <name>_reduced (zeroshot/top1_reduced)."""
from fastclip.compression.measure import QUALITY
from fastclip.loop.compute import TrainingCompute
from fastclip.loop.state import TrainState
from fastclip.schema.errors import ConfigError
from fastclip.schema.steps import steps_of


class FullTokenPhase:
    """When the phase starts (`start`, optimizer steps) and the switch at each step's start."""

    def __init__(self, value, total_steps: int, quality_now, budget_pflops: float | None = None,
                 phase_pflops: float = 0.0):
        self.steps = steps_of(value, total_steps, "trainer.full_token_steps") if value else 0
        if self.steps > total_steps:
            raise ConfigError(f"trainer.full_token_steps={value} is longer than the run ({total_steps} optimizer "
                              f"steps): use fewer steps, or a fraction of the run (0.1: its last 10%)")
        self.start = total_steps - self.steps
        self.quality_now = quality_now
        # trainer.max_pflops: the phase also starts once only its planned spend is left of the budget, so a
        # run whose counted cost drifted above the plan still ends with it (the budget stops the run)
        self.reserve_from = budget_pflops - phase_pflops if budget_pflops and self.steps else None

    def due(self, state: TrainState) -> bool:
        return bool(self.steps) and (state.step >= self.start or (
            self.reserve_from is not None and state.train_pflops >= self.reserve_from))

    def before_step(self, state: TrainState, model, compute: TrainingCompute) -> None:
        """Turns the reduction off at the phase's first step (measuring the reduced model first, once:
        a resume inside the phase keeps the measurement it made); on for any step before it."""
        if not self.steps:
            return
        on = self.due(state) or state.reduced is not None  # once begun, the phase runs to the end
        if on == model.full_tokens:
            return
        if on and state.reduced is None:
            state.reduced = {k: v for k, v in self.quality_now().items() if k.startswith(QUALITY)}
        model.set_full_tokens(on)
        compute.recount()  # a full-token step costs another count per sample

    @staticmethod
    def metrics(state: TrainState) -> dict[str, float]:
        """The reduced model's numbers just before the phase, as <name>_reduced."""
        return {f"{k}_reduced": v for k, v in (state.reduced or {}).items()}
