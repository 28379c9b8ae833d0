"""User-facing errors: the CLI prints these as one line, never as a traceback."""


class HistobenchError(Exception):
    """A mistake in user input (a name, an option, a file) with a one-line explanation."""


class UnknownComponentError(HistobenchError):
    """A component name that no loaded plugin registers."""


class DuplicateComponentError(HistobenchError):
    """Two plugins registered the same component name."""


class OptionError(HistobenchError):
    """An ``-o key=value`` option that does not fit the component's Options model."""


import errno as _errno

#: A write that failed for want of space: a full disk, a file-size limit (ulimit -f), a quota.
DISK_FULL_ERRNOS = (_errno.ENOSPC, _errno.EFBIG, _errno.EDQUOT)


def disk_full_reason(err: BaseException) -> str | None:
    """Why a write failed, if it failed for want of space; else None.

    A full disk or a file-size limit reaches us in three forms: an ``OSError`` with its errno, an HDF5
    ``RuntimeError`` whose message carries ``errno = 27`` (h5py does not set ``errno``), and torch's zip
    writer's bare ``RuntimeError`` ("unexpected pos", "failed writing file"). All three are named the same way.
    """
    import os
    import re

    if isinstance(err, OSError) and err.errno in DISK_FULL_ERRNOS:
        return f"{os.strerror(err.errno)} (the disk is full or a file-size limit was reached)"
    if isinstance(err, RuntimeError):
        text = str(err)
        found = re.search(r"errno = (\d+)", text)
        if found and int(found.group(1)) in DISK_FULL_ERRNOS:
            return f"{os.strerror(int(found.group(1)))} (the disk is full or a file-size limit was reached)"
        if "unexpected pos" in text or "failed writing file" in text:
            return f"the write stopped short ({_errno.errorcode[_errno.ENOSPC]} or a file-size limit?)"
    return None
