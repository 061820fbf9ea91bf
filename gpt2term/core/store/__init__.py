"""The checkpoint store, in parts: `store` (CheckpointStore and its listing, saves, copies, imports, exports),
`locks` (who writes a checkpoint), `atomic` (write-then-rename and disk errors), `layout` (file and checkpoint
names), `validate` (what makes a checkpoint damaged), `state` (the last one used) and `resolve` (a name or a path
to a model, for the CLI and the TUI alike).

Import from the parts: this file stays empty so that `interop` can use `atomic` without loading the whole store.
"""
