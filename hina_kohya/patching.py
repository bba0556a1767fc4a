"""``hina-kohya patch``: the diffs in ``patches/`` for users who prefer editing sd-scripts / LyCORIS
files to the wrapper modules (INTEGRATION.md §6).

A small unified-diff applier, so that no ``patch`` program is needed: each hunk's old lines must be
found exactly (at the line the diff names, or shifted when the file changed elsewhere); ``--apply``
and ``--revert`` check every hunk of every file first and write nothing unless all of them fit;
files are replaced whole (a temporary file, then a rename) and only inside the target folder
(its real path: a symlink that leads out of it is refused).
"""

from __future__ import annotations

import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

PATCH_DIR = Path(__file__).with_name("patches")
MARKER = "hina-kohya:"  # every block the patches add carries it (in a comment)

# kind -> (diff file, files whose presence makes a folder that kind of checkout, what to pass)
TARGETS = {
    "sd-scripts": ("sd-scripts.diff", ("library/train_util.py", "train_network.py"),
                   "an sd-scripts checkout (the folder holding train_network.py)"),
    "lycoris": ("lycoris.diff", ("lycoris/kohya.py",),
                "a LyCORIS checkout or the site-packages folder of lycoris-lora (the folder holding lycoris/kohya.py)"),
}

_HUNK = re.compile(r"^@@ -(\d+)(?:,(\d+))? \+(\d+)(?:,(\d+))? @@")


@dataclass
class Hunk:
    old_start: int  # 1-based, as in the diff
    old: list[str]
    new: list[str]


@dataclass
class FilePatch:
    path: str
    hunks: list[Hunk]


def parse(text: str) -> list[FilePatch]:
    """The file sections of a unified diff (``--- a/x`` / ``+++ b/x`` / ``@@`` hunks). A hunk ends
    when the line counts of its header are used up (so a ``--- `` header after it is not read as
    a removed line)."""
    files: list[FilePatch] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        i += 1
        if line.startswith("+++ "):
            path = line[4:].split("\t")[0].strip()
            files.append(FilePatch(path[2:] if path.startswith("b/") else path, []))
        elif line.startswith("@@"):
            m = _HUNK.match(line)
            if m is None or not files:
                raise ValueError(f"malformed hunk header {line!r}")
            hunk = Hunk(int(m.group(1)), [], [])
            old_left = int(m.group(2) or 1)
            new_left = int(m.group(4) or 1)
            while (old_left > 0 or new_left > 0) and i < len(lines):
                body = lines[i]
                i += 1
                if body.startswith("\\"):  # "\ No newline at end of file"
                    continue
                tag, rest = (body[:1], body[1:]) if body else (" ", "")
                if tag in (" ", "-"):
                    hunk.old.append(rest)
                    old_left -= 1
                if tag in (" ", "+"):
                    hunk.new.append(rest)
                    new_left -= 1
                if tag not in (" ", "-", "+"):
                    raise ValueError(f"malformed hunk line {body!r}")
            files[-1].hunks.append(hunk)
    return files


def _find(lines: list[str], block: list[str], expected: int) -> Optional[int]:
    """Index where ``block`` occurs in ``lines``, the occurrence nearest to ``expected``."""
    n = len(block)
    hits = [i for i in range(len(lines) - n + 1) if lines[i:i + n] == block]
    return min(hits, key=lambda i: abs(i - expected)) if hits else None


def patch_text(text: str, fp: FilePatch, reverse: bool = False) -> tuple[Optional[str], list[str]]:
    """The patched text, or None and the hunks that do not fit. Lines are split on ``\\n`` only
    and compared without a trailing ``\\r``: every byte the hunks do not touch is kept, and added
    lines take the line ending of the block they replace (CRLF files stay CRLF)."""
    lines = text.split("\n")
    bare = [ln[:-1] if ln.endswith("\r") else ln for ln in lines]
    problems: list[str] = []
    edits = []
    for k, h in enumerate(fp.hunks, 1):
        old, new = (h.new, h.old) if reverse else (h.old, h.new)
        at = _find(bare, old, h.old_start - 1)
        if at is None:
            problems.append(f"{fp.path}: hunk {k} (near line {h.old_start}) does not match the file")
        else:
            edits.append((at, len(old), new))
    if problems:
        return None, problems
    for at, length, new in sorted(edits, reverse=True):  # bottom-up: earlier line numbers stay valid
        ending = "\r" if any(ln.endswith("\r") for ln in lines[at:at + length]) else ""
        lines[at:at + length] = [ln + ending for ln in new]
    return "\n".join(lines), []


