"""The client's REST transport: TF Serving's REST API behind gRPC's messages.

`RestStub` offers `Predict`, `GetModelMetadata` and `GetModelStatus` taking
and returning the same `tensorflow_serving.apis` messages as the gRPC stubs,
so `VariationClient(..., protocol="rest")` works the same over either API.
It sends the columnar format (`"inputs"`) and reads `"outputs"` back with
the dtypes of the signature's outputs (from the metadata, fetched once).

What REST cannot carry: TF Serving's REST Predict answer names no model
version, so the response's `model_spec.version` is set only when the
request asked for one; and it has no `output_filter`, so every output
comes back and the filter is applied here, with the server's wording for an
unknown alias.
"""

import base64
import json
import threading
import urllib.parse

from google.protobuf import json_format
import grpc
import numpy as np
import requests
from requests import adapters
from urllib3.util import retry as retry_lib

from dropvar_tf import contract
from dropvar_tf.serving import codec
from dropvar_tf.serving import errors
from dropvar_tf.serving import json_codec
from tensorflow_serving.apis import get_model_metadata_pb2
from tensorflow_serving.apis import get_model_status_pb2
from tensorflow_serving.apis import predict_pb2

# The gRPC code for an HTTP status of TF Serving's REST API (the inverse of
# its ToHTTPStatusCode, taking the first code of each HTTP status).
_GRPC_CODE = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    403: grpc.StatusCode.PERMISSION_DENIED,
    404: grpc.StatusCode.NOT_FOUND,
    409: grpc.StatusCode.ABORTED,
    429: grpc.StatusCode.RESOURCE_EXHAUSTED,
    499: grpc.StatusCode.CANCELLED,
    500: grpc.StatusCode.INTERNAL,
    501: grpc.StatusCode.UNIMPLEMENTED,
    503: grpc.StatusCode.UNAVAILABLE,
    504: grpc.StatusCode.DEADLINE_EXCEEDED,
}


def _input_json(array):
  """An input array as a JSON value; bytes as {"b64": ...}."""
  if array.dtype.kind in "OS":
    flat = [{"b64": base64.b64encode(
        v if isinstance(v, bytes) else str(v).encode("utf-8")).decode(
            "ascii")} for v in array.ravel()]
    out = np.empty(len(flat), dtype=object)
    out[:] = flat
    return out.reshape(array.shape).tolist()
  return array.tolist()


def _host_port(target):
  """"host:port" of a REST target given as that or as "http://host:port".

  Raises:
    ValueError: another scheme, or a path after the port.
  """
  parsed = urllib.parse.urlsplit(target if "://" in target else
                                 f"http://{target}")
  if (parsed.scheme != "http" or not parsed.netloc or
      parsed.path not in ("", "/") or parsed.query or parsed.fragment):
    raise ValueError(
        f"Invalid value received for argument `target`. Expected "
        f"\"host:port\" (or \"http://host:port\") of TF Serving's REST "
        f"API. Received: target={target!r}")
  return parsed.netloc


