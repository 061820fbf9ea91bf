"""The command line: `gpt2term` opens the app; subcommands do the same work headless.

A thin face over `gpt2term.core`: it parses options, calls the engine, and prints. Errors a user can cause are
`Gpt2termError`s, printed in one line with exit status 2.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import click

from gpt2term.core.errors import Gpt2termError
from gpt2term.core.recipes import EVAL_TIMINGS, INITS, RECIPES, SAMPLE_TIMINGS, SCHEDULES
from gpt2term.formatting import format_duration, format_prob, format_time

DTYPE_NAMES = ["float32", "bfloat16", "fp32", "bf16"]  # both spellings, in every command that takes --dtype
DECODING_DTYPE_NAMES = [*DTYPE_NAMES, "int8"]  # int8 weights exist for decoding only, never for training
# What every command (and the app) opens without --checkpoint: `default_checkpoint` in core/store/resolve.py.
DEFAULT_CHECKPOINT = "the last one used, else the newest in the store, else an untrained GPT-2 124M"


class Gpt2termGroup(click.Group):
    """Turns user errors into one line and exit 2, and Ctrl-C into exit 130, for every subcommand."""

    def invoke(self, ctx: click.Context):
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
@click.option(
    "--checkpoint",
    "-c",
    metavar="NAME",
    help="The app opens this model: a checkpoint name or a weights path (default: the last one used).",
)
@click.option("--n-heads", type=click.IntRange(min=1), help="Attention heads of a --checkpoint .pth without a config.")
@click.pass_context
def cli(ctx: click.Context, checkpoint: str | None, n_heads: int | None) -> None:
    """GPT-2 from scratch in your terminal: prompt it, train it, look inside it.

    With no command, opens the app.
    """
    if ctx.invoked_subcommand is None:
        from gpt2term.tui.app import make_app

        make_app(checkpoint, n_heads=n_heads).run()


def _set_threads(threads: int | None) -> None:
    from gpt2term.core.devices import set_threads

    set_threads(threads)


def _said_on_ctrl_c(message: str, current_bar):
    """Watches for Ctrl-C while a stoppable command works: `message` is said the moment it arrives (the work stops at
    its next check), above the progress bar when there is one; `current_bar()` is read then, as the bar is drawn
    only once the work has started."""
    import signal

    from gpt2term.core.training.control import watch_signals

    def stopped(signum: int) -> None:
        bar = current_bar()
        bar.print(message) if bar is not None else click.echo(message, err=True)

    return watch_signals((signal.SIGINT,), stopped)


def n_heads_option(func):
    """`--n-heads` for every command that reads weights: a .pth state_dict carries no head count."""
    return click.option(
        "--n-heads",
        type=click.IntRange(min=1),
        help="Attention heads of a .pth without a config (default: 64-dim heads); must agree with a file's config.",
    )(func)


def load_model(
    checkpoint: str | None, *, quiet: bool = False, dtype: str | None = None, n_heads: int | None = None
):  # returns a GPTModel
    """The model a command runs (see `open_model`), with what the user should know about it on stderr."""
    from gpt2term.core.store.resolve import open_model

    if checkpoint is None:
        checkpoint, why = _default_checkpoint()
        if not quiet:
            using = f"{checkpoint!r}, {why}" if checkpoint else f"{why}; expect gibberish until you train or import one"
            click.echo(f"note: no --checkpoint given: using {using}", err=True)
    opened = open_model(checkpoint, dtype=dtype, n_heads=n_heads)
    for notice in opened.notices:
        click.echo(f"note: {notice}", err=True)
    return opened.model


def _default_checkpoint() -> tuple[str | None, str]:
    """The checkpoint to use without --checkpoint (None: the untrained model), and a phrase saying why."""
    from gpt2term.core.store.resolve import default_checkpoint

    store = _store()
    name = default_checkpoint(store)
    if name is None:
        return None, "an untrained GPT-2 124M (random weights, seed 123), as the store has no checkpoint"
    return name, "the last one used" if store.last_used() == name else "the newest in the store"


@cli.command()
@click.argument("prompt")
@click.option(
    "--checkpoint",
    "-c",
    help="A name from `gpt2term ckpt list`, a model.safetensors (or folder), a .pth, OpenAI's TensorFlow 124M/ "
    f"folder [default: {DEFAULT_CHECKPOINT}].",
)
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
@click.option("--no-limit", is_flag=True, help="Allow -n beyond 16 times the model's context.")
@click.option("--threads", type=click.IntRange(min=1), help="CPU threads for PyTorch.")
@click.option(
    "--dtype",
    default="fp32",
    show_default=True,
    type=click.Choice(DECODING_DTYPE_NAMES),
    help="Number format of the weights while decoding: bf16 reads half the bytes per token, int8 a quarter "
    "(faster on a CPU; the top candidates are rescored in fp32).",
)
@n_heads_option
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
    no_limit: bool,
    threads: int | None,
    dtype: str,
    n_heads: int | None,
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
        no_limit=no_limit,
    )
    _set_threads(threads)
    tokenizer = default_tokenizer()
    model = load_model(checkpoint, dtype=dtype, n_heads=n_heads)
    ids = tokenizer.encode(prompt)
    settings.check_for(model.cfg)
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


def _print_beams(model, tokenizer, prompt: str, ids: list[int], beams: int, settings, as_json: bool) -> None:
    from gpt2term.core.generation import beam_search

    found = beam_search(
        model, tokenizer, ids, beams, settings.max_new_tokens, settings.stop_at_eos, no_limit=settings.no_limit
    )
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
    """Look inside a model (attention, the logit lens, the loss step by step, the loss surface) and its data."""


@inspect.command("attention")
@click.argument("prompt")
@click.option("--checkpoint", "-c", help=f"Checkpoint name or weights path [default: {DEFAULT_CHECKPOINT}].")
@click.option("--layer", type=int, default=-1, show_default=True, help="Layer to print (text output).")
@click.option("--json", "as_json", is_flag=True, help="All layers and heads: {tokens, attention[layer][head][q][k]}.")
@n_heads_option
def inspect_attention(prompt: str, checkpoint: str | None, layer: int, as_json: bool, n_heads: int | None) -> None:
    """How much each token of PROMPT attends to each earlier token, per layer and head."""
    from gpt2term.core.errors import InputError
    from gpt2term.core.inspection import attention_weights
    from gpt2term.core.tokenizer import default_tokenizer

    tokenizer = default_tokenizer()
    model = load_model(checkpoint, quiet=as_json, n_heads=n_heads)
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
@click.option("--checkpoint", "-c", help=f"Checkpoint name or weights path [default: {DEFAULT_CHECKPOINT}].")
@click.option("--position", type=int, default=-1, show_default=True, help="Token position (-1: the last).")
@click.option("--top-k", default=5, show_default=True, type=click.IntRange(min=1))
@click.option("--json", "as_json", is_flag=True, help="{position, layers: [{layer, top: [{token_id, text, prob}]}]}")
@n_heads_option
def inspect_lens(
    prompt: str, checkpoint: str | None, position: int, top_k: int, as_json: bool, n_heads: int | None
) -> None:
    """The logit lens: what each layer would predict next at POSITION, first layer first, real output last."""
    from gpt2term.core.inspection import first_layer_with_final_answer, logit_lens
    from gpt2term.core.tokenizer import default_tokenizer

    tokenizer = default_tokenizer()
    model = load_model(checkpoint, quiet=as_json, n_heads=n_heads)
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


@inspect.command("surface")
@click.argument("checkpoint")
@click.option("--grid", default=5, show_default=True, type=click.IntRange(min=2), help="G: a GxG grid in [-1, 1]^2.")
@click.option("--points", default=7, show_default=True, type=click.IntRange(min=2), help="Points of the line and path.")
@click.option("--batches", default=1, show_default=True, type=click.IntRange(min=1), help="Validation batches a point.")
@click.option("--batch-size", default=2, show_default=True, type=click.IntRange(min=1), help="Windows per batch.")
@click.option("--seed", default=0, show_default=True, type=int, help="Seed of the two random directions.")
@click.option("--from", "other", metavar="CHECKPOINT", help="Start of the path [default: the run's initialisation].")
@click.option("--no-cache", is_flag=True, help="Compute again even when surface.json holds this result.")
@click.option("--threads", type=click.IntRange(min=1), help="CPU threads for PyTorch.")
@click.option("--json", "as_json", is_flag=True, help="{center_loss, line: [{alpha, loss}], grid, grid_alphas, path}")
@n_heads_option
def inspect_surface(
    checkpoint: str,
    grid: int,
    points: int,
    batches: int,
    batch_size: int,
    seed: int,
    other: str | None,
    no_cache: bool,
    threads: int | None,
    as_json: bool,
    n_heads: int | None,
) -> None:
    """The validation loss around CHECKPOINT: a 1D slice and a 2D grid along random filter-normalised directions
    (Li et al., 2018), and the straight path from another checkpoint (Goodfellow et al., 2015). Cached beside the
    weights (surface.json); a progress bar on a terminal; Ctrl-C stops it (exit 130)."""
    from gpt2term.core.surface import SurfaceCancelled, SurfaceOptions, describe_result, loss_surface

    _set_threads(threads)
    options = SurfaceOptions(grid, points, batches, batch_size, seed, other)
    options.check()
    bar = None

    def progress(p) -> None:
        nonlocal bar
        if p.done == 0:
            click.echo(
                f"computing the loss surface of {checkpoint}: {options.plan()} ({p.total} evaluations)", err=True
            )
        elif p.done == 1 and p.estimate_s is not None:
            click.echo(f"about {p.estimate_s:.0f} s: {options.plan()}", err=True)
            if sys.stderr.isatty():
                from gpt2term.cli_progress import SurfaceBar

                bar = SurfaceBar(p.total)
        if bar is not None:
            bar(p)

    try:
        with _said_on_ctrl_c("Ctrl-C: the loss surface stopped; nothing cached", lambda: bar):
            result = loss_surface(
                checkpoint, options, _store(), n_heads=n_heads, progress=progress, use_cache=not no_cache
            )
    except (KeyboardInterrupt, SurfaceCancelled):
        click.get_current_context().exit(130)
    finally:
        if bar is not None:
            bar.close()
    for notice in result.notices:
        click.echo(f"note: {notice}", err=True)
    if as_json:
        shape, _ = result.path_shape()
        click.echo(json.dumps(result.to_dict() | {"path_shape": shape, "from_cache": result.from_cache}))
    else:
        click.echo(describe_result(result))


@inspect.command("data")
@click.argument("corpus", nargs=-1)
@click.option(
    "--recipe",
    default="default",
    show_default=True,
    type=click.Choice(list(RECIPES)),
    help="The defaults of a named run, as in gpt2term train --recipe.",
)
@click.option("--preset", "-p", default="tiny", show_default=True, help="Model whose context is the default window.")
@click.option("--batch-size", "-b", default=8, show_default=True, type=click.IntRange(min=1), help="Per process.")
@click.option("--context-length", type=click.IntRange(min=1), help="Window length [default: the model's].")
@click.option("--stride", type=click.IntRange(min=1), help="Step between windows [default: context length].")
@click.option("--val-ratio", default=0.1, show_default=True, type=click.FloatRange(0, 1, min_open=True, max_open=True))
@click.option("--seed", default=123, show_default=True, type=int)
@click.option("--encoding-errors", default="strict", show_default=True, type=click.Choice(["strict", "replace"]))
@click.option("--step", default=1, show_default=True, type=click.IntRange(min=1), help="Show the batch of this step.")
@click.option("--columns", default=8, show_default=True, type=click.IntRange(min=1), help="Ids shown per row (text).")
@click.option(
    "--json", "as_json", is_flag=True, help="{train_tokens, val_tokens, windows, batches_per_epoch, batch: [...]}"
)
@click.pass_context
def inspect_data(
    ctx: click.Context, corpus: tuple[str, ...], step: int, columns: int, as_json: bool, **options
) -> None:
    """How CORPUS becomes what `gpt2term train` feeds the model, with train's options and defaults: text, token
    ids, the train/validation split, windows, input/target rows and the batch of --step (pydoc without CORPUS)."""
    from click.core import ParameterSource

    from gpt2term.core.data_view import data_pipeline, pipeline_text
    from gpt2term.core.training import TrainingSettings

    typed = {k: v for k, v in options.items() if ctx.get_parameter_source(k) != ParameterSource.DEFAULT}
    typed.pop("recipe", None)
    settings = TrainingSettings.from_recipe(options["recipe"], corpus=list(corpus), **typed)
    settings.validate()
    view = data_pipeline(settings, step=step, progress=lambda what: click.echo(f"note: {what}…", err=True))
    if as_json:
        click.echo(json.dumps(view.to_dict(), ensure_ascii=False))
        return
    click.echo(pipeline_text(view, columns=columns))


LOSS_ROWS = 6  # positions whose numbers each step prints; the tokens line and --json have every one


@inspect.command("loss")
@click.argument("text")
@click.option("--checkpoint", "-c", help=f"Checkpoint name or weights path [default: {DEFAULT_CHECKPOINT}].")
@click.option("--worst", default=5, show_default=True, type=click.IntRange(min=1), help="Worst tokens listed.")
@click.option(
    "--train-mode",
    is_flag=True,
    help="Also run the text twice in train mode (dropout on) and twice in eval mode, to show what model.eval() does.",
)
@click.option("--json", "as_json", is_flag=True, help="{loss, perplexity, tokens: [{token_id, target_id, prob, ...}]}")
@n_heads_option
def inspect_loss(
    text: str, checkpoint: str | None, worst: int, train_mode: bool, as_json: bool, n_heads: int | None
) -> None:
    """The course's cross-entropy on TEXT, step by step: logits, softmax, target probabilities, log, mean,
    negation; then perplexity and where it falls on the course's table."""
    from gpt2term.core.loss_steps import dropout_check, loss_steps
    from gpt2term.core.tokenizer import default_tokenizer

    tokenizer = default_tokenizer()
    model = load_model(checkpoint, quiet=as_json, n_heads=n_heads)
    ids = tokenizer.encode(text)
    steps = loss_steps(model, ids, tokenizer)
    check = dropout_check(model, ids) if train_mode else None
    if as_json:
        payload = steps.to_dict(worst)
        if check is not None:
            payload["dropout"] = check.to_dict()
        click.echo(json.dumps(payload, ensure_ascii=False))
        return
    _print_loss_steps(steps, worst)
    if check is not None:
        click.echo(f"dropout: {check.note}")
        click.echo(f"  train mode (model.train()): {', '.join(f'{x:.4f}' for x in check.train_losses)}")
        click.echo(f"  eval mode  (model.eval()):  {', '.join(f'{x:.4f}' for x in check.eval_losses)}")


