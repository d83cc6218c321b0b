"""Exceptions raised for bad input; each message names the problem."""


class FastDragError(Exception):
    """Base class of every error fastdrag raises on purpose."""


class InputError(FastDragError, ValueError):
    """The image, prompt, points or mask given to an edit are not usable."""


class ModelLoadError(FastDragError, OSError):
    """A model could not be found or loaded."""


class OutputExistsError(FastDragError, FileExistsError):
    """An output path exists and overwriting was not asked for."""


class OutputError(FastDragError, OSError):
    """An output cannot be written where it was asked for (a folder that cannot be made, no permission, a full disk)."""


class ConfigError(FastDragError, ValueError):
    """A configuration value is out of range or unknown."""