class RestStub:
  """TF Serving's REST API with the gRPC stubs' methods and messages."""

  def __init__(self, target, max_retries=3, backoff_seconds=0.05,
               max_backoff_seconds=2.0):
    """Creates the stub; connects lazily.

    Args:
      target: "host:port" of the REST API (or "http://host:port").
      max_retries: retries after a refused connection, with exponential
        backoff (Predict and the status calls change nothing on the server).
      backoff_seconds: backoff factor of the first retry.
      max_backoff_seconds: longest wait between retries.
    """
    self._url = f"http://{_host_port(target)}"
    self._session = requests.Session()
    policy = retry_lib.Retry(total=max_retries, connect=max_retries, read=0,
                             status=0, other=0, backoff_factor=backoff_seconds,
                             backoff_max=max_backoff_seconds,
                             allowed_methods=None)
    self._session.mount("http://", adapters.HTTPAdapter(max_retries=policy))
    self._output_dtypes = {}  # (name, version, label, signature) -> dtypes.
    self._lock = threading.Lock()

  def _path(self, spec):
    path = f"/v1/models/{urllib.parse.quote(spec.name, safe='')}"
    choice = spec.WhichOneof("version_choice")
    if choice == "version":
      path += f"/versions/{spec.version.value}"
    elif choice == "version_label":
      path += f"/labels/{urllib.parse.quote(spec.version_label, safe='')}"
    return path

  def _send(self, method, rpc, path, timeout, body=None):
    """Sends one request; returns the body text or raises ServingError."""
    try:
      response = self._session.request(method, self._url + path, data=body,
                                       timeout=timeout)
    except requests.Timeout as e:
      raise errors.ServingError(grpc.StatusCode.DEADLINE_EXCEEDED, str(e),
                                rpc) from None
    except requests.ConnectionError as e:
      raise errors.ServingError(grpc.StatusCode.UNAVAILABLE, str(e),
                                rpc) from None
    if response.status_code != 200:
      try:
        message = response.json()["error"]
      except (ValueError, KeyError, TypeError):
        message = response.text
      code = _GRPC_CODE.get(response.status_code, grpc.StatusCode.UNKNOWN)
      raise errors.ServingError(code, message, rpc)
    return response.text

  def GetModelStatus(self, request, timeout=None):
    """GET /v1/models/NAME[...] as a `GetModelStatusResponse`."""
    text = self._send("GET", "GetModelStatus", self._path(request.model_spec),
                      timeout)
    return json_format.Parse(text,
                             get_model_status_pb2.GetModelStatusResponse())

  def GetModelMetadata(self, request, timeout=None):
    """GET /v1/models/NAME[...]/metadata as a `GetModelMetadataResponse`."""
    text = self._send("GET", "GetModelMetadata",
                      self._path(request.model_spec) + "/metadata", timeout)
    doc = json.loads(text)
    response = get_model_metadata_pb2.GetModelMetadataResponse()
    json_format.ParseDict(doc["model_spec"], response.model_spec)
    signature_map = json_format.ParseDict(
        doc["metadata"]["signature_def"],
        get_model_metadata_pb2.SignatureDefMap())
    response.metadata["signature_def"].Pack(signature_map)
    return response

  def _dtypes(self, spec, timeout):
    """{output alias: dtype enum} of the signature `spec` names."""
    signature = spec.signature_name or contract.SERVING_SIGNATURE
    key = (spec.name, spec.WhichOneof("version_choice"),
           spec.version.value, spec.version_label, signature)
    with self._lock:
      dtypes = self._output_dtypes.get(key)
    if dtypes is None:
      metadata_request = get_model_metadata_pb2.GetModelMetadataRequest()
      metadata_request.model_spec.CopyFrom(spec)
      metadata = self.GetModelMetadata(metadata_request, timeout)
      signature_map = get_model_metadata_pb2.SignatureDefMap()
      metadata.metadata["signature_def"].Unpack(signature_map)
      if signature not in signature_map.signature_def:
        raise errors.ServingError(
            grpc.StatusCode.FAILED_PRECONDITION,
            f"Serving signature key \"{signature}\" not found.", "Predict")
      dtypes = {alias: info.dtype for alias, info in
                signature_map.signature_def[signature].outputs.items()}
      with self._lock:
        self._output_dtypes[key] = dtypes
    return dtypes

  def Predict(self, request, timeout=None):
    """POST /v1/models/NAME[...]:predict as a `PredictResponse`."""
    spec = request.model_spec
    dtypes = self._dtypes(spec, timeout)
    for alias in request.output_filter:
      if alias not in dtypes:
        raise errors.ServingError(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"output tensor alias not found in signature: {alias} Outputs "
            f"expected to be in the set {{{','.join(sorted(dtypes))}}}.",
            "Predict")
    body = {"inputs": {
        alias: _input_json(codec.decode(proto, alias))
        for alias, proto in request.inputs.items()}}
    if spec.signature_name:
      body["signature_name"] = spec.signature_name
    text = self._send("POST", "Predict", self._path(spec) + ":predict",
                      timeout, json.dumps(body))
    try:
      outputs = json_codec.outputs_from_response(text, json_codec.COLUMNAR,
                                                 dtypes)
    except errors.ServingError as e:
      raise errors.ServingError(e.code, e.message, "Predict") from None
    response = predict_pb2.PredictResponse()
    response.model_spec.name = spec.name
    response.model_spec.signature_name = (spec.signature_name or
                                          contract.SERVING_SIGNATURE)
    if spec.WhichOneof("version_choice") == "version":
      response.model_spec.version.value = spec.version.value
    for alias in request.output_filter or sorted(outputs):
      response.outputs[alias].CopyFrom(codec.encode(outputs[alias]))
    return response

  def close(self):
    """Closes the HTTP connections."""
    self._session.close()
