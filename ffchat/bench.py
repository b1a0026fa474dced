"""`ffchat bench`: every backend's decode and prefill speed against the bandwidth roofline, in one process.

Batch-1 decode reads every weight once per token, so the yardstick is the
roofline: the bytes a step must read (``shapes.decode_bytes``) over the GPU's
copy bandwidth, measured in the same run. All backends run the same weights (a
real shape with seeded random weights, or a stored model), and each speed is
also a ratio to the torch-compile baseline measured beside it. Timing: CUDA
events around each call, warm-up first, median of many.

A backend is one ``BACKENDS`` entry: a function from (weights, context length)
to an object implementing ``ffchat.backend.Backend``.
"""

from __future__ import annotations

import functools
import gc
import json
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from ffchat import __version__
from ffchat.backend import CHAIN_LENGTH, Backend
from ffchat.errors import FfchatError
from ffchat.generate import Generator
from ffchat.profiles import profile_for_device
from ffchat.provenance import git_state
from ffchat.runtime import TRITON_BACKENDS
from ffchat.sampling import SamplingParams
from ffchat.shapes import BenchWeights, random_weights, shape_config, stored_weights

if TYPE_CHECKING:
    from ffchat.tokenizer import Tokenizer

DEVICE = "cuda"
COPY_BUFFER_BYTES = 1 << 30
COPY_REPEATS = 20
PREFILL_REPEATS = 5
DEFAULT_SHAPE = "llama-3.2-1b"
GENERATE_PROMPT = 128  # tokens before a timed answer
MAX_CACHE = "max"  # --ctx max: the model's maximum context, as `ffchat run` allocates where memory allows
# How `ffchat bench` samples the answers it times: greedy, and Ollama's defaults (seeded).
GENERATE_SAMPLING = {"greedy": SamplingParams(temperature=0.0, repeat_penalty=1.0),
                     "sampled": SamplingParams(seed=0)}


@dataclass(frozen=True)
class BackendEntry:
    build: Callable[[BenchWeights, int], Backend]  # (weights, context length) -> a ready backend
    about: str


def _reference(weights: BenchWeights, context_length: int) -> Backend:
    from ffchat.model import Transformer
    from ffchat.reference_backend import ReferenceBackend

    model = Transformer(weights.config, context_length, dtype=torch.bfloat16, device=DEVICE)
    model.load_state_dict(weights.reference_state_dict())
    return ReferenceBackend(model)


def _torch_compile(weights: BenchWeights, context_length: int) -> Backend:
    from ffchat.bench_baseline import TorchCompileBackend

    backend = TorchCompileBackend(weights, context_length)
    backend.warm_up()  # compile time belongs to setup, not to the first timed step
    return backend


def _triton(weights: BenchWeights, context_length: int, *, int8_activations: bool = False) -> Backend:
    from ffchat.triton_backend import TritonBackend

    return TritonBackend(weights, context_length, int8_activations=int8_activations)


def _megakernel(weights: BenchWeights, context_length: int) -> Backend:
    from ffchat.megakernel_backend import MegakernelBackend

    return MegakernelBackend(weights, context_length)


BACKENDS: dict[str, BackendEntry] = {
    "reference": BackendEntry(_reference, "ffchat.model.Transformer, eager PyTorch, INT4 weights dequantized to bf16"),
    "torch-compile": BackendEntry(_torch_compile, "gpt-fast recipe: static KV cache, torch.compile reduce-overhead "
                                                  "(CUDA graphs), bf16 activations, tinygemm INT4"),
    "triton": BackendEntry(_triton, "ffchat's fused Triton INT4 kernels: a decode step is one CUDA graph, and "
                                    "eight steps are one in the generation loop"),
    "triton-w4a8": BackendEntry(functools.partial(_triton, int8_activations=True),
                                "the triton backend with int8 activations (dp4a) for gate/up and the LM head: "
                                "opt-in, lossy"),
    "megakernel": BackendEntry(_megakernel, "ffchat's whole-model kernel: the decode step in one persistent "
                                            "Triton launch, in a CUDA graph"),
}
BASELINE = "torch-compile"
DEFAULT_BACKENDS = ("triton", BASELINE, "reference")


@dataclass
class BenchOptions:
    model: str | None = None  # a stored model's name, or
    shape: str | None = None  # a benchmark shape with random weights (the default)
    backends: tuple[str, ...] = DEFAULT_BACKENDS
    contexts: tuple[int, ...] = (128, 512, 2048)
    prompt: int = 512
    int4: bool = True
    seed: int = 0
    steps: int = 100
    warmup: int = 10
    json_path: Path | None = None
    tune: bool = True  # tune the shape first where this GPU has not (as the first `ffchat run` does)
    cache: int | str | None = None  # KV cache of ffchat's backends: tokens, MAX_CACHE, or None (the largest context)


