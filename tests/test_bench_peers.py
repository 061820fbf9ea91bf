"""`gpt2term bench generate --peers / --busy / --threads 1,2,all` on tiny shapes.

What is checked is what the benchmark reports and leaves behind (tokens, fields, processes), never its speed.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import gpt2term.core.bench as bench
from gpt2term.cli import cli
from gpt2term.core.busy import SPINNER_MARK

TOKENS = 6


def run(*args: str):
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def spinners_of(parent: int, mark: str = SPINNER_MARK) -> list[int]:
    """Pids of the busy spinners (or other children whose command line holds `mark`) whose parent is `parent`,
    read from /proc."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == parent and mark.encode() in cmdline:
            found.append(int(entry.name))
    return found


def alive(pid: int, mark: str = SPINNER_MARK) -> bool:
    """A live spinner (or `mark`ed process) with this pid (not a zombie, not a reused pid running something else)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z" and mark.encode() in cmdline


@pytest.mark.once
def test_tokenizer_folder_round_trips_through_transformers(tmp_path):
    """The folder gpt2term writes for the converter is GPT-2's tokenizer: transformers encodes like ours."""
    transformers = pytest.importorskip("transformers")
    from gpt2term.core.peers import token_strings, write_tokenizer_folder
    from gpt2term.core.tokenizer import default_tokenizer

    write_tokenizer_folder(tmp_path, context_length=128)
    theirs = transformers.GPT2TokenizerFast.from_pretrained(str(tmp_path))
    ours = default_tokenizer()
    for text in [
        "Every effort moves you",
        "  spaces\tand\nlines",
        "héllo wörld 😀 日本語",
        "it's 1,234.5%!",
        "x<|endoftext|>y",
    ]:
        assert theirs.encode(text) == ours.encode(text), text
    assert theirs.eos_token_id == 50256 and len(theirs) == 50257
    ids = ours.encode("héllo 😀")
    assert theirs.convert_tokens_to_ids(token_strings(ids)) == ids


def test_peers_produce_our_greedy_tokens_and_report_every_field(isolated_home):
    """Same weights, same greedy rule: transformers and CTranslate2 fp32 give our fp32 tokens; the JSON says so."""
    pytest.importorskip("transformers")
    pytest.importorskip("ctranslate2", reason="--peers needs ctranslate2: pip install 'gpt2term[bench]'")
    args = ["bench", "generate", "--preset", "tiny", "--tokens", str(TOKENS), "--repeats", "1", "--peers", "--json"]
    result = run(*args)
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["settings"]["peers"] == ["fp32", "int8"]
    assert data["machine"]["ctranslate2"] and data["machine"]["cpu_id"]
    assert data["machine"]["load_average"] and data["machine_after"]["load_average"]
    for q in ("fp32", "int8"):
        peer = data["ctranslate2"][q]
        assert peer["tokens_per_second"] > 0 and peer["time_to_first_token_s"] > 0
        assert len(peer["runs_tokens_per_second"]) == 1
    assert data["ratio_ctranslate2"]["fp32"] > 0
    same = data["same_as_fp32"]
    assert same["transformers fp32"] == {"same": True, "matching_prefix": TOKENS}
    assert same["ctranslate2 fp32"] == {"same": True, "matching_prefix": TOKENS}
    assert 0 <= same["ctranslate2 int8"]["matching_prefix"] <= TOKENS  # int8 may differ: it is counted, not assumed
    # The conversions are cached by the weights: a second run converts nothing.
    cached = list((isolated_home / "cache" / "ctranslate2").glob("*/*/model.bin"))
    assert sorted(p.parent.name for p in cached) == ["fp32", "int8"]
    assert sorted(data["settings"]["peer_models"]) == ["fp32", "int8"]
    assert {Path(f) for f in data["settings"]["peer_models"].values()} == {p.parent for p in cached}
    said: list[str] = []
    again = bench.bench_generate(preset_name="tiny", tokens=TOKENS, repeats=1, peers=True, progress=said.append)
    assert not [m for m in said if m.startswith("converting")], said
    assert again["same_as_fp32"]["ctranslate2 fp32"]["same"] is True
    report = run(*args[:-1])
    assert report.exit_code == 0, report.output
    assert "CTranslate2 int8" in report.output and "vs CTranslate2" in report.output


