"""The `omniattr` command line. An entry point: it reads settings and passes plain values down.

Commands that act on collections speak the HTTP API, so they behave the same everywhere: with `--url`
they talk to a running server; without it the app runs inside this process on the configured profile
(the embedded default needs no server). One code path, one contract (the OpenAPI schema).

This module is the composition root: the one place that may join `api`, `store`, `indexer`, `encoder` and
`training`. The model-side commands (init-encoder, train, eval, annotate) call their package's entry
function in this process, imported inside the command, so `omniattr --help` and the HTTP commands stay
light (no torch). Benchmarks are scripts of a source checkout, not a package, and run as child processes.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import gc
import json
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
from pydantic import ValidationError

from omniattr import __version__
from omniattr.domain import (
    DEFAULT_BASE_STRENGTH,
    DEFAULT_KEEP_DETAIL,
    GenerationStatus,
    ImageStatus,
    JobKind,
    JobStatus,
)
from omniattr.settings import Settings
from store.database import make_engine, make_session_factory, upgrade_database
from store.errors import StoreError


class CommandError(Exception):
    """A failure to report as one line (exit code 2)."""


def _load_settings() -> Settings:
    try:
        return Settings()
    except ValidationError as error:
        messages = "; ".join(e["msg"].removeprefix("Value error, ") for e in error.errors())
        raise SystemExit(f"omniattr: bad settings: {messages}") from None


@contextmanager
def api_client(settings: Settings, url: str | None, api_key: str | None) -> Iterator[httpx.Client]:
    """An HTTP client for a running server (`url`), or for the app run inside this process."""
    headers = {"X-API-Key": api_key} if api_key else {}
    if url:
        with httpx.Client(base_url=url, headers=headers, timeout=120) as client:
            yield client
        return
    # In-process: the same httpx client over the ASGI app, so the command goes through exactly the routes a
    # server would run. The services are opened here, as `omniattr up` does, rather than in the app's lifespan.
    from api.app import create_app
    from api.usecases.context import build_services

    upgrade_database(settings.resolved_database_url)
    services = build_services(settings)
    try:
        transport = InProcessTransport(create_app(settings, services=services))
        with httpx.Client(transport=transport, base_url="http://localhost", headers=headers) as client:
            yield client
    finally:
        services.close()


class InProcessTransport(httpx.BaseTransport):
    """A synchronous httpx transport that runs each request through an ASGI app on an event loop of its own.

    What Starlette's TestClient does, without its portal thread or the second HTTP library it imports (about
    0.4 s of a CLI command's start-up); the app's lifespan is not run, so the caller gives it its services.
    """

    def __init__(self, app: Any):
        self._asgi = httpx.ASGITransport(app)
        self._loop = asyncio.new_event_loop()

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        """Send one request; an error the app does not handle is raised here, as a server would log it."""
        # The sync client's body as bytes: httpx.ASGITransport reads an async stream.
        buffered = httpx.Request(request.method, request.url, headers=request.headers, content=request.read())

        async def send() -> httpx.Response:
            response = await self._asgi.handle_async_request(buffered)
            return httpx.Response(response.status_code, headers=response.headers, content=await response.aread())

        return self._loop.run_until_complete(send())

    def close(self) -> None:
        """Close the event loop (after the threads it handed sync route handlers to)."""
        self._loop.run_until_complete(self._loop.shutdown_default_executor())
        self._loop.close()


def _call(client: httpx.Client, method: str, path: str, **kwargs: Any) -> Any:
    response = client.request(method, path, **kwargs)
    if response.status_code >= 400:
        try:
            detail = response.json().get("detail", response.text)
        except ValueError:
            detail = response.text
        raise CommandError(f"{detail} (HTTP {response.status_code})")
    return response.json() if response.content else None


def _print(args: argparse.Namespace, value: Any, text: str) -> None:
    print(json.dumps(value, indent=2) if args.json else text)


def _collection_id(client: httpx.Client, name_or_id: str, *, create: bool = False) -> int:
    collections = _call(client, "GET", "/api/collections", params={"limit": 500})["data"]
    for collection in collections:
        if collection["name"] == name_or_id or str(collection["id"]) == name_or_id:
            return collection["id"]
    if not create:
        names = ", ".join(c["name"] for c in collections) or "none yet"
        raise CommandError(f"no collection {name_or_id!r} (existing: {names}); `omniattr ingest` creates one")
    return _call(client, "POST", "/api/collections", json={"name": name_or_id})["id"]


def _follow(client: httpx.Client, job: dict[str, Any], *, quiet: bool) -> dict[str, Any]:
    """Poll a job to its end, with a progress bar on stderr."""
    from tqdm import tqdm

    with tqdm(
        total=job["total"], desc=f"job {job['id']} {job['kind']}", unit="it", disable=quiet, file=sys.stderr
    ) as bar:
        while True:
            job = _call(client, "GET", f"/api/jobs/{job['id']}")
            bar.total = job["total"]
            bar.n = job["done"] + job["failed"]
            bar.set_postfix(failed=job["failed"])
            bar.refresh()
            if job["status"] in (JobStatus.DONE, JobStatus.FAILED, JobStatus.CANCELLED):
                return job
            time.sleep(0.2)


# --- commands ----------------------------------------------------------------------------------------


def cmd_migrate(args: argparse.Namespace) -> int:
    """Bring the metadata database to the newest schema."""
    settings = _load_settings()
    upgrade_database(settings.resolved_database_url, revision=args.revision)
    print(f"database at {args.revision}: {settings.resolved_database_url.split('@')[-1]}")
    return 0


def cmd_settings(args: argparse.Namespace) -> int:
    """Print the resolved settings (secrets masked)."""
    settings = _load_settings()
    shown = settings.model_dump(mode="json")
    if shown.get("qdrant_api_key"):
        shown["qdrant_api_key"] = "***"
    for url in ("database_url", "broker_url", "result_backend_url"):
        if shown.get(url) and "@" in shown[url] and ":" in shown[url].split("@")[0].split("//")[-1]:
            scheme, rest = shown[url].split("//", 1)
            user = rest.split("@")[0].split(":")[0]
            shown[url] = f"{scheme}//{user}:***@{rest.split('@', 1)[1]}"
    shown["resolved_database_url"] = settings.resolved_database_url if not settings.database_url else "(as above)"
    # The checkpoint actually used: an unset encoder_path falls back to DATA_DIR/encoder or the shipped starter.
    in_use = settings.resolved_encoder_path
    shown["encoder_path"] = str(in_use) if in_use else None
    shown["encoder_path_from"] = (
        "OMNIATTR_ENCODER_PATH"
        if settings.encoder_path is not None
        else "DATA_DIR/encoder"
        if in_use == settings.default_encoder_path
        else "the shipped starter encoder"
        if in_use
        else "nothing: set OMNIATTR_ENCODER_PATH or run `omniattr init-encoder`"
    )
    # Likewise the generator: an unset generator_path falls back to the shipped starter generator.
    generator = settings.resolved_generator_path
    shown["generator_path"] = str(generator) if generator else None
    shown["generator_path_from"] = (
        "OMNIATTR_GENERATIONS_ENABLED=false: generations are off"
        if not settings.generations_enabled
        else "OMNIATTR_GENERATOR_PATH"
        if settings.generator_path is not None
        else "the shipped starter generator"
        if generator
        else "nothing (generations are off): set OMNIATTR_GENERATOR_PATH"
    )
    print(json.dumps(shown, indent=2))
    return 0


def cmd_up(args: argparse.Namespace) -> int:
    """Serve the API and web page (embedded: with the in-process worker, no other servers)."""
    import uvicorn

    from api.app import create_app
    from api.usecases.context import build_services

    settings = _load_settings()
    upgrade_database(settings.resolved_database_url)
    host, port = args.host or settings.api_host, args.port or settings.api_port
    # Opened here rather than in the app's lifespan, so that a bad configuration (an encoder or generator path
    # that does not load, a data directory in use) is a one-line error before the server starts.
    services = build_services(settings)
    try:
        app = create_app(settings, services=services, bind_host=host)  # refuses an unsafe bind address
        print(f"omniattr {__version__} ({settings.profile.value}) on http://{host}:{port}", file=sys.stderr)
        uvicorn.run(app, host=host, port=port, log_level="info")
    finally:
        services.close()
    return 0


def cmd_ingest(args: argparse.Namespace) -> int:
    """Ingest a directory of images into a collection (created if new), then wait for the job."""
    settings = _load_settings()
    directory = Path(args.path).resolve()
    if not args.url and directory not in [Path(r).resolve() for r in settings.allowed_roots]:
        # A local user may read their own files: allow this directory for this in-process run.
        settings = settings.model_copy(update={"allowed_roots": [*settings.allowed_roots, directory]})
    with api_client(settings, args.url, args.api_key) as client:
        collection_id = _collection_id(client, args.collection, create=True)
        before = _call(client, "GET", f"/api/collections/{collection_id}")
        job = _call(client, "POST", f"/api/collections/{collection_id}/ingest", json={"path": str(directory)})
        job = _follow(client, job, quiet=args.json)
        after = _call(client, "GET", f"/api/collections/{collection_id}")
        # The reasons live on the failed image rows (the job keeps only counts): those from this directory.
        failed_rows = [
            image
            for image in _call(
                client,
                "GET",
                f"/api/collections/{collection_id}/images",
                params={"status": ImageStatus.FAILED, "limit": 500},
            )["data"]
            if Path(image["source"]).is_relative_to(directory)
        ]
        follow_ups = [
            j
            for j in _call(client, "GET", "/api/jobs", params={"collection_id": collection_id})["data"]
            if j["kind"] == JobKind.INDEX_NEW_IMAGES and j["status"] in (JobStatus.PENDING, JobStatus.RUNNING)
        ]
        for follow_up in follow_ups:  # new images are indexed under the collection's attributes
            _follow(client, follow_up, quiet=args.json)
    # A file whose content is already in the collection gets no new row: the job counts it as done (ready)
    # or failed (the earlier failure), so new = rows added, duplicates = the rest of what was read.
    new_ready = after["image_count"] - before["image_count"]
    new_failed = after["failed_count"] - before["failed_count"]
    duplicates = job["done"] + job["failed"] - new_ready - new_failed
    failures = [{"source": image["source"], "error": image["error"]} for image in failed_rows]
    report = {**job, "new": new_ready, "duplicates": duplicates, "new_failed": new_failed, "failures": failures}
    lines = [
        f"collection {args.collection} ({collection_id}): {job['done'] + job['failed']} files read from {directory}: "
        f"{new_ready} new images ingested, {duplicates} duplicates already in the collection (skipped), "
        f"{job['failed']} failed"
    ]
    if failures:
        lines += ["failed files and why:", *(f"  {f['source']}: {f['error']}" for f in failures[:50])]
        if len(failures) > 50:
            lines.append(f"  ... and {len(failures) - 50} more (`omniattr images --status failed`)")
    if job["error"]:
        lines.append(job["error"])
    _print(args, report, "\n".join(lines))
    return 0 if job["status"] == JobStatus.DONE else 1


def cmd_index(args: argparse.Namespace) -> int:
    """Index a collection under attributes (only the new ones are computed), then wait for the job."""
    settings = _load_settings()
    with api_client(settings, args.url, args.api_key) as client:
        collection_id = _collection_id(client, args.collection)
        response = _call(
            client, "POST", f"/api/collections/{collection_id}/attributes", json={"attributes": args.attributes}
        )
        job = _follow(client, response["job"], quiet=args.json) if response["job"] else None
    _print(
        args,
        {"job": job, "detail": response["detail"]},
        response["detail"] if job is None else f"job {job['id']}: {job['done']} encodings, {job['failed']} failed",
    )
    return 0 if job is None or job["status"] == JobStatus.DONE else 1


def _term(text: str) -> dict[str, Any]:
    parts = text.split(":")
    if len(parts) not in (2, 3) or not parts[0].isdigit():
        raise CommandError(f"a term is IMAGE_ID:ATTRIBUTE[:WEIGHT], e.g. 12:lighting:0.7; got {text!r}")
    term: dict[str, Any] = {"image_id": int(parts[0]), "attribute": parts[1]}
    if len(parts) == 3:
        term["weight"] = float(parts[2])
    return term


def cmd_search(args: argparse.Namespace) -> int:
    """Rank a collection by (image, attribute) terms: a stored image id, or an image file with --attribute."""
    settings = _load_settings()
    with api_client(settings, args.url, args.api_key) as client:
        collection_id = _collection_id(client, args.collection)
        if args.image:
            if not args.attribute:
                raise CommandError("--image needs --attribute, e.g. --attribute lighting")
            if not Path(args.image).is_file():
                raise CommandError(f"--image {args.image}: no such file")
            data = Path(args.image).read_bytes()
            results = _call(
                client,
                "POST",
                "/api/search/upload",
                data={"collection_id": collection_id, "attribute": args.attribute, "limit": args.limit},
                files={"image": (Path(args.image).name, data)},
            )
        else:
            if not args.term:
                raise CommandError("give --term IMAGE_ID:ATTRIBUTE (repeatable) or --image FILE --attribute A")
            body = {
                "collection_id": collection_id,
                "limit": args.limit,
                "terms": [_term(t) for t in args.term],
                "negatives": [_term(t) for t in args.negative],
            }
            results = _call(client, "POST", "/api/search", json=body)
    if args.image:
        query = f"like {args.image} in {args.attribute}"
    else:
        query = " + ".join(args.term) + "".join(f" - {negative}" for negative in args.negative)
    lines = [f"search {args.collection}: {query} (top {args.limit})"]
    lines += [
        f"{r['score']:+.4f}  image {r['image']['id']:>6}  {r['image']['source']}  "
        + " ".join(f"{k}={v:.3f}" for k, v in r["attribute_scores"].items())
        for r in results["results"]
    ] or ["no results"]
    _print(args, results, "\n".join(lines))
    return 0


def cmd_images(args: argparse.Namespace) -> int:
    """List a collection's images with their ids (what --term IMAGE_ID:ATTRIBUTE and --ref need)."""
    settings = _load_settings()
    images: list[dict[str, Any]] = []
    with api_client(settings, args.url, args.api_key) as client:
        collection_id = _collection_id(client, args.collection)
        params: dict[str, Any] = {"after_id": 0, "limit": min(args.limit, 500)}
        if args.status:
            params["status"] = args.status
        while len(images) < args.limit:
            page = _call(client, "GET", f"/api/collections/{collection_id}/images", params=params)
            images += page["data"]
            if page["next_after_id"] is None:
                break
            params["after_id"] = page["next_after_id"]
    images = images[: args.limit]
    lines = [
        f"{i['id']:>6}  {i['status']:<7} {i['width'] or '-'}x{i['height'] or '-'}  {i['source']}"
        + (f"  ({i['error']})" if i["error"] else "")
        for i in images
    ]
    _print(args, images, "\n".join(lines) or f"no images in {args.collection}")
    return 0


