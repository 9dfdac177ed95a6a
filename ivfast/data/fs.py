"""Opening list files, videos and frames by local path or by fsspec URL.

A path with a scheme (``memory://``, ``file://``, ``s3://``, ...) is opened through fsspec
(an optional extra: ``pip install ivfast[fsspec]``; imported only when a URL is met); any
other path is a local path, opened as before. URLs are joined with ``/``.
"""
from __future__ import annotations

import os
import re

_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*://")


def is_url(path: str) -> bool:
    """Whether ``path`` names a file system by its scheme (``memory://x``, ``file:///x``)."""
    return bool(_SCHEME.match(str(path)))


def _fsspec():
    try:
        import fsspec
    except ImportError:
        raise ImportError("reading a URL (a path with a scheme such as memory:// or s3://) needs fsspec: "
                          "pip install 'ivfast[fsspec]'") from None
    return fsspec


def filesystem(url: str):
    """``(fsspec file system, path inside it)`` of a URL."""
    return _fsspec().core.url_to_fs(url)


def is_absolute(path: str) -> bool:
    return is_url(path) or os.path.isabs(path)


def join(root: str, path: str) -> str:
    """``path`` under ``root`` (a directory or a URL); an absolute path or a URL is kept."""
    if not root or is_absolute(path):
        return path
    if is_url(root):
        return root.rstrip("/") + "/" + path.lstrip("/")
    return os.path.join(root, path)


def isfile(path: str) -> bool:
    if not is_url(path):
        return os.path.isfile(path)
    fs, p = filesystem(path)
    try:
        return bool(fs.isfile(p))
    except OSError:
        return False


def isdir(path: str) -> bool:
    if not is_url(path):
        return os.path.isdir(path)
    fs, p = filesystem(path)
    try:
        return bool(fs.isdir(p))
    except OSError:
        return False


def open_text(path: str):
    """A text file object (UTF-8) to read; the caller closes it (``with``)."""
    if not is_url(path):
        return open(path, "r", encoding="utf-8", newline="")
    return _fsspec().open(path, "rt", encoding="utf-8", newline="").open()


def open_binary(path: str):
    """A binary file object to read ``path``; the caller closes it (``with``)."""
    if not is_url(path):
        return open(path, "rb")
    fs, p = filesystem(path)
    return fs.open(p, "rb")


def read_bytes(path: str) -> bytes:
    """The whole file; ``FileNotFoundError`` when it does not exist (fsspec's ``open`` raises
    it, so a URL costs one request, not an existence check first)."""
    with open_binary(path) as f:
        return f.read()
