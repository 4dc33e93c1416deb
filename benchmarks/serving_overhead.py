"""Where a served request's time goes: HTTP throughput next to the engine's own at the same batch sizes, fan-out
against its ideal, the per-phase breakdown, and a standard load tool (locust, headless) next to the script's client.

MiniLM with N = 8 fine-tunes frozen at k = 4 of L = 6 blocks, shared prefix, repeated-input cache off, texts from
Rotten Tomatoes, `--clients` (32) requests in flight:

1. `http`: the closed-loop client of `serving.py` (`POST /predict`, one text to one fine-tune drawn uniformly).
   `/metrics` is read before and after the window: the mean engine batch size and the mean time of each phase
   (`hf_freeze_request_phase_seconds`: tokenize, queue, batch, engine, serialize; the rest of the HTTP latency is
   reading and validating the body, thread hops and the event loop).
2. `batcher`: the same inputs, tokenized beforehand, submitted by `--clients` coroutines straight to a
   `DynamicBatcher` (no HTTP, no tokenizing, no JSON).
3. `engine`: `engine.predict` called in a loop on batches of the size the HTTP run had on average (the same
   fine-tune mix): the engine alone.
4. `fanout`: `--clients` loops each send one text with `"models": [all 8]` (one request, 8 answers), served
   with and without the shared prefix: the gain in answers per second against the ideal N*L / (k + N(L - k)) =
   2.4, over HTTP and for the engine alone (one batch of the 8 fine-tunes x 4 texts, shared vs separate). A
   first run with `--clients // 8` loops (32 rows in flight; serving_overhead_first_run.md) reached 1.72x: the
   engine then idles between batches while the few clients read their answers and send the next.
5. `locust`: locust headless (`FastHttpUser`, `--clients` users, 127.0.0.1) against the same server as 1, for one
   window (at least 10 s).

Every comparison alternates short windows of its sides (`--rounds`, 3), as the CPU may be shared; its ratio is the
median of the ratios of neighbouring windows.

Writes benchmarks/results/serving_overhead.{json,md} atomically; about 3 minutes on 2 cores:

    OMP_NUM_THREADS=2 python benchmarks/serving.py --overhead --warmup 1
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import markdown_table, stamp, write_results

N, BOUNDARY = 8, 4
LOCUSTFILE = '''
import random
from locust import FastHttpUser, task

TEXTS = {texts!r}
MODELS = {models!r}


class Client(FastHttpUser):
    @task
    def predict(self):
        body = {{"inputs": random.choice(TEXTS), "model": random.choice(MODELS), "truncate": True}}
        self.client.post("/predict", json=body)
'''


def _samples(text: str) -> dict[str, float]:
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
            if line and not line.startswith("#")}


def _delta(after: dict[str, float], before: dict[str, float], key: str) -> float:
    return after.get(key, 0.0) - before.get(key, 0.0)


def breakdown(before: dict[str, float], after: dict[str, float], route: str = "/predict") -> dict[str, float]:
    """Mean milliseconds of each phase, of the whole HTTP request to `route`, and the rest, between two scrapes."""
    from hf_freeze.serving.metrics import PHASES

    out = {}
    for phase in PHASES:
        count = _delta(after, before, f'hf_freeze_request_phase_seconds_count{{phase="{phase}"}}')
        total = _delta(after, before, f'hf_freeze_request_phase_seconds_sum{{phase="{phase}"}}')
        out[f"{phase}_ms"] = 1000 * total / count if count else float("nan")
    count = _delta(after, before, f'hf_freeze_request_duration_seconds_count{{route="{route}"}}')
    out["http_ms"] = 1000 * _delta(after, before, f'hf_freeze_request_duration_seconds_sum{{route="{route}"}}') / count
    out["other_ms"] = out["http_ms"] - sum(out[f"{p}_ms"] for p in PHASES)
    task = route.strip("/")
    batches = _delta(after, before, f'hf_freeze_batch_size_count{{task="{task}"}}')
    out["mean_batch"] = _delta(after, before, f'hf_freeze_batch_size_sum{{task="{task}"}}') / batches
    return out


def batcher_throughput(engine, requests, clients: int, seconds: float, warmup: float, args) -> dict:
    """`clients` coroutines submitting one request each, straight to a `DynamicBatcher` (no HTTP)."""
    from hf_freeze.serving.batching import DynamicBatcher

    sizes: list[int] = []
    batcher = DynamicBatcher(engine, max_wait_ms=args.max_wait_ms, max_batch_tokens=args.max_batch_tokens,
                             max_queue=4 * clients, on_batch=lambda task, n, tokens: sizes.append(n))
    rng = random.Random(1)
    state = {"measuring": False, "answered": 0}

    async def client(stop_at: float) -> None:
        while time.perf_counter() < stop_at:
            future = batcher.submit("predict", [rng.choice(requests)])[0]
            await asyncio.wrap_future(future)
            state["answered"] += state["measuring"]

    async def run() -> float:
        start = time.perf_counter()
        tasks = [asyncio.create_task(client(start + warmup + seconds)) for _ in range(clients)]
        await asyncio.sleep(warmup)
        state["measuring"], first = True, len(sizes)
        window = time.perf_counter()
        await asyncio.gather(*tasks)
        state["batches"] = sizes[first:]
        return time.perf_counter() - window

    batcher.start()
    try:
        elapsed = asyncio.run(run())
    finally:
        batcher.stop()
    return {"throughput": state["answered"] / elapsed,
            "mean_batch": sum(state["batches"]) / max(1, len(state["batches"]))}


def engine_throughput(engine, requests, batch: int, seconds: float) -> float:
    """Inputs per second of `engine.predict` on batches of `batch` requests drawn from `requests`."""
    rng = random.Random(2)
    engine.predict([rng.choice(requests) for _ in range(batch)])  # warm
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        engine.predict([rng.choice(requests) for _ in range(batch)])
        done += batch
    return done / (time.perf_counter() - start)


def measure_fanout(url: str, names: list[str], texts, loops: int, seconds: float, warmup: float) -> float:
    """Answers per second of `loops` closed-loop clients each sending one text to all `names` in one request."""
    import httpx

    fresh = iter(texts)
    state = {"measuring": False, "answers": 0, "errors": 0}

    async def client(http, stop_at: float) -> None:
        while time.perf_counter() < stop_at:
            response = await http.post("/predict", json={"inputs": next(fresh), "models": names, "truncate": True})
            if response.status_code != 200:
                state["errors"] += 1
            elif state["measuring"]:
                state["answers"] += len(response.json())

    async def run() -> float:
        async with httpx.AsyncClient(base_url=url, timeout=120, limits=httpx.Limits(max_connections=loops)) as http:
            start = time.perf_counter()
            tasks = [asyncio.create_task(client(http, start + warmup + seconds)) for _ in range(loops)]
            await asyncio.sleep(warmup)
            state["measuring"] = True
            window = time.perf_counter()
            await asyncio.gather(*tasks)
            return time.perf_counter() - window

    elapsed = asyncio.run(run())
    if state["errors"]:
        raise RuntimeError(f"{state['errors']} fan-out requests failed")
    return state["answers"] / elapsed


def run_locust(url: str, texts, names: list[str], users: int, seconds: float) -> dict:
    """locust headless against `url` for `seconds`: requests per second and the median latency it saw."""
    with tempfile.TemporaryDirectory() as tmp:
        locustfile = Path(tmp) / "locustfile.py"
        locustfile.write_text(LOCUSTFILE.format(texts=list(texts[:500]), models=names))
        command = [sys.executable, "-m", "locust", "-f", str(locustfile), "--headless", "-u", str(users),
                   "-r", str(users), "-t", f"{int(seconds)}s", "--host", url, "--csv", str(Path(tmp) / "run"),
                   "--only-summary", "--stop-timeout", "5", "--loglevel", "WARNING"]
        done = subprocess.run(command, capture_output=True, text=True, timeout=seconds + 60)
        rows = list(csv.DictReader((Path(tmp) / "run_stats.csv").open()))
    total = next(r for r in rows if r["Name"] == "Aggregated")
    if done.returncode not in (0, 1):
        raise RuntimeError(done.stderr[-2000:])
    return {"throughput": float(total["Requests/s"]), "p50_ms": float(total["50%"]),
            "requests": int(total["Request Count"]), "failures": int(total["Failure Count"])}


def overhead(args: argparse.Namespace) -> None:
    import httpx
    from serving import load_models, measure

    from hf_freeze import assets, get_layout
    from hf_freeze.serving import Request, ServingEngine
    from hf_freeze.serving.app import create_app, serve_in_thread

    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    started = time.perf_counter()
    seconds = args.seconds or 18.0  # per comparison, over all rounds
    texts = list(assets.rotten_tomatoes()["train"].shuffle(seed=0)["text"])
    path, base, finetunes, tokenizer = load_models("minilm", N, BOUNDARY)
    num_blocks = get_layout(base).num_blocks
    names = [f"ft{i}" for i in range(N)]

    def engine_of(share: bool) -> ServingEngine:
        engine = ServingEngine(base, source=path, share_prefix=share, cache_bytes=0)
        for name, model in zip(names, finetunes):
            engine.add_model(name, model)
        return engine

    def app_of(engine: ServingEngine):
        return create_app(engine, tokenizer=tokenizer, max_wait_ms=args.max_wait_ms,
                          max_batch_tokens=args.max_batch_tokens, max_queue=4 * N * args.clients)

    engine = engine_of(True)
    rng = random.Random(0)
    requests = [Request(tokenizer(t, truncation=True)["input_ids"], model=rng.choice(names)) for t in texts[:2000]]
    # The CPU is shared: every comparison alternates short windows of its sides, and its ratio is the median of
    # the ratios of neighbouring windows.
    window = seconds / args.rounds
    rounds: list[dict] = []
    with serve_in_thread(app_of(engine)) as url:
        for r in range(args.rounds):
            offset = 2000 + 1000 * r
            before = _samples(httpx.get(f"{url}/metrics").text)
            http = measure(url, "/predict", names, texts[offset:] + texts[:offset], args.clients, window,
                           args.warmup)
            phases = breakdown(before, _samples(httpx.get(f"{url}/metrics").text))
            batch = max(1, round(phases["mean_batch"]))
            row = {"round": r, "http_req_s": http["throughput"], "http_p50_ms": http["p50_ms"], **phases,
                   "engine_batch": batch, "engine_req_s": engine_throughput(engine, requests, batch, window),
                   "batcher_req_s": batcher_throughput(engine, requests, args.clients, window, args.warmup,
                                                       args)["throughput"]}
            print(row, flush=True)
            rounds.append(row)
        locust = run_locust(url, texts[6000:], names, args.clients, max(10.0, window))
        print("locust", locust, flush=True)

    engines = {mode: engine_of(share) for mode, share in (("separate", False), ("shared", True))}
    queries = [Request(r.input_ids) for r in requests[:4]]
    fan_requests = [Request(q.input_ids, model=n) for n in names for q in queries]
    fan_rounds: list[dict] = []
    with serve_in_thread(app_of(engines["separate"])) as separate_url, \
            serve_in_thread(app_of(engines["shared"])) as shared_url:
        for r in range(args.rounds):
            row = {"round": r}
            for mode, url in (("separate", separate_url), ("shared", shared_url)):
                offset = 8000 + 1000 * (2 * r + (mode == "shared"))
                row[f"http_{mode}"] = measure_fanout(url, names, texts[offset:] + texts[:offset],
                                                     args.clients, window, args.warmup)
            for mode in ("separate", "shared"):
                row[f"engine_{mode}"] = engine_throughput(engines[mode], fan_requests, len(fan_requests), window / 2)
            print("fanout", row, flush=True)
            fan_rounds.append(row)
    ideal = N * num_blocks / (BOUNDARY + N * (num_blocks - BOUNDARY))

    def median(values) -> float:
        return statistics.median(list(values))

    engine_req_s = median(r["engine_req_s"] for r in rounds)
    summary = [
        {"client": "serving.py (httpx)", "path": "HTTP", "req_s": median(r["http_req_s"] for r in rounds),
         "p50_ms": median(r["http_p50_ms"] for r in rounds),
         "vs_engine": median(r["http_req_s"] / r["engine_req_s"] for r in rounds)},
        {"client": "locust (FastHttpUser)", "path": "HTTP", "req_s": locust["throughput"], "p50_ms": locust["p50_ms"],
         "vs_engine": locust["throughput"] / engine_req_s},
        {"client": "coroutines", "path": "DynamicBatcher, no HTTP", "req_s": median(r["batcher_req_s"] for r in rounds),
         "p50_ms": None, "vs_engine": median(r["batcher_req_s"] / r["engine_req_s"] for r in rounds)},
        {"client": "loop, the HTTP run's mean batch", "path": "engine.predict", "req_s": engine_req_s,
         "p50_ms": None, "vs_engine": 1.0},
    ]
    from hf_freeze.serving.metrics import PHASES

    keys = ["mean_batch", *(f"{p}_ms" for p in PHASES), "other_ms", "http_ms"]
    phases = [{k: median(r[k] for r in rounds) for k in keys}]
    fan_rows = []
    for path_ in ("http", "engine"):
        gains = [r[f"{path_}_shared"] / r[f"{path_}_separate"] for r in fan_rounds]
        fan_rows.append({"path": path_, "separate_answers_s": median(r[f"{path_}_separate"] for r in fan_rounds),
                         "shared_answers_s": median(r[f"{path_}_shared"] for r in fan_rounds),
                         "gain": median(gains), "ideal_gain": ideal, "gain_vs_ideal": median(gains) / ideal})
    payload = {"stamp": stamp(), "args": vars(args), "minutes": round((time.perf_counter() - started) / 60, 1),
               "model": "minilm", "N": N, "k": BOUNDARY, "L": num_blocks, "rounds": rounds, "locust": locust,
               "fanout_rounds": fan_rounds, "summary": summary, "phases": phases, "fanout": fan_rows}
    table = "\n\n".join([
        markdown_table(summary, ["client", "path", "req_s", "p50_ms", "vs_engine"]),
        markdown_table(phases, keys),
        markdown_table(fan_rows, ["path", "separate_answers_s", "shared_answers_s", "gain", "ideal_gain",
                                  "gain_vs_ideal"]),
    ])
    write_results(args.name if args.name != "serving" else "serving_overhead", payload, table)

