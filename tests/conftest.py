import os

# audiocraft's config code reads $USER; CI containers may not set it.
os.environ.setdefault("USER", "stemgen")
