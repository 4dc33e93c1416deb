"""Serving N fine-tunes of one base: as N separate models, or through the frozen prefix they share.

For each packaged model (MiniLM fine-tunes frozen at k = 4 of 6 blocks, SmolLM2 fine-tunes frozen at k = 20 of 30)
and N fine-tunes, a uvicorn server on 127.0.0.1 serves them (a) with `share_prefix=False` (each model's full
forward on its rows) and (b) with the shared prefix; the repeated-input cache is off for both. A closed-loop async
client keeps `--clients` requests in flight for `--seconds` after a short warm-up, in two workloads:

- `mixed`: each request sends its own Rotten Tomatoes snippet to one fine-tune drawn uniformly (N = 1, 2, 4, 8).
- `fanout`: each query sends one snippet to all N fine-tunes at once (N concurrent requests, one per fine-tune;
  `--clients // N` queries in flight), as a multi-task server answers one input with N task heads (N = 2, 4, 8;
  at N = 1 it is the mixed workload).

MiniLM requests are `POST /predict`, SmolLM2 requests `POST /score` (one forward each). Throughput counts answered
requests per second in both workloads. Reported: throughput, p50/p99 request latency, and the gain of (b) over (a)
against the ideal N*L / (k + N(L - k)) block-forwards ratio, with the fraction of the ideal reached. The ideal is
reachable only where (b) does less row-work than (a): on a CPU, whose cost grows with rows, that is the fanout
workload (one prefix row per query for N fine-tunes); in the mixed workload every row still needs k + (L - k)
blocks. Then, at the largest N with the shared prefix and the cache on, mixed throughput when 0%, 50%, 90% of
requests repeat an earlier input, next to what the skipped blocks cost: each run's gain over the 0% run against
the ideal (1 - h0 * s) / (1 - h * s), h the run's measured cache hit rate (h0 the 0% run's) and s the share of a
batch's engine time a hit skips, timed on the same engine in the same run (a batch of fresh inputs, all misses,
then the same batch again, all hits, at the runs' mean batch size); with each run's per-phase breakdown from
`/metrics` (only the cache runs: `--workloads` with no value). SmolLM2's mixed workload runs at the smallest and
largest N only (`--all-mixed-points` for every N).

Results (JSON + md + PNG, written atomically) go to benchmarks/results/serving.*. The default run takes about
10 minutes on 2 CPU cores (under 12):

    OMP_NUM_THREADS=2 python benchmarks/serving.py

A quick check that it works (about 1 minute): `python benchmarks/serving.py --models minilm --ns 1 2
--seconds 2 --repeats 0 90 --name serving_check`.

`--behind-generation` measures something else (about 1 minute): the latency of a short `POST /score` (SmolLM2)
sent while one long generation streams, with continuous batching (the generation scheduler steps between other
batches) and with run-to-end batching (`DynamicBatcher(continuous=False)`: a generation batch decodes to its end
before anything else, as serving did before continuous batching), against the same request alone. The generation
is held at `--generation-tokens` new tokens by the model's `generation_config.min_new_tokens`. Results go to
benchmarks/results/serving_behind_generation.*:

    OMP_NUM_THREADS=2 python benchmarks/serving.py --behind-generation

`--overhead` measures where a served request's time goes (`serving_overhead.py`, about 2 minutes): HTTP throughput
next to the engine's own at the same batch sizes, fan-out against its ideal, the per-phase breakdown, and locust
next to this script's client. Results go to benchmarks/results/serving_overhead.*:

    OMP_NUM_THREADS=2 python benchmarks/serving.py --overhead --warmup 1
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from common import RESULTS, markdown_table, stamp, write_results

SETTINGS = {  # task head, route, boundary, measured seconds per point, mixed workload at every N or the ends only
    "minilm": {"boundary": 4, "route": "/predict", "head": "seq", "seconds": 6.0, "mixed_ends_only": False},
    "smollm2": {"boundary": 20, "route": "/score", "head": "causal", "seconds": 12.0, "mixed_ends_only": True},
}
WORKLOADS = ("mixed", "fanout")


def ideal_gain(n: int, num_blocks: int, boundary: int) -> float:
    """Block-forwards of N separate models over those with a shared prefix: N*L / (k + N(L - k))."""
    return n * num_blocks / (boundary + n * (num_blocks - boundary))


def repeat_ideal_gain(hit_rate: float, baseline_hit_rate: float, skipped_share: float) -> float:
    """Throughput gain over the baseline run if a cache hit saved exactly what its skipped blocks cost and nothing
    else limited throughput: (1 - h0 * s) / (1 - h * s), with s the share of a batch's engine time a hit skips."""
    return (1 - baseline_hit_rate * skipped_share) / (1 - hit_rate * skipped_share)


