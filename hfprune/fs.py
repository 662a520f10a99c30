"""What hfprune may write, replace and upload: the one output policy, and the one atomic writer.

Every command that writes (prune, recover, flow, sweep, search, eval, bench, zeroshot, and the
Python save path ``hfprune.save_pretrained``) goes through here. The rules:

* the command's inputs (model, teacher, dataset, recipe, calibration and task files, given as
  ``inputs``) are never written or deleted: an output that is one, holds one, or lies inside an
  input folder is refused;
* a folder output must be missing or empty; ``overwrite`` replaces only a folder that hfprune
  itself wrote: one with a manifest (:data:`MANIFEST`, written last by :func:`atomic_output_dir`
  and :func:`claim_output_dir`) that lists every file in it. A folder with any other file is
  refused with the names of those files, with or without ``overwrite``;
* a single output file (the JSON of eval / bench / zeroshot) is replaced only with ``overwrite``
  and only when hfprune wrote it (its top-level ``"written_by": "hfprune"`` key, see
  :func:`write_json_output`);
* a symbolic link (dangling or not) as the output is refused: it is never followed to create,
  fill or delete its target;
* ``output`` / ``overwrite`` come from the command line or the Python call, never from a recipe
  (the recipe readers refuse those keys).

The manifest is also what ``hfprune push`` uploads (:mod:`hfprune.hub`).

Everything is written to a temporary folder (:func:`atomic_output_dir`) or file
(:func:`atomic_write`) beside the output and renamed into place at the end, so an interrupted run
(or a full disk) never leaves a half-written output.

This module imports nothing from hfprune: it sits below every other layer.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import json
import logging
import os
import shutil
import stat
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

logger = logging.getLogger(__name__)

__all__ = ["MANIFEST", "WRITTEN_BY", "atomic_output_dir", "atomic_write", "check_output_dir", "check_output_file",
           "claim_output_dir", "input_paths", "output_lock", "OutputLockedError", "read_manifest",
           "write_json_output", "write_manifest"]

MANIFEST = "hfprune_manifest.json"
"""File name of the list of files hfprune wrote into an output folder (the folder's owner marker)."""

WRITTEN_BY = "hfprune"
"""Value of the ``"written_by"`` key in the manifest and in every JSON result file hfprune writes."""

_MAX_MARKER_BYTES = 64 << 20  # a JSON result file larger than this is not read to look for the marker


def input_paths(*candidates) -> list[Path]:
    """The candidates that are existing local paths (model folders, calibration files, recipes), resolved.
    Non-path values (``None``, numbers, Hub ids that are not local folders, token tensors) are skipped."""
    out = []
    for c in candidates:
        if isinstance(c, (str, os.PathLike)) and str(c).strip():
            try:
                path = Path(c).expanduser()
                if path.exists():
                    out.append(path.resolve())
            except (OSError, ValueError):
                continue
    return out


def _is_within(inner: Path, outer: Path) -> bool:
    return inner == outer or outer in inner.parents


def _refuse_link(path: Path) -> None:
    for part in path.parents:  # a dangling link above the output would make mkdir create its target
        if part.is_symlink() and not part.exists():
            raise ValueError(f"Output {path} lies under {part}, a symbolic link to {os.readlink(part)}, which does "
                             f"not exist: hfprune does not create a link's target. Pass a path of real folders.")
    if path.is_symlink():
        try:
            target = os.readlink(path)
        except OSError:
            target = "?"
        state = "" if path.exists() else ", which does not exist"
        raise ValueError(f"Output {path} is a symbolic link (to {target}{state}): hfprune never writes through a "
                         f"link (it would create, fill or delete the link's target). Pass the real path as --output, "
                         f"or remove the link.")


def _check_inputs(path: Path, resolved: Path, inputs, what: str) -> None:
    for src in input_paths(*inputs):
        if _is_within(src, resolved):
            how = "is" if src == resolved else "contains"
            raise ValueError(f"Output {what} {path} {how} the input {src}: writing there would replace the input. "
                             f"Choose another --output (a new {what}).")
        if src.is_dir() and _is_within(resolved, src):
            raise ValueError(f"Output {what} {path} is inside the input folder {src}: hfprune never writes into "
                             f"its inputs. Choose an --output outside it.")


def _empty_path(path) -> bool:
    return path is None or not str(path).strip()


# --------------------------------------------------------------------------------------------
# ownership: the manifest of a folder, the marker of a JSON file
# --------------------------------------------------------------------------------------------

def _safe_relative(name) -> bool:
    """A manifest entry: a relative path inside the folder, no ``..``, no hidden (dot) component."""
    if not isinstance(name, str) or not name or "\\" in name or os.path.isabs(name):
        return False
    parts = name.split("/")
    return all(p and p not in (".", "..") and not p.startswith(".") for p in parts)


def read_manifest(folder: str | os.PathLike) -> dict | None:
    """The manifest hfprune wrote in ``folder`` (``{"written_by", "kind", "files"}``), or ``None`` when there
    is none or it is not one (a link, not JSON, wrong keys). Unsafe entries (``..``, absolute, hidden) are dropped."""
    path = Path(folder) / MANIFEST
    if path.is_symlink() or not path.is_file():
        return None
    data = _small_json(path)
    if not isinstance(data, dict) or data.get("written_by") != WRITTEN_BY or not isinstance(data.get("files"), list):
        return None
    return {**data, "files": sorted({f for f in data["files"] if _safe_relative(f)})}


def _listed_files(folder: Path) -> list[str]:
    """Relative paths of the regular files under ``folder`` (links are not followed nor listed)."""
    out = []
    for root, dirs, files in os.walk(folder):
        base = Path(root)
        for name in files:
            p = base / name
            if not p.is_symlink() and p.is_file():
                out.append(p.relative_to(folder).as_posix())
    return sorted(out)


def write_manifest(folder: str | os.PathLike, kind: str, files: Iterable[str] | None = None, *,
                   atomic: bool = True) -> Path:
    """Write ``folder/hfprune_manifest.json``: the files hfprune wrote there (default: every regular file now in
    ``folder``; names are merged with an earlier manifest's). It marks the folder as hfprune's (``--overwrite``
    may replace it) and is the list ``hfprune push`` uploads."""
    folder = Path(folder)
    names = set(_listed_files(folder) if files is None else files)
    old = read_manifest(folder)
    if old is not None:
        names |= set(old["files"])
    names.discard(MANIFEST)
    data = {"written_by": WRITTEN_BY, "kind": kind, "files": sorted(n for n in names if _safe_relative(n))}
    path = folder / MANIFEST
    text = json.dumps(data, indent=2) + "\n"
    if atomic:
        atomic_write(path, text)
    else:  # inside a temporary folder that is itself renamed into place
        path.write_text(text, encoding="utf-8")
    return path


def _foreign_files(folder: Path, name: str) -> list[str] | None:
    """Files in ``folder`` that hfprune did not write; ``None`` when the folder has no manifest."""
    manifest = read_manifest(folder)
    if manifest is None:
        return None
    owned = set(manifest["files"]) | {MANIFEST}
    foreign = []
    for root, dirs, files in os.walk(folder):
        base = Path(root)
        if base == folder:
            dirs[:] = [d for d in dirs if not _is_debris(base / d, name)]
        for entry in files + [d for d in dirs if (base / d).is_symlink()]:
            p = base / entry
            rel = p.relative_to(folder).as_posix()
            if (base == folder and _is_debris(p, name)) or _is_write_debris(p):
                continue
            if p.is_symlink() or rel not in owned:
                foreign.append(rel)
    return sorted(foreign)


def _names(items: list[str], limit: int = 5) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")


def _small_json(path: Path) -> Any:
    """The JSON in ``path``, or ``None`` when it is unreadable, not JSON or larger than a marker can be."""
    try:
        if path.stat().st_size > _MAX_MARKER_BYTES:
            return None
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _is_marked_json(path: Path) -> bool:
    data = _small_json(path)
    return isinstance(data, dict) and data.get("written_by") == WRITTEN_BY


# --------------------------------------------------------------------------------------------
# the checks
# --------------------------------------------------------------------------------------------

def check_output_dir(path: str | os.PathLike, overwrite: bool = False, inputs=(), *, resume: bool = False) -> Path:
    """Refuse an output folder that would lose data, before any slow work starts.

    * an empty path (``--output ""`` means the current folder), a symbolic link (dangling or not),
      a file in the folder's place;
    * a folder that is, contains or lies inside one of ``inputs`` (the model being pruned, a
      calibration file, a recipe, ...): writing there would change an input;
    * a non-empty folder unless ``overwrite`` (or ``resume``: add to an earlier output of the same kind);
    * even with ``overwrite`` / ``resume``: a folder hfprune did not write (no manifest, or files the
      manifest does not list, which are named), the current folder or one that contains it, the home
      folder or the file system root.
    """
    if _empty_path(path):
        raise ValueError("The output path is empty: pass --output NEW_FOLDER (save_directory), a folder that does "
                         "not exist yet or an earlier output to replace with --overwrite.")
    path = Path(path).expanduser()
    _refuse_link(path)
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"Output path {path} is a file: choose a folder path.")
    resolved = path.resolve()
    _check_inputs(path, resolved, inputs, "folder")
    if path.is_dir() and any(not _is_debris(p, resolved.name) for p in path.iterdir()):
        if overwrite:
            cwd, home = Path.cwd().resolve(), Path.home().resolve()
            if _is_within(cwd, resolved) or _is_within(home, resolved) or resolved == Path(resolved.anchor):
                raise ValueError(f"Output folder {path} is (or contains) the current folder, the home folder or the "
                                 f"file system root; --overwrite would replace it. Choose a new folder for --output.")
        foreign = _foreign_files(path, resolved.name)
        if foreign is None:
            raise FileExistsError(
                f"Output folder {path} is not empty and hfprune did not write it (it has no {MANIFEST}): "
                f"--overwrite replaces only an empty folder or an earlier hfprune output. Choose another --output, "
                f"or move the folder's files away yourself.")
        if foreign:
            raise FileExistsError(
                f"Output folder {path} holds files hfprune did not write ({_names(foreign)}): --overwrite would "
                f"delete them, so it is refused. Move them out of the folder, or choose another --output.")
        if not (overwrite or resume):
            raise FileExistsError(f"Output folder {path} is not empty: choose another --output or pass --overwrite "
                                  f"(overwrite=True) to replace this earlier hfprune output.")
    _check_writable(resolved)
    return path