def parse_backends(text: str) -> tuple[str, ...]:
    names = tuple(name.strip() for name in text.split(",") if name.strip())
    unknown = [name for name in names if name not in BACKENDS]
    if unknown or not names:
        raise FfchatError(f"unknown backend {', '.join(unknown) or '(none)'}; choose from {', '.join(BACKENDS)}")
    return names


def parse_contexts(text: str) -> tuple[int, ...]:
    try:
        contexts = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise FfchatError(f"--contexts {text!r}: expected comma-separated token counts such as 128,512,2048") from None
    if not contexts or min(contexts) < 0:
        raise FfchatError(f"--contexts {text!r}: expected comma-separated token counts such as 128,512,2048")
    return contexts


def parse_cache(text: str | None) -> int | str | None:
    """``--ctx``: a token count, or ``max``: the model's maximum (what `ffchat run` allocates where memory allows)."""
    if text is None:
        return None
    if text.strip().lower() == MAX_CACHE:
        return MAX_CACHE
    try:
        tokens = int(text)
    except ValueError:
        tokens = 0
    if tokens < 1:
        raise FfchatError(f"--ctx {text!r}: expected a number of tokens or 'max'")
    return tokens


def cache_tokens(option: int | str | None, needed: int, model_max: int) -> int:
    """The KV cache ffchat's backends allocate: ``--ctx`` checked against the contexts timed and the model."""
    if option is None:
        return needed
    tokens = model_max if option == MAX_CACHE else option
    if tokens < needed:
        raise FfchatError(f"--ctx {tokens} is smaller than the {needed} tokens the timed contexts and answers need")
    if tokens > model_max:
        raise FfchatError(f"--ctx {tokens} exceeds the model's maximum context of {model_max} tokens")
    return tokens


def run_bench(options: BenchOptions, out: Console, err: Console) -> dict:
    """Measure, print the tables on ``out`` (progress on ``err``), write the JSON if asked; return the report."""
    if not torch.cuda.is_available():
        raise FfchatError("ffchat bench needs a CUDA GPU and none was found (bench is GPU-only)")
    if options.model and options.shape:
        raise FfchatError("name a stored model or a --shape, not both")
    if options.prompt < 1 or options.steps < 1 or options.warmup < 0:
        raise FfchatError("--prompt and --steps must be positive")
    if options.tune and options.int4 and any(name in TRITON_BACKENDS for name in options.backends):
        from ffchat.tune import shape_to_tune, tune_if_untuned

        label, config, group_size = shape_to_tune(options.model, options.shape)
        tune_if_untuned(label, config, group_size, torch.device("cuda"), err,
                        megakernel="megakernel" in options.backends)
    total = 2 + len(options.backends) * (2 + len(options.contexts))
    columns = (SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn())
    with Progress(*columns, console=err, transient=True) as progress:
        report = measure(options, _Steps(progress, total))
    for table in tables(report):
        out.print(table)
    if options.json_path is not None:
        options.json_path.parent.mkdir(parents=True, exist_ok=True)
        options.json_path.write_text(json.dumps(report, indent=2) + "\n")
        err.print(f"wrote {options.json_path}")
    return report


def measure(options: BenchOptions, steps: _Steps) -> dict:
    """All figures of one bench run, as the JSON report."""
    report = environment()
    steps.start("copy bandwidth (1 GiB device-to-device)")
    report["copy_bandwidth"] = copy_bandwidth()
    bandwidth = report["copy_bandwidth"]["gb_per_s"] * 1e9
    steps.done(f"copy bandwidth {bandwidth / 1e9:.0f} GB/s")

    steps.start("weights")
    weights, report["model"] = load_weights(options)
    tokenizer = _tokenizer(options)
    config = weights.config
    context_length = max(max(options.contexts), options.prompt, GENERATE_PROMPT + options.steps) + 1
    if context_length > config.max_position_embeddings:
        raise FfchatError(f"contexts up to {context_length} tokens exceed the model's {config.max_position_embeddings}")
    rng = torch.Generator().manual_seed(options.seed)
    tokens = torch.randint(0, config.vocab_size, (context_length,), generator=rng).tolist()
    steps.done(f"weights: {report['model']['name']}")

    cache = cache_tokens(options.cache, context_length, config.max_position_embeddings)
    report.update(baseline=BASELINE, contexts=list(options.contexts), prompt_tokens=options.prompt, steps=options.steps,
                  warmup=options.warmup, context_length=context_length, cache_tokens=cache)
    report["roofline"] = [_roofline(context, weights.decode_bytes(context), bandwidth) for context in options.contexts]
    report["backends"] = [
        _measure_backend(name, weights, cache if name in TRITON_BACKENDS else context_length, options, tokens,
                         report["roofline"], tokenizer, steps)
        for name in options.backends
    ]
    _add_ratios(report["backends"])
    return report


