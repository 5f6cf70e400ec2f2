"""Numbered SQL migrations (``NNNN_name.sql``), applied in order by
:mod:`vel.stores.postgres.migrate`.

Each file runs in one transaction. Files are never edited once released: a schema change is a
new file with the next number.
"""
