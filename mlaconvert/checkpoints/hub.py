"""SOURCE resolution: a Hub repo id, a local path or a builtin model -> files on disk -> a Checkpoint.

Forms, tried in this order:
  builtin:NAME                          a model shipped with the package (bouncing-balls, tiny-wan)
  ./any/existing/path                   a local file or folder (an existing path always wins)
  org/name, org/name@rev                a Hub repo: only the transformer's files are fetched
  org/name[@rev]/sub/file.pt            one file inside a Hub repo

Everything Hub-related (cache location, offline mode, token) is left to huggingface_hub, so HF_HOME,
HF_HUB_CACHE, HF_HUB_OFFLINE and HF_TOKEN behave exactly as in every other Hugging Face tool.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from huggingface_hub import constants, hf_hub_download, scan_cache_dir, snapshot_download
from huggingface_hub.errors import (
    CacheNotFound,
    GatedRepoError,
    HfHubHTTPError,
    HFValidationError,
    IncompleteSnapshotError,
    LocalEntryNotFoundError,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from mlaconvert.checkpoints.builtin import builtin_path
from mlaconvert.checkpoints.formats import Checkpoint, read_checkpoint
from mlaconvert.errors import MlaconvertError
from mlaconvert.modeling.config import WanConfig

# What a transformer load needs from a repo snapshot. The patterns are fnmatch, where `*` also matches '/':
# each one is anchored by a literal file name, so `diffusion_pytorch_model*` cannot reach into subfolders and
# a Wan-1.3B repo never pulls its 11 GB umT5 (`models_t5_umt5-xxl-enc-bf16.pth`, `text_encoder/`) or its VAE.
TRANSFORMER_PATTERNS = [
    "config.json",
    "diffusion_pytorch_model*",
    "model.safetensors*",
    "model-*-of-*.safetensors",
    "transformer/config.json",
    "transformer/diffusion_pytorch_model*",
    "model_index.json",
    "rank_report.json",
]

BUILTIN_PREFIX = "builtin:"

# org/name, then optionally @revision (a PR ref may contain slashes), then optionally a path inside the repo.
_REPO_SPEC = re.compile(
    r"(?P<repo>[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*)(?:@(?P<revision>refs/pr/\d+|[^/@]+))?(?:/(?P<filename>.+))?"
)


@dataclass(frozen=True, kw_only=True)
class ResolvedSource:
    """Where a SOURCE lives on disk and, for the Hub, exactly which repo state it is."""

    path: Path  # a local file or folder
    repo_id: str | None = None
    revision: str | None = None  # as requested; None = the repo's default branch
    filename: str | None = None  # a file inside the repo, when one was named
    commit: str | None = None  # the commit the cached snapshot belongs to
    kind: str  # "hub", "local" or "builtin"


def resolve_source(spec: str, revision: str | None = None) -> ResolvedSource:
    """Turn a SOURCE string into local files, downloading from the Hub only what a transformer load needs."""
    if spec.startswith(BUILTIN_PREFIX):
        return ResolvedSource(path=builtin_path(spec.removeprefix(BUILTIN_PREFIX)), kind="builtin")
    local = Path(spec).expanduser()
    if local.exists():
        return ResolvedSource(path=local, kind="local")
    m = _REPO_SPEC.fullmatch(spec)
    if m is None:
        raise MlaconvertError(f"no such file or folder: '{spec}'")
    repo_id, filename = m["repo"], m["filename"]
    if m["revision"] and revision and m["revision"] != revision:
        raise MlaconvertError(f"'{spec}' names revision '{m['revision']}' but revision '{revision}' was also given")
    revision = m["revision"] or revision
    try:
        if filename:
            path = Path(hf_hub_download(repo_id, filename, revision=revision))
        else:
            path = Path(snapshot_download(repo_id, revision=revision, allow_patterns=TRANSFORMER_PATTERNS))
    except (HfHubHTTPError, LocalEntryNotFoundError, HFValidationError) as e:
        raise _hub_error(e, spec, repo_id, revision, filename) from e
    if not filename and not _has_weights(path):
        raise MlaconvertError(
            f"Hub repo '{repo_id}' has no transformer weights at its root or in transformer/; "
            f"name a checkpoint inside it, e.g. '{repo_id}/path/to/model.pt'"
        )
    return ResolvedSource(
        path=path, repo_id=repo_id, revision=revision, filename=filename, commit=_commit_of(path), kind="hub"
    )


def load_source(
    spec: str, *, config: WanConfig | str | Path | None = None, head_dim: int = 128, revision: str | None = None,
    lazy: bool = False,
) -> Checkpoint:
    """Resolve SOURCE and read it (`lazy`: see read_checkpoint); `checkpoint.info` records where it came from
    (spec, repo, revision, path)."""
    src = resolve_source(spec, revision)
    ckpt = read_checkpoint(src.path, config=config, head_dim=head_dim, label=spec, lazy=lazy)
    ckpt.info.update(
        spec=spec,
        kind=src.kind,
        repo_id=src.repo_id,
        revision=src.revision or (constants.DEFAULT_REVISION if src.kind == "hub" else None),
        commit=src.commit,
        path=str(src.path),
        format=ckpt.format,
    )
    return ckpt


def _has_weights(folder: Path) -> bool:
    return any(
        (base / f"{stem}.safetensors").is_file() or (base / f"{stem}.safetensors.index.json").is_file()
        for base in (folder, folder / "transformer")
        for stem in ("diffusion_pytorch_model", "model")
    )


def _commit_of(path: Path) -> str | None:
    """The commit hash in a Hub cache path (`.../snapshots/<commit>/...`)."""
    parts = path.parts
    if "snapshots" in parts:
        i = len(parts) - 1 - parts[::-1].index("snapshots")
        if i + 1 < len(parts):
            return parts[i + 1]
    return None


def _hub_error(e: Exception, spec: str, repo_id: str, revision: str | None, filename: str | None) -> MlaconvertError:
    """One line saying what is wrong with a Hub source."""
    at = f" at revision '{revision}'" if revision else ""
    # Order matters: GatedRepoError is a RepositoryNotFoundError, IncompleteSnapshotError a LocalEntryNotFoundError.
    if isinstance(e, GatedRepoError):
        return MlaconvertError(
            f"Hub repo '{repo_id}' is gated: accept its terms on the Hub and log in (HF_TOKEN or `hf auth login`)"
        )
    if isinstance(e, RepositoryNotFoundError):
        return MlaconvertError(
            f"no such file or folder, and no Hub repo '{repo_id}' (or it is private and no valid token is set: HF_TOKEN)"
        )
    if isinstance(e, RevisionNotFoundError):
        return MlaconvertError(f"Hub repo '{repo_id}' has no revision '{revision}'")
    if isinstance(e, RemoteEntryNotFoundError):
        return MlaconvertError(f"Hub repo '{repo_id}'{at} has no file '{filename}'")
    if isinstance(e, IncompleteSnapshotError):
        return MlaconvertError(
            f"the cached copy of '{repo_id}'{at} is incomplete and the Hub cannot be reached: download it again with network"
        )
    if isinstance(e, LocalEntryNotFoundError):
        what = f"'{repo_id}{'@' + revision if revision else ''}{'/' + filename if filename else ''}'"
        why = "offline" if constants.is_offline_mode() else f"{type(e.__cause__ or e).__name__}"
        return MlaconvertError(
            f"{what} is not in the local Hugging Face cache (HF_HUB_CACHE={constants.HF_HUB_CACHE}) and the Hub cannot be "
            f"reached ({why}): download it once with network, or pass a local folder{_cached_revisions(repo_id)}"
        )
    if isinstance(e, HFValidationError):
        return MlaconvertError(f"no such file or folder, and not a valid Hub repo id: '{spec}'")
    return MlaconvertError(f"Hub request for '{repo_id}' failed: {str(e).splitlines()[0]}")


def _cached_revisions(repo_id: str) -> str:
    """A hint listing the revisions of `repo_id` that are in the cache, so a typo in @rev is easy to spot."""
    try:
        # The cache that snapshot_download just searched (scan_cache_dir's own default is frozen at import).
        repos = scan_cache_dir(constants.HF_HUB_CACHE).repos
    except (CacheNotFound, OSError, ValueError):
        return ""
    for repo in repos:
        if repo.repo_id == repo_id and repo.repo_type == "model":
            refs = {ref for rev in repo.revisions for ref in rev.refs}
            names = sorted(refs | {rev.commit_hash[:12] for rev in repo.revisions})
            return f" (cached revisions: {', '.join(names)})" if names else ""
    return ""


def fetch_component(spec: str, subfolder: str, patterns: list[str]) -> Path:
    """The folder of one component (`vae`, `text_encoder`, ...) of a diffusers-layout SOURCE: for a Hub repo
    (`org/name[@rev]`) only `subfolder/<pattern>` files are fetched; a local folder is used as it is, or its
    `subfolder` when it has one. The folder may lack the component's files: the caller checks what it needs."""
    local = Path(spec).expanduser()
    if local.exists():
        return local / subfolder if (local / subfolder).is_dir() else local
    m = _REPO_SPEC.fullmatch(spec)
    if m is None or m["filename"]:
        raise MlaconvertError(f"no such folder, and not a Hub repo id (org/name[@revision]): '{spec}'")
    repo_id, revision = m["repo"], m["revision"]
    try:
        root = snapshot_download(repo_id, revision=revision, allow_patterns=[f"{subfolder}/{p}" for p in patterns])
    except (HfHubHTTPError, LocalEntryNotFoundError, HFValidationError) as e:
        raise _hub_error(e, spec, repo_id, revision, None) from e
    folder = Path(root) / subfolder
    # Offline, a snapshot cached by an earlier, narrower fetch (e.g. the transformer only) is returned as it is.
    if not folder.is_dir() and constants.is_offline_mode():
        raise MlaconvertError(
            f"'{spec}' has no {subfolder}/ in the local Hugging Face cache and the Hub cannot be reached (offline): "
            "download it once with network, or pass a local folder"
        )
    return folder
