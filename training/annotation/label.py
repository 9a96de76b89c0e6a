"""Pair annotation: label image pairs with positive and negative attributes by a VLM (paper §3.2).

docs/architecture.md, "Training" and docs/annotation.md describe the two stages.

`omniattr annotate label` (training.annotation.cli) runs `label_pairs`.

`label` asks one annotator per pair (an OpenAI-compatible chat-completions endpoint such as vLLM serving
Qwen2.5-VL-72B, or a local transformers Qwen-VL, optionally with a fine-tuned LoRA; both through the same
`Annotator.complete` call), parses the strict JSON answer (training.annotation.prompts) and appends each
finished label to DATASET/pairs.jsonl at once (append + fsync), with both images copied beside it under
images/ by content hash, so the output is a pair dataset that `training.data.pairs.load_pairs` reads.

Per pair: a malformed answer (not JSON, or the wrong content) is sent back with the reason and retried, up
to --max-attempts; timeouts, HTTP 429/5xx and refused connections are retried with exponential back-off in
the same budget. A pair that still fails (or whose image is missing or unreadable) gets one line in
DATASET/failures.jsonl with every attempt's error and raw answer; the run goes on. A rerun skips the pair ids
already in pairs.jsonl (resume) and retries the failed ones. The model, prompt version, raw answer, evidence
per phrase, token usage and latency of each label are kept in the record's `meta`.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

import httpx
from PIL import Image

from training.annotation.prompts import PROMPTS, AnnotationRequest, AnswerError, ImageBlob, Reply, parse_answer
from training.data.pairs import PAIRS_FILENAME, PairRecord, load_pairs, write_pairs

FAILURES_FILENAME = "failures.jsonl"
IMAGES_DIR = "images"
SOURCES = {"detailed": "annotator-stage1", "short": "annotator-stage2"}
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
# Formats a VLM server accepts as they are; anything else PIL can read is re-encoded as PNG.
PASS_THROUGH_MIME = {"JPEG": "image/jpeg", "PNG": "image/png", "WEBP": "image/webp", "GIF": "image/gif"}
SUFFIX_BY_MIME = {"image/jpeg": ".jpg", "image/png": ".png", "image/webp": ".webp", "image/gif": ".gif"}
RETRYABLE_STATUS = (408, 409, 425, 429)


# ---------------------------------------------------------------------------------------------------------
# Input pairs


@dataclass(frozen=True)
class PairTask:
    """One pair to label: a stable id, the two image files, and anything the input said about it."""

    id: str
    image_x: Path
    image_y: Path
    info: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class BadInput:
    """An input entry that names no usable pair (recorded as a failure, never fatal)."""

    id: str
    reason: str


def default_pair_id(image_x: Path, image_y: Path) -> str:
    """A pair id derived from the two absolute paths (stable across runs while the files stay put)."""
    digest = hashlib.sha1(f"{image_x.absolute()}\n{image_y.absolute()}".encode()).hexdigest()
    return f"pair-{digest[:16]}"


def read_pair_tasks(source: str | Path) -> tuple[list[PairTask], list[BadInput]]:
    """Pairs to label from a JSONL file or a directory; bad entries are returned, not raised.

    JSONL: one {"image_x": PATH, "image_y": PATH} per line, optional "id" (default: from the paths) and any
    other keys (kept under meta.input); relative paths are relative to the file's directory. The output of
    `mine` is such a file. Directory: every sub-directory holding exactly two images is a pair (id = its
    relative path, images in name order), and top-level files NAME_x.EXT + NAME_y.EXT are a pair (id = NAME).
    """
    source = Path(source)
    if source.is_dir():
        tasks, bad = _tasks_from_directory(source)
    elif source.is_file():
        tasks, bad = _tasks_from_jsonl(source)
    else:
        raise FileNotFoundError(f"{source} does not exist; give a pairs JSONL file or a directory of pairs")
    unique: dict[str, PairTask] = {}
    for task in tasks:
        if task.id in unique:
            bad.append(BadInput(task.id, "duplicate pair id in the input (the first one is labelled)"))
        else:
            unique[task.id] = task
    return list(unique.values()), bad


def _tasks_from_jsonl(path: Path) -> tuple[list[PairTask], list[BadInput]]:
    tasks, bad = [], []
    with path.open("rb") as handle:
        for line_number, raw in enumerate(handle, start=1):
            if not raw.strip():
                continue
            where = f"{path.name}:{line_number}"
            try:
                obj = json.loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as error:
                bad.append(BadInput(where, f"not a JSON line ({error})"))
                continue
            if (
                not isinstance(obj, dict)
                or not isinstance(obj.get("image_x"), str)
                or not isinstance(obj.get("image_y"), str)
            ):
                bad.append(BadInput(where, "a line needs string keys 'image_x' and 'image_y'"))
                continue
            image_x, image_y = (path.parent / obj["image_x"], path.parent / obj["image_y"])
            pair_id = obj.get("id")
            if pair_id is not None and (not isinstance(pair_id, str) or not pair_id.strip()):
                bad.append(BadInput(where, "'id' must be a non-empty string"))
                continue
            info = {key: value for key, value in obj.items() if key not in ("id", "image_x", "image_y")}
            tasks.append(PairTask(pair_id or default_pair_id(image_x, image_y), image_x, image_y, info))
    return tasks, bad


def _is_image(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES


def _tasks_from_directory(directory: Path) -> tuple[list[PairTask], list[BadInput]]:
    tasks, bad = [], []
    top = sorted(path for path in directory.iterdir() if _is_image(path))
    by_stem = {path.stem: path for path in top}
    for path in top:
        if path.stem.endswith("_x"):
            name = path.stem[:-2]
            partner = by_stem.get(f"{name}_y")
            if partner is None:
                bad.append(BadInput(name, f"{path.name} has no {name}_y.* beside it"))
            else:
                tasks.append(PairTask(name, path, partner))
    for folder in sorted(path for path in directory.rglob("*") if path.is_dir()):
        images = sorted(path for path in folder.iterdir() if _is_image(path))
        name = folder.relative_to(directory).as_posix()
        if len(images) == 2:
            tasks.append(PairTask(name, images[0], images[1]))
        elif images:
            bad.append(BadInput(name, f"a pair folder must hold exactly two images, this one holds {len(images)}"))
    return tasks, bad


# ---------------------------------------------------------------------------------------------------------
# Annotators


class TransportError(RuntimeError):
    """The annotator gave no answer: `kind` names why (unreachable, timeout, http_error, bad_response)."""

    def __init__(self, kind: str, message: str, *, retryable: bool) -> None:
        super().__init__(message)
        self.kind = kind
        self.retryable = retryable


class Annotator(Protocol):
    """Anything that answers an AnnotationRequest: an endpoint or a local model."""

    model_name: str
    max_concurrency: int | None

    def complete(self, request: AnnotationRequest) -> Reply: ...


class EndpointAnnotator:
    """An OpenAI-compatible chat-completions endpoint (vLLM, SGLang, TGI, a hosted API); thread-safe."""

    max_concurrency = None

    def __init__(
        self,
        base_url: str,
        model: str,
        *,
        api_key: str | None = None,
        timeout_s: float = 300.0,
        temperature: float = 0.0,
        max_tokens: int = 2048,
        json_mode: bool = False,
        max_connections: int = 16,
    ) -> None:
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model_name = model
        self.temperature = temperature
        self.max_tokens = max_tokens
        self.json_mode = json_mode
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.client = httpx.Client(
            headers=headers,
            timeout=httpx.Timeout(timeout_s, connect=min(timeout_s, 10.0)),
            limits=httpx.Limits(max_connections=max_connections),
        )

    def complete(self, request: AnnotationRequest) -> Reply:
        """POST the request; the first choice's text, or TransportError saying what went wrong."""
        payload: dict[str, Any] = {
            "model": self.model_name,
            "messages": request.openai_messages(),
            "temperature": self.temperature,
            "max_tokens": self.max_tokens,
        }
        if self.json_mode:
            payload["response_format"] = {"type": "json_object"}
        try:
            response = self.client.post(self.url, json=payload)
        except httpx.ConnectError as error:
            raise TransportError("unreachable", f"cannot connect to {self.url} ({error})", retryable=True) from None
        except httpx.TimeoutException as error:
            raise TransportError("timeout", f"no answer in time ({error.__class__.__name__})", retryable=True) from None
        except httpx.HTTPError as error:
            raise TransportError("transport", f"{error.__class__.__name__}: {error}", retryable=True) from None
        if response.status_code != 200:
            code = response.status_code
            retryable = code in RETRYABLE_STATUS or code >= 500
            raise TransportError("http_error", f"HTTP {code}: {response.text[:300]}", retryable=retryable)
        try:
            body = response.json()
            content = body["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError) as error:
            text = response.text[:300]
            raise TransportError("bad_response", f"not a chat completion ({error!r}): {text}", retryable=True) from None
        if isinstance(content, list):  # content parts
            content = "".join(part.get("text", "") for part in content if isinstance(part, dict))
        usage = body.get("usage") if isinstance(body.get("usage"), dict) else {}
        usage = {key: value for key, value in usage.items() if isinstance(value, int)}
        return Reply(text=content or "", model=str(body.get("model") or self.model_name), usage=usage)

    def close(self) -> None:
        """Close the connection pool."""
        self.client.close()


# ---------------------------------------------------------------------------------------------------------
# Stage 1 / stage 2 labelling run


@dataclass
class LabelConfig:
    """How a labelling run asks, retries and writes (see `label_pairs`)."""

    out_dir: Path
    prompt: str = "detailed"  # a key of training.annotation.prompts.PROMPTS
    instruction: str | None = None  # overrides the prompt's text (a fine-tuned annotator's own instruction)
    prompt_version: str | None = None
    max_attempts: int = 3
    concurrency: int = 4
    retry_backoff_s: float = 1.0
    stop_after_unreachable: int = 5  # consecutive unreachable pairs that end the run early; 0: never
    limit: int | None = None
    progress: bool = True


@dataclass
class Attempt:
    """One try at one pair: what went wrong (None when it succeeded), the raw answer, how long it took."""

    kind: str | None
    error: str | None
    raw_answer: str | None
    latency_s: float

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "error": self.error, "raw_answer": self.raw_answer, "latency_s": self.latency_s}