def _loss_colour(nll: float, baseline: float) -> str:
    """Green for a target the model expected, red for one it found as surprising as a uniform guess, or worse."""
    if nll < 1.0:
        return "green"
    if nll < 3.0:
        return "yellow"
    return "red" if nll < baseline else "magenta"


def _print_loss_steps(steps, worst: int) -> None:
    from gpt2term.core.loss_steps import LOSS_TABLE, table_index

    batch, seq_len, vocab = steps.shape
    tokens = steps.tokens
    shown = tokens[:LOSS_ROWS]
    more = f"  (first {len(shown)} of {len(tokens)} positions)" if len(tokens) > len(shown) else ""

    def pair(t) -> str:
        return f"{t.position:>4} {t.token_text!r:>14} -> {t.target_text!r:<14}"

    click.echo(f"inputs: {seq_len} tokens; targets: the same text shifted by one ({seq_len} positions to predict)")
    click.echo(f"1. logits = model(inputs): shape (batch, seq_len, vocab_size) = ({batch}, {seq_len}, {vocab}){more}")
    for t in shown:
        click.echo(f"   {pair(t)} logit of the target {t.target_logit:8.3f}")
    click.echo(f"2. probas = softmax(logits, dim=-1): each row sums to 1 (largest error {steps.softmax_max_error:.1e})")
    for t in shown:
        click.echo(f"   {pair(t)} model's favourite {t.top_text!r} {format_prob(t.top_prob)}")
    click.echo("3. target_probas = probas[0, i, targets[i]]")
    for t in shown:
        click.echo(f"   {pair(t)} {t.prob:.6g}")
    click.echo("4. log_probas = torch.log(target_probas)")
    for t in shown:
        click.echo(f"   {pair(t)} {t.logprob:.4f}")
    click.echo(f"5. avg_log_probas = torch.mean(log_probas) = {steps.mean_logprob:.4f}")
    click.echo(f"6. neg_avg_log_probas = avg_log_probas * -1 = {steps.loss:.4f}   <- the loss (cross-entropy)")
    click.echo(f"perplexity = exp(loss) = {steps.perplexity:,.2f}")
    click.echo(f"uniform baseline: ln({vocab}) = {steps.baseline:.2f} (perplexity {vocab:,})")
    click.echo("tokens coloured by their loss (-log p): green < 1, yellow < 3, red, magenta >= the baseline:")
    line = "".join(click.style(t.target_text, fg=_loss_colour(t.nll, steps.baseline)) for t in tokens)
    click.echo(click.style(tokens[0].token_text, dim=True) + line)
    click.echo(f"worst {min(worst, len(tokens))} tokens (share of the loss):")
    for t in steps.worst(worst):
        click.echo(f"   {pair(t)} p {format_prob(t.prob):>8}  -log p {t.nll:7.3f}  {t.contribution:.4f}")
    click.echo("the course's table (loss -> perplexity):")
    at = table_index(steps.loss)
    for i, row in enumerate(LOSS_TABLE):
        if i == at:
            click.echo(f"  > {steps.loss:6.2f} -> {steps.perplexity:>10,.2f}   this text")
        click.echo(f"    {row.loss:6.2f} -> {row.perplexity:>10,g}   {row.meaning}")
    if at == len(LOSS_TABLE):
        click.echo(f"  > {steps.loss:6.2f} -> {steps.perplexity:>10,.2f}   this text")
    click.echo(f"this text: {steps.table_position}")


