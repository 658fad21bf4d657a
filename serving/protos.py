"""TF Serving config messages that tensorflow-serving-api does not ship.

`tensorflow_model_server` reads `--monitoring_config_file` as a
`MonitoringConfig` (tensorflow_serving/config/monitoring_config.proto) and
`--batching_parameters_file` as a `BatchingParameters`
(tensorflow_serving/servables/tensorflow/session_bundle_config.proto). The
pip package has neither module, so the messages are declared here, field for
field, in a descriptor pool of their own, and the same text files parse.
"""

from google.protobuf import descriptor_pb2
from google.protobuf import descriptor_pool
from google.protobuf import message_factory
from google.protobuf import wrappers_pb2

_FIELD = descriptor_pb2.FieldDescriptorProto


def _add(message, name, number, kind, type_name=None, repeated=False):
  field = message.field.add(
      name=name, number=number, type=kind,
      label=_FIELD.LABEL_REPEATED if repeated else _FIELD.LABEL_OPTIONAL)
  if type_name:
    field.type_name = type_name


def _build_pool():
  pool = descriptor_pool.DescriptorPool()
  wrappers = descriptor_pb2.FileDescriptorProto()
  wrappers_pb2.DESCRIPTOR.CopyToProto(wrappers)
  pool.Add(wrappers)
  proto = descriptor_pb2.FileDescriptorProto(
      name="dropvar_tf/serving/tf_serving_configs.proto",
      package="tensorflow.serving", syntax="proto3",
      dependency=["google/protobuf/wrappers.proto"])
  prometheus = proto.message_type.add(name="PrometheusConfig")
  _add(prometheus, "enable", 1, _FIELD.TYPE_BOOL)
  _add(prometheus, "path", 2, _FIELD.TYPE_STRING)
  monitoring = proto.message_type.add(name="MonitoringConfig")
  _add(monitoring, "prometheus_config", 1, _FIELD.TYPE_MESSAGE,
       ".tensorflow.serving.PrometheusConfig")
  batching = proto.message_type.add(name="BatchingParameters")
  int64 = ".google.protobuf.Int64Value"
  _add(batching, "max_batch_size", 1, _FIELD.TYPE_MESSAGE, int64)
  _add(batching, "batch_timeout_micros", 2, _FIELD.TYPE_MESSAGE, int64)
  _add(batching, "max_enqueued_batches", 3, _FIELD.TYPE_MESSAGE, int64)
  _add(batching, "num_batch_threads", 4, _FIELD.TYPE_MESSAGE, int64)
  _add(batching, "thread_pool_name", 5, _FIELD.TYPE_MESSAGE,
       ".google.protobuf.StringValue")
  _add(batching, "allowed_batch_sizes", 6, _FIELD.TYPE_INT64, repeated=True)
  _add(batching, "pad_variable_length_inputs", 7, _FIELD.TYPE_BOOL)
  _add(batching, "enable_large_batch_splitting", 8, _FIELD.TYPE_MESSAGE,
       ".google.protobuf.BoolValue")
  _add(batching, "max_execution_batch_size", 9, _FIELD.TYPE_MESSAGE, int64)
  pool.Add(proto)
  return pool


_POOL = _build_pool()
MonitoringConfig = message_factory.GetMessageClass(
    _POOL.FindMessageTypeByName("tensorflow.serving.MonitoringConfig"))
BatchingParameters = message_factory.GetMessageClass(
    _POOL.FindMessageTypeByName("tensorflow.serving.BatchingParameters"))
