"""The one small exception tree of dicom-node.

Every failure a user can cause ends in one of these, with a message that says what to do.
"""


class DicomNodeError(Exception):
    """Base of every error dicom-node raises on purpose."""


class ConfigError(DicomNodeError):
    """The node configuration is invalid; the message names the key and the bad value."""


class ModelPackageError(DicomNodeError):
    """A model package folder is missing, incomplete or inconsistent."""


class InputError(DicomNodeError):
    """Input images cannot be processed (unsupported, inconsistent or undecodable)."""


class NotApplicableError(InputError):
    """The image is outside what the model package is valid for (view, body part, species)."""


class StartupError(DicomNodeError):
    """The node cannot start here: a storage folder it cannot write, a port it cannot bind."""


class AuditWriteError(DicomNodeError):
    """An audit record could not be written whole (full disk, I/O error).

    The access it would have recorded must not happen: the receiver aborts the association or
    refuses the C-STORE with Out of Resources (0xA700). Free space on ``storage_dir``.
    """