def cmd_personalize(args: argparse.Namespace) -> int:
    """Render a new image carrying attributes of stored images: one --ref personalizes, several compose;
    --base starts from an image (a stored id or a file) instead of noise: apply to my image."""
    settings = _load_settings()
    refs = [_term(ref) for ref in args.ref]
    if not refs:
        raise CommandError("give at least one --ref IMAGE_ID:ATTRIBUTE[:WEIGHT]")
    if args.strength is not None and args.base is None:
        raise CommandError("--strength needs --base IMAGE_ID|FILE (the image to start from)")
    if args.keep_detail is not None and args.base is None:
        raise CommandError("--keep-detail needs --base IMAGE_ID|FILE (the image whose detail is kept)")
    body: dict[str, Any] = {
        "refs": refs,
        "prompt": args.prompt,
        "seed": args.seed,
        "steps": args.steps,
        "guidance_scale": args.guidance,
        "strength": args.strength,
        "keep_detail": args.keep_detail,
    }
    base_file = None
    if args.base is not None:
        if Path(args.base).is_file():  # a file wins over an id: `--base 12` with a file named 12 uploads it
            base_file = Path(args.base)
        elif args.base.isdigit():
            body["base_image_id"] = int(args.base)
        else:
            raise CommandError(f"--base {args.base}: no such file, and not an image id (see `omniattr images`)")
    with api_client(settings, args.url, args.api_key) as client:
        if base_file is None:
            generation = _call(client, "POST", "/api/generations", json=body)
        else:
            generation = _call(
                client,
                "POST",
                "/api/generations/upload",
                data={"request": json.dumps(body)},
                files={"base": (base_file.name, base_file.read_bytes())},
            )
        _follow(client, _call(client, "GET", f"/api/jobs/{generation['job_id']}"), quiet=args.json)
        generation = _call(client, "GET", f"/api/generations/{generation['id']}")
        if generation["status"] != GenerationStatus.DONE:
            reason = generation["error"] or f"it ended {generation['status']} without an error message"
            raise CommandError(f"generation {generation['id']} failed: {reason}")
        image = client.get(generation["output_url"])
        Path(args.out).write_bytes(image.content)
    scores = ", ".join(f"{k} {v:.3f}" for k, v in generation["transfer_scores"].items())
    request = generation["request"]
    base = ""
    if args.base is not None:
        detail = request["keep_detail"]
        kept = f"its detail kept under {detail:g} px" if detail else "the generator's output as is"
        base = f", from {args.base} at strength {request['strength']}, {kept}"
    _print(args, {**generation, "file": str(args.out)}, f"wrote {args.out} (attribute transfer: {scores}{base})")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    """Copy a collection's ready images (the originals) into a folder, e.g. as the input of `annotate mine`."""
    settings = _load_settings()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    written, present = 0, 0
    with api_client(settings, args.url, args.api_key) as client:
        collection_id = _collection_id(client, args.collection)
        after = 0
        while True:
            page = _call(
                client,
                "GET",
                f"/api/collections/{collection_id}/images",
                params={"status": ImageStatus.READY, "after_id": after, "limit": 500},
            )
            for image in page["data"]:
                suffix = Path(image["source"]).suffix.lower() or f".{(image['format'] or 'img').lower()}"
                target = out / f"{image['id']:07d}{suffix}"  # the image id names the file: reruns skip it
                if target.exists():
                    present += 1
                    continue
                response = client.get(f"/api/images/{image['id']}/original")
                if response.status_code >= 400:
                    raise CommandError(f"image {image['id']}: HTTP {response.status_code} reading its original")
                partial = target.with_name(target.name + ".partial")
                partial.write_bytes(response.content)
                partial.rename(target)
                written += 1
            if page["next_after_id"] is None:
                break
            after = page["next_after_id"]
    report = {"collection_id": collection_id, "written": written, "already_there": present, "out": str(out)}
    _print(args, report, f"{written} images written to {out} ({present} already there)")
    return 0