def load_weights(options: BenchOptions) -> tuple[BenchWeights, dict]:
    """The weights every backend runs, and their description for the report."""
    if options.model:
        from ffchat.store import Store

        weights = stored_weights(Store().get(options.model), int4=options.int4, device=DEVICE)
        about = {"name": weights.label, "source": "store"}
    else:
        shape = options.shape or DEFAULT_SHAPE
        weights = random_weights(shape_config(shape), label=f"{shape} (random, seed {options.seed})",
                                 int4=options.int4, seed=options.seed, device=DEVICE)
        about = {"name": weights.label, "source": "random", "shape": shape, "seed": options.seed}
    about.update(
        format="int4" if weights.group_size else "bf16", group_size=weights.group_size, quantizer=weights.quantizer,
        lm_head="int4" if "lm_head" in weights.int4 else "bf16", config=weights.config.to_dict(),
    )
    return weights, about


class SilentTokenizer:
    """Random weights have no vocabulary: every id is ordinary and decodes to no text, and none ends an answer.

    So a shape's generation loop times everything `ffchat run` does per token but detokenizing.
    """

    eos_token_ids = frozenset()

    def is_special(self, token_id: int) -> bool:
        return False

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return ""


def _tokenizer(options: BenchOptions) -> Tokenizer | SilentTokenizer:
    if not options.model:
        return SilentTokenizer()
    from ffchat.store import Store
    from ffchat.tokenizer import Tokenizer

    return Tokenizer.from_dir(Store().get(options.model).model_dir)


def _roofline(context: int, parts: dict[str, int], bandwidth: float) -> dict:
    seconds = parts["total"] / bandwidth
    return {"context": context, "bytes": parts, "ms": seconds * 1e3, "tok_per_s": 1 / seconds}


def _measure_backend(name: str, weights: BenchWeights, context_length: int, options: BenchOptions,
                     tokens: list[int], roofline: list[dict], tokenizer: Tokenizer | SilentTokenizer,
                     steps: _Steps) -> dict:
    """Build one backend, time its decode at every context, the generation loop and its prefill, then free it."""
    result: dict = {"name": name, "about": BACKENDS[name].about}
    backend = None
    try:
        steps.start(f"{name}: build" + (" and compile" if name == BASELINE else ""))
        started = time.perf_counter()
        backend = BACKENDS[name].build(weights, context_length)
        torch.cuda.synchronize()
        result["setup_s"] = time.perf_counter() - started
        result["details"] = getattr(backend, "details", {})  # optional: what a backend wants on record
        steps.done(f"{name}: ready in {result['setup_s']:.1f} s")
        result["decode"] = []
        for roof in roofline:
            steps.start(f"{name}: decode at context {roof['context']}")
            ms = time_decode(backend, roof["context"], tokens, options.steps, options.warmup)
            row = _decode_row(roof, ms)
            result["decode"].append(row)
            steps.done(f"{name}: context {roof['context']}: {row['ms_per_token']:.3f} ms/token, "
                       f"{row['tok_per_s']:.0f} tok/s, {row['pct_roofline']:.1f}% of roofline")
        result["generate"] = []
        for sampling, params in GENERATE_SAMPLING.items():
            steps.start(f"{name}: generate {options.steps} tokens, {sampling}")
            row = time_generation(backend, tokenizer, tokens[:GENERATE_PROMPT], params, options.steps)
            result["generate"].append({"sampling": sampling, **row})
            steps.done(f"{name}: generate ({sampling}) {row['tok_per_s']:.0f} tok/s, host included")
        steps.start(f"{name}: prefill {options.prompt} tokens")
        gpu_ms, ttft_ms = time_prefill(backend, tokens[:options.prompt], PREFILL_REPEATS)
        result["prefill"] = {"prompt_tokens": options.prompt, "ms": statistics.median(gpu_ms),
                             "tok_per_s": options.prompt / statistics.median(gpu_ms) * 1e3,
                             "ttft_ms": statistics.median(ttft_ms), "repeats": len(gpu_ms)}
        steps.done(f"{name}: prefill {result['prefill']['tok_per_s']:.0f} tok/s, "
                   f"TTFT {result['prefill']['ttft_ms']:.1f} ms")
    except torch.cuda.OutOfMemoryError as exc:
        result["error"] = "out of GPU memory: " + str(exc).splitlines()[0]
        steps.done(f"{name}: {result['error']}")
    except FfchatError as exc:  # e.g. the triton backend asked to run bf16 weights
        result["error"] = str(exc)
        steps.done(f"{name}: {result['error']}")
    finally:
        del backend
        _free_gpu()
    return result