def skipped_share(base, finetunes, path, requests, batch: int, rounds: int, task: str) -> dict:
    """What a cache hit saves in the engine: each round times one batch of `batch` requests never seen (every
    input misses: prefix, suffix, states stored), then the same batch again (every input hits: suffix only), on
    one engine with the cache on. The share is 1 - the median of hit/miss time ratios."""
    from hf_freeze.serving import ServingEngine

    engine = ServingEngine(base, source=path, cache_bytes=256 * 2**20)
    for i, model in enumerate(finetunes):
        engine.add_model(f"ft{i}", model)
    run = getattr(engine, task)
    run(requests[-batch:])  # warm
    misses, hits = [], []
    for r in range(rounds):
        chunk = requests[r * batch:(r + 1) * batch]
        for times in (misses, hits):
            t0 = time.perf_counter()
            run(chunk)
            times.append(time.perf_counter() - t0)
    ratios = sorted(h / m for h, m in zip(hits, misses))
    return {"miss_batch_ms": 1000 * statistics.median(misses), "hit_batch_ms": 1000 * statistics.median(hits),
            "skipped_share": 1 - statistics.median(ratios), "batch": batch}


def load_models(name: str, count: int, boundary: int):
    """The base (as its config names it) and `count` fine-tunes: the task model with the base's weights, frozen
    at `boundary`, its trainable tensors perturbed (a stand-in for fine-tuning; speed does not depend on values)."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    from hf_freeze import assets, freeze_prefix
    from hf_freeze.serving.engine import load_base

    path = assets.model_path(name)
    base = load_base(path).eval()
    finetunes = []
    for i in range(count):
        if SETTINGS[name]["head"] == "seq":
            model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
        else:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        freeze_prefix(model, boundary)
        g = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for param in model.parameters():
                if param.requires_grad and param.numel() > 1:
                    param.add_(0.02 * param.std() * torch.randn(param.shape, generator=g))
        finetunes.append(model.eval())
    return path, base, finetunes, AutoTokenizer.from_pretrained(path)


def measure(url: str, route: str, models: list[str], texts, clients: int, seconds: float, warmup: float,
            workload: str = "mixed", repeat_fraction: float = 0.0, hot: int = 64, seed: int = 0,
            on_window=None) -> dict:
    """Closed loop with `clients` requests in flight; counts the requests answered in the window.

    `mixed`: each of `clients` loops sends one text to one fine-tune drawn uniformly. `fanout`: each of
    `clients // len(models)` loops sends one text to every fine-tune at once and waits for all the answers.
    `on_window()` runs as the measured window starts."""
    import httpx

    rng = random.Random(seed)
    fresh = iter(texts)
    sent: list[str] = []
    latencies: list[float] = []
    errors = 0
    state = {"measuring": False}

    def next_text() -> str:
        if sent and rng.random() < repeat_fraction:
            return rng.choice(sent[:hot])
        text = next(fresh)
        sent.append(text)
        return text

    async def post(http: httpx.AsyncClient, text: str, model: str, started: float) -> None:
        nonlocal errors
        response = await http.post(route, json={"inputs": text, "model": model, "truncate": True})
        if response.status_code != 200:
            errors += 1
        elif state["measuring"]:
            latencies.append(time.perf_counter() - started)

    async def client(http: httpx.AsyncClient, stop_at: float) -> None:
        while time.perf_counter() < stop_at:
            text, started = next_text(), time.perf_counter()
            targets = models if workload == "fanout" else [rng.choice(models)]
            await asyncio.gather(*(post(http, text, model, started) for model in targets))

    async def run() -> float:
        loops = max(1, clients // len(models)) if workload == "fanout" else clients
        async with httpx.AsyncClient(base_url=url, timeout=120,
                                     limits=httpx.Limits(max_connections=clients)) as http:
            start = time.perf_counter()
            tasks = [asyncio.create_task(client(http, start + warmup + seconds)) for _ in range(loops)]
            await asyncio.sleep(warmup)
            state["measuring"] = True
            if on_window is not None:
                on_window()
            window_start = time.perf_counter()
            await asyncio.gather(*tasks)
            return time.perf_counter() - window_start

    elapsed = asyncio.run(run())
    ordered = sorted(latencies)
    return {"workload": workload, "requests": len(latencies), "seconds": round(elapsed, 2),
            "throughput": len(latencies) / elapsed,
            "p50_ms": 1000 * statistics.median(ordered) if ordered else None,
            "p99_ms": 1000 * ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))] if ordered else None,
            "errors": errors}


def serve_and_measure(base, finetunes, tokenizer, path, share: bool, cache_bytes: int, args, route: str,
                      texts, workload: str = "mixed", repeat_fraction: float = 0.0) -> dict:
    """One server, one measured window. With the cache on, also the window's cache hit rate and its per-phase
    breakdown from `/metrics` (mean ms per phase, per request, and the mean engine batch)."""
    import httpx
    from serving_overhead import _samples, breakdown

    from hf_freeze.serving import ServingEngine
    from hf_freeze.serving.app import create_app, serve_in_thread

    engine = ServingEngine(base, source=path, share_prefix=share, cache_bytes=cache_bytes)
    names = []
    for i, model in enumerate(finetunes):
        engine.add_model(f"ft{i}", model)
        names.append(f"ft{i}")
    app = create_app(engine, tokenizer=tokenizer, max_wait_ms=args.max_wait_ms,
                     max_batch_tokens=args.max_batch_tokens, max_queue=4 * args.clients)
    start: dict = {}

    def window_starts() -> None:
        start.update(hits=engine.cache.hits, misses=engine.cache.misses)
        if cache_bytes:
            start["metrics"] = _samples(httpx.get(f"{url}/metrics").text)

    with serve_in_thread(app) as url:
        result = measure(url, route, names, texts, args.clients, args.seconds, args.warmup, workload,
                         repeat_fraction, on_window=window_starts)
        if cache_bytes:
            result["phases"] = breakdown(start["metrics"], _samples(httpx.get(f"{url}/metrics").text), route)
    result["cache_hits"], result["cache_misses"] = engine.cache.hits, engine.cache.misses
    hits, misses = engine.cache.hits - start["hits"], engine.cache.misses - start["misses"]
    result["window_hit_rate"] = hits / (hits + misses) if hits + misses else 0.0
    return result


def behind_generation(args: argparse.Namespace) -> None:
    """Latency of a short /score alone and behind a long streamed generation, continuous vs run-to-end."""
    import threading

    import httpx
    from transformers import AutoTokenizer

    from hf_freeze import assets
    from hf_freeze.serving import ServingEngine
    from hf_freeze.serving.app import create_app, serve_in_thread
    from hf_freeze.serving.engine import load_base

    started = time.perf_counter()
    path = assets.model_path("smollm2")
    tokenizer = AutoTokenizer.from_pretrained(path)
    engine = ServingEngine(load_base(path), source=path, copy=False, cache_bytes=0)
    engine.models["base"].model.generation_config.min_new_tokens = args.generation_tokens  # no early EOS
    score = {"inputs": "The film is a quiet, patient study of grief, and it works.", "model": "base"}
    prompt = {"inputs": "Once upon a time, in a small village by the sea,",
              "parameters": {"max_new_tokens": args.generation_tokens}}
    rows = []
    for mode, continuous in (("run-to-end", False), ("continuous", True)):
        app = create_app(engine, tokenizer=tokenizer, max_wait_ms=args.max_wait_ms)
        app.state.batcher.continuous = continuous
        with serve_in_thread(app) as url, httpx.Client(base_url=url, timeout=600) as http:
            http.post("/score", json=score)  # warm-up
            alone = []
            for _ in range(5):
                t0 = time.perf_counter()
                http.post("/score", json=score).raise_for_status()
                alone.append(time.perf_counter() - t0)
            behind, tokens_at_answer, seconds_per_token = [], [], []
            for _ in range(args.generation_repeats):
                tokens: list[float] = []
                first = threading.Event()

                def stream(tokens: list[float], first: threading.Event) -> None:
                    with httpx.stream("POST", f"{url}/generate_stream", json=prompt, timeout=600) as response:
                        for line in response.iter_lines():
                            if line.startswith("data: "):
                                tokens.append(time.perf_counter())
                                first.set()

                generation = threading.Thread(target=stream, args=(tokens, first))
                generation.start()
                first.wait(600)
                time.sleep(0.2)  # the generation is decoding
                t0 = time.perf_counter()
                http.post("/score", json=score).raise_for_status()
                behind.append(time.perf_counter() - t0)
                tokens_at_answer.append(len(tokens))
                generation.join()
                seconds_per_token.append((tokens[-1] - tokens[0]) / max(1, len(tokens) - 1))
        row = {"mode": mode, "generation_tokens": args.generation_tokens,
               "alone_ms": 1000 * statistics.median(alone), "behind_generation_ms": 1000 * statistics.median(behind),
               "behind_max_ms": 1000 * max(behind), "tokens_generated_when_answered": statistics.median(
                   tokens_at_answer), "decode_ms_per_token": 1000 * statistics.median(seconds_per_token),
               "raw_behind_ms": [round(1000 * b, 1) for b in behind]}
        row["slowdown"] = row["behind_generation_ms"] / row["alone_ms"]
        print(row, flush=True)
        rows.append(row)
    payload = {"stamp": stamp(), "args": vars(args), "minutes": round((time.perf_counter() - started) / 60, 1),
               "rows": rows}
    table = markdown_table(rows, ["mode", "generation_tokens", "alone_ms", "behind_generation_ms", "behind_max_ms",
                                  "slowdown", "tokens_generated_when_answered", "decode_ms_per_token"])
    write_results(args.name if args.name != "serving" else "serving_behind_generation", payload, table)


def repeat_gains(rows: list[dict], base, finetunes, path, tokenizer, texts, setting: dict) -> list[dict]:
    """Each repeat run's gain over the first (the lowest repeat rate) next to the gain its hit rate would give if
    a hit saved exactly what its skipped blocks cost (`repeat_ideal_gain`, the share timed by `skipped_share` on
    batches of the runs' mean batch size, fresh texts each round, the runs' uniform fine-tune mix)."""
    from hf_freeze.serving import Request

    batch = max(1, round(statistics.median(r["mean_batch"] for r in rows)))
    rounds = 8
    rng = random.Random(3)
    fresh = texts[-batch * rounds:]  # not sent by the runs above (they start at the front)
    ids = tokenizer(fresh, truncation=True)["input_ids"]
    requests = [Request(x, model=f"ft{rng.randrange(len(finetunes))}") for x in ids]
    task = "predict" if setting["route"] == "/predict" else "score"
    # in a worker thread, as the server's batcher runs the engine: torch's OpenMP thread count is per thread, and
    # the main thread's (all cores) ran 10-20x slower than the batcher's on a CPU shared with other processes
    with ThreadPoolExecutor(1) as pool:
        cost = pool.submit(skipped_share, base, finetunes, path, requests, batch, rounds, task).result()
    print("skipped blocks", cost, flush=True)
    first = rows[0]
    for row in rows:
        row["gain"] = row["req_s"] / first["req_s"]
        row["ideal_gain"] = repeat_ideal_gain(row["hit_rate"], first["hit_rate"], cost["skipped_share"])
        row["gain_vs_ideal"] = row["gain"] / row["ideal_gain"]
        row.update(cost)
    return rows


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = sorted({r["model"] for r in rows})
    fig, axes = plt.subplots(1, len(models), figsize=(5 * len(models), 3.6), squeeze=False)
    for ax, name in zip(axes[0], models):
        mine = [r for r in rows if r["model"] == name]
        ideal = sorted({(r["N"], r["ideal_gain"]) for r in mine})
        ax.plot([n for n, _ in ideal], [g for _, g in ideal], "k--", marker="o", label="ideal N*L/(k+N(L-k))")
        for workload, marker in zip(WORKLOADS, "sD"):
            points = sorted((r["N"], r["gain"]) for r in mine if r["workload"] == workload)
            if points:
                ax.plot([n for n, _ in points], [g for _, g in points], marker=marker, label=f"measured: {workload}")
        ax.axhline(1.0, color="grey", linewidth=0.8)
        ax.set_title(f"{name}: shared prefix vs N separate models")
        ax.set_xlabel("fine-tunes served (N)")
        ax.set_ylabel("throughput gain")
        ax.set_xticks([n for n, _ in ideal])
        ax.legend()
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


def points(name: str, ns: list[int], all_mixed: bool) -> list[tuple[str, int]]:
    """(workload, N) settings to run: fanout at N >= 2 (at N = 1 it is the mixed workload); SmolLM2's mixed
    workload at the smallest and largest N unless `all_mixed`."""
    mixed = ns if all_mixed or not SETTINGS[name]["mixed_ends_only"] else sorted({min(ns), max(ns)})
    return [("mixed", n) for n in mixed] + [("fanout", n) for n in ns if n > 1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["minilm", "smollm2"], choices=sorted(SETTINGS))
    parser.add_argument("--ns", type=int, nargs="+", default=[1, 2, 4, 8], help="numbers of fine-tunes")
    parser.add_argument("--workloads", nargs="*", default=list(WORKLOADS), choices=WORKLOADS,
                        help="workloads of the separate-vs-shared comparison (none: only the cache runs)")
    parser.add_argument("--all-mixed-points", action="store_true", help="SmolLM2's mixed workload at every N too")
    parser.add_argument("--clients", type=int, default=32, help="requests in flight (closed loop)")
    parser.add_argument("--seconds", type=float, default=None,
                        help="measured window per setting (default: 6 for minilm, 12 for smollm2)")
    parser.add_argument("--warmup", type=float, default=2.0, help="unmeasured seconds before each window")
    parser.add_argument("--repeats", type=int, nargs="*", default=[0, 50, 90],
                        help="percent of repeated inputs for the cache runs (mixed, at the largest N, shared)")
    parser.add_argument("--max-wait-ms", type=float, default=5.0)
    parser.add_argument("--max-batch-tokens", type=int, default=4096)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    parser.add_argument("--name", default="serving", help="results file name in benchmarks/results/")
    parser.add_argument("--behind-generation", action="store_true",
                        help="only measure a short /score behind a long generation (continuous vs run-to-end)")
    parser.add_argument("--generation-tokens", type=int, default=200, help="new tokens of the long generation")
    parser.add_argument("--generation-repeats", type=int, default=2, help="long generations per mode")
    parser.add_argument("--rounds", type=int, default=3, help="--overhead: alternating windows per comparison")
    parser.add_argument("--overhead", action="store_true",
                        help="HTTP vs engine-only throughput, fan-out vs ideal, the time breakdown and locust "
                             "(serving_overhead.py; MiniLM, about 3 minutes)")
    args = parser.parse_args()
    if args.overhead:
        from serving_overhead import overhead

        overhead(args)
        return
    if args.behind_generation:
        torch.set_num_threads(args.threads or os.cpu_count() or 1)
        behind_generation(args)
        return
    if min(args.ns) < 1 or args.clients < max(args.ns):
        parser.error(f"Need every N >= 1 and --clients >= the largest N ({max(args.ns)}): a fanout query keeps N "
                     "requests in flight.")
    torch.set_num_threads(args.threads or os.cpu_count() or 1)

    from hf_freeze import assets, get_layout

    texts = list(assets.rotten_tomatoes()["train"].shuffle(seed=0)["text"])
    rows, repeat_rows = [], []
    started = time.perf_counter()
    for name in args.models:
        setting = SETTINGS[name]
        path, base, finetunes, tokenizer = load_models(name, max(args.ns), setting["boundary"])
        num_blocks = get_layout(base).num_blocks
        run_args = argparse.Namespace(**{**vars(args), "seconds": args.seconds or setting["seconds"]})
        for workload, n in points(name, sorted(set(args.ns)), args.all_mixed_points):
            if workload not in args.workloads:
                continue
            result = {}
            for mode, share in (("separate", False), ("shared", True)):
                # different snippets per run: no warm OS caches
                offset = (4 * n + 2 * (workload == "fanout") + share) * 1000 % len(texts)
                result[mode] = serve_and_measure(base, finetunes[:n], tokenizer, path, share, 0, run_args,
                                                 setting["route"], texts[offset:] + texts[:offset], workload)
                print(name, workload, n, mode, result[mode], flush=True)
            gain = result["shared"]["throughput"] / result["separate"]["throughput"]
            ideal = ideal_gain(n, num_blocks, setting["boundary"])
            row = {"model": name, "workload": workload, "L": num_blocks, "k": setting["boundary"], "N": n}
            for mode in ("separate", "shared"):
                row[f"{mode}_req_s"] = result[mode]["throughput"]
                row[f"{mode}_p50_ms"] = result[mode]["p50_ms"]
                row[f"{mode}_p99_ms"] = result[mode]["p99_ms"]
            row.update(gain=gain, ideal_gain=ideal, gain_vs_ideal=gain / ideal,
                       errors=result["separate"]["errors"] + result["shared"]["errors"], raw=result)
            rows.append(row)
        mine = []
        for percent in args.repeats:
            result = serve_and_measure(base, finetunes[: max(args.ns)], tokenizer, path, True, 256 * 2**20,
                                       run_args, setting["route"], texts, repeat_fraction=percent / 100)
            print(name, "repeats", percent, result, flush=True)
            phases = result["phases"]
            mine.append({"model": name, "N": max(args.ns), "repeat_percent": percent,
                         "req_s": result["throughput"], "p50_ms": result["p50_ms"], "p99_ms": result["p99_ms"],
                         "cache_hits": result["cache_hits"], "cache_misses": result["cache_misses"],
                         "hit_rate": result["window_hit_rate"], "mean_batch": phases["mean_batch"],
                         **{key: phases[key] for key in ("queue_ms", "batch_ms", "engine_ms", "other_ms", "http_ms")},
                         "errors": result["errors"], "raw": result})
        if mine:
            repeat_rows += repeat_gains(mine, base, finetunes[: max(args.ns)], path, tokenizer, texts, setting)
        del base, finetunes

    payload = {"stamp": stamp(), "args": vars(args), "minutes": round((time.perf_counter() - started) / 60, 1),
               "rows": rows, "repeats": repeat_rows}
    table = "\n\n".join([
        markdown_table(rows, ["model", "workload", "L", "k", "N", "separate_req_s", "shared_req_s",
                              "separate_p50_ms", "shared_p50_ms", "separate_p99_ms", "shared_p99_ms", "gain",
                              "ideal_gain", "gain_vs_ideal", "errors"]),
        markdown_table(repeat_rows, ["model", "N", "repeat_percent", "req_s", "p50_ms", "p99_ms", "cache_hits",
                                     "cache_misses", "errors"]),
        markdown_table(repeat_rows, ["model", "repeat_percent", "hit_rate", "batch", "miss_batch_ms", "hit_batch_ms",
                                     "skipped_share", "gain", "ideal_gain", "gain_vs_ideal"]),
        markdown_table(repeat_rows, ["model", "repeat_percent", "mean_batch", "queue_ms", "batch_ms", "engine_ms",
                                     "other_ms", "http_ms"]),
    ])
    write_results(args.name, payload, table)
    if rows:
        plot(rows, RESULTS / f"{args.name}.png")


if __name__ == "__main__":
    main()
