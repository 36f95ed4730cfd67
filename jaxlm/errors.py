"""The exceptions launch.py reports without a traceback.

`UserError`: a mistake the user can fix; `launch.py` prints it as a single line and exits with
status 2. `DiskFull`: a `UserError` for a write that failed on a full disk or quota.
`Stopped`: training stopped on a signal after saving its state; one line and the status of
the signal (130, 143). Everything else is a bug and keeps its traceback.
"""

import errno
import os
import shutil
from typing import Optional

# Space a filesystem may keep back (metadata, the last partial block): a write that failed with
# less than this left beyond what it needed is taken as a full disk.
_RESERVE_BYTES = 1 << 20


class UserError(Exception):
  """A mistake the user can fix; the message says what is wrong and what to do."""


class DiskFull(UserError):
  """Writing in `folder` failed for want of space or quota; `reason` is the OS's words."""

  def __init__(self, folder: str, reason: str, then: str = 'then try again'):
    super().__init__(f'writing in {folder} failed: {reason}: free space on that disk, {then}')
    self.folder, self.reason = folder, reason

  @classmethod
  def of(cls, error: BaseException, folder: str, needed: int = 0) -> Optional['DiskFull']:
    """A DiskFull for `error`, raised while writing `needed` bytes in `folder`, if the disk is
    why; else None.

    By the errno of `error` or of one of its causes (ENOSPC, EDQUOT); else, since TensorStore's
    errors carry no errno, by the space left in `folder` (a quota is then not seen).
    """
    code = full_disk_errno(error)
    free = _free_bytes(folder)
    if code is None and free is not None and free < needed + _RESERVE_BYTES:
      code = errno.ENOSPC
    return None if code is None else cls(folder, os.strerror(code))


def full_disk_errno(error: BaseException) -> Optional[int]:
  """ENOSPC or EDQUOT when `error` or one of its causes (or contexts) is an OSError of it."""
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
      return error.errno
    error = error.__cause__ or error.__context__
  return None


def _free_bytes(folder: str) -> Optional[int]:
  """The space left for this user on the disk of `folder` (of its nearest existing parent);
  None when the OS does not say."""
  path = os.path.abspath(folder)
  while not os.path.exists(path) and os.path.dirname(path) != path:
    path = os.path.dirname(path)
  try:
    return shutil.disk_usage(path).free
  except OSError:
    return None


class Stopped(Exception):
  """Training stopped on SIGTERM or SIGINT; the message says what was saved and how to resume.

  `exit_status` is 128 + the signal's number (143 for SIGTERM, 130 for SIGINT), the status a
  shell reports for a program those signals ended.
  """

  def __init__(self, message: str, exit_status: int):
    super().__init__(message)
    self.exit_status = exit_status
