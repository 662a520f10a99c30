"""Upload a pruned checkpoint directory to the Hugging Face Hub."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from hfprune.card import write_model_card

logger = logging.getLogger(__name__)

__all__ = ["push_to_hub"]


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


def _ensure_card(model_dir: Path, repo_id: str) -> None:
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
    write_model_card(model_dir, base_model=base_model, pruning_config=pc, report=report,
                     eval_results=pc.get("eval_results"), command=pc.get("command"), repo_id=repo_id)


def push_to_hub(model_dir, repo_id: str, *, private: bool = False, token: str | None = None,
                exist_ok: bool = False, commit_message: str | None = None) -> str:
    """Create ``repo_id`` on the Hub and upload ``model_dir`` to it; returns the repo URL.

    A model card (README.md) is written into ``model_dir`` first if it has none.

    Raises:
        FileNotFoundError: ``model_dir`` is missing or has no ``config.json``.
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
    if not isinstance(repo_id, str) or repo_id.count("/") != 1 or not all(repo_id.split("/")):
        raise ValueError(f"Invalid repo id {repo_id!r}: use 'user-or-org/name'.")
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

    _ensure_card(model_dir, repo_id)
    try:
        info = api.upload_folder(
            repo_id=repo_id, folder_path=str(model_dir), repo_type="model",
            commit_message=commit_message or "Upload pruned model with hfprune",
            ignore_patterns=[".cache/**", "**/.cache/**", "*.tmp", ".git/**"],
        )
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
