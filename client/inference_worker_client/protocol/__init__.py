"""Wire format v1 (DESIGN.md section 5): envelope, tensor codec, limits and error codes
(pure, no I/O).

A message is one zstd frame holding one msgpack map; bare msgpack and JSON objects are
accepted too (told apart by their first bytes). A zstd frame always holds msgpack.

Modules, each one concern: ``codes`` (error codes, codecs), ``errors``
(:class:`ProtocolError`), ``limits`` (:class:`Limits` and the memory they bound),
``dtypes`` (the one dtype table), ``loaders`` (size-capped zstd/msgpack/JSON loading),
``tensors`` (tensor <-> wire, fingerprint), ``envelope`` (the message dataclasses),
``validate`` (field rules), ``codec`` (:class:`WireCodec`, the entry point).
"""

from inference_worker_client.protocol.codec import WireCodec, detect_codec
from inference_worker_client.protocol.codes import RETRYABLE_CODES, Codec, ErrorCode
from inference_worker_client.protocol.dtypes import DTYPE_NAMES, DTYPES, dtype_name, wire_dtype
from inference_worker_client.protocol.envelope import (
    Answer,
    AnswerBatch,
    ErrorInfo,
    Request,
    Response,
    Timing,
    error_response,
)
from inference_worker_client.protocol.errors import Addressable, ProtocolError
from inference_worker_client.protocol.limits import Limits
from inference_worker_client.protocol.loaders import WireError
from inference_worker_client.protocol.tensors import Array, TensorError, fingerprint

__all__ = [
    "DTYPES",
    "DTYPE_NAMES",
    "RETRYABLE_CODES",
    "Addressable",
    "Answer",
    "AnswerBatch",
    "Array",
    "Codec",
    "ErrorCode",
    "ErrorInfo",
    "Limits",
    "ProtocolError",
    "Request",
    "Response",
    "TensorError",
    "Timing",
    "WireCodec",
    "WireError",
    "detect_codec",
    "dtype_name",
    "error_response",
    "fingerprint",
    "wire_dtype",
]
