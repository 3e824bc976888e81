"""Song analysis bench: ``python -m bench.song`` scores stems.song.analyse_song on synthetic songs
with known key, chords, beats and downbeats (see ``bench.song.run``)."""
