"""The two exceptions of the crypto layer."""


class IntegrityError(Exception):
    """Anything failed to decrypt or parse.

    Deliberately opaque: the message never says which check failed, so callers
    cannot be turned into an oracle.  Callers add their own context (inode,
    block number) when they log it.
    """

    def __init__(self, what: str = "authentication failed") -> None:
        super().__init__(what)


class NotForMe(Exception):
    """A key-wrap stanza is addressed to another key (try the next stanza)."""


class NotARecipient(NotForMe):
    """A hybrid file whose key is wrapped to recipients the caller holds no key of."""
