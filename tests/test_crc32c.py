"""CRC32C: the hardware path, the table path and the combine operator agree."""

from __future__ import annotations

import numpy as np
import pytest

from pyengine import _core


def _bytes(data: bytes) -> np.ndarray:
    return np.frombuffer(data, dtype=np.uint8)


def test_known_check_value():
    # The standard check value of CRC-32C (iSCSI, RFC 3720).
    assert _core.crc32c(_bytes(b"123456789")) == 0xE3069283
    assert _core.crc32c_portable(_bytes(b"123456789")) == 0xE3069283


@pytest.mark.parametrize("n", [0, 1, 7, 8, 9, 63, 4096, 24_575, 24_576, 24_583, 100_003, 1_000_001])
def test_hardware_and_table_agree(n):
    data = np.random.default_rng(n).integers(0, 256, n, dtype=np.uint8)
    assert _core.crc32c(data) == _core.crc32c_portable(data)


def test_extend_and_combine_equal_one_pass():
    data = np.random.default_rng(1).integers(0, 256, 1_000_003, dtype=np.uint8)
    whole = _core.crc32c(data)
    for cut in (0, 1, 4097, 500_000, len(data)):
        a, b = data[:cut], data[cut:]
        assert _core.crc32c(b, _core.crc32c(a)) == whole
        assert _core.crc32c_combine(_core.crc32c(a), _core.crc32c(b), len(b)) == whole


def test_a_flipped_bit_changes_the_checksum():
    data = np.zeros(1 << 16, dtype=np.uint8)
    before = _core.crc32c(data)
    data[12345] ^= 0x10
    assert _core.crc32c(data) != before