# ------------------------------------------------------------------------------------------ checkpoints (issue 3)


def _store():
    from gpt2term.core.store.store import CheckpointStore

    return CheckpointStore()


def _number(value, fmt: str = "{:.3f}") -> str:
    return "-" if value is None else fmt.format(value)


@cli.group()
def ckpt() -> None:
    """Your checkpoints (in the data folder, see `gpt2term locate`): list, show, import, export, mv, cp, rm."""


@ckpt.command("list")
@click.option("--json", "as_json", is_flag=True, help="A JSON list of objects (name, damaged, meta values, ...).")
def ckpt_list(as_json: bool) -> None:
    """Every checkpoint: parameters, step, tokens seen, val loss, size, updated, source. Damaged ones say why."""
    from gpt2term.core.interop import find_hf_cached_models
    from gpt2term.formatting import format_bytes, format_count

    store = _store()
    rows = store.list()
    if as_json:
        click.echo(json.dumps([row.to_dict() for row in rows], indent=2))
        return
    if not rows:
        click.echo(f"no checkpoints yet in {store.root}; `gpt2term ckpt import PATH` or train one")
    else:
        table = [("NAME", "PARAMS", "STEP", "TOKENS", "VAL LOSS", "SIZE", "UPDATED", "SOURCE")]
        for row in rows:
            if row.damaged:
                table.append((row.name, f"DAMAGED: {row.damaged}"))
                continue
            table.append(
                (
                    row.name,
                    format_count(row.get("parameters") or 0),
                    _number(row.get("step"), "{}"),
                    "-" if row.get("tokens_seen") is None else format_count(row.get("tokens_seen")),
                    _number(row.get("val_loss")),
                    format_bytes(row.size_bytes),
                    format_time(row.updated),
                    str(row.get("source") or "-"),
                )
            )
        widths = [max(len(r[i]) for r in table if len(r) > 2 and i < len(r)) for i in range(len(table[0]))]
        for r in table:
            if len(r) == 2:
                click.echo(f"{r[0]:<{widths[0]}}  {r[1]}")
            else:
                click.echo("  ".join(f"{cell:<{w}}" for cell, w in zip(r, widths, strict=True)).rstrip())
    cached = find_hf_cached_models()
    if cached:
        names = ", ".join(m.name for m in cached)
        click.echo(f"\nin the Hugging Face cache (use by name, or `gpt2term ckpt import NAME`): {names}")


@ckpt.command("show")
@click.argument("name")
@click.option("--json", "as_json", is_flag=True, help="The listing row and the whole meta.json as one JSON object.")
def ckpt_show(name: str, as_json: bool) -> None:
    """Everything known about checkpoint NAME: its meta.json, files, and whether it loads."""
    from gpt2term.formatting import format_bytes

    store = _store()
    info = store.info(name)
    metrics = len(store.read_metrics(name))
    files = sorted(p.name for p in info.path.iterdir() if p.is_file())
    if as_json:
        click.echo(
            json.dumps({**info.to_dict(), "meta": info.meta, "files": files, "metrics_records": metrics}, indent=2)
        )
        return
    click.echo(f"{info.name}  ({info.path})")
    click.echo(f"  status: {'DAMAGED: ' + info.damaged if info.damaged else 'ok'}")
    click.echo(f"  size: {format_bytes(info.size_bytes)}; files: {', '.join(files)}; metrics records: {metrics}")
    for key, value in (info.meta or {}).items():
        shown = json.dumps(value) if isinstance(value, (dict, list)) else value
        click.echo(f"  {key}: {'-' if value is None else shown}")


@ckpt.command("import")
@click.argument("source")
@click.option("--name", "-n", help="Name in the store (default: from the file or folder name).")
@click.option(
    "--n-heads", type=click.IntRange(min=1), help="Heads, for files without a config (default: 64-dim heads)."
)
def ckpt_import(source: str, name: str | None, n_heads: int | None) -> None:
    """Copy weights into the store: a HF model.safetensors (file or folder), a GPT-2 from the Hugging Face cache
    by name (gpt2, gpt2-medium, ...), the book's model.pth / model_and_optimizer.pth (or its pretrained
    gpt2-small-124M.pth / .safetensors), OpenAI's TensorFlow checkpoint folder (124M/, read without TensorFlow), or a
    checkpoint folder."""
    from gpt2term.formatting import format_count

    result = _store().import_weights(source, name, n_heads=n_heads)
    for notice in result.notices:
        click.echo(f"note: {notice}", err=True)
    info = result.info
    extra = " with optimizer state" if info.has_optimizer else ""
    click.echo(f"imported {info.name}: {format_count(info.get('parameters') or 0)} parameters{extra}, from {source}")


