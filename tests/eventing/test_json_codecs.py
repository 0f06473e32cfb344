"""The fast JSON paths of replay and batched rows give what the standard
library gave: replay must rebuild exactly what the live path built."""

from __future__ import annotations

import datetime as dt
import decimal
import json
import uuid

from eventing.replay import _loads
from eventing.rows import _dumps


def test_rows_dump_to_the_same_json_values_as_json_dumps_with_str_default() -> None:
    at = dt.datetime(2026, 11, 26, 18, 0, 0, 123, tzinfo=dt.UTC)
    records = [
        {
            "when": at,
            "id": uuid.UUID(int=5),
            "total": decimal.Decimal("1.50"),
            7: "an int key",
            "nested": {"at": at, "values": [1, 2.5, "s", None, True]},
            "text": "ünïcode ✓",
            "big": 2**70,
        }
    ]
    assert json.loads(_dumps(records)) == json.loads(json.dumps(records, default=str))


def test_payloads_parse_as_json_loads_parses_them_even_past_64_bits() -> None:
    for text in (
        '{"order_id": "o-1", "lines": [{"sku": "S", "quantity": 2}], "total": "4.00"}',
        '{"n": 12345678901234567890123, "m": -9300000000000000000, "f": 0.1}',
        '{"s": "1234567890123456789012"}',
        # Non-ASCII text around the numbers: the check runs on UTF-8 bytes.
        '{"name": "Zoë ✓", "n": 18446744073709551616, "after": "日本"}',
        '{"name": "١٢٣٤٥٦٧٨٩٠١٢٣٤٥٦٧٨٩٠", "n": -99999999999999999999}',
        '{"n": 999999999999999999, "m": 18446744073709551615}',
    ):
        parsed = _loads(text)
        assert parsed == json.loads(text)
        assert [type(v) for v in parsed.values()] == [type(v) for v in json.loads(text).values()]
