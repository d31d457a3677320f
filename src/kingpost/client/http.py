"""A small synchronous client; errors come back as the KingpostError the API raised."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx

from kingpost.errors import AuthError, KingpostError, ValidationError, error_from_payload
from kingpost.packaging import pack_project_file
from kingpost.settings import Settings

__all__ = ["KingpostClient", "load_credentials"]


def load_credentials(settings: Settings) -> str:
    path = settings.home / "credentials"
    where = "KINGPOST_API_KEY" if settings.api_key else str(path)
    try:
        key = settings.api_key or path.read_text().strip()
    except FileNotFoundError:
        raise AuthError(
            f"no API key: set KINGPOST_API_KEY or start `kingpost server` once (it writes {path})"
        ) from None
    except UnicodeDecodeError:
        key = ""
    if not key or not key.isascii() or not key.isprintable():
        # Keys are ASCII; anything else cannot go in a header (and was a traceback).
        raise AuthError(f"the API key in {where} is not a Kingpost key: it must be printable ASCII")
    return key


def _raise_for(resp: httpx.Response) -> None:
    if resp.status_code < 400:
        return
    try:
        payload = resp.json()
        if not isinstance(payload, dict):
            payload = {"error": str(payload)}
    except ValueError:
        payload = {"error": resp.text[:500] or f"HTTP {resp.status_code}"}
    raise error_from_payload(resp.status_code, payload)


Progress = Callable[[int, int], None]
"""Called with (bytes sent, bytes in all) as an upload goes."""


def _reporting(chunks: Iterator[bytes], total: int, progress: Progress | None) -> Iterator[bytes]:
    sent = 0
    for chunk in chunks:
        yield chunk
        sent += len(chunk)
        if progress is not None:
            progress(sent, total)


def _seg(kind: str, value: str) -> str:
    """``value`` as one URL path segment. Pasted in as it was, ``../../secrets/x`` given
    as a deployment made a DELETE of a deployment delete that secret (httpx resolves
    dot segments), and ``?`` or ``#`` cut the path short."""
    if value in ("", ".", "..") or "/" in value:
        raise ValidationError(
            f"{kind} {value!r}: not a {kind} name or id (no '/', and not '.' or '..')",
            field=kind,
            value=value,
        )
    return quote(value, safe="")


