"""TF Serving's REST API (`--rest_api_port`), served with aiohttp.

Routes, as in `tensorflow_serving/model_servers/http_rest_api_handler.cc`
(paths are matched case-insensitively; names and labels are URL-decoded):

- `POST /v1/models/NAME[/versions/N | /labels/L]:predict` with a JSON body
  in the row ("instances") or columnar ("inputs") format (`json_codec`).
- `GET /v1/models/NAME[/versions/N | /labels/L]`: the model's status, the
  GetModelStatusResponse as JSON.
- `GET /v1/models/NAME[/versions/N | /labels/L]/metadata`: the model spec
  and its SignatureDefs, as JSON.
- `GET <prometheus path>` when monitoring is on (`monitoring.Metrics`).

A refused request is answered `{"error": "<message>"}` with the HTTP code
TF Serving maps the gRPC code to (`HTTP_STATUS`). `:classify` and
`:regress` answer 501 (UNIMPLEMENTED). Requests run on a thread pool,
so the event loop keeps accepting connections while models run.
"""

import asyncio
import json
import re
import threading
import time
import urllib.parse
from concurrent import futures

from absl import logging
from aiohttp import web
import grpc
from google.protobuf import json_format

from dropvar_tf.serving import codec
from dropvar_tf.serving import errors
from dropvar_tf.serving import json_codec
from dropvar_tf.serving import servicers
from tensorflow_serving.apis import get_model_metadata_pb2
from tensorflow_serving.apis import get_model_status_pb2
from tensorflow_serving.apis import model_pb2
from tensorflow_serving.apis import predict_pb2

# TF Serving's ToHTTPStatusCode (model_servers/http_server.cc).
HTTP_STATUS = {
    grpc.StatusCode.OK: 200,
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.UNKNOWN: 500,
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.INTERNAL: 500,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DATA_LOSS: 500,
    grpc.StatusCode.UNAUTHENTICATED: 401,
}

_PREDICTION_PATH = re.compile(
    r"/v1/models/([^/:]+)(?:(?:/versions/(\d+))|(?:/labels/([^/:]+)))?"
    r":(classify|regress|predict)", re.IGNORECASE)
_STATUS_PATH = re.compile(
    r"/v1/models(?:/([^/:]+))?(?:(?:/versions/(\d+))|(?:/labels/([^/:]+)))?"
    r"(?:/(metadata))?", re.IGNORECASE)
_API_PATH = re.compile(r"/v1/.*", re.IGNORECASE)
_JSON = "application/json"
_MAX_INT64 = 2**63 - 1


def _model_spec(name, version, label):
  """A ModelSpec from the URL's parts (still URL-encoded)."""
  spec = model_pb2.ModelSpec(name=urllib.parse.unquote(name or ""))
  if version:
    value = int(version)
    if value > _MAX_INT64:
      raise errors.invalid_argument(
          f"Failed to convert version: {version} to numeric.")
    spec.version.value = value
  if label:
    spec.version_label = urllib.parse.unquote(label)
  return spec


def _error_body(message):
  return json.dumps({"error": message})


class RestApi:
  """The REST routes over a `servicers.ServingCore`, without the HTTP server.

  `handle` is synchronous and thread-safe; `RestServer` calls it from a
  thread pool.
  """

  def __init__(self, core, metrics=None, metrics_path=None):
    """Creates the API.

    Args:
      core: the `servicers.ServingCore` answering the requests.
      metrics: a `monitoring.Metrics` that counts requests and renders the
        Prometheus page, or None.
      metrics_path: where the Prometheus page is served (with `metrics`).
    """
    self._core = core
    self._metrics = metrics
    self._metrics_path = metrics_path

  def handle(self, method, raw_path, body):
    """Answers one HTTP request.

    Args:
      method: "GET", "POST", ...
      raw_path: the URL path, still URL-encoded (no query string).
      body: the request body, bytes.

    Returns:
      (HTTP status, content type, body text).
    """
    if (self._metrics is not None and self._metrics_path and
        urllib.parse.unquote(raw_path) == self._metrics_path):
      if method != "GET":
        return 405, "text/plain", "Use GET for metrics.\n"
      return 200, self._metrics.content_type, self._metrics.render()
    if not _API_PATH.fullmatch(raw_path):
      return 404, "text/plain", f"Not found: {raw_path}\n"
    start = time.monotonic()
    # What TF Serving's REST server records: the model and the URL's method
    # ("predict"; "" for GETs), whatever the outcome.
    seen = {"model": None, "version": None, "api": ""}
    try:
      text = self._dispatch(method, raw_path, body, seen)
      code = grpc.StatusCode.OK
    except Exception as e:
      code, message = servicers.status_of(e)
      if code == grpc.StatusCode.INTERNAL and not isinstance(
          e, errors.ServingError):
        logging.exception("REST %s %s failed", method, raw_path)
      text = _error_body(message)
    if self._metrics is not None and seen["model"] is not None:
      self._metrics.observe_request(seen["model"], seen["version"],
                                    seen["api"], "REST", code,
                                    time.monotonic() - start)
    return HTTP_STATUS.get(code, 500), _JSON, text

  def _dispatch(self, method, raw_path, body, seen):
    """Routes a request; returns the JSON text, noting what it saw in `seen`.
    """
    if method == "POST":
      match = _PREDICTION_PATH.fullmatch(raw_path)
      if match:
        name, version, label, verb = match.groups()
        seen["model"] = urllib.parse.unquote(name)
        seen["api"] = verb.lower()
        spec = _model_spec(name, version, label)
        if verb.lower() != "predict":
          raise errors.ServingError(
              grpc.StatusCode.UNIMPLEMENTED,
              f"{verb.capitalize()} is not served by dropvar_model_server; "
              "use :predict.")
        return self._predict(spec, body, seen)
    elif method == "GET":
      match = _STATUS_PATH.fullmatch(raw_path)
      if match:
        name, version, label, metadata = match.groups()
        if not name:
          raise errors.invalid_argument("Missing model name in request.")
        seen["model"] = urllib.parse.unquote(name)
        spec = _model_spec(name, version, label)
        if metadata:
          return self._metadata(spec)
        return self._status(spec)
    raise errors.invalid_argument(f"Malformed request: {method} {raw_path}")

  def _predict(self, spec, body, seen):
    doc, signature = json_codec.parse_predict_request(body)
    spec.signature_name = signature
    try:
      specs = self._core.signature_inputs(spec)
    except errors.ServingError as e:
      if e.code != grpc.StatusCode.FAILED_PRECONDITION:
        raise
      raise errors.invalid_argument(
          f"Serving signature name: \"{signature or 'serving_default'}\" not "
          "found in signature def") from None
    dtypes = {alias: s.dtype for alias, s in specs.items()}
    arrays, request_format = json_codec.predict_inputs(doc, dtypes)
    request = predict_pb2.PredictRequest(model_spec=spec)
    for alias, array in arrays.items():
      request.inputs[alias].CopyFrom(codec.encode(array))
    response = self._core.predict(request)
    seen["version"] = response.model_spec.version.value
    outputs = {alias: codec.decode(proto, alias, role="Output")
               for alias, proto in response.outputs.items()}
    return json_codec.predict_response(outputs, request_format)

  def _metadata(self, spec):
    request = get_model_metadata_pb2.GetModelMetadataRequest(
        model_spec=spec, metadata_field=["signature_def"])
    response = self._core.get_model_metadata(request)
    signature_map = get_model_metadata_pb2.SignatureDefMap()
    response.metadata["signature_def"].Unpack(signature_map)
    options = dict(preserving_proto_field_name=True,
                   always_print_fields_with_no_presence=True)
    return json.dumps({
        "model_spec": json_format.MessageToDict(response.model_spec,
                                                **options),
        "metadata": {"signature_def": json_format.MessageToDict(
            signature_map, **options)},
    }, indent=1)

  def _status(self, spec):
    request = get_model_status_pb2.GetModelStatusRequest(model_spec=spec)
    response = self._core.get_model_status(request)
    return json_format.MessageToJson(
        response, always_print_fields_with_no_presence=True)


