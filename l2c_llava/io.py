"""Atomic file writes and small JSON helpers shared by every stage, and one writer per folder.

Every file a run writes goes through these helpers: the content lands in a temporary file in the
same folder, is flushed and fsynced, then `os.replace`d over the target, so a killed process leaves
either the old file or the new one, never half of one.

One writer per run or output folder (:func:`run_lock`): an advisory lock held for the run's whole life.
``<folder>/.l2c.lock`` is locked with the ``filelock`` package (``flock`` on POSIX: the system releases
it when the holder dies, however it dies, so a stale lock of a killed process is simply taken over);
``<folder>/.l2c.lock.json`` beside it names the holder (PID, host, command, start time) for the
message a second run gets. Each folder has its own lock, so ``l2c pipeline`` holding its output folder
does not block the steps it runs as child processes in sub-folders of it.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import re
import socket
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from l2c_llava.errors import CannotRunError, OutputError

logger = logging.getLogger(__name__)

OUTPUT_MARKER = ".l2c_output.json"  # written by publish_folder: what kind of output, which files
LOCK_NAME = ".l2c.lock"
HOLDER_NAME = ".l2c.lock.json"
# a folder's run lock and the note naming its holder (run_lock): bookkeeping, not content
LOCK_FILES = (LOCK_NAME, HOLDER_NAME)
_UMASK: int | None = None


def umask() -> int:
    """The process umask (read once: os.umask can only be read by setting it)."""
    global _UMASK
    if _UMASK is None:
        _UMASK = os.umask(0o022)
        os.umask(_UMASK)
    return _UMASK


def follow_umask(path: str | os.PathLike, folder: bool = False) -> None:
    """Give a file made by mkstemp (0600) or a folder made by mkdtemp (0700) the mode an ordinary
    open()/mkdir() would have given it, so teammates can read what the user's umask lets them."""
    os.chmod(path, (0o777 if folder else 0o666) & ~umask())


def follow_umask_tree(folder: str | os.PathLike) -> None:
    """`folder`, the folders and the files under it with the modes the umask gives: writers such as
    safetensors' ``save_file`` (and so ``save_pretrained``) create their files 0600."""
    folder = Path(folder)
    follow_umask(folder, folder=True)
    for p in folder.rglob("*"):
        if not p.is_symlink():
            follow_umask(p, folder=p.is_dir())


def _failed_write_errno(e: BaseException, path: Path) -> int | None:
    """The system error behind a failed write that a library reported in its own words: safetensors
    says "(os error 27)"; torch.save only "unexpected pos", so a full disk or a file past the size limit
    is recognised by looking at them."""
    if isinstance(e, OSError):
        return e.errno
    found = re.search(r"\(os error (\d+)\)", str(e))
    if found:
        return int(found.group(1))
    if not isinstance(e, RuntimeError):
        return None
    try:
        import resource

        limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
        if limit != resource.RLIM_INFINITY and any(
            q.is_file() and q.stat().st_size >= limit for q in ([path] if path.is_file() else path.rglob("*"))
        ):
            return errno.EFBIG
    except (ImportError, OSError, ValueError):
        pass
    try:
        import shutil

        folder = path if path.is_dir() else path.parent
        if shutil.disk_usage(folder).free < 1 << 20:
            return errno.ENOSPC
    except OSError:
        pass
    return None


