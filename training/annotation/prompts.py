"""What the pair annotator is asked and what it must answer (docs/architecture.md, "Training"; paper §3.2).

Two instructions ask for the same thing about an image pair (image 1 = x, image 2 = y):

- `DETAILED_INSTRUCTION` (stage 1): a long chain-of-thought instruction for a large general VLM; it defines
  positive and negative attributes, the granularity wanted, and asks for the evidence behind every phrase.
- `SHORT_INSTRUCTION` (stage 2): one line, for a smaller VLM fine-tuned on stage-1 answers, which has learnt
  the task and the format, so the long instruction (and most input tokens) can be dropped.

Both are answered with one strict JSON object (a ```json fence around it is tolerated, nothing else):

    {"reasoning": "...",                                       optional; stage 1 asks for it first
     "caption_x": "...", "caption_y": "...",                   one caption per image
     "positive": [{"attribute": "dog identity", "evidence": "..."}, ...],   shared by both images
     "negative": [{"attribute": "dog pose", "evidence": "..."}, ...]}       telling them apart

A list item may also be a bare phrase string (the compact stage-2 target). `parse_answer` checks all of it
and returns an `Annotation`, or raises `AnswerError` whose `kind` is "not_json" or "schema".
"""

from __future__ import annotations

import base64
import json
import re
from dataclasses import dataclass, field
from typing import Any

from omniattr.domain import InvalidTextError, normalize_attribute
from training.data.pairs import PairFormatError, PairRecord

# Bump a version whenever its instruction text changes: it is recorded with every label made from it.
DETAILED_PROMPT_VERSION = "stage1-cot-v1"
SHORT_PROMPT_VERSION = "stage2-short-v1"

MAX_PHRASES = 12  # per list
MAX_PHRASE_WORDS = 8
MAX_CAPTION_CHARS = 1000
ANSWER_KEYS = ("caption_x", "caption_y", "positive", "negative")
OPTIONAL_ANSWER_KEYS = ("reasoning",)

DETAILED_INSTRUCTION = """\
You are an expert visual annotator building a dataset for attribute-level image representations. You are
shown two images of a semantically linked pair: Image 1 comes first and Image 2 second. The pair was chosen
because the two images have something in common (for example the same subject, the same place, the same
artistic style or the same lighting set-up) while other things differ. Your job is to name, in short
open-vocabulary phrases, exactly which visual attributes the two images SHARE (positive attributes) and
which visual attributes tell them APART (negative attributes), and to write one caption for each image.

Definitions.
- An attribute is a nameable visual concept that can be judged from the pixels alone: an identity (of a
  person, an animal, an object or a place), a category or species, a pose or action, a facial expression,
  a hairstyle, clothing, a material or surface texture, a colour or colour palette, the lighting (its
  direction, hardness, colour temperature, time of day), the background or environment, the weather or
  season, the camera angle, distance, framing or lens, the composition or layout, the depth of field, the
  artistic style or medium (photograph, watercolour, 3D render, pixel art...), a filter or colour grade.
- A POSITIVE attribute is one whose value is the same in both images. "Same" means a person looking at the
  two images side by side would agree that this attribute could be copied from one image to the other
  without any visible change. Similar is not enough: two different golden retrievers do not share "dog
  identity", although they share "dog breed".
- A NEGATIVE attribute is one whose value clearly differs between the two images. Name the attribute, not
  its two values: write "dog pose", not "sitting dog versus running dog".

How to work (think step by step before you answer, and write your thinking into the "reasoning" field).
1. Describe Image 1 in detail: the main subject(s), what they look like and do, the setting, the lighting,
   the colours, the camera viewpoint and the style of the image.
2. Describe Image 2 in the same order and with the same level of detail.
3. Compare the two descriptions attribute by attribute, in the order of the list of definitions above. For
   each attribute decide: clearly the same, clearly different, or not comparable (for example hairstyle
   when one image shows no person). Drop attributes that are not comparable or that you are unsure about.
4. Be fine-grained. Prefer "cat fur pattern" over "cat", "window light direction" over "lighting" when the
   images differ only in the direction of the light, and "watercolour painting style" over "style". Each
   phrase should name the subject it belongs to when there is more than one subject.
5. Check every phrase against the images once more. A phrase may never be both positive and negative.
   Remove duplicates and phrases that mean the same thing (keep the more specific one).
6. For every phrase you keep, write one sentence of evidence that quotes what you see in each image.

Rules for the phrases.
- 1 to 8 words each, lower case, a noun phrase ("image lighting", "person identity", "car colour").
- No values in the phrase ("red car colour" is wrong; "car colour" is right).
- Between 1 and 8 positive and between 1 and 8 negative attributes; every pair has at least one of each.
- Only visual attributes: nothing about the file, the photographer, the time the photo was taken unless it
  is visible (night, snow), or anything you have to guess.

Rules for the captions.
- One caption per image, one or two sentences, 10 to 60 words, describing the whole image as a person
  would describe it to someone who cannot see it: subject, action, setting, lighting and style.
- Do not compare the images in the captions; each caption must be true of its own image alone.

Answer format. Answer with exactly one JSON object and nothing before or after it: no Markdown, no
comments, no trailing commas. Use exactly these keys:
{
  "reasoning": "your step-by-step description and comparison from steps 1 to 5",
  "caption_x": "caption of Image 1",
  "caption_y": "caption of Image 2",
  "positive": [{"attribute": "shared attribute phrase", "evidence": "what you see in both images"}],
  "negative": [{"attribute": "differing attribute phrase", "evidence": "what is in Image 1 vs Image 2"}]
}

Example (two photos of the same Dalmatian on a heath: standing under overcast light in the first, lying
down at sunset and seen from lower in the second; the reasoning is shortened here, yours should not be):
{
  "reasoning": "Image 1: a Dalmatian, black eye patch, red collar, stands in heather... Image 2: ...",
  "caption_x": "A Dalmatian with a black eye patch stands in blooming purple heather under a soft grey sky.",
  "caption_y": "A Dalmatian lies in purple heather at sunset, lit by warm low light, seen from the ground.",
  "positive": [
    {"attribute": "dog identity", "evidence": "same spot pattern, eye patch and red collar in both"},
    {"attribute": "background vegetation", "evidence": "purple flowering heather fills both backgrounds"}
  ],
  "negative": [
    {"attribute": "dog pose", "evidence": "standing in Image 1, lying down in Image 2"},
    {"attribute": "image lighting", "evidence": "soft overcast light vs warm low sunset light"},
    {"attribute": "camera angle", "evidence": "eye-level view vs a view from near the ground"}
  ]
}
(Every string stays on one line: JSON strings cannot hold line breaks.)

Now look at Image 1 and Image 2 and answer with the JSON object only."""