def cmd_jobs(args: argparse.Namespace) -> int:
    """List jobs, show one, or resume one whose workers were lost."""
    settings = _load_settings()
    with api_client(settings, args.url, args.api_key) as client:
        if args.resume:
            job = _follow(client, _call(client, "POST", f"/api/jobs/{args.resume}/resume"), quiet=args.json)
            _print(args, job, f"job {job['id']}: {job['status']}")
            return 0
        if args.job_id:
            job = _call(client, "GET", f"/api/jobs/{args.job_id}")
            _print(args, job, json.dumps(job, indent=2))
            return 0
        jobs = _call(client, "GET", "/api/jobs")
    lines = [
        f"{j['id']:>5}  {j['kind']:<17} {j['status']:<9} {j['done']}/{j['total']} failed {j['failed']}"
        for j in jobs["data"]
    ]
    _print(args, jobs, "\n".join(lines) or "no jobs")
    return 0


# Training, evaluation and annotation run in this process: the CLI is the composition root, so it may call
# them. Each is imported inside its command, so `omniattr --help` and the HTTP commands never import torch.


def cmd_init_encoder(args: argparse.Namespace) -> int:
    """Write an untrained compact encoder to DATA_DIR/encoder (the default when OMNIATTR_ENCODER_PATH is unset)."""
    from encoder.__main__ import main as encoder_main

    settings = _load_settings()
    directory = Path(args.directory) if args.directory else settings.default_encoder_path
    return encoder_main(["init", str(directory)])


