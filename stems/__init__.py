"""Pure compute: generation, tempo conform, analysis, rendering (no Flask, Celery or Azure)."""

from stems import xformers_stand_in

# Before anything imports audiocraft (stems.xformers_stand_in says why).
xformers_stand_in.install()