@contextmanager
def writing(path: str | os.PathLike) -> Iterator[None]:
    """Writes to `path` (a file or a folder) inside this block that fail for a system reason (a full
    disk, the file size limit, a read-only file system, no permission) raise an ``OSError`` naming
    `path`, whatever the writer (safetensors, torch.save, PIL) raised: ``l2c`` prints it as one line.
    Any other failure is left as it is."""
    try:
        yield
    except OSError as e:
        if e.filename is None and e.errno is not None:
            raise OSError(e.errno, e.strerror or os.strerror(e.errno), str(path)) from e
        raise
    except Exception as e:
        code = _failed_write_errno(e, Path(path))
        if code is None:
            raise
        raise OSError(code, os.strerror(code), str(path)) from e


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write `data` to `path` atomically (temp file in the same folder, fsync, rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with writing(path):
            os.fchmod(fd, 0o666 & ~umask())
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return path


def atomic_save(path: str | os.PathLike, write: Callable[[Path], object]) -> Path:
    """Write `path` atomically through a writer that takes a file name (``fig.savefig``, ``image.save``,
    safetensors' ``save_file``, ``tarfile.open``): it writes a temp file in the same folder, with the
    same suffix (formats are chosen by it), which is renamed into place once complete."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{path.suffix}", dir=path.parent)
    os.close(fd)
    try:
        with writing(path):
            write(Path(tmp))
            os.chmod(tmp, 0o666 & ~umask())
            os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def dumps_json(obj: Any, indent: int | None = 2) -> str:
    """Deterministic JSON text (sorted keys are NOT forced: callers control field order)."""
    return json.dumps(obj, ensure_ascii=False, indent=indent) + "\n"


def atomic_write_json(path: str | os.PathLike, obj: Any, indent: int | None = 2) -> Path:
    return atomic_write_text(path, dumps_json(obj, indent=indent))


def atomic_write_jsonl(path: str | os.PathLike, rows: Iterable[dict]) -> Path:
    return atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def write_results(folders: Iterable[tuple[str | os.PathLike, str]], obj: Any, markdown: str) -> None:
    """`obj` as STEM.json and `markdown` as STEM.md in each (folder, stem), atomically."""
    for folder, stem in folders:
        atomic_write_json(Path(folder) / f"{stem}.json", obj)
        atomic_write_text(Path(folder) / f"{stem}.md", markdown)


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def file_record(path: str | os.PathLike) -> dict:
    """What an output records of each file it wrote, to be checked later by :func:`records_problem`."""
    return {"bytes": Path(path).stat().st_size, "sha256": sha256_file(path)}


def records_problem(root: str | os.PathLike, records: dict, *, hashes: bool = True) -> str | None:
    """Why the files `records` lists (path under `root`, or absolute -> :func:`file_record`) are not
    what was written (None: they are): a file missing or of another size (every file first: cheap),
    then, with `hashes`, another sha256."""
    root = Path(root)
    for rel, want in records.items():
        f = root / rel
        if not f.is_file():
            return f"{rel} is missing"
        if f.stat().st_size != want.get("bytes"):
            return f"{rel} holds {f.stat().st_size} bytes, {want.get('bytes')} when written"
    if hashes:
        for rel, want in records.items():
            if sha256_file(root / rel) != want.get("sha256"):
                return f"{rel} changed since it was written (sha256 differs)"
    return None


def safetensors_problem(path: str | os.PathLike) -> str | None:
    """Why the safetensors file `path` is not whole (None: it is): no readable header, or a size other
    than the one its header implies (a copy cut short, a disk that filled up). Reads the header only."""
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            n = int.from_bytes(head, "little") if len(head) == 8 else -1
            if not 2 <= n <= 100_000_000:
                return "no safetensors header"
            header = json.loads(f.read(n))
        end = max(
            (v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"),
            default=0,
        )
        size = os.path.getsize(path)
    except (ValueError, KeyError, TypeError, IndexError, AttributeError):
        return "its safetensors header cannot be read"
    if size != 8 + n + end:
        return f"{size} bytes, its header describes {8 + n + end} (cut short or damaged)"
    return None


def tree_digest(root: str | os.PathLike, exclude: Iterable[str] = ()) -> str:
    """One sha256 over every file under `root` (relative path + content), in sorted order.

    Used as the fingerprint of a data folder: equal digests mean byte-identical trees. The folder's
    run lock (:data:`LOCK_FILES`) is bookkeeping, not content, and is left out.
    """
    root = Path(root)
    skip = set(exclude) | set(LOCK_FILES)
    h = hashlib.sha256()
    for p in sorted(q for q in root.rglob("*") if q.is_file()):
        rel = p.relative_to(root).as_posix()
        if rel in skip:
            continue
        h.update(rel.encode())
        h.update(b"\0")
        h.update(sha256_file(p).encode())
        h.update(b"\n")
    return h.hexdigest()


def ensure_folder(folder: str | os.PathLike, what: str = "output") -> Path:
    """Create `folder` (and its parents), or say plainly why it cannot be: an existing file in the
    way, or no permission."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise OutputError(
            f"{what} folder {folder}: {folder} (or a folder above it) is an existing file; choose "
            "another folder"
        ) from None
    except NotADirectoryError:
        raise OutputError(
            f"{what} folder {folder}: a folder above it is an existing file; choose another folder"
        ) from None
    except PermissionError as e:
        raise OutputError(
            f"{what} folder {folder}: no permission to create it ({e.strerror}: {e.filename}); "
            "choose a folder you can write to"
        ) from None
    if not os.access(folder, os.W_OK | os.X_OK):
        raise OutputError(f"{what} folder {folder} is not writable; choose a folder you can write to")
    return folder


