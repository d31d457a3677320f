"""What the mirror may fetch for a replica: the control plane runs as root on the host
network, a replica as an unprivileged user in its own namespaces, so the mirror must not
be a way for a replica to get what it could not get itself.

- A local source is copied only where any user of the machine may read it: every file
  readable by others (``o+r``), every directory of the source listable by others
  (``o+rx``), and every directory above it, from ``/`` down, searchable by others
  (``o+x``). Each file is opened walking from ``/`` one name at a time without following
  a link (the links of the path resolved first), and the checks are made on what was
  opened, so a link swapped in between cannot lead the read elsewhere.
- A URL a user's config or secret names (``https://`` files, ``external_data``, a
  service-account key's ``token_uri``) is fetched only from public addresses: its host is
  resolved, every address checked, and the connection made to a checked one, so a second
  resolution cannot redirect it (as the async webhooks do); each redirect is checked the
  same way; such a URL is fetched directly, never through the environment's proxy.
  Loopback, link-local (cloud metadata), private, shared, multicast, unspecified
  and reserved addresses, and their IPv4-mapped and NAT64 forms, are refused unless the
  operator sets ``KINGPOST_WEIGHTS_ALLOW_PRIVATE_URLS``. Endpoints the operator sets in the
  control plane's environment (``HF_ENDPOINT``, ``KINGPOST_S3_ENDPOINT_URL``,
  ``STORAGE_EMULATOR_HOST``) are trusted.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import stat
from pathlib import PurePosixPath
from typing import Any

import httpx

from kingpost.asyncq.body import forbidden_address
from kingpost.errors import WeightsError

__all__ = [
    "ALLOW_PRIVATE_ENV",
    "PUBLIC_RULE",
    "address_problem",
    "dir_problem",
    "guarded_client",
    "open_public_file",
    "private_urls_allowed",
    "public_dir_problem",
]

ALLOW_PRIVATE_ENV = "KINGPOST_WEIGHTS_ALLOW_PRIVATE_URLS"
PUBLIC_RULE = (
    "a local source is mirrored only where any user of this machine may read it: files "
    "readable by others (o+r), its directories listable by others (o+rx), every directory "
    "above it searchable by others (o+x)"
)
_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_NAT64 = ipaddress.ip_network("64:ff9b::/96")


# -- local sources ---------------------------------------------------------------------------
class _Refused(Exception):
    """A path of a local source is not open to every user: the path and the rule."""


def _need(fd: int, bits: int, path: str, rule: str) -> None:
    mode = os.fstat(fd).st_mode
    if mode & bits != bits:
        raise _Refused(
            f"{path} is not {rule} (mode {stat.S_IMODE(mode):04o}); {PUBLIC_RULE}. Make it "
            "readable to all, or copy the weights somewhere that is"
        )


def _walk_to(real: str) -> tuple[int, str]:
    """An open descriptor of the directory holding the absolute, link-free ``real`` and
    its last name; every directory on the way was searchable by others when opened, and
    none was a link (one swapped in after ``realpath`` fails the walk)."""
    parts = PurePosixPath(real).parts
    fd = os.open("/", _DIR)
    try:
        _need(fd, stat.S_IXOTH, "/", "searchable by others (o+x)")
        for i, name in enumerate(parts[1:-1], start=1):
            here = str(PurePosixPath(*parts[: i + 1]))
            try:
                step = os.open(name, _DIR, dir_fd=fd)
            except OSError as exc:
                raise _Refused(f"cannot open {here}: {exc.strerror}") from exc
            os.close(fd)
            fd = step
            _need(fd, stat.S_IXOTH, here, "searchable by others (o+x)")
    except BaseException:
        os.close(fd)
        raise
    return fd, parts[-1]


def _open_last(real: str, flags: int) -> int:
    """``real`` opened with ``flags`` from the directory :func:`_walk_to` reached, without
    following a link in its last name either."""
    fd, name = _walk_to(real)
    try:
        return os.open(name, flags, dir_fd=fd)
    except OSError as exc:
        raise _Refused(f"cannot open {real}: {exc.strerror}") from exc
    finally:
        os.close(fd)


def open_public_file(path: str, what: str) -> tuple[int, os.stat_result]:
    """``path`` opened for reading, with its status, if any user of the machine may read
    it (module docstring); else a :class:`~kingpost.errors.WeightsError` starting with
    ``what`` and naming the path and the rule."""
    real = os.path.realpath(path)
    file = -1
    try:
        file = _open_last(real, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        st = os.fstat(file)
        if not stat.S_ISREG(st.st_mode):
            raise _Refused(f"{real} is not a regular file")
        _need(file, stat.S_IROTH, real, "readable by others (o+r)")
    except _Refused as exc:
        if file >= 0:
            os.close(file)
        raise WeightsError(f"{what}: {exc}") from None
    return file, st


def public_dir_problem(path: str) -> str | None:
    """Why the directory ``path`` may not be a local source (None: it may, or it is not
    a directory, which the mirror reports): it is not listable by every user of the
    machine, or a directory above it is not searchable (module docstring)."""
    real = os.path.realpath(path)
    if not os.path.isdir(real):
        return None
    try:
        own = os.open("/", _DIR) if real == "/" else _open_last(real, _DIR)
        try:
            _need(own, stat.S_IROTH | stat.S_IXOTH, real, "listable by others (o+rx)")
        finally:
            os.close(own)
    except _Refused as exc:
        return str(exc)
    return None


def dir_problem(path: str) -> str | None:
    """Why a directory inside a local source may not be listed for a replica (None: it
    may): it is not listable by others."""
    mode = os.lstat(path).st_mode
    if mode & (stat.S_IROTH | stat.S_IXOTH) != stat.S_IROTH | stat.S_IXOTH:
        return (
            f"{path} is not listable by others (o+rx) (mode {stat.S_IMODE(mode):04o}); "
            f"{PUBLIC_RULE}. Make it readable to all, or copy the weights somewhere that is"
        )
    return None


# -- URLs ------------------------------------------------------------------------------------
def private_urls_allowed() -> bool:
    """The operator's ``KINGPOST_WEIGHTS_ALLOW_PRIVATE_URLS`` (read where the mirror
    runs, as ``HF_ENDPOINT`` is)."""
    from kingpost.settings import Settings

    return Settings().weights_allow_private_urls


def address_problem(raw: str) -> str | None:
    """Why a weights URL may not be fetched from ``raw`` (an address its host resolved
    to), or None: only globally routable unicast addresses may."""
    addr: ipaddress.IPv4Address | ipaddress.IPv6Address = ipaddress.ip_address(raw.split("%", 1)[0])
    if isinstance(addr, ipaddress.IPv6Address):
        if addr.ipv4_mapped is not None:
            addr = addr.ipv4_mapped
        elif addr in _NAT64:
            addr = ipaddress.IPv4Address(int(addr) & 0xFFFFFFFF)
    why = forbidden_address(addr)  # link-local, metadata, unspecified, multicast
    if why is not None:
        return why
    if addr.is_loopback:
        return f"{addr} is loopback (this machine)"
    if addr.is_private or not addr.is_global:
        return f"{addr} is a private or reserved address (not on the internet)"
    return None


class _GuardedTransport(httpx.HTTPTransport):
    """Resolves each request's host once, refuses it unless every address is public
    (:func:`address_problem`), and connects to a checked address; ``Host`` and TLS SNI
    (so the certificate check) keep the name. Redirects pass through here too."""

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        host = request.url.host
        port = request.url.port or (443 if request.url.scheme == "https" else 80)
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except (OSError, UnicodeError) as exc:
            raise httpx.ConnectError(f"cannot resolve {host}: {exc}", request=request) from exc
        addresses = sorted({str(info[4][0]) for info in infos})
        for address in addresses:
            why = address_problem(address)
            if why is not None:
                raise WeightsError(
                    f"{request.url.copy_with(query=None)}: refused: {host} resolves to {why}; "
                    "the control plane fetches weights URLs only from public addresses "
                    f"(an operator may allow private ones with {ALLOW_PRIVATE_ENV}=1)"
                )
        if not addresses:
            raise httpx.ConnectError(f"cannot resolve {host}: no address", request=request)
        # As the webhooks' delivery does: to the checked address, the name kept for TLS.
        # (Imported here: the webhooks module brings the store, which a mirror on a node
        # does not need.)
        from kingpost.asyncq.webhooks import pinned

        request.url, _, extensions = pinned(str(request.url), addresses[0])
        request.extensions = {**request.extensions, **extensions}
        return super().handle_request(request)


def guarded_client(**kwargs: Any) -> httpx.Client:
    """An ``httpx.Client`` for URLs a user named: public addresses only, unless the
    operator allows private ones (module docstring)."""
    if private_urls_allowed():
        return httpx.Client(**kwargs)
    # Directly, not through an HTTP(S)_PROXY of the environment: a proxy would resolve
    # and connect where this check cannot see.
    return httpx.Client(transport=_GuardedTransport(), trust_env=False, **kwargs)
