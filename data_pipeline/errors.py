"""Errors of the data pipeline. Every message is one line naming the file, record or key at fault."""


class DataError(Exception):
    """Bad input or a bad setting: the message says which file/record/key and what is wrong."""


class ShardError(DataError):
    """A prepared shard or index is missing, corrupt, or does not match what the reader expects."""


class VocabSizeError(DataError):
    """A tokenizer cannot be trained with the requested vocabulary size on this text (too large or too small).
    `reason` says why without the file, for callers that name the setting instead."""

    def __init__(self, message: str, reason: str):
        super().__init__(message)
        self.reason = reason

    def __reduce__(self):  # broadcast between ranks by pickling
        return type(self), (str(self), self.reason)
