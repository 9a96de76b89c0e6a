"""The pair dataset on disk: a directory holding `pairs.jsonl` with image files beside it.

One JSON object per line (UTF-8). Required keys:

    image_x, image_y      relative POSIX paths of the two images, inside the dataset directory
    caption_x, caption_y  one caption per image (strings, may be empty)
    positive              attribute phrases the two images share (list of strings)
    negative              attribute phrases that tell them apart (list of strings)

Optional keys (any other key makes the line invalid, so a typo such as "postive" is caught):

    id                    a string unique within the dataset (the procedural generator writes "proc-<seed>-<index>")
    source                where the pair came from, e.g. "procedural", "annotator-stage1"
    factors_x, factors_y  {factor name: value} of each image when the factors are known (procedural pairs);
                          evaluation uses them to decide which gallery images share which factor
    positive_factors      the factor name behind each positive phrase, same length and order as `positive`
    negative_factors      the same for `negative`
    meta                  a JSON object for anything else (the generator stores its render size and jitter seeds)

Attribute phrases are whitespace-normalised (stripped, inner runs collapsed to one space) but keep their
case. A pair needs at least one positive or one negative phrase; a phrase may not be both.
"""

from __future__ import annotations

import json
import os
import random
import tempfile
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from PIL import Image
from torch.utils.data import Dataset

from omniattr.domain import InvalidTextError, normalize_attribute

PAIRS_FILENAME = "pairs.jsonl"
REQUIRED_KEYS = ("image_x", "image_y", "caption_x", "caption_y", "positive", "negative")
OPTIONAL_KEYS = ("id", "source", "factors_x", "factors_y", "positive_factors", "negative_factors", "meta")


class PairFormatError(ValueError):
    """A pair record that breaks the format; the message says which field and why."""


