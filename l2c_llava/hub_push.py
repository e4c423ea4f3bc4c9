"""Publishing an export to the Hugging Face Hub: ``l2c export vision|llm2clip|llava ... --push-to-hub ID``.

The exported folder (with its model card, l2c_llava.cards) is uploaded as it is, in one commit, to the
model repository ``ID`` (created if needed; ``--private`` for a new private one). The token is the
usual one: ``HF_TOKEN``, else the login saved by ``hf auth login``. The endpoint is huggingface_hub's
(``HF_ENDPOINT`` for a private Hub). Bookkeeping files of this toolkit (the output marker, locks)
stay local.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from l2c_llava.errors import CannotRunError
from l2c_llava.models.hub import hub_offline

LOCAL_ONLY = [".l2c_output.json", ".l2c.lock", "**/.l2c.lock"]


def push_folder(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    private: bool = False,
    token: str | None = None,
    revision: str | None = None,
    commit_message: str | None = None,
) -> str:
    """Upload `folder` to the model repository `repo_id` (created when missing); returns the commit's
    URL. Errors a user can fix (no token, no permission, offline mode) say what to do."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError, LocalTokenNotFoundError

    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise CannotRunError(f"{folder}: not an exported model folder (no config.json)")
    if hub_offline():
        raise CannotRunError(
            f"HF_HUB_OFFLINE is set: cannot push {folder} to {repo_id}; unset it (the export is kept)"
        )
    api = HfApi(token=token)
    message = commit_message or f"Upload {folder.name} (l2c-llava export)"
    try:
        api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        info = api.upload_folder(
            folder_path=str(folder),
            repo_id=repo_id,
            repo_type="model",
            revision=revision,
            commit_message=message,
            ignore_patterns=LOCAL_ONLY,
        )
    except LocalTokenNotFoundError:
        raise CannotRunError(
            "no Hugging Face token: set HF_TOKEN or run `hf auth login` (the export is kept)"
        ) from None
    except HfHubHTTPError as e:
        status = getattr(getattr(e, "response", None), "status_code", None)
        hint = {
            401: "the token is not valid: set HF_TOKEN or run `hf auth login`",
            403: f"the token may not write to {repo_id}: use a token with write access, or a repo of yours",
            404: f"{repo_id} not found and not created: check the name (owner/name)",
        }.get(status, str(e))
        raise CannotRunError(
            f"pushing {folder} to {repo_id} failed ({status}): {hint} (the export is kept)"
        ) from None
    return str(getattr(info, "commit_url", info))


def add_push_arguments(p: argparse.ArgumentParser) -> None:
    """The options of every export command that can publish its folder."""
    p.add_argument(
        "--push-to-hub",
        metavar="ID",
        default=None,
        help="also upload the exported folder (with its model card) to this Hub model repo, "
        "e.g. me/llm2clip-vision; token from HF_TOKEN or `hf auth login`",
    )
    p.add_argument("--private", action="store_true", help="with --push-to-hub: create the repo as private")


def push_if_asked(args: argparse.Namespace, out: str | os.PathLike) -> None:
    """After an export: push `out` when --push-to-hub was given, and say where it went."""
    repo = getattr(args, "push_to_hub", None)
    if repo:
        url = push_folder(out, repo, private=getattr(args, "private", False))
        print(f"pushed {out} to {repo}: {url}")