def test_peer_token_check_counts_the_agreeing_prefix(monkeypatch, tmp_path):
    """A peer that decodes differently is reported with how many of its first tokens agree."""
    pytest.importorskip("transformers")
    pytest.importorskip("ctranslate2", reason="--peers needs ctranslate2: pip install 'gpt2term[bench]'")
    from gpt2term.core import peers

    original = peers.CT2Generator.run

    def third_differs(self, prompt_ids, tokens):
        ids, times = original(self, prompt_ids, tokens)
        return ids[:2] + [(ids[2] + 1) % 50257] + ids[3:], times

    monkeypatch.setattr(peers.CT2Generator, "run", third_differs)
    data = bench.bench_generate(preset_name="tiny", tokens=TOKENS, repeats=1, peers=True, peer_cache=tmp_path)
    assert data["same_as_fp32"]["ctranslate2 fp32"] == {"same": False, "matching_prefix": 2}
    assert data["same_as_fp32"]["transformers fp32"]["same"] is True


WORKER_MARK = "gpt2term.core.peer_worker"


@pytest.fixture(scope="module")
def tiny_ct2_folder(tmp_path_factory):
    """A tiny random model converted for CTranslate2 (fp32), once for this module."""
    pytest.importorskip("transformers")
    pytest.importorskip("ctranslate2", reason="--peers needs ctranslate2: pip install 'gpt2term[bench]'")
    from gpt2term.core.config import preset
    from gpt2term.core.model import GPTModel
    from gpt2term.core.peers import convert

    torch.manual_seed(0)
    model = GPTModel(preset("tiny"))
    return convert(model.state_dict(), model.cfg, ["fp32"], cache_root=tmp_path_factory.mktemp("ct2"))["fp32"]


@pytest.mark.once
def test_ctranslate2_decodes_in_a_process_of_its_own_that_ends_with_the_benchmark(monkeypatch):
    """Two engines in one process slow each other down: each CTranslate2 model runs in its own worker process,
    alive during the rounds and gone when the benchmark returns."""
    pytest.importorskip("transformers")
    pytest.importorskip("ctranslate2", reason="--peers needs ctranslate2: pip install 'gpt2term[bench]'")
    seen: list[list[int]] = []

    def progress(message: str) -> None:
        if message.startswith("round"):
            seen.append(spinners_of(os.getpid(), WORKER_MARK))

    data = bench.bench_generate(preset_name="tiny", tokens=3, repeats=2, peers=True, progress=progress)
    assert data["same_as_fp32"]["ctranslate2 fp32"]["same"] is True
    assert len(seen) == 2 and all(len(pids) == 2 for pids in seen), seen  # fp32 and int8, one process each
    assert not [pid for pids in seen for pid in pids if alive(pid, WORKER_MARK)]
    assert not spinners_of(os.getpid(), WORKER_MARK)


@pytest.mark.once
def test_a_ctranslate2_worker_that_fails_or_dies_is_a_one_line_error(tiny_ct2_folder, tmp_path):
    from gpt2term.core.peers import CT2Generator, PeerFailed

    with pytest.raises(PeerFailed) as missing:
        CT2Generator(tmp_path / "no-such-model", "fp32", 1)
    message = str(missing.value)
    assert "\n" not in message and message.startswith("CTranslate2 (fp32) failed:") and "no-such-model" in message
    assert not spinners_of(os.getpid(), WORKER_MARK)  # a worker that failed to load is not left behind

    generator = CT2Generator(tiny_ct2_folder, "fp32", 1)
    try:
        assert len(generator.run([15496, 11], 3)[0]) == 3
        os.kill(generator._proc.pid, signal.SIGKILL)
        with pytest.raises(PeerFailed, match=r"its process ended with exit status -9"):
            generator.run([15496, 11], 3)
    finally:
        generator.close()


@pytest.mark.once
def test_a_ctranslate2_worker_exits_when_its_bench_is_killed(tiny_ct2_folder):
    """SIGKILL leaves the bench no finally to run: the worker sees its input close and exits by itself."""
    code = (
        "import sys; from pathlib import Path; from gpt2term.core.peers import CT2Generator\n"
        f"g = CT2Generator(Path({str(tiny_ct2_folder)!r}), 'fp32', 1)\n"
        "print(g._proc.pid, flush=True); sys.stdin.read()"
    )
    parent = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        worker = int(parent.stdout.readline())  # printed once the worker has loaded the model
        assert alive(worker, WORKER_MARK)
    finally:
        parent.kill()
        parent.wait()
    deadline = time.monotonic() + 60
    while alive(worker, WORKER_MARK) and time.monotonic() < deadline:
        time.sleep(0.05)  # polling /proc, not synchronising: the condition is checked each time
    assert not alive(worker, WORKER_MARK)


@pytest.mark.once
def test_peers_missing_is_one_line_naming_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "ctranslate2", None)  # `import ctranslate2` raises ImportError
    result = CliRunner().invoke(cli, ["bench", "generate", "--preset", "tiny", "--tokens", "2", "--peers"])
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "ctranslate2" in lines[0] and "pip install 'gpt2term[bench]'" in lines[0]


