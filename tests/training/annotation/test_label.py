"""Stage 1 end to end against a real HTTP server on loopback that speaks the chat-completions protocol.

The server (http.server in a thread) recognises each pair by the bytes of its first image and answers from a
per-pair script: good JSON, a fenced answer, non-JSON, wrong schema, HTTP 500, a non-chat body, or a reply
slower than the client's timeout. It counts requests, so retries, resume and concurrency are observable.
"""

from __future__ import annotations

import base64
import hashlib
import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from PIL import Image

from training.annotation import label as label_module
from training.annotation.label import (
    FAILURES_FILENAME,
    EndpointAnnotator,
    LabelConfig,
    PairTask,
    TransportError,
    label_pairs,
    read_pair_tasks,
)
from training.annotation.prompts import (
    DETAILED_INSTRUCTION,
    DETAILED_PROMPT_VERSION,
    SHORT_INSTRUCTION,
    SHORT_PROMPT_VERSION,
    AnnotationRequest,
    ImageBlob,
)
from training.data.pairs import PAIRS_FILENAME, load_pairs

GOOD = {
    "reasoning": "Image 1 shows a red square... Image 2 shows a red square lit differently...",
    "caption_x": "A red square on a plain background.",
    "caption_y": "A red square in warmer light.",
    "positive": [{"attribute": "object shape", "evidence": "a square in both"}, "object colour"],
    "negative": [{"attribute": "image lighting", "evidence": "cool vs warm"}],
}
SLOW_S = 1.5
CLIENT_TIMEOUT_S = 0.4


class ChatServer:
    """A chat-completions server on 127.0.0.1 whose answers per pair follow a script (the last entry repeats)."""

    def __init__(self) -> None:
        self.scripts: dict[str, list] = {}  # pair name -> answers, one per request
        self.names: dict[str, str] = {}  # sha256 of the first image's bytes -> pair name
        self.requests: dict[str, list[dict]] = {}
        self.in_flight = 0
        self.max_in_flight = 0
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def do_POST(self) -> None:  # noqa: N802 - http.server's naming
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with server.lock:
                    server.in_flight += 1
                    server.max_in_flight = max(server.max_in_flight, server.in_flight)
                try:
                    status, payload = server.answer(self.path, body)
                    if status == "slow":
                        time.sleep(SLOW_S)
                        status, payload = 200, server.completion(GOOD)
                    data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (timeout): expected for slow answers
                finally:
                    with server.lock:
                        server.in_flight -= 1

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    @staticmethod
    def completion(content, model: str = "served-vlm") -> dict:
        text = content if isinstance(content, str) else json.dumps(content)
        return {
            "id": "cmpl-1",
            "object": "chat.completion",
            "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 1234, "completion_tokens": 56, "total_tokens": 1290},
        }

    def answer(self, path: str, body: dict) -> tuple:
        if path != "/v1/chat/completions":
            return 404, {"error": "not found"}
        first_image = body["messages"][0]["content"][0]["image_url"]["url"]
        digest = hashlib.sha256(base64.b64decode(first_image.split(",", 1)[1])).hexdigest()
        name = self.names[digest]
        with self.lock:
            self.requests.setdefault(name, []).append(body)
            count = len(self.requests[name])
        script = self.scripts[name]
        step = script[min(count, len(script)) - 1]
        if step == "slow":
            return "slow", None
        if isinstance(step, tuple):  # (status, raw body)
            return step
        return 200, self.completion(step)

    def pair(self, directory: Path, name: str, script: list, colour=(200, 30, 30)) -> PairTask:
        """Write a pair's two images (unique bytes per pair) and register its script."""
        directory.mkdir(parents=True, exist_ok=True)
        seed = int(hashlib.sha1(name.encode()).hexdigest()[:6], 16)
        paths = []
        for side, shade in (("x", 0), ("y", 40)):
            image = Image.new("RGB", (32, 24), tuple((c + shade) % 256 for c in colour))
            image.putpixel((0, 0), (seed % 256, (seed >> 8) % 256, (seed >> 16) % 256))
            path = directory / f"{name}_{side}.png"
            image.save(path)
            paths.append(path)
        self.names[hashlib.sha256(paths[0].read_bytes()).hexdigest()] = name
        self.scripts[name] = script
        return PairTask(name, paths[0], paths[1])

    def count(self, name: str) -> int:
        return len(self.requests.get(name, []))

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    chat = ChatServer()
    yield chat
    chat.close()


