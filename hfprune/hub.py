"""Upload a pruned checkpoint directory to the Hugging Face Hub: the checkpoint, not the folder.

What is uploaded is an allow-list (:func:`upload_plan`), shown before the upload:

* a folder hfprune saved (it has ``hfprune_manifest.json``, :mod:`hfprune.fs`): exactly the files
  the save wrote, as the manifest lists them (the manifest itself stays local), plus ``README.md``;
* any other folder: the model files of a transformers checkpoint at its top level only
  (:data:`MODEL_FILES`: ``config.json``, ``generation_config.json``, ``*.safetensors`` and their
  index, tokenizer files, ``README.md``, hfprune's JSON reports); never pickles (``*.bin``, ``*.pt``).

Never, in either case: hidden files and folders (``.env``, ``.netrc``, ``.ssh/``, ``.git/``, ``.cache/``)
and symbolic links that point outside the folder. A missing ``README.md`` is generated (the model
card) and uploaded from memory: the folder itself is never written. ``hfprune push --dry-run``
prints the plan and uploads nothing.
"""

from __future__ import annotations

import fnmatch
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

from hfprune.card import write_model_card
from hfprune.fs import MANIFEST, read_manifest

logger = logging.getLogger(__name__)

__all__ = ["push_to_hub", "upload_plan", "check_repo_id", "MODEL_FILES"]

MODEL_FILES = ("config.json", "generation_config.json", "*.safetensors", "*.safetensors.index.json",
               "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
               "tokenizer.model", "spiece.model", "vocab.json", "vocab.txt", "merges.txt", "chat_template.jinja",
               "chat_template.json", "README.md", "pruning_report.json", "recovery_report.json", "eval_results.json",
               "adapter_config.json")
"""What ``hfprune push`` uploads from a folder hfprune did not save (no manifest): top-level files matching these."""

GENERATED_CARD = "README.md (generated model card)"


