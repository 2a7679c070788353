"""The request handlers of one volume, one module per concern (see cryptfs.fs.core)."""

from cryptfs.content import BlockError
from cryptfs.fs.core import ROOT
from cryptfs.fs.operations import CryptOperations

__all__ = ["CryptOperations", "BlockError", "ROOT"]
