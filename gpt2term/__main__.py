"""`python -m gpt2term` (and what `torchrun -m gpt2term` launches)."""

from gpt2term.cli import main

if __name__ == "__main__":
    main()
