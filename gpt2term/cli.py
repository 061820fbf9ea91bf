"""The command line: `gpt2term` opens the app; subcommands do the same work headless.

A thin face over `gpt2term.core`: it parses options, calls the engine, and prints. Errors a user can cause are
`Gpt2termError`s, printed in one line with exit status 2.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from gpt2term.core.errors import Gpt2termError
from gpt2term.formatting import format_prob


class Gpt2termGroup(click.Group):
    """Turns user errors into one line and exit 2, and Ctrl-C into exit 130, for every subcommand."""

    def invoke(self, ctx: click.Context):  # noqa: ANN201 (click's signature)
        try:
            return super().invoke(ctx)
        except Gpt2termError as exc:
            click.secho(f"error: {exc}", fg="red", err=True)
            ctx.exit(2)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            ctx.exit(130)


@click.group(cls=Gpt2termGroup, invoke_without_command=True, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="gpt2term")
@click.pass_context
def cli(ctx: click.Context) -> None:
    """GPT-2 from scratch in your terminal: prompt it, train it, look inside it.

    With no command, opens the app.
    """
    if ctx.invoked_subcommand is None:
        click.echo(ctx.get_help())


def _set_threads(threads: int | None) -> None:
    if threads:
        import torch

        torch.set_num_threads(threads)


def load_model(checkpoint: str | None, *, quiet: bool = False):  # noqa: ANN201 (returns GPTModel, lazily imported)
    """The model a command runs: a weights file or folder, or with none, an untrained GPT-2 124M (fixed seed)."""
    import torch

    from gpt2term.core.config import preset
    from gpt2term.core.interop import load_weights_file
    from gpt2term.core.model import GPTModel

    if checkpoint is None:
        if not quiet:
            click.echo(
                "note: no --checkpoint given: using an untrained GPT-2 124M (random weights, seed 123); "
                "expect gibberish until you train or import one",
                err=True,
            )
        torch.manual_seed(123)
        model = GPTModel(preset("gpt2-124M"))
        return model.eval()
    loaded = load_weights_file(Path(checkpoint))
    for notice in loaded.notices:
        click.echo(f"note: {notice}", err=True)
    return loaded.build_model()


@cli.command()
@click.argument("prompt")
@click.option("--checkpoint", "-c", help="Weights to use: a model.safetensors (or its folder) or a book model.pth.")
@click.option("--max-new-tokens", "-n", default=50, show_default=True, type=click.IntRange(min=0))
@click.option("--temperature", "-t", default=0.0, show_default=True, type=float, help="0 means greedy (argmax).")
@click.option("--top-k", type=click.IntRange(min=1), help="Sample only among the K most probable tokens.")
@click.option("--top-p", type=click.FloatRange(0, 1, min_open=True), help="Sample from the smallest set of mass P.")
@click.option("--seed", type=int, help="Seed for reproducible sampling.")
@click.option("--top-n", default=10, show_default=True, type=click.IntRange(min=1), help="Alternatives reported.")
@click.option("--no-stop", is_flag=True, help="Keep going past <|endoftext|>.")
@click.option("--show-probs", is_flag=True, help="Show each token's probability after it.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per token, then a summary line.")
@click.option("--beams", type=click.IntRange(min=1), help="Beam search with K beams instead of one token at a time.")
@click.option("--threads", type=click.IntRange(min=1), help="CPU threads for PyTorch.")
def generate(
    prompt: str,
    checkpoint: str | None,
    max_new_tokens: int,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    seed: int | None,
    top_n: int,
    no_stop: bool,
    show_probs: bool,
    as_json: bool,
    beams: int | None,
    threads: int | None,
) -> None:
    """Continue PROMPT, streaming tokens as the model picks them (greedy by default, as in the course)."""
    from gpt2term.core.errors import InputError
    from gpt2term.core.generation import DecodingSettings, Summary
    from gpt2term.core.generation import generate as run_generation
    from gpt2term.core.tokenizer import default_tokenizer

    if not prompt.strip():
        raise InputError('the prompt is empty; pass some text, e.g. gpt2term generate "Hello, I am"')
    settings = DecodingSettings(
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        seed=seed,
        stop_at_eos=not no_stop,
        top_n=top_n,
    )
    _set_threads(threads)
    tokenizer = default_tokenizer()
    model = load_model(checkpoint)
    ids = tokenizer.encode(prompt)
    ctx = model.cfg.context_length
    if len(ids) > ctx:
        click.echo(f"note: the prompt has {len(ids)} tokens; keeping its last {ctx} (the model's context)", err=True)
        ids = ids[-ctx:]
    out = sys.stdout
    if beams is not None:
        _print_beams(model, tokenizer, prompt, ids, beams, settings, as_json)
        return
    if not as_json:
        out.write(prompt)
        out.flush()
    steps = []
    for step in run_generation(model, tokenizer, ids, settings):
        steps.append(step)
        if as_json:
            record = {
                "token_id": step.token_id,
                "text": step.text,
                "prob": step.prob,
                "logprob": step.logprob,
                "top": [{"token_id": c.token_id, "text": c.text, "prob": c.prob} for c in step.top],
                "perplexity": step.perplexity,
            }
            out.write(json.dumps(record, ensure_ascii=False) + "\n")
        elif show_probs:
            out.write(f"{step.text}[{format_prob(step.prob)}]")
        else:
            out.write(step.text)
        out.flush()
    summary = Summary.of(steps)
    if as_json:
        out.write(json.dumps({"summary": summary.to_dict()}) + "\n")
    else:
        out.write("\n")
        if summary.tokens:
            click.echo(
                f"{summary.tokens} tokens, {summary.tokens_per_second:.1f} tokens/s, first token after "
                f"{summary.time_to_first_token_s:.2f}s, perplexity {summary.perplexity:.1f}",
                err=True,
            )
    out.flush()


def _print_beams(model, tokenizer, prompt: str, ids: list[int], beams: int, settings, as_json: bool) -> None:  # noqa: ANN001
    from gpt2term.core.generation import beam_search

    found = beam_search(model, tokenizer, ids, beams, settings.max_new_tokens, settings.stop_at_eos)
    if as_json:
        records = [
            {"token_ids": list(b.token_ids), "text": b.text, "logprob": b.logprob, "perplexity": b.perplexity}
            for b in found
        ]
        click.echo(json.dumps({"beams": records}, ensure_ascii=False))
        return
    click.echo(prompt + (found[0].text if found else ""))
    for rank, b in enumerate(found, 1):
        ppl = f"{b.perplexity:.2f}" if b.perplexity is not None else "-"
        click.echo(f"beam {rank}: log-prob {b.logprob:.3f}, perplexity {ppl}: {b.text!r}", err=True)


@cli.group()
def inspect() -> None:
    """Look inside a model: attention weights and the logit lens."""


@inspect.command("attention")
@click.argument("prompt")
@click.option("--checkpoint", "-c", help="Checkpoint name or weights path (default: untrained GPT-2 124M).")
@click.option("--layer", type=int, default=-1, show_default=True, help="Layer to print (text output).")
@click.option("--json", "as_json", is_flag=True, help="All layers and heads: {tokens, attention[layer][head][q][k]}.")
def inspect_attention(prompt: str, checkpoint: str | None, layer: int, as_json: bool) -> None:
    """How much each token of PROMPT attends to each earlier token, per layer and head."""
    from gpt2term.core.errors import InputError
    from gpt2term.core.inspection import attention_weights
    from gpt2term.core.tokenizer import default_tokenizer

    tokenizer = default_tokenizer()
    model = load_model(checkpoint, quiet=as_json)
    ids = tokenizer.encode(prompt)
    weights = attention_weights(model, ids)
    if as_json:
        click.echo(json.dumps({"tokens": ids, "attention": weights.tolist()}))
        return
    if not -weights.shape[0] <= layer < weights.shape[0]:
        raise InputError(f"layer {layer} does not exist; this model has layers 0..{weights.shape[0] - 1}")
    mean = weights[layer].mean(0)
    labels = [repr(tokenizer.token_text(i))[1:-1] for i in ids]
    width = max(len(x) for x in labels)
    click.echo(f"layer {layer % weights.shape[0]}, mean over {weights.shape[1]} heads (row: query, column: key)")
    for q, label in enumerate(labels):
        cells = " ".join(f"{float(mean[q, k]):4.2f}" for k in range(q + 1))
        click.echo(f"{label:>{width}} | {cells}")


@inspect.command("lens")
@click.argument("prompt")
@click.option("--checkpoint", "-c", help="Checkpoint name or weights path (default: untrained GPT-2 124M).")
@click.option("--position", type=int, default=-1, show_default=True, help="Token position (-1: the last).")
@click.option("--top-k", default=5, show_default=True, type=click.IntRange(min=1))
@click.option("--json", "as_json", is_flag=True, help="{position, layers: [{layer, top: [{token_id, text, prob}]}]}")
def inspect_lens(prompt: str, checkpoint: str | None, position: int, top_k: int, as_json: bool) -> None:
    """The logit lens: what each layer would predict next at POSITION, first layer first, real output last."""
    from gpt2term.core.inspection import first_layer_with_final_answer, logit_lens
    from gpt2term.core.tokenizer import default_tokenizer

    tokenizer = default_tokenizer()
    model = load_model(checkpoint, quiet=as_json)
    ids = tokenizer.encode(prompt)
    layers = logit_lens(model, tokenizer, ids, position, top_k)
    resolved = position % len(ids)
    if as_json:
        payload = {
            "position": resolved,
            "layers": [
                {
                    "layer": lens.layer,
                    "top": [{"token_id": c.token_id, "text": c.text, "prob": c.prob} for c in lens.top],
                }
                for lens in layers
            ],
        }
        click.echo(json.dumps(payload, ensure_ascii=False))
        return
    first = first_layer_with_final_answer(layers)
    click.echo(f"after {tokenizer.decode(ids[: resolved + 1])!r}: layer 0 is the embeddings, the last is the output")
    for lens in layers:
        marker = "*" if lens.layer == first else " "
        cells = "  ".join(f"{c.text!r} {format_prob(c.prob)}" for c in lens.top)
        click.echo(f"{marker} layer {lens.layer:>2}: {cells}")
    click.echo(f"* the final answer first appears at layer {first}")


def main() -> None:
    cli(prog_name="gpt2term")
