"""Serving load test: requests/s and p50/p95 latency of `doctune serve` at 1, 4 and 16 concurrent clients, with the
request log written and not written, in one run; the log's overhead as the ratio log on / log off.

The served model is the bundled SmolLM2-135M-Instruct GGUF, registered as the champion's gguf-q8_0 variant in a
temporary sqlite MLflow store (as tests/test_serve.py does), behind a real `Server` (its llama.cpp server process,
its request log). The version carries no retrieval index and no abstention threshold: the bench measures the
forwarding path and the log, not retrieval or scoring.

Clients are threads of this process, each sending one request after the other (a fresh connection each, as
urllib does): short documentation questions cycled from a fixed list, fixed max_tokens, temperature 0, so the two
log modes do the same work. Each concurrency level keeps its clients running through eight phases, log on, off,
off, on, off, on, on, off (so a drift of the shared machine falls on both modes); `doctune serve` has no switch for
its log, so "off" replaces the server's `requests` JsonlLog with a writer that does nothing (the whole path:
redaction, JSON, the file append), and "on" times each write of the server's own log. The first phase counts from
the moment every client has had a reply (ramp-up); a later one from the moment every client has sent a request in
it (every request sent before the switch has had its reply by then); each ends at its `--requests / 4`-th reply
after that. Requests/s is those replies over that time, latency is their client-side seconds. Writes
bench/results/serve.json and serve.md.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
from results_io import write_results

from doctune.artifacts import MODEL_KIND
from doctune.chat import SYSTEM_PROMPT
from doctune.config import load_config
from doctune.gate import registry
from doctune.models import bundled_gguf
from doctune.serve import Server
from doctune.tracking import Tracker

REPO = Path(__file__).resolve().parents[1]
MODEL = "smollm2-135m-instruct"
VARIANT = "gguf-q8_0"
PROMPTS = [
    "How do I install a package?",
    "What does the boot loader do?",
    "How do I mount the installation media?",
    "Where are the configuration files kept?",
    "How do I check which version is installed?",
    "What is a kernel module?",
    "How do I update the firmware?",
    "How do I remove a package?",
]
PHASES = ("on", "off", "off", "on", "off", "on", "on", "off")  # per level: a drift of the machine falls on both modes


class NoLog:
    """The request log turned off: `Server.requests` with a write() that does nothing."""

    def write(self, record: dict) -> None:
        pass


class TimedLog:
    """The request log on: the server's own JsonlLog, with the seconds each write takes."""

    def __init__(self, log):
        self.log, self.seconds = log, []

    def write(self, record: dict) -> None:
        started = time.perf_counter()
        self.log.write(record)
        self.seconds.append(time.perf_counter() - started)


def champion(workdir: Path, overrides: list[str]):
    """A config whose registry's champion is the bundled GGUF as its gguf-q8_0 variant, with a merged-model folder
    that carries the training system prompt (and no weights: llama.cpp serves the variant)."""
    config = load_config(REPO / "configs" / "cpu-demo.yaml", [f"project.workdir={workdir}", *overrides])
    tracker = Tracker(config)
    model, variant = workdir / "staged" / "model", workdir / "staged" / VARIANT
    model.mkdir(parents=True)
    variant.mkdir()
    (model / "system_prompt.txt").write_text(SYSTEM_PROMPT + "\n")
    (model / "config.json").write_text("{}")
    shutil.copy(bundled_gguf(MODEL), variant / "model-q8_0.gguf")
    parent = tracker.open_pipeline_run("bench-serve")
    run = tracker.start_stage_run("quantize", parent, {})
    refs = {"model": run.log_output("model", model, kind=MODEL_KIND), VARIANT: run.log_output(VARIANT, variant, kind="gguf")}
    run.finish(refs)
    tracker.close_pipeline_run(parent, succeeded=True)
    version = registry.register_candidate(tracker, refs["model"], {VARIANT: refs[VARIANT]}, {})
    registry.promote(tracker, version, reason="serve benchmark")
    return config