def check_output_file(path: str | os.PathLike, overwrite: bool = False, inputs=()) -> Path:
    """Refuse a single output file (a JSON result) that would lose data, before any slow work starts:
    an empty path, a symbolic link, a folder, one of ``inputs`` or a file inside an input folder (a model's
    ``config.json``, its weights), and an existing file unless ``overwrite`` and hfprune wrote it
    (:func:`write_json_output`'s marker)."""
    if _empty_path(path):
        raise ValueError("The --output file path is empty: pass a new file path such as results.json.")
    path = Path(path).expanduser()
    _refuse_link(path)
    if path.is_dir():
        raise IsADirectoryError(f"Output {path} is a folder: pass a file path such as {path / 'results.json'}.")
    resolved = path.resolve()
    _check_inputs(path, resolved, inputs, "file")
    if path.exists():
        if not overwrite:
            raise FileExistsError(f"{path} exists: pass --overwrite to replace it, or another --output.")
        if not _is_marked_json(path):
            raise FileExistsError(
                f"{path} exists and hfprune did not write it (no \"written_by\": \"{WRITTEN_BY}\" key): "
                f"--overwrite replaces only an earlier hfprune result file. Choose another --output, or move the "
                f"file away yourself.")
    _check_writable(resolved)
    return path


def write_json_output(path: str | os.PathLike, result: dict, **dump_kwargs) -> dict:
    """Write a JSON result (eval, bench, zeroshot) atomically, with the ``"written_by": "hfprune"`` key that lets
    a later ``--overwrite`` replace it; returns the dict written (``result`` plus that key). Call
    :func:`check_output_file` first (before the slow work)."""
    path = Path(path).expanduser()
    _refuse_link(path)
    dump_kwargs.setdefault("indent", 2)
    marked = {**result, "written_by": WRITTEN_BY}
    atomic_write(path, json.dumps(marked, **dump_kwargs) + "\n")
    return marked