class KingpostClient:
    def __init__(self, api_url: str, api_key: str, gateway_url: str, timeout: float = 30.0) -> None:
        headers = {"Authorization": f"Api-Key {api_key}"}
        self.api_url = api_url
        self.gateway_url = gateway_url
        self._http = httpx.Client(base_url=api_url, headers=headers, timeout=timeout)
        self._gw = httpx.Client(base_url=gateway_url, headers=headers, timeout=timeout)

    @classmethod
    def from_settings(cls, settings: Settings) -> KingpostClient:
        return cls(settings.client_url, load_credentials(settings), settings.gateway_url)

    def close(self) -> None:
        self._http.close()
        self._gw.close()

    def __enter__(self) -> KingpostClient:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def _call(self, method: str, path: str, **kw: Any) -> Any:
        try:
            resp = self._http.request(method, path, **kw)
        except (httpx.ReadTimeout, httpx.WriteTimeout) as exc:
            if method in ("GET", "HEAD"):
                raise KingpostError(
                    f"{method} {path}: the control plane at {self.api_url} did not answer in time"
                ) from exc
            # It was reached and may be working on it: repeating the call could do it twice.
            raise KingpostError(
                f"{method} {path}: the control plane at {self.api_url} did not answer in time; "
                "it may still have taken effect, so check (`kingpost deployments list`) before "
                "repeating it"
            ) from exc
        except httpx.TransportError as exc:
            raise KingpostError(
                f"cannot reach the control plane at {self.api_url} ({exc}); "
                "is `kingpost server` running?"
            ) from exc
        _raise_for(resp)
        if resp.status_code == 204 or not resp.content:
            return None
        return resp.json()

    # -- projects and deployments -------------------------------------------------------
    def upload(self, project_dir: Path, progress: Progress | None = None) -> str:
        """Packs the project into a temporary file (hashing as it goes), then streams it
        from there unless the server has it already; ``progress(sent, total)`` follows
        the upload."""
        with pack_project_file(project_dir) as packed:
            try:
                exists = self._http.head(f"/v1/projects/{packed.sha256}").status_code == 200
            except httpx.TransportError as exc:
                raise KingpostError(
                    f"cannot reach the control plane at {self.api_url} ({exc})"
                ) from exc
            if not exists:
                self._call(
                    "PUT",
                    f"/v1/projects/{packed.sha256}",
                    content=_reporting(packed.chunks(), packed.size, progress),
                    headers={"Content-Length": str(packed.size)},
                )
            return packed.sha256

    def push(
        self, project_dir: Path, progress: Progress | None = None, **options: Any
    ) -> dict[str, Any]:
        """Upload and deploy; the model is config.yaml's ``model_name``, else the folder's
        name (the server only sees the upload, named by its hash)."""
        if options.get("model_name") is None:
            from kingpost.config import load_config

            if not load_config(project_dir).config.model_name:
                options["model_name"] = project_dir.resolve().name
        sha = self.upload(project_dir, progress)
        body = {"project_hash": sha, **{k: v for k, v in options.items() if v is not None}}
        result: dict[str, Any] = self._call("POST", "/v1/push", json=body)
        return result

    def development_sync(self, model: str, project_hash: str) -> dict[str, Any]:
        """Apply an uploaded project to the model's development deployment (a reload in
        place, or a swap that waits for a new replica: no time limit)."""
        return dict(
            self._call(
                "POST",
                f"/v1/models/{_seg('model', model)}/development/sync",
                json={"project_hash": project_hash},
                timeout=None,
            )
        )

    def models(self) -> list[dict[str, Any]]:
        return list(self._call("GET", "/v1/models")["models"])

    def model(self, ref: str) -> dict[str, Any]:
        return dict(self._call("GET", f"/v1/models/{_seg('model', ref)}"))

    def delete_model(self, ref: str) -> dict[str, Any]:
        return dict(self._call("DELETE", f"/v1/models/{_seg('model', ref)}"))

    def deployments(self, model: str | None = None) -> list[dict[str, Any]]:
        path = f"/v1/models/{_seg('model', model)}/deployments" if model else "/v1/deployments"
        return list(self._call("GET", path)["deployments"])

    def deployment(self, dep: str, model: str | None = None) -> dict[str, Any]:
        """A deployment by id, or by id or name within ``model``."""
        if model is None:
            return dict(self._call("GET", f"/v1/deployments/{_seg('deployment', dep)}"))
        path = f"/v1/models/{_seg('model', model)}/deployments/{_seg('deployment', dep)}"
        return dict(self._call("GET", path))

    def deployment_action(self, model: str, dep: str, action: str) -> dict[str, Any]:
        path = f"/v1/models/{_seg('model', model)}/deployments/{_seg('deployment', dep)}"
        if action == "delete":
            return dict(self._call("DELETE", path))
        return dict(self._call("POST", f"{path}/{action}"))

    def replicas(self, model: str, dep: str) -> list[dict[str, Any]]:
        path = f"/v1/models/{_seg('model', model)}/deployments/{_seg('deployment', dep)}"
        return list(self._call("GET", f"{path}/replicas")["replicas"])

    def update_deployment(
        self, model: str, dep: str, name: str | None, labels: dict[str, Any] | None
    ) -> dict[str, Any]:
        """Rename and/or relabel a deployment (``None`` leaves that part as it is)."""
        body: dict[str, Any] = {}
        if name is not None:
            body["name"] = name
        if labels is not None:
            body["labels"] = labels
        path = f"/v1/models/{_seg('model', model)}/deployments/{_seg('deployment', dep)}"
        return dict(self._call("PATCH", path, json=body))

    def promote(self, model: str, dep: str, environment: str = "production") -> dict[str, Any]:
        return dict(
            self._call(
                "POST",
                f"/v1/models/{_seg('model', model)}/deployments/{_seg('deployment', dep)}/promote",
                json={"environment": environment},
            )
        )

    def update_autoscaling(
        self,
        model: str,
        changes: dict[str, int],
        *,
        environment: str | None = None,
        deployment: str | None = None,
    ) -> dict[str, Any]:
        """Change an environment's (or a deployment's) autoscaling settings in place."""
        m = _seg("model", model)
        if deployment is not None:
            path = f"/v1/models/{m}/deployments/{_seg('deployment', deployment)}"
            return dict(self._call("PATCH", f"{path}/autoscaling_settings", json=changes))
        env = _seg("environment", environment or "production")
        body = {"autoscaling_settings": changes}
        return dict(self._call("PATCH", f"/v1/models/{m}/environments/{env}", json=body))

    def wake(self, model: str, dep: str) -> dict[str, Any]:
        path = f"/v1/models/{_seg('model', model)}/deployments/{_seg('deployment', dep)}/wake"
        return dict(self._call("POST", path))

    def environments(self, model: str) -> list[dict[str, Any]]:
        path = f"/v1/models/{_seg('model', model)}/environments"
        return list(self._call("GET", path)["environments"])

    def _env_path(self, model: str, environment: str) -> str:
        return f"/v1/models/{_seg('model', model)}/environments/{_seg('environment', environment)}"

    def environment(self, model: str, environment: str) -> dict[str, Any]:
        """One environment, its promotion settings and its last rollout."""
        return dict(self._call("GET", self._env_path(model, environment)))

    def update_environment(
        self, model: str, environment: str, promotion_settings: dict[str, Any]
    ) -> dict[str, Any]:
        body = {"promotion_settings": promotion_settings}
        return dict(self._call("PATCH", self._env_path(model, environment), json=body))

    def promotion(self, model: str, environment: str) -> dict[str, Any]:
        """The environment's last rollout: status, step, traffic split, replicas."""
        return dict(self._call("GET", f"{self._env_path(model, environment)}/promotion"))

    def promotion_action(self, model: str, environment: str, action: str) -> dict[str, Any]:
        """``pause``, ``resume``, ``cancel`` or ``force_complete`` the running rollout."""
        path = f"{self._env_path(model, environment)}/{action}_promotion"
        return dict(self._call("POST", path))

    def log_query(self, **filters: str | int | None) -> list[dict[str, Any]]:
        """Lines of the log store (``GET /v1/logs``): filters by the route's names
        (``model``, ``environment``, ``deployment``, ``replica``, ``since``, ``until``,
        ``level``, ``search``, ``request_id``, ``source``, ``limit``, ``order``, ``after``);
        None: unset."""
        params = {k: v for k, v in filters.items() if v is not None}
        return list(self._call("GET", "/v1/logs", params=params)["lines"])

    def logs(self, dep: str, tail: int = 200) -> list[dict[str, str]]:
        return list(
            self._call(
                "GET", f"/v1/deployments/{_seg('deployment', dep)}/logs", params={"tail": tail}
            )["lines"]
        )

    # -- metrics --------------------------------------------------------------------------
    def metrics_text(self) -> str:
        """The control plane's ``/metrics`` (Prometheus text)."""
        try:
            resp = self._http.get("/metrics")
        except httpx.TransportError as exc:
            raise KingpostError(
                f"cannot reach the control plane at {self.api_url} ({exc}); "
                "is `kingpost server` running?"
            ) from exc
        _raise_for(resp)
        return resp.text

    # -- weights --------------------------------------------------------------------------
    def weights(self) -> list[dict[str, Any]]:
        return list(self._call("GET", "/v1/weights"))

    def weights_status(self, dep: str) -> dict[str, Any]:
        return dict(self._call("GET", f"/v1/deployments/{_seg('deployment', dep)}/weights"))

    def weights_gc(self, budget_bytes: int | None = None) -> dict[str, Any]:
        params = {} if budget_bytes is None else {"budget_bytes": budget_bytes}
        return dict(self._call("POST", "/v1/weights/gc", params=params))

    # -- Python environments -------------------------------------------------------------
    def venvs(self) -> list[dict[str, Any]]:
        return list(self._call("GET", "/v1/venvs"))

    def venvs_gc(self) -> dict[str, Any]:
        return dict(self._call("POST", "/v1/venvs/gc"))

    def gc(self) -> dict[str, Any]:
        return dict(self._call("POST", "/v1/gc", timeout=600))

    def engines(self) -> dict[str, Any]:
        """The server's engines; for one spread over machines (ray), its nodes and replicas."""
        return dict(self._call("GET", "/v1/engines"))

    def gpus(self) -> dict[str, Any]:
        """The server's GPU inventory (read again) with the replica holding each device."""
        return dict(self._call("GET", "/v1/gpus"))

    # -- webhook secrets (async inference) --------------------------------------------------
    def create_webhook_secret(self) -> dict[str, Any]:
        return dict(self._call("POST", "/v1/webhook_secrets"))

    def webhook_secrets(self) -> list[dict[str, Any]]:
        return list(self._call("GET", "/v1/webhook_secrets"))

    def delete_webhook_secret(self, secret_id: str) -> None:
        self._call("DELETE", f"/v1/webhook_secrets/{_seg('webhook secret', secret_id)}")

    # -- secrets --------------------------------------------------------------------------
    def set_secret(self, name: str, value: str) -> dict[str, Any]:
        return dict(self._call("POST", "/v1/secrets", json={"name": name, "value": value}))

    def secrets(self) -> list[dict[str, Any]]:
        return list(self._call("GET", "/v1/secrets")["secrets"])

    def delete_secret(self, name: str) -> None:
        self._call("DELETE", f"/v1/secrets/{_seg('secret', name)}")

    # -- API keys ---------------------------------------------------------------------------
    def create_api_key(
        self, name: str, *, invoke_models: list[str] | None = None
    ) -> dict[str, Any]:
        """An admin key, or with ``invoke_models`` one that may only call those models.
        The answer's ``api_key`` is the key itself, shown this once."""
        body: dict[str, Any] = {"name": name, "type": "WORKSPACE_MANAGE_ALL"}
        if invoke_models is not None:
            body = {"name": name, "type": "WORKSPACE_INVOKE", "model_ids": invoke_models}
        return dict(self._call("POST", "/v1/api_keys", json=body))

    def api_keys(self) -> list[dict[str, Any]]:
        return list(self._call("GET", "/v1/api_keys")["keys"])

    def revoke_api_key(self, prefix: str) -> dict[str, Any]:
        return dict(self._call("DELETE", f"/v1/api_keys/{_seg('api_key', prefix)}"))

    # -- inference through the gateway ---------------------------------------------------------
    @staticmethod
    def predict_path(
        model: str, *, environment: str | None = None, deployment: str | None = None
    ) -> str:
        base = f"/models/{_seg('model', model)}"
        if deployment:
            return f"{base}/deployment/{_seg('deployment', deployment)}/predict"
        return f"{base}/environments/{_seg('environment', environment or 'production')}/predict"

    @contextmanager
    def predict_stream(
        self, path: str, payload: Any, timeout: float = 300.0
    ) -> Iterator[httpx.Response]:
        """The model's answer, its body not yet read. It asks for the body uncompressed
        (httpx offers gzip by default, which a custom server may take up), since callers
        relay the bytes as they come."""
        resp: httpx.Response | None = None
        try:
            with self._gw.stream(
                "POST",
                path,
                content=json.dumps(payload).encode(),
                headers={"Content-Type": "application/json", "Accept-Encoding": "identity"},
                timeout=timeout,
            ) as resp:
                yield resp
        except httpx.TransportError as exc:
            if resp is None:
                raise KingpostError(
                    f"cannot reach the gateway at {self.gateway_url} ({exc})"
                ) from exc
            # The gateway answered: what failed is the body, which the model was producing.
            rid = resp.headers.get("x-baseten-request-id", "unknown")
            if isinstance(exc, httpx.TimeoutException):
                what = f"the response stalled: nothing came for {timeout:g} s"
            else:
                what = (
                    "the response was broken off before its end: the model raised in the "
                    "middle of a stream, or its replica stopped"
                )
            raise KingpostError(f"{what} (request id {rid}; {exc})") from exc
