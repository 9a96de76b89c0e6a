"""The pair dataset format: validation of every line, write/load round trip, and the torch Dataset."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image
from torch.utils.data import DataLoader

from training.data.pairs import (
    PAIRS_FILENAME,
    PairDataset,
    PairFormatError,
    PairRecord,
    collate_pairs,
    load_pairs,
    records_with_both,
    write_pairs,
)


def save_image(directory: Path, relative: str, color: tuple[int, int, int]) -> None:
    path = directory / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (16, 12), color).save(path)


def good_line(**overrides) -> dict:
    line = {
        "image_x": "img/a.png",
        "image_y": "img/b.png",
        "caption_x": "a red star",
        "caption_y": "a blue star",
        "positive": ["object category"],
        "negative": ["colour"],
    }
    line.update(overrides)
    return line


@pytest.fixture()
def dataset_dir(tmp_path: Path) -> Path:
    save_image(tmp_path, "img/a.png", (255, 0, 0))
    save_image(tmp_path, "img/b.png", (0, 0, 255))
    (tmp_path / "img" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not a png")
    return tmp_path


def write_lines(directory: Path, lines: list) -> None:
    text = "".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines)
    (directory / PAIRS_FILENAME).write_text(text, encoding="utf-8")


def test_each_kind_of_bad_line_is_reported_with_its_number_and_skipped(dataset_dir: Path):
    outside = dataset_dir.parent / f"{dataset_dir.name}-outside.png"
    Image.new("RGB", (4, 4)).save(outside)
    (dataset_dir / "img" / "link.png").symlink_to(outside)
    lines = [
        good_line(id="first"),  # 1
        '{"image_x": "img/a.png", ',  # 2: torn JSON
        {key: value for key, value in good_line().items() if key != "caption_y"},  # 3
        good_line(positive="lighting"),  # 4: a string, not a list
        good_line(positive=[], negative=[]),  # 5
        good_line(negative=["colour", " \t "]),  # 6
        good_line(image_y="img/missing.png"),  # 7
        good_line(image_x="img/broken.png"),  # 8
        good_line(image_x="../outside.png"),  # 9
        good_line(image_y="/etc/passwd"),  # 10
        "",  # 11: blank lines are ignored, not reported
        good_line(id="second", positive=[], negative=["  art   style "]),  # 12
        good_line(postive=["typo"]),  # 13
        good_line(positive_factors=["category", "color"]),  # 14: two names for one phrase
        good_line(positive=["colour"], negative=["colour"]),  # 15
        good_line(image_x="img/link.png"),  # 16: a symlink out of the directory
        "[1, 2]",  # 17
        good_line(positive=["light", 3]),  # 18
        good_line(caption_x=None),  # 19
        good_line(factors_x={"color": 1}),  # 20
    ]
    write_lines(dataset_dir, lines)

    report = load_pairs(dataset_dir)

    assert [record.id for record in report.records] == ["first", "second"]
    assert report.records[1].negative == ("art style",)
    reasons = {bad.line_number: bad.reason for bad in report.bad_lines}
    expected = {
        2: "bad JSON",
        3: "missing key(s) 'caption_y'",
        4: "'positive' must be a list of strings, got str",
        5: "both empty",
        6: "'negative'[1]: attribute text is empty",
        7: "'img/missing.png' does not exist",
        8: "'img/broken.png' is not a readable image",
        9: "leaves the dataset directory",
        10: "leaves the dataset directory",
        13: "unknown key(s) 'postive'",
        14: "'positive_factors' has 2 entries but 'positive' has 1",
        15: "'colour' is listed as both positive and negative",
        16: "resolves outside the dataset directory",
        17: "must hold a JSON object, got list",
        18: "'positive'[1] must be a string, got int",
        19: "'caption_x' must be a string, got NoneType",
        20: "'factors_x'['color'] must be a string, got int",
    }
    assert sorted(reasons) == sorted(expected)
    for line_number, fragment in expected.items():
        assert fragment in reasons[line_number], (line_number, reasons[line_number])
    assert report.num_bad == len(expected)
    assert "kept 2 pairs, skipped 17 lines" in report.summary()


def test_loader_without_verification_only_checks_existence(dataset_dir: Path):
    write_lines(dataset_dir, [good_line(image_x="img/broken.png"), good_line(image_x="img/gone.png")])

    report = load_pairs(dataset_dir, verify_images=False)

    assert len(report.records) == 1
    assert [bad.line_number for bad in report.bad_lines] == [2]


def test_missing_pairs_file_is_an_error_that_names_it(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match=PAIRS_FILENAME):
        load_pairs(tmp_path)


def full_record(index: int) -> PairRecord:
    return PairRecord(
        image_x="img/a.png",
        image_y="img/b.png",
        caption_x=f"caption x {index}",
        caption_y="caption y – with ünïcode",
        positive=("object category", " the  light "),
        negative=("colour",),
        id=f"pair-{index}",
        source="test",
        factors_x={"color": "red", "category": "star"},
        factors_y={"color": "blue", "category": "star"},
        positive_factors=("category", "lighting"),
        negative_factors=("color",),
        meta={"size": 16, "nested": {"ok": [1, 2]}},
    )


def test_write_then_load_round_trips_every_field(dataset_dir: Path):
    records = [full_record(0), full_record(1), PairRecord("img/b.png", "img/a.png", "", "", (), ("layout",))]

    assert write_pairs(dataset_dir, records, append=False) == 3
    loaded = load_pairs(dataset_dir)

    assert loaded.bad_lines == []
    assert loaded.records == records
    assert loaded.records[0].positive == ("object category", "the light")


def test_append_adds_lines_and_survives_a_torn_last_line(dataset_dir: Path):
    write_pairs(dataset_dir, [full_record(0)])
    with (dataset_dir / PAIRS_FILENAME).open("a", encoding="utf-8") as handle:
        handle.write('{"image_x": "img/a.png", "imag')  # a writer that crashed mid-line
    write_pairs(dataset_dir, [full_record(1), full_record(2)])

    report = load_pairs(dataset_dir)

    assert [record.id for record in report.records] == ["pair-0", "pair-1", "pair-2"]
    assert [bad.line_number for bad in report.bad_lines] == [2]


def test_replace_overwrites_and_leaves_no_temporary_file(dataset_dir: Path):
    write_pairs(dataset_dir, [full_record(0), full_record(1)])
    write_pairs(dataset_dir, [full_record(7)], append=False)

    assert [record.id for record in load_pairs(dataset_dir).records] == ["pair-7"]
    assert sorted(path.name for path in dataset_dir.iterdir()) == ["img", PAIRS_FILENAME]


def test_records_are_validated_when_built_in_code():
    with pytest.raises(PairFormatError, match="leaves the dataset directory"):
        PairRecord("..\\evil.png", "b.png", "", "", ("a",), ())
    with pytest.raises(PairFormatError, match="listed twice"):
        PairRecord("a.png", "b.png", "", "", ("light", "light "), ())


def make_dataset(directory: Path, count: int, **kwargs) -> PairDataset:
    records = [
        PairRecord(
            "img/a.png",
            "img/b.png",
            f"x {index}",
            f"y {index}",
            tuple(f"shared {index}-{k}" for k in range(4)),
            tuple(f"differs {index}-{k}" for k in range(4)),
            id=str(index),
        )
        for index in range(count)
    ]
    write_pairs(directory, records, append=False)
    return PairDataset.from_directory(directory, **kwargs)


def test_dataset_returns_images_captions_and_one_sampled_attribute_per_side(dataset_dir: Path):
    dataset = make_dataset(dataset_dir, 3, seed=1)

    sample = dataset[2]

    assert len(dataset) == 3
    assert sample.image_x.mode == "RGB" and sample.image_x.getpixel((0, 0)) == (255, 0, 0)
    assert sample.image_y.getpixel((0, 0)) == (0, 0, 255)
    assert (sample.caption_x, sample.caption_y) == ("x 2", "y 2")
    assert sample.positive_attribute in sample.positive
    assert sample.negative_attribute in sample.negative


def test_attribute_sampling_is_seeded_per_item_and_epoch(dataset_dir: Path):
    first = make_dataset(dataset_dir, 40, seed=5)
    again = PairDataset(dataset_dir, first.records, seed=5)
    other_seed = PairDataset(dataset_dir, first.records, seed=6)

    draws = [first.sample_attributes(index) for index in range(40)]

    assert draws == [again.sample_attributes(index) for index in range(40)]
    assert draws == [(first[index].positive_attribute, first[index].negative_attribute) for index in range(40)]
    assert draws != [other_seed.sample_attributes(index) for index in range(40)]
    first.set_epoch(1)
    assert draws != [first.sample_attributes(index) for index in range(40)]
    assert draws == [first.sample_attributes(index, epoch=0) for index in range(40)]
    # Every phrase gets drawn sometimes: the choice is spread over the list, not stuck on its first entry.
    seen = {first.sample_attributes(0, epoch=epoch)[0] for epoch in range(60)}
    assert seen == set(first.records[0].positive)


def test_missing_side_gives_none_and_records_with_both_filters_it(dataset_dir: Path):
    records = [PairRecord("img/a.png", "img/b.png", "", "", (), ("pose",)), full_record(0)]
    dataset = PairDataset(dataset_dir, records)

    assert dataset.sample_attributes(0) == (None, "pose")
    assert records_with_both(records) == [records[1]]


def test_transforms_and_collate_work_with_a_dataloader(dataset_dir: Path):
    def swap(image_x, image_y):
        return image_y, image_x

    dataset = make_dataset(dataset_dir, 5, transform=lambda image: image.getpixel((0, 0)), pair_transform=swap)
    batches = list(DataLoader(dataset, batch_size=2, collate_fn=collate_pairs))

    assert [len(batch["index"]) for batch in batches] == [2, 2, 1]
    assert batches[0]["image_x"] == [(0, 0, 255), (0, 0, 255)]  # swapped by pair_transform, then transformed
    assert batches[0]["caption_x"] == ["x 0", "x 1"]
    assert batches[2]["positive_attribute"] == [dataset.sample_attributes(4)[0]]
    assert dataset.load_image("img/a.png").getpixel((0, 0)) == (255, 0, 0)


def test_from_directory_warns_about_skipped_lines(dataset_dir: Path):
    write_lines(dataset_dir, [good_line(), "not json"])

    with pytest.warns(UserWarning, match="kept 1 pairs, skipped 1 lines"):
        dataset = PairDataset.from_directory(dataset_dir)

    assert len(dataset) == 1
