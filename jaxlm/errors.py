"""The exceptions launch.py reports without a traceback.

`UserError`: a mistake the user can fix; `launch.py` prints it as a single line and exits with
status 2. `Stopped`: training stopped on a signal after saving its state; one line and the
status of the signal (130, 143). Everything else is a bug and keeps its traceback.
"""


class UserError(Exception):
  """A mistake the user can fix; the message says what is wrong and what to do."""


class Stopped(Exception):
  """Training stopped on SIGTERM or SIGINT; the message says what was saved and how to resume.

  `exit_status` is 128 + the signal's number (143 for SIGTERM, 130 for SIGINT), the status a
  shell reports for a program those signals ended.
  """

  def __init__(self, message: str, exit_status: int):
    super().__init__(message)
    self.exit_status = exit_status