def check_output_file(out: str | os.PathLike, what: str = "--out") -> Path:
    """Refuse, before any work, an output file whose folder does not exist or cannot be written, or
    that names a folder."""
    out = Path(out)
    parent = out.parent if str(out.parent) else Path(".")
    if out.is_dir():
        raise OutputError(f"{what} {out} is a folder; give the path of a file to write")
    if not parent.is_dir():
        raise OutputError(
            f"{what} {out}: the folder {parent} does not exist{' (it is a file)' if parent.exists() else ''}; "
            f"create it first (mkdir -p {parent}) or choose another path"
        )
    if not os.access(parent, os.W_OK | os.X_OK) or (out.exists() and not os.access(out, os.W_OK)):
        raise OutputError(f"{what} {out}: no permission to write there; choose a path you can write to")
    return out


def check_output_folder(
    out: str | os.PathLike, kind: str, overwrite: bool = False, legacy_marker: str | None = None
) -> Path:
    """Refuse, before any work, an output folder `publish_folder` could not fill without losing
    something: an existing file, a folder that cannot be written, or a non-empty folder that is not a
    previous output of this `kind` (recognised by the marker publish_folder writes, or by
    `legacy_marker`, the kind's own metadata file in outputs made before the marker existed) unless
    `overwrite`. A previous output holding files it did not write is refused too: they would be lost."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise OutputError(f"{out} is an existing file, not a folder; choose another output folder")
    parent = next((p for p in [out, *out.parents] if p.exists()), Path("."))
    if not parent.is_dir():
        raise OutputError(f"{out}: {parent} is a file, not a folder; choose another output folder")
    if not os.access(parent, os.W_OK | os.X_OK) or (
        out.is_dir() and not os.access(out.parent, os.W_OK | os.X_OK)
    ):
        raise OutputError(
            f"{out}: no permission to write in {parent if parent != out else out.parent}; "
            "choose a folder you can write to"
        )
    if not out.is_dir() or overwrite or not [p for p in out.iterdir() if p.name not in LOCK_FILES]:
        return out
    marker = out / OUTPUT_MARKER
    if marker.is_file():
        try:
            meta = json.loads(marker.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            meta = {}
        if meta.get("kind") != kind:
            raise OutputError(
                f"{out} holds a {meta.get('kind', 'unknown')!r} output, not a {kind!r} one; choose "
                "another output folder, or pass --overwrite to replace it"
            )
        known = set(meta.get("files", [])) | {OUTPUT_MARKER, *LOCK_FILES}
        extra = sorted(
            str(p.relative_to(out))
            for p in out.rglob("*")
            if p.is_file() and str(p.relative_to(out)) not in known
        )
        if extra:
            raise OutputError(
                f"{out} is a previous {kind} output, but holds files it did not write "
                f"({', '.join(extra[:5])}{' ...' if len(extra) > 5 else ''}): they would be lost. "
                "Move them away, or pass --overwrite to replace the folder anyway"
            )
        return out
    if legacy_marker and (out / legacy_marker).is_file():
        return out
    shown = sorted(p.name for p in out.iterdir() if p.name not in LOCK_FILES)
    raise OutputError(
        f"{out} is not empty ({', '.join(shown[:5])}{' ...' if len(shown) > 5 else ''}) and is not a "
        f"previous {kind} output: refusing to replace it. Choose a new or empty output folder, or "
        "pass --overwrite to replace it"
    )


def _tmp_prefix(out: Path, pid: int | None = None) -> str:
    """``.NAME.l2c-tmp-PID-HOST-``: HOST (a short hash of the host name) keeps a run on one machine from
    taking another machine's live temporary folder on a shared disk for a dead one."""
    import socket

    host = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]
    return f".{out.name}.l2c-tmp-{os.getpid() if pid is None else pid}-{host}-"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def clean_interrupted(out: str | os.PathLike) -> list[Path]:
    """Remove the temporary folders that killed publishes of `out` on this machine left behind
    (``.NAME.l2c-tmp-PID-HOST-*`` siblings whose process is gone); returns them. A previous output set
    aside by a publish killed between its two renames is put back instead."""
    import shutil

    out = Path(out)
    removed = []
    if not out.parent.is_dir():
        return removed
    for p in out.parent.glob(f".{out.name}.l2c-tmp-*"):
        pid = p.name[len(f".{out.name}.l2c-tmp-") :].split("-", 1)[0]
        if not (pid.isdigit() and p.name.startswith(_tmp_prefix(out, int(pid)))):
            continue  # not ours, or another machine's
        if p.is_dir() and not p.is_symlink() and not _pid_alive(int(pid)):
            if p.name.endswith("-old") and not out.exists():  # killed between the two renames
                try:
                    p.rename(out)
                except OSError:  # another run put it back first
                    pass
                continue
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


