"""The canonical bytes of a sample's `tokens` rows, whose sha256 is `samples.tokens_sha256`.

Capture (stage) and `tourray verify` both hash through `tokens_bytes`, so the two cannot drift. The
encoding is per row and concatenates: the bytes of rows [0, n) are those of [0, k) then [k, n), so
verify can hash a sample batch by batch, across fragments, without holding it whole.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

#: The hashed `tokens` columns, in order (all but the keys run and sample_id), and their encoding:
#: a little-endian numpy type, or None for a UTF-8 string.
TOKEN_COLUMNS: dict[str, str | None] = {
    "pos": "<i4", "token_id": "<i4", "token": None, "char_start": "<i4", "char_end": "<i4", "segment": None,
    "surprisal": "<f4", "entropy": "<f4", "token_class": None, "kl_ref": "<f4",
}
_HEAD = np.dtype([(f, t) for c, dt in TOKEN_COLUMNS.items() for f, t in ((c + "?", "u1"), (c, dt or "<u4"))])


def tokens_bytes(rows: pa.Table | pa.RecordBatch) -> bytes:
    """Rows in the order given (a sample's rows in pos order), each as a header then its strings.

    Header: per column in TOKEN_COLUMNS order, 1 byte (1 = value, 0 = null) and 4 bytes (the int32 or
    float32 value, or a string's UTF-8 length; 0 for null), so a null never reads as a value (0, "").
    Then the row's strings' UTF-8 bytes in column order; the lengths in the header delimit them."""
    if isinstance(rows, pa.Table):
        return b"".join(tokens_bytes(b) for b in rows.to_batches())
    head, strings = np.zeros(rows.num_rows, _HEAD), []
    for c, dt in TOKEN_COLUMNS.items():
        col = rows.column(c)
        head[c + "?"] = col.is_valid().to_numpy(zero_copy_only=False)
        if dt is None:
            strings.append(pc.fill_null(col, "").cast(pa.binary()))
            head[c] = pc.binary_length(strings[-1]).to_numpy(zero_copy_only=False)
        else:
            head[c] = pc.fill_null(col, 0).to_numpy(zero_copy_only=False)
    head = pa.FixedSizeBinaryArray.from_buffers(pa.binary(_HEAD.itemsize), len(head), [None, pa.py_buffer(head)])
    joined = pc.binary_join_element_wise(head.cast(pa.binary()), *strings, b"")
    off = np.frombuffer(joined.buffers()[1], np.int32)[joined.offset : joined.offset + len(joined) + 1]
    return joined.buffers()[2].to_pybytes()[off[0] : off[-1]] if len(joined) else b""


def tokens_sha256(rows: pa.Table | pa.RecordBatch) -> str:
    """`samples.tokens_sha256`: sha256 hex of `tokens_bytes` of one sample's rows in pos order."""
    return hashlib.sha256(tokens_bytes(rows)).hexdigest()