@dataclass
class Outcome:
    """The result for one pair: a record to write, or the reason it failed with every attempt."""

    task: PairTask
    record: PairRecord | None = None
    kind: str | None = None
    error: str | None = None
    attempts: list[Attempt] = field(default_factory=list)


@dataclass
class LabelSummary:
    """What a run did: pairs in the input, skipped as already labelled, labelled now, failed, not tried."""

    total: int = 0
    already_done: int = 0
    labelled: int = 0
    failed: int = 0
    not_attempted: int = 0
    failures_by_kind: Counter = field(default_factory=Counter)
    stopped: str | None = None
    seconds: float = 0.0

    def text(self) -> str:
        """One paragraph for the terminal."""
        line = (
            f"{self.total} pairs: {self.already_done} already labelled, {self.labelled} labelled now, "
            f"{self.failed} failed, {self.not_attempted} not attempted ({self.seconds:.1f} s)"
        )
        if self.failures_by_kind:
            line += "; failures: " + ", ".join(f"{kind} {count}" for kind, count in self.failures_by_kind.most_common())
        if self.stopped:
            line += f"\nstopped early: {self.stopped}"
        return line


def finished_pair_ids(out_dir: Path) -> set[str]:
    """Ids of the pairs already labelled in OUT/pairs.jsonl (lines that load, images present)."""
    if not (out_dir / PAIRS_FILENAME).is_file():
        return set()
    return {record.id for record in load_pairs(out_dir, verify_images=False).records if record.id}


