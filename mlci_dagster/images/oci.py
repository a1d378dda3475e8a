"""A registry speaking the OCI distribution API: tags of a repository, the digest of a tag."""

from __future__ import annotations

import hashlib
from urllib.parse import urljoin

import requests

from mlci_dagster.images.errors import ImageRegistryError

# Every manifest kind a tag can point at; without them a registry may convert or refuse.
MANIFEST_MEDIA_TYPES = (
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
)


class OciRegistry:
    """`GET /v2/<repo>/tags/list` and `HEAD /v2/<repo>/manifests/<tag>` on one registry host.

    A bearer token, when given, is sent as is; it never appears in an error message.
    """

    def __init__(self, host: str, *, insecure: bool = False, token: str | None = None,
                 timeout_s: float = 10) -> None:
        self.host = host
        self.base_url = f"{'http' if insecure else 'https'}://{host}"
        self.timeout_s = timeout_s
        self._session = requests.Session()
        if token:
            self._session.headers["Authorization"] = f"Bearer {token}"

    def tags(self, repo: str) -> list[str]:
        """Every tag of `repo`, following the registry's pagination links."""
        tags: list[str] = []
        url: str | None = f"{self.base_url}/v2/{repo}/tags/list"
        while url:
            response = self._request("GET", url, repo)
            tags.extend(response.json().get("tags") or [])
            following = response.links.get("next", {}).get("url")
            url = urljoin(self.base_url, following) if following else None
        return tags

    def digest(self, repo: str, tag: str) -> str:
        """The content digest of the manifest `repo:tag` points at now."""
        url = f"{self.base_url}/v2/{repo}/manifests/{tag}"
        headers = {"Accept": ", ".join(MANIFEST_MEDIA_TYPES)}
        response = self._request("HEAD", url, f"{repo}:{tag}", headers)
        digest = response.headers.get("Docker-Content-Digest")
        if not digest:  # optional on HEAD; the digest of the manifest's bytes is the same value
            response = self._request("GET", url, f"{repo}:{tag}", headers)
            digest = response.headers.get("Docker-Content-Digest") or (
                "sha256:" + hashlib.sha256(response.content).hexdigest())
        return digest

    def _request(self, method: str, url: str, image: str,
                 headers: dict[str, str] | None = None) -> requests.Response:
        where = f"oci registry {self.host}: {image}: {method} {url.removeprefix(self.base_url)}"
        try:
            response = self._session.request(method, url, headers=headers,
                                             timeout=self.timeout_s)
        except requests.RequestException as exc:
            raise ImageRegistryError(f"{where}: unreachable ({type(exc).__name__}: {exc})"
                                     ) from exc
        if response.status_code != 200:
            raise ImageRegistryError(
                f"{where}: HTTP {response.status_code}{_error_codes(response)}")
        return response


def _error_codes(response: requests.Response) -> str:
    """The distribution API's error codes (MANIFEST_UNKNOWN, UNAUTHORIZED, ...), if any."""
    try:
        errors = response.json().get("errors") or []
    except ValueError:
        return ""
    codes = [f"{e.get('code')}: {e.get('message')}" for e in errors if isinstance(e, dict)]
    return f" ({'; '.join(codes)[:300]})" if codes else ""
