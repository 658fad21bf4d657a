"""The one serving error: a gRPC status code and its message.

Both ends use it. The server raises it inside a request handler and answers
the RPC with its `code` and `message`; the client raises it when an RPC fails,
carrying the code and message the server answered with and the RPC's name.
"""

import grpc


class ServingError(Exception):
  """A request failure with the gRPC status code it is answered with.

  Attributes:
    code: a `grpc.StatusCode`.
    message: the status message (on the client: the server's message).
    method: the RPC name ("Predict", "GetModelMetadata", "GetModelStatus")
      when the client raised it; None inside the server.
  """

  def __init__(self, code, message, method=None):
    """Creates the error.

    Args:
      code: a `grpc.StatusCode`.
      message: the status message.
      method: the RPC that failed, named in `str(error)`; None for an error
        raised inside the server, whose `str` is the message alone.
    """
    self.code = code
    self.message = message
    self.method = method
    if method is None:
      super().__init__(message)
    else:
      super().__init__(f"{method} failed with {code.name}: {message}")

  @classmethod
  def from_rpc_error(cls, error, method):
    """The `ServingError` for a `grpc.RpcError` raised by a stub call.

    Args:
      error: the `grpc.RpcError`.
      method: the RPC name.

    Returns:
      A `ServingError` with the call's code and details (UNKNOWN and the
      error's text when the error is not a call outcome).
    """
    code = error.code() if hasattr(error, "code") else grpc.StatusCode.UNKNOWN
    details = error.details() if hasattr(error, "details") else str(error)
    return cls(code, details, method)


def invalid_argument(message):
  """A `ServingError` with code INVALID_ARGUMENT and `message`."""
  return ServingError(grpc.StatusCode.INVALID_ARGUMENT, message)
