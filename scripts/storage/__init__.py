"""Everything the bundle writes or reads back: atomic writes, the token cache, reference banks."""
