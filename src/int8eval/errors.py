"""Library errors. The CLI turns each into a one-line message and a non-zero exit code."""


class Int8EvalError(Exception):
    """Base class: a problem the user can fix; the message names the bad value and the fix."""


class ConfigError(Int8EvalError):
    """An invalid option, recipe or combination of options."""


class DatasetError(Int8EvalError):
    """Images or labels that cannot be used."""


class ModelLoadError(Int8EvalError):
    """A model or its weights cannot be loaded."""


class BackendUnavailable(Int8EvalError):
    """An optional backend is not installed; the message names the extra to install."""


class RunFolderError(Int8EvalError):
    """A run folder whose files are missing, unreadable, or not from one and the same run."""
