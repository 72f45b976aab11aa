class DataError(ValueError):
    """Unusable data or tokenizer input; the message is one line for the user."""