def _decode_row(roof: dict, ms: list[float]) -> dict:
    median = statistics.median(ms)
    return {"context": roof["context"], "ms_per_token": median, "ms_min": min(ms), "ms_max": max(ms),
            "tok_per_s": 1e3 / median, "bytes_per_token": roof["bytes"]["total"], "roofline_ms": roof["ms"],
            "pct_roofline": 100 * roof["ms"] / median}


def _add_ratios(results: list[dict]) -> None:
    """Speed-up over the baseline (its time / this time; > 1 is faster) where the baseline has the figure."""
    baseline = next((r for r in results if r["name"] == BASELINE and "error" not in r), None)
    if baseline is None:
        return
    base_decode = {row["context"]: row["ms_per_token"] for row in baseline["decode"]}
    for result in results:
        for row in result.get("decode", []):
            row["vs_baseline"] = base_decode[row["context"]] / row["ms_per_token"]
        if "prefill" in result:
            result["prefill"]["vs_baseline"] = baseline["prefill"]["ms"] / result["prefill"]["ms"]


def _free_gpu() -> None:
    """Release what the last backend held, compiled graphs and their memory pools included."""
    torch._dynamo.reset()
    gc.collect()
    torch.cuda.empty_cache()


def copy_bandwidth(nbytes: int = COPY_BUFFER_BYTES, repeats: int = COPY_REPEATS) -> dict:
    """Device-to-device copy rate, (read + write bytes) / time: the roofline's denominator."""
    src = torch.randint(0, 256, (nbytes,), dtype=torch.uint8, device=DEVICE)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    ms = event_times(lambda _: dst.copy_(src), repeats)
    rate = 2 * nbytes / 1e9 * 1e3
    return {"gb_per_s": rate / statistics.median(ms), "best_gb_per_s": rate / min(ms), "buffer_bytes": nbytes,
            "repeats": repeats}


def event_times(fn: Callable[[int], object], count: int) -> list[float]:
    """Milliseconds of each of ``count`` calls ``fn(i)`` on the GPU, from CUDA events recorded around them."""
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(count)]
    for i, (start, end) in enumerate(events):
        start.record()
        fn(i)
        end.record()
    torch.cuda.synchronize()
    return [start.elapsed_time(end) for start, end in events]


def time_decode(backend: Backend, context: int, tokens: list[int], steps: int, warmup: int) -> list[float]:
    """Milliseconds of ``steps`` decode calls, each with exactly ``context`` tokens cached.

    The cache is filled by a prefill of random tokens, then every step rewinds to
    ``context`` first, so all steps read the same KV length. No sampling is timed.
    """
    fill_cache(backend, context, tokens)
    return time_cached_decode(backend, context, tokens, steps, warmup)


def fill_cache(backend: Backend, context: int, tokens: list[int]) -> None:
    """The cache holds exactly ``tokens[:context]`` (prefilled), as ``time_cached_decode`` needs."""
    backend.rewind(0)
    if context:
        backend.prefill(tokens[:context])


def time_cached_decode(backend: Backend, context: int, tokens: list[int], steps: int, warmup: int) -> list[float]:
    """``time_decode`` on a cache ``fill_cache`` filled with ``context`` tokens (and that only steps rewound to
    ``context`` have written since): each step rewinds to ``context``, so the cache stays valid for the next call."""
    def step(i: int) -> None:
        backend.rewind(context)
        backend.decode(tokens[i % len(tokens)])

    for i in range(warmup):
        step(i)
    return event_times(step, steps)


def time_generation(backend: Backend, tokenizer: Tokenizer | SilentTokenizer, prompt: list[int],
                    params: SamplingParams, count: int, chain_length: int | None = CHAIN_LENGTH) -> dict:
    """Tokens per second of ``ffchat run``'s generation loop (host time, everything included) for ``count`` tokens
    after ``prompt``, from the answer's own timing; one warm-up answer first. ``chain_length``: ``Generator``'s."""
    generator = Generator(backend, tokenizer, chain_length)
    for _ in range(2):
        backend.rewind(0)
        generator.cached.clear()
        for _ in generator.stream(prompt, replace(params, max_tokens=count)):
            pass
    done = generator.last
    return {"prompt_tokens": len(prompt), "tokens": done.completion_tokens, "tok_per_s": done.decode_tokens_per_s,
            "finish_reason": done.finish_reason, "chain_length": generator.chain_length}