@ckpt.command("export")
@click.argument("name")
@click.option(
    "--format",
    "fmt",
    required=True,
    type=click.Choice(["hf", "pth", "pth-optimizer"]),
    help="hf: model.safetensors + config.json for transformers; pth: the book's model.pth; "
    "pth-optimizer: the book's model_and_optimizer.pth.",
)
@click.option("--output", "-o", required=True, type=click.Path(path_type=Path), help="Folder (hf) or file (pth).")
@click.option("--force", is_flag=True, help="Overwrite existing files.")
def ckpt_export(name: str, fmt: str, output: Path, force: bool) -> None:
    """Write checkpoint NAME in a format other tools load (transformers, the book's code)."""
    result = _store().export(name, fmt, output, overwrite=force)
    if fmt == "hf":
        hint = f'GPT2LMHeadModel.from_pretrained("{output}")'
    elif fmt == "pth":
        hint = f'model.load_state_dict(torch.load("{result.paths[0]}", map_location=device))'
    else:
        hint = f'checkpoint = torch.load("{result.paths[0]}"); checkpoint["model_state_dict"] ...'
    for notice in result.notices:
        click.echo(f"note: {notice}", err=True)
    for path in result.paths:
        click.echo(f"wrote {path}")
    click.echo(f"load it with: {hint}")


@ckpt.command("mv")
@click.argument("old")
@click.argument("new")
def ckpt_mv(old: str, new: str) -> None:
    """Rename checkpoint OLD to NEW."""
    _store().rename(old, new)
    click.echo(f"renamed {old} -> {new}")


@ckpt.command("cp")
@click.argument("src")
@click.argument("dst")
def ckpt_cp(src: str, dst: str) -> None:
    """Copy checkpoint SRC to a new checkpoint DST (weights, state, meta and metrics)."""
    _store().copy(src, dst)
    click.echo(f"copied {src} -> {dst}")


@ckpt.command("rm")
@click.argument("name")
@click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation.")
def ckpt_rm(name: str, yes: bool) -> None:
    """Delete checkpoint NAME (asks first unless --yes)."""
    from gpt2term.formatting import format_bytes

    store = _store()
    info = store.info(name)
    if not yes:
        click.confirm(f"delete checkpoint {name} ({format_bytes(info.size_bytes)}, {info.path})?", abort=True)
    store.delete(name)
    click.echo(f"deleted {name}")


@ckpt.command("download")
@click.argument("size", type=click.Choice(["gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl"]))
@click.option("--name", "-n", help="Name in the store (default: the size).")
def ckpt_download(size: str, name: str | None) -> None:
    """Download OpenAI's GPT-2 weights (needs the `hub` extra) and import them into the store."""
    from gpt2term.core.interop import download_hf

    cached = download_hf(size)
    result = _store().import_weights(str(cached.folder), name or size)
    click.echo(f"downloaded {cached.repo_id} into the Hugging Face cache and imported it as {result.info.name}")


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="The paths as one JSON object.")
def locate(as_json: bool) -> None:
    """Print where gpt2term keeps its data (set GPT2TERM_HOME to move it all)."""
    from gpt2term.locations import HOME_ENV, all_paths

    paths = all_paths()
    if as_json:
        click.echo(json.dumps({k: str(v) for k, v in paths.items()}, indent=2))
        return
    for key, path in paths.items():
        click.echo(f"{key:<18} {path}{'' if path.exists() else '  (not created yet)'}")
    click.echo(f"\nset {HOME_ENV} to keep everything under one folder")


# --------------------------------------------------------------------------------------------- training (issue 4)


class _TrainingPrinter:
    """The CLI's face of a run: a live progress line on a terminal, plain lines otherwise, or JSON events."""

    def __init__(self, as_json: bool) -> None:
        self.as_json = as_json
        self.live = sys.stderr.isatty() and not as_json
        self.val_loss: float | None = None
        self.val_perplexity: float | None = None
        self.last_step = None
        self.bar = None  # a rich progress bar (gpt2term.cli_progress), on a terminal, from the first step on
        self.book_steps = False  # eval_timing "book": also print chapter 5's label for each evaluation

    def _line(self, text: str, *, err: bool = True) -> None:
        if self.bar is not None:
            self.bar.print(text)  # above the bar
        else:
            click.echo(text, err=err)

    def say(self, text: str) -> None:
        """A line from any thread (the signal watcher's), above the bar when there is one."""
        self._line(text)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def _progress(self, event) -> str:
        """What the bar shows beside step/total (rich draws the bar and the step count)."""
        from gpt2term.formatting import format_count

        val = "-" if self.val_loss is None else f"{self.val_loss:.3f}"
        ppl = "-" if self.val_perplexity is None else f"{self.val_perplexity:.1f}"
        return (
            f"loss {event.loss:.3f}  val loss {val}  ppl {ppl}  lr {event.lr:.2e}  "
            f"{format_count(event.tokens_per_second)} tok/s  {format_duration(event.elapsed_s)} elapsed  "
            f"ETA {format_duration(event.eta_s)}"
        )

    def __call__(self, event) -> None:
        from gpt2term.formatting import format_count

        if self.as_json:
            sys.stdout.write(json.dumps(event.to_dict(), ensure_ascii=False) + "\n")
            sys.stdout.flush()
            return
        kind = event.type
        if kind == "start":
            self.book_steps = (event.settings or {}).get("eval_timing") == "book"
            what = "resuming" if event.resumed else "training"
            cfg = event.config
            self._line(
                f"{what} {event.name!r}: {format_count(event.parameters)} parameters ({cfg['n_layers']} layers, "
                f"{cfg['emb_dim']} dims, context {cfg['context_length']}), {event.source}, on {event.device} "
                f"({event.dtype}{f', {event.world_size} processes' if event.world_size > 1 else ''})"
            )
            self._line(
                f"corpus {event.corpus}: {format_count(event.train_tokens)} training and "
                f"{format_count(event.val_tokens)} validation tokens; step {event.step} of {event.total_steps} "
                f"({event.steps_per_epoch:.1f} steps per epoch, {format_count(event.tokens_per_step)} tokens each)"
            )
        elif kind == "step":
            self.last_step = event
            if self.live:
                if self.bar is None:
                    from gpt2term.cli_progress import training_bar

                    self.bar = training_bar(event.total_steps)
                self.bar.update(event.step, event.total_steps, info=self._progress(event))
        elif kind == "eval":
            self.val_loss, self.val_perplexity = event.val_loss, event.val_perplexity
            speed = f"  {format_count(self.last_step.tokens_per_second)} tok/s" if self.last_step else ""
            eta = f"  ETA {format_duration(self.last_step.eta_s)}" if self.last_step else ""
            book = (
                f"  | Ep {event.epoch} (Step {event.step - 1:06d}): "
                f"Train loss {event.train_loss:.3f}, Val loss {event.val_loss:.3f}"
                if self.book_steps and event.step > 0
                else ""
            )
            self._line(
                f"step {event.step}: train loss {event.train_loss:.3f}  val loss {event.val_loss:.3f}  "
                f"val perplexity {event.val_perplexity:.1f}{speed}{eta}{book}"
            )
        elif kind == "sample":
            self._line(f"  sample: {event.prompt}{event.text}".replace("\n", " "))
        elif kind == "checkpoint":
            self._line(f"saved checkpoint {event.name!r} at step {event.step} ({event.reason})")
        elif kind == "warning":
            self._line(f"warning: {event.message}")
        elif kind == "pause":
            self._line("paused" if event.paused else "resumed")
        elif kind == "finished":
            self.close()  # the bar's last state first, then the run's last words below it
            self._line(event.message)
        elif kind == "failed":
            self.close()
            self._line(f"training failed at step {event.step}")
        if self.bar is not None and kind == "eval" and self.last_step is not None:
            self.bar.update(self.last_step.step, info=self._progress(self.last_step))  # the new val loss