def read_image(path: Path) -> tuple[ImageBlob, str]:
    """An image file as the blob to send (re-encoded as PNG when the format is unusual) and its file suffix.

    ValueError (missing, unreadable) says why the pair cannot be labelled.
    """
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    data = path.read_bytes()
    try:
        with Image.open(io.BytesIO(data)) as image:
            image_format = image.format
            image.load()
            if image_format not in PASS_THROUGH_MIME:
                buffer = io.BytesIO()
                image.convert("RGB").save(buffer, format="PNG")
                data, image_format = buffer.getvalue(), "PNG"
    except Exception as error:  # noqa: BLE001 - PIL raises many types for a corrupt file; all mean "unreadable"
        raise ValueError(f"{path} is not a readable image ({error.__class__.__name__}: {error})") from None
    mime = PASS_THROUGH_MIME[image_format]
    return ImageBlob(data, mime), SUFFIX_BY_MIME[mime]


def store_image(out_dir: Path, blob: ImageBlob, suffix: str) -> str:
    """Copy an image into OUT/images/ by content hash (atomically, once) and return its dataset path."""
    digest = hashlib.sha256(blob.data).hexdigest()
    relative = f"{IMAGES_DIR}/{digest[:2]}/{digest}{suffix}"
    target = out_dir / relative
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        descriptor, temporary = tempfile.mkstemp(prefix=".img-", dir=target.parent)
        try:
            with os.fdopen(descriptor, "wb") as handle:
                handle.write(blob.data)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(temporary, target)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise
    return relative


