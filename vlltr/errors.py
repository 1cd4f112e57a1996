"""The domain errors of every room: one class per failure, each with a stable machine-readable `code`.

This module imports nothing beyond the standard library, so the model runtime, training, the service and the
command line can all raise and catch the same classes. Nothing here knows about HTTP: the service's API edge
maps codes to statuses in one table (`vlltr.service.api.errors.HTTP_ERRORS`), and the command line prints
any of these as one line and exits with status 2 (`vlltr.cli`).

Each class keeps the built-in base it had before it moved here (`ValueError` for bad input, `RuntimeError`
for a state of the world, `LookupError` for a missing class), so code that catches those still does.

Codes are a contract: clients of the HTTP API read `bad_image`, `unsupported_type`, `too_large`, `invalid`,
`conflict`, `not_found`, `store_unavailable`, `queue_full`, `not_ready` and `inference_failed`; a code
never changes meaning once published (`tests/unit/service/test_errors.py` pins them).
"""

from __future__ import annotations

from typing import ClassVar


class VlltrError(Exception):
    """Base class of the domain errors. `str(error)` is the message: one sentence naming the problem."""

    code: ClassVar[str] = "error"

    @property
    def message(self) -> str:
        return str(self)


# ---- images (the service's decoding, the training data loader) --------------------------------------


class ImageDecodeError(VlltrError, ValueError):
    """The bytes are not a decodable image (truncated, corrupt, empty)."""

    code = "bad_image"


class UnsupportedImageTypeError(ImageDecodeError):
    """The bytes are an image format or pixel mode the service does not read."""

    code = "unsupported_type"


class ImageTooLargeError(VlltrError, ValueError):
    """The image has more pixels, or more bytes, than the configured limit; raised before it is decoded."""

    code = "too_large"

    def __init__(self, message: str, *, pixels: int | None = None, limit: int | None = None) -> None:
        super().__init__(message)
        self.pixels = pixels
        self.limit = limit


# ---- the class table (registry and store) --------------------------------------------------------


class ClassValidationError(VlltrError, ValueError):
    """A class name or description list is invalid."""

    code = "invalid"


class ClassConflictError(VlltrError, ValueError):
    """A class with this name (case-insensitively) exists already, trained or added."""

    code = "conflict"


class TrainedClassError(VlltrError, ValueError):
    """A trained class cannot be removed; only classes added at run time can."""

    code = "conflict"


class ClassNotFoundError(VlltrError, LookupError):
    """No added class has this name."""

    code = "not_found"


class StoredRecordError(VlltrError, ValueError):
    """A stored class record or derived entry cannot be read; the store quarantines it (kept, not served)."""

    code = "bad_record"


class StoreUnavailableError(VlltrError, RuntimeError):
    """The class store cannot be reached or read right now (Redis down, unreadable file)."""

    code = "store_unavailable"


class ServiceRequestError(VlltrError, RuntimeError):
    """A request of the command line or `vlltr.client` to a running service failed (unreachable, refused, or an
    error answer). `status` is the HTTP status (0: no answer), `error_code` the API's code, `detail` its
    message."""

    code = "service_request_failed"

    def __init__(self, message: str, *, status: int = 0, error_code: str | None = None, detail: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.error_code = error_code
        self.detail = detail or message


# ---- serving capacity and state ------------------------------------------------------------------


class QueueFullError(VlltrError, RuntimeError):
    """The service is at capacity (inference queue, uploads held in memory); retry later."""

    code = "queue_full"


class NotReadyError(VlltrError, RuntimeError):
    """The service is not serving yet (starting) or any more (shutting down); retry later."""

    code = "not_ready"


class InferenceFailedError(VlltrError, RuntimeError):
    """Running the model failed for this input; the input itself was fine, so a retry may succeed."""

    code = "inference_failed"


# ---- model bundles and execution providers ------------------------------------------------------


class BundleError(VlltrError, ValueError):
    """A model bundle is unusable; the message names the file and the reason."""

    code = "bad_bundle"


class ProviderError(VlltrError, RuntimeError):
    """The requested execution provider (CUDA) is not available or not active."""

    code = "provider_unavailable"


class DemoBundleError(VlltrError, RuntimeError):
    """The demo bundle is missing and cannot be built here; the message says what to do."""

    code = "demo_bundle_unavailable"


# ---- training: data, configuration, export ------------------------------------------------------


class DataError(VlltrError, ValueError):
    """A dataset, class list or class text is unusable; the message names the file or class and the problem."""

    code = "bad_data"


class ConfigError(VlltrError, ValueError):
    """A config file or override is invalid; the message names the key."""

    code = "bad_config"


class UnknownArchitectureError(ConfigError):
    """An architecture name that neither open_clip nor the project registers; the message lists close matches."""

    code = "unknown_architecture"


class MissingFileError(VlltrError, FileNotFoundError):
    """A file or directory the command needs does not exist (an unfinished run, a moved checkpoint)."""

    code = "missing_file"


class ExportError(VlltrError, RuntimeError):
    """The run cannot be exported, or what was written does not match the PyTorch model."""

    code = "export_failed"


def all_error_classes() -> list[type[VlltrError]]:
    """Every domain error class defined here, base first (for the code table's tests and documentation)."""
    out: list[type[VlltrError]] = []
    todo: list[type[VlltrError]] = [VlltrError]
    while todo:
        cls = todo.pop(0)
        out.append(cls)
        todo.extend(cls.__subclasses__())
    return out
