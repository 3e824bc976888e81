"""Tempo conform bench: ``python -m bench.tempo`` prints stemgen vs librosa+PV vs Rubber Band constant ratio."""