@dataclass(frozen=True)
class PairRecord:
    """One training pair: two images, their captions, shared (positive) and differing (negative) attributes."""

    image_x: str
    image_y: str
    caption_x: str
    caption_y: str
    positive: tuple[str, ...]
    negative: tuple[str, ...]
    id: str | None = None
    source: str | None = None
    factors_x: dict[str, str] | None = None
    factors_y: dict[str, str] | None = None
    positive_factors: tuple[str, ...] | None = None
    negative_factors: tuple[str, ...] | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("image_x", "image_y"):
            _check_relative_path(name, getattr(self, name))
        for name in ("caption_x", "caption_y"):
            if not isinstance(getattr(self, name), str):
                raise PairFormatError(f"'{name}' must be a string, got {type(getattr(self, name)).__name__}")
        for name in ("id", "source"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                raise PairFormatError(f"'{name}' must be a string, got {type(value).__name__}")
        positive = _attribute_list("positive", self.positive)
        negative = _attribute_list("negative", self.negative)
        if not positive and not negative:
            raise PairFormatError("'positive' and 'negative' are both empty; a pair needs at least one attribute")
        both = sorted(set(positive) & set(negative))
        if both:
            raise PairFormatError(f"attribute {both[0]!r} is listed as both positive and negative")
        if len(set(positive)) != len(positive) or len(set(negative)) != len(negative):
            raise PairFormatError("an attribute is listed twice in 'positive' or 'negative'")
        object.__setattr__(self, "positive", positive)
        object.__setattr__(self, "negative", negative)
        for name in ("factors_x", "factors_y"):
            _check_factor_values(name, getattr(self, name))
        for name, phrases in (("positive_factors", positive), ("negative_factors", negative)):
            names = getattr(self, name)
            if names is None:
                continue
            if isinstance(names, str) or not isinstance(names, Sequence):
                raise PairFormatError(f"'{name}' must be a list of strings, got {type(names).__name__}")
            if not all(isinstance(item, str) and item for item in names):
                raise PairFormatError(f"'{name}' must hold non-empty strings only")
            if len(names) != len(phrases):
                raise PairFormatError(
                    f"'{name}' has {len(names)} entries but '{name.split('_')[0]}' has {len(phrases)}; "
                    "they must line up one to one"
                )
            object.__setattr__(self, name, tuple(names))
        if not isinstance(self.meta, dict):
            raise PairFormatError(f"'meta' must be a JSON object, got {type(self.meta).__name__}")

    @classmethod
    def from_json(cls, obj: Any) -> PairRecord:
        """A record from one decoded JSONL line; PairFormatError says what is wrong with it."""
        if not isinstance(obj, dict):
            raise PairFormatError(f"a line must hold a JSON object, got {type(obj).__name__}")
        missing = [key for key in REQUIRED_KEYS if key not in obj]
        if missing:
            raise PairFormatError(f"missing key(s) {', '.join(repr(key) for key in missing)}")
        unknown = sorted(key for key in obj if key not in REQUIRED_KEYS and key not in OPTIONAL_KEYS)
        if unknown:
            raise PairFormatError(
                f"unknown key(s) {', '.join(repr(key) for key in unknown)}; known optional keys are "
                f"{', '.join(OPTIONAL_KEYS)} (put anything else under 'meta')"
            )
        return cls(**{key: obj[key] for key in obj if key != "meta"}, meta=obj.get("meta", {}))

    def to_json(self) -> dict[str, Any]:
        """The record as a JSON-ready dict, optional keys only when set."""
        obj: dict[str, Any] = {
            "image_x": self.image_x,
            "image_y": self.image_y,
            "caption_x": self.caption_x,
            "caption_y": self.caption_y,
            "positive": list(self.positive),
            "negative": list(self.negative),
        }
        for key in ("id", "source", "factors_x", "factors_y"):
            if getattr(self, key) is not None:
                obj[key] = getattr(self, key)
        for key in ("positive_factors", "negative_factors"):
            if getattr(self, key) is not None:
                obj[key] = list(getattr(self, key))
        if self.meta:
            obj["meta"] = self.meta
        return obj


def _check_relative_path(name: str, value: Any) -> None:
    if not isinstance(value, str):
        raise PairFormatError(f"'{name}' must be a string path, got {type(value).__name__}")
    if not value.strip():
        raise PairFormatError(f"'{name}' is empty")
    path = PurePosixPath(value)
    if path.is_absolute() or "\\" in value or ".." in path.parts or (len(value) > 1 and value[1] == ":"):
        raise PairFormatError(
            f"'{name}' = {value!r} leaves the dataset directory; use a relative POSIX path without '..'"
        )


def _attribute_list(name: str, value: Any) -> tuple[str, ...]:
    if isinstance(value, str) or not isinstance(value, Sequence):
        raise PairFormatError(f"'{name}' must be a list of strings, got {type(value).__name__}")
    phrases = []
    for position, item in enumerate(value):
        if not isinstance(item, str):
            raise PairFormatError(f"'{name}'[{position}] must be a string, got {type(item).__name__}")
        try:
            phrases.append(normalize_attribute(item))
        except InvalidTextError as error:
            raise PairFormatError(f"'{name}'[{position}]: {error}") from None
    return tuple(phrases)


def _check_factor_values(name: str, value: Any) -> None:
    if value is None:
        return
    if not isinstance(value, dict):
        raise PairFormatError(f"'{name}' must be an object of factor name -> value, got {type(value).__name__}")
    for key, item in value.items():
        if not isinstance(item, str):
            raise PairFormatError(f"'{name}'[{key!r}] must be a string, got {type(item).__name__}")


@dataclass(frozen=True)
class BadLine:
    """A line of pairs.jsonl that was skipped, with its 1-based line number and the reason."""

    line_number: int
    reason: str


@dataclass
class PairLoadReport:
    """What load_pairs kept and what it skipped."""

    directory: Path
    records: list[PairRecord]
    bad_lines: list[BadLine]

    @property
    def num_bad(self) -> int:
        """How many lines were skipped."""
        return len(self.bad_lines)

    def summary(self) -> str:
        """One line for logs: kept and skipped counts and the first few reasons."""
        text = f"{self.directory / PAIRS_FILENAME}: kept {len(self.records)} pairs, skipped {self.num_bad} lines"
        if self.bad_lines:
            shown = "; ".join(f"line {bad.line_number}: {bad.reason}" for bad in self.bad_lines[:3])
            text += f" ({shown}{'; ...' if self.num_bad > 3 else ''})"
        return text


def load_pairs(directory: str | Path, *, verify_images: bool = True) -> PairLoadReport:
    """Read and validate DIR/pairs.jsonl; invalid lines are reported with line number and reason, never fatal.

    With verify_images, every referenced image is opened and verified once (a missing or undecodable file
    makes its lines invalid); without it only existence is checked, which is much faster on big datasets.
    Blank lines are ignored.
    """
    directory = Path(directory)
    pairs_path = directory / PAIRS_FILENAME
    if not pairs_path.is_file():
        raise FileNotFoundError(f"{pairs_path} does not exist; a pair dataset is a directory with {PAIRS_FILENAME}")
    root = directory.resolve()
    image_problems: dict[str, str | None] = {}
    records: list[PairRecord] = []
    bad_lines: list[BadLine] = []
    with pairs_path.open("rb") as handle:
        for line_number, raw in enumerate(handle, start=1):
            if not raw.strip():
                continue
            try:
                obj = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError as error:
                bad_lines.append(BadLine(line_number, f"not UTF-8 ({error.reason})"))
                continue
            except json.JSONDecodeError as error:
                bad_lines.append(BadLine(line_number, f"bad JSON: {error.msg} at column {error.colno}"))
                continue
            try:
                record = PairRecord.from_json(obj)
            except PairFormatError as error:
                bad_lines.append(BadLine(line_number, str(error)))
                continue
            problem = None
            for key in ("image_x", "image_y"):
                relative = getattr(record, key)
                if relative not in image_problems:
                    image_problems[relative] = _image_problem(root, relative, verify_images)
                if image_problems[relative] is not None:
                    problem = f"'{key}': {image_problems[relative]}"
                    break
            if problem is not None:
                bad_lines.append(BadLine(line_number, problem))
                continue
            records.append(record)
    return PairLoadReport(directory=directory, records=records, bad_lines=bad_lines)


def _image_problem(root: Path, relative: str, verify: bool) -> str | None:
    """Why the image at root/relative cannot be used, or None when it can."""
    path = (root / relative).resolve()
    if not path.is_relative_to(root):
        return f"{relative!r} resolves outside the dataset directory (a symlink?)"
    if not path.is_file():
        return f"{relative!r} does not exist"
    if verify:
        try:
            with Image.open(path) as image:
                image.verify()
        except Exception as error:  # noqa: BLE001 - PIL raises many types for a corrupt file; all mean "unreadable"
            return f"{relative!r} is not a readable image ({error.__class__.__name__}: {error})"
    return None


def write_pairs(directory: str | Path, records: Iterable[PairRecord], *, append: bool = True) -> int:
    """Write records to DIR/pairs.jsonl and return how many; appends by default, else replaces atomically.

    An append is one write of whole lines, flushed and fsynced, so a crash leaves at most one torn last line,
    which load_pairs then skips; a torn line left by an earlier crash is ended first so the new lines stay
    intact. A replace writes a temporary file beside pairs.jsonl and renames it over the old one.
    Images are not checked here: write them before their records, and load_pairs checks them.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps(record.to_json(), ensure_ascii=False, sort_keys=True) + "\n" for record in records]
    payload = "".join(lines).encode("utf-8")
    pairs_path = directory / PAIRS_FILENAME
    if append:
        with pairs_path.open("ab") as handle:
            if handle.tell() > 0 and _last_byte(pairs_path) != b"\n":
                payload = b"\n" + payload
            handle.write(payload)
            handle.flush()
            os.fsync(handle.fileno())
    else:
        descriptor, temporary = tempfile.mkstemp(prefix=".pairs-", suffix=".tmp", dir=directory)
        try:
            with os.fdopen(descriptor, "wb") as handle:
                handle.write(payload)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(temporary, pairs_path)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise
    return len(lines)


def _last_byte(path: Path) -> bytes:
    with path.open("rb") as handle:
        handle.seek(-1, os.SEEK_END)
        return handle.read(1)


@dataclass
class PairSample:
    """One item of PairDataset: both images (after any transform), captions, attributes and the sampled a+/a-."""

    index: int
    image_x: Any
    image_y: Any
    caption_x: str
    caption_y: str
    positive: tuple[str, ...]
    negative: tuple[str, ...]
    positive_attribute: str | None
    negative_attribute: str | None
    record: PairRecord


class PairDataset(Dataset):
    """A torch Dataset over loaded pair records: PIL images, captions, attributes and one sampled a+ and a-.

    The a+/a- choice for item i depends only on (seed, epoch, i), so it is the same in every DataLoader worker
    and reproducible; call set_epoch each epoch to draw new ones. A pair without positives (or negatives) gets
    None for that side: filter with `records_with_both` when every item needs both.

    `transform` is applied to each image separately (e.g. a torchvision transform); `pair_transform` gets both
    PIL images and returns both, for augmentations that must match across the pair. Augmentations that change
    colour, framing or orientation change attributes too: only use ones that keep the positives true.
    """

    def __init__(
        self,
        directory: str | Path,
        records: Sequence[PairRecord],
        *,
        seed: int = 0,
        transform: Callable[[Image.Image], Any] | None = None,
        pair_transform: Callable[[Image.Image, Image.Image], tuple[Image.Image, Image.Image]] | None = None,
    ) -> None:
        self.directory = Path(directory)
        self.records = list(records)
        self.seed = seed
        self.epoch = 0
        self.transform = transform
        self.pair_transform = pair_transform

    @classmethod
    def from_directory(cls, directory: str | Path, **kwargs: Any) -> PairDataset:
        """A dataset over the valid lines of DIR/pairs.jsonl (load_pairs without image verification).

        Skipped lines are reported with a warning; call load_pairs yourself to inspect them.
        """
        report = load_pairs(directory, verify_images=False)
        if report.bad_lines:
            warnings.warn(report.summary(), stacklevel=2)
        return cls(directory, report.records, **kwargs)

    def set_epoch(self, epoch: int) -> None:
        """Choose which epoch's a+/a- draw __getitem__ returns."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.records)

    def sample_attributes(self, index: int, epoch: int | None = None) -> tuple[str | None, str | None]:
        """The (a+, a-) drawn for item `index` in `epoch` (default: the current one), uniformly from each list."""
        record = self.records[index]
        rng = random.Random(f"{self.seed}:{self.epoch if epoch is None else epoch}:{index}")
        positive = rng.choice(record.positive) if record.positive else None
        negative = rng.choice(record.negative) if record.negative else None
        return positive, negative

    def load_image(self, relative: str) -> Image.Image:
        """The image at a record path as 8-bit RGB."""
        with Image.open(self.directory / relative) as image:
            return image.convert("RGB")

    def __getitem__(self, index: int) -> PairSample:
        record = self.records[index]
        image_x = self.load_image(record.image_x)
        image_y = self.load_image(record.image_y)
        if self.pair_transform is not None:
            image_x, image_y = self.pair_transform(image_x, image_y)
        if self.transform is not None:
            image_x, image_y = self.transform(image_x), self.transform(image_y)
        positive_attribute, negative_attribute = self.sample_attributes(index)
        return PairSample(
            index=index,
            image_x=image_x,
            image_y=image_y,
            caption_x=record.caption_x,
            caption_y=record.caption_y,
            positive=record.positive,
            negative=record.negative,
            positive_attribute=positive_attribute,
            negative_attribute=negative_attribute,
            record=record,
        )


def records_with_both(records: Iterable[PairRecord]) -> list[PairRecord]:
    """The records that have at least one positive and one negative attribute (what L_con needs)."""
    return [record for record in records if record.positive and record.negative]


def collate_pairs(samples: Sequence[PairSample]) -> dict[str, list[Any]]:
    """A DataLoader collate_fn that keeps PIL images and strings as lists (the default one cannot stack them)."""
    return {
        name: [getattr(sample, name) for sample in samples]
        for name in (
            "index",
            "image_x",
            "image_y",
            "caption_x",
            "caption_y",
            "positive",
            "negative",
            "positive_attribute",
            "negative_attribute",
        )
    }
