"""Decoding under load: the thread governor backs off to the cores it gets and comes back, without changing a token.

The governor's logic runs on an injected clock (no timing asserted); the decoding tests check that the tokens and
numbers are the same whichever thread counts it picks. Speed itself is `gpt2term bench generate --busy`'s business.
"""

from __future__ import annotations

import pytest
import torch

from gpt2term.core import accel
from gpt2term.core.accel import threads
from gpt2term.core.config import GPTConfig
from gpt2term.core.generation import DecodingSettings, generate
from gpt2term.core.model import GPTModel
from gpt2term.core.tokenizer import default_tokenizer

needs_accel = pytest.mark.skipif(not accel.enabled(), reason="GPT2TERM_ACCEL=0: the fast paths are switched off")


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _call(gov: threads.Governor, clock: FakeClock, key, most: int, cost: dict[int, float]) -> int:
    """One governed call whose duration, per thread count, is `cost`; returns the count it ran with."""
    use = gov.choose(key, most)
    clock.now += cost[use]
    gov.record(key, use, cost[use])
    return use


def test_governor_backs_off_to_one_thread_when_two_are_slower():
    clock = FakeClock()
    gov = threads.Governor(clock=clock, min_interval_s=0.05, max_interval_s=5.0, enabled=True)
    busy = {2: 0.020, 1: 0.003}  # another process holds a core: two threads wait for each other
    used = [_call(gov, clock, "fc", 2, busy) for _ in range(40)]
    assert used[0] == 2  # every thread first
    assert gov.current("fc") == 1
    assert used[-10:].count(1) >= 9


def test_governor_returns_to_every_thread_when_the_machine_is_free_again():
    clock = FakeClock()
    gov = threads.Governor(clock=clock, min_interval_s=0.05, max_interval_s=1.0, enabled=True)
    for _ in range(40):
        _call(gov, clock, "fc", 2, {2: 0.020, 1: 0.003})
    assert gov.current("fc") == 1
    for _ in range(2000):  # the spinner ended: two threads are twice as fast again
        _call(gov, clock, "fc", 2, {2: 0.0015, 1: 0.003})
        if gov.current("fc") == 2:
            break
    assert gov.current("fc") == 2
    assert clock.now < 60  # within a few seconds of (simulated) decoding, not never


def test_governor_tries_other_counts_ever_more_rarely_on_a_steady_machine():
    clock = FakeClock()
    gov = threads.Governor(clock=clock, min_interval_s=0.05, max_interval_s=4.0, enabled=True)
    used = [_call(gov, clock, "qkv", 4, {4: 0.001, 2: 0.002, 1: 0.004}) for _ in range(20000)]
    tries = [i for i, n in enumerate(used) if n != 4]
    assert gov.current("qkv") == 4
    assert set(used) == {4, 2, 1}  # halves down to one are each tried
    assert len(tries) < 20 and tries[-1] - tries[-2] >= 2000  # the last tries are seconds apart


def test_governor_keeps_one_choice_per_kind_of_matmul():
    clock = FakeClock()
    gov = threads.Governor(clock=clock, enabled=True)
    for _ in range(200):
        _call(gov, clock, "small", 2, {2: 0.004, 1: 0.001})
        _call(gov, clock, "head", 2, {2: 0.010, 1: 0.018})
    assert (gov.current("small"), gov.current("head")) == (1, 2)


def test_governor_switched_off_uses_every_thread():
    clock = FakeClock()
    gov = threads.Governor(clock=clock, enabled=False)
    assert {_call(gov, clock, "fc", 2, {2: 0.020, 1: 0.001}) for _ in range(100)} == {2}


def test_thread_backoff_environment_switch(monkeypatch):
    monkeypatch.setenv(threads.GOVERNOR_SWITCH, "0")
    assert threads.Governor().enabled is False
    monkeypatch.setenv(threads.GOVERNOR_SWITCH, "1")
    assert threads.Governor().enabled is True


def test_thread_choices_halve_down_to_one():
    assert threads.thread_choices(1) == [1]
    assert threads.thread_choices(2) == [2, 1]
    assert threads.thread_choices(16) == [16, 8, 4, 2, 1]


class _Pinned(threads.Governor):
    """Always the same thread count: what a governor backed off to one thread does, without waiting for it."""

    def __init__(self, n: int) -> None:
        super().__init__(enabled=True)
        self.n = n
        self.calls: list[tuple[object, int]] = []

    def choose(self, key, most: int) -> int:
        self.calls.append((key, min(most, self.n)))
        return min(most, self.n)


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def test_a_governed_step_runs_with_the_chosen_threads_and_restores_pytorchs(monkeypatch, two_threads):
    monkeypatch.setattr(threads, "_governor", _Pinned(1))
    with threads.GovernedStep("k"):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == 2
    with pytest.raises(ValueError), threads.GovernedStep("k"):
        raise ValueError("boom")
    assert torch.get_num_threads() == 2


