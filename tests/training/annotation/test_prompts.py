"""The annotator's answer contract: strict JSON parsing, schema checks, repair turns, the stage-2 target."""

from __future__ import annotations

import base64
import json

import pytest

from training.annotation.prompts import (
    DETAILED_INSTRUCTION,
    SHORT_INSTRUCTION,
    AnnotationRequest,
    AnswerError,
    ImageBlob,
    parse_answer,
    target_answer,
)

ANSWER = {
    "reasoning": "Image 1 ... Image 2 ...",
    "caption_x": "A dog  stands\nin heather.",
    "caption_y": "A dog lies in heather.",
    "positive": [{"attribute": " dog   identity ", "evidence": "same collar"}, "background vegetation"],
    "negative": ["dog pose", {"attribute": "Dog Pose"}, {"attribute": "camera angle", "evidence": "low vs high"}],
}


def test_a_good_answer_parses_normalised_with_evidence():
    annotation = parse_answer(json.dumps(ANSWER))
    assert annotation.caption_x == "A dog stands in heather."
    assert annotation.positive == ("dog identity", "background vegetation")
    assert annotation.negative == ("dog pose", "camera angle")  # a case-insensitive repeat is dropped
    assert annotation.evidence == {"dog identity": "same collar", "camera angle": "low vs high"}
    assert annotation.reasoning == "Image 1 ... Image 2 ..."
    assert parse_answer("```json\n" + json.dumps(ANSWER, indent=2) + "\n```  ") == annotation


@pytest.mark.parametrize(
    ("text", "kind", "fragment"),
    [
        ("Here you go: {}", "not_json", "not a JSON object"),
        (json.dumps(ANSWER) + " I hope this helps", "not_json", "Extra data"),
        ("", "not_json", "not a JSON object"),
        ("[1, 2]", "schema", "JSON object"),
        (json.dumps({k: v for k, v in ANSWER.items() if k != "negative"}), "schema", "missing key(s) negative"),
        (json.dumps({**ANSWER, "postive": []}), "schema", "unknown key(s) postive"),
        (json.dumps({**ANSWER, "positive": "dog identity"}), "schema", "must be a list"),
        (json.dumps({**ANSWER, "positive": []}), "schema", "is empty"),
        (json.dumps({**ANSWER, "positive": [3]}), "schema", "string or an object"),
        (json.dumps({**ANSWER, "positive": ["  "]}), "schema", "attribute text is empty"),
        (json.dumps({**ANSWER, "positive": [{"name": "x"}]}), "schema", "attribute"),
        (json.dumps({**ANSWER, "positive": ["one two three four five six seven eight nine"]}), "schema", "words"),
        (json.dumps({**ANSWER, "positive": ["x"] * 13}), "schema", "at most"),
        (json.dumps({**ANSWER, "positive": ["dog pose"]}), "schema", "both positive and negative"),
        (json.dumps({**ANSWER, "caption_y": ""}), "schema", "caption_y"),
        (json.dumps({**ANSWER, "reasoning": ["a"]}), "schema", "reasoning"),
    ],
)
def test_bad_answers_are_rejected_with_a_reason(text, kind, fragment):
    with pytest.raises(AnswerError) as caught:
        parse_answer(text)
    assert caught.value.kind == kind and fragment in str(caught.value)


def test_request_messages_and_repair_turns():
    blob_x, blob_y = ImageBlob(b"\x89PNG-x", "image/png"), ImageBlob(b"\xff\xd8-y", "image/jpeg")
    request = AnnotationRequest((blob_x, blob_y), DETAILED_INSTRUCTION)
    (user,) = request.openai_messages()
    urls = [part["image_url"]["url"] for part in user["content"][:2]]
    assert urls[1].startswith("data:image/jpeg;base64,")
    assert [base64.b64decode(url.split(",", 1)[1]) for url in urls] == [b"\x89PNG-x", b"\xff\xd8-y"]
    assert user["content"][2] == {"type": "text", "text": DETAILED_INSTRUCTION}
    repaired = request.with_repair("oops", "missing key(s) negative")
    messages = repaired.openai_messages()
    assert messages[1] == {"role": "assistant", "content": "oops"}
    assert "missing key(s) negative" in messages[2]["content"] and messages[2]["role"] == "user"
    assert request.repairs == ()  # requests are immutable


def test_stage2_target_round_trips_and_the_short_prompt_is_much_shorter():
    record = parse_answer(json.dumps(ANSWER)).to_record("images/a.png", "images/b.png")
    compact = parse_answer(target_answer(record))
    assert (compact.positive, compact.negative) == (record.positive, record.negative)
    assert compact.evidence == {} and compact.caption_y == record.caption_y
    with_evidence = parse_answer(target_answer(record, evidence={"dog identity": "same collar"}))
    assert with_evidence.evidence == {"dog identity": "same collar"}
    assert len(DETAILED_INSTRUCTION.split()) > 20 * len(SHORT_INSTRUCTION.split())
