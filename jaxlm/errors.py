"""The one exception type for user mistakes (bad config, missing data, wrong workdir).

`launch.py` prints a `UserError` as a single line and exits non-zero, without a traceback;
everything else is a bug and keeps its traceback.
"""


class UserError(Exception):
  """A mistake the user can fix; the message says what is wrong and what to do."""
