"""Walk folders into FileInfo records: stat only, no database, no decoding."""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

IMAGE_EXTENSIONS = frozenset(
    ".jpg .jpeg .jpe .jfif .mpo .png .apng .webp .gif .bmp .dib .tif .tiff "
    ".heic .heif .hif .avif".split()
)
# Extensions never sniffed for image content (saves a read per file on every run).
NON_IMAGE_EXTENSIONS = frozenset(
    ".txt .md .json .xml .xmp .csv .tsv .html .htm .pdf .doc .docx .xls .xlsx .zip .gz .tar "
    ".7z .rar .mp4 .mov .avi .mkv .m4v .mts .3gp .wmv .mp3 .wav .aac .m4a .flac .ogg .aae "
    ".ini .db .sqlite .sqlite3 .py .sh .exe .dll .so .lnk .log .thm .lrv .dng .cr2 .cr3 .nef "
    ".arw .orf .rw2 .raf .psd .svg .ico .faiss .lock".split()
)
SYSTEM_NAMES = frozenset(
    {
        ".DS_Store",
        ".Trashes",
        ".Trash",
        ".Spotlight-V100",
        ".fseventsd",
        ".AppleDouble",
        ".AppleDB",
        ".TemporaryItems",
        "System Volume Information",
        "$RECYCLE.BIN",
        "Thumbs.db",
        "ehthumbs.db",
        "desktop.ini",
        ".thumbnails",
        ".thumbs",
        "@eaDir",
        "lost+found",
        ".picasaoriginals",
    }
)
MAGIC_BYTES_NEEDED = 32


@dataclass(frozen=True)
class FileInfo:
    """One candidate image file, as stat saw it."""

    path: str
    size: int
    mtime_ns: int
    ctime_ns: int = 0
    """The inode's change time: moves on with every write, also one that restores the mtime
    (`touch -r`, some sync tools), and with chmod or xattr changes."""


@dataclass(frozen=True)
class ScanProblem:
    """A path the walk could not use, with a readable reason."""

    path: str
    reason: str


@dataclass
class ScanResult:
    """Everything one walk found under its roots."""

    files: list[FileInfo] = field(default_factory=list)
    problems: list[ScanProblem] = field(default_factory=list)
    skipped_hidden: int = 0
    skipped_system: int = 0
    skipped_not_image: int = 0


def is_system_name(name: str) -> bool:
    """OS metadata and system folders (AppleDouble, .DS_Store, thumbnail caches, ...)."""
    return name in SYSTEM_NAMES or name.startswith("._")


KNOWN_FORMATS = frozenset({"JPEG", "MPO", "PNG", "GIF", "WEBP", "BMP", "TIFF", "HEIF", "HEIC",
                           "AVIF"})
"""Format names the catalogue records (Pillow's), for filters such as `--format`."""
FORMAT_ALIASES = {"JPG": "JPEG", "TIF": "TIFF"}


def sniff_image_format(head: bytes) -> str | None:
    """Name the image format from a file's first bytes, or None if it is not an image."""
    if head.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "GIF"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WEBP"
    if head[:2] == b"BM" and len(head) >= 14:
        return "BMP"
    if head[:4] in (b"II*\x00", b"MM\x00*"):
        return "TIFF"
    if head[4:8] == b"ftyp":
        brand = head[8:12]
        if brand in (b"avif", b"avis"):
            return "AVIF"
        if brand in (b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"mif1", b"msf1"):
            return "HEIF"
    return None


def _looks_like_image(path: str) -> bool:
    try:
        with open(path, "rb") as fh:
            head = fh.read(MAGIC_BYTES_NEEDED)
    except OSError:
        return False
    return sniff_image_format(head) is not None


