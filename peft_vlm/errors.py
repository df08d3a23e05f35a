"""Errors a user can cause. Each message names the file, parameter, row or method at fault."""


class PeftVlmError(Exception):
    """Base class: the command line prints these as one line, without a traceback."""


class UnknownMethodError(PeftVlmError, KeyError):
    def __str__(self) -> str:  # KeyError would quote the message
        return self.args[0]


class ConfigError(PeftVlmError, ValueError):
    """An option or name the user passed is not valid."""


class IncompatibleMethodsError(PeftVlmError):
    pass


class AdapterMismatchError(PeftVlmError):
    pass


class AdapterFileError(PeftVlmError):
    pass


class ModelLoadError(PeftVlmError):
    pass


class NotMergeableError(PeftVlmError):
    pass


class DataError(PeftVlmError, ValueError):
    """A data row or data file that cannot be trained on; names the file and row (`source`) and the `reason`."""

    def __init__(self, source: str, reason: str, detail: str = ""):
        self.source, self.reason, self.detail = source, reason, detail
        super().__init__(f"{source}: {reason}" + (f" ({detail})" if detail else ""))

    def __reduce__(self):  # DataLoader workers pickle errors; keep the three fields
        return type(self), (self.source, self.reason, self.detail)