def _signal_announcer(say, distributed: bool):
    """What each Ctrl-C (or SIGTERM) does, said the moment it arrives (see `stop_on_signals`), not at the end of
    the step: a learner who sees nothing presses again and loses the save."""
    import signal

    def announce(signum: int, action: str) -> None:
        who = "SIGTERM" if signum == signal.SIGTERM else "Ctrl-C"
        if action == "stop":
            again = "" if distributed or signum == signal.SIGTERM else "; Ctrl-C again to quit without saving"
            say(f"{who}: stopping after this step, then saving{again}")
        elif action == "stopping":
            say(f"{who}: already stopping; the checkpoint is saved after this step")
        elif action == "wait":
            say(f"{who} again: a checkpoint is being written; quitting as soon as it is saved")
        else:
            say(f"{who} again: quitting now without saving (the last saved checkpoint, if any, stays)")

    return announce


_MODEL_OPTIONS = ("emb_dim", "n_layers", "n_heads", "drop_rate", "qkv_bias")
RECIPE_HELP = (
    "Defaults for every other option: 'default' (the values shown here) or 'book' (chapter 5's run: gpt2-124M "
    "without qkv bias, the book's initial weights, context 256, dropout 0.1, constant lr 4e-4, weight decay 0.1, "
    "no warmup, no clipping, batch 2, 10 epochs, eval every 5 steps on 5 batches as the book counts them, a greedy "
    "'Every effort moves you' after each epoch, seed 123). Options given explicitly still win."
)


@cli.command()
@click.argument("corpus", nargs=-1)
@click.option("--name", "-n", required=True, help="Checkpoint to write (and to continue with --resume).")
@click.option("--recipe", default="default", show_default=True, type=click.Choice(list(RECIPES)), help=RECIPE_HELP)
@click.option("--preset", "-p", default="tiny", show_default=True, help="Model size for a new run: tiny, mini, gpt2...")
@click.option("--from", "init_from", metavar="CHECKPOINT", help="Start a new run from these weights (name or path).")
@click.option("--resume", is_flag=True, help="Continue --name where it stopped, with its saved settings.")
@click.option(
    "--fresh-optimizer",
    is_flag=True,
    help="With --from a file holding an AdamW state (model_and_optimizer.pth): start a new optimizer instead.",
)
@click.option("--overwrite", is_flag=True, help="Replace an existing checkpoint of that name.")
@click.option("--epochs", type=click.FloatRange(min=0, min_open=True), help="Passes over the data [default: 1].")
@click.option("--max-steps", type=click.IntRange(min=1), help="Optimizer steps (instead of --epochs).")
@click.option("--batch-size", "-b", default=8, show_default=True, type=click.IntRange(min=1), help="Per process.")
@click.option("--context-length", type=click.IntRange(min=1), help="Window length [default: the model's].")
@click.option("--stride", type=click.IntRange(min=1), help="Step between windows [default: context length].")
@click.option("--lr", default=5e-4, show_default=True, type=click.FloatRange(min=0, min_open=True))
@click.option("--weight-decay", default=0.1, show_default=True, type=click.FloatRange(min=0))
@click.option("--warmup-steps", type=click.IntRange(min=0), help="[default: a tenth of the run, at most 100]")
@click.option(
    "--schedule",
    default="cosine",
    show_default=True,
    type=click.Choice(list(SCHEDULES)),
    help="Learning rate after the warmup: held, or decayed to lr * --min-lr-ratio.",
)
@click.option("--min-lr-ratio", default=0.1, show_default=True, type=click.FloatRange(0, 1), help="End of the decay.")
@click.option("--grad-clip", default=1.0, show_default=True, type=click.FloatRange(min=0), help="0: no clipping.")
@click.option("--grad-accum", default=1, show_default=True, type=click.IntRange(min=1), help="Micro-batches per step.")
@click.option("--eval-interval", default=50, show_default=True, type=click.IntRange(min=1))
@click.option("--eval-iters", default=5, show_default=True, type=click.IntRange(min=1), help="Batches per evaluation.")
@click.option(
    "--eval-at-start/--no-eval-at-start", default=True, show_default=True, help="Evaluate at step 0, before training."
)
@click.option(
    "--eval-timing",
    default="interval",
    show_default=True,
    type=click.Choice(list(EVAL_TIMINGS)),
    help="interval: after steps N, 2N, ...; book: after updates 1, N+1, 2N+1, ... (chapter 5's loop).",
)
@click.option("--save-interval", default=500, show_default=True, type=click.IntRange(min=0), help="0: only at end.")
@click.option("--val-ratio", default=0.1, show_default=True, type=click.FloatRange(0, 1, min_open=True, max_open=True))
@click.option("--seed", default=123, show_default=True, type=int)
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:N or mps.")
@click.option("--dtype", default="float32", show_default=True, type=click.Choice(DTYPE_NAMES))
@click.option("--compile", "compile_model", is_flag=True, help="torch.compile the model (slow start, faster steps).")
@click.option("--sample-prompt", help="Greedy sample shown at each evaluation [default: fits the corpus].")
@click.option("--sample-tokens", default=30, show_default=True, type=click.IntRange(min=0))
@click.option(
    "--sample-every",
    default="eval",
    show_default=True,
    type=click.Choice(list(SAMPLE_TIMINGS)),
    help="Greedy sample after each evaluation or after each epoch.",
)
@click.option("--emb-dim", type=click.IntRange(min=1), help="Override the preset's embedding size.")
@click.option("--n-layers", type=click.IntRange(min=1), help="Override the preset's number of layers.")
@click.option(
    "--n-heads", type=click.IntRange(min=1), help="Override the preset's attention heads (with --from: a .pth's heads)."
)
@click.option("--drop-rate", type=click.FloatRange(0, 1, max_open=True), help="Override the dropout rate.")
@click.option("--qkv-bias/--no-qkv-bias", default=None, help="Biases on query/key/value [default: the preset's].")
@click.option(
    "--init",
    default="gpt2",
    show_default=True,
    type=click.Choice(list(INITS)),
    help="A new model's weights: GPT-2's normal(0, 0.02), or PyTorch's layer defaults as the book's GPTModel has.",
)
@click.option("--encoding-errors", default="strict", show_default=True, type=click.Choice(["strict", "replace"]))
@click.option("--threads", type=click.IntRange(min=1), help="CPU threads for PyTorch.")
@click.option("--json", "as_json", is_flag=True, help="Print every event as one JSON line (as in metrics.jsonl).")
@click.pass_context
def train(ctx: click.Context, corpus: tuple[str, ...], name: str, as_json: bool, **options) -> None:
    """Train a GPT on CORPUS (text files, folders of .txt/.md, or `pydoc`, the default built-in corpus).

    Ctrl-C (or SIGTERM) finishes the current step (cutting an evaluation short), saves, and exits with status 130
    (143); continue with --resume. A second Ctrl-C quits without saving (during a save: once it is written).
    Under `torchrun --nproc_per_node=K -m gpt2term train ...` it trains with DistributedDataParallel.
    """
    import os
    import signal

    from click.core import ParameterSource

    from gpt2term.core.errors import InputError
    from gpt2term.core.training import Trainer, TrainingControl, TrainingSettings, resume_settings, stop_on_signals

    def given(option: str) -> bool:
        return ctx.get_parameter_source(option) not in (ParameterSource.DEFAULT, ParameterSource.DEFAULT_MAP, None)

    renamed = {"init_from": "init_from", "compile_model": "compile"}
    values = {renamed.get(k, k): v for k, v in options.items() if k not in _MODEL_OPTIONS and k != "resume"}
    values["grad_clip"] = values["grad_clip"] or None
    model = {k: options[k] for k in _MODEL_OPTIONS if options[k] is not None}
    if options["resume"]:
        if given("recipe"):
            raise InputError("--recipe starts a new run; --resume keeps the settings the run was saved with")
        # Only what was typed changes the saved settings (`resume_settings` refuses what would change the run).
        skipped = (*_MODEL_OPTIONS, "resume", "overwrite", "recipe")
        overrides = {renamed.get(k, k): values[renamed.get(k, k)] for k in options if k not in skipped and given(k)}
        if corpus:
            overrides["corpus"] = list(corpus)
        if model:
            overrides["model"] = model
        settings = resume_settings(name, **overrides)
    else:
        # The recipe gives the defaults; only what was typed overrides it.
        typed = {renamed.get(k, k): values[renamed.get(k, k)] for k in options if k not in _MODEL_OPTIONS and given(k)}
        typed.pop("recipe", None)
        settings = TrainingSettings.from_recipe(values["recipe"], name=name, corpus=list(corpus), model=model, **typed)
    control = TrainingControl()
    printer = _TrainingPrinter(as_json)
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    announce = _signal_announcer(printer.say, distributed) if os.environ.get("RANK", "0") == "0" else None
    try:
        with stop_on_signals(
            control, (signal.SIGINT, signal.SIGTERM), second_interrupts=not distributed, on_signal=announce
        ):
            result = Trainer(settings, control=control, listeners=[printer]).run()
    finally:
        printer.close()
    if as_json:
        click.echo(result.message, err=True)
    if result.status == "interrupted":
        ctx.exit(128 + (signal.SIGTERM if control.stop_reason == "terminated" else signal.SIGINT))


