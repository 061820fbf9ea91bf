"""gpt2term: GPT-2 from scratch in your terminal: prompt it, train it, look inside it."""

__version__ = "0.1.0"
