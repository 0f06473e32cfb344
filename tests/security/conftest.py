from ..api.conftest import world

__all__ = ["world"]