def test_a_try_slower_than_the_current_choice_is_given_up_within_the_step(two_threads):
    """On a collapsed machine one step at two threads can take many times a step at one: a try must not cost more
    than about one step."""
    clock = FakeClock()
    gov = threads.Governor(clock=clock, min_interval_s=0.05, max_interval_s=5.0, enabled=True)
    for _ in range(40):  # settles on one thread (two are far slower)
        _call(gov, clock, "step", 2, {2: 0.500, 1: 0.010})
    assert gov.current("step") == 1
    clock.now += 10  # the next call is a try of two threads
    with threads.GovernedStep("step", most=2, gov=gov) as step:
        assert step.use == 2 and torch.get_num_threads() == 2
        clock.now += 0.004
        step.check()  # within one-thread's step time: the try goes on
        assert torch.get_num_threads() == 2
        clock.now += 0.008
        step.check()  # over it: given up, the rest of the step on the current choice
        assert torch.get_num_threads() == 1
        clock.now += 0.5
    assert torch.get_num_threads() == 2  # the caller's count restored
    assert gov.current("step") == 1
    assert gov._stats["step"].seconds[2] == pytest.approx(0.012)  # recorded when given up, not at the end


def _model() -> GPTModel:
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=1000, context_length=32, emb_dim=128, n_heads=4, n_layers=2)
    model = GPTModel(cfg).eval()
    with torch.no_grad():
        model.out_head.weight.mul_(30.0)  # spread logits: no near-ties for the dtypes to break differently
    return model


@needs_accel
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_tokens_and_probabilities_are_the_same_with_back_off_on_and_off(monkeypatch, two_threads, dtype):
    model = accel.accelerate(_model(), dtype)
    settings = DecodingSettings(max_new_tokens=20, stop_at_eos=False)
    prompt = [1, 2, 3]

    def run() -> list[tuple[int, float]]:
        return [(s.token_id, s.prob) for s in generate(model, default_tokenizer(), prompt, settings)]

    monkeypatch.setattr(threads, "_governor", threads.Governor(enabled=False))
    every_thread = run()
    pinned = _Pinned(1)
    monkeypatch.setattr(threads, "_governor", pinned)
    one_thread = run()
    assert [t for t, _ in one_thread] == [t for t, _ in every_thread]
    assert [p for _, p in one_thread] == pytest.approx([p for _, p in every_thread], rel=1e-4)
    assert pinned.calls and {n for _, n in pinned.calls} == {1}  # the one-token matmuls did go through it
    assert torch.get_num_threads() == 2


@needs_accel
@pytest.mark.parametrize("dtype", ["fp32", "bf16", "int8"])
def test_one_token_steps_are_governed_and_prompts_are_not(monkeypatch, two_threads, dtype):
    model = accel.accelerate(_model(), dtype)
    pinned = _Pinned(1)
    monkeypatch.setattr(threads, "_governor", pinned)
    settings = DecodingSettings(max_new_tokens=4, stop_at_eos=False)
    list(generate(model, default_tokenizer(), list(range(1, 11)), settings))  # a ten-token prompt, then 3 steps
    assert [key for key, _ in pinned.calls] == [(accel.decode.inference_dtype(dtype), 1)] * 3


# ------------------------------------------------------------------------------------------------ cold start


def test_opening_a_checkpoint_in_a_fresh_process_never_imports_torchdynamo(tmp_path):
    """Building the skeleton to load weights into ran every initialiser on meta tensors, whose reference kernels
    import TorchDynamo: a large part of a cold start, for numbers thrown away."""
    import json
    import os
    import subprocess
    import sys

    from gpt2term.core.store.store import CheckpointStore

    home = tmp_path / "home"
    torch.manual_seed(0)
    model = GPTModel(GPTConfig(vocab_size=1000, context_length=32, emb_dim=64, n_heads=4, n_layers=2))
    CheckpointStore(home / "checkpoints").save("small", model, meta={"step": 1})
    code = (
        "import sys, json, torch\n"
        "from gpt2term.core.store.resolve import open_model\n"
        "m = open_model('small', dtype='fp32').model\n"
        "print(json.dumps({'dynamo': 'torch._dynamo' in sys.modules,"
        " 'sum': float(sum(p.double().sum() for p in m.parameters()))}))\n"
    )
    env = dict(os.environ, GPT2TERM_HOME=str(home))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["dynamo"] is False
    assert got["sum"] == pytest.approx(float(sum(p.double().sum() for p in model.parameters())), rel=1e-12)


def test_bench_cold_start_times_a_fresh_generate_process(tmp_path):
    import json

    from click.testing import CliRunner

    from gpt2term.cli import cli
    from gpt2term.core.store.store import CheckpointStore
    from gpt2term.locations import checkpoints_dir

    torch.manual_seed(0)
    small = GPTModel(GPTConfig(vocab_size=50257, context_length=32, emb_dim=32, n_heads=2, n_layers=1))
    CheckpointStore(checkpoints_dir()).save("tiny-cold", small, meta={"step": 1})  # GPT-2's vocabulary: any prompt
    result = CliRunner().invoke(cli, ["bench", "cold-start", "-c", "tiny-cold", "--repeats", "1", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["first_token_s"] > 0 and len(report["runs_first_token_s"]) == 1 and report["import_s"] > 0
    assert "generate" in report["command"] and "tiny-cold" in report["command"]


def test_bench_app_reports_the_app_and_the_engine_side_by_side():
    import json

    from click.testing import CliRunner

    from gpt2term.cli import cli

    result = CliRunner().invoke(cli, ["bench", "app", "--preset", "tiny", "--tokens", "8", "--repeats", "3", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["engine_tokens_per_second"] > 0 and report["app_tokens_per_second"] > 0
    runs = report["runs"]
    pairs = sorted(app / engine for app, engine in zip(runs["app"], runs["engine"], strict=True))
    assert report["app_vs_engine"] == pytest.approx(pairs[1], rel=0.01)  # the median of the pairs' ratios
    assert all(1 <= n <= 8 for n in report["app_screen_updates"])
