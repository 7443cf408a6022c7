"""Error types that map onto the CLI's exit codes.

The CLI contract is: 0 ok, 1 a verification gate failed, 2 bad input, usage or any other
error. Library callers catch these instead of parsing messages.
"""

from __future__ import annotations


class OnnxSlimCVError(Exception):
    """Base class; the message is one line a user can act on."""

    exit_code = 2


class UserError(OnnxSlimCVError):
    """Bad input or usage: a file that is not ONNX, data that does not fit the model, a bad flag."""

    exit_code = 2


class GateFailed(OnnxSlimCVError):
    """A verification threshold was not met; the candidate model is not fit to ship."""

    exit_code = 1
