"""``model_cache`` and ``external_data`` as ``weights`` entries: one mirror for all three.

Truss fetches both sections before the model starts: ``model_cache`` repositories into
``/app/model_cache/…`` and ``external_data`` files to ``/app/data/<local_data_path>``.
Kingpost gives them the same paths by translating each item into a :class:`DerivedWeights`
entry here, which the loader appends to ``TrussConfig.weights``; everything downstream
(push checks, the mirror's cache, dedup, pinning, progress and errors, the engines'
read-only mounts) is then what ``weights`` already has. ``kingpost migrate`` still writes
them into config.yaml for good, but nothing has to be migrated to run.

Where each item goes, as Truss puts it:

- ``use_volume: true`` (Truss's "v2"): ``/app/model_cache/{volume_folder}``.
- ``use_volume: false`` ("v1"): a bucket (gcs, s3, r2) at ``/app/model_cache/{bucket}/{prefix}``,
  as Truss's build copies object keys under ``/app/model_cache/{bucket}``. A Hugging Face
  repository goes into the Hub cache, where Truss's image has it and where
  ``from_pretrained("owner/repo")`` looks: the mirror is mounted as the commit's snapshot at
  ``/app/model_cache/.hub/models--{owner}--{repo}/snapshots/{commit}`` (the commit is known
  once the revision is resolved, see :data:`REVISION`), and the model server links it into
  the replica's Hub cache before the model is imported (``server/hubcache.py``).
- ``external_data``: the one file at its URL, at ``/app/data/{local_data_path}``.
"""

from __future__ import annotations

import posixpath

from kingpost.config.sources import (
    ExternalDataItem,
    ModelCacheEntry,
    ModelCacheKind,
    WeightsSource,
)

__all__ = [
    "APP_DATA",
    "HUB_SNAPSHOTS",
    "MODEL_CACHE_ROOT",
    "REVISION",
    "DerivedWeights",
    "derived_weights",
    "external_data_weights",
    "hub_folder",
    "model_cache_weights",
]

MODEL_CACHE_ROOT = "/app/model_cache"
"""Where Truss puts ``model_cache`` repositories (``truss.base.constants.MODEL_CACHE_PATH``)."""
APP_DATA = "/app/data"
"""Where the project's data directory is in a container (and ``external_data`` lands)."""

HUB_SNAPSHOTS = "/app/model_cache/.hub"
"""Where ``use_volume: false`` Hub repositories are mounted, as a Hub cache's repo folders."""
REVISION = "{revision}"
"""In a mount location, replaced by the commit the source was pinned to."""

_SCHEMES = {
    ModelCacheKind.HF: "hf",
    ModelCacheKind.GCS: "gs",
    ModelCacheKind.S3: "s3",
    ModelCacheKind.R2: "r2",
    ModelCacheKind.AZURE: "azure",
}


class DerivedWeights(WeightsSource):
    """A ``weights`` entry made from a ``model_cache`` or ``external_data`` item."""

    origin: str
    """The item it was made from, e.g. ``model_cache[0]``: errors name it."""
    single_file: bool = False
    """Mount the source's one file at ``mount_location`` (an ``external_data`` URL)."""
    hub_snapshot: bool = False
    """``mount_location`` holds :data:`REVISION`, to be replaced by the pinned commit."""
    secret_optional: bool = False
    """A missing ``auth_secret_name`` means no token (``runtime_secret_name`` defaults to
    ``hf_access_token`` whether or not the repository is private)."""


def hub_folder(repo_id: str) -> str:
    """The folder a Hub cache keeps a model repository in: ``models--{owner}--{name}``."""
    return "models--" + repo_id.strip("/").replace("/", "--")


def _bucket_path(repo_id: str, scheme: str) -> str:
    for prefix in ("gs://", "s3://", "r2://", "azure://"):
        if repo_id.startswith(prefix):
            return repo_id[len(prefix) :].strip("/")
    return repo_id.strip("/")


def _model_cache_entry(index: int, item: ModelCacheEntry) -> DerivedWeights:
    scheme = _SCHEMES[item.kind]
    if item.kind == ModelCacheKind.HF:
        source = f"hf://{item.repo_id}@{item.revision or 'main'}"
    else:
        source = f"{scheme}://{_bucket_path(item.repo_id, scheme)}"
    hub_snapshot = False
    if item.use_volume and item.volume_folder:
        mount = posixpath.normpath(posixpath.join(MODEL_CACHE_ROOT, item.volume_folder))
    elif item.kind == ModelCacheKind.HF:
        hub_snapshot = True
        mount = f"{HUB_SNAPSHOTS}/{hub_folder(item.repo_id)}/snapshots/{REVISION}"
    else:
        folder = _bucket_path(item.repo_id, scheme)
        mount = posixpath.normpath(posixpath.join(MODEL_CACHE_ROOT, folder))
    return DerivedWeights.model_construct(
        source=source,
        mount_location=mount,
        auth=None,
        auth_secret_name=item.runtime_secret_name or None,
        allow_patterns=item.allow_patterns,
        ignore_patterns=item.ignore_patterns,
        origin=f"model_cache[{index}]",
        single_file=False,
        hub_snapshot=hub_snapshot,
        secret_optional=item.kind == ModelCacheKind.HF,
    )


def model_cache_weights(items: list[ModelCacheEntry]) -> list[DerivedWeights]:
    """One entry per ``model_cache`` item, at the path Truss gives it."""
    return [_model_cache_entry(i, item) for i, item in enumerate(items)]


def external_data_weights(items: list[ExternalDataItem] | None) -> list[DerivedWeights]:
    """One single-file entry per ``external_data`` item, at ``/app/data/<local_data_path>``."""
    return [
        DerivedWeights.model_construct(
            source=item.url,
            mount_location=posixpath.normpath(posixpath.join(APP_DATA, item.local_data_path)),
            auth=None,
            auth_secret_name=None,
            allow_patterns=None,
            ignore_patterns=None,
            origin=f"external_data[{i}]",
            single_file=True,
            hub_snapshot=False,
            secret_optional=False,
        )
        for i, item in enumerate(items or [])
    ]


def derived_weights(
    model_cache: list[ModelCacheEntry], external_data: list[ExternalDataItem] | None
) -> list[DerivedWeights]:
    """Every entry ``model_cache`` and ``external_data`` stand for, in that order."""
    return model_cache_weights(model_cache) + external_data_weights(external_data)
