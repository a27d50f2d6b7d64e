"""Loading components by hub id or local path, with one-line errors for user mistakes.

Every loader in the project goes through `load_pretrained` / `fetch_file`, so a missing folder,
an unreachable hub id or an incomplete checkpoint becomes a `UserError` that the command-line
entry points print as one line with exit code 2 (DESIGN.md, "Fail loudly and clearly").
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
import sys
from pathlib import Path
from typing import Any, Callable, TypeVar

_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+(/[\w.-]+)*")

T = TypeVar("T")


class UserError(Exception):
    """A problem with the user's input or files; shown as one line, exit code 2."""


def cli_entry(main: Callable[..., T]) -> Callable[..., T]:
    """Wrap a command-line `main`: a `UserError`, or an `OSError` from the file system (a folder
    that cannot be made, a full disk, no permission), prints `error: ...` on stderr and exits 2; a
    Ctrl-C that the command does not handle itself (while models load, say) prints one line and
    exits 130 (128 + SIGINT), as a training run stopped by Ctrl-C does."""

    @functools.wraps(main)
    def wrapped(*args: Any, **kwargs: Any) -> T:
        try:
            return main(*args, **kwargs)
        except (UserError, OSError) as error:
            print(f"error: {error}", file=sys.stderr)
            raise SystemExit(2) from None
        except KeyboardInterrupt:
            print("interrupted (Ctrl-C)", file=sys.stderr)
            raise SystemExit(130) from None

    return wrapped


def is_hub_id(name: str) -> bool:
    """Whether `name` is shaped like a hub path (`org/repo[/inner]`, not `./`, `/` or `~`-led)."""
    return not str(name).startswith((".", "/", "~")) and _HUB_ID.fullmatch(str(name)) is not None


def resolve_source(name: str, what: str) -> str:
    """Return `name` as an existing local path, or as a hub id (`org/repo`) to be fetched.

    A name that is neither an existing path nor shaped like a hub id is refused here, naming it.
    """
    path = os.path.expanduser(str(name))
    if os.path.exists(path):
        return path
    if not is_hub_id(name):
        raise UserError(f"{what} not found: '{name}' is not an existing file or folder")
    return str(name)


def check_device(device: str) -> str:
    """`device` if torch knows it and this machine has it (`cuda:N` only for N below the number of
    CUDA devices; likewise for other accelerators), else a `UserError`."""
    import torch

    try:
        chosen = torch.device(device)
    except RuntimeError:
        raise UserError(f"unknown --device '{device}'; e.g. cuda, cuda:1, cpu") from None
    if chosen.type == "cpu":
        return device
    backend = getattr(torch, chosen.type, None)  # torch.cuda, torch.mps, torch.xpu, ...
    if not hasattr(backend, "is_available") or not backend.is_available():
        raise UserError(f"--device {device} was asked for but {chosen.type.upper()} is not available here; use --device cpu")
    count = backend.device_count() if hasattr(backend, "device_count") else 1
    if chosen.index is not None and chosen.index >= count:
        raise UserError(f"--device {device}: this machine has {count} {chosen.type} device(s); the last is {chosen.type}:{count - 1}")
    return device


def check_folder_path(path: str, flag: str, writable: bool = True) -> None:
    """A `UserError` when `path` cannot be (or become) a folder we write in: it, or the nearest part
    of it that exists, is a file or (when `writable`; a folder only read may be read-only) is
    not writable."""
    for part in [path, *(str(parent) for parent in Path(path).parents)]:
        if os.path.exists(part):
            if not os.path.isdir(part):
                raise UserError(f"{flag} '{path}': '{part}' is a file, not a folder")
            if writable and not os.access(part, os.W_OK | os.X_OK):
                raise UserError(f"{flag} '{path}': '{part}' is not writable")
            return