def claim_output_dir(path: str | os.PathLike, kind: str, files: Iterable[str], overwrite: bool = False,
                     inputs=()) -> Path:
    """Take a results folder that is filled file by file (sweep, search): check it like :func:`check_output_dir`
    (an earlier hfprune folder is resumed without ``overwrite``), create it, and record ``files`` (the names the
    command writes) in its manifest. With ``overwrite`` those files are deleted first. A folder hfprune wrote for
    another ``kind`` (a checkpoint, a search) is refused. Returns the folder."""
    files = list(files)
    path = check_output_dir(path, overwrite, inputs, resume=True)
    manifest = read_manifest(path) if path.is_dir() else None
    if manifest is not None and manifest.get("kind") != kind:
        raise FileExistsError(f"Output folder {path} holds hfprune {manifest.get('kind')} output, not {kind} results: "
                              f"choose another --output for the {kind}.")
    path.mkdir(parents=True, exist_ok=True)
    if overwrite:
        for name in files:
            (path / name).unlink(missing_ok=True)
    write_manifest(path, kind, files)
    return path


def _is_write_debris(entry: Path) -> bool:
    """A temporary file :func:`atomic_write` leaves when killed (``.<name>.tmp-XXXX``)."""
    return entry.name.startswith(".") and ".tmp-" in entry.name and not entry.is_symlink()