def time_prefill(backend: Backend, prompt: list[int], repeats: int) -> tuple[list[float], list[float]]:
    """(GPU ms, time-to-first-token ms) of prefilling ``prompt`` into an empty cache, after one warm-up.

    TTFT is host time from the call until the greedy first token is on the host.
    """
    gpu, ttft = [], []
    for attempt in range(repeats + 1):
        backend.rewind(0)
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        began = time.perf_counter()
        start.record()
        logits = backend.prefill(prompt)
        end.record()
        int(logits.argmax())
        took = time.perf_counter() - began
        end.synchronize()
        if attempt:
            gpu.append(start.elapsed_time(end))
            ttft.append(took * 1e3)
    return gpu, ttft


def environment() -> dict:
    """Where and how this run happened: command, date, commit, device, versions."""
    props = torch.cuda.get_device_properties(0)
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {
        "command": shlex.join(["ffchat", *sys.argv[1:]]),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "ffchat_version": __version__,
        **git_state(),
        "device": {"name": props.name, "capability": f"{props.major}.{props.minor}",
                   "sm_count": props.multi_processor_count, "memory_bytes": props.total_memory},
        "gpu_profile": profile_for_device(torch.device("cuda")).describe(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": triton_version,
    }


class _Steps:
    """Progress on stderr: a bar while measuring, and one line per finished measurement."""

    def __init__(self, progress: Progress, total: int):
        self.progress = progress
        self.task = progress.add_task("", total=total)

    def start(self, what: str) -> None:
        self.progress.update(self.task, description=what)

    def done(self, line: str) -> None:
        self.progress.advance(self.task)
        self.progress.console.print(line, highlight=False)


def tables(report: dict) -> list[Table]:
    """The report for people: decode per backend and context, the generation loop, then prefill and TTFT."""
    model, bandwidth = report["model"], report["copy_bandwidth"]["gb_per_s"]
    fmt = f"INT4 g{model['group_size']} {model['quantizer']}" if model["format"] == "int4" else "bf16"
    cache = report.get("cache_tokens")
    cache_note = f" · ffchat's KV cache {cache} tokens" if cache and cache != report.get("context_length") else ""
    decode = Table(title=f"{model['name']} · {fmt} · {report['device']['name']} · copy {bandwidth:.0f} GB/s"
                         f"{cache_note}", header_style="bold")
    for column in ("backend", "context", "MB/token", "roofline ms", "ms/token", "tok/s", "% roofline",
                   f"vs {BASELINE}"):
        decode.add_column(column, justify="left" if column == "backend" else "right")
    prefill = Table(title=f"prefill of {report['prompt_tokens']} tokens", header_style="bold")
    for column in ("backend", "prefill tok/s", "TTFT ms", f"vs {BASELINE}", "setup s"):
        prefill.add_column(column, justify="left" if column == "backend" else "right")
    generate = Table(title=f"answers after a {GENERATE_PROMPT}-token prompt: `ffchat run`'s loop, host time "
                           "included", header_style="bold")
    for column in ("backend", *(f"{sampling} tok/s" for sampling in GENERATE_SAMPLING), "decode alone tok/s"):
        generate.add_column(column, justify="left" if column == "backend" else "right")
    for result in report["backends"]:
        if "error" in result:
            decode.add_row(result["name"], "", "", "", f"failed: {result['error']}")
            continue
        nearest = min(result["decode"], key=lambda row: abs(row["context"] - GENERATE_PROMPT))
        generate.add_row(result["name"], *(f"{row['tok_per_s']:.0f}" for row in result["generate"]),
                         f"{nearest['tok_per_s']:.0f} (context {nearest['context']})")
        for row in result["decode"]:
            decode.add_row(result["name"], str(row["context"]), f"{row['bytes_per_token'] / 1e6:.1f}",
                           f"{row['roofline_ms']:.3f}", f"{row['ms_per_token']:.3f}", f"{row['tok_per_s']:.0f}",
                           f"{row['pct_roofline']:.1f}", _ratio(row))
        pre = result["prefill"]
        prefill.add_row(result["name"], f"{pre['tok_per_s']:.0f}", f"{pre['ttft_ms']:.1f}", _ratio(pre),
                        f"{result['setup_s']:.1f}")
    return [decode, generate, prefill]


def _ratio(row: dict) -> str:
    return f"{row['vs_baseline']:.2f}x" if "vs_baseline" in row else "-"
