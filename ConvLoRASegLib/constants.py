"""Names several rooms share and none of them owns, kept here so that they can import them without importing each
other (:mod:`.store` refuses an adapter named like the unadapted model; :mod:`.selection` scores it)."""

#: Name of the unadapted candidate (the model without an adapter) in every score table, and a reserved adapter name.
SOURCE = "source"
