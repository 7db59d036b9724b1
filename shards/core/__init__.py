"""The project's I/O layer, used by every stage: storage, atomic commits, stage outputs.

Data flows one way: ``shards.core`` <- ``shards`` (audio) <- ``units`` <- ``pipelines``;
nothing here knows about audio, features or units.
"""
