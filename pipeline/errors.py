"""Errors a user can act on."""


class PipelineError(Exception):
    """A problem with the input, the arguments or the environment.

    The message is one line saying what is wrong and where (file, line number, key). The CLI
    prints it without a traceback and exits non-zero.
    """