@cli.command("eval")
@click.argument("corpus", nargs=-1)
@click.option(
    "--checkpoint", "-c", metavar="NAME", help=f"Checkpoint name or weights path [default: {DEFAULT_CHECKPOINT}]."
)
@click.option(
    "--max-tokens",
    type=click.IntRange(min=1),
    help="Score only the corpus's first N tokens (its first windows, not a spread), for a quick estimate "
    "[default: every token].",
)
@click.option("--context-length", type=click.IntRange(min=1), help="Window length [default: the model's].")
@click.option("--batch-size", "-b", default=8, show_default=True, type=click.IntRange(min=1))
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or mps.")
@click.option("--dtype", default="float32", show_default=True, type=click.Choice(DTYPE_NAMES))
@click.option("--encoding-errors", default="strict", show_default=True, type=click.Choice(["strict", "replace"]))
@click.option("--threads", type=click.IntRange(min=1), help="CPU threads for PyTorch.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object: loss, perplexity, tokens, checkpoint, corpus.")
@n_heads_option
def eval_command(
    corpus: tuple[str, ...],
    checkpoint: str | None,
    context_length: int | None,
    batch_size: int,
    device: str,
    dtype: str,
    encoding_errors: str,
    threads: int | None,
    as_json: bool,
    max_tokens: int | None,
    n_heads: int | None,
) -> None:
    """Loss and perplexity of a checkpoint on CORPUS (every token of it, or the first --max-tokens; `pydoc` when
    none is given). Shows a progress bar on a terminal; Ctrl-C stops it (exit 130)."""
    from gpt2term.core.data import describe_corpus, load_corpus
    from gpt2term.core.devices import resolve_device, resolve_dtype
    from gpt2term.core.store.resolve import UNTRAINED_NAME, open_model
    from gpt2term.core.training import evaluate_ids

    _set_threads(threads)
    if checkpoint is None:
        checkpoint, how = _default_checkpoint()
    else:
        how = "given with --checkpoint"
    shown = checkpoint or UNTRAINED_NAME
    how = how if checkpoint else "untrained, random weights: the store has no checkpoint"
    limit = f", its first {max_tokens:,} tokens" if max_tokens else ""
    opened = open_model(
        checkpoint, _store(), device=resolve_device(device), remember=False, float32=True, n_heads=n_heads
    )
    for notice in opened.notices:
        click.echo(f"note: {notice}", err=True)
    model = opened.model
    data = load_corpus(list(corpus), val_ratio=0.0, encoding_errors=encoding_errors)
    window = min(context_length or model.cfg.context_length, model.cfg.context_length)
    bar = None

    def progress(done: int, total: int, tokens: int) -> None:
        """The first call comes once every user error has been raised, so an error stays the only line."""
        nonlocal bar
        if done == 0:
            click.echo(f"evaluating {shown} ({how}) on {describe_corpus(corpus)}{limit}", err=True)
            click.echo(f"{total:,} batches of up to {batch_size} x {window} tokens", err=True)
            if sys.stderr.isatty():
                from gpt2term.cli_progress import EvaluationBar

                bar = EvaluationBar()
        if bar is not None:
            bar(done, total, tokens)

    try:
        with _said_on_ctrl_c("Ctrl-C: evaluation stopped; no result", lambda: bar):
            result = evaluate_ids(
                model,
                data.train_ids,
                context_length=context_length,
                batch_size=batch_size,
                amp_dtype=resolve_dtype(dtype),
                max_tokens=max_tokens,
                progress=progress,
            )
    except KeyboardInterrupt:
        click.get_current_context().exit(130)
    finally:
        if bar is not None:
            bar.close()
    if as_json:
        click.echo(json.dumps(result.to_dict() | {"checkpoint": shown, "corpus": describe_corpus(corpus)}))
    else:
        click.echo(
            f"loss {result.loss:.4f}  perplexity {result.perplexity:.2f}  tokens {result.tokens:,}  "
            f"({shown} on {describe_corpus(corpus)})"
        )


# ------------------------------------------------------------------------------------------------ bench (issue 7)


@cli.group()
def bench() -> None:
    """Speed, side by side with transformers in the same process (alternating runs, medians)."""


def _bench_progress(as_json: bool):
    if as_json or not sys.stderr.isatty():
        return None
    return lambda message: click.echo(f"  {message}", err=True)


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def describe_machine(machine: dict) -> str:
    load = machine.get("load_average")
    ident = machine.get("cpu_id") or {}
    cpu = machine["cpu"] + (f" (family {ident['family']} model {ident['model']})" if "family" in ident else "")
    parts = [
        cpu,
        f"{machine['threads']} threads of {machine['cores']} cores",
        f"torch {machine['torch']}",
        f"transformers {machine['transformers'] or 'not installed'}",
        f"device {machine['device']}",
    ]
    if machine.get("ctranslate2"):
        parts.insert(4, f"ctranslate2 {machine['ctranslate2']}")
    accel_info = machine.get("accel", {})
    if accel_info.get("enabled") is False:
        parts.append("acceleration off (GPT2TERM_ACCEL=0)")
    elif accel_info.get("native_kernels") is False:
        parts.append(f"gpt2term's decoding kernels off: {accel_info.get('native_why_not')}")
    if load:
        parts.append(f"load {load[0]:.2f}")
    return ", ".join(parts)