SHORT_INSTRUCTION = "Annotate the image pair: captions, shared and differing attributes, as JSON."

REPAIR_INSTRUCTION = (
    "That answer cannot be used: {error}. Answer again with exactly one JSON object in the format asked for "
    "and nothing before or after it."
)

# prompt name -> (instruction, version)
PROMPTS = {
    "detailed": (DETAILED_INSTRUCTION, DETAILED_PROMPT_VERSION),
    "short": (SHORT_INSTRUCTION, SHORT_PROMPT_VERSION),
}


class AnswerError(ValueError):
    """An answer that is not usable; `kind` is "not_json" (unparseable) or "schema" (wrong content)."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


@dataclass(frozen=True)
class Annotation:
    """A parsed, validated answer: captions, phrases (whitespace-normalised) and the evidence behind them."""

    caption_x: str
    caption_y: str
    positive: tuple[str, ...]
    negative: tuple[str, ...]
    evidence: dict[str, str] = field(default_factory=dict)
    reasoning: str | None = None

    def to_record(self, image_x: str, image_y: str, **optional: Any) -> PairRecord:
        """The pair record (training.data.pairs format) for this annotation of the images at these dataset paths."""
        return PairRecord(
            image_x=image_x,
            image_y=image_y,
            caption_x=self.caption_x,
            caption_y=self.caption_y,
            positive=self.positive,
            negative=self.negative,
            **optional,
        )


@dataclass(frozen=True)
class Reply:
    """What an annotator answered: the text, token usage when known, and the model that answered."""

    text: str
    model: str
    usage: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class ImageBlob:
    """One image as sent to an annotator: its encoded bytes and MIME type."""

    data: bytes
    mime: str

    def data_url(self) -> str:
        """The image as a base64 data URL (the OpenAI vision message format)."""
        return f"data:{self.mime};base64,{base64.b64encode(self.data).decode('ascii')}"


@dataclass(frozen=True)
class AnnotationRequest:
    """One question to an annotator: two images, the instruction, and any repair turns after bad answers.

    Each repair is (the rejected answer, the correction sent back), so the model sees why it was rejected.
    """

    images: tuple[ImageBlob, ImageBlob]
    instruction: str
    repairs: tuple[tuple[str, str], ...] = ()

    def with_repair(self, answer: str, error: str) -> AnnotationRequest:
        """This request followed by the rejected `answer` and a correction that quotes `error`."""
        correction = REPAIR_INSTRUCTION.format(error=error)
        return AnnotationRequest(self.images, self.instruction, (*self.repairs, (answer, correction)))

    def openai_messages(self) -> list[dict[str, Any]]:
        """Chat-completions messages: one user turn with both images first, then the repair turns."""
        content: list[dict[str, Any]] = [
            {"type": "image_url", "image_url": {"url": image.data_url()}} for image in self.images
        ]
        content.append({"type": "text", "text": self.instruction})
        messages: list[dict[str, Any]] = [{"role": "user", "content": content}]
        for answer, correction in self.repairs:
            messages.append({"role": "assistant", "content": answer})
            messages.append({"role": "user", "content": correction})
        return messages


_FENCE = re.compile(r"^```(?:json|JSON)?\s*\n?(.*?)\n?\s*```$", re.DOTALL)


def parse_answer(text: str) -> Annotation:
    """Parse and validate one annotator answer; AnswerError says what is wrong (it goes back in a retry)."""
    stripped = text.strip()
    fenced = _FENCE.match(stripped)
    if fenced:
        stripped = fenced.group(1).strip()
    try:
        obj = json.loads(stripped)
    except json.JSONDecodeError as error:
        where = f"line {error.lineno} column {error.colno}"
        raise AnswerError("not_json", f"not a JSON object ({error.msg} at {where})") from None
    if not isinstance(obj, dict):
        raise AnswerError("schema", f"the answer must be a JSON object, got a JSON {type(obj).__name__}")
    missing = [key for key in ANSWER_KEYS if key not in obj]
    if missing:
        raise AnswerError("schema", f"missing key(s) {', '.join(missing)}")
    unknown = sorted(key for key in obj if key not in ANSWER_KEYS and key not in OPTIONAL_ANSWER_KEYS)
    if unknown:
        raise AnswerError("schema", f"unknown key(s) {', '.join(unknown)}")
    reasoning = obj.get("reasoning")
    if reasoning is not None and not isinstance(reasoning, str):
        raise AnswerError("schema", "'reasoning' must be a string")
    captions = []
    for key in ("caption_x", "caption_y"):
        caption = obj[key]
        if not isinstance(caption, str) or not caption.strip():
            raise AnswerError("schema", f"'{key}' must be a non-empty string")
        if len(caption) > MAX_CAPTION_CHARS:
            raise AnswerError("schema", f"'{key}' is longer than {MAX_CAPTION_CHARS} characters")
        captions.append(" ".join(caption.split()))
    evidence: dict[str, str] = {}
    positive = _phrases("positive", obj["positive"], evidence)
    negative = _phrases("negative", obj["negative"], evidence)
    both = {phrase.lower() for phrase in positive} & {phrase.lower() for phrase in negative}
    if both:
        raise AnswerError("schema", f"{sorted(both)[0]!r} is listed as both positive and negative")
    annotation = Annotation(captions[0], captions[1], positive, negative, evidence, reasoning)
    try:  # the dataset's own rules, so that every accepted answer is a loadable pair
        annotation.to_record("x", "y")
    except PairFormatError as error:
        raise AnswerError("schema", str(error)) from error
    return annotation


def _phrases(name: str, value: Any, evidence: dict[str, str]) -> tuple[str, ...]:
    """The phrases of one list (items: a string or {"attribute", "evidence"}), de-duplicated ignoring case."""
    if not isinstance(value, list):
        raise AnswerError("schema", f"'{name}' must be a list, got {type(value).__name__}")
    if not value:
        raise AnswerError("schema", f"'{name}' is empty; name at least one attribute")
    if len(value) > MAX_PHRASES:
        raise AnswerError("schema", f"'{name}' has {len(value)} items; at most {MAX_PHRASES}")
    phrases: list[str] = []
    seen: set[str] = set()
    for position, item in enumerate(value):
        reason = None
        if isinstance(item, dict):
            extra = sorted(set(item) - {"attribute", "evidence"})
            if extra or not isinstance(item.get("attribute"), str):
                raise AnswerError("schema", f'\'{name}\'[{position}] must be {{"attribute": str, "evidence": str}}')
            reason = item.get("evidence")
            if reason is not None and not isinstance(reason, str):
                raise AnswerError("schema", f"'{name}'[{position}].evidence must be a string")
            item = item["attribute"]
        if not isinstance(item, str):
            raise AnswerError("schema", f"'{name}'[{position}] must be a string or an object")
        try:
            phrase = normalize_attribute(item)
        except InvalidTextError as error:
            raise AnswerError("schema", f"'{name}'[{position}]: {error}") from None
        if len(phrase.split()) > MAX_PHRASE_WORDS:
            raise AnswerError("schema", f"'{name}'[{position}] has more than {MAX_PHRASE_WORDS} words: {phrase!r}")
        if phrase.lower() in seen:
            continue
        seen.add(phrase.lower())
        phrases.append(phrase)
        if reason:
            evidence[phrase] = " ".join(reason.split())
    return tuple(phrases)


def target_answer(record: PairRecord, *, evidence: dict[str, str] | None = None) -> str:
    """The stage-2 training target for a labelled pair: compact JSON, with evidence objects when given."""

    def items(phrases: tuple[str, ...]) -> list[Any]:
        if evidence is None:
            return list(phrases)
        return [{"attribute": phrase, "evidence": evidence.get(phrase, "")} for phrase in phrases]

    obj = {
        "caption_x": record.caption_x,
        "caption_y": record.caption_y,
        "positive": items(record.positive),
        "negative": items(record.negative),
    }
    return json.dumps(obj, ensure_ascii=False, separators=(", ", ": "))
