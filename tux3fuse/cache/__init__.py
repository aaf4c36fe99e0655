"""The page cache: pages tagged with the delta that dirtied them, per-file address spaces, clean-page LRU."""

from .address_space import AddressSpace, PageCache
from .page import Page

__all__ = ["AddressSpace", "Page", "PageCache"]
