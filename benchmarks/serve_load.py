"""Many users at once: N requests sent together to `ctfgen serve`, against the same N sent one at a time.

Starts the server on a free loopback port (or uses --url, which must be a loopback address), warms it up with
one request, then sends the N requests one after the other (serial), then all N at once (concurrent, one
thread each, through gradio's HTTP API, streamed previews included), --repeats times, interleaved. Request i
asks for --images images of class i % 10 with seed i. Reports requests/s, images/s and p50/p95 latency of both,
and checks every answer against the first serial answer to the same request: no request lost, none answered
with another's images. Bounded: at most 64 requests, 10 repeats, and --timeout seconds for each request.

    python benchmarks/serve_load.py --pipeline pretrained/fmnist --requests 16 --images 4 --json
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import httpx
import numpy as np
from PIL import Image

from ctfgen.serve.offline import OFFLINE_ENV

LOOPBACK = {"127.0.0.1", "localhost", "::1"}
MAX_REQUESTS = 64
MAX_REPEATS = 10
REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(pipeline: str, port: int, requests: int, images: int, threads: int | None, log) -> subprocess.Popen:
    command = [sys.executable, "-m", "ctfgen.cli", "serve", "--pipeline", pipeline, "--port", str(port),
               "--max-queue", str(requests), "--max-images", str(images)]
    command += ["--threads", str(threads)] if threads else []
    return subprocess.Popen(command, env=os.environ | OFFLINE_ENV, stdout=log, stderr=subprocess.STDOUT)


def wait_until_up(url: str, server: subprocess.Popen | None, log, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if server is not None and server.poll() is not None:
            log.seek(0)
            sys.exit(f"the server exited: {log.read().decode()[-2000:]}")
        try:
            if httpx.get(f"{url}/gradio_api/info", timeout=10, trust_env=False).status_code == 200:
                return
        except httpx.TransportError:  # not listening yet
            pass
        if time.monotonic() > deadline:
            sys.exit(f"the server at {url} did not come up in {timeout:.0f} s")
        time.sleep(1)


def send(url: str, class_name: str, seed: int, images: int, timeout: float) -> tuple[float, np.ndarray]:
    """One request through gradio's HTTP API, as `curl` would send it (the page's own calls go through the same
    queue): its latency and the final grid of images. The streamed frames are read and passed over."""
    form = [[class_name], False, images, seed, "CTF", 2.0, 1.0, 0, 1.0, 0]
    tic = time.perf_counter()
    with httpx.Client(timeout=timeout, trust_env=False) as http:  # never through a proxy: loopback only
        event_id = http.post(f"{url}/gradio_api/call/generate", json={"data": form}).raise_for_status().json()
        with http.stream("GET", f"{url}/gradio_api/call/generate/{event_id['event_id']}") as stream:
            kind, outputs = None, None
            for line in stream.iter_lines():
                if line.startswith("event: "):
                    kind = line.removeprefix("event: ")
                elif line.startswith("data: ") and kind in ("complete", "error"):
                    if kind == "error":
                        raise RuntimeError(f"the server answered an error: {line.removeprefix('data: ')}")
                    outputs = json.loads(line.removeprefix("data: "))
                    break
        if outputs is None:
            raise RuntimeError("the stream ended without a result")
        grid = http.get(outputs[0]["url"]).raise_for_status().content
    return time.perf_counter() - tic, np.asarray(Image.open(io.BytesIO(grid)).convert("RGB"))


def cpu_seconds(server: subprocess.Popen | None) -> dict:
    """CPU time so far of the server (all its threads) and of this client: what a phase costs whatever else
    runs on the machine."""
    client = resource.getrusage(resource.RUSAGE_SELF)
    times = {"client": client.ru_utime + client.ru_stime}
    if server is not None:
        fields = Path(f"/proc/{server.pid}/stat").read_text().rsplit(")", 1)[1].split()
        times["server"] = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime
    return times


@dataclass
class Phase:
    """One run of the N requests: wall time, each request's latency and final grid (None: lost), CPU used."""

    wall_s: float
    latencies: dict[int, float]
    grids: dict[int, np.ndarray]
    failures: dict[int, str]
    cpu_s: dict[str, float]


def run_serial(url: str, requests: list, images: int, timeout: float, server) -> Phase:
    latencies, grids, cpu, tic = {}, {}, cpu_seconds(server), time.perf_counter()
    for i, request in enumerate(requests):
        latencies[i], grids[i] = send(url, *request, images, timeout)
    return Phase(time.perf_counter() - tic, latencies, grids, {}, spent(cpu, cpu_seconds(server)))


def run_concurrent(url: str, requests: list, images: int, timeout: float, server) -> Phase:
    """All requests at once, one thread each, released together."""
    latencies, grids, failures = {}, {}, {}
    start = threading.Barrier(len(requests))

    def user(i: int) -> None:
        start.wait()
        try:
            latencies[i], grids[i] = send(url, *requests[i], images, timeout)
        except Exception as e:  # reported as lost
            failures[i] = f"{type(e).__name__}: {e}"

    threads = [threading.Thread(target=user, args=(i,), daemon=True) for i in range(len(requests))]
    cpu, tic = cpu_seconds(server), time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
    return Phase(time.perf_counter() - tic, latencies, grids, failures, spent(cpu, cpu_seconds(server)))


