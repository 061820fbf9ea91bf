"""A conversation turn: one prompt and what the model generated for it (the app's record, kept for saving)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from gpt2term.core.errors import InputError
from gpt2term.core.generation import DecodingSettings, Step, Summary
from gpt2term.formatting import format_prob


@dataclass
class Turn:
    id: int
    prompt: str
    prompt_ids: list[int]
    settings: DecodingSettings
    model_name: str = ""
    steps: list[Step] = field(default_factory=list)
    prompt_perplexity: float | None = None
    state: str = "generating"  # generating | done | stopped | error
    error: str | None = None

    @property
    def completion(self) -> str:
        """Exactly the text `gpt2term generate` prints after the prompt for the same steps."""
        return "".join(step.text for step in self.steps)

    @property
    def summary(self) -> Summary:
        return Summary.of(self.steps)

    def context_before(self, index: int) -> str:
        """The text the model had read when it chose token `index` (prompt plus the tokens before it)."""
        return self.prompt + "".join(step.text for step in self.steps[:index])


def stats_line(turn: Turn) -> str:
    """One line under each completion: what it cost and how surprised the model was."""
    summary = turn.summary
    parts = [f"{summary.tokens} token{'s' if summary.tokens != 1 else ''}"]
    if summary.perplexity is not None:
        parts.append(f"perplexity {summary.perplexity:.2f}")
    if summary.mean_prob is not None:
        parts.append(f"mean p {format_prob(summary.mean_prob)}")
    if summary.tokens and turn.state != "generating":
        parts.append(f"{summary.tokens_per_second:.1f} tokens/s")
    state = {"generating": "generating…", "done": "", "stopped": "stopped (Esc)", "error": f"error: {turn.error}"}
    if state[turn.state]:
        parts.append(state[turn.state])
    parts.append(turn.settings.describe())
    return " · ".join(parts)


def transcript_markdown(turns: list[Turn]) -> str:
    lines = ["# gpt2term transcript", ""]
    for number, turn in enumerate(turns, 1):
        lines += [f"## {number}. {turn.model_name}".rstrip(), "", f"_{stats_line(turn)}_", ""]
        lines += ["```text", turn.prompt + turn.completion, "```", ""]
    return "\n".join(lines)


def transcript_json(turns: list[Turn]) -> str:
    records = []
    for turn in turns:
        records.append(
            {
                "model": turn.model_name,
                "prompt": turn.prompt,
                "completion": turn.completion,
                "settings": vars(turn.settings),
                "state": turn.state,
                "prompt_perplexity": turn.prompt_perplexity,
                "summary": turn.summary.to_dict(),
                "tokens": [
                    {
                        "token_id": s.token_id,
                        "text": s.text,
                        "prob": s.prob,
                        "rank": s.rank,
                        "top": [{"token_id": c.token_id, "text": c.text, "prob": c.prob} for c in s.top],
                        "perplexity": s.perplexity,
                    }
                    for s in turn.steps
                ],
            }
        )
    return json.dumps({"turns": records}, ensure_ascii=False, indent=2) + "\n"


def save_transcript(turns: list[Turn], path: Path) -> Path:
    """Markdown for reading, or JSON (every token with its alternatives) when the name ends in .json."""
    path = Path(path).expanduser()
    text = transcript_json(turns) if path.suffix.lower() == ".json" else transcript_markdown(turns)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    except OSError as exc:
        raise InputError(f"{path}: cannot write the transcript ({exc.strerror}); choose another path") from exc
    return path
