"""Each benchmark parser on generated data of its format, and the malformed-annotation errors."""
import json
import shutil

import pytest

from datasets import BENCHMARKS, PARSERS
from datasets.base import DataError
from tests.messy_data import make_dataset, read_annotation, write_annotation

NAMES = list(BENCHMARKS)


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    root = tmp_path_factory.mktemp("raw")
    return {name: make_dataset(root, name, ids=20, images_per_id=3) for name in NAMES}


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


@pytest.mark.parametrize("name", NAMES)
def test_parser_reads_every_record_in_common_form(generated, name):
    parsed = PARSERS[name](generated[name])
    _, raw = read_annotation(generated[name])
    bench = BENCHMARKS[name]
    assert len(parsed.records) == len(raw) == 60
    assert parsed.image_root == generated[name] / "imgs"
    for record, source in zip(parsed.records, raw):
        assert record.split == source["split"] and record.pid == source["id"]
        assert record.image == source[bench.image_key]
        assert list(record.captions) == source["captions"]
        assert (parsed.image_root / record.image).is_file()
    assert {r.split for r in parsed.records} == set(bench.splits)


def test_icfg_accepts_both_annotation_spellings(generated, tmp_path):
    copy = _copy(generated["ICFG-PEDES"], tmp_path / "ICFG-PEDES")
    (copy / "ICFG_PEDES.json").rename(copy / "ICFG-PEDES.json")
    parsed = PARSERS["ICFG-PEDES"](copy)
    assert parsed.annotation.name == "ICFG-PEDES.json" and len(parsed.records) == 60


def test_string_ids_are_read_as_integers(generated, tmp_path):
    copy = _copy(generated["RSTPReid"], tmp_path / "RSTPReid")
    path, records = read_annotation(copy)
    expected = [r["id"] for r in records]
    for r in records:
        r["id"] = f"{r['id']:05d}"
    write_annotation(path, records)
    parsed = PARSERS["RSTPReid"](copy)
    assert [r.pid for r in parsed.records] == expected and parsed.string_ids == len(records)


def test_json_syntax_error_names_file_line_and_column(generated, tmp_path):
    copy = _copy(generated["CUHK-PEDES"], tmp_path / "CUHK-PEDES")
    path = copy / "reid_raw.json"
    lines = path.read_text().splitlines()
    lines[4] = lines[4].replace('"split": ', '"split" ', 1)  # drop a colon on line 5
    column = lines[4].index('"split" ') + len('"split" ') + 1
    path.write_text("\n".join(lines))
    with pytest.raises(DataError) as err:
        PARSERS["CUHK-PEDES"](copy)
    assert str(path) in str(err.value) and f"line 5, column {column}" in str(err.value)


@pytest.mark.parametrize("mutate, expected", [
    (lambda r: r[3].pop("captions"), "record 3 lacks key 'captions'"),
    (lambda r: r[7].pop("id"), "record 7 lacks key 'id'"),
    (lambda r: r[2].update(split="query"), "record 2 has split 'query'"),
    (lambda r: r[5].update(id="p17"), "record 5 key 'id' is 'p17'"),
    (lambda r: r[1].update(captions=[1, 2]), "record 1 key 'captions' is not a list of strings"),
    (lambda r: r[0].update(img_path="../../etc/passwd"), "record 0 key 'img_path'"),
    (lambda r: r[0].update(img_path=" ../x.jpg"), "record 0 key 'img_path' (' ../x.jpg') leaves imgs/ through '..'"),
    (lambda r: r[0].update(img_path="\tok/..\\..\\x.jpg"), "leaves imgs/ through '..'"),
    (lambda r: r[6].update(img_path=" /etc/passwd"), "record 6 key 'img_path' (' /etc/passwd') is an absolute path"),
    (lambda r: r[6].update(img_path="C:\\imgs\\x.jpg"), "record 6 key 'img_path' ('C:\\\\imgs\\\\x.jpg') is an absolute"),
    (lambda r: r[5].update(id="1\u00b2"), "record 5 key 'id' is '1\u00b2', not an integer"),
    (lambda r: r[5].update(id="\u0661\u0662"), "record 5 key 'id' is '\u0661\u0662', not an integer"),
    (lambda r: r[1].update(captions="a man in a red coat"), "record 1 key 'captions' is a string, not a list"),
    (lambda r: r.__setitem__(4, ["not", "an", "object"]), "record 4 is a list"),
    (lambda r: r[3].update(img_path="a/b\x00.jpg"), "record 3 key 'img_path' ('a/b\\x00.jpg') holds a NUL byte"),
    (lambda r: r[5].update(id=2 ** 63), "record 5 key 'id' is 9223372036854775808, outside the 64-bit range"),
    (lambda r: r[5].update(id="9" * 5000), "record 5 key 'id' is 99999999999999999999… (5000 digits), outside"),  # int() stops at 4300
])
def test_malformed_records_are_named_by_index_and_key(generated, tmp_path, mutate, expected):
    copy = _copy(generated["RSTPReid"], tmp_path / "RSTPReid")
    path, records = read_annotation(copy)
    mutate(records)
    write_annotation(path, records)
    with pytest.raises(DataError, match="malformed record") as err:
        PARSERS["RSTPReid"](copy)
    assert expected in str(err.value) and str(path) in str(err.value)