def _is_debris(entry: Path, name: str) -> bool:
    """A temporary or old copy that hfprune itself leaves beside (or, for a mount point, inside) an output."""
    return entry.name.startswith((f".{name}.tmp-", f".{name}.old-"))


def _check_writable(resolved: Path) -> None:
    """Fail now, not after hours of pruning, when the output's disk or folder is not writable."""
    place = resolved if resolved.is_dir() and _is_mount_point(resolved) else resolved.parent
    while not place.exists():
        place = place.parent
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".hfprune-write-test-", dir=place))
    except OSError as exc:
        raise PermissionError(exc.errno, f"Cannot write the output {resolved}: {place} is not writable "
                                         f"({exc.strerror}). Choose an --output on a writable disk.") from None


class OutputLockedError(RuntimeError):
    """Another process is writing the same output folder."""


_HELD_LOCKS: dict[Path, list] = {}  # lock file -> [fd, depth]: re-entrant within one process


def _lock_path(path: str | os.PathLike) -> Path:
    out = Path(path).expanduser().resolve()
    return out.parent / f".{out.name}.hfprune-lock"


@contextlib.contextmanager
def output_lock(path: str | os.PathLike) -> Iterator[None]:
    """Hold an exclusive lock on the output ``path`` (a ``.<name>.hfprune-lock`` file beside it).

    A second run to the same output (whose temporary and resume folders would be shared) fails at
    once with :class:`OutputLockedError` instead of mixing its work with the first. Re-entrant in
    one process; the lock file is removed on release (the kernel drops the lock if the process dies).
    """
    import fcntl

    lock = _lock_path(path)
    if lock in _HELD_LOCKS:
        _HELD_LOCKS[lock][1] += 1
        try:
            yield
        finally:
            _HELD_LOCKS[lock][1] -= 1
        return
    created = _make_parents(lock)
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                holder = os.read(fd, 64).decode(errors="replace").strip() or "?"
            finally:
                os.close(fd)
            _remove_empty(created)
            raise OutputLockedError(
                f"Another hfprune run (process {holder}) is writing to {Path(path)} (lock {lock}): wait for it to "
                f"finish, or choose another --output.") from None
        try:
            same = os.fstat(fd).st_ino == os.stat(lock).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # the file was removed by the previous holder between open and lock: take the new one
    os.ftruncate(fd, 0)
    os.write(fd, str(os.getpid()).encode())
    _HELD_LOCKS[lock] = [fd, 1]
    try:
        yield
    finally:
        del _HELD_LOCKS[lock]
        try:
            os.unlink(lock)
        except FileNotFoundError:
            pass
        os.close(fd)
        _remove_empty(created)


def _is_disk_full(exc: BaseException | None) -> bool:
    """True for ENOSPC/EDQUOT, also when wrapped (safetensors raises ``SafetensorError('... os error 28')``)."""
    seen = 0
    while exc is not None and seen < 10:
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", -1)):
            return True
        text = str(exc)
        if "No space left on device" in text or "os error 28" in text or "StorageFull" in text \
                or "Disk quota exceeded" in text:
            return True
        exc = exc.__cause__ or exc.__context__
        seen += 1
    return False


def _disk_full_error(final: Path, exc: BaseException) -> OSError:
    return OSError(
        errno.ENOSPC,
        f"No space left on device while writing the checkpoint for {final} ({type(exc).__name__}: {exc}). "
        f"Nothing was written there (the partial temporary folder was removed): free space on that disk or "
        f"choose another --output (save directory) on a disk with more room.",
    )


@contextlib.contextmanager
def atomic_output_dir(path: str | os.PathLike, overwrite: bool = False, inputs=(), *,
                      kind: str = "checkpoint") -> Iterator[Path]:
    """Yield a temporary folder that replaces ``path`` only if the block finishes without error.

    The output is checked by :func:`check_output_dir` (``overwrite``, ``inputs``) and locked
    (:func:`output_lock`) while the folder is written. When the block finishes, the manifest of
    the files it wrote (:func:`write_manifest`, ``kind``) is added, then the folder is renamed into
    place. On any error the temporary folder (and any parent folders this call created) is
    removed; a full disk is re-raised as an ``OSError(ENOSPC)`` that says what to do.
    """
    with output_lock(path):
        with _atomic_output_dir(path, overwrite, inputs, kind) as tmp:
            yield tmp