def work_folder(out: str | os.PathLike) -> Path:
    """A new, empty temporary folder beside `out` to build it in: ``.NAME.l2c-tmp-PID-HOST-RANDOM``, a
    name no user folder has (hidden, this process's PID and host, a random suffix), created here so
    it cannot be anyone else's; :func:`clean_interrupted` removes it once its process is gone."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=_tmp_prefix(out), dir=out.parent))
    follow_umask(tmp, folder=True)
    return tmp


def move_into_place(
    built: str | os.PathLike,
    out: str | os.PathLike,
    aside: str | os.PathLike | None = None,
    carry: Iterable[str] = (),
) -> Path:
    """Put the complete folder `built` (a sibling of `out`) at `out`, with the modes the umask gives
    (weights included). A folder already there is renamed to `aside` first and removed only once
    `built` is in place: a kill between the two renames loses nothing (:func:`clean_interrupted` puts a
    set-aside folder back). `aside` defaults to a new hidden name (``.NAME.l2c-tmp-PID-HOST-RANDOM-old``);
    one that exists already is never removed: another new name is used. `carry` names files of the old
    folder (its run lock) that are hard-linked into `built` first, so the new folder holds the very lock
    file the caller holds, with no moment at which `out` has none."""
    import secrets
    import shutil

    built, out = Path(built), Path(out)
    follow_umask_tree(built)
    if aside is None or Path(aside).exists() or Path(aside).is_symlink():
        aside = out.parent / f"{_tmp_prefix(out)}{secrets.token_hex(4)}-old"
    aside = Path(aside)
    if out.exists():
        for name in carry:
            if (out / name).is_file() and not (built / name).exists():
                try:
                    os.link(out / name, built / name)
                except OSError:  # no hard links here (some network file systems): the lock moves late
                    pass
        out.rename(aside)
        try:
            built.rename(out)
        except BaseException:
            aside.rename(out)  # put the previous one back: nothing lost
            raise
        shutil.rmtree(aside, ignore_errors=True)  # ours: renamed from `out` just above
    else:
        out.parent.mkdir(parents=True, exist_ok=True)
        built.rename(out)
    return out


def publish_folder(
    out: str | os.PathLike,
    build,
    kind: str = "output",
    overwrite: bool = False,
    legacy_marker: str | None = None,
) -> Path:
    """Build a folder in a temporary sibling (``build(tmp)`` writes and checks it), then move it into
    place: a failed or killed build leaves the previous folder untouched, and the next publish removes
    the killed one's temporary folder. `out` must pass :func:`check_output_folder` (a previous output
    of this `kind`, which is replaced, or a new or empty folder; anything else only with `overwrite`).
    One writer: the run lock of `out` (``.l2c.lock``, kept in the new folder) is held throughout.
    The folder records its kind, files and their sizes and sha256 in ``.l2c_output.json``
    (:func:`output_problem` checks them) and follows the user's umask (weights included)."""
    import shutil

    out = Path(out)
    check_output_folder(out, kind, overwrite, legacy_marker)  # before the lock puts a file in it
    for p in clean_interrupted(out):
        logger.warning("removed %s, left by an interrupted earlier run", p)
    created = not out.exists()
    try:
        with run_lock(out, kind):  # one writer: a second publish into `out` stops at once
            check_output_folder(out, kind, overwrite, legacy_marker)  # as the lock holder sees it
            tmp = work_folder(out)
            try:
                with writing(out):
                    build(tmp)
                    files = sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*") if p.is_file())
                    content = {f: file_record(tmp / f) for f in files}
                    atomic_write_json(tmp / OUTPUT_MARKER, {"kind": kind, "files": files, "content": content})
                    move_into_place(tmp, out, carry=LOCK_FILES)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        if created:
            remove_lock_only_folder(out)
        raise
    return out


