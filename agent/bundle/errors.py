"""Why a bundle was refused: one exception class per reason, each naming the file."""

from __future__ import annotations

from pathlib import Path


class BundleError(Exception):
    """A bundle was refused; nothing from it may be loaded."""

    def __init__(self, bundle: Path | str, message: str) -> None:
        self.bundle = str(bundle)
        self.detail = message
        super().__init__(f"bundle {self.bundle}: {message}")


class NotABundle(BundleError):
    """The path is not a directory holding manifest.json."""


class SignatureMissing(BundleError):
    """manifest.sig is absent: an unsigned bundle is never loaded."""


class BadSignature(BundleError):
    """The signature does not match the manifest bytes (tampering or corruption)."""


class UntrustedKey(BundleError):
    """Signed by a key this device does not trust."""


class UnknownFormatVersion(BundleError):
    """A manifest format this code does not understand."""


class MalformedManifest(BundleError):
    """manifest.json is not valid JSON or breaks the manifest schema."""


class MissingFile(BundleError):
    """A file the manifest lists is absent."""


class ExtraFile(BundleError):
    """A file is present that the manifest does not list (it would be unsigned)."""


class HashMismatch(BundleError):
    """A file's sha256 differs from the manifest."""


class UnsafeArchive(BundleError):
    """An archive member would escape the target directory or is not a plain file."""
