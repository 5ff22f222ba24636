"""The base class of ldmkit's user-facing errors."""


class LdmkitError(Exception):
    """An error whose message names the culprit (config, file, plugin, key) and what to do.

    The CLI prints these in one line without a traceback; every specific error also
    derives from the matching built-in (ValueError, LookupError, RuntimeError, ...).
    """
