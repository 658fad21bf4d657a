"""Tests of serving/errors.py: the one ServingError of client and server."""

from concurrent import futures

import grpc

from dropvar_tf._keras import tf
from dropvar_tf.serving import errors
from tensorflow_serving.apis import predict_pb2
from tensorflow_serving.apis import prediction_service_pb2_grpc

_MESSAGE = "Servable not found for request: Latest(m)"


class _Refusing(prediction_service_pb2_grpc.PredictionServiceServicer):
  """Answers every Predict with NOT_FOUND."""

  def Predict(self, request, context):
    context.abort(grpc.StatusCode.NOT_FOUND, _MESSAGE)


class ServingErrorTest(tf.test.TestCase):

  def test_server_side_error_is_its_message(self):
    error = errors.ServingError(grpc.StatusCode.NOT_FOUND, _MESSAGE)
    self.assertEqual(str(error), _MESSAGE)
    self.assertEqual(error.code, grpc.StatusCode.NOT_FOUND)
    self.assertEqual(error.message, _MESSAGE)
    self.assertIsNone(error.method)

  def test_client_side_error_names_the_rpc(self):
    error = errors.ServingError(grpc.StatusCode.NOT_FOUND, _MESSAGE,
                                "Predict")
    self.assertEqual(str(error), f"Predict failed with NOT_FOUND: {_MESSAGE}")
    self.assertEqual(error.message, _MESSAGE)
    self.assertEqual(error.method, "Predict")

  def test_invalid_argument(self):
    error = errors.invalid_argument("Missing ModelSpec")
    self.assertEqual(error.code, grpc.StatusCode.INVALID_ARGUMENT)
    self.assertEqual(str(error), "Missing ModelSpec")

  def test_from_rpc_error_keeps_code_and_details(self):
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=1))
    prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(
        _Refusing(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    self.addCleanup(server.stop, None)
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
      stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
      with self.assertRaises(grpc.RpcError) as cm:
        stub.Predict(predict_pb2.PredictRequest(), timeout=10.0)
    error = errors.ServingError.from_rpc_error(cm.exception, "Predict")
    self.assertEqual(error.code, grpc.StatusCode.NOT_FOUND)
    self.assertEqual(error.message, _MESSAGE)
    self.assertEqual(str(error), f"Predict failed with NOT_FOUND: {_MESSAGE}")

  def test_from_rpc_error_without_a_status(self):
    error = errors.ServingError.from_rpc_error(grpc.RpcError("broken"),
                                               "GetModelStatus")
    self.assertEqual(error.code, grpc.StatusCode.UNKNOWN)
    self.assertEqual(str(error),
                     "GetModelStatus failed with UNKNOWN: broken")


if __name__ == "__main__":
  tf.test.main()
