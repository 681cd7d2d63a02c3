"""Where admission decodes a group: the declared size it goes by (pipeline/admission.py)."""

from __future__ import annotations

import zstandard

from inference_worker.pipeline.admission import _JSON_WEIGHT, _UNKNOWN, _declared_size


def test_a_plain_payload_counts_its_own_length() -> None:
    assert _declared_size(b"\x81\xa2id\xa1x") == 6
    assert _declared_size(b"") == 0


def test_json_counts_more_per_byte() -> None:
    assert _declared_size(b'{"id": "x"}') == 11 * _JSON_WEIGHT
    assert _declared_size(b'  {"id": "x"}') == 13 * _JSON_WEIGHT  # as the codec detects it


def test_a_zstd_frame_counts_the_content_size_it_declares() -> None:
    frame = zstandard.ZstdCompressor().compress(b"\0" * 100_000)
    assert len(frame) < 1_000
    assert _declared_size(frame) == 100_000


def test_a_zstd_frame_without_a_declared_size_never_decodes_on_the_loop() -> None:
    cctx = zstandard.ZstdCompressor(write_content_size=False)
    chunks = cctx.compressobj()
    frame = chunks.compress(b"\0" * 1000) + chunks.flush()
    assert zstandard.frame_content_size(frame) == -1
    assert _declared_size(frame) == _UNKNOWN


def test_a_malformed_zstd_header_counts_its_own_length() -> None:
    bad = b"\x28\xb5\x2f\xfd"  # the magic and nothing else: fails at once when decoded
    assert _declared_size(bad) == len(bad)