def _annotator(server: ChatServer, **kwargs) -> EndpointAnnotator:
    values = dict(timeout_s=CLIENT_TIMEOUT_S, model="big-vlm")
    values.update(kwargs)
    return EndpointAnnotator(server.url, **values)


def _config(out: Path, **kwargs) -> LabelConfig:
    values = dict(out_dir=out, max_attempts=3, concurrency=3, retry_backoff_s=0.0, progress=False)
    values.update(kwargs)
    return LabelConfig(**values)


def _failures(out: Path) -> dict[str, dict]:
    path = out / FAILURES_FILENAME
    if not path.exists():
        return {}
    return {row["id"]: row for row in map(json.loads, path.read_text().splitlines())}


@pytest.mark.slow
def test_stage1_labels_good_pairs_retries_bad_answers_and_records_failures(server, tmp_path):
    images, out = tmp_path / "in", tmp_path / "dataset"
    not_json, wrong_schema = "Sure! Here are the attributes: dog pose, lighting", {"caption_x": "only one key"}
    tasks = [
        server.pair(images, "good", [GOOD]),
        server.pair(images, "fenced", ["```json\n" + json.dumps(GOOD) + "\n```"]),
        server.pair(images, "repaired", [not_json, GOOD]),
        server.pair(images, "after_500", [(500, b'{"error": "overloaded"}'), GOOD]),
        server.pair(images, "never_json", [not_json]),
        server.pair(images, "wrong_schema", [wrong_schema]),
        server.pair(images, "not_a_completion", [(200, b'{"object": "error"}')]),
        server.pair(images, "slow", ["slow"]),
    ]
    missing = PairTask("missing", images / "nowhere_x.png", images / "good_y.png")
    annotator = _annotator(server)
    summary = label_pairs([*tasks, missing], annotator, _config(out))
    annotator.close()

    assert (summary.total, summary.labelled, summary.failed) == (9, 4, 5)
    report = load_pairs(out)  # verifies every copied image too
    assert report.bad_lines == []
    records = {record.id: record for record in report.records}
    assert sorted(records) == ["after_500", "fenced", "good", "repaired"]
    good = records["good"]
    assert good.positive == ("object shape", "object colour") and good.negative == ("image lighting",)
    assert good.caption_x == GOOD["caption_x"] and good.source == "annotator-stage1"
    assert good.meta["model"] == "served-vlm" and good.meta["prompt_version"] == DETAILED_PROMPT_VERSION
    assert json.loads(good.meta["raw_answer"]) == GOOD
    assert good.meta["evidence"] == {"object shape": "a square in both", "image lighting": "cool vs warm"}
    assert good.meta["usage"]["prompt_tokens"] == 1234 and good.meta["attempts"] == 1
    assert (out / good.image_x).read_bytes() == (images / "good_x.png").read_bytes()
    assert good.meta["source_x"] == str(images / "good_x.png")

    # The request: both images as base64 data URLs in the OpenAI vision format, then the long instruction.
    request = server.requests["good"][0]
    assert request["model"] == "big-vlm" and request["temperature"] == 0.0
    content = request["messages"][0]["content"]
    assert [part["type"] for part in content] == ["image_url", "image_url", "text"]
    assert content[0]["image_url"]["url"].startswith("data:image/png;base64,")
    assert base64.b64decode(content[1]["image_url"]["url"].split(",", 1)[1]) == (images / "good_y.png").read_bytes()
    assert content[2]["text"] == DETAILED_INSTRUCTION

    # A malformed answer is sent back with the reason and retried within the attempt budget.
    assert server.count("repaired") == 2 and records["repaired"].meta["attempts"] == 2
    retry = server.requests["repaired"][1]["messages"]
    assert [message["role"] for message in retry] == ["user", "assistant", "user"]
    assert retry[1]["content"] == not_json and "not a JSON object" in retry[2]["content"]
    assert records["repaired"].meta["rejected"][0]["kind"] == "not_json"
    assert server.count("after_500") == 2

    failures = _failures(out)
    assert sorted(failures) == ["missing", "never_json", "not_a_completion", "slow", "wrong_schema"]
    assert failures["never_json"]["kind"] == "not_json" and server.count("never_json") == 3
    assert [attempt["raw_answer"] for attempt in failures["never_json"]["attempts"]] == [not_json] * 3
    assert failures["wrong_schema"]["kind"] == "schema" and "missing key" in failures["wrong_schema"]["error"]
    assert failures["not_a_completion"]["kind"] == "bad_response"
    assert failures["slow"]["kind"] == "timeout" and len(failures["slow"]["attempts"]) == 3
    assert failures["missing"]["kind"] == "missing_image" and server.count("missing") == 0
    assert summary.failures_by_kind == {"not_json": 1, "schema": 1, "bad_response": 1, "timeout": 1, "missing_image": 1}