def output_problem(out: str | os.PathLike) -> str | None:
    """Why the output folder `out` is not what :func:`publish_folder` wrote (None: it is, or it was
    written before sizes and hashes were recorded): a file missing, of another size (cheap checks
    first) or with another sha256."""
    out = Path(out)
    try:
        content = json.loads((out / OUTPUT_MARKER).read_text(encoding="utf-8")).get("content")
    except (OSError, ValueError, AttributeError) as e:
        return f"its {OUTPUT_MARKER} cannot be read ({type(e).__name__})"
    if not isinstance(content, dict):
        return None
    return records_problem(out, content)


def remove_lock_only_folder(folder: str | os.PathLike) -> None:
    """Remove `folder` when it holds nothing but its run lock: what a failed first write into a new
    folder leaves (the lock created it). Anything else in it, it is kept."""
    folder = Path(folder)
    try:
        if (
            folder.is_dir()
            and not folder.is_symlink()
            and {p.name for p in folder.iterdir()} <= set(LOCK_FILES)
        ):
            for name in LOCK_FILES:
                (folder / name).unlink(missing_ok=True)
            folder.rmdir()
    except OSError:  # another run took it meanwhile, or it cannot be written: leave it
        pass


# -- one writer per folder ------------------------------------------------------------------------------


def _lock_holder(folder: Path) -> dict:
    try:
        return json.loads((folder / HOLDER_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def _main_process() -> bool:
    """Only the first process of a distributed launch locks (the others write nothing of their own)."""
    return os.environ.get("RANK", "0") in ("", "0")


@contextmanager
def run_lock(folder: str | os.PathLike, what: str = "run") -> Iterator[Path]:
    """Hold the lock of `folder` (created, with a clear error when it cannot be) while the block runs.
    A second holder fails at once with :class:`CannotRunError` naming the first one's PID and command."""
    from filelock import FileLock, Timeout

    folder = ensure_folder(folder, what)
    if not _main_process():
        yield folder
        return
    lock = FileLock(str(folder / LOCK_NAME))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        h = _lock_holder(folder)
        who = f"PID {h.get('pid', '?')}" + (f" on {h['host']}" if h.get("host") else "")
        cmd = f" (`{h['command']}`, started {h.get('started', '?')})" if h.get("command") else ""
        raise CannotRunError(
            f"{folder} is in use by another {h.get('what', 'run')}: {who}{cmd}. Wait for it to finish, stop it, "
            "or use another output folder"
        ) from None
    except PermissionError:
        raise CannotRunError(
            f"{folder}: no permission to create its lock file {LOCK_NAME}; choose a folder you can write to"
        ) from None
    try:
        old = _lock_holder(folder)
        if old.get("pid") and old.get("pid") != os.getpid():
            logger.info("%s: taking over the lock left by PID %s, which is gone", folder, old["pid"])

        atomic_write_json(
            folder / HOLDER_NAME,
            {
                "pid": os.getpid(),
                "what": what,
                "host": socket.gethostname(),
                "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]) if sys.argv else what,
                "started": time.strftime("%Y-%m-%d %H:%M:%S"),
            },
        )
        yield folder
    finally:
        try:
            (folder / HOLDER_NAME).unlink(missing_ok=True)
        finally:
            lock.release()