def content_digest(path: str) -> str:
    """The first 16 hex digits of the sha256 of a file's bytes, or of a folder's files (each one's
    path inside the folder, then its bytes, in path order): what a checkpoint holds, so one
    retrained at the same path is told apart from the one it replaced."""
    root = Path(path)
    digest = hashlib.sha256()
    for file in [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(file.relative_to(root).as_posix().encode() + b"\0")
        with open(file, "rb") as handle:
            digest.update(hashlib.file_digest(handle, "sha256").digest())
    return digest.hexdigest()[:16]


def read_prompt_file(path: str, flag: str) -> list[str]:
    """The prompts of a text file: its non-blank lines, stripped, in order (prompt k is the k-th of
    them, as in sample.py's `NNNN_KK` names). A UTF-8 byte-order mark is not text. A missing,
    unreadable or empty file is a `UserError` naming `flag`."""
    try:
        with open(path, encoding="utf-8-sig") as handle:
            prompts = [line.strip() for line in handle if line.strip()]
    except (OSError, UnicodeDecodeError) as error:
        raise UserError(f"cannot read {flag} '{path}': {error.__class__.__name__}: {error}") from None
    if not prompts:
        raise UserError(f"{flag} '{path}' holds no prompts")
    return prompts


def error_line(error: BaseException, limit: int = 300) -> str:
    """The first line of a library's error message (its class name when it has none), cut at
    `limit` characters (marked by "..."): what a one-line `UserError` or warning quotes of it."""
    text = str(error).strip()
    line = text.splitlines()[0] if text else type(error).__name__
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _hub_hint(name: str, what: str, error: BaseException) -> UserError:
    first = name.split("/")[0]
    if os.path.isdir(first):  # `runs/align-typo/final` with `runs/` here: most likely a mistyped local path
        return UserError(f"{what} not found: no such file or folder '{name}' (nor a hub repo '{first}/...')")
    return UserError(
        f"could not load {what} '{name}': no such local path, and fetching it from the hub failed "
        f"({error_line(error)}); check the path, or download it elsewhere and pass the local folder"
    )


def split_hub_path(source: str) -> tuple[str, str | None]:
    """`org/repo/sub/folder` -> (`org/repo`, `sub/folder`); a local path is returned whole."""
    if os.path.exists(source):
        return source, None
    parts = source.split("/")
    return "/".join(parts[:2]), ("/".join(parts[2:]) or None)


def load_pretrained(cls: Any, name: str, what: str, subfolder: str | None = None, **kwargs: Any) -> Any:
    """`cls.from_pretrained(name, subfolder=...)` with a one-line `UserError` on failure.

    Works the same for a hub id and a local folder (the hub's folder layout). A hub id may name
    a folder inside the repo: `shihaozhao/LaVi-Bridge/t5_unet/adapter`.
    """
    source, inner = split_hub_path(resolve_source(name, what))
    if inner is not None:
        subfolder = f"{inner}/{subfolder}" if subfolder else inner
    if subfolder is not None:
        kwargs["subfolder"] = subfolder
        if os.path.isdir(source) and not os.path.isdir(os.path.join(source, subfolder)):
            raise UserError(f"{what} not found: '{source}' has no '{subfolder}/' folder")
    where = f"{name}/{subfolder}" if subfolder else name
    try:
        if not _is_model(cls):  # tokenizers, schedulers, pipelines
            return cls.from_pretrained(source, **kwargs)
        model, info = cls.from_pretrained(source, output_loading_info=True, **kwargs)
    except (OSError, ValueError) as error:
        if os.path.exists(source):
            raise UserError(
                f"could not load {what} from '{where}' ({error_line(error)}): the folder is incomplete, "
                "damaged or holds another kind of model"
            ) from None
        raise _hub_hint(where, what, error) from None
    # transformers and diffusers leave weights the files lack at their random initial values, with a
    # warning only: refuse instead. Extra weights in the files (T5's decoder) are fine.
    missing = list(info.get("missing_keys") or []) + [str(key) for key in info.get("mismatched_keys") or []]
    if missing:
        raise UserError(
            f"{what} at '{where}' lacks {len(missing)} of {cls.__name__}'s weights (e.g. {missing[0]}): "
            "the folder is damaged or holds another kind of model"
        )
    return model


def _is_model(cls: Any) -> bool:
    """Whether `cls` is a torch module class (whose `from_pretrained` can report its loading)."""
    import torch

    return isinstance(cls, type) and issubclass(cls, torch.nn.Module)


def _hub_file(repo: str, filename: str, what: str) -> str:
    """Download one file of a hub repo (or take it from the cache); one-line `UserError` on failure."""
    from huggingface_hub import hf_hub_download

    try:
        return hf_hub_download(repo, filename)
    except Exception as error:  # hub errors come in many classes; all mean "could not fetch"
        raise _hub_hint(f"{repo}/{filename}", what, error) from None


def fetch_file(source: str, filename: str, what: str) -> str:
    """Path of `filename` inside a local folder or a hub repo (downloaded if needed)."""
    source, inner = split_hub_path(resolve_source(source, what))
    if inner is not None:
        filename = f"{inner}/{filename}"
    if os.path.isdir(source):
        path = os.path.join(source, filename)
        if not os.path.exists(path):
            raise UserError(f"{what} not found: '{path}' does not exist")
        return path
    return _hub_file(source, filename, what)


def local_path(spec: str, what: str) -> str:
    """A local file or folder for `spec`: an existing path, or a hub path downloaded on demand.

    Hub paths are `org/repo` (whole repo), `org/repo/folder` (one folder) or `org/repo/file.ext`.
    """
    source, inner = split_hub_path(resolve_source(spec, what))
    if os.path.exists(source):
        return source
    if inner is not None and os.path.splitext(inner)[1]:
        return _hub_file(source, inner, what)
    from huggingface_hub import snapshot_download

    try:
        root = snapshot_download(source, allow_patterns=[f"{inner}/*"] if inner else None)
    except Exception as error:  # hub errors come in many classes; all mean "could not fetch"
        raise _hub_hint(spec, what, error) from None
    return os.path.join(root, inner) if inner else root