def scan_directories(
    roots: Iterable[str | os.PathLike[str]],
    include_hidden: bool = False,
    include_system: bool = False,
) -> ScanResult:
    """Walk every root recursively; follow symbolic links without loops or duplicates.

    A file is a candidate when its extension is an image extension or, for other
    extensions, when its first bytes are an image signature.
    """
    result = ScanResult()
    seen_dirs: set[tuple[int, int]] = set()
    seen_files: dict[tuple[int, int], int] = {}  # file identity -> its place in result.files
    via_link: set[tuple[int, int]] = set()  # ... when that place is a symbolic link's path
    reported: set[str] = set()

    def problem(path: str, reason: str) -> None:
        if path not in reported:
            reported.add(path)
            result.problems.append(ScanProblem(path, reason))

    for root in roots:
        root_path = os.path.abspath(os.fspath(root))
        try:
            st = os.stat(root_path)
        except OSError as err:
            problem(root_path, f"cannot read: {err.strerror or err}")
            continue
        if stat.S_ISREG(st.st_mode):
            key = (st.st_dev, st.st_ino)
            if key not in seen_files:
                seen_files[key] = len(result.files)
                result.files.append(FileInfo(root_path, st.st_size, st.st_mtime_ns, st.st_ctime_ns))
            continue
        stack = [root_path]
        seen_dirs.add((st.st_dev, st.st_ino))
        while stack:
            folder = stack.pop()
            try:
                with os.scandir(folder) as it:
                    entries = sorted(it, key=lambda e: e.name)
            except OSError as err:
                problem(folder, f"cannot read folder: {err.strerror or err}")
                continue
            subdirs: list[str] = []
            for entry in entries:
                name = entry.name
                if is_system_name(name) and not include_system:
                    result.skipped_system += 1
                    continue
                if name.startswith(".") and not include_hidden and not is_system_name(name):
                    result.skipped_hidden += 1
                    continue
                try:
                    est = entry.stat(follow_symlinks=True)
                except FileNotFoundError:
                    if entry.is_symlink():
                        problem(entry.path, "symbolic link to nothing (dangling)")
                    else:
                        problem(entry.path, "deleted while its folder was being read")
                    continue
                except OSError as err:
                    if err.errno == errno.ELOOP:
                        problem(entry.path, "symbolic link loop")
                    else:
                        problem(entry.path, f"cannot stat: {err.strerror or err}")
                    continue
                if stat.S_ISDIR(est.st_mode):
                    key = (est.st_dev, est.st_ino)
                    if key not in seen_dirs:
                        seen_dirs.add(key)
                        subdirs.append(entry.path)
                    continue
                if not stat.S_ISREG(est.st_mode):
                    continue
                key = (est.st_dev, est.st_ino)
                if key in seen_files:
                    if key in via_link and not entry.is_symlink():
                        # The file itself, met after a link to it: it keeps its own path.
                        via_link.discard(key)
                        result.files[seen_files[key]] = FileInfo(
                            entry.path, est.st_size, est.st_mtime_ns, est.st_ctime_ns)
                    continue
                ext = os.path.splitext(name)[1].lower()
                if ext not in IMAGE_EXTENSIONS:
                    if ext in NON_IMAGE_EXTENSIONS or est.st_size == 0 or not _looks_like_image(
                        entry.path
                    ):
                        result.skipped_not_image += 1
                        continue
                seen_files[key] = len(result.files)
                if entry.is_symlink():
                    via_link.add(key)
                result.files.append(FileInfo(entry.path, est.st_size, est.st_mtime_ns, est.st_ctime_ns))
            stack.extend(reversed(subdirs))
    return result


def path_to_bytes(path: str) -> bytes:
    """The file system's own bytes for a path (lossless, whatever the encoding)."""
    return os.fsencode(path)


def bytes_to_path(raw: bytes) -> str:
    """Inverse of path_to_bytes."""
    return os.fsdecode(raw)


_CONTROL_ESCAPES = {c: f"\\x{c:02x}" for c in (*range(0x20), 0x7F)}


def display_path(path: str) -> str:
    """A printable form of a path: undecodable bytes and control characters (a newline in a
    file name) shown as \\xNN escapes, so a message or table row stays one line."""
    return os.fsencode(path).decode("utf-8", "backslashreplace").translate(_CONTROL_ESCAPES)


def some_paths(paths: list[str], shown: int = 3) -> str:
    """The first few paths (printable) and how many more: "a, b, c and 4 more"."""
    more = len(paths) - shown
    return ", ".join(display_path(p) for p in paths[:shown]) + (
        f" and {more} more" if more > 0 else "")


def path_fields(path: str, key: str = "path") -> dict[str, str]:
    """A path for JSON output. `key` is the printable form; a path that is not valid UTF-8
    (whose printable form is ambiguous: `\\xff` could be a byte or four characters) also
    gets `key + "_base64"`, its exact bytes."""
    raw = os.fsencode(path)
    try:
        return {key: raw.decode("utf-8")}
    except UnicodeDecodeError:
        import base64

        return {key: raw.decode("utf-8", "backslashreplace"),
                key + "_base64": base64.b64encode(raw).decode("ascii")}


__all__ = ["FileInfo", "ScanProblem", "ScanResult", "display_path", "path_fields",
           "scan_directories", "sniff_image_format", "Path"]
