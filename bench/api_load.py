"""Bounded load test of the search API on loopback, embedded profile (`omniattr up`), compact encoder.

    python bench/api_load.py [--images 1000] [--clients 20] [--seconds 30] [--rate 200] [--record]

Starts a real server on a free loopback port, builds and indexes a procedural collection through the API,
then runs two phases of `--clients` concurrent clients for `--seconds` each (bounded in time and count):
search by image id + attribute, and search with an uploaded image + attribute. Prints p50/p95/p99 latency
and requests/s. The load generator shares this machine's CPUs with the server.

The two phases are closed loops: each client sends its next request when the last one returns, so by
Little's law mean latency = clients / throughput (20 clients at 200 req/s means 100 ms on average). A third
phase (`--rate`, 0 to skip) is an open loop: search by id started at a fixed rate whatever the latency, each
latency counted from its scheduled start, which is what "p95 at N req/s" means for a service.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
MAX_REQUESTS_PER_PHASE = 100_000


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(data_dir: Path, encoder_dir: Path, port: int) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OMNIATTR_")}
    env.update(
        OMNIATTR_DATA_DIR=str(data_dir),
        OMNIATTR_ENCODER_PATH=str(encoder_dir),
        OMNIATTR_DEVICE="cpu",
        OMNIATTR_API_PORT=str(port),
    )
    # The installed console script, not `python -m`: -m would put the cwd first on sys.path.
    omniattr = str(Path(sys.executable).with_name("omniattr"))
    process = subprocess.Popen(
        [omniattr, "up"],
        cwd=data_dir.parent,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/api/health", timeout=1).status_code == 200:
                return process
        except httpx.HTTPError:
            time.sleep(0.3)
    process.kill()
    raise SystemExit("the server did not start")


def build_collection(url: str, count: int, attribute: str) -> tuple[int, list[int], list[bytes]]:
    from training.data.procedural import encode_png, render_image, sample_factors

    images = [
        encode_png(render_image(sample_factors(np.random.default_rng(i)), size=128, jitter_seed=i))
        for i in range(count)
    ]
    with httpx.Client(base_url=url, timeout=600) as client:
        collection_id = client.post("/api/collections", json={"name": "load"}).json()["id"]
        image_ids = []
        for start in range(0, count, 100):
            files = [("files", (f"{i}.png", images[i], "image/png")) for i in range(start, min(start + 100, count))]
            report = client.post(f"/api/collections/{collection_id}/images", files=files).json()
            image_ids += [r["image_id"] for r in report["results"]]
        job = client.post(f"/api/collections/{collection_id}/attributes", json={"attributes": [attribute]}).json()
        while (status := client.get(f"/api/jobs/{job['job']['id']}").json())["status"] in ("pending", "running"):
            time.sleep(0.5)
        if status["status"] != "done":
            raise SystemExit(f"indexing failed: {status['error']}")
    return collection_id, image_ids, images


async def phase(url: str, clients: int, seconds: float, make_request) -> tuple[list[float], int, float]:
    """Run `clients` loops for `seconds`; returns latencies (s), error count and the elapsed time."""
    latencies: list[float] = []
    errors = 0
    deadline = time.perf_counter() + seconds
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)

    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:

        async def loop(worker: int) -> None:
            nonlocal errors
            rng = np.random.default_rng(worker)
            while time.perf_counter() < deadline and len(latencies) < MAX_REQUESTS_PER_PHASE:
                started = time.perf_counter()
                response = await make_request(client, rng)
                if response.status_code == 200:
                    latencies.append(time.perf_counter() - started)
                else:
                    errors += 1

        started = time.perf_counter()
        await asyncio.gather(*(loop(i) for i in range(clients)))
    return latencies, errors, time.perf_counter() - started


async def fixed_rate_phase(url: str, rate: float, seconds: float, make_request) -> tuple[list[float], int, float]:
    """Start requests at `rate` per second for `seconds` (open loop); latencies count from the scheduled start,
    so a slow server is not hidden by sending less (no coordinated omission).

    Requests due while all 64 connections are busy wait in a FIFO here (counted in their latency), not in
    httpx's pool, whose cost grows with the number of waiting requests and made the client the bottleneck.
    """
    latencies: list[float] = []
    errors = 0
    connections = 64
    due: asyncio.Queue[float | None] = asyncio.Queue()
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:

        async def sender(worker: int) -> None:
            nonlocal errors
            rng = np.random.default_rng(worker)
            while (scheduled := await due.get()) is not None:
                response = await make_request(client, rng)
                if response.status_code == 200:
                    latencies.append(time.perf_counter() - scheduled)
                else:
                    errors += 1

        senders = [asyncio.create_task(sender(i)) for i in range(connections)]
        started = time.perf_counter()
        for index in range(min(int(rate * seconds), MAX_REQUESTS_PER_PHASE)):
            scheduled = started + index / rate
            if (delay := scheduled - time.perf_counter()) > 0:
                await asyncio.sleep(delay)
            due.put_nowait(scheduled)
        for _ in senders:
            due.put_nowait(None)
        await asyncio.gather(*senders)
    return latencies, errors, time.perf_counter() - started


WRK_SCRIPT = """
local bodies, paths = {}, {%(paths)s}
for i, path in ipairs(paths) do local f = io.open(path, "rb"); bodies[i] = f:read("*all"); f:close() end
wrk.method = "POST"
wrk.headers["Content-Type"] = "%(content_type)s"
request = function() return wrk.format(nil, "%(path)s", nil, bodies[math.random(#bodies)]) end
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("WRK %%d %%d %%.6f %%.3f %%.3f %%.3f\\n", summary.requests,
    e.status + e.connect + e.read + e.write + e.timeout, summary.duration / 1e6,
    latency:percentile(50) / 1000, latency:percentile(95) / 1000, latency:percentile(99) / 1000))
end
"""


def wrk_phase(
    url: str, clients: int, seconds: float, path: str, content_type: str, bodies: list[bytes], work: Path
) -> str:
    """One phase driven by wrk (C, event loop: far less client CPU than Python on the shared cores)."""
    paths = []
    for index, body in enumerate(bodies):
        body_path = work / f"body-{path.strip('/').replace('/', '-')}-{index}.bin"
        body_path.write_bytes(body)
        paths.append(f'"{body_path}"')
    script = work / "phase.lua"
    script.write_text(WRK_SCRIPT % {"paths": ", ".join(paths), "content_type": content_type, "path": path})
    result = subprocess.run(
        ["wrk", "-t1", f"-c{clients}", f"-d{int(seconds)}s", "--timeout", "30s", "-s", str(script), url],
        capture_output=True,
        text=True,
        timeout=seconds + 120,
    )
    line = next(line for line in result.stdout.splitlines() if line.startswith("WRK "))
    requests, errors, elapsed, p50, p95, p99 = line.split()[1:]
    ok = int(requests) - int(errors)
    return f"{ok / float(elapsed):.1f} | {float(p50):.1f} | {float(p95):.1f} | {float(p99):.1f} | {ok} | {errors} |"


def multipart(fields: dict[str, str], file_bytes: bytes, boundary: str = "omniattrbench") -> bytes:
    parts = [
        f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode() for k, v in fields.items()
    ]
    parts.append(
        f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="q.png"\r\n'
        "Content-Type: image/png\r\n\r\n".encode()
        + file_bytes
        + b"\r\n"
    )
    return b"".join(parts) + f"--{boundary}--\r\n".encode()


def summary(name: str, latencies: list[float], errors: int, elapsed: float) -> str:
    ms = np.array(latencies) * 1000
    p50, p95, p99 = np.percentile(ms, [50, 95, 99]) if len(ms) else (float("nan"),) * 3
    return f"| {name} | {len(ms) / elapsed:.1f} | {p50:.1f} | {p95:.1f} | {p99:.1f} | {len(ms)} | {errors} |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--seconds", type=float, default=30)
    parser.add_argument(
        "--rate",
        type=float,
        default=200,
        help="requests/s of the open-loop search-by-id phase (Python httpx client); 0 skips it",
    )
    parser.add_argument("--encoder", type=Path, help="encoder checkpoint (default: a fresh compact encoder)")
    parser.add_argument(
        "--driver",
        choices=["wrk", "httpx"],
        default="wrk" if shutil.which("wrk") else "httpx",
        help="load generator: wrk (Debian package, default when installed) or Python httpx",
    )
    parser.add_argument("--record", action="store_true", help="append the table to bench/RESULTS.md")
    args = parser.parse_args()

    load_average = os.getloadavg()[0]  # before this bench adds its own load
    work = Path(tempfile.mkdtemp(prefix="omniattr-load-"))
    encoder_dir = args.encoder.resolve() if args.encoder else None  # the server runs in another directory
    if encoder_dir is None:
        from encoder import AttributeEncoder, EncoderConfig

        encoder_dir = work / "encoder-checkpoint"
        AttributeEncoder(EncoderConfig.compact()).save_pretrained(encoder_dir)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = start_server(work / "data", encoder_dir, port)
    try:
        print(f"indexing {args.images} images ...", file=sys.stderr)
        collection_id, image_ids, images = build_collection(url, args.images, "lighting")

        async def by_id(client: httpx.AsyncClient, rng: np.random.Generator) -> httpx.Response:
            body = {
                "collection_id": collection_id,
                "limit": 10,
                "terms": [{"image_id": int(rng.choice(image_ids)), "attribute": "lighting"}],
            }
            return await client.post("/api/search", json=body)

        async def by_upload(client: httpx.AsyncClient, rng: np.random.Generator) -> httpx.Response:
            data = {"collection_id": str(collection_id), "attribute": "lighting", "limit": "10"}
            files = {"image": ("q.png", images[int(rng.integers(len(images)))], "image/png")}
            return await client.post("/api/search/upload", data=data, files=files)

        def open_loop_row() -> str:
            print(f"search by image id: open loop at {args.rate:g} req/s for {args.seconds:.0f} s ...", file=sys.stderr)
            latencies, errors, elapsed = asyncio.run(fixed_rate_phase(url, args.rate, args.seconds, by_id))
            if len(latencies) / elapsed < 0.95 * args.rate:  # a backlog grew: in the client or in the server
                print(
                    f"warning: the open loop did not keep {args.rate:g} req/s; on shared CPUs the Python client "
                    "itself may be the limit (compare the closed-loop throughput)",
                    file=sys.stderr,
                )
            return summary(f"search by image id, open loop at {args.rate:g} req/s (httpx)", latencies, errors, elapsed)

        # Order: by id (closed loop), by id (open loop), upload. The open loop runs before the uploads, whose
        # queued encodings keep the server busy for a while after their phase ends.
        rows = []
        if args.driver == "wrk":
            rng = np.random.default_rng(0)
            by_id_bodies = [
                json.dumps(
                    {
                        "collection_id": collection_id,
                        "limit": 10,
                        "terms": [{"image_id": int(i), "attribute": "lighting"}],
                    }
                ).encode()
                for i in rng.choice(image_ids, 200)
            ]
            upload_bodies = [
                multipart({"collection_id": str(collection_id), "attribute": "lighting", "limit": "10"}, images[int(i)])
                for i in rng.choice(len(images), 20)
            ]
            for name, path, content_type, bodies in (
                ("search by image id", "/api/search", "application/json", by_id_bodies),
                (
                    "search with uploaded image",
                    "/api/search/upload",
                    "multipart/form-data; boundary=omniattrbench",
                    upload_bodies,
                ),
            ):
                print(f"{name}: wrk, {args.clients} connections for {args.seconds:.0f} s ...", file=sys.stderr)
                rows.append(
                    f"| {name} | " + wrk_phase(url, args.clients, args.seconds, path, content_type, bodies, work)
                )
                if path == "/api/search" and args.rate > 0:
                    rows.append(open_loop_row())
        else:
            for name, request in (("search by image id", by_id), ("search with uploaded image", by_upload)):
                print(f"{name}: {args.clients} clients for {args.seconds:.0f} s ...", file=sys.stderr)
                rows.append(summary(name, *asyncio.run(phase(url, args.clients, args.seconds, request))))
                if request is by_id and args.rate > 0:
                    rows.append(open_loop_row())
    finally:
        server.terminate()
        server.wait(timeout=60)

    header = (
        f"{args.images} images indexed under 1 attribute, {args.clients} concurrent clients ({args.driver}), "
        f"{args.seconds:.0f} s per phase, embedded profile on {os.cpu_count()} CPUs (client on the same CPUs), "
        f"load average at start {load_average:.1f}, {datetime.now(UTC):%Y-%m-%d}"
    )
    table = "\n".join(
        ["| request | req/s | p50 ms | p95 ms | p99 ms | ok | errors |", "|---|---|---|---|---|---|---|", *rows]
    )
    print(header)
    print(table)
    if args.record:
        with open(ROOT / "bench" / "RESULTS.md", "a") as results:
            results.write(
                f"\n## API load (bench/api_load.py)\n\n`python bench/api_load.py --images {args.images} "
                f"--clients {args.clients} --seconds {args.seconds:.0f} --rate {args.rate:g} "
                f"--driver {args.driver}`"
                f"\n\n{header}\n\n{table}\n"
            )


if __name__ == "__main__":
    main()