def annotate_pair(task: PairTask, annotator: Annotator, config: LabelConfig) -> Outcome:
    """Ask for one pair until a valid answer or the attempt budget is spent; never raises for bad answers."""
    instruction, version = _instruction(config)
    try:
        (blob_x, suffix_x), (blob_y, suffix_y) = read_image(task.image_x), read_image(task.image_y)
    except FileNotFoundError as error:
        return Outcome(task, kind="missing_image", error=str(error))
    except ValueError as error:
        return Outcome(task, kind="bad_image", error=str(error))
    request = AnnotationRequest(images=(blob_x, blob_y), instruction=instruction)
    attempts: list[Attempt] = []
    for number in range(1, config.max_attempts + 1):
        started = time.perf_counter()
        try:
            reply = annotator.complete(request)
        except TransportError as error:
            attempts.append(Attempt(error.kind, str(error), None, round(time.perf_counter() - started, 3)))
            if not error.retryable:
                break
            if number < config.max_attempts and config.retry_backoff_s > 0:
                time.sleep(config.retry_backoff_s * 2 ** (number - 1))
            continue
        latency = round(time.perf_counter() - started, 3)
        try:
            annotation = parse_answer(reply.text)
        except AnswerError as error:
            attempts.append(Attempt(error.kind, str(error), reply.text, latency))
            request = request.with_repair(reply.text, str(error))
            continue
        attempts.append(Attempt(None, None, reply.text, latency))
        meta = {
            "model": reply.model,
            "prompt_version": version,
            "raw_answer": reply.text,
            "attempts": number,
            "rejected": [{"kind": a.kind, "error": a.error} for a in attempts[:-1]],
            "evidence": annotation.evidence,
            "usage": reply.usage,
            "latency_s": latency,
            "source_x": str(task.image_x),
            "source_y": str(task.image_y),
            "labelled_at": datetime.now(UTC).isoformat(timespec="seconds"),
        }
        if task.info:
            meta["input"] = task.info
        record = annotation.to_record(
            store_image(config.out_dir, blob_x, suffix_x),
            store_image(config.out_dir, blob_y, suffix_y),
            id=task.id,
            source=SOURCES.get(config.prompt, "annotator"),
            meta=meta,
        )
        return Outcome(task, record=record, attempts=attempts)
    last = attempts[-1]
    return Outcome(task, kind=last.kind, error=last.error, attempts=attempts)


def _instruction(config: LabelConfig) -> tuple[str, str]:
    text, version = PROMPTS[config.prompt]
    if config.instruction is not None:
        return config.instruction, config.prompt_version or "custom"
    return text, config.prompt_version or version


def append_jsonl(path: Path, obj: dict[str, Any]) -> None:
    """Append one JSON line and fsync it (a crash loses nothing already written)."""
    with path.open("ab") as handle:
        handle.write((json.dumps(obj, ensure_ascii=False, sort_keys=True) + "\n").encode("utf-8"))
        handle.flush()
        os.fsync(handle.fileno())


