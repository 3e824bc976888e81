"""Key bench: ``python -m bench.key`` scores stems.analysis key estimation and chord fit on
synthetic clips (see ``bench.key.run``)."""
