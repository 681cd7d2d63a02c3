""":class:`Limits`: the hard caps on one message, and what they bound in memory."""

from __future__ import annotations

from dataclasses import dataclass

#: Container slots allowed on top of ``max_json_elements`` for the envelope itself.
ENVELOPE_SLOTS = 64 * 1024


@dataclass(frozen=True)
class Limits:
    """Hard caps on one message, each checked before the work it protects.

    - ``max_compressed_bytes``: the message as received, checked first.
    - ``max_decompressed_bytes`` / ``max_window_bytes``: a zstd frame's content and
      window (see :func:`inference_worker_client.protocol.loaders.decompress_frame`).
    - ``max_str_len`` / ``max_bin_len`` / ``max_array_len`` / ``max_map_len``: one
      msgpack item each; ``max_array_len`` also caps the element count of one list-form
      tensor in either codec.
    - ``max_json_elements``: array items + map entries + containers materialised from
      one message (+ :data:`ENVELOPE_SLOTS`), in either codec, because small wire items
      become large Python objects.
    - ``max_depth``: maps and arrays nested in the whole message (request or response,
      every key, known or not), the top-level map counting as 1. A list-form tensor's
      ``data`` sits at depth 4, so it may have at most ``max_depth - 3`` dimensions;
      ``meta`` is also held to it on its own (``meta`` itself counting as 1).
    - ``max_meta_bytes``: ``meta`` re-encoded as msgpack (it is echoed in every reply).
    - ``max_id_len``: ``id``, ``app``, ``model`` and tensor names; ``max_inputs``: tensors
      in one ``inputs`` / ``outputs`` map.

    Memory held while one message is decoded with the defaults: the raw message
    (<= 4 MiB), the decompressed payload (<= 64 MiB + 8.2 MiB overshoot for frames
    without a declared size; freed once unpacked), the unpacked bin/str objects
    (<= 64 MiB; binary tensors are views of them, not copies) and at most
    ``max_json_elements + 64 Ki`` container slots (~100 B each): ~250 MiB worst case.
    A failed decode keeps none of it: the error holds no reference to the buffers.
    A decoded request keeps only its tensors (<= ``max_decompressed_bytes``) and meta.
    """

    max_compressed_bytes: int = 4 * 1024 * 1024
    max_decompressed_bytes: int = 64 * 1024 * 1024
    max_window_bytes: int = 8 * 1024 * 1024
    max_str_len: int = 64 * 1024
    max_bin_len: int = 64 * 1024 * 1024
    max_array_len: int = 1_000_000
    max_map_len: int = 1024
    max_depth: int = 32
    max_meta_bytes: int = 4096
    max_id_len: int = 128
    max_inputs: int = 64
    max_json_elements: int = 1_000_000
