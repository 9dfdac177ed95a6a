"""Dataset list files: which videos a run reads, with their labels and per-video options."""
from __future__ import annotations

import csv
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace

from ivfast.data import fs

logger = logging.getLogger("ivfast.data")

FORMATS = ("auto", "release", "plain", "csv", "videomae")
BAD_LINES = ("raise", "keep")
CSV_COLUMNS = ("path", "label", "source", "flip", "start", "end", "total_time")
NO_FLIP_SOURCES = ("ssv2",)


class UnreadableVideo(Exception):
    """A video (a file, a folder of frames, a list line) that cannot give a clip; the message
    is the reason logged."""


@dataclass(frozen=True)
class VideoEntry:
    """One video of a dataset list.

    ``path``: absolute, or already joined to the data root. ``label``: integer class (0
    when the list has none). ``flip``: whether horizontal flipping is allowed for this
    video (False for Something-Something V2, whose labels depend on left/right).
    ``start_s`` / ``end_s``: optional segment of the video in seconds to sample from.
    ``total_s``: the video's length in seconds as the list states it (None: take it from
    the file); it turns the segment into frames, see ``segment_frames``.
    ``start_frame`` / ``frame_count``: a segment in frames (the VideoMAEv2 lines): the clip
    is sampled from frames ``start_frame .. start_frame + frame_count - 1`` (``frame_count``
    None: to the end of the video). ``frames``: ``path`` is a folder of frames (one image
    per frame, named by ``data.frame_template`` from ``start_frame`` on; ``frame_count`` is
    then the number of frames). ``error``: the reason a malformed list line cannot give a
    clip (``parse_list(..., bad_lines="keep")``); reading it fails with that reason.
    """

    path: str
    label: int = 0
    flip: bool = True
    start_s: float | None = None
    end_s: float | None = None
    total_s: float | None = None
    start_frame: int = 0
    frame_count: int | None = None
    frames: bool = False
    error: str | None = None


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


def read_list(path: str, root: str = "", fmt: str = "auto", bad_lines: str = "raise") -> list[VideoEntry]:
    """The videos of a list file (formats and ``bad_lines``: ``parse_list``)."""
    return parse_list(path, root, fmt, bad_lines).entries


def parse_list(path: str, root: str = "", fmt: str = "auto", bad_lines: str = "raise") -> ListFile:
    """A list file with each line's fields kept (to write the list again, changed).

    One video per line; ``fmt="auto"`` is ``detect_format``. A relative path is joined to
    ``root``. ``path`` and ``root`` may be fsspec URLs (``memory://``, ``file://``, ...; see
    :mod:`ivfast.data.fs`). A malformed line raises ``ValueError`` naming ``file:line``;
    with ``bad_lines="keep"`` it becomes an entry whose ``error`` names ``file:line`` and
    the fault (its path: the line's first field), so that the loader skips it, warns and
    counts it as a bad video like an unreadable file, and one warning line counts them.
    (The format itself, when it cannot be detected, and a bad CSV header still raise.)

    * ``release`` (the upstream annotation lines): ``source path total_time start end
      label``. Source ``ssv2`` (labels that depend on left/right) forbids flipping that
      video. Times are seconds, ``-1`` unknown; ``start`` / ``end`` pick a segment
      (``segment_frames``).
    * ``plain``: ``path [label]`` (no label: 0).
    * ``videomae`` (the VideoMAEv2 / InternVideo pretraining lines): ``path start total
      [label]`` with integers ``start >= 0`` and ``total``: ``total = -1`` is a video file
      sampled from its frame ``start`` to its end (``path 0 -1``: the whole video);
      ``total >= 1`` is a folder of frames holding frames ``start .. start + total - 1``
      (``frame_dir 1 120``: ``img_00001.jpg .. img_00120.jpg``). Label: as ``plain``.
    * ``csv``: a header row naming the columns (case-insensitive): ``path`` (required),
      ``label``, ``source``, ``flip`` (true/false/1/0), ``start``, ``end``, ``total_time``,
      as above (an empty cell is the default); other columns are ignored.

    In ``release`` and ``plain`` lists blank lines and ``#`` lines are skipped and paths
    cannot contain whitespace.
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown list format {fmt!r}: must be one of {', '.join(FORMATS)}")
    if bad_lines not in BAD_LINES:
        raise ValueError(f"bad_lines must be one of {', '.join(BAD_LINES)}, got {bad_lines!r}")
    if not fs.isfile(path):
        raise FileNotFoundError(f"list file not found: {path}")
    if fmt == "auto":
        fmt = detect_format(path)
    if fmt == "csv":
        out = _parse_csv(path, root, bad_lines)
    else:
        out = ListFile(path, fmt)
        parse = {"release": _release_entry, "plain": _plain_entry, "videomae": _videomae_entry}[fmt]
        with fs.open_text(path) as f:
            for lineno, line in _content_lines(f):
                fields = line.split()
                try:
                    entry, path_field = parse(fields)
                except ValueError as e:
                    msg = f"{path}:{lineno}: malformed line {line!r}: {e}"
                    if bad_lines == "raise":
                        raise ValueError(msg) from None
                    path_field = 1 if fmt == "release" and len(fields) > 1 else 0
                    entry = VideoEntry(fields[path_field], error=msg)
                out.lines.append(ListLine(lineno, fields, path_field, _rooted(entry, root)))
    bad = [ln.entry.error for ln in out.lines if ln.entry.error]
    if bad:
        logger.warning("%s: %d malformed line(s) skipped and counted as bad videos (first: %s)", path, len(bad), bad[0])
    return out


def _content_lines(f):
    """``(line number, stripped line)`` of a list file's lines that are neither blank nor ``#`` comments."""
    for lineno, raw in enumerate(f, start=1):
        line = raw.strip()
        if line and not line.startswith("#"):
            yield lineno, line


