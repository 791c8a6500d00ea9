"""Writing outputs so that a crash never leaves a file that looks finished."""
import contextlib
import os
import shutil
import tempfile


@contextlib.contextmanager
def atomic_output(path):
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds.

    Works for files and directories: the caller creates whatever it likes at the yielded path.
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    os.close(fd)
    os.unlink(tmp)
    try:
        yield tmp
    except BaseException:
        remove_path(tmp)
        raise
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    os.replace(tmp, path)


def remove_path(path):
    """Remove a file or directory if it exists."""
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
        os.unlink(path)
