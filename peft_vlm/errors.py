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