class RestServer:
  """Serves a `RestApi` over HTTP/1.1 with aiohttp, on its own thread."""

  def __init__(self, api, host="127.0.0.1", port=0,
               max_request_bytes=64 * 1024 * 1024, max_workers=4):
    """Creates the server; nothing is bound until `start`.

    Args:
      api: the `RestApi` answering requests.
      host: interface to bind.
      port: TCP port; 0 picks a free one.
      max_request_bytes: largest request body; a larger one is answered 429
        (RESOURCE_EXHAUSTED, as gRPC answers an oversized message).
      max_workers: threads running requests.
    """
    self._api = api
    self.host = host
    self.port = port
    self._max_request_bytes = max_request_bytes
    self._executor = futures.ThreadPoolExecutor(
        max_workers=max_workers, thread_name_prefix="rest-handler")
    self._loop = None
    self._thread = None

  async def _handle(self, request):
    try:
      body = await request.read()
    except web.HTTPRequestEntityTooLarge:
      return web.Response(
          status=HTTP_STATUS[grpc.StatusCode.RESOURCE_EXHAUSTED],
          content_type=_JSON,
          text=_error_body(f"Request body larger than the "
                           f"{self._max_request_bytes} bytes allowed "
                           "(--max_request_bytes)."))
    status, content_type, text = await asyncio.get_running_loop(
    ).run_in_executor(self._executor, self._api.handle, request.method,
                      request.rel_url.raw_path, body)
    if ";" in content_type:  # aiohttp takes the charset on its own.
      content_type = content_type.split(";")[0]
    return web.Response(status=status, content_type=content_type, text=text)

  def start(self):
    """Binds and starts serving on a daemon thread.

    Returns:
      The bound port.

    Raises:
      OSError: the address cannot be bound.
    """
    started = futures.Future()
    self._loop = asyncio.new_event_loop()
    self._thread = threading.Thread(target=self._run, args=(started,),
                                    daemon=True, name="rest-server")
    self._thread.start()
    self.port = started.result()
    return self.port

  def _run(self, started):
    loop = self._loop
    asyncio.set_event_loop(loop)
    app = web.Application(client_max_size=self._max_request_bytes)
    app.router.add_route("*", "/{tail:.*}", self._handle)
    runner = web.AppRunner(app, access_log=None, handle_signals=False,
                           shutdown_timeout=5.0)
    try:
      loop.run_until_complete(runner.setup())
      site = web.TCPSite(runner, self.host, self.port)
      loop.run_until_complete(site.start())
    except Exception as e:
      loop.run_until_complete(runner.cleanup())
      loop.close()
      started.set_exception(e)
      return
    started.set_result(runner.addresses[0][1])
    loop.run_forever()
    loop.run_until_complete(runner.cleanup())
    loop.close()

  @property
  def url(self):
    """"http://host:port" of the server (the bound port once started)."""
    host = f"[{self.host}]" if ":" in self.host else self.host
    return f"http://{host}:{self.port}"

  def stop(self):
    """Stops accepting requests; running ones finish first."""
    if self._thread is not None:
      self._loop.call_soon_threadsafe(self._loop.stop)
      self._thread.join(timeout=30)
      self._thread = None
    self._executor.shutdown(wait=True)
