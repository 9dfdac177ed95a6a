"""Dataset list files: which videos a run reads, with their labels and per-video options."""
from __future__ import annotations

import csv
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace

FORMATS = ("auto", "release", "plain", "csv")
CSV_COLUMNS = ("path", "label", "source", "flip", "start", "end", "total_time")
NO_FLIP_SOURCES = ("ssv2",)


@dataclass(frozen=True)
class VideoEntry:
    """One video of a dataset list.

    ``path``: absolute, or already joined to the data root. ``label``: integer class (0
    when the list has none). ``flip``: whether horizontal flipping is allowed for this
    video (False for Something-Something V2, whose labels depend on left/right).
    ``start_s`` / ``end_s``: optional segment of the video in seconds to sample from.
    ``total_s``: the video's length in seconds as the list states it (None: take it from
    the file); it turns the segment into frames, see ``segment_frames``.
    """

    path: str
    label: int = 0
    flip: bool = True
    start_s: float | None = None
    end_s: float | None = None
    total_s: float | None = None


@dataclass
class ListLine:
    """One parsed line: the fields as written, where the path is among them, the entry."""

    lineno: int
    fields: list[str]
    path_field: int
    entry: VideoEntry

    def with_path(self, path: str) -> list[str]:
        out = list(self.fields)
        out[self.path_field] = path
        return out


@dataclass
class ListFile:
    """A parsed list file: its resolved format, the CSV header (else empty), the lines."""

    path: str
    fmt: str
    header: list[str] = field(default_factory=list)
    lines: list[ListLine] = field(default_factory=list)

    @property
    def entries(self) -> list[VideoEntry]:
        return [ln.entry for ln in self.lines]


def read_list(path: str, root: str = "", fmt: str = "auto") -> list[VideoEntry]:
    """The videos of a list file (formats: ``parse_list``)."""
    return parse_list(path, root, fmt).entries


