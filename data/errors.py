"""DataError: bad or missing data (re-exported as data.corpus.DataError, where the callers import it from)."""


class DataError(ValueError):
    """Bad or missing data; the message names the file or the setting."""
