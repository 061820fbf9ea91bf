"""The engine: model, tokenizer, generation, data, training, checkpoints, interop.

Nothing under this package imports textual or click, so the engine can be used headless (CLI, torchrun, notebooks).
"""