@pytest.mark.slow
def test_resume_skips_labelled_pairs_and_retries_failed_ones(server, tmp_path):
    images, out = tmp_path / "in", tmp_path / "dataset"
    tasks = [server.pair(images, f"pair{i}", [GOOD]) for i in range(3)]
    tasks.append(server.pair(images, "flaky", ["not json", "not json", GOOD]))
    annotator = _annotator(server)
    first = label_pairs(tasks, annotator, _config(out, max_attempts=2))
    assert (first.labelled, first.failed) == (3, 1)
    assert [server.count(task.id) for task in tasks] == [1, 1, 1, 2]

    second = label_pairs(tasks, annotator, _config(out, max_attempts=2))
    annotator.close()
    assert (second.already_done, second.labelled, second.failed) == (3, 1, 0)
    assert [server.count(task.id) for task in tasks] == [1, 1, 1, 3]  # labelled pairs were not asked again
    ids = [record.id for record in load_pairs(out).records]
    assert sorted(ids) == ["flaky", "pair0", "pair1", "pair2"]  # each once


@pytest.mark.slow
def test_a_crash_loses_no_finished_label_and_a_torn_line_is_relabelled(server, tmp_path):
    images, out = tmp_path / "in", tmp_path / "dataset"
    tasks = [server.pair(images, f"pair{i}", [GOOD]) for i in range(4)]

    class CrashingAnnotator(EndpointAnnotator):
        def complete(self, request):
            if request.images[0].data == tasks[2].image_x.read_bytes():
                raise KeyboardInterrupt  # the process dies while pair2 is being asked
            return super().complete(request)

    annotator = CrashingAnnotator(server.url, "big-vlm", timeout_s=CLIENT_TIMEOUT_S)
    with pytest.raises(KeyboardInterrupt):
        label_pairs(tasks, annotator, _config(out, concurrency=1))
    assert [record.id for record in load_pairs(out).records] == ["pair0", "pair1"]

    with (out / PAIRS_FILENAME).open("ab") as handle:  # a write torn by a crash
        handle.write(b'{"id": "pair3", "image_x": "images/ab')
    summary = label_pairs(tasks, _annotator(server), _config(out, concurrency=1))
    report = load_pairs(out)
    assert sorted(record.id for record in report.records) == ["pair0", "pair1", "pair2", "pair3"]
    assert len(report.bad_lines) == 1  # the torn line, skipped
    assert (summary.already_done, summary.labelled) == (2, 2)
    assert server.count("pair0") == server.count("pair1") == 1


@pytest.mark.slow
def test_an_interrupt_in_one_worker_still_writes_the_pairs_the_others_finished(server, tmp_path, monkeypatch):
    images, out = tmp_path / "in", tmp_path / "dataset"
    tasks = [server.pair(images, f"pair{i}", [GOOD]) for i in range(4)]
    crash_on = tasks[2].image_x.read_bytes()
    answered = threading.Semaphore(0)

    class CrashingAnnotator(EndpointAnnotator):
        def complete(self, request):
            if request.images[0].data == crash_on:
                for _ in range(3):  # pair2 dies after the other three pairs have their answers
                    assert answered.acquire(timeout=10)
                raise KeyboardInterrupt
            reply = super().complete(request)
            answered.release()
            return reply

    write_pairs = label_module.write_pairs

    def slow_write_pairs(*args, **kwargs):  # a slow disk: the crash and the other pairs finish during pair0's write
        write_pairs(*args, **kwargs)
        time.sleep(0.5)

    monkeypatch.setattr(label_module, "write_pairs", slow_write_pairs)
    annotator = CrashingAnnotator(server.url, "big-vlm", timeout_s=CLIENT_TIMEOUT_S)
    with pytest.raises(KeyboardInterrupt):
        label_pairs(tasks, annotator, _config(out, concurrency=2))
    annotator.close()
    assert sorted(record.id for record in load_pairs(out).records) == ["pair0", "pair1", "pair3"]


