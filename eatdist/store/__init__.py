"""Where outputs go: a local folder or any fsspec URL, behind one small interface."""

from eatdist.store.base import Store, open_store, require_local

__all__ = ["Store", "open_store", "require_local"]