def check_repo_id(repo_id) -> str:
    """``repo_id`` if it is a valid ``namespace/name`` model repo id (huggingface_hub's own validator: no ``..``,
    ``--``, leading or trailing ``-``/``.``, at most 96 characters), else ``ValueError`` saying what to change."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if not isinstance(repo_id, str) or repo_id.count("/") != 1 or not all(repo_id.split("/")):
        raise ValueError(f"Invalid repo id {repo_id!r}: use 'user-or-org/name'.")
    try:
        validate_repo_id(repo_id)
    except HFValidationError as err:
        raise ValueError(f"Invalid repo id {repo_id!r}: {err} Use 'user-or-org/name' with letters, digits, "
                         f"'-', '_' and '.'.") from None
    return repo_id


def _inside(path: Path, folder: Path) -> bool:
    try:
        target = path.resolve(strict=True)
    except (OSError, RuntimeError):
        return False
    return target.is_file() and folder in target.parents


def upload_plan(model_dir) -> dict:
    """What :func:`push_to_hub` would upload from ``model_dir``, without uploading anything:
    ``{"files": [relative paths], "skipped": {path: reason}, "source": "manifest" | "model files",
    "generate_card": bool}`` (see the module docstring for the rules)."""
    folder = Path(model_dir)
    root = folder.resolve()
    manifest = read_manifest(folder)
    listed = set(manifest["files"]) | {"README.md"} if manifest is not None else None
    files, skipped = [], {}
    for dirpath, dirnames, filenames in os.walk(folder):
        base = Path(dirpath)
        for d in sorted(dirnames):
            rel = (base / d).relative_to(folder).as_posix()
            if d.startswith("."):
                skipped[rel + "/"] = "hidden folder"
            elif (base / d).is_symlink():
                skipped[rel + "/"] = "symbolic link to a folder"
            elif listed is None:
                skipped[rel + "/"] = "subfolder of a folder hfprune did not save"
        dirnames[:] = [d for d in dirnames if not d.startswith(".") and not (base / d).is_symlink()
                       and listed is not None]
        for name in sorted(filenames):
            path = base / name
            rel = path.relative_to(folder).as_posix()
            if rel == MANIFEST:
                continue
            if any(part.startswith(".") for part in rel.split("/")):
                skipped[rel] = "hidden file"
            elif listed is not None and rel not in listed:
                skipped[rel] = f"not written by hfprune (not in {MANIFEST})"
            elif listed is None and not any(fnmatch.fnmatchcase(name, pat) for pat in MODEL_FILES):
                skipped[rel] = "not a model file"
            elif path.is_symlink() and not _inside(path, root):
                skipped[rel] = "symbolic link leaving the folder"
            elif not path.is_file():
                skipped[rel] = "not a regular file"
            else:
                files.append(rel)
    return {"files": sorted(files), "skipped": dict(sorted(skipped.items())),
            "source": "manifest" if manifest is not None else "model files",
            "generate_card": "README.md" not in files}


def format_plan(plan: dict, model_dir, repo_id: str | None = None) -> str:
    """The plan as text: the files to upload, then what is left out and why."""
    where = f" to {repo_id}" if repo_id else ""
    how = (f"the files its {MANIFEST} lists" if plan["source"] == "manifest"
           else "model files only (no hfprune manifest)")
    lines = [f"Uploading from {model_dir}{where}: {how}:"]
    lines += [f"  {f}" for f in plan["files"]]
    if plan["generate_card"]:
        lines.append(f"  {GENERATED_CARD}")
    if plan["skipped"]:
        lines.append("Not uploaded:")
        lines += [f"  {f} ({why})" for f, why in plan["skipped"].items()]
    return "\n".join(lines)


def _network_error_types() -> tuple[type[BaseException], ...]:
    types: list[type[BaseException]] = [ConnectionError, TimeoutError]
    for module_name in ("httpx2", "httpx", "requests"):
        try:
            module = __import__(module_name)
        except ImportError:
            continue
        for attr in ("TransportError", "ConnectionError", "Timeout", "TimeoutException", "NetworkError"):
            exc = getattr(module, attr, None)
            if isinstance(exc, type) and issubclass(exc, BaseException):
                types.append(exc)
    return tuple(types)


def _network_error(endpoint: str, exc: BaseException) -> RuntimeError:
    return RuntimeError(
        f"Could not reach the Hugging Face Hub at {endpoint} ({type(exc).__name__}: {exc}). "
        f"Check your network connection (or HF_ENDPOINT if you use a mirror) and that HF_HUB_OFFLINE is not set, "
        f"then run the push again; uploads of files already on the Hub are skipped."
    )


def _card_bytes(model_dir: Path, repo_id: str) -> bytes:
    """The model card of ``model_dir`` for ``repo_id``, rendered in a temporary folder (never in ``model_dir``)."""
    with tempfile.TemporaryDirectory(prefix="hfprune-card-") as tmp:
        if (model_dir / "config.json").is_file():  # the card reads the checkpoint format from it
            shutil.copyfile(model_dir / "config.json", Path(tmp) / "config.json")
        _ensure_card(model_dir, repo_id, into=Path(tmp))
        return (Path(tmp) / "README.md").read_bytes()


def _ensure_card(model_dir: Path, repo_id: str, into: Path) -> None:
    """Write the model card of ``model_dir`` into the folder ``into`` if ``model_dir`` has none."""
    if (model_dir / "README.md").exists():
        return

    config = {}
    if (model_dir / "config.json").is_file():
        config = json.loads((model_dir / "config.json").read_text())
    pc = config.get("pruning_config") or {}
    report = None
    report_path = model_dir / "pruning_report.json"
    if report_path.is_file():
        try:
            report = json.loads(report_path.read_text())
        except ValueError:
            report = None
    base_model = pc.get("base_model") or config.get("_name_or_path") or None
    write_model_card(into, base_model=base_model, pruning_config=pc, report=report,
                     eval_results=pc.get("eval_results"), command=pc.get("command"), repo_id=repo_id)


def push_to_hub(model_dir, repo_id: str, *, private: bool = False, token: str | None = None,
                exist_ok: bool = False, commit_message: str | None = None) -> str:
    """Create ``repo_id`` on the Hub and upload the checkpoint in ``model_dir`` to it; returns the repo URL.

    Only the files of :func:`upload_plan` are uploaded (logged first): those the hfprune save wrote, or
    the model files of a folder hfprune did not save; never hidden files or links leaving the folder.
    Without a README.md a model card is generated and uploaded (``model_dir`` is not written).

    Raises:
        FileNotFoundError: ``model_dir`` is missing or has no ``config.json``, or nothing in it may be uploaded.
        ValueError: no token (pass ``token=``, set ``HF_TOKEN`` or run ``hf auth login``), a token
            the Hub rejects, a malformed ``repo_id``, or the repo already exists and ``exist_ok`` is False.
        RuntimeError: the Hub cannot be reached, or it answered with an unexpected error.
    """
    from huggingface_hub import HfApi, constants, get_token
    from huggingface_hub.errors import HfHubHTTPError

    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(
            f"{model_dir} is not a saved model directory (no config.json); pass the output directory of "
            f"`hfprune prune` or `save_pretrained`."
        )
    check_repo_id(repo_id)
    plan = upload_plan(model_dir)
    if "config.json" not in plan["files"]:
        raise FileNotFoundError(f"{model_dir}/config.json may not be uploaded ({plan['skipped'].get('config.json')})"
                                f": pass the output folder of `hfprune prune` or `save_pretrained`.")
    logger.info("%s", format_plan(plan, model_dir, repo_id))
    token = token or get_token()
    if not token:
        raise ValueError(
            "No Hugging Face token found: pass token=... (or --token), set the HF_TOKEN environment variable, "
            "or run `hf auth login`. The token needs write access."
        )
    endpoint = constants.ENDPOINT
    api = HfApi(endpoint=endpoint, token=token)
    network_errors = _network_error_types()

    try:
        url = api.create_repo(repo_id, private=private, exist_ok=exist_ok, repo_type="model")
    except HfHubHTTPError as exc:
        status = exc.response.status_code if exc.response is not None else None
        if status == 409:
            raise ValueError(
                f"The repository {repo_id} already exists on {endpoint}. Pass exist_ok=True (--exist-ok) to "
                f"upload into it as a new commit, or choose another repo name."
            ) from exc
        if status in (401, 403):
            raise ValueError(
                f"The Hub rejected the token for creating {repo_id} (HTTP {status}): use a token with write "
                f"access to the '{repo_id.split('/')[0]}' namespace."
            ) from exc
        raise RuntimeError(f"Creating {repo_id} on {endpoint} failed: {exc}") from exc
    except network_errors as exc:
        raise _network_error(endpoint, exc) from exc

    from huggingface_hub import CommitOperationAdd

    operations = [CommitOperationAdd(path_in_repo=f, path_or_fileobj=str(model_dir / f)) for f in plan["files"]]
    if plan["generate_card"]:
        operations.append(CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=_card_bytes(model_dir, repo_id)))
    try:
        info = api.create_commit(repo_id=repo_id, operations=operations, repo_type="model",
                                 commit_message=commit_message or "Upload pruned model with hfprune")
    except HfHubHTTPError as exc:
        status = exc.response.status_code if exc.response is not None else None
        if status in (401, 403):
            raise ValueError(f"The Hub rejected the token for uploading to {repo_id} (HTTP {status}): "
                             f"use a token with write access.") from exc
        raise RuntimeError(f"Uploading {model_dir} to {repo_id} failed: {exc}") from exc
    except network_errors as exc:
        raise _network_error(endpoint, exc) from exc
    logger.info("Pushed %s to %s (%s)", model_dir, repo_id, getattr(info, "commit_url", ""))
    return str(url)
