class InteropError(ValueError):
    """A checkpoint, config or tokenizer that cannot be converted; the one-line message names what does not match."""