def detect_format(path: str) -> str:
    """``csv`` for a ``.csv`` file or a first line that is a CSV header naming ``path``; else,
    by the fields of the first line, ``release`` for 6, ``plain`` for 1 or 2 and
    ``videomae`` for 3 (or 4 integers after the path)."""
    if path.lower().endswith(".csv"):
        return "csv"
    with fs.open_text(path) as f:
        for lineno, line in _content_lines(f):
            fields = line.split()
            n = len(fields)
            if n == 6:
                return "release"
            if n in (1, 2):
                if "," in line and "path" in [c.strip().lower() for c in line.split(",")]:
                    return "csv"
                return "plain"
            if n == 3 or (n == 4 and all(_is_int(x) for x in fields[1:])):
                return "videomae"
            raise ValueError(f"{path}:{lineno}: cannot tell the list format from a line of {n} fields "
                             f"(release: 6, plain: 1 or 2, videomae: 3, or 4 with integers); set data.list_format")
    return "plain"


def _is_int(text: str) -> bool:
    try:
        int(text)
    except ValueError:
        return False
    return True


def _rooted(entry: VideoEntry, root: str) -> VideoEntry:
    if root and not fs.is_absolute(entry.path):
        return replace(entry, path=fs.join(root, entry.path))
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


def _int(text: str, name: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"{name} {text!r} is not an integer") from None


def _videomae_entry(fields: list[str]) -> tuple[VideoEntry, int]:
    if len(fields) not in (3, 4):
        raise ValueError(f"expected 'path start total [label]', got {len(fields)} fields")
    start, total = _int(fields[1], "start"), _int(fields[2], "total")
    label = _label(fields[3]) if len(fields) == 4 else 0
    if start < 0:
        raise ValueError(f"negative start {start}")
    if total == -1:
        return VideoEntry(fields[0], label, start_frame=start), 0
    if total < 1:
        raise ValueError(f"total {total} must be >= 1 frames (a folder of frames) or -1 (a video file)")
    return VideoEntry(fields[0], label, start_frame=start, frame_count=total, frames=True), 0


def _flag(text: str) -> bool:
    t = text.strip().lower()
    if t in ("", "1", "true", "yes"):
        return True
    if t in ("0", "false", "no"):
        return False
    raise ValueError(f"flip {text!r} is not true/false/1/0")


def _parse_csv(path: str, root: str, bad_lines: str = "raise") -> ListFile:
    out = ListFile(path, "csv")
    with fs.open_text(path) as f:
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

            def cell(name: str) -> str:
                return row[at[name]].strip() if name in at else ""

            try:
                if len(row) != len(cols):
                    raise ValueError(f"{len(row)} cells, the header has {len(cols)}")
                p = cell("path")
                if not p:
                    raise ValueError("empty path")
                source = cell("source").lower()
                flip = _flag(cell("flip")) and source not in NO_FLIP_SOURCES
                entry = VideoEntry(p, _label(cell("label")) if cell("label") else 0, flip=flip,
                                   **_times(cell("total_time"), cell("start"), cell("end")))
            except ValueError as e:
                msg = f"{path}:{lineno}: malformed row {row!r}: {e}"
                if bad_lines == "raise":
                    raise ValueError(msg) from None
                first = row[at["path"]].strip() if at["path"] < len(row) else ""
                entry = VideoEntry(first or f"{path}:{lineno}", error=msg)
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
    constant-rate video). A segment in frames (``start_frame`` / ``frame_count``, the
    VideoMAEv2 lines) is ``(start_frame, min(frame_count, num_total - start_frame))``.
    Raises ``ValueError`` when the segment holds no frame or the length is unknown.
    """
    if entry.start_frame or entry.frame_count is not None:
        first = int(entry.start_frame)
        rest = int(num_total) - first
        count = rest if entry.frame_count is None else min(int(entry.frame_count), rest)
        if count <= 0:
            raise ValueError(f"the segment starts at frame {first}, the video has {num_total} frames")
        return first, count
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
    """Split ``entries`` into ``(found, missing)`` by whether each path is an existing file
    (a folder, for a folder of frames; a malformed line is missing).

    The existence checks run on ``workers`` threads (network file systems answer slowly).
    Each list keeps the order of ``entries``.
    """
    def exists_(e: VideoEntry) -> bool:
        if e.error:
            return False
        return fs.isdir(e.path) if e.frames else fs.isfile(e.path)

    with ThreadPoolExecutor(max(1, min(workers, len(entries) or 1))) as pool:
        exists = list(pool.map(exists_, entries, chunksize=256))
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