@contextlib.contextmanager
def _atomic_output_dir(path, overwrite: bool, inputs, kind: str) -> Iterator[Path]:
    final = check_output_dir(path, overwrite, inputs).resolve()
    created = _make_parents(final)
    _clean_debris(final)
    # A mount point (an empty container volume) cannot be renamed: stage inside it, on its own disk.
    in_place = final.is_dir() and _is_mount_point(final)
    mode = stat.S_IMODE(final.stat().st_mode) if final.is_dir() else _default_dir_mode()
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final if in_place else final.parent))
    except BaseException as exc:
        _remove_empty(created)
        if _is_disk_full(exc):
            raise _disk_full_error(final, exc) from exc
        raise
    try:
        yield tmp
        write_manifest(tmp, kind, atomic=False)  # the last file: what was written here, for --overwrite and push
        os.chmod(tmp, mode)  # mkdtemp makes 0700; keep the old folder's mode, else what mkdir would give
        if in_place:
            _replace_contents(tmp, final)
        else:
            _replace_folder(tmp, final)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        _remove_empty(created)
        if _is_disk_full(exc) and not (isinstance(exc, OSError) and "--output" in str(exc)):
            raise _disk_full_error(final, exc) from exc
        raise


def _default_dir_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o777 & ~umask


def _is_mount_point(folder: Path) -> bool:
    return os.path.ismount(folder) or folder.stat().st_dev != folder.parent.stat().st_dev


def _replace_folder(tmp: Path, final: Path) -> None:
    """Two renames: the old folder to ``.<name>.old-PID``, the new one into place, then drop the old.
    A run killed between the renames leaves the old copy, which the next run restores (:func:`_clean_debris`)."""
    backup = None
    if final.exists():
        backup = final.with_name(f".{final.name}.old-{os.getpid()}")
        os.replace(final, backup)
    try:
        os.replace(tmp, final)
    except BaseException:
        if backup is not None:
            os.replace(backup, final)
        raise
    if backup is not None:
        shutil.rmtree(backup, ignore_errors=True)


def _replace_contents(tmp: Path, final: Path) -> None:
    """Like :func:`_replace_folder` for a folder that cannot be renamed: entry by entry, inside it."""
    backup = final / f".{final.name}.old-{os.getpid()}"
    old = [p for p in final.iterdir() if p != tmp]
    if old:
        backup.mkdir()
        for entry in old:
            os.replace(entry, backup / entry.name)
    for entry in list(tmp.iterdir()):
        os.replace(entry, final / entry.name)
    tmp.rmdir()
    shutil.rmtree(backup, ignore_errors=True)


def _clean_debris(final: Path) -> None:
    """Leftovers of runs killed while writing ``final`` (the caller holds its lock, so no live run owns them):
    temporary folders are removed; an old copy renamed aside is restored if ``final`` is missing, else removed."""
    places = [final.parent] + ([final] if final.is_dir() else [])
    for place in places:
        for tmp in place.glob(glob.escape(f".{final.name}") + ".tmp-*"):
            logger.info("Removing %s, left by an interrupted run.", tmp)
            shutil.rmtree(tmp, ignore_errors=True)
    pattern = glob.escape(f".{final.name}") + ".old-*"
    olds = sorted(final.parent.glob(pattern), key=lambda p: p.stat().st_mtime)
    if olds and not final.exists():
        logger.warning("Restoring %s from %s: a run was killed while replacing it.", final, olds[-1])
        os.replace(olds.pop(), final)
    for old in olds + (list(final.glob(pattern)) if final.is_dir() else []):
        shutil.rmtree(old, ignore_errors=True)


def atomic_write(path: str | os.PathLike, data: str | bytes | Callable[[Path], Any]) -> None:
    """Write one file through a temporary file beside ``path``, renamed into place when complete
    (``data`` may be a function that writes the given temporary path, e.g. safetensors' ``save_file``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            if not callable(data):
                fh.write(data.encode("utf-8") if isinstance(data, str) else data)
                fh.flush()
                os.fsync(fh.fileno())
        if callable(data):
            data(Path(tmp))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600 files; give the usual permissions
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _make_parents(path: Path) -> list[Path]:
    """Create the missing parent folders of ``path``; returns them deepest first (for :func:`_remove_empty`)."""
    created = []
    parent = path.parent
    while not parent.exists():
        created.append(parent)
        parent = parent.parent
    path.parent.mkdir(parents=True, exist_ok=True)
    return created


def _remove_empty(folders: list[Path]) -> None:
    for folder in folders:  # deepest first
        try:
            folder.rmdir()
        except OSError:
            break