def _generation_rows(measured: dict, result: dict) -> list[str]:
    """One table of `bench generate`: every contender at one thread count."""
    peers = measured.get("ctranslate2") or {}
    same = measured.get("same_as_fp32") or {}
    lines = [] if "sweep" not in result else [f"{measured['threads']} threads:"]
    lines.append(
        f"{'':28s}{'tokens/s':>10s}{'first token':>13s}{'vs transformers':>17s}"
        + (f"{'vs CTranslate2':>16s}" if peers else "")
        + f"{'same tokens':>13s}"
    )

    def row(name: str, summary: dict, ratio: float | None, vs_ct2: float | None, match: str) -> str:
        return (
            f"{name:28s}{_fmt(summary['tokens_per_second'], '10.1f')}"
            f"{_fmt(summary['time_to_first_token_s'], '12.3f')}s{_fmt(ratio, '16.2f') + 'x' if ratio else '-':>17s}"
            + (f"{_fmt(vs_ct2, '15.2f') + 'x' if vs_ct2 else '-':>16s}" if peers else "")
            + f"{match:>13s}"
        )

    def agreement(name: str) -> str:
        check = same.get(name)
        if check is None:
            return ""
        return "yes" if check["same"] else f"first {check['matching_prefix']}"

    hf = measured["transformers"]
    if hf:
        lines.append(row("transformers generate fp32", hf, 1.0, None, agreement("transformers fp32")))
    for q, theirs in peers.items():
        lines.append(row(f"CTranslate2 {q}", theirs, None, None, agreement(f"ctranslate2 {q}")))
    for dt, mine in measured["ours"].items():
        if same:  # with the peers, every row is checked against our float32
            match = "(reference)" if dt == "fp32" else agreement(f"gpt2term {dt}")
        else:
            match = "yes" if measured["tokens_match"][dt] else f"first {measured['matching_prefix'][dt]}"
        vs_ct2 = (measured.get("ratio_ctranslate2") or {}).get(dt)
        lines.append(row(f"gpt2term {dt}", mine, measured["ratio"].get(dt), vs_ct2, match))
    if same:
        lines.append("same tokens: the same greedy tokens as gpt2term fp32 (else how many of the first agree)")
    for low in ("bf16", "int8"):
        if f"{low}_matches_fp32_prefix" in measured:
            first = measured[f"{low}_matches_fp32_prefix"]
            lines.append(f"{low} greedy tokens equal our fp32 tokens for the first {first}")
    packed = ", ".join(f"{dt} {m['packed_weights_mb']:.0f} MB" for dt, m in measured["ours"].items())
    lines.append(f"packed decoding weights (memory on top of the model): {packed}")
    return lines


def format_report(result: dict) -> str:
    """The human-readable table the CLI prints."""
    lines = [f"machine: {describe_machine(result['machine'])}"]
    s = result["settings"]
    if result["benchmark"] == "generate":
        busy = s.get("busy_processes", 0)
        load = (result.get("machine_after") or {}).get("load_average")
        lines.append(
            f"greedy decoding, {s['model']} ({s['parameters'] / 1e6:.0f}M parameters), prompt of {s['prompt_tokens']} "
            f"tokens, {s['new_tokens']} new tokens, median of {s['repeats']} alternating runs"
            + (f", with {busy} busy process{'es' if busy != 1 else ''}" if busy else "")
            + (f"; load {load[0]:.2f} after" if load else "")
        )
        for measured in result.get("sweep") or [result]:
            lines.extend(_generation_rows(measured, result))
    else:
        lines.append(
            f"training {s['preset']}, batch {s['batch_size']} x context {s['context_length']} "
            f"({s['tokens_per_step']} tokens/step), median of {s['steps']} alternating steps after "
            f"{s['warmup_steps']} warm-up\nours: {s['ours']}\ntransformers: {s['transformers']}"
            + (f"\nmemory: {s['memory']}" if s.get("memory") else "")
        )
        lines.append(_train_path_line(result))
        lines.append(f"{'':28s}{'tokens/s':>10s}{'step':>10s}{'MFU':>8s}{'vs transformers':>17s}")

        def mfu(entry: dict) -> str:
            return f"{100 * entry['mfu']:7.1f}%" if entry.get("mfu") is not None else f"{'-':>8s}"

        for dt in s["dtypes"]:
            theirs = (result["transformers"] or {}).get(dt)
            if theirs:
                lines.append(
                    f"{'transformers loop ' + dt:28s}{_fmt(theirs['tokens_per_second'], '10.0f')}"
                    f"{_fmt(theirs['step_s'], '9.3f')}s{mfu(theirs)}{'1.00x':>17s}"
                )
            mine = result["ours"][dt]
            ratio = result["ratio"].get(dt)
            lines.append(
                f"{'gpt2term ' + dt:28s}{_fmt(mine['tokens_per_second'], '10.0f')}{_fmt(mine['step_s'], '9.3f')}s"
                f"{mfu(mine)}{_fmt(ratio, '16.2f') + 'x' if ratio else '-':>17s}"
            )
        for who, tables in (result.get("profile") or {}).items():
            for dt, rows in tables.items():
                lines.append(f"profile, {'gpt2term' if who == 'ours' else 'transformers loop'} {dt} (top ops):")
                lines.extend(
                    f"  {row['op'][:44]:44s}{100 * row['share']:6.1f}%{row['self_ms_per_step']:10.1f} ms/step"
                    f"{row['calls_per_step']:8.0f} calls"
                    for row in rows
                )
    if result.get("note"):
        lines.append(f"note: {result['note']}")
    return "\n".join(lines)


def _train_path_line(result: dict) -> str:
    """Device, compile, padding and the FLOPs behind the MFU column, so a figure says what produced it."""
    s = result["settings"]
    vocab = s["config"]["vocab_size"]
    padded = s.get("vocab_padded_to", vocab)
    parts = [
        f"device {s.get('device', 'cpu')}" + (f" ({result['machine']['gpu']})" if result["machine"].get("gpu") else ""),
        "torch.compile" if s.get("compile") else "eager",
        f"head padded {vocab} -> {padded}" if padded != vocab else "head not padded",
        f"{s['flops_per_token'] / 1e6:,.0f} MFLOPs/token",
    ]
    if s.get("peak_tflops"):
        parts.append(f"peak {s['peak_tflops']:g} TFLOPS ({s['peak_source']})")
    return ", ".join(parts)


def _bench_output(result: dict, as_json: bool) -> None:
    click.echo(json.dumps(result, indent=2) if as_json else format_report(result))


@bench.command("generate")
@click.option("--checkpoint", "-c", help="Weights to decode with [default: a random GPT-2 124M].")
@click.option("--preset", "preset_name", default="gpt2-124M", show_default=True, help="Shape of the random model.")
@click.option("--tokens", default=200, show_default=True, type=click.IntRange(min=2), help="New tokens per run.")
@click.option("--repeats", default=5, show_default=True, type=click.IntRange(min=1), help="Timed runs of each.")
@click.option("--dtype", default="fp32", show_default=True, type=click.Choice(["fp32", "bf16", "int8", "both", "all"]))
@click.option("--prompt", default="Every effort moves you", show_default=True)
@click.option("--threads", metavar="N[,N...]", help="CPU threads; a list such as 1,2,all measures each in one run.")
@click.option("--thread-sweep", is_flag=True, help="The same as --threads 1,2,all.")
@click.option("--peers", is_flag=True, help="Also CTranslate2 fp32 and int8 (pip install 'gpt2term[bench]').")
@click.option("--busy", default=0, type=click.IntRange(min=0), help="Spinning processes beside the runs [0].")
@click.option("--json", "as_json", is_flag=True, help="The whole result as one JSON object.")
def bench_generate_command(
    checkpoint: str | None,
    preset_name: str,
    tokens: int,
    repeats: int,
    dtype: str,
    prompt: str,
    threads: str | None,
    thread_sweep: bool,
    peers: bool,
    busy: int,
    as_json: bool,
) -> None:
    """Greedy decoding tokens/s and time to first token: ours against transformers' generate, same weights."""
    from gpt2term.core.bench import bench_generate, parse_thread_counts

    _refuse_preset_with_checkpoint(checkpoint)
    if thread_sweep and threads:
        raise click.UsageError("--thread-sweep is --threads 1,2,all; give one of them")
    counts = parse_thread_counts("1,2,all" if thread_sweep else threads) if (threads or thread_sweep) else None
    if counts and len(counts) == 1:
        _set_threads(counts[0])
        counts = None
    result = bench_generate(
        checkpoint,
        tokens=tokens,
        repeats=repeats,
        dtype=dtype,
        preset_name=preset_name,
        prompt=prompt,
        peers=peers,
        busy=busy,
        thread_counts=counts,
        progress=_bench_progress(as_json),
    )
    _bench_output(result, as_json)


