"""The course's training loop made real: events, controls, checkpoints, exact resume, several processes.

`Trainer(settings).run()` is chapter 5's `train_model_simple` (zero_grad, forward, cross-entropy over flattened
logits, backward, AdamW step, evaluate every N steps, print a greedy sample) with what a real run needs: warmup and
cosine decay, gradient clipping and accumulation, checkpoints with everything needed to continue bit for bit, a
control object another thread can pause or stop it with, and DistributedDataParallel when started by torchrun.

One module per concern: `settings` (what a run is, what `--resume` keeps), `events` (what it reports), `control`
(pause, stop, signals), `distributed` (torchrun), `schedule` (the learning rate), `evaluation` (losses, the
overfitting warning, a corpus's loss) and `trainer` (the loop). The names below are the public ones.
"""

from gpt2term.core.metrics import perplexity
from gpt2term.core.training.control import TrainingControl, stop_on_signals
from gpt2term.core.training.evaluation import OVERFIT_EVALS, CorpusEvaluation, OverfittingWatch, evaluate_ids
from gpt2term.core.training.events import (
    EVENT_TYPES,
    CheckpointEvent,
    EvalEvent,
    FailedEvent,
    FinishedEvent,
    Listener,
    PauseEvent,
    SampleEvent,
    StartEvent,
    StepEvent,
    TrainingEvent,
    WarningEvent,
    event_from_dict,
)
from gpt2term.core.training.schedule import learning_rate
from gpt2term.core.training.settings import (
    COURSE_PROMPT,
    DEFAULT_EPOCHS,
    FIXED_ON_RESUME,
    MAX_GRAD_ACCUM,
    PYDOC_PROMPT,
    TrainingSettings,
    resume_settings,
)
from gpt2term.core.training.trainer import STATE_FORMAT, UNWRITTEN_EVENTS, Trainer, TrainingDiverged

__all__ = [
    "COURSE_PROMPT",
    "DEFAULT_EPOCHS",
    "EVENT_TYPES",
    "FIXED_ON_RESUME",
    "MAX_GRAD_ACCUM",
    "OVERFIT_EVALS",
    "PYDOC_PROMPT",
    "STATE_FORMAT",
    "UNWRITTEN_EVENTS",
    "CheckpointEvent",
    "CorpusEvaluation",
    "EvalEvent",
    "FailedEvent",
    "FinishedEvent",
    "Listener",
    "OverfittingWatch",
    "PauseEvent",
    "SampleEvent",
    "StartEvent",
    "StepEvent",
    "Trainer",
    "TrainingControl",
    "TrainingDiverged",
    "TrainingEvent",
    "TrainingSettings",
    "WarningEvent",
    "evaluate_ids",
    "event_from_dict",
    "learning_rate",
    "perplexity",
    "resume_settings",
    "stop_on_signals",
]
