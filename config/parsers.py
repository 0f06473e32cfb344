"""Request parsers hardened against hostile bodies.

Python's json module recurses per nesting level: `[[[[...]]]]` a few thousand
levels deep, well under the body size limit, raises RecursionError, which DRF's
JSONParser does not catch (it catches ValueError), so the request would end
in a 500. Here it is the 400 any other unparsable body gets.
"""

from __future__ import annotations

from typing import Any

from rest_framework.exceptions import ParseError
from rest_framework.parsers import JSONParser


class JSONParserWithDepthLimit(JSONParser):
    def parse(self, stream: Any, media_type: str | None = None, parser_context: Any = None) -> Any:
        try:
            return super().parse(stream, media_type, parser_context)
        except RecursionError:
            raise ParseError("JSON parse error - nested too deeply") from None