def spent(before: dict, after: dict) -> dict:
    return {who: after[who] - before[who] for who in after}


def summary(runs: list[Phase], images: int) -> dict:
    """The run of median wall time, and the latencies of all runs."""
    run = sorted(runs, key=lambda r: r.wall_s)[len(runs) // 2]
    latencies = [t for r in runs for t in r.latencies.values()] or [float("nan")]
    return {"wall_s": round(run.wall_s, 2), "requests_per_s": round(len(run.latencies) / run.wall_s, 3),
            "images_per_s": round(len(run.latencies) * images / run.wall_s, 2),
            "p50_latency_s": round(float(np.percentile(latencies, 50)), 2),
            "p95_latency_s": round(float(np.percentile(latencies, 95)), 2),
            **{f"{who}_cpu_s": round(seconds, 2) for who, seconds in run.cpu_s.items()},
            "wall_s_of_each_run": [round(r.wall_s, 2) for r in runs]}


def check_answers(reference: Phase, runs: list[Phase]) -> dict:
    """Each answer against the serial answer to the same request: identical, or at least nearer to it than to
    any other request's (a near-tie flipped by the batch shape can change a few pixels, never the picture)."""
    identical, others, lost = 0, [], 0
    for run in runs:
        lost += len(reference.grids) - len(run.grids)
        for i, grid in run.grids.items():
            distances = [np.abs(grid.astype(int) - g.astype(int)).mean() if grid.shape == g.shape else np.inf
                         for g in reference.grids.values()]
            identical += distances[i] == 0
            if int(np.argmin(distances)) != i:
                others.append(i)
    return {"answers": sum(len(r.latencies) for r in runs), "lost": lost,
            "failures": {i: f for r in runs for i, f in r.failures.items()},
            "identical_to_serial": int(identical), "answered_with_anothers_images": len(others)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pipeline", default=str(REPO / "pretrained" / "fmnist"))
    parser.add_argument("--url", help="a running server on loopback (default: start one)")
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--images", type=int, default=4, help="images per request")
    parser.add_argument("--repeats", type=int, default=3, help="serial and concurrent runs, interleaved, so that "
                        "other load on the machine weighs on both alike (medians are reported)")
    parser.add_argument("--threads", type=int, help="the server's torch threads (`ctfgen serve --threads`)")
    parser.add_argument("--timeout", type=float, default=900, help="seconds for each request")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if not 1 <= args.requests <= MAX_REQUESTS or not 1 <= args.repeats <= MAX_REPEATS:
        sys.exit(f"--requests must be between 1 and {MAX_REQUESTS}, --repeats between 1 and {MAX_REPEATS}")
    if args.url and urlparse(args.url).hostname not in LOOPBACK:
        sys.exit("--url must be a loopback address (127.0.0.1, localhost, ::1): this benchmark sends load only "
                 "to this machine")
    from ctfgen.pipeline import INDEX_NAME

    names = json.loads((Path(args.pipeline) / INDEX_NAME).read_text())["class_names"]
    requests = [(names[i % len(names)], i) for i in range(args.requests)]  # (class, seed) of request i
    server, url, log = None, args.url, tempfile.TemporaryFile()
    if url is None:
        port = free_port()
        server = start_server(args.pipeline, port, args.requests, args.images, args.threads, log)
        url = f"http://127.0.0.1:{port}"
    serial, concurrent = [], []
    try:
        wait_until_up(url, server, log, timeout=300)
        send(url, *requests[0], args.images, args.timeout)  # warm-up: first-call allocations, caches
        for _ in range(args.repeats):
            serial.append(run_serial(url, requests, args.images, args.timeout, server))
            concurrent.append(run_concurrent(url, requests, args.images, args.timeout, server))
    finally:
        if server is not None:
            server.terminate()
            server.wait(30)

    report = {"requests": args.requests, "images_per_request": args.images, "repeats": args.repeats,
              "server_threads": args.threads or "ctfgen serve's default",
              "serial": summary(serial, args.images), "concurrent": summary(concurrent, args.images)}
    report["throughput_vs_serial"] = round(report["serial"]["wall_s"] / report["concurrent"]["wall_s"], 2)
    report |= check_answers(serial[0], serial[1:] + concurrent)
    s, c = report["serial"], report["concurrent"]
    print(json.dumps(report, indent=2) if args.json else
          f"{args.requests} requests of {args.images} images: serial {s['images_per_s']} images/s, concurrent "
          f"{c['images_per_s']} images/s ({report['throughput_vs_serial']}x); p50/p95 latency {s['p50_latency_s']}/"
          f"{s['p95_latency_s']} s serial, {c['p50_latency_s']}/{c['p95_latency_s']} s concurrent; "
          f"{report['lost']} lost, {report['answered_with_anothers_images']} answered with another's images, "
          f"{report['identical_to_serial']} of {report['answers']} identical to the first serial answer")
    if report["lost"] or report["answered_with_anothers_images"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