def label_pairs(
    tasks: Sequence[PairTask],
    annotator: Annotator,
    config: LabelConfig,
    *,
    bad_inputs: Iterable[BadInput] = (),
) -> LabelSummary:
    """Label every pair not yet in OUT/pairs.jsonl with bounded concurrency; failures go to failures.jsonl.

    Workers ask the annotator; only this thread writes, one fsynced line per finished pair. After
    `stop_after_unreachable` pairs in a row fail as unreachable no new pairs are started.
    """
    from tqdm import tqdm

    if config.prompt not in PROMPTS:
        raise ValueError(f"unknown prompt {config.prompt!r}; use one of {', '.join(PROMPTS)}")
    if config.max_attempts < 1 or config.concurrency < 1:
        raise ValueError("max_attempts and concurrency must be at least 1")
    started = time.perf_counter()
    out_dir = Path(config.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config.out_dir = out_dir
    failures_path = out_dir / FAILURES_FILENAME
    _, version = _instruction(config)
    summary = LabelSummary(total=len(tasks))

    def record_failure(pair_id: str, kind: str, error: str, task: PairTask | None, attempts: list[Attempt]) -> None:
        summary.failed += 1
        summary.failures_by_kind[kind] += 1
        append_jsonl(
            failures_path,
            {
                "id": pair_id,
                "kind": kind,
                "error": error,
                "image_x": str(task.image_x) if task else None,
                "image_y": str(task.image_y) if task else None,
                "model": annotator.model_name,
                "prompt_version": version,
                "attempts": [attempt.to_json() for attempt in attempts],
                "failed_at": datetime.now(UTC).isoformat(timespec="seconds"),
            },
        )

    for bad in bad_inputs:
        summary.total += 1
        record_failure(bad.id, "bad_input", bad.reason, None, [])

    done = finished_pair_ids(out_dir)
    todo = [task for task in tasks if task.id not in done]
    summary.already_done = len(tasks) - len(todo)
    if config.limit is not None:
        summary.not_attempted += max(0, len(todo) - config.limit)
        todo = todo[: config.limit]
    workers = min(config.concurrency, annotator.max_concurrency or config.concurrency)
    queue = iter(todo)
    in_flight: set[Future] = set()
    unreachable_in_a_row = 0
    bar = tqdm(total=len(todo), unit="pair", disable=not config.progress, file=sys.stderr)
    executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="annotate")
    task_of: dict[Future, PairTask] = {}
    try:

        def top_up() -> None:
            while len(in_flight) < 2 * workers and summary.stopped is None:
                task = next(queue, None)
                if task is None:
                    return
                future = executor.submit(annotate_pair, task, annotator, config)
                task_of[future] = task
                in_flight.add(future)

        top_up()
        while in_flight:
            finished, _ = wait(in_flight, return_when=FIRST_COMPLETED)
            crash: BaseException | None = None
            for future in finished:
                in_flight.discard(future)
                task = task_of.pop(future)
                try:
                    outcome = future.result()
                except Exception as error:  # noqa: BLE001 - a bug or a model crash fails this pair, not the run
                    outcome = Outcome(task, kind="annotator_error", error=f"{error.__class__.__name__}: {error}")
                except BaseException as error:  # an interrupt in a worker: write the other finished pairs, then stop
                    crash = crash or error
                    continue
                if outcome.record is not None:
                    write_pairs(out_dir, [outcome.record])
                    summary.labelled += 1
                    unreachable_in_a_row = 0
                else:
                    record_failure(task.id, outcome.kind or "unknown", outcome.error or "", task, outcome.attempts)
                    unreachable_in_a_row = unreachable_in_a_row + 1 if outcome.kind == "unreachable" else 0
                    if config.stop_after_unreachable and unreachable_in_a_row >= config.stop_after_unreachable:
                        summary.stopped = (
                            f"{unreachable_in_a_row} pairs in a row could not reach the annotator "
                            f"({outcome.error}); start the server or fix --endpoint, then rerun to resume"
                        )
                        for waiting in [f for f in in_flight if f.cancel()]:  # queued, not started
                            in_flight.discard(waiting)
                            task_of.pop(waiting)
                            summary.not_attempted += 1
                bar.update(1)
                bar.set_postfix(ok=summary.labelled, failed=summary.failed, refresh=False)
            if crash is not None:
                raise crash
            top_up()
    finally:
        executor.shutdown(wait=False, cancel_futures=True)
        bar.close()
    summary.not_attempted += sum(1 for _ in queue)
    summary.seconds = time.perf_counter() - started
    return summary
