"""Warnings about keys Truss knows and Kingpost does not act on, on any engine.

Each fires only when the key asks for something (a value other than Truss's default), so
a config Truss dumped with every default stays quiet. What one engine alone cannot
honour is in :func:`kingpost.config.rules.process_engine_warnings`; what Kingpost cannot
run at all is refused in :func:`kingpost.config.rules.cross_key_errors`. The table of
every key is :mod:`kingpost.config.support`.
"""

from __future__ import annotations

import posixpath

from kingpost.config._yaml import Issue
from kingpost.config.models import TrussConfig

__all__ = ["unread_key_warnings"]

_LEGACY = "a legacy key Kingpost does not read (it serves the model class in model/model.py)"


def unread_key_warnings(config: TrussConfig) -> list[Issue]:
    """Keys set to something Kingpost does not do, each with the reason."""
    return _top_level(config) + _build(config) + _resources(config) + _runtime(config)


def _top_level(config: TrussConfig) -> list[Issue]:
    issues: list[Issue] = []
    if config.examples_filename != "examples.yaml":
        issues.append(
            Issue(
                ("examples_filename",),
                "not read: examples are run by Truss's CLI, and Kingpost has no examples "
                "runner; call the predict URL with an example instead",
                config.examples_filename,
            )
        )
    if config.spec_version != "2.0":
        issues.append(
            Issue(
                ("spec_version",),
                "not read: Kingpost follows Truss's spec 2.0 whatever is written here",
                config.spec_version,
            )
        )
    for key, default in (("input_type", "Any"), ("model_framework", "custom"),
                         ("model_type", "Model")):  # fmt: skip
        value = getattr(config, key)
        if value != default:
            issues.append(Issue((key,), _LEGACY, value))
    outside = [d for d in config.external_package_dirs if _outside(d)]
    if outside:
        issues.append(
            Issue(
                ("external_package_dirs",),
                "not uploaded: only the project directory is, so the model will not find "
                "these packages (Truss copies them into its image); copy them into the "
                "project, e.g. under `packages/`, which is on the model's path",
                outside,
            )
        )
    if config.live_reload:
        issues.append(
            Issue(
                ("live_reload",),
                "not done: live reload is Truss's development loop (`truss watch`); push "
                "the project again to change a deployment",
                True,
            )
        )
    if config.use_local_src:
        issues.append(
            Issue(
                ("use_local_src",),
                "not read: it is a development option of Truss's own source",
                True,
            )
        )
    if config.base_image is not None and config.base_image.docker_auth is not None:
        issues.append(
            Issue(
                ("base_image", "docker_auth"),
                "not used: Kingpost pulls base images with the Docker Engine's own "
                "credentials; run `docker login REGISTRY` on the server (or `docker pull` "
                "the image there) and remove docker_auth",
                has_value=False,
            )
        )
    if config.cache_internal:
        issues.append(
            Issue(
                ("cache_internal",),
                "not mirrored: cache_internal is Baseten-internal; list these repositories "
                "under `weights` to have them mirrored and mounted",
                has_value=False,
            )
        )
    return issues


def _outside(entry: str) -> bool:
    path = posixpath.normpath(entry.strip())
    return path.startswith("/") or path == ".." or path.startswith("../")


def _build(config: TrussConfig) -> list[Issue]:
    issues: list[Issue] = []
    if config.build.arguments:
        issues.append(
            Issue(
                ("build", "arguments"),
                "not read: build arguments configure Baseten's engine builders; pass "
                "settings to your server as environment_variables instead",
                has_value=False,
            )
        )
    if config.build.secret_to_path_mapping:
        issues.append(
            Issue(
                ("build", "secret_to_path_mapping"),
                "not done: Kingpost mounts no secrets into builds; read them at run time "
                "from /secrets (or a model's `secrets`) instead",
                sorted(config.build.secret_to_path_mapping),
            )
        )
    return issues


def _resources(config: TrussConfig) -> list[Issue]:
    resources = config.resources
    issues: list[Issue] = []
    if resources.instance_type:
        issues.append(
            Issue(
                ("resources", "instance_type"),
                "not read: instance types are Baseten's; Kingpost sizes a replica by "
                "`cpu`, `memory` and `accelerator`",
                resources.instance_type,
            )
        )
    if resources.node_count is not None and resources.node_count != 1:
        issues.append(
            Issue(
                ("resources", "node_count"),
                "not done: each replica runs on one node (this machine); a model that "
                "needs several nodes will not have them",
                resources.node_count,
            )
        )
    if resources.fabric:
        issues.append(
            Issue(
                ("resources", "fabric"),
                "not read: node interconnects are Baseten's; replicas run on one machine",
                has_value=False,
            )
        )
    return issues


def _runtime(config: TrussConfig) -> list[Issue]:
    runtime = config.runtime
    issues: list[Issue] = []
    flags = (
        ("enable_tracing_data", runtime.enable_tracing_data and config.docker_server is not None,
         "not done for a custom server: only Kingpost's model server (a model class) times "
         "preprocess, predict and postprocess as spans; a custom server traces itself "
         "(it gets the gateway's `traceparent`)"),
        ("enable_debug_logs", runtime.enable_debug_logs,
         "not done: the model server's log level does not change; log at the level you "
         "need from the model itself"),
        ("oidc", bool(runtime.oidc.enabled),
         "not done: Kingpost issues no OIDC identity tokens to replicas; give credentials "
         "as secrets instead"),
        ("remote_ssh", runtime.remote_ssh.enabled,
         "not done: Kingpost offers no SSH into replicas; use `kingpost logs`"),
    )  # fmt: skip
    for key, asked, message in flags:
        if asked:
            issues.append(Issue(("runtime", key), message, has_value=False))
    egress = runtime.egress_restrictions
    if egress is not None and (egress.ip_allow_list or egress.fqdn_allow_list):
        issues.append(
            Issue(
                ("runtime", "egress_restrictions"),
                "not enforced: replicas can reach any address this machine can; restrict "
                "egress on the host's firewall if you need it",
                has_value=False,
            )
        )
    if runtime.truss_server_version_override:
        issues.append(
            Issue(
                ("runtime", "truss_server_version_override"),
                "not read: Kingpost runs its own model server, not Truss's",
                runtime.truss_server_version_override,
            )
        )
    return issues