def _inside(root: Path, rel: str) -> Path:
    real_root = Path(os.path.realpath(root))
    target = Path(os.path.realpath(root / rel))
    if real_root not in target.parents:
        raise PermissionError(f"{rel} resolves to {target}, outside {real_root}: refusing to touch it")
    return target


def _read(path: Path) -> str:
    return path.read_bytes().decode("utf-8")  # no newline translation: bytes round-trip exactly


def _write(path: Path, text: str) -> None:
    mode = path.stat().st_mode
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".hina-kohya")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(text.encode("utf-8"))
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _restore(written: list[tuple[str, Path]], originals: dict[str, str]) -> list[tuple[str, str]]:
    """Put back the original text of the files written so far; (file, reason) for each that failed."""
    failed = []
    for rel, path in written:
        try:
            _write(path, originals[rel])
        except OSError as exc:
            failed.append((rel, str(exc)))
    return failed


def run(kind: str, folder: str, mode: str = "check") -> tuple[int, list[str]]:
    """Check, apply or revert the ``kind`` patch on ``folder``: (exit code, report lines).
    Exit 0: done / applies cleanly; 1: it does not fit (nothing changed); 2: bad target."""
    diff_name, required, what = TARGETS[kind]
    root = Path(folder)
    missing = [r for r in required if not (root / r).is_file()]
    if missing:
        return 2, [f"{folder}: not {what} ({', '.join(missing)} missing); nothing changed."]
    diff_text = (PATCH_DIR / diff_name).read_text(encoding="utf-8")
    version = next((ln[2:] for ln in diff_text.splitlines() if ln.startswith("# Upstream version:")), "")
    report = [f"{diff_name}: {version.strip()}"]
    try:
        files = [(fp, _inside(root, fp.path)) for fp in parse(diff_text)]
    except PermissionError as exc:
        return 2, report + [f"{exc}; nothing changed."]
    absent = [fp.path for fp, path in files if not path.is_file()]
    if absent:
        return (1 if mode == "check" else 2), report + [
            f"{', '.join(absent)}: missing in {folder} (another sd-scripts / LyCORIS version than the patch's); "
            "use the wrapper network modules instead. Nothing changed."]
    originals = {fp.path: _read(path) for fp, path in files}
    # each file's state: "patched" (our lines present and removable), "clean" (the patch fits) or a
    # problem; with the text that undoes or applies it
    states: dict[str, str] = {}
    results: dict[str, Optional[str]] = {}
    for fp, _ in files:
        text = originals[fp.path]
        if MARKER in text:
            results[fp.path] = patch_text(text, fp, reverse=True)[0]
            states[fp.path] = "patched" if results[fp.path] is not None else \
                "hina-kohya lines present but not as this patch wrote them; restore the file (git checkout) first"
        else:
            results[fp.path], problems = patch_text(text, fp)
            states[fp.path] = "clean" if results[fp.path] is not None else "; ".join(problems)
    broken = {k: v for k, v in states.items() if v not in ("patched", "clean")}
    if mode == "check":
        for fp, _ in files:
            st = states[fp.path]
            report.append(f"{fp.path}: " + ("already applied (--revert undoes it)" if st == "patched" else
                                             "applies cleanly" if st == "clean" else
                                             f"does not apply: {st} -- upstream changed; use the wrapper network "
                                             "modules instead, which need no patch"))
        return (1 if broken else 0), report
    if broken:
        return 1, report + [f"{k}: {v}" for k, v in broken.items()] + ["Nothing changed."]
    todo = [(fp, path) for fp, path in files if states[fp.path] == ("clean" if mode == "apply" else "patched")]
    if not todo:
        return 1, report + ["already patched; nothing to apply (--revert undoes it). Nothing changed." if mode == "apply"
                            else "not patched; nothing to revert. Nothing changed."]
    written: list[tuple[str, Path]] = []
    try:
        for fp, path in todo:
            try:
                _write(path, results[fp.path])
            except OSError as exc:  # disk full, read-only file system, permissions: all or nothing
                unrestored = _restore(written, originals)
                return 2, report + [f"{fp.path}: could not write it ({exc})"] + (
                    [f"{rel}: could not restore it ({why}); run git checkout -- {rel}" for rel, why in unrestored]
                    if unrestored else ["the files written before it were restored. Nothing changed."])
            written.append((fp.path, path))
    except BaseException:  # an interrupt between two files
        _restore(written, originals)
        raise
    verb = "patched" if mode == "apply" else "restored"
    done = {fp.path for fp, _ in todo}
    skipped = [f"{fp.path}: {'already patched' if mode == 'apply' else 'not patched'}, left as it is"
               for fp, _ in files if fp.path not in done]
    return 0, report + [f"{fp.path}: {verb}" for fp, _ in todo] + skipped
