"""The shipped search spaces, installed as ``clipq_search.presets`` (see ``clipq-search spaces``)."""