def test_all_malformed_records_are_reported_at_once(generated, tmp_path):
    copy = _copy(generated["CUHK-PEDES"], tmp_path / "CUHK-PEDES")
    path, records = read_annotation(copy)
    for i in range(12):
        records[i].pop("file_path")
    write_annotation(path, records)
    with pytest.raises(DataError) as err:
        PARSERS["CUHK-PEDES"](copy)
    assert "12 malformed record(s)" in str(err.value) and "(and 2 more)" in str(err.value)


def test_missing_annotation_and_non_list_are_clear(generated, tmp_path):
    copy = _copy(generated["ICFG-PEDES"], tmp_path / "ICFG-PEDES")
    (copy / "ICFG_PEDES.json").write_text(json.dumps({"records": []}))
    with pytest.raises(DataError, match="expected a JSON list"):
        PARSERS["ICFG-PEDES"](copy)
    (copy / "ICFG_PEDES.json").unlink()
    with pytest.raises(DataError, match="ICFG_PEDES.json or ICFG-PEDES.json"):
        PARSERS["ICFG-PEDES"](copy)


def test_image_paths_are_used_in_the_normalised_form_that_was_checked(generated, tmp_path):
    copy = _copy(generated["RSTPReid"], tmp_path / "RSTPReid")
    path, records = read_annotation(copy)
    expected = records[0]["img_path"]
    records[0]["img_path"] = f"  ./{expected}\t"
    write_annotation(path, records)
    assert PARSERS["RSTPReid"](copy).records[0].image == expected


@pytest.mark.parametrize("spot, escape, expected", [
    ("img_path", "\\ud800", "record 2 key 'img_path' ('\\ud800") ,
    ("captions", "\\udfff", "record 2 key 'captions' holds an unpaired surrogate"),
])
def test_unpaired_surrogate_escapes_are_named(generated, tmp_path, spot, escape, expected):
    """JSON can spell a lone UTF-16 surrogate (\\ud800), which no file name or UTF-8 text can hold."""
    copy = _copy(generated["RSTPReid"], tmp_path / "RSTPReid")
    path, records = read_annotation(copy)
    records[2][spot] = "SPOT.jpg" if spot == "img_path" else ["SPOT a man"]
    write_annotation(path, records)
    path.write_text(path.read_text().replace("SPOT", escape))
    with pytest.raises(DataError, match="malformed record") as err:
        PARSERS["RSTPReid"](copy)
    assert expected in str(err.value) and str(path) in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("text", ["[" * 100_000 + "]" * 100_000, '[{"split": ' + "[" * 100_000 + "]" * 100_000 + "}]"])
def test_deeply_nested_json_is_a_data_error_naming_the_file(generated, tmp_path, text):
    copy = _copy(generated["CUHK-PEDES"], tmp_path / "CUHK-PEDES")
    (copy / "reid_raw.json").write_text(text)
    with pytest.raises(DataError, match="nested") as err:
        PARSERS["CUHK-PEDES"](copy)
    assert str(copy / "reid_raw.json") in str(err.value)


def test_a_number_too_long_to_read_is_a_data_error_naming_the_file(generated, tmp_path):
    copy = _copy(generated["CUHK-PEDES"], tmp_path / "CUHK-PEDES")
    path, records = read_annotation(copy)
    records[1]["id"] = 0
    write_annotation(path, records)
    path.write_text(path.read_text().replace('"id": 0', '"id": ' + "7" * 5000, 1))
    with pytest.raises(DataError, match="digits") as err:
        PARSERS["CUHK-PEDES"](copy)
    assert str(path) in str(err.value) and len(str(err.value)) < 600
