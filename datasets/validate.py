"""Record-level checks before anything is written: caption cleaning, empty captions, duplicates."""
from __future__ import annotations

import html
import re
from dataclasses import dataclass, field

from datasets.base import Record

_SPACE = re.compile(r"\s+")


def clean_caption(text: str) -> str:
    """Unescape HTML entities and collapse whitespace (newlines, tabs, doubled spaces) to one space."""
    # Twice: some copies were escaped twice ("&amp;quot;").
    return _SPACE.sub(" ", html.unescape(html.unescape(text))).strip()


@dataclass
class RecordReport:
    """What `clean_records` repaired (dropped, counted) and what it cannot repair (errors)."""

    empty_captions: list[int] = field(default_factory=list)  # record index, once per dropped caption
    changed_captions: int = 0  # captions altered by unescaping / whitespace collapsing
    captionless: list[int] = field(default_factory=list)  # records dropped: no caption left
    exact_duplicates: list[tuple[int, int]] = field(default_factory=list)  # (dropped, first) indices
    errors: list[str] = field(default_factory=list)


def clean_records(records: list[Record]) -> tuple[list[Record], RecordReport]:
    """Clean captions (each kept one's raw string beside it), drop empty ones and exact duplicate records (equal once
    cleaned: the first is kept); conflicting duplicates are errors."""
    report = RecordReport()
    kept: list[Record] = []
    first_seen: dict[str, tuple[int, Record]] = {}
    for index, record in enumerate(records):
        captions, raw = [], []
        for caption in record.captions:
            cleaned = clean_caption(caption)
            report.changed_captions += bool(cleaned) and cleaned != caption
            if cleaned:  # kept or dropped on its cleaned text; a kept caption's raw string stays as the file has it
                captions.append(cleaned)
                raw.append(caption)
            else:
                report.empty_captions.append(index)
        record = Record(record.split, record.pid, record.image, tuple(captions), tuple(raw))
        if record.image in first_seen:
            first_index, first = first_seen[record.image]
            if first == record:
                report.exact_duplicates.append((index, first_index))
            else:
                report.errors.append(
                    f"records {first_index} and {index} both use image {record.image!r} but differ "
                    f"(split {first.split}/{record.split}, id {first.pid}/{record.pid})"
                )
            continue
        first_seen[record.image] = (index, record)
        if not captions:
            report.captionless.append(index)
            continue
        kept.append(record)
    return kept, report


def describe_indices(indices: list[int], limit: int = 10) -> str:
    """Format record indices as '3, 17, 42 (and 5 more)'."""
    shown = ", ".join(str(i) for i in indices[:limit])
    return shown + (f" (and {len(indices) - limit} more)" if len(indices) > limit else "")