def ask(url: str, prompt: str, max_tokens: int, timeout: float) -> tuple[int, int]:
    """(HTTP status, completion tokens) of one chat request."""
    body = {"messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens, "temperature": 0}
    headers = {"Content-Type": "application/json"}
    request = urllib.request.Request(f"{url}/v1/chat/completions", json.dumps(body).encode(), headers)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            reply = json.loads(response.read())
            return response.status, (reply.get("usage") or {}).get("completion_tokens", 0)
    except urllib.error.HTTPError as exc:
        return exc.code, 0


def window(
    records: list[dict], phase: int, clients: int, n: int, sent: dict[int, float] | None = None
) -> tuple[float, list[dict]] | None:
    """A phase's measured window: (its opening time, its first `n` replies after it), or None while it has fewer.

    The level's first phase opens when every client has had a reply (the ramp-up). A later phase (`sent`: each
    client's first send in it) opens when the last client sent its first request in it: each client sends only
    after its previous reply, so from then on every request in flight was sent in this phase."""
    mine = [r for r in records if r["phase"] == phase]
    first = dict(sent or {})
    if sent is None:
        for r in mine:
            first[r["client"]] = min(first.get(r["client"], r["end"]), r["end"])
    if len(first) < clients:
        return None
    opened = max(first.values())
    after = sorted((r for r in mine if r["end"] > opened), key=lambda r: r["end"])
    return (opened, after[:n]) if len(after) >= n else None


def summarize(windows: list[tuple[float, list[dict]]]) -> dict:
    """requests/s (replies over the windows' total time) and latency percentiles of the replies in the windows."""
    seconds = sum(replies[-1]["end"] - opened for opened, replies in windows)
    latencies = np.array([r["end"] - r["start"] for _, replies in windows for r in replies])
    tokens = [r["tokens"] for _, replies in windows for r in replies]
    return {
        "requests": len(latencies), "seconds": round(seconds, 3), "requests_per_s": round(len(latencies) / seconds, 3),
        "p50_s": round(float(np.percentile(latencies, 50)), 4), "p95_s": round(float(np.percentile(latencies, 95)), 4),
        "max_s": round(float(latencies.max()), 4), "mean_s": round(float(latencies.mean()), 4),
        "mean_completion_tokens": round(float(np.mean(tokens)), 2),
    }  # fmt: skip


def load_level(server: Server, real_log, clients: int, n_per_phase: int, max_tokens: int, timeout: float, raw=None) -> dict:
    """Run `clients` clients through PHASES, switching the log; each mode's measured windows summarized."""
    lock = threading.Condition()
    records: list[dict] = []
    state = {"phase": 0, "next": 0}
    sent: dict[int, dict[int, float]] = {phase: {} for phase in range(len(PHASES))}  # phase -> client -> first send
    stop = threading.Event()
    errors: list[str] = []

    def client(k: int) -> None:
        while not stop.is_set():
            with lock:
                phase, i = state["phase"], state["next"]
                state["next"] += 1
                start = time.perf_counter()
                sent[phase].setdefault(k, start)
            try:
                status, tokens = ask(server.url, PROMPTS[i % len(PROMPTS)], max_tokens, timeout)
            except Exception as exc:  # the level stops with the reason
                status, tokens = 0, 0
                errors.append(f"{type(exc).__name__}: {exc}")
            end = time.perf_counter()
            with lock:
                records.append({"client": k, "phase": phase, "start": start, "end": end, "status": status, "tokens": tokens})
                lock.notify_all()

    windows: dict[str, list] = {"on": [], "off": []}
    timed = TimedLog(real_log)
    threads = [threading.Thread(target=client, args=(k,), daemon=True) for k in range(clients)]
    for thread in threads:
        thread.start()
    try:
        for phase, mode in enumerate(PHASES):
            with lock:
                server.requests = timed if mode == "on" else NoLog()  # a request sent from now on is logged so
                state["phase"] = phase
                while (found := window(records, phase, clients, n_per_phase, sent[phase] if phase else None)) is None:
                    failed = errors or [f"HTTP {r['status']}" for r in records if r["status"] != 200]
                    if failed:
                        raise RuntimeError(f"a request failed at {clients} clients: {failed[0]}")
                    lock.wait(timeout=timeout)
            windows[mode].append(found)
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=timeout)
        server.requests = real_log
    if raw is not None:
        raw.extend({"clients": clients, "mode": PHASES[r["phase"]], **r} for r in records)
    on, off = summarize(windows["on"]), summarize(windows["off"])
    return {
        "clients": clients, "log_on": on, "log_off": off,
        "log_write_ms": {"p50": round(float(np.percentile(timed.seconds, 50)) * 1e3, 3),
                         "p95": round(float(np.percentile(timed.seconds, 95)) * 1e3, 3),
                         "max": round(max(timed.seconds) * 1e3, 3), "writes": len(timed.seconds)},
        "ratios": {"requests_per_s_on_over_off": round(on["requests_per_s"] / off["requests_per_s"], 3),
                   "p95_on_over_off": round(on["p95_s"] / off["p95_s"], 3),
                   "p50_on_over_off": round(on["p50_s"] / off["p50_s"], 3)},
    }  # fmt: skip


