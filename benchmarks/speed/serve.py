r"""Serving under load: `retro-run serve` on loopback, 1, 8 and 64 concurrent clients.

    python benchmarks/speed/serve.py --nemo runs/smoke/export/smoke.nemo [--out FILE.json]

The server runs as `retro-run serve --nemo PKG --port 0 --max-batch 8 --max-wait-ms 5` in its
own process (one rank, every core). Each level sends the same fixed number of requests
(--requests, 64 by default) from its clients, each client one request after another: greedy
completions of exactly --max-tokens tokens (`ignore_eos`) from 16 prompts, through one httpx connection pool. A level
ends when its last request is answered; nothing runs open-ended. Reported per level:
requests, failures (any status but 200, or an error), seconds, completion tokens per second,
requests per second, latency p50 and p95, and the mean batch the server ran (requests over
the batches /health counted). The ratio the serving issue asks for is tokens per second at 8
clients over 1 client, both measured in this run.

The recorded result (the README's smoke package, 2 cores):
    python benchmarks/speed/serve.py --nemo runs/smoke/export/smoke.nemo
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from benchmarks.common import add_out, write_result  # noqa: E402

TOPICS = ["the with statement", "a class definition", "the pass statement", "exceptions", "a for loop", "lambda",
          "the import system", "generators", "decorators", "the global statement", "slicing", "comprehensions",
          "the assert statement", "string formatting", "the while loop", "coroutines"]


def level(client, clients: int, requests: int, max_tokens: int) -> dict:
    import httpx

    latencies: list[float] = []
    tokens, failures = [0], [0]
    lock = threading.Lock()
    per_client = [requests // clients + (1 if i < requests % clients else 0) for i in range(clients)]

    def work(i: int, n: int) -> None:
        for j in range(n):
            body = {"prompt": f"Explain {TOPICS[(i + j) % len(TOPICS)]}.", "max_tokens": max_tokens, "temperature": 0,
                    "ignore_eos": True}
            t = time.perf_counter()
            try:
                r = client.post("/v1/completions", json=body)
                ok = r.status_code == 200
                got = r.json()["usage"]["completion_tokens"] if ok else 0
            except httpx.HTTPError:
                ok, got = False, 0
            with lock:
                latencies.append(time.perf_counter() - t)
                tokens[0] += got
                failures[0] += 0 if ok else 1

    before = client.get("/health").json()["batches_run"]
    threads = [threading.Thread(target=work, args=(i, n)) for i, n in enumerate(per_client)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - start
    batches = client.get("/health").json()["batches_run"] - before
    latencies.sort()
    return {"clients": clients, "requests": requests, "failed": failures[0], "seconds": round(seconds, 2),
            "completion_tokens": tokens[0], "tokens_per_s": round(tokens[0] / seconds, 1),
            "requests_per_s": round(requests / seconds, 2),
            "latency_p50_s": round(statistics.median(latencies), 3),
            "latency_p95_s": round(latencies[int(0.95 * (len(latencies) - 1))], 3),
            "mean_batch": round(requests / max(batches, 1), 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nemo", required=True, help="the package to serve")
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 8, 64])
    ap.add_argument("--requests", type=int, default=64, help="requests per level")
    ap.add_argument("--max-tokens", type=int, default=32)
    add_out(ap, __file__)
    a = ap.parse_args()
    import httpx

    server = subprocess.Popen([sys.executable, "-m", "retro_toolkit", "serve", "--nemo", a.nemo, "--port", "0",
                               "--max-batch", "8", "--max-wait-ms", "5"], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "HF_HUB_OFFLINE": "1"})
    try:
        line = server.stdout.readline()
        if " on http://" not in line:
            raise SystemExit(f"the server did not start: {line!r}")
        url = line.split(" on ")[1].strip()
        limits = httpx.Limits(max_connections=max(a.clients), max_keepalive_connections=max(a.clients))
        with httpx.Client(base_url=url, timeout=600, limits=limits) as client:
            level(client, 1, 2, a.max_tokens)  # warm-up, not reported
            levels = [level(client, c, a.requests, a.max_tokens) for c in a.clients]
            for row in levels:
                print(f"{row['clients']:>3} clients: {row['tokens_per_s']:8.1f} tok/s, p50 {row['latency_p50_s']} s, "
                      f"mean batch {row['mean_batch']}, failed {row['failed']}", flush=True)
    finally:
        server.terminate()
        server.wait(60)
    by = {row["clients"]: row for row in levels}
    result = {"machine": {"cpus": os.cpu_count()}, "package": a.nemo, "max_tokens": a.max_tokens,
              "server": "--max-batch 8 --max-wait-ms 5", "levels": levels}
    if 1 in by and 8 in by:
        result["tokens_per_s_8_clients_over_1"] = round(by[8]["tokens_per_s"] / by[1]["tokens_per_s"], 2)
    write_result(result, a.out)


if __name__ == "__main__":
    main()
