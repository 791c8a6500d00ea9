"""Writing outputs so that a crash never leaves a file that looks finished, and so that nothing
the user did not ask to replace is ever deleted."""
import contextlib
import glob
import os
import shutil
import tempfile

from mindsft.errors import OutputError

# Every temporary output carries this in its name, so a resumed run can find its own leftovers.
PARTIAL_MARK = ".partial"


def check_output_path(path, folder=False, overwrite=False):
    """Refuse an output path whose current contents the caller did not ask to replace.

    A file output never replaces a folder. A folder output never replaces a file, and replaces a
    non-empty folder only with `overwrite`. A file output replaces an existing file: naming it is
    asking for it.
    """
    path = os.fspath(path)
    if not folder and os.path.isdir(path):
        raise OutputError(f"{path} is an existing folder; give the path of the file to write inside it")
    if folder and os.path.lexists(path) and not os.path.isdir(path):
        raise OutputError(f"{path} is an existing file, not a folder; give a new folder to write")
    if folder and not overwrite and os.path.isdir(path) and os.listdir(path):
        raise OutputError(f"{path} is a folder that is not empty; give a new folder, or --overwrite to replace it")


@contextlib.contextmanager
def atomic_output(path, folder=False, overwrite=False):
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds.

    `folder`: the caller creates a folder at the yielded path (else a file). What stands at
    `path` is checked first (see check_output_path), so a refused output costs no work.
    """
    path = os.fspath(path)
    check_output_path(path, folder, overwrite)
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=PARTIAL_MARK, dir=parent)
    os.close(fd)
    os.unlink(tmp)
    try:
        yield tmp
        check_output_path(path, folder, overwrite)  # something may have appeared there meanwhile
        if folder and os.path.isdir(path):
            # A folder cannot be renamed over a non-empty one: move the old one aside first, so the
            # output is never missing and the old one is gone only once the new one is in place.
            old = tmp + ".old"
            os.replace(path, old)
            os.replace(tmp, path)
            remove_path(old)
        else:
            os.replace(tmp, path)
    except BaseException:
        remove_path(tmp)
        raise


def write_text_atomic(path, text):
    """Write `text` (UTF-8) to `path` through a temporary name."""
    with atomic_output(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)


def remove_partials(folder):
    """Delete the temporary outputs a killed process left in `folder`; returns their paths."""
    found = [p for p in glob.glob(os.path.join(glob.escape(os.fspath(folder)), ".*" + PARTIAL_MARK + "*"))]
    for path in found:
        remove_path(path)
    return found


def remove_path(path):
    """Remove a file or directory if it exists."""
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
        os.unlink(path)