@bench.command("train")
@click.option("--preset", "preset_name", default="tiny", show_default=True, help="Model shape (see gpt2term train).")
@click.option("--batch-size", "-b", default=8, show_default=True, type=click.IntRange(min=1))
@click.option("--context-length", type=click.IntRange(min=1), help="Tokens per sequence [default: the preset's].")
@click.option("--steps", default=6, show_default=True, type=click.IntRange(min=1), help="Timed steps of each.")
@click.option("--warmup", default=2, show_default=True, type=click.IntRange(min=0), help="Untimed steps first.")
@click.option("--dtype", default="both", show_default=True, type=click.Choice(["fp32", "bf16", "both"]))
@click.option("--threads", type=click.IntRange(min=1), help="CPU threads for PyTorch.")
@click.option("--device", default="cpu", show_default=True, help="cpu or cuda (both loops run there).")
@click.option("--compile", "compile_model", is_flag=True, help="torch.compile our model (slow first step).")
@click.option(
    "--pad-vocab",
    type=click.IntRange(min=0),
    help="Pad our training head to a multiple of this many rows (0: never) [default: 64 on cuda, 0 on cpu].",
)
@click.option("--peak-tflops", type=float, help="The device's peak for MFU [default: the GPU's known bf16 peak].")
@click.option("--profile", is_flag=True, help="Also print the top ops of 2 more (untimed) steps of each loop.")
@click.option("--compare/--no-compare", default=True, show_default=True, help="Run transformers' loop alongside.")
@click.option("--json", "as_json", is_flag=True, help="The whole result as one JSON object.")
def bench_train_command(
    preset_name: str,
    batch_size: int,
    context_length: int | None,
    steps: int,
    warmup: int,
    dtype: str,
    threads: int | None,
    device: str,
    compile_model: bool,
    pad_vocab: int | None,
    peak_tflops: float | None,
    profile: bool,
    compare: bool,
    as_json: bool,
) -> None:
    """Training tokens/s and MFU: our training step against a plain loop over transformers' GPT-2 of the same shape."""
    from gpt2term.core.bench import bench_train

    _set_threads(threads)
    result = bench_train(
        preset_name,
        batch_size=batch_size,
        context_length=context_length,
        steps=steps,
        warmup=warmup,
        dtype=dtype,
        compare=compare,
        device=device,
        compile_model=compile_model,
        pad_vocab=pad_vocab,
        peak_tflops=peak_tflops,
        profile=profile,
        progress=_bench_progress(as_json),
    )
    _bench_output(result, as_json)


def _refuse_preset_with_checkpoint(checkpoint: str | None) -> None:
    """--preset shapes only the random model; beside --checkpoint it would be silently ignored."""
    from click.core import ParameterSource

    from gpt2term.core.errors import InputError

    given = click.get_current_context().get_parameter_source("preset_name") is not ParameterSource.DEFAULT
    if checkpoint is not None and given:
        raise InputError("--preset shapes the random model and --checkpoint brings its own shape; give one of them")


def _bench_model(checkpoint: str | None, preset_name: str, dtype: str):
    import torch

    from gpt2term.core import accel
    from gpt2term.core.config import preset
    from gpt2term.core.model import GPTModel

    if checkpoint is None:
        torch.manual_seed(123)
        return accel.prepare_for_inference(GPTModel(preset(preset_name)), dtype), f"random {preset_name} (seed 123)"
    return load_model(checkpoint, quiet=True, dtype=dtype), checkpoint


@bench.command("app")
@click.option("--checkpoint", "-c", help="Weights to decode with [default: a random GPT-2 124M].")
@click.option("--preset", "preset_name", default="gpt2-124M", show_default=True, help="Shape of the random model.")
@click.option("--tokens", default=200, show_default=True, type=click.IntRange(min=2), help="New tokens per run.")
@click.option("--repeats", default=3, show_default=True, type=click.IntRange(min=1), help="Timed runs of each.")
@click.option("--dtype", default="fp32", show_default=True, type=click.Choice(DECODING_DTYPE_NAMES))
@click.option("--prompt", default="Every effort moves you", show_default=True)
@click.option("--threads", type=click.IntRange(min=1), help="CPU threads for PyTorch.")
@click.option("--json", "as_json", is_flag=True, help="The whole result as one JSON object.")
def bench_app_command(
    checkpoint: str | None,
    preset_name: str,
    tokens: int,
    repeats: int,
    dtype: str,
    prompt: str,
    threads: int | None,
    as_json: bool,
) -> None:
    """Tokens/s the app's prompt screen shows (headless) against the engine alone, same model, alternating runs."""
    from gpt2term.tui.stream_bench import bench_app

    _refuse_preset_with_checkpoint(checkpoint)
    _set_threads(threads)
    model, source = _bench_model(checkpoint, preset_name, dtype)
    result = bench_app(model, tokens=tokens, repeats=repeats, prompt=prompt)
    result["model"], result["dtype"] = source, dtype
    if as_json:
        click.echo(json.dumps(result, indent=2))
        return
    click.echo(
        f"{source}, {dtype}, {tokens} greedy tokens, median of {repeats} alternating runs\n"
        f"engine alone (gpt2term generate)  {result['engine_tokens_per_second']:8.1f} tokens/s\n"
        f"app, tokens on screen             {result['app_tokens_per_second']:8.1f} tokens/s  "
        f"({result['app_vs_engine']:.0%} of the engine, median of the pairs; redraws per run: "
        f"{', '.join(str(n) for n in result['app_screen_updates'])})\n"
        f"{'UI thread CPU while streaming':34s}{result['app_ui_cpu_share']:8.1%} of the time"
    )


@bench.command("cold-start")
@click.option("--checkpoint", "-c", help="Checkpoint to open [default: a random GPT-2 124M saved in a temp store].")
@click.option("--repeats", default=3, show_default=True, type=click.IntRange(min=1), help="Fresh processes to time.")
@click.option("--dtype", default="fp32", show_default=True, type=click.Choice(DECODING_DTYPE_NAMES))
@click.option("--json", "as_json", is_flag=True, help="The whole result as one JSON object.")
def bench_cold_start_command(checkpoint: str | None, repeats: int, dtype: str, as_json: bool) -> None:
    """Seconds from starting `gpt2term generate` in a fresh process to its first token on stdout."""
    from gpt2term.core.cold_start import bench_cold_start

    result = bench_cold_start(checkpoint, repeats=repeats, dtype=dtype)
    if as_json:
        click.echo(json.dumps(result, indent=2))
        return
    click.echo(
        f"{result['model']}, {dtype}: first token after {result['first_token_s']:.2f}s (median of {repeats} fresh "
        f"processes; runs {result['runs_first_token_s']}), imports {result['import_s']:.2f}s"
    )


def main() -> None:
    cli(prog_name="gpt2term")
