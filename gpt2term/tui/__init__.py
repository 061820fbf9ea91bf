"""The terminal app: a thin Textual face over `gpt2term.core` (prompt, train, checkpoints)."""
