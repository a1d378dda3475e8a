"""The one error a registry client raises: it names the registry, the image and what failed."""


class ImageRegistryError(RuntimeError):
    """E.g. `oci registry 127.0.0.1:5000: ml/platform:nightly: HEAD manifest: HTTP 404`."""