def prompt_stalls(backend_log: Path, over_s: float = 1.0) -> dict:
    """llama.cpp's prompt evaluations that took over `over_s`, from the llama.cpp server's own log (its perf lines).
    They run on every core (n_threads_batch): when another process takes one, they stall for seconds."""
    text = backend_log.read_text(errors="replace") if backend_log.is_file() else ""
    seconds = [float(ms) / 1e3 for ms in re.findall(r"prompt eval time =\s*([\d.]+) ms", text)]
    slow = [s for s in seconds if s > over_s]
    return {"prompt_evals": len(seconds), f"over_{over_s:g}_s": len(slow), "max_s": round(max(seconds, default=0.0), 3)}


def backend_parallelism() -> dict:
    """What the llama.cpp server behind `doctune serve` runs with: its slots, and its threads (its defaults:
    doctune.serve.Backend passes neither)."""
    import llama_cpp
    import llama_cpp.server.app as app
    from llama_cpp.server.settings import ModelSettings

    defaults = ModelSettings(model="model.gguf")
    one_lock = hasattr(app, "llama_outer_lock") and hasattr(app, "llama_inner_lock")
    return {
        "server": f"llama-cpp-python {llama_cpp.__version__} server (python -m doctune.llama_server), one model instance",
        "slots": 1 if one_lock else None,
        "slots_why": "every completion request takes the server's model lock, so one request is decoded at a time; "
                     "llama-cpp-python's server has no --parallel (slots) option and doctune.serve.Backend passes "
                     "neither slots nor threads" if one_lock else "model lock not found in llama_cpp.server.app",
        "n_threads": defaults.n_threads,  # max(cpu_count // 2, 1): decoding
        "n_threads_batch": defaults.n_threads_batch,  # cpu_count: prompt processing
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", default="1,4,16", help="concurrency levels, comma-separated")
    parser.add_argument("--requests", type=int, default=64, help="measured replies per level and log mode")
    parser.add_argument("--max-tokens", type=int, default=24)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    parser.add_argument("--raw", type=Path, help="also write every reply (level, phase, client, start, end) here, JSONL")
    args = parser.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    levels = [int(c) for c in args.clients.split(",")]
    n_per_phase = max(1, args.requests // PHASES.count("on"))

    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="doctune-serve-bench-") as tmp:
        config = champion(Path(tmp), ["serve.port=0", "serve.retrieve=false", "serve.apply_abstention_threshold=false"])
        server = Server(config)
        server.start()
        try:
            real_log = server.requests
            for prompt in PROMPTS:  # warm-up, not measured: the model's pages, the prompt cache
                ask(server.url, prompt, args.max_tokens, config.serve.request_timeout_s)
            raw: list[dict] = []
            rows = [
                load_level(server, real_log, clients, n_per_phase, args.max_tokens, config.serve.request_timeout_s, raw)
                for clients in levels
            ]  # fmt: skip
            parallelism = backend_parallelism()
            stalls = prompt_stalls(server.log_dir / f"llama-server-v{server.backend.deployment.version}.log")
            log_path = real_log.path
            logged = log_path.read_text().splitlines() if log_path.is_file() else []
        finally:
            server.close()
    wall = time.monotonic() - started
    loadavg = os.getloadavg()
    result = {
        "model": f"bundled:{MODEL}", "variant": VARIANT, "cpus": os.cpu_count(), "max_tokens": args.max_tokens,
        "temperature": 0, "prompts": PROMPTS, "phases": list(PHASES), "requests_per_mode": n_per_phase * PHASES.count("on"),
        "backend": parallelism, "levels": rows, "wall_seconds": round(wall, 1),
        "load_average_1m_at_end": round(loadavg[0], 2),
        "prompt_stalls": stalls,
        "log": {"records_written": len(logged),
                "mean_record_bytes": round(sum(len(line) + 1 for line in logged) / len(logged)) if logged else None},
        "notes": [
            "log off: the bench replaces Server.requests (the request log's JsonlLog) with an object whose write() does "
            "nothing; doctune serve has no setting that turns its request log off",
            "clients are threads of the bench process, which also runs the front server; the llama.cpp server is a "
            "separate process",
            "the served version has no retrieval index and no abstention threshold: neither retrieval nor scoring runs",
        ],
    }  # fmt: skip
    slots = parallelism["slots"]
    threads = f"{parallelism['n_threads']} decode thread(s), {parallelism['n_threads_batch']} for prompts"
    lines = [
        f"Serving load test: bundled SmolLM2-135M-Instruct {VARIANT} behind `doctune serve`, {len(PROMPTS)} short "
        f"questions cycled, max_tokens {args.max_tokens}, temperature 0, {result['requests_per_mode']} measured replies per "
        f"level and log mode (phases log {', '.join(PHASES)}), {os.cpu_count()} CPUs shared by clients, front server and model; "
        f"llama.cpp server (llama-cpp-python): {slots} slot (requests decoded one at a time), {threads}.",
        "",
        "| clients | log | requests/s | p50 s | p95 s | mean completion tokens |",
        "|---:|---|---:|---:|---:|---:|",
    ]
    for row in rows:
        for mode in ("on", "off"):
            m = row[f"log_{mode}"]
            lines.append(f"| {row['clients']} | {mode} | {m['requests_per_s']:.2f} | {m['p50_s']:.3f} | {m['p95_s']:.3f} | "
                         f"{m['mean_completion_tokens']:.1f} |")  # fmt: skip
    lines += [
        "",
        "| clients | requests/s, log on / off | p50, log on / off | p95, log on / off | log write ms, p50 / max |",
        "|---:|---:|---:|---:|---:|",
        *(f"| {r['clients']} | {r['ratios']['requests_per_s_on_over_off']:.3f} | {r['ratios']['p50_on_over_off']:.3f} | "
          f"{r['ratios']['p95_on_over_off']:.3f} | {r['log_write_ms']['p50']:.2f} / {r['log_write_ms']['max']:.2f} |"
          for r in rows),
        "",
        f"Log off: the bench replaces the server's request log with a writer that does nothing (`doctune serve` has no "
        f"switch for it). {result['log']['records_written']} records written, {result['log']['mean_record_bytes']} bytes "
        f"each on average. Run wall time {wall:.0f} s; load average {loadavg[0]:.2f} at the end; "
        f"{stalls['over_1_s']} of {stalls['prompt_evals']} prompt evaluations in llama.cpp took over 1 s (longest "
        f"{stalls['max_s']:.1f} s; they run on every core and stall when another process takes one).",
    ]  # fmt: skip
    write_results(args.out, "serve", result, lines)
    if args.raw:
        args.raw.write_text("".join(json.dumps(r) + "\n" for r in raw))


if __name__ == "__main__":
    main()