@pytest.mark.once
def test_busy_spinners_run_beside_the_measurement_and_are_gone_after(monkeypatch):
    seen: list[list[int]] = []

    def progress(message: str) -> None:
        if message.startswith("round"):
            seen.append(spinners_of(os.getpid()))

    data = bench.bench_generate(preset_name="tiny", tokens=3, repeats=2, compare=False, busy=2, progress=progress)
    assert data["settings"]["busy_processes"] == 2
    assert len(seen) == 2 and all(len(pids) == 2 for pids in seen), seen
    assert not [pid for pids in seen for pid in pids if alive(pid)]
    assert not spinners_of(os.getpid())
    text = run("bench", "generate", "--preset", "tiny", "--tokens", "3", "--repeats", "1", "--busy", "1")
    assert text.exit_code == 0, text.output
    assert "with 1 busy process" in text.output
    assert not spinners_of(os.getpid())


@pytest.mark.once
def test_busy_spinners_do_not_survive_a_ctrl_c():
    """SIGINT to the benchmark alone (not its process group): its spinners must still all be gone when it exits."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "gpt2term", "bench", "generate", "--preset", "tiny", "--tokens", "60"]
        + ["--repeats", "1000", "--busy", "2", "--json"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=env,
    )
    try:
        deadline = time.monotonic() + 180
        pids: list[int] = []
        while len(pids) < 2 and time.monotonic() < deadline and proc.poll() is None:
            pids = spinners_of(proc.pid)
            time.sleep(0.05)  # polling /proc, not synchronising: the condition is checked each time
        assert len(pids) == 2, f"no spinners appeared (exit {proc.poll()})"
        proc.send_signal(signal.SIGINT)
        rc = proc.wait(timeout=120)
        assert rc == 130, proc.stderr.read().decode()
        assert [pid for pid in pids if alive(pid)] == []
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.once
def test_a_spinner_whose_parent_is_killed_exits_by_itself():
    """SIGKILL leaves no finally to run: each spinner watches its parent and stops when it is gone."""
    code = "from gpt2term.core.busy import start_spinners; import sys; start_spinners(2); sys.stdin.read()"
    parent = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        pids: list[int] = []
        while len(pids) < 2 and time.monotonic() < deadline:
            pids = spinners_of(parent.pid)
            time.sleep(0.05)
        assert len(pids) == 2
    finally:
        parent.kill()
        parent.wait()
    deadline = time.monotonic() + 60  # each checks about once a second; a loaded machine slows that down
    while any(alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert [pid for pid in pids if alive(pid)] == []


def test_thread_sweep_measures_each_count_with_the_decode_split_following():
    result = run(
        "bench", "generate", "--preset", "tiny", "--tokens", "3", "--repeats", "1", "--threads", "1,2", "--json"
    )
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["settings"]["threads"] == [1, 2]
    sweep = data["sweep"]
    assert [m["threads"] for m in sweep] == [1, 2]
    assert [m["torch_threads"] for m in sweep] == [1, 2]
    accelerated = data["machine"]["accel"]["enabled"]
    if accelerated:
        assert [m["decode_split"] for m in sweep] == [1, 2]
    for m in sweep:
        assert m["ours"]["fp32"]["tokens_per_second"] > 0 and m["transformers"]["tokens_per_second"] > 0
        assert m["tokens_match"]["fp32"] is True
    assert data["ours"] == sweep[0]["ours"]  # the top level is the first count's, as a single run's would be
    text = run("bench", "generate", "--preset", "tiny", "--tokens", "3", "--repeats", "1", "--threads", "1,2")
    assert text.exit_code == 0 and "1 threads:" in text.output and "2 threads:" in text.output


@pytest.mark.once
def test_thread_counts_parse_and_bad_ones_are_one_line():
    cores = bench.available_threads()
    assert bench.parse_thread_counts("1,2,all") == list(dict.fromkeys([1, 2, cores]))
    assert bench.parse_thread_counts("3") == [3]
    before = torch.get_num_threads()
    for bad in ("0", "two", "1,,2"):
        result = CliRunner().invoke(cli, ["bench", "generate", "--preset", "tiny", "--threads", bad])
        assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1, result.output
    assert torch.get_num_threads() == before


def test_dtype_all_runs_every_dtype_this_version_has():
    data = bench.bench_generate(preset_name="tiny", tokens=3, repeats=1, compare=False, dtype="all")
    if bench._decoding_dtype_available("int8"):
        assert data["settings"]["dtypes"] == ["fp32", "bf16", "int8"]
    else:
        assert data["settings"]["dtypes"] == ["fp32", "bf16"]
        assert "int8 is not available" in data["note"]