def test_unreachable_endpoint_fails_each_pair_and_stops_early(tmp_path):
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    images = tmp_path / "in"
    images.mkdir()
    tasks = []
    for i in range(4):
        for side in "xy":
            Image.new("RGB", (8, 8), (i, 0, 0)).save(images / f"p{i}_{side}.png")
        tasks.append(PairTask(f"p{i}", images / f"p{i}_x.png", images / f"p{i}_y.png"))
    annotator = EndpointAnnotator(f"http://127.0.0.1:{port}/v1", "big-vlm", timeout_s=2.0)
    blob = ImageBlob((images / "p0_x.png").read_bytes(), "image/png")
    with pytest.raises(TransportError) as caught:
        annotator.complete(AnnotationRequest((blob, blob), SHORT_INSTRUCTION))
    assert caught.value.kind == "unreachable" and caught.value.retryable

    out = tmp_path / "dataset"
    summary = label_pairs(tasks, annotator, _config(out, concurrency=1, max_attempts=2, stop_after_unreachable=2))
    annotator.close()
    # Stops after two pairs in a row; a pair already picked up by the worker meanwhile may still be tried.
    assert summary.labelled == 0 and summary.failed in (2, 3) and summary.failed + summary.not_attempted == 4
    assert "could not reach" in summary.stopped
    failures = _failures(out)
    assert {"p0", "p1"} <= set(failures) and "p3" not in failures
    assert {row["kind"] for row in failures.values()} == {"unreachable"}
    assert len(failures["p0"]["attempts"]) == 2
    assert not (out / PAIRS_FILENAME).exists()


@pytest.mark.slow
def test_stage2_short_prompt_goes_through_the_same_path(server, tmp_path):
    images, out = tmp_path / "in", tmp_path / "dataset"
    compact = {key: GOOD[key] for key in ("caption_x", "caption_y")}
    compact.update(positive=["object shape"], negative=["image lighting"])
    tasks = [server.pair(images, "pair", [compact])]
    annotator = _annotator(server)
    summary = label_pairs(tasks, annotator, _config(out, prompt="short"))
    annotator.close()
    assert summary.labelled == 1
    assert server.requests["pair"][0]["messages"][0]["content"][2]["text"] == SHORT_INSTRUCTION
    (record,) = load_pairs(out).records
    assert record.source == "annotator-stage2" and record.meta["prompt_version"] == SHORT_PROMPT_VERSION


@pytest.mark.slow
def test_concurrency_is_bounded(server, tmp_path):
    images, out = tmp_path / "in", tmp_path / "dataset"
    delayed = [server.pair(images, f"pair{i}", [GOOD]) for i in range(6)]
    original = server.answer

    def slow_answer(path, body):
        time.sleep(0.2)
        return original(path, body)

    server.answer = slow_answer
    annotator = _annotator(server, timeout_s=5.0)
    summary = label_pairs(delayed, annotator, _config(out, concurrency=2))
    annotator.close()
    assert summary.labelled == 6
    assert server.max_in_flight == 2


def test_read_pair_tasks_from_jsonl_and_directories(tmp_path):
    (tmp_path / "a").mkdir()
    for name in ("a/one.png", "a/two.png", "top_x.jpg", "top_y.jpg", "lonely_x.png"):
        Image.new("RGB", (4, 4)).save(tmp_path / name)
    (tmp_path / "b").mkdir()
    Image.new("RGB", (4, 4)).save(tmp_path / "b" / "single.png")
    tasks, bad = read_pair_tasks(tmp_path)
    assert {task.id: (task.image_x.name, task.image_y.name) for task in tasks} == {
        "a": ("one.png", "two.png"),
        "top": ("top_x.jpg", "top_y.jpg"),
    }
    assert sorted(item.id for item in bad) == ["b", "lonely"]

    listing = tmp_path / "pairs.jsonl"
    listing.write_text(
        json.dumps({"image_x": "a/one.png", "image_y": "a/two.png", "similarity": 0.7})
        + "\n"
        + "not json\n"
        + json.dumps({"id": "named", "image_x": str(tmp_path / "top_x.jpg"), "image_y": "top_y.jpg"})
        + "\n"
        + json.dumps({"id": "named", "image_x": "a/one.png", "image_y": "top_y.jpg"})
        + "\n"
        + json.dumps({"image_x": "a/one.png"})
        + "\n"
    )
    tasks, bad = read_pair_tasks(listing)
    assert [task.id for task in tasks][1] == "named" and tasks[0].id.startswith("pair-")
    assert tasks[0].image_x == tmp_path / "a/one.png" and tasks[0].info == {"similarity": 0.7}
    assert [item.id for item in bad] == ["pairs.jsonl:2", "pairs.jsonl:5", "named"]
