"""Vectorized field checks and parsing against a plain-Python reference of the documented rules."""

import re
from typing import List, Optional

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
from hypothesis import given, settings, strategies as st

from torchrec_memcom.data.parse import csv_reader_options, dense_transform, parse_batch

LABEL = st.sampled_from(["0", "1", "", "2", "01", "-1", "x"])
INT = st.one_of(st.text("0123456789", min_size=1, max_size=20), st.text("-0123456789+. e", max_size=6))
HEX = st.one_of(
    st.text("0123456789abcdefABCDEF", min_size=8, max_size=8),
    st.just(""),
    st.text("0123456789abcdefABCDEFgxz-", max_size=18),
)
ROW = st.tuples(LABEL, st.lists(INT, min_size=13, max_size=13), st.lists(HEX, min_size=26, max_size=26))


def reference_bad_column(label: str, ints: List[str], cats: List[str]) -> Optional[int]:
    if label not in ("0", "1"):
        return 0
    for j, v in enumerate(ints):
        if v and not (re.fullmatch(r"-?[0-9]+", v) and len(v) <= 18):
            return 1 + j
    for j, v in enumerate(cats):
        if v and not re.fullmatch(r"[0-9a-fA-F]{1,16}", v):
            return 14 + j
    return None


@settings(max_examples=60, deadline=None)
@given(st.lists(ROW, min_size=1, max_size=40))
def test_parse_matches_reference(rows: list) -> None:
    text = "".join("\t".join([label, *ints, *cats]) + "\n" for label, ints, cats in rows)
    read, parse, convert = csv_reader_options(1 << 20, lambda row: "error")
    batch = pacsv.read_csv(pa.BufferReader(text.encode()), read, parse, convert).combine_chunks().to_batches()[0]
    parsed = parse_batch(batch)
    for i, (label, ints, cats) in enumerate(rows):
        bad = reference_bad_column(label, ints, cats)
        assert parsed.bad_column[i] == (-1 if bad is None else bad), (i, label, ints, cats)
        if bad is None:
            assert parsed.label[i] == int(label)
            assert parsed.ints[:, i].tolist() == [int(v or 0) for v in ints]
            assert parsed.cats[:, i].tolist() == [int(v or "0", 16) for v in cats]


def test_dense_transform() -> None:
    ints = np.array([[-5, 0, 1, 9, 2**40]])
    expected = np.log([1, 1, 2, 10, 2**40 + 1]).astype(np.float32)
    np.testing.assert_allclose(dense_transform(ints)[0], expected, rtol=1e-7)
