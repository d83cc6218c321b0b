"""Keep xformers' import-time warning (no C++/CUDA kernels on this machine) out of users' terminals.

The message is kept in `XFORMERS_LOAD_ERRORS` so `fastdrag info` can report why xformers is unusable.
"""
import logging

XFORMERS_LOAD_ERRORS: list = []


class _XformersLoadFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if message.startswith("WARNING[XFORMERS]"):
            XFORMERS_LOAD_ERRORS.append(message.split("\n")[0].replace("WARNING[XFORMERS]: ", ""))
            return False
        return True


logging.getLogger("xformers").addFilter(_XformersLoadFilter())