def parse_list(path: str, root: str = "", fmt: str = "auto") -> ListFile:
    """A list file with each line's fields kept (to write the list again, changed).

    One video per line; ``fmt="auto"`` is ``detect_format``. A relative path is joined to
    ``root``; a malformed line raises ``ValueError`` naming ``file:line``.

    * ``release`` (the upstream annotation lines): ``source path total_time start end
      label``. Source ``ssv2`` (labels that depend on left/right) forbids flipping that
      video. Times are seconds, ``-1`` unknown; ``start`` / ``end`` pick a segment
      (``segment_frames``).
    * ``plain``: ``path [label]`` (no label: 0).
    * ``csv``: a header row naming the columns (case-insensitive): ``path`` (required),
      ``label``, ``source``, ``flip`` (true/false/1/0), ``start``, ``end``, ``total_time``,
      as above (an empty cell is the default); other columns are ignored.

    In ``release`` and ``plain`` lists blank lines and ``#`` lines are skipped and paths
    cannot contain whitespace.
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown list format {fmt!r}: must be one of {', '.join(FORMATS)}")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"list file not found: {path}")
    if fmt == "auto":
        fmt = detect_format(path)
    if fmt == "csv":
        return _parse_csv(path, root)
    out = ListFile(path, fmt)
    with open(path, "r", encoding="utf-8") as f:
        for lineno, raw in enumerate(f, start=1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            fields = line.split()
            parse = _release_entry if fmt == "release" else _plain_entry
            try:
                entry, path_field = parse(fields)
            except ValueError as e:
                raise ValueError(f"{path}:{lineno}: malformed line {line!r}: {e}") from None
            out.lines.append(ListLine(lineno, fields, path_field, _rooted(entry, root)))
    return out


def detect_format(path: str) -> str:
    """``csv`` for a ``.csv`` file or a first line that is a CSV header naming ``path``; else
    ``release`` for 6 fields on the first line and ``plain`` for 1 or 2."""
    if path.lower().endswith(".csv"):
        return "csv"
    with open(path, "r", encoding="utf-8") as f:
        for lineno, raw in enumerate(f, start=1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            n = len(line.split())
            if n == 6:
                return "release"
            if n in (1, 2):
                if "," in line and "path" in [c.strip().lower() for c in line.split(",")]:
                    return "csv"
                return "plain"
            raise ValueError(f"{path}:{lineno}: cannot tell the list format from a line of {n} fields "
                             f"(release: 6, plain: 1 or 2); set data.list_format")
    return "plain"


def _rooted(entry: VideoEntry, root: str) -> VideoEntry:
    if root and not os.path.isabs(entry.path):
        return replace(entry, path=os.path.join(root, entry.path))
    return entry


def _label(text: str) -> int:
    try:
        label = int(text)
    except ValueError:
        raise ValueError(f"label {text!r} is not an integer") from None
    if label < 0:
        raise ValueError(f"negative label {label}")
    return label


def _seconds(text: str, name: str) -> float | None:
    """A time in seconds; ``-1`` (the release's 'unknown') and an empty cell give None."""
    if text.strip() == "":
        return None
    try:
        v = float(text)
    except ValueError:
        raise ValueError(f"{name} {text!r} is not a number") from None
    if v == -1:
        return None
    if not v >= 0 or v == float("inf"):
        raise ValueError(f"{name} {text!r} must be >= 0 seconds (or -1: unknown)")
    return v


def _times(total: str, start: str, end: str) -> dict:
    t = {"total_s": _seconds(total, "total_time"), "start_s": _seconds(start, "start"), "end_s": _seconds(end, "end")}
    if t["total_s"] == 0:
        raise ValueError("total_time must be positive (or -1: unknown)")
    if t["start_s"] is not None and t["end_s"] is not None and t["end_s"] <= t["start_s"]:
        raise ValueError(f"end {t['end_s']} is not after start {t['start_s']}")
    return t


def _release_entry(fields: list[str]) -> tuple[VideoEntry, int]:
    if len(fields) != 6:
        raise ValueError(f"expected 6 fields 'source path total_time start end label', got {len(fields)}")
    source, path, total, start, end, label = fields
    return VideoEntry(path, _label(label), flip=source.lower() not in NO_FLIP_SOURCES,
                      **_times(total, start, end)), 1


def _plain_entry(fields: list[str]) -> tuple[VideoEntry, int]:
    if len(fields) > 2:
        raise ValueError(f"expected 'path [label]', got {len(fields)} fields")
    return VideoEntry(fields[0], _label(fields[1]) if len(fields) == 2 else 0), 0


def _flag(text: str) -> bool:
    t = text.strip().lower()
    if t in ("", "1", "true", "yes"):
        return True
    if t in ("0", "false", "no"):
        return False
    raise ValueError(f"flip {text!r} is not true/false/1/0")


def _parse_csv(path: str, root: str) -> ListFile:
    out = ListFile(path, "csv")
    with open(path, "r", encoding="utf-8", newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None:
            return out
        cols = [c.strip().lower() for c in header]
        if "path" not in cols:
            raise ValueError(f"{path}:1: the CSV header {header!r} has no 'path' column")
        dup = sorted({c for c in cols if c in CSV_COLUMNS and cols.count(c) > 1})
        if dup:
            raise ValueError(f"{path}:1: the CSV header repeats column(s) {', '.join(dup)}")
        out.header = header
        at = {c: i for i, c in enumerate(cols) if c in CSV_COLUMNS}
        for row in reader:
            lineno = reader.line_num
            if not row or all(not c.strip() for c in row):
                continue
            if len(row) != len(cols):
                raise ValueError(f"{path}:{lineno}: {len(row)} cells, the header has {len(cols)}")

            def cell(name: str) -> str:
                return row[at[name]].strip() if name in at else ""

            try:
                p = cell("path")
                if not p:
                    raise ValueError("empty path")
                source = cell("source").lower()
                flip = _flag(cell("flip")) and source not in NO_FLIP_SOURCES
                entry = VideoEntry(p, _label(cell("label")) if cell("label") else 0, flip=flip,
                                   **_times(cell("total_time"), cell("start"), cell("end")))
            except ValueError as e:
                raise ValueError(f"{path}:{lineno}: malformed row {row!r}: {e}") from None
            out.lines.append(ListLine(lineno, list(row), at["path"], _rooted(entry, root)))
    return out


def format_list(lst: ListFile, lines: list[list[str]]) -> str:
    """The text of a list file in ``lst``'s format (its CSV header) with the given fields."""
    if lst.fmt == "csv":
        import io

        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(lst.header)
        w.writerows(lines)
        return buf.getvalue()
    return "".join(" ".join(fields) + "\n" for fields in lines)


def segment_frames(entry: VideoEntry, num_total: int, duration_s: float | None = None) -> tuple[int, int]:
    """The frames a clip of ``entry`` is sampled from: ``(first_frame, count)``.

    Without a segment: ``(0, num_total)``. With one (``start_s`` and/or ``end_s``):
    ``fps = num_total / total`` with ``total = entry.total_s`` (else ``duration_s``, the
    length the file states), ``first = int(fps * start)``, ``count = int(fps * (end -
    start))`` (start 0 / end ``total`` when not given), clipped to the frames that exist.
    Frames are counted in decode order, so the mapping uses the mean frame rate (exact for
    constant-rate video). Raises ``ValueError`` when the segment holds no frame or the
    length is unknown.
    """
    if entry.start_s is None and entry.end_s is None:
        return 0, int(num_total)
    total = entry.total_s or duration_s
    if not total or total <= 0:
        raise ValueError("the list gives a segment but neither the list nor the file gives the video's length")
    fps = num_total / total
    start = entry.start_s or 0.0
    end = entry.end_s if entry.end_s is not None else total
    first = min(max(int(fps * start), 0), num_total)
    count = min(int(fps * (end - start)), num_total - first)
    if count <= 0:
        raise ValueError(f"the segment [{start:g}, {end:g}] s holds no frame (the video has {num_total} frames "
                         f"over {total:g} s)")
    return first, count


def check_files(entries: list[VideoEntry], workers: int = 16) -> tuple[list[VideoEntry], list[VideoEntry]]:
    """Split ``entries`` into ``(found, missing)`` by whether each path is an existing file.

    The existence checks run on ``workers`` threads (network file systems answer slowly).
    Each list keeps the order of ``entries``.
    """
    paths = [e.path for e in entries]
    with ThreadPoolExecutor(max(1, min(workers, len(paths) or 1))) as pool:
        exists = list(pool.map(os.path.isfile, paths, chunksize=256))
    found = [e for e, ok in zip(entries, exists) if ok]
    missing = [e for e, ok in zip(entries, exists) if not ok]
    return found, missing


def files_summary(list_file: str, found: list[VideoEntry], missing: list[VideoEntry]) -> str:
    """The one-line summary of ``check_files`` logged at the start of training."""
    n = len(found) + len(missing)
    line = f"{list_file}: {n} videos listed, {len(found)} found, {len(missing)} missing"
    if missing:
        line += f" (first missing: {missing[0].path}; missing videos are skipped and counted as bad)"
    return line