def cmd_train(args: argparse.Namespace) -> int:
    """Train an attribute encoder (and adapter) from a config; resumable (see configs/)."""
    from training.trainer import main as train_main

    arguments = ["--config", args.config, *[item for pair in args.set for item in ("--set", pair)]]
    if args.stop_at_step is not None:
        arguments += ["--stop-at-step", str(args.stop_at_step)]
    return train_main([*arguments, *(["--resume"] if args.resume else [])])


def cmd_eval(args: argparse.Namespace) -> int:
    """Evaluate encoders: Delta(pos, neg), retrieval mAP@10 / P@10 per attribute, holistic baseline."""
    from training.evaluate import main as evaluate_main

    return evaluate_main(args.arguments)


def cmd_data(args: argparse.Namespace) -> int:
    """Real-image training data: `data build --out DIR` fetches and extracts it; `data --help` lists the options."""
    from training.data.realdata import main as realdata_main

    return realdata_main(args.arguments)


def cmd_annotate(args: argparse.Namespace) -> int:
    """Pair annotation by a VLM: label (stage 1/2), export-sft, finetune, mine; `annotate --help` lists them."""
    from training.annotation.cli import main as annotate_main

    return annotate_main(args.arguments)


BENCHES = {
    "vectors": "vector_search.py",
    "encoder": "encoder_throughput.py",
    "generation": "generation.py",
    "index": "index_throughput.py",
    "api": "api_load.py",
}


