"""Serving N fine-tunes of one base: as N separate models, or through the frozen prefix they share.

For each packaged model (MiniLM fine-tunes frozen at k = 4 of 6 blocks, SmolLM2 fine-tunes frozen at k = 20 of 30)
and N = 1, 2, 4, 8 fine-tunes, a uvicorn server on 127.0.0.1 serves them (a) with `share_prefix=False` (each model's
full forward on its rows) and (b) with the shared prefix; the repeated-input cache is off for both. A closed-loop
async client (`--clients` connections, each sending its next request when the last is answered) sends Rotten
Tomatoes snippets, each to a fine-tune drawn uniformly, for `--seconds` after a short warm-up. MiniLM requests are
`POST /predict`, SmolLM2 requests `POST /score` (one forward each). Reported: throughput, p50/p99 latency, and the
gain of (b) over (a) against the ideal N*L / (k + N(L - k)) block-forwards ratio. Then, at the largest N with the
shared prefix and the cache on, throughput when 0%, 50%, 90% of requests repeat an earlier input.

Results (JSON + md + PNG, written atomically) go to benchmarks/results/serving.*. The default run takes about
8 minutes on 2 CPU cores:

    OMP_NUM_THREADS=2 python benchmarks/serving.py

A quick check that it works (about 1 minute): `python benchmarks/serving.py --models minilm --ns 1 2 --seconds 2
--repeats 0 90 --name serving_check`.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import time
from pathlib import Path

import torch
from common import RESULTS, markdown_table, stamp, write_results

SETTINGS = {  # task head, route, boundary, payload
    "minilm": {"boundary": 4, "route": "/predict", "head": "seq"},
    "smollm2": {"boundary": 20, "route": "/score", "head": "causal"},
}


def ideal_gain(n: int, num_blocks: int, boundary: int) -> float:
    """Block-forwards of N separate models over those with a shared prefix: N*L / (k + N(L - k))."""
    return n * num_blocks / (boundary + n * (num_blocks - boundary))


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
            repeat_fraction: float = 0.0, hot: int = 64, seed: int = 0) -> dict:
    """Closed loop: `clients` connections send requests back to back; counts those finished in the window."""
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

    async def client(http: httpx.AsyncClient, stop_at: float) -> None:
        nonlocal errors
        while time.perf_counter() < stop_at:
            body = {"inputs": next_text(), "model": rng.choice(models), "truncate": True}
            started = time.perf_counter()
            response = await http.post(route, json=body)
            if response.status_code != 200:
                errors += 1
            elif state["measuring"]:
                latencies.append(time.perf_counter() - started)

    async def run() -> float:
        async with httpx.AsyncClient(base_url=url, timeout=120,
                                     limits=httpx.Limits(max_connections=clients)) as http:
            start = time.perf_counter()
            tasks = [asyncio.create_task(client(http, start + warmup + seconds)) for _ in range(clients)]
            await asyncio.sleep(warmup)
            state["measuring"] = True
            window_start = time.perf_counter()
            await asyncio.gather(*tasks)
            return time.perf_counter() - window_start

    elapsed = asyncio.run(run())
    ordered = sorted(latencies)
    return {"requests": len(latencies), "seconds": round(elapsed, 2), "throughput": len(latencies) / elapsed,
            "p50_ms": 1000 * statistics.median(ordered) if ordered else None,
            "p99_ms": 1000 * ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))] if ordered else None,
            "errors": errors}


def serve_and_measure(base, finetunes, tokenizer, path, share: bool, cache_bytes: int, args, route: str,
                      texts, repeat_fraction: float = 0.0) -> dict:
    from hf_freeze.serving import ServingEngine
    from hf_freeze.serving.app import create_app, serve_in_thread

    engine = ServingEngine(base, source=path, share_prefix=share, cache_bytes=cache_bytes)
    names = []
    for i, model in enumerate(finetunes):
        engine.add_model(f"ft{i}", model)
        names.append(f"ft{i}")
    app = create_app(engine, tokenizer=tokenizer, max_wait_ms=args.max_wait_ms,
                     max_batch_tokens=args.max_batch_tokens, max_queue=4 * args.clients)
    with serve_in_thread(app) as url:
        result = measure(url, route, names, texts, args.clients, args.seconds, args.warmup, repeat_fraction)
    result["cache_hits"], result["cache_misses"] = engine.cache.hits, engine.cache.misses
    return result


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = sorted({r["model"] for r in rows})
    fig, axes = plt.subplots(1, len(models), figsize=(5 * len(models), 3.6), squeeze=False)
    for ax, name in zip(axes[0], models):
        mine = [r for r in rows if r["model"] == name]
        ns = [r["N"] for r in mine]
        ax.plot(ns, [r["ideal_gain"] for r in mine], "k--", marker="o", label="ideal N*L/(k+N(L-k))")
        ax.plot(ns, [r["gain"] for r in mine], marker="s", label="measured (throughput)")
        ax.set_title(f"{name}: shared prefix vs N separate models")
        ax.set_xlabel("fine-tunes served (N)")
        ax.set_ylabel("throughput gain")
        ax.set_xticks(ns)
        ax.legend()
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["minilm", "smollm2"], choices=sorted(SETTINGS))
    parser.add_argument("--ns", type=int, nargs="+", default=[1, 2, 4, 8], help="numbers of fine-tunes")
    parser.add_argument("--clients", type=int, default=32, help="concurrent closed-loop connections")
    parser.add_argument("--seconds", type=float, default=None,
                        help="measured window per setting (default: 8 for minilm, 14 for smollm2)")
    parser.add_argument("--warmup", type=float, default=2.0, help="unmeasured seconds before each window")
    parser.add_argument("--repeats", type=int, nargs="*", default=[0, 50, 90],
                        help="percent of repeated inputs for the cache runs (at the largest N, shared)")
    parser.add_argument("--max-wait-ms", type=float, default=5.0)
    parser.add_argument("--max-batch-tokens", type=int, default=4096)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    parser.add_argument("--name", default="serving", help="results file name in benchmarks/results/")
    args = parser.parse_args()
    torch.set_num_threads(args.threads or os.cpu_count() or 1)

    from hf_freeze import assets, get_layout

    texts = list(assets.rotten_tomatoes()["train"].shuffle(seed=0)["text"])
    rows, repeat_rows = [], []
    for name in args.models:
        setting = SETTINGS[name]
        seconds = args.seconds or (8.0 if name == "minilm" else 14.0)
        path, base, finetunes, tokenizer = load_models(name, max(args.ns), setting["boundary"])
        num_blocks = get_layout(base).num_blocks
        run_args = argparse.Namespace(**{**vars(args), "seconds": seconds})
        for n in args.ns:
            result = {}
            for mode, share in (("separate", False), ("shared", True)):
                offset = (2 * n + share) * 1000 % len(texts)  # different snippets per run: no warm OS caches
                result[mode] = serve_and_measure(base, finetunes[:n], tokenizer, path, share, 0, run_args,
                                                 setting["route"], texts[offset:] + texts[:offset])
                print(name, n, mode, result[mode], flush=True)
            gain = result["shared"]["throughput"] / result["separate"]["throughput"]
            ideal = ideal_gain(n, num_blocks, setting["boundary"])
            row = {"model": name, "L": num_blocks, "k": setting["boundary"], "N": n}
            for mode in ("separate", "shared"):
                row[f"{mode}_req_s"] = result[mode]["throughput"]
                row[f"{mode}_p50_ms"] = result[mode]["p50_ms"]
                row[f"{mode}_p99_ms"] = result[mode]["p99_ms"]
            row.update(gain=gain, ideal_gain=ideal, gain_vs_ideal=gain / ideal,
                       errors=result["separate"]["errors"] + result["shared"]["errors"], raw=result)
            rows.append(row)
        for percent in args.repeats:
            result = serve_and_measure(base, finetunes[: max(args.ns)], tokenizer, path, True, 256 * 2**20,
                                       run_args, setting["route"], texts, repeat_fraction=percent / 100)
            print(name, "repeats", percent, result, flush=True)
            repeat_rows.append({"model": name, "N": max(args.ns), "repeat_percent": percent,
                                "req_s": result["throughput"], "p50_ms": result["p50_ms"], "p99_ms": result["p99_ms"],
                                "cache_hits": result["cache_hits"], "cache_misses": result["cache_misses"],
                                "errors": result["errors"]})
        del base, finetunes

    payload = {"stamp": stamp(), "args": vars(args), "rows": rows, "repeats": repeat_rows}
    table = "\n\n".join([
        markdown_table(rows, ["model", "L", "k", "N", "separate_req_s", "shared_req_s", "separate_p50_ms",
                              "shared_p50_ms", "separate_p99_ms", "shared_p99_ms", "gain", "ideal_gain",
                              "gain_vs_ideal", "errors"]),
        markdown_table(repeat_rows, ["model", "N", "repeat_percent", "req_s", "p50_ms", "p99_ms", "cache_hits",
                                     "cache_misses", "errors"]),
    ])
    write_results(args.name, payload, table)
    if rows:
        plot(rows, RESULTS / f"{args.name}.png")


if __name__ == "__main__":
    main()