def cmd_bench(args: argparse.Namespace) -> int:
    """Run a benchmark from bench/ (a source checkout) and print its table."""
    import subprocess

    script = Path(__file__).resolve().parents[1] / "bench" / BENCHES[args.name]
    if not script.is_file():
        raise CommandError(f"{script} is not here: benchmarks run from a source checkout of omniattr")
    return subprocess.run([sys.executable, "-P", str(script), *args.arguments], check=False).returncode


def cmd_keys(args: argparse.Namespace) -> int:
    """Create, list or revoke API keys (stored hashed; a new key is shown once)."""
    from api.usecases import keys as key_cases

    settings = _load_settings()
    upgrade_database(settings.resolved_database_url)
    engine = make_engine(settings.resolved_database_url)
    session_factory = make_session_factory(engine)
    try:
        if args.action == "create":
            if not args.name:
                raise CommandError("`omniattr keys create NAME`: name the key, e.g. after its user")
            key, plaintext = key_cases.create_api_key(session_factory, name=args.name)
            _print(
                args,
                {"id": key.id, "name": key.name, "key": plaintext},
                f"{plaintext}\n(key {key.id} '{key.name}': store it now, it is not shown again)",
            )
        elif args.action == "list":
            keys = [dataclasses.asdict(key) for key in key_cases.list_api_keys(session_factory)]
            _print(
                args,
                keys,
                "\n".join(
                    f"{k['id']:>4}  {k['prefix']}...  {k['name']}" + ("  (revoked)" if k["revoked"] else "")
                    for k in keys
                )
                or "no keys",
            )
        else:
            if not args.name or not args.name.isdigit():
                raise CommandError("`omniattr keys revoke ID`: give the key's id from `omniattr keys list`")
            key_cases.revoke_api_key(session_factory, key_id=int(args.name))
            print(f"key {args.name} revoked")
    finally:
        engine.dispose()
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The `omniattr` parser: one subcommand per command, each with its `run` function."""
    parser = argparse.ArgumentParser(
        prog="omniattr", description="Search image collections by one visual attribute; generate images with it."
    )
    parser.add_argument("--version", action="version", version=f"omniattr {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, run: Any, *, remote: bool = False) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=run.__doc__, description=run.__doc__)
        sub.set_defaults(run=run)
        if remote:
            sub.add_argument("--url", help="a running omniattr server; default: run in this process")
            sub.add_argument("--api-key", help="API key for --url servers that require one")
            sub.add_argument("--json", action="store_true", help="print JSON for scripts")
        return sub

    command("migrate", cmd_migrate).add_argument("--revision", default="head", help="target revision (default head)")
    command("settings", cmd_settings)
    up = command("up", cmd_up)
    fields = Settings.model_fields
    up.add_argument(
        "--host", help=f"address to listen on (default: OMNIATTR_API_HOST, else {fields['api_host'].default})"
    )
    up.add_argument(
        "--port", type=int, help=f"port to listen on (default: OMNIATTR_API_PORT, else {fields['api_port'].default})"
    )
    up.epilog = (
        f"Data directory: OMNIATTR_DATA_DIR, else {fields['data_dir'].default} (relative to where you start it). "
        f"Profile: OMNIATTR_PROFILE, else {fields['profile'].default.value}. `omniattr settings` shows all."
    )

    ingest = command("ingest", cmd_ingest, remote=True)
    ingest.add_argument("path", help="directory of images (searched recursively)")
    ingest.add_argument("--collection", required=True, help="collection name (created if new) or id")

    index = command("index", cmd_index, remote=True)
    index.add_argument("attributes", nargs="+", help="attribute texts, e.g. lighting 'art style'")
    index.add_argument("--collection", required=True)

    search = command("search", cmd_search, remote=True)
    search.add_argument("--collection", required=True)
    search.add_argument("--term", action="append", default=[], help="IMAGE_ID:ATTRIBUTE[:WEIGHT], repeatable")
    search.add_argument("--negative", action="append", default=[], help="IMAGE_ID:ATTRIBUTE[:WEIGHT] to avoid")
    search.add_argument("--image", help="an image file to use as the query (with --attribute)")
    search.add_argument("--attribute")
    search.add_argument("--limit", type=int, default=10)

    images = command("images", cmd_images, remote=True)
    images.add_argument("--collection", required=True, help="collection name or id")
    images.add_argument("--status", choices=[s.value for s in ImageStatus], help="only images with this status")
    images.add_argument("--limit", type=int, default=100, help="at most this many (default 100)")

    export = command("export", cmd_export, remote=True)
    export.add_argument("--collection", required=True)
    export.add_argument("--out", required=True, help="folder to copy the images into (created if missing)")

    personalize = command("personalize", cmd_personalize, remote=True)
    personalize.add_argument("--ref", action="append", default=[], help="IMAGE_ID:ATTRIBUTE[:WEIGHT], repeatable")
    personalize.add_argument("--prompt", required=True)
    personalize.add_argument("--out", default="omniattr-output.png", help="where to write the image")
    personalize.add_argument("--seed", type=int)
    personalize.add_argument("--steps", type=int)
    personalize.add_argument("--guidance", type=float, default=1.0, help="text guidance scale (1 = off)")
    personalize.add_argument(
        "--base", metavar="ID|FILE", help="apply to my image: start from this stored image id or image file"
    )
    personalize.add_argument(
        "--strength",
        type=float,
        help=f"with --base, in (0, 1]: small keeps the base, 1 starts from noise (default {DEFAULT_BASE_STRENGTH})",
    )
    personalize.add_argument(
        "--keep-detail",
        type=float,
        metavar="SIGMA",
        help=f"with --base: keep the base's detail finer than this blur sigma in output pixels; 0 returns the "
        f"generator's output as is (default {DEFAULT_KEEP_DETAIL}, or 0 when an attribute names a style or a "
        f"texture, e.g. 'art style')",
    )

    jobs = command("jobs", cmd_jobs, remote=True)
    jobs.add_argument("job_id", nargs="?", type=int)
    jobs.add_argument("--resume", type=int, metavar="JOB_ID", help="dispatch a job's unfinished shards again")

    init_encoder = command("init-encoder", cmd_init_encoder)
    init_encoder.add_argument("directory", nargs="?", help="default: DATA_DIR/encoder")

    train = command("train", cmd_train)
    train.add_argument("config", help="training config (.yaml / .json), e.g. configs/compact-starter.yaml")
    train.add_argument("--resume", action="store_true", help="continue from the newest checkpoint")
    train.add_argument("--stop-at-step", type=int, help="end early with a checkpoint at this step")
    train.add_argument("--set", action="append", default=[], metavar="KEY=JSON", help="override a config value")

    # eval forwards everything, --help included, to training.evaluate (its options are listed there).
    evaluate = commands.add_parser("eval", add_help=False, help=cmd_eval.__doc__)
    evaluate.set_defaults(run=cmd_eval, passthrough=True)

    # annotate forwards everything, --help included, to training.annotation.cli (its subcommands have their own help).
    annotate = commands.add_parser("annotate", add_help=False, help=cmd_annotate.__doc__)
    annotate.set_defaults(run=cmd_annotate, passthrough=True)
    # data forwards everything, likewise, to training.data.realdata (build, sources).
    data = commands.add_parser("data", add_help=False, help=cmd_data.__doc__)
    data.set_defaults(run=cmd_data, passthrough=True)

    bench = command("bench", cmd_bench)
    bench.add_argument("name", choices=sorted(BENCHES))
    bench.set_defaults(passthrough=True)

    keys = command("keys", cmd_keys)
    keys.add_argument("action", choices=["create", "list", "revoke"])
    keys.add_argument("name", nargs="?", help="key name (create) or id (revoke)")
    keys.add_argument("--json", action="store_true")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one `omniattr` command; expected failures become a one-line message and exit code 2."""
    # A command loads about 900 modules (FastAPI, SQLAlchemy, pydantic schemas) whose objects live as long as
    # the process; at the collector's default pace (every 700 allocations) it scans them ~300 times and frees
    # nothing, ~0.1 s of CPU in a one-second `search`. Every 20,000 allocations instead: ~170 passes.
    gc.set_threshold(20_000, 10, 10)
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if getattr(args, "passthrough", False):
        args.arguments = ["--help" if item == "--help-module" else item for item in extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return args.run(args)
    except (StoreError, CommandError, httpx.ConnectError) as error:
        print(f"omniattr: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
